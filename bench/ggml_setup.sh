#!/bin/sh
# Sets up llama.cpp's CPU backend (ggml) for bench/ggml_attention.cpp and compiles it (issue 25). Nothing here
# is needed by CI or by the CMake build; everything goes under DIR (default /tmp/ggml): `rm -rf DIR` undoes it.
#
#   sh bench/ggml_setup.sh [DIR]        # then: /usr/bin/python3 bench/ggml_compare.py --ggml-dir DIR
#
# 1. npm install (registry only, postinstall scripts skipped) of node-llama-cpp and its prebuilt Linux x64
#    binaries, both pinned to NODE_LLAMA_CPP_VERSION: @node-llama-cpp/linux-x64 ships libggml-base.so,
#    libggml.so and one libggml-cpu-<variant>.so per instruction set (bins/linux-x64/).
# 2. git clone of node-llama-cpp's llama/gitRelease.bundle (the llama.cpp source those binaries were built
#    from) into DIR/llama.cpp, for ggml.h, ggml-cpu.h and ggml-backend.h.
# 3. g++ -O3 -march=native -fopenmp of bench/ggml_attention.cpp against those headers, linked with
#    libggml-base.so (rpath to the npm folder); the CPU variant is dlopen'ed at run time (the best
#    ggml_backend_score(), as ggml_backend_load_best picks it). Output: DIR/ggml_attention.
set -eu
DIR=${1:-/tmp/ggml}
NODE_LLAMA_CPP_VERSION=${NODE_LLAMA_CPP_VERSION:-3.22.1}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
CXX=${CXX:-g++}
EIGEN_INCLUDE=${EIGEN_INCLUDE:-/usr/include/eigen3}

mkdir -p "$DIR"
if [ ! -d "$DIR/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64" ]; then
  (cd "$DIR" && npm install --no-audit --no-fund --ignore-scripts --no-save --cache "$DIR/.npm-cache" \
      "node-llama-cpp@$NODE_LLAMA_CPP_VERSION" "@node-llama-cpp/linux-x64@$NODE_LLAMA_CPP_VERSION")
fi
LIB="$DIR/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64"
if [ ! -f "$DIR/llama.cpp/ggml/include/ggml.h" ]; then
  git clone -q "$DIR/node_modules/node-llama-cpp/llama/gitRelease.bundle" "$DIR/llama.cpp"
fi
INC="$DIR/llama.cpp/ggml/include"

"$CXX" -std=c++17 -O3 -march=native -fopenmp -DNDEBUG -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers -Wno-ignored-attributes \
  -I"$ROOT/include" -isystem "$EIGEN_INCLUDE" -I"$INC" \
  "$HERE/ggml_attention.cpp" -o "$DIR/ggml_attention" \
  -L"$LIB" -lggml-base -Wl,-rpath,"$LIB" -ldl -lpthread

echo "ggml_setup: node-llama-cpp $NODE_LLAMA_CPP_VERSION, llama.cpp $(cat "$DIR/node_modules/node-llama-cpp/llama/llama.cpp.info.json" | tr -d '\n ' ), libraries in $LIB"
echo "ggml_setup: built $DIR/ggml_attention"

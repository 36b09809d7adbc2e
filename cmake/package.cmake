# Binary packages of the install tree with CPack, included from cmake/install.cmake (HEAD_ATTENTION_INSTALL=ON):
#   cpack -G DEB   libhead-attention-dev_<version>_all.deb, for Debian and derivatives
#   cpack -G TGZ   head-attention-<version>.tar.gz, the same files under one top directory
# run in the build directory after building (nothing needs building: the install tree is headers, CMake package
# files, the pkg-config file, license and docs). ctest package.deb (tests/package) builds the .deb, unpacks it into
# a throwaway root and builds a find_package consumer against it. Every version field comes from project(VERSION).

set(CPACK_PACKAGE_NAME "head-attention")
set(CPACK_PACKAGE_VENDOR "head-attention maintainers")
set(CPACK_PACKAGE_VERSION "${PROJECT_VERSION}")
# Debian wants a synopsis under 80 characters and the long description in lines of under 80 (CPack indents them).
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "header-only causal self-attention layer for C++17 and Eigen 3.4")
string(CONCAT CPACK_PACKAGE_DESCRIPTION
  "head-attention implements the causal single-head self-attention layer of small\n"
  "GPT models (simple_llm's HeadAttention), with MultiHeadAttention, KV-cache\n"
  "decoding, a backward pass and safetensors loading: the same numbers as PyTorch,\n"
  "a fused tiled kernel on all cores through OpenMP, O(T * head_size) extra memory.\n"
  "This package holds the headers, the CMake package HeadAttention\n"
  "(find_package(HeadAttention CONFIG), target HeadAttention::HeadAttention) and\n"
  "the pkg-config file head_attention.pc.")
set(CPACK_RESOURCE_FILE_LICENSE "${PROJECT_SOURCE_DIR}/LICENSE")
set(CPACK_RESOURCE_FILE_README "${PROJECT_SOURCE_DIR}/README.md")
set(CPACK_PACKAGE_FILE_NAME "head-attention-${PROJECT_VERSION}")
set(CPACK_GENERATOR "DEB;TGZ")
# Package what `cmake --install` installs; all of it is architecture-independent.
set(CPACK_STRIP_FILES OFF)
# The homepage (Debian's Homepage field) when the project has one: project(... HOMEPAGE_URL ...) or this variable.
set(HEAD_ATTENTION_HOMEPAGE_URL "${PROJECT_HOMEPAGE_URL}" CACHE STRING "Homepage recorded in the packages")
mark_as_advanced(HEAD_ATTENTION_HOMEPAGE_URL)
if(HEAD_ATTENTION_HOMEPAGE_URL)
  set(CPACK_PACKAGE_HOMEPAGE_URL "${HEAD_ATTENTION_HOMEPAGE_URL}")
  set(CPACK_DEBIAN_PACKAGE_HOMEPAGE "${HEAD_ATTENTION_HOMEPAGE_URL}")
endif()

# Debian: a header-only library's development package, lib<name>-dev, architecture all. Eigen 3.4 is the one
# dependency; nlohmann-json3-dev is recommended, not required: only <head_attention/safetensors.hpp> (and the
# HeadAttention::safetensors target, which the package config defines only when nlohmann_json is found) need it.
# The OpenMP the package config may look for comes with the compiler (GCC's libgomp, Clang's libomp-dev).
set(CPACK_DEBIAN_PACKAGE_NAME "libhead-attention-dev")
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_ARCHITECTURE "all")
set(CPACK_DEBIAN_PACKAGE_DEPENDS "libeigen3-dev (>= 3.4)")
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "nlohmann-json3-dev (>= 3)")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "cmake (>= 3.14), pkg-config")
set(CPACK_DEBIAN_PACKAGE_SECTION "libdevel")
set(CPACK_DEBIAN_PACKAGE_PRIORITY "optional")
set(CPACK_DEBIAN_PACKAGE_MAINTAINER "head-attention maintainers <maintainers@users.noreply.r-seed-a40ce4a8.example>")
set(CPACK_DEBIAN_PACKAGE_VERSION "${PROJECT_VERSION}")
set(CPACK_DEBIAN_PACKAGE_RELEASE "")
# The .deb installs under /usr (CPack's DEB default), where Debian's find_package and pkg-config look; the .tar.gz
# holds the tree relative to its top directory.

include(CPack)

// bench_decode: incremental decoding with a KV cache, and the sliding window's cost against T.
//
// decode/float/cache:<precision>/n:<n>: one decode step (t = 1) of a float HeadAttention's forward_cached
// against a cache holding n positions, one thread (the cache is truncated back to n after each step, so every
// step sees n keys). The cache stores keys and values in float32, or in float16 / bfloat16 (half the bytes,
// converted back tile by tile).
// Counters, on wall-clock time per step:
// - x_forward: a full forward over n + 1 rows (best of 5 calls, measured once in this process) divided by
//   the step's time: what the cache saves.
// - x_floor_kv: the step's time over the floor of reading K and V once, 2 · n · head · 4 bytes (2 for a
//   16-bit cache) at the read
//   bandwidth this process measured for a buffer of that size (the cache stays in the caches between steps,
//   so that is the bandwidth it can have); x_floor: the same floor plus reading the three projection
//   weights (3 · emb · head · 4 bytes), the other unavoidable traffic of a step.
// - GBps: bytes of K, V and weights per second of step.
//
// decode/packed/float/cache:float32/n:<n>: the same step of the layer's PackedHeadAttention, whose weights
// were prepared once (the layer transposes and scales them on every call: at t = 1 a large part of a step).
//
// step/<form>/<weights>/cache:<precision>/n:<n>: one decode step (t = 1) of an 8-head MultiHeadAttention
// (emb 512, heads of 64) with weights of <weights> (float, bfloat16, float16), forward_cached_into with a
// Workspace, one thread, against a cache of n positions (truncated back after each step); <form> is the layer
// or its PackedMultiHeadAttention. step/packed/float-bf16/…: a float layer packed with bfloat16 weights
// (PackedMultiHeadAttention(layer, Precision::bfloat16)).
//
// window/<rule>/float/T:<T>: a full forward over T rows, one thread, under the causal rule and a sliding
// window of 512: the window's cost grows as T · 512, the causal one as T².
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <head_attention/head_attention.hpp>

#include "machine_limits.hpp"

namespace {

using Index = Eigen::Index;
using Clock = std::chrono::steady_clock;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index kEmb = 512;
constexpr Index kHead = 64;
constexpr std::uint64_t kSeed = 42;
constexpr Index kWindow = 512;
const Index kCacheLengths[] = {128, 512, 1024, 4096, 16384};
const Index kWindowLengths[] = {1024, 2048, 4096, 8192, 16384};

Matrix random_rows(Index rows, std::uint64_t seed) {
  std::srand(static_cast<unsigned>(seed));
  return Matrix::Random(rows, kEmb);
}

void bm_decode(benchmark::State& state, Index n, head_attention::Precision storage, bool packed) {
  head_attention::HeadAttention<float> layer(kEmb, kHead, n + 1, kSeed);
  layer.set_num_threads(1);
  const head_attention::PackedHeadAttention<float> packed_layer(layer);
  const Matrix prompt = random_rows(n + 1, kSeed + static_cast<std::uint64_t>(n));
  auto cache = layer.make_cache(storage);
  (void)layer.forward_cached(prompt.topRows(n), cache);
  const Matrix next = prompt.bottomRows(1);

  // The same output the long way, for x_forward.
  double forward_seconds = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    const Matrix out = layer.forward(prompt);
    benchmark::DoNotOptimize(out.data());
    forward_seconds = std::min(forward_seconds, std::chrono::duration<double>(Clock::now() - t0).count());
  }

  const double kv_bytes =
      2.0 * static_cast<double>(n) * kHead * static_cast<double>(head_attention::precision_bytes(storage));
  const double weight_bytes = 3.0 * kEmb * kHead * sizeof(float);
  const double bandwidth = bench_limits::read_bandwidth_gbps(kv_bytes) * 1e9;

  const auto t0 = Clock::now();
  for (auto _ : state) {
    const Matrix out = packed ? packed_layer.forward_cached(next, cache) : layer.forward_cached(next, cache);
    benchmark::DoNotOptimize(out.data());
    cache.truncate(n);
  }
  const double step =
      std::chrono::duration<double>(Clock::now() - t0).count() / static_cast<double>(state.iterations());
  state.counters["x_forward"] = forward_seconds / step;
  state.counters["x_floor_kv"] = step / (kv_bytes / bandwidth);
  state.counters["x_floor"] = step / ((kv_bytes + weight_bytes) / bandwidth);
  state.counters["GBps"] = (kv_bytes + weight_bytes) / step * 1e-9;
  state.counters["bandwidth_GBps"] = bandwidth * 1e-9;
}

template <typename Scalar>
void bm_multihead_step(benchmark::State& state, Index n, head_attention::Precision storage, bool packed,
                       head_attention::Precision weights) {
  using Layer = head_attention::MultiHeadAttention<Scalar>;
  using Rows = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Layer layer(8, kEmb, kHead, n + 1, 0.0, kSeed);
  layer.set_num_threads(1);
  const head_attention::PackedMultiHeadAttention<Scalar> packed_layer(layer, weights);
  const Rows prompt = random_rows(n + 1, kSeed + static_cast<std::uint64_t>(n)).template cast<Scalar>();
  auto cache = layer.make_cache(storage);
  (void)layer.forward_cached(prompt.topRows(n), cache);
  const Rows next = prompt.bottomRows(1);
  Rows out(1, kEmb);
  head_attention::Workspace<Scalar> workspace;
  for (auto _ : state) {
    if (packed)
      packed_layer.forward_cached_into(next, cache, out, workspace);
    else
      layer.forward_cached_into(next, cache, out, workspace);
    benchmark::DoNotOptimize(out.data());
    cache.truncate(n);
  }
}

void bm_window(benchmark::State& state, Index T, bool windowed) {
  const head_attention::MaskRule rule =
      windowed ? head_attention::MaskRule::sliding_window(kWindow) : head_attention::MaskRule::causal();
  head_attention::HeadAttention<float> layer(kEmb, kHead, T, kSeed, rule);
  layer.set_num_threads(1);
  const Matrix x = random_rows(T, kSeed + static_cast<std::uint64_t>(T));
  Matrix out(T, kHead);
  for (auto _ : state) {
    layer.forward_into(x, out);
    benchmark::DoNotOptimize(out.data());
  }
}

}  // namespace

int main(int argc, char** argv) {
  Eigen::setNbThreads(1);
  using head_attention::Precision;
  for (const Precision storage : {Precision::float32, Precision::float16, Precision::bfloat16})
    for (const Index n : kCacheLengths) {
      if (storage != Precision::float32 && n < 1024) continue;
      const std::string name = std::string("decode/float/cache:") + head_attention::precision_name(storage) +
                               "/n:" + std::to_string(n);
      benchmark::RegisterBenchmark(name.c_str(), bm_decode, n, storage, false)
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime();
      if (storage == Precision::float32)
        benchmark::RegisterBenchmark(("decode/packed/float/cache:float32/n:" + std::to_string(n)).c_str(),
                                     bm_decode, n, storage, true)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
    }
  for (const Index n : {Index(128), Index(512), Index(1024), Index(2048), Index(4096)})
    for (const bool packed : {false, true}) {
      const std::string form = packed ? "packed" : "layer", tail = "/n:" + std::to_string(n);
      const auto add = [&](const std::string& name, auto fn, Precision storage, Precision weights) {
        benchmark::RegisterBenchmark(("step/" + form + name + tail).c_str(), fn, n, storage, packed, weights)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
      };
      add("/float/cache:float32", bm_multihead_step<float>, Precision::float32, Precision::float32);
      add("/float/cache:bfloat16", bm_multihead_step<float>, Precision::bfloat16, Precision::float32);
      add("/bfloat16/cache:bfloat16", bm_multihead_step<Eigen::bfloat16>, Precision::bfloat16,
          Precision::bfloat16);
      add("/float16/cache:float16", bm_multihead_step<Eigen::half>, Precision::float16, Precision::float16);
      if (packed)
        benchmark::RegisterBenchmark(("step/packed/float-bf16/cache:bfloat16" + tail).c_str(),
                                     bm_multihead_step<float>, n, Precision::bfloat16, true,
                                     Precision::bfloat16)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
    }
  for (const Index T : kWindowLengths) {
    benchmark::RegisterBenchmark(("window/causal/float/T:" + std::to_string(T)).c_str(), bm_window, T, false)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark(("window/sliding_512/float/T:" + std::to_string(T)).c_str(), bm_window, T,
                                 true)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

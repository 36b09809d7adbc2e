// bench_step: one decode step of every form, against what the machine allows (issue 25).
//
// step/<form>/w:<weights>/kv:<cache>/B:<B>/n:<n>/threads:<t>: one step of B sequences (one new row each)
// against a cache holding n positions per sequence, emb 512, head 64 (8 heads of 64 for the multi-head
// forms); the cache is truncated back to n after each step, so that every step sees n keys. Forms:
//   head          HeadAttention::forward_cached (the obvious call: returns a new matrix)
//   head_packed   PackedHeadAttention::forward_cached
//   mha           MultiHeadAttention::forward_cached_into with a Workspace
//   mha_packed    PackedMultiHeadAttention::forward_cached_into with a Workspace
//   mha_packed16  PackedMultiHeadAttention of a float layer packed to bfloat16 weights (its `Precision`
//                 constructor), forward_cached_into with a Workspace
//   mha_eigen     the same multi-head step written with plain Eigen matrix-vector products on the [out, in]
//                 weights (one sequence, float): the baseline any C++ programmer could write
// weights: the layer's Scalar (f32, bf16 = Eigen::bfloat16); kv: the cache's storage (f32, bf16, f16).
//
// Counters, on wall-clock time per step:
// - bytes: what the step must read at least: every weight and bias once (in their stored precision) and every
//   sequence's K and V for every head (n + 1 rows, in the cache's precision).
// - floor_us: those bytes at the read bandwidth this process measured (a vectorised streaming sum, best of 7,
//   on `threads` threads) over a buffer of that size: weights and caches stay in the CPU caches between
//   steps, so that is the bandwidth a step can have. x_floor: the step's time over floor_us.
// - flops, x_peak: the step's useful flops (projections 2·emb·out per row, attention 4·(n+1)·head per head
// and
//   row) and the time they take at the FMA peak measured here (one core's, times threads): where the weights
//   are read once for many sequences (B = 32) the arithmetic, not the bytes, is the floor.
// - tokens_per_s: B / step time.
// The machine's limits are printed once to stderr and put in the JSON context (fma_peak_gflops,
// read_bandwidth_gbps_*).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <head_attention/head_attention.hpp>

#include "machine_limits.hpp"

namespace {

namespace ha = head_attention;
using Index = Eigen::Index;
using Clock = std::chrono::steady_clock;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::VectorXf;
using bf16 = Eigen::bfloat16;

constexpr Index kEmb = 512;
constexpr Index kHead = 64;
constexpr Index kHeads = 8;
constexpr std::uint64_t kSeed = 42;

double g_peak_gflops = 0;  // one core's float FMA peak, measured at the start

Matrix random_rows(Index rows, std::uint64_t seed) {
  std::srand(static_cast<unsigned>(seed));
  return Matrix::Random(rows, kEmb);
}

// ------------------------------------------------------------------------------------------------ the forms

/// Every weight and bias of a Linear, converted to To (rounded to nearest even).
template <typename To>
ha::Linear<To> linear(const ha::Linear<float>& from) {
  ha::Linear<To> to;
  to.weight = from.weight.template cast<To>();
  to.bias = from.bias.template cast<To>();
  return to;
}

/// A multi-head layer of another Scalar with the same sizes and (converted) weights, as the recipe
/// examples/recipes/bfloat16_from_float.cpp builds it.
template <typename To>
ha::MultiHeadAttention<To> converted(const ha::MultiHeadAttention<float>& from) {
  if constexpr (std::is_same<To, float>::value) return from;
  ha::MultiHeadAttention<To> to(from.num_heads(), from.emb_size(), from.head_size(), from.max_seq_len(),
                                ha::Probability(0.0), ha::Seed(0));
  for (Index h = 0; h < from.num_heads(); ++h) {
    to.head(h).query() = linear<To>(from.head(h).query());
    to.head(h).key() = linear<To>(from.head(h).key());
    to.head(h).value() = linear<To>(from.head(h).value());
  }
  to.projection() = linear<To>(from.projection());
  return to;
}

template <typename To>
ha::HeadAttention<To> converted(const ha::HeadAttention<float>& from) {
  if constexpr (std::is_same<To, float>::value) return from;
  ha::HeadAttention<To> to(from.emb_size(), from.head_size(), from.max_seq_len(), ha::Seed(0));
  to.query() = linear<To>(from.query());
  to.key() = linear<To>(from.key());
  to.value() = linear<To>(from.value());
  return to;
}

/// The multi-head step of one sequence in plain Eigen: matrix-vector products on the weights as stored, the
/// heads' K and V appended to [max, head] row-major caches, a softmax per head, the output projection.
struct EigenStep {
  Matrix wq, wk, wv, wo;  // [heads · head, emb] each (wo: [emb, heads · head])
  Vector bq, bk, bv, bo;
  std::vector<Matrix> keys, values;  // per head [max, head]
  Vector q, k, v, concat, scores, out;
  Index length = 0;

  EigenStep(const ha::MultiHeadAttention<float>& mha, Index max_len) {
    const Index hd = kHeads * kHead;
    wq.resize(hd, kEmb), wk.resize(hd, kEmb), wv.resize(hd, kEmb);
    bq.resize(hd), bk.resize(hd), bv.resize(hd);
    for (Index h = 0; h < kHeads; ++h) {
      wq.middleRows(h * kHead, kHead) = mha.head(h).query().weight;
      wk.middleRows(h * kHead, kHead) = mha.head(h).key().weight;
      wv.middleRows(h * kHead, kHead) = mha.head(h).value().weight;
      bq.segment(h * kHead, kHead) = mha.head(h).query().bias;
      bk.segment(h * kHead, kHead) = mha.head(h).key().bias;
      bv.segment(h * kHead, kHead) = mha.head(h).value().bias;
    }
    wo = mha.projection().weight;
    bo = mha.projection().bias;
    keys.assign(static_cast<std::size_t>(kHeads), Matrix(max_len, kHead));
    values.assign(static_cast<std::size_t>(kHeads), Matrix(max_len, kHead));
    q.resize(hd), k.resize(hd), v.resize(hd), concat.resize(hd), scores.resize(max_len), out.resize(kEmb);
  }

  void step(const Eigen::Ref<const Vector>& x) {
    q.noalias() = wq * x;
    q += bq;
    k.noalias() = wk * x;
    k += bk;
    v.noalias() = wv * x;
    v += bv;
    const Index n = length + 1;
    const float scale = 1.0f / std::sqrt(static_cast<float>(kHead));
    for (Index h = 0; h < kHeads; ++h) {
      const std::size_t hs = static_cast<std::size_t>(h);
      keys[hs].row(length) = k.segment(h * kHead, kHead).transpose();
      values[hs].row(length) = v.segment(h * kHead, kHead).transpose();
      Eigen::Ref<Vector> s = scores.head(n);
      s.noalias() = keys[hs].topRows(n) * q.segment(h * kHead, kHead);
      s *= scale;
      s = (s.array() - s.maxCoeff()).exp();
      s /= s.sum();
      concat.segment(h * kHead, kHead).noalias() = values[hs].topRows(n).transpose() * s;
    }
    out.noalias() = wo * concat;
    out += bo;
    ++length;
  }
};

// --------------------------------------------------------------------------------------------------- cases

ha::Precision precision_of(const std::string& name) {
  return name == "bf16"  ? ha::Precision::bfloat16
         : name == "f16" ? ha::Precision::float16
                         : ha::Precision::float32;
}

struct Spec {
  std::string form, weights, kv;
  Index batch, n;
  int threads;
  bool multi() const { return form.rfind("mha", 0) == 0; }
  std::string name() const {
    return "step/" + form + "/w:" + weights + "/kv:" + kv + "/B:" + std::to_string(batch) +
           "/n:" + std::to_string(n) + "/threads:" + std::to_string(threads);
  }
};

/// Bytes a step must read, and its useful flops.
std::pair<double, double> step_cost(const Spec& s) {
  const double heads = s.multi() ? kHeads : 1;
  const double weight_elems =
      heads * 3 * (kEmb * kHead + kHead) + (s.multi() ? kEmb * kHeads * kHead + kEmb : 0);
  const double weight_bytes = weight_elems * (s.weights == "f32" ? 4 : 2);
  const double kv_bytes = static_cast<double>(s.batch) * heads * 2.0 * static_cast<double>(s.n + 1) * kHead *
                          static_cast<double>(ha::precision_bytes(precision_of(s.kv)));
  const double b = static_cast<double>(s.batch);
  const double flops = b * (2.0 * (weight_elems - heads * 3 * kHead - (s.multi() ? kEmb : 0)) +
                            heads * 4.0 * static_cast<double>(s.n + 1) * kHead);
  return {weight_bytes + kv_bytes, flops};
}

void report(benchmark::State& state, const Spec& s, double seconds_per_step) {
  const auto [bytes, flops] = step_cost(s);
  const double floor = bytes / (bench_limits::read_bandwidth_gbps(bytes, s.threads) * 1e9);
  state.counters["bytes"] = bytes;
  state.counters["floor_us"] = floor * 1e6;
  state.counters["x_floor"] = seconds_per_step / floor;
  state.counters["flops"] = flops;
  state.counters["x_peak"] = seconds_per_step / (flops / (g_peak_gflops * 1e9 * s.threads));
  state.counters["tokens_per_s"] = static_cast<double>(s.batch) / seconds_per_step;
}

/// Times `step` (one decode step followed by the cache's truncate back to n) over the benchmark's loop.
template <typename Step>
void run(benchmark::State& state, const Spec& s, Step&& step) {
  for (int i = 0; i < 3; ++i)
    step();  // warm: the workspace sized, the weights and caches in cache
  const auto t0 = Clock::now();
  for (auto _ : state)
    step();
  report(state, s,
         std::chrono::duration<double>(Clock::now() - t0).count() / static_cast<double>(state.iterations()));
}

template <typename Scalar>
void bm_head(benchmark::State& state, Spec s) {
  using Layer = ha::HeadAttention<Scalar>;
  const ha::HeadAttention<float> base(kEmb, kHead, s.n + 1, ha::Seed(kSeed));
  Layer layer = converted<Scalar>(base);
  using SMatrix = typename Layer::Matrix;
  const SMatrix prompt =
      random_rows(s.batch * (s.n + 1), kSeed + static_cast<std::uint64_t>(s.n)).cast<Scalar>();
  SMatrix first(s.batch * s.n, kEmb), next(s.batch, kEmb);
  for (Index b = 0; b < s.batch; ++b) {
    first.middleRows(b * s.n, s.n) = prompt.middleRows(b * (s.n + 1), s.n);
    next.row(b) = prompt.row(b * (s.n + 1) + s.n);
  }
  auto caches = layer.make_cache(s.batch, precision_of(s.kv));
  (void)layer.forward_cached(first, caches);
  layer.set_num_threads(s.threads);
  const ha::PackedHeadAttention<Scalar> packed_t(layer);
  const bool use_packed = s.form == "head_packed";
  run(state, s, [&] {
    const SMatrix out =
        use_packed ? packed_t.forward_cached(next, caches) : layer.forward_cached(next, caches);
    benchmark::DoNotOptimize(out.data());
    for (auto& c : caches)
      c.truncate(s.n);
  });
}

template <typename Scalar>
void bm_mha(benchmark::State& state, Spec s) {
  using Layer = ha::MultiHeadAttention<Scalar>;
  const ha::MultiHeadAttention<float> base(kHeads, kEmb, kHead, s.n + 1, ha::Probability(0.0),
                                           ha::Seed(kSeed));
  Layer layer = converted<Scalar>(base);
  using SMatrix = typename Layer::Matrix;
  const Matrix prompt = random_rows(s.batch * (s.n + 1), kSeed + static_cast<std::uint64_t>(s.n));
  SMatrix first(s.batch * s.n, kEmb), next(s.batch, kEmb), out(s.batch, kEmb);
  for (Index b = 0; b < s.batch; ++b) {
    first.middleRows(b * s.n, s.n) = prompt.middleRows(b * (s.n + 1), s.n).cast<Scalar>();
    next.row(b) = prompt.row(b * (s.n + 1) + s.n).cast<Scalar>();
  }
  if (s.form == "mha_eigen") {
    EigenStep eigen(base, s.n + 1);
    const ha::PackedMultiHeadAttention<float> packed(base);
    auto cache = packed.make_cache();
    const Matrix ours = packed.forward_cached(prompt.topRows(s.n + 1), cache);
    for (Index t = 0; t <= s.n; ++t)
      eigen.step(prompt.row(t).transpose());
    // The baseline computes what the layer computes (a check on the benchmark, not a test of the library).
    const float error = (eigen.out.transpose() - ours.bottomRows(1)).cwiseAbs().maxCoeff();
    if (!(error < 1e-3f))
      state.SkipWithError(("mha_eigen differs from the layer by " + std::to_string(error)).c_str());
    const Vector x = prompt.row(s.n).transpose();
    run(state, s, [&] {
      eigen.length = s.n;
      eigen.step(x);
      benchmark::DoNotOptimize(eigen.out.data());
    });
    return;
  }
  auto cache = layer.make_cache(s.batch, precision_of(s.kv));
  cache.reserve();
  (void)layer.forward_cached(first, cache);
  layer.set_num_threads(s.threads);
  // A float layer packed to 16-bit weights on request, or the layer's own precision.
  const ha::PackedMultiHeadAttention<Scalar> packed =
      s.form == "mha_packed16" ? ha::PackedMultiHeadAttention<Scalar>(layer, ha::Precision::bfloat16)
                               : ha::PackedMultiHeadAttention<Scalar>(layer);
  ha::Workspace<Scalar> workspace;
  const bool use_packed = s.form != "mha";
  if (use_packed)
    packed.reserve_cached_workspace(workspace, cache);
  else
    layer.reserve_cached_workspace(workspace, cache);
  run(state, s, [&] {
    if (use_packed)
      packed.forward_cached_into(next, cache, out, workspace);
    else
      layer.forward_cached_into(next, cache, out, workspace);
    benchmark::DoNotOptimize(out.data());
    cache.truncate(s.n);
  });
}

void add(const Spec& s) {
  benchmark::internal::Benchmark* b = nullptr;
  if (s.multi())
    b = s.weights == "bf16" && s.form != "mha_packed16"
            ? benchmark::RegisterBenchmark(s.name().c_str(), bm_mha<bf16>, s)
            : benchmark::RegisterBenchmark(s.name().c_str(), bm_mha<float>, s);
  else
    b = s.weights == "bf16" ? benchmark::RegisterBenchmark(s.name().c_str(), bm_head<bf16>, s)
                            : benchmark::RegisterBenchmark(s.name().c_str(), bm_head<float>, s);
  b->UseRealTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace

int main(int argc, char** argv) {
  Eigen::setNbThreads(1);
  const std::vector<int> thread_counts = {1, 2};
  // One sequence, float, every form (the table), 1 and 2 threads.
  for (const Index n : {128, 512, 2048, 4096})
    for (const int t : thread_counts)
      for (const char* form : {"head", "head_packed"})
        add({form, "f32", "f32", 1, n, t});
  for (const Index n : {128, 512, 1024, 2048})
    for (const int t : thread_counts) {
      for (const char* form : {"mha", "mha_packed"})
        add({form, "f32", "f32", 1, n, t});
      if (t == 1) add({"mha_eigen", "f32", "f32", 1, n, 1});
    }
  // 16 bits: a bfloat16 layer with a bfloat16 cache, and a float layer with a 16-bit cache.
  for (const Index n : {128, 512, 1024, 2048})
    for (const int t : thread_counts) {
      for (const char* form : {"mha", "mha_packed"})
        add({form, "bf16", "bf16", 1, n, t});
      add({"mha_packed", "f32", "bf16", 1, n, t});
      add({"mha_packed16", "bf16", "bf16", 1, n, t});
      add({"head_packed", "bf16", "bf16", 1, n, t});
    }
  // Many sequences at once: B = 8 and 32, one cache of B sequences.
  for (const Index batch : {8, 32})
    for (const Index n : {128, 512})
      for (const int t : thread_counts) {
        add({"mha_packed", "f32", "f32", batch, n, t});
        add({"mha", "f32", "f32", batch, n, t});
        add({"mha_packed", "bf16", "bf16", batch, n, t});
        add({"head_packed", "f32", "f32", batch, n, t});
        add({"head", "f32", "f32", batch, n, t});
      }

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  g_peak_gflops = bench_limits::peak_gflops<float>();
  benchmark::AddCustomContext("fma_peak_gflops", std::to_string(g_peak_gflops));
  for (const int mib : {1, 4, 64})
    for (const int t : thread_counts)
      benchmark::AddCustomContext(
          "read_bandwidth_gbps_" + std::to_string(mib) + "MiB_" + std::to_string(t) + "t",
          std::to_string(bench_limits::read_bandwidth_gbps(mib * 1048576.0, t)));
  std::fprintf(stderr,
               "machine: one core's float FMA peak %.1f GFLOP/s; read bandwidth over 4 MiB %.1f GB/s\n",
               g_peak_gflops, bench_limits::read_bandwidth_gbps(4 * 1048576.0, 1));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

// bench_attention: Google Benchmark suite for the fused forward path against the materialising reference.
//
// Benchmarks are named attention/<path>/<dtype>/B:<B>/T:<T>/threads:<n>, path = fast (BatchedHeadAttention::
// forward, n threads through head().set_num_threads), fast_ws (the same layer's forward_into with a Workspace
// and a preallocated output: calls that allocate nothing), packed (PackedHeadAttention made from the same
// layer, its forward on the same tensor: weights prepared once instead of on every call), packed_ws (packed
// plus fast_ws's Workspace and output) or reference (head_attention::reference::forward on each sequence,
// Eigen's own GEMMs limited to n threads with Eigen::setNbThreads). emb = 512, head = 64 throughout. The
// reference runs only up to T = 8192 (kReferenceMaxT): beyond, its [T, T] scores alone take 1 GiB in float.
//
// Counters, all on wall-clock time (every benchmark here uses UseRealTime):
// - FLOP: useful flop/s, B (2 T emb 3 head + 2 head T (T+1)/2 + 2 head T (T+1)/2), that is the projections
//   plus the causal halves of Q Kᵀ and P V.
// - frac_gemm: FLOP over n times the best single-thread 1024³ GEMM rate measured at startup in this process
//   (SGEMM for float, DGEMM for double; best of 7 calls): Eigen's, and OpenBLAS's when --openblas=<path to
//   libopenblas.so> is given (loaded with dlopen, so that the build needs no BLAS), whichever is faster.
// - frac_peak: FLOP over n times the core's peak FMA rate, measured at startup with a register-blocked loop
// of
//   independent fused multiply-adds on the widest SIMD registers this build uses.
// - x_ref: speedup over the reference path of the same dtype, shape and thread count, whose repetitions ran
//   earlier in this process (their median). Absent when the filter excluded that reference, or T > 8192.
//
// Without arguments it runs with --benchmark_repetitions=5 --benchmark_min_time=0.2
// --benchmark_display_aggregates_only=true; any of these given on the command line wins. See bench/README.md.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <dlfcn.h>

#include <benchmark/benchmark.h>
#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include <head_attention/head_attention.hpp>

#include "machine_limits.hpp"

namespace {

using Index = Eigen::Index;
using Clock = std::chrono::steady_clock;

constexpr Index kEmb = 512;
constexpr Index kHead = 64;
constexpr Index kReferenceMaxT = 8192;
constexpr std::uint64_t kSeed = 42;

struct Shape {
  Index batch;
  Index seq_len;
};

// The seed example, a batch of mid-length sequences, then the B = 1 sweep over T (which holds B=1, T=4096).
const Shape kShapes[] = {{2, 10},   {8, 1024}, {1, 128},  {1, 256},  {1, 512},
                         {1, 1024}, {1, 2048}, {1, 4096}, {1, 8192}, {1, 16384}};
const int kThreadCounts[] = {1, 2};

template <typename Scalar>
const char* dtype_name() {
  return sizeof(Scalar) == sizeof(float) ? "float" : "double";
}

/// Useful flops of one forward call: the three projections plus the causal halves of QKᵀ and PV.
double useful_flops(const Shape& s) {
  const double B = static_cast<double>(s.batch);
  const double T = static_cast<double>(s.seq_len);
  const double emb = static_cast<double>(kEmb);
  const double head = static_cast<double>(kHead);
  return B * (2.0 * T * emb * 3.0 * head + 2.0 * (2.0 * head * T * (T + 1.0) / 2.0));
}

// The best single-thread 1024³ GEMM rate in GFLOP/s (Eigen or OpenBLAS), and the peak FMA rate, per dtype,
// filled in by main().
std::map<std::string, double> g_gemm_gflops;
std::map<std::string, double> g_peak_gflops;

/// OpenBLAS's single-thread 1024³ GEMM rate in GFLOP/s, from the library at `path` (0 if it cannot be
/// loaded). Through dlopen: the benchmark is built without any BLAS.
template <typename Scalar>
double measure_openblas_gflops(const std::string& path) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    std::fprintf(stderr, "cannot load OpenBLAS from %s: %s\n", path.c_str(), dlerror());
    return 0.0;
  }
  using SetThreads = void (*)(int);
  using Gemm = void (*)(int, int, int, int, int, int, Scalar, const Scalar*, int, const Scalar*, int, Scalar,
                        Scalar*, int);
  const auto set_threads = reinterpret_cast<SetThreads>(dlsym(lib, "openblas_set_num_threads"));
  const auto gemm =
      reinterpret_cast<Gemm>(dlsym(lib, sizeof(Scalar) == sizeof(float) ? "cblas_sgemm" : "cblas_dgemm"));
  if (gemm == nullptr) return 0.0;
  if (set_threads != nullptr) set_threads(1);
  constexpr int n = 1024;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const Matrix a = Matrix::Random(n, n), b = Matrix::Random(n, n);
  Matrix c(n, n);
  constexpr int col_major = 102, no_trans = 111;  // CblasColMajor, CblasNoTrans
  gemm(col_major, no_trans, no_trans, n, n, n, Scalar(1), a.data(), n, b.data(), n, Scalar(0), c.data(), n);
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = Clock::now();
    gemm(col_major, no_trans, no_trans, n, n, n, Scalar(1), a.data(), n, b.data(), n, Scalar(0), c.data(), n);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return 2.0 * n * n * static_cast<double>(n) / best * 1e-9;  // the library stays loaded
}

template <typename Scalar>
double measure_gemm_gflops(int threads) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  constexpr Index n = 1024;
  const Matrix a = Matrix::Random(n, n);
  const Matrix b = Matrix::Random(n, n);
  Matrix c(n, n);
  Eigen::setNbThreads(threads);
  c.noalias() = a * b;  // warm-up
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = Clock::now();
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  Eigen::setNbThreads(1);
  return 2.0 * static_cast<double>(n) * n * n / best * 1e-9;
}

std::string key_of(const char* dtype, const Shape& s, int threads) {
  return std::string(dtype) + "/B:" + std::to_string(s.batch) + "/T:" + std::to_string(s.seq_len) +
         "/threads:" + std::to_string(threads);
}

// Every run of each reference benchmark: (iterations, seconds per iteration). Google Benchmark first grows
// the iteration count until a run is long enough, then runs the remaining repetitions at that count; the runs
// at the largest count are exactly the reported repetitions.
std::map<std::string, std::vector<std::pair<benchmark::IterationCount, double>>> g_reference_runs;

/// The median seconds per call of the reported reference repetitions for this key, or 0 if none ran.
double reference_median(const std::string& key) {
  const auto it = g_reference_runs.find(key);
  if (it == g_reference_runs.end() || it->second.empty()) return 0.0;
  benchmark::IterationCount most = 0;
  for (const auto& run : it->second)
    most = std::max(most, run.first);
  std::vector<double> times;
  for (const auto& run : it->second)
    if (run.first == most) times.push_back(run.second);
  std::sort(times.begin(), times.end());
  const std::size_t m = times.size();
  return m % 2 == 1 ? times[m / 2] : 0.5 * (times[m / 2 - 1] + times[m / 2]);
}

/// FLOP as a rate of Google Benchmark's real time; frac_gemm and x_ref from our own clock around the same
/// timed loop (plain numbers, so that the console shows no "/s" after them).
template <typename Scalar>
void set_counters(benchmark::State& state, const Shape& s, int threads, double seconds_per_call,
                  double reference_seconds) {
  const double flops = useful_flops(s);
  const double gemm = g_gemm_gflops[dtype_name<Scalar>()] * 1e9 * threads;
  state.counters["FLOP"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  if (seconds_per_call <= 0.0) return;
  if (gemm > 0.0) state.counters["frac_gemm"] = flops / seconds_per_call / gemm;
  const double peak = g_peak_gflops[dtype_name<Scalar>()] * 1e9 * threads;
  if (peak > 0.0) state.counters["frac_peak"] = flops / seconds_per_call / peak;
  if (reference_seconds > 0.0) state.counters["x_ref"] = reference_seconds / seconds_per_call;
}

template <typename Scalar>
Eigen::Tensor<Scalar, 3, Eigen::RowMajor> random_input(const Shape& s) {
  Eigen::Tensor<Scalar, 3, Eigen::RowMajor> x(s.batch, s.seq_len, kEmb);
  x.setRandom();  // U(0, 1)
  x = x * Scalar(2) - Scalar(1);
  return x;
}

template <typename Scalar>
void bm_fast(benchmark::State& state, Shape s, int threads) {
  head_attention::BatchedHeadAttention<Scalar> layer(kEmb, kHead, s.seq_len, kSeed);
  layer.head().set_num_threads(threads);
  const auto x = random_input<Scalar>(s);
  const auto t0 = Clock::now();
  for (auto _ : state) {
    auto out = layer.forward(x);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  const double per_call = state.iterations() > 0 ? elapsed / static_cast<double>(state.iterations()) : 0.0;
  set_counters<Scalar>(state, s, threads, per_call,
                       reference_median(key_of(dtype_name<Scalar>(), s, threads)));
}

/// The fast path's variants, all over the same layer and input: `packed` runs a PackedHeadAttention made from
/// it, `workspace` calls forward_into with a Workspace and an output allocated once.
template <typename Scalar>
void bm_variant(benchmark::State& state, Shape s, int threads, bool packed, bool workspace) {
  using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  head_attention::HeadAttention<Scalar> layer(kEmb, kHead, s.seq_len, kSeed);
  layer.set_num_threads(threads);
  const head_attention::PackedHeadAttention<Scalar> packed_layer(layer);
  const auto x = random_input<Scalar>(s);
  const Eigen::Map<const RowMatrix> rows(x.data(), s.batch * s.seq_len, kEmb);  // [B·T, emb]
  head_attention::Workspace<Scalar> ws;
  RowMatrix out(s.batch * s.seq_len, kHead);  // [B·T, head]
  const auto t0 = Clock::now();
  for (auto _ : state) {
    if (workspace && packed) {
      packed_layer.forward_into(rows, out, ws, head_attention::Batch(s.batch));
      benchmark::DoNotOptimize(out.data());
    } else if (workspace) {
      layer.forward_into(rows, out, ws, head_attention::Batch(s.batch));
      benchmark::DoNotOptimize(out.data());
    } else {
      auto result = packed_layer.forward(x);
      benchmark::DoNotOptimize(result.data());
    }
    benchmark::ClobberMemory();
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  const double per_call = state.iterations() > 0 ? elapsed / static_cast<double>(state.iterations()) : 0.0;
  set_counters<Scalar>(state, s, threads, per_call,
                       reference_median(key_of(dtype_name<Scalar>(), s, threads)));
}

template <typename Scalar>
void bm_reference(benchmark::State& state, Shape s, int threads) {
  using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;
  using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const head_attention::HeadAttention<Scalar> layer(kEmb, kHead, s.seq_len, kSeed);
  const auto x = random_input<Scalar>(s);
  Eigen::setNbThreads(threads);  // the reference's GEMMs are Eigen's, which fork OpenMP threads on their own
  const auto t0 = Clock::now();
  for (auto _ : state) {
    Tensor3 out(s.batch, s.seq_len, kHead);
    for (Index b = 0; b < s.batch; ++b) {
      const Eigen::Map<const RowMatrix> xb(x.data() + b * s.seq_len * kEmb, s.seq_len, kEmb);
      Eigen::Map<RowMatrix>(out.data() + b * s.seq_len * kHead, s.seq_len, kHead) =
          head_attention::reference::forward(xb, layer.query(), layer.key(), layer.value());
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  Eigen::setNbThreads(1);
  const double per_call = state.iterations() > 0 ? elapsed / static_cast<double>(state.iterations()) : 0.0;
  if (per_call > 0.0)
    g_reference_runs[key_of(dtype_name<Scalar>(), s, threads)].emplace_back(state.iterations(), per_call);
  set_counters<Scalar>(state, s, threads, per_call, 0.0);
}

template <typename Scalar>
void register_shape(const Shape& s) {
  // The reference first: the fast benchmarks of the same shape read its median for x_ref.
  for (const int threads : kThreadCounts) {
    if (s.seq_len > kReferenceMaxT) break;
    const std::string name = "attention/reference/" + key_of(dtype_name<Scalar>(), s, threads);
    benchmark::RegisterBenchmark(name.c_str(), bm_reference<Scalar>, s, threads)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  for (const int threads : kThreadCounts) {
    const std::string name = "attention/fast/" + key_of(dtype_name<Scalar>(), s, threads);
    benchmark::RegisterBenchmark(name.c_str(), bm_fast<Scalar>, s, threads)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  const std::pair<const char*, std::pair<bool, bool>> variants[] = {
      {"fast_ws", {false, true}}, {"packed", {true, false}}, {"packed_ws", {true, true}}};
  for (const auto& variant : variants)
    for (const int threads : kThreadCounts) {
      const std::string name =
          std::string("attention/") + variant.first + "/" + key_of(dtype_name<Scalar>(), s, threads);
      benchmark::RegisterBenchmark(name.c_str(), bm_variant<Scalar>, s, threads, variant.second.first,
                                   variant.second.second)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
}

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  return "unknown";
}

bool has_flag(const std::vector<std::string>& args, const std::string& flag) {
  for (const auto& a : args)
    if (a.rfind(flag, 0) == 0) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  // Defaults for a trustworthy run on a noisy machine; each is overridden by the same flag on the command
  // line.
  std::vector<std::string> args(argv, argv + argc);
  // --openblas=<path>: ours, not Google Benchmark's.
  std::string openblas;
  for (auto it = args.begin(); it != args.end();)
    if (it->rfind("--openblas=", 0) == 0) {
      openblas = it->substr(11);
      it = args.erase(it);
    } else {
      ++it;
    }
  const std::pair<const char*, const char*> defaults[] = {
      {"--benchmark_repetitions", "--benchmark_repetitions=5"},
      {"--benchmark_min_time", "--benchmark_min_time=0.2"},
      {"--benchmark_display_aggregates_only", "--benchmark_display_aggregates_only=true"},
  };
  std::vector<std::string> extra;
  for (const auto& d : defaults)
    if (!has_flag(args, d.first)) extra.emplace_back(d.second);
  args.insert(args.begin() + 1, extra.begin(), extra.end());
  std::vector<char*> new_argv;
  for (auto& a : args)
    new_argv.push_back(a.data());
  int new_argc = static_cast<int>(new_argv.size());
  new_argv.push_back(nullptr);

  benchmark::Initialize(&new_argc, new_argv.data());
  if (benchmark::ReportUnrecognizedArguments(new_argc, new_argv.data())) return 1;

  Eigen::setNbThreads(1);  // nothing here runs Eigen on more threads than a benchmark asks for
  for (const Shape& s : kShapes) {
    register_shape<float>(s);
    register_shape<double>(s);
  }
  if (has_flag(args, "--benchmark_list_tests") && !has_flag(args, "--benchmark_list_tests=false")) {
    benchmark::RunSpecifiedBenchmarks();  // lists, runs nothing: skip the GEMM measurement
    benchmark::Shutdown();
    return 0;
  }
  const double eigen_sgemm = measure_gemm_gflops<float>(1), eigen_dgemm = measure_gemm_gflops<double>(1);
  const double sgemm2 = measure_gemm_gflops<float>(2);
  const double dgemm2 = measure_gemm_gflops<double>(2);
  double openblas_sgemm = 0.0, openblas_dgemm = 0.0;
  if (!openblas.empty()) {
    openblas_sgemm = measure_openblas_gflops<float>(openblas);
    openblas_dgemm = measure_openblas_gflops<double>(openblas);
  }
  g_gemm_gflops["float"] = std::max(eigen_sgemm, openblas_sgemm);
  g_gemm_gflops["double"] = std::max(eigen_dgemm, openblas_dgemm);
  g_peak_gflops["float"] = bench_limits::peak_gflops<float>();
  g_peak_gflops["double"] = bench_limits::peak_gflops<double>();
  std::fprintf(
      stderr,
      "1024^3 GEMM, one thread, best of 7: Eigen SGEMM %.1f GFLOP/s, DGEMM %.1f; OpenBLAS SGEMM %.1f, "
      "DGEMM %.1f (0: not measured, see --openblas); two threads, Eigen: SGEMM %.1f, DGEMM %.1f. Peak "
      "FMA rate, one thread: float %.1f GFLOP/s, double %.1f\n",
      eigen_sgemm, eigen_dgemm, openblas_sgemm, openblas_dgemm, sgemm2, dgemm2, g_peak_gflops["float"],
      g_peak_gflops["double"]);
  if (sgemm2 < 1.5 * eigen_sgemm)
    std::fprintf(stderr,
                 "WARNING: two-thread SGEMM is only %.2fx the one-thread rate: another process is using the "
                 "cores, so the threads:2 figures of this run will be unreliable\n",
                 sgemm2 / eigen_sgemm);
  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("sgemm_gflops_1thread", std::to_string(eigen_sgemm));
  benchmark::AddCustomContext("dgemm_gflops_1thread", std::to_string(eigen_dgemm));
  benchmark::AddCustomContext("sgemm_gflops_2threads", std::to_string(sgemm2));
  benchmark::AddCustomContext("dgemm_gflops_2threads", std::to_string(dgemm2));
  benchmark::AddCustomContext("openblas_sgemm_gflops_1thread", std::to_string(openblas_sgemm));
  benchmark::AddCustomContext("openblas_dgemm_gflops_1thread", std::to_string(openblas_dgemm));
  benchmark::AddCustomContext("best_sgemm_gflops_1thread", std::to_string(g_gemm_gflops["float"]));
  benchmark::AddCustomContext("best_dgemm_gflops_1thread", std::to_string(g_gemm_gflops["double"]));
  benchmark::AddCustomContext("peak_fma_float_gflops_1thread", std::to_string(g_peak_gflops["float"]));
  benchmark::AddCustomContext("peak_fma_double_gflops_1thread", std::to_string(g_peak_gflops["double"]));
  benchmark::AddCustomContext("emb_size", std::to_string(kEmb));
  benchmark::AddCustomContext("head_size", std::to_string(kHead));
  benchmark::AddCustomContext("reference_max_T", std::to_string(kReferenceMaxT));
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

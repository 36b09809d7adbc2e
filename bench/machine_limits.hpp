// machine_limits: what one core (or a team) of this machine can do at most, measured in the same process as
// the benchmark that quotes it, because the machine is shared and its figures drift from run to run: the peak
// rate of fused multiply-adds and the read bandwidth over a buffer of a given size. Used by bench_attention,
// bench_decode, bench_step and ggml_attention.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <utility>

#include <Eigen/Core>

#include <head_attention/head_attention.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace bench_limits {

using Clock = std::chrono::steady_clock;

/// Tells the compiler that any memory may have changed, so that a sum over a buffer is not hoisted out of the
/// loop that repeats it (Google Benchmark's ClobberMemory, without depending on it).
inline void clobber_memory() {
#if defined(__GNUC__)
  asm volatile("" : : : "memory");
#endif
}

/// `steps` rounds of acc = acc · x + y on Chains independent accumulators, summed at the end. Not inlined: in
/// main() GCC kept the accumulators in memory, which measured the stores instead of the FMAs.
template <typename Packet, int Chains>
EIGEN_DONT_INLINE Packet fma_chains(long steps, const Packet& x, const Packet& y) {
  Packet acc[Chains];
  for (int c = 0; c < Chains; ++c)
    acc[c] = Eigen::internal::padd(x, Eigen::internal::pset1<Packet>(static_cast<float>(c)));
  for (long i = 0; i < steps; ++i)
    for (int c = 0; c < Chains; ++c)
      acc[c] = Eigen::internal::pmadd(acc[c], x, y);
  Packet sum = acc[0];
  for (int c = 1; c < Chains; ++c)
    sum = Eigen::internal::padd(sum, acc[c]);
  return sum;
}

/// One core's peak rate of fused multiply-adds on Scalar, GFLOP/s: 12 independent accumulator chains (enough
/// to cover the FMA latency on every x86 core we know) of the widest packet this build compiles for, best
/// of 7.
template <typename Scalar>
double peak_gflops() {
  using Packet = head_attention::detail::SimdPacket<Scalar>;
  constexpr int W = head_attention::detail::simd_width<Scalar>;
  constexpr int chains = 12;
  constexpr long steps = 1 << 22;
  // From volatile storage, so that the compiler cannot know them; without fast-math it keeps every FMA of the
  // chains, whose results are used below.
  volatile Scalar factor = Scalar(0.999999), term = Scalar(1e-7);
  const Packet x = Eigen::internal::pset1<Packet>(Scalar(factor)),
               y = Eigen::internal::pset1<Packet>(Scalar(term));
  double best = 1e30;
  volatile Scalar sink(0);
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = Clock::now();
    const Packet sum = fma_chains<Packet, chains>(steps, x, y);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
    sink = sink + Eigen::internal::predux(sum);
  }
  return 2.0 * W * chains * static_cast<double>(steps) / best * 1e-9;
}

/// Read bandwidth in GB/s over a buffer of `bytes` on `threads` threads (each sums its share with vector
/// loads, about 512 MiB in all per timing), best of 7: a vectorised streaming sum, the fastest way to read
/// memory. Memoised by (size in 4 KiB pages, threads): several cases ask for the same size.
inline double read_bandwidth_gbps(double bytes, int threads = 1) {
  static std::map<std::pair<std::int64_t, int>, double> known;
  const std::pair<std::int64_t, int> key{static_cast<std::int64_t>(bytes) / 4096, threads};
  if (auto it = known.find(key); it != known.end()) return it->second;
  using Index = Eigen::Index;
  const Index n = std::max<Index>(static_cast<Index>(bytes / sizeof(float)), 4096);
  const Eigen::VectorXf buffer = Eigen::VectorXf::Random(n);
  const Index repeats = std::max<Index>(1, (Index(1) << 27) / n);
  double best = 1e30;
  volatile float sink = 0;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = Clock::now();
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
#if defined(_OPENMP)
      const Index t = omp_get_thread_num(), team = omp_get_num_threads();
#else
      const Index t = 0, team = 1;
#endif
      const Index begin = n * t / team, end = n * (t + 1) / team;
      float local = 0;
      for (Index r = 0; r < repeats; ++r) {
        local += buffer.segment(begin, end - begin).sum();
        clobber_memory();
      }
      if (t == 0) sink = sink + local;
    }
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  const double result = static_cast<double>(repeats) * static_cast<double>(n) * sizeof(float) / best * 1e-9;
  known[key] = result;
  return result;
}

}  // namespace bench_limits

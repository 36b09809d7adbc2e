// head-attention: OpenMP as an optional dependency.
#pragma once

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#define HEAD_ATTENTION_PRAGMA(x) _Pragma(#x)
#define HEAD_ATTENTION_OMP(directive) HEAD_ATTENTION_PRAGMA(omp directive)
#else
#define HEAD_ATTENTION_OMP(directive)
#endif

namespace head_attention::detail {

/// Whether this translation unit was compiled with OpenMP: without it every call runs on one thread.
inline constexpr bool has_openmp =
#if defined(_OPENMP)
    true;
#else
    false;
#endif

/// The thread count a call uses when the caller set none: Eigen's, which follows Eigen::setNbThreads and
/// otherwise OMP_NUM_THREADS (OpenMP's default: one per core); 1 when compiled without OpenMP.
inline int default_thread_count() {
  return Eigen::nbThreads();
}

/// True inside an active OpenMP parallel region, where a forward call must not fork again.
inline bool in_parallel_region() {
#if defined(_OPENMP)
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

/// This thread's number in the current team (0 outside a parallel region, or without OpenMP).
inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// The size of the current team (1 outside a parallel region, or without OpenMP).
inline int team_size() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

/// Runs body(team) on `threads` threads, body(true) on each, or body(false) on the caller's thread alone
/// when threads <= 1. A serial call forks no team at all, not even OpenMP's team of one: libgomp's barriers
/// wake their waiters with a futex syscall even in a team of one, four per decode step (about 1 us of a 7 us
/// one-head step). The worksharing loops below take the same flag.
template <typename Body>
void run_team(int threads, Body&& body) {
  if (threads > 1) {
    HEAD_ATTENTION_OMP(parallel num_threads(threads))
    body(true);
  } else {
    body(false);
  }
}

/// How team_for shares its indices: one at a time to whichever thread asks (`dynamic`) or in fixed
/// contiguous shares (`fixed`, OpenMP's static schedule); the `_nowait` forms skip the barrier at the end
/// (for a loop that the team's join, or a later barrier, already orders).
enum class Share { dynamic, dynamic_nowait, fixed, fixed_nowait };

/// f(i) for i in [0, n): shared among the current team if `team` (an orphaned worksharing loop, which binds
/// to run_team's region), else run in order on this thread.
template <Share S, typename F>
void team_for(Eigen::Index n, bool team, F&& f) {
  using Index = Eigen::Index;
  if (!team) {
    for (Index i = 0; i < n; ++i)
      f(i);
  } else if constexpr (S == Share::dynamic) {
    HEAD_ATTENTION_OMP(for schedule(dynamic, 1))
    for (Index i = 0; i < n; ++i)
      f(i);
  } else if constexpr (S == Share::dynamic_nowait) {
    HEAD_ATTENTION_OMP(for schedule(dynamic, 1) nowait)
    for (Index i = 0; i < n; ++i)
      f(i);
  } else if constexpr (S == Share::fixed) {
    HEAD_ATTENTION_OMP(for schedule(static))
    for (Index i = 0; i < n; ++i)
      f(i);
  } else {
    HEAD_ATTENTION_OMP(for schedule(static) nowait)
    for (Index i = 0; i < n; ++i)
      f(i);
  }
}

}  // namespace head_attention::detail

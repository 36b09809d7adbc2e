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

}  // namespace head_attention::detail

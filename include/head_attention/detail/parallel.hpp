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

/// The thread count a call uses when the caller set none: Eigen's, which follows Eigen::setNbThreads and
/// otherwise OMP_NUM_THREADS; 1 when compiled without OpenMP.
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

}  // namespace head_attention::detail

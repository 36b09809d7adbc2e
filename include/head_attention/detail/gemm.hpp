// head-attention: a serial, allocation-free GEMM over raw strided storage.
#pragma once

#include <Eigen/Core>

namespace head_attention::detail {

/// res[m, n] += alpha · lhs[m, k] · rhs[k, n], result row-major, operands in either storage order.
///
/// This calls Eigen's own GEMM kernel one layer below its expression templates, for two reasons: that layer
/// forks OpenMP threads for any product it deems large enough when it is called outside a parallel region
/// (the thread count of a forward call must be ours alone), and it allocates packing buffers on every product
/// (the attention loop runs thousands of small products per call). The buffers here are allocated once, up
/// front.
template <typename Scalar>
class Gemm {
 public:
  using Index = Eigen::Index;

  /// Prepares packing buffers for products up to [max_m, max_k] · [max_k, max_n]; larger ones still work,
  /// in more cache blocks.
  Gemm(Index max_m, Index max_n, Index max_k) : m_blocking(max_m, max_n, max_k, 1, true) {
    m_blocking.allocateAll();
  }

  template <int LhsOrder, int RhsOrder>
  void accumulate(Index m, Index n, Index k, const Scalar* lhs, Index lhs_stride, const Scalar* rhs,
                  Index rhs_stride, Scalar* res, Index res_stride, Scalar alpha = Scalar(1)) {
    if (m == 0 || n == 0 || k == 0) return;
    Eigen::internal::general_matrix_matrix_product<Index, Scalar, LhsOrder, false, Scalar, RhsOrder, false,
                                                   Eigen::RowMajor, 1>::run(m, n, k, lhs, lhs_stride, rhs,
                                                                            rhs_stride, res, 1, res_stride,
                                                                            alpha, m_blocking, nullptr);
  }

 private:
  Eigen::internal::gemm_blocking_space<Eigen::RowMajor, Scalar, Scalar, Eigen::Dynamic, Eigen::Dynamic,
                                       Eigen::Dynamic>
      m_blocking;
};

}  // namespace head_attention::detail

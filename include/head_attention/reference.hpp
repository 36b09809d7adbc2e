// head-attention: the plain, materialising implementation of the seed module, kept as the yardstick.
#pragma once

#include <cmath>
#include <limits>

#include <Eigen/Core>

#include "errors.hpp"
#include "linear.hpp"

namespace head_attention::reference {

/// The seed module step by step: Q, K, V projections, the full [T, T] scores Q Kᵀ / sqrt(head_size), the
/// causal mask as -inf, a max-subtracted softmax and the weighted sum of the visible rows of V (a masked key
/// never reaches an output, even when it holds NaN or Inf). O(T²) memory by design: tests
/// check the fast path against it, and the benchmarks measure the fast path's speedup over it. x: [T, emb];
/// q, k, v: nn.Linear(emb, head). Returns [T, head]. Throws shape_error on mismatched shapes.
template <typename Scalar, typename Derived>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> forward(
    const Eigen::MatrixBase<Derived>& x, const Linear<Scalar>& q, const Linear<Scalar>& k,
    const Linear<Scalar>& v) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  const Eigen::Index emb = q.in_features();
  const Eigen::Index head = q.out_features();
  const char* where = "head_attention::reference::forward";
  detail::check_linear(q, where, "query", emb, head);
  detail::check_linear(k, where, "key", emb, head);
  detail::check_linear(v, where, "value", emb, head);
  detail::require(x.cols() == emb, where, "x.cols() (input width)", std::to_string(emb),
                  std::to_string(x.cols()));

  const Eigen::Index T = x.rows();
  if (T == 0) return Matrix(0, head);
  const Matrix Q = (x * q.weight.transpose()).rowwise() + q.bias.transpose();  // [T, head]
  const Matrix K = (x * k.weight.transpose()).rowwise() + k.bias.transpose();  // [T, head]
  const Matrix V = (x * v.weight.transpose()).rowwise() + v.bias.transpose();  // [T, head]

  Matrix scores = (Q * K.transpose()) / std::sqrt(static_cast<Scalar>(head));  // [T, T]
  for (Eigen::Index i = 0; i < T; ++i)
    for (Eigen::Index j = i + 1; j < T; ++j)
      scores(i, j) = -std::numeric_limits<Scalar>::infinity();

  const Vector row_max = scores.rowwise().maxCoeff();                    // [T]
  Matrix weights = (scores.colwise() - row_max).array().exp().matrix();  // [T, T]
  const Vector row_sum = weights.rowwise().sum();                        // [T]
  weights = weights.array().colwise() / row_sum.array();                 // [T, T], rows sum to 1

  // Row i sums over its visible keys 0..i only: a masked key's weight is 0, but 0 · NaN or 0 · Inf in a full
  // weights · V would let a masked key's non-finite value reach the output.
  Matrix out(T, head);  // [T, head]
  for (Eigen::Index i = 0; i < T; ++i)
    out.row(i).noalias() = weights.row(i).head(i + 1) * V.topRows(i + 1);
  return out;
}

}  // namespace head_attention::reference

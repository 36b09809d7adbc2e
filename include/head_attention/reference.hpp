/// \file
/// head-attention: the plain, materialising implementation of the seed module, kept as the yardstick.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include <Eigen/Core>

#include "errors.hpp"
#include "gradients.hpp"
#include "linear.hpp"
#include "mask.hpp"

namespace head_attention::reference {

namespace detail {

using head_attention::detail::check_linear;
using head_attention::detail::require;

/// The checks both entry points share: x [T, emb] and projections nn.Linear(emb, head); 0 <= valid <= T
/// (valid < 0 means T).
template <typename Scalar, typename Derived>
Eigen::Index checked_valid(const Eigen::MatrixBase<Derived>& x, const Linear<Scalar>& q,
                           const Linear<Scalar>& k, const Linear<Scalar>* v, Eigen::Index valid,
                           const char* where) {
  const Eigen::Index emb = q.in_features();
  const Eigen::Index head = q.out_features();
  check_linear(q, where, "query", emb, head);
  check_linear(k, where, "key", emb, head);
  if (v != nullptr) check_linear(*v, where, "value", emb, head);
  require(x.cols() == emb, where, "x.cols() (input width)", std::to_string(emb), std::to_string(x.cols()));
  if (valid < 0) return x.rows();
  require(valid <= x.rows(), where, "valid_keys", "in [0, T = " + std::to_string(x.rows()) + "]",
          std::to_string(valid));
  return valid;
}

/// The softmax weights [T, T] of the seed module step by step: Q and K projections, the full scores
/// Q Kᵀ / sqrt(head_size), masked entries set to -inf, a max-subtracted softmax. A row that sees no key is 0.
template <typename Scalar, typename Derived>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> weights(
    const Eigen::MatrixBase<Derived>& x, const Linear<Scalar>& q, const Linear<Scalar>& k,
    const MaskRule& rule, Eigen::Index valid) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Index T = x.rows();
  const Eigen::Index head = q.out_features();
  const Matrix Q = (x * q.weight.transpose()).rowwise() + q.bias.transpose();  // [T, head]
  const Matrix K = (x * k.weight.transpose()).rowwise() + k.bias.transpose();  // [T, head]
  Matrix w = (Q * K.transpose()) / std::sqrt(static_cast<Scalar>(head));       // [T, T] scores
  for (Eigen::Index i = 0; i < T; ++i) {
    for (Eigen::Index j = 0; j < T; ++j)
      if (!rule.visible(i, j, T) || j >= valid) w(i, j) = -std::numeric_limits<Scalar>::infinity();
    const Scalar row_max = w.row(i).maxCoeff();
    if (row_max == -std::numeric_limits<Scalar>::infinity()) {  // no visible key
      w.row(i).setZero();
      continue;
    }
    // Masked entries are set to exactly 0: Eigen's vectorised exp clamps its argument, so exp(-inf) would
    // give a denormal there instead.
    w.row(i) = (w.row(i).array() == -std::numeric_limits<Scalar>::infinity())
                   .select(Scalar(0), (w.row(i).array() - row_max).exp())
                   .matrix();
    w.row(i) /= w.row(i).sum();
  }
  return w;
}

}  // namespace detail

/// The seed module step by step: Q, K, V projections, the full [T, T] scores Q Kᵀ / sqrt(head_size), masked
/// entries as -inf, a max-subtracted softmax and the weighted sum of the visible rows of V (a masked key
/// never reaches an output, even when it holds NaN or Inf; a query that sees no key gives a zero row). O(T²)
/// memory by design: tests check the fast path against it, and the benchmarks measure the fast path's speedup
/// over it. x: [T, emb]; q, k, v: nn.Linear(emb, head); rule: which keys each query sees (causal, the seed's,
/// by default); valid_keys: keys at or after it are masked (right padding), -1 for none. Returns [T, head].
/// Throws shape_error on mismatched shapes.
template <typename Scalar, typename Derived>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> forward(
    const Eigen::MatrixBase<Derived>& x, const Linear<Scalar>& q, const Linear<Scalar>& k,
    const Linear<Scalar>& v, const MaskRule& rule = MaskRule::causal(), Eigen::Index valid_keys = -1) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Index valid =
      detail::checked_valid(x, q, k, &v, valid_keys, "head_attention::reference::forward");
  const Eigen::Index T = x.rows();
  const Eigen::Index head = q.out_features();
  if (T == 0) return Matrix(0, head);
  const Matrix weights = detail::weights(x, q, k, rule, valid);                // [T, T], rows sum to 1 or 0
  const Matrix V = (x * v.weight.transpose()).rowwise() + v.bias.transpose();  // [T, head]

  // Row i sums over its visible keys only: a masked key's weight is 0, but 0 · NaN or 0 · Inf in a full
  // weights · V would let a masked key's non-finite value reach the output.
  Matrix out = Matrix::Zero(T, head);  // [T, head]
  for (Eigen::Index i = 0; i < T; ++i) {
    const Eigen::Index first = rule.first_key(i);
    const Eigen::Index end = std::min(rule.end_key(i, T), valid);
    if (end > first)
      out.row(i).noalias() = weights.row(i).segment(first, end - first) * V.middleRows(first, end - first);
  }
  return out;
}

/// simple_llm's get_attention_weights, the plain way: the softmax weights [T, T] under `rule` and right
/// padding (masked entries exactly 0, a row that sees no key all 0). Throws shape_error on mismatched shapes.
template <typename Scalar, typename Derived>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> attention_weights(
    const Eigen::MatrixBase<Derived>& x, const Linear<Scalar>& q, const Linear<Scalar>& k,
    const MaskRule& rule = MaskRule::causal(), Eigen::Index valid_keys = -1) {
  const Eigen::Index valid = detail::checked_valid<Scalar>(x, q, k, nullptr, valid_keys,
                                                           "head_attention::reference::attention_weights");
  return detail::weights(x, q, k, rule, valid);
}

/// The backward of forward() the plain way, materialising [T, T]: the yardstick of HeadAttention::backward.
/// With W the softmax weights and dO = grad_out [T, head]: dV = Wᵀ dO; dW = dO Vᵀ; dS = W ∘ (dW - rowsum(dW ∘
/// W)); dQ = dS K / sqrt(head); dK = dSᵀ Q / sqrt(head); then each projection's dWeight = dYᵀ x, dbias = the
/// column sums of dY, and dx = dQ Wq + dK Wk + dV Wv. Arguments as forward(). Throws shape_error on
/// mismatched shapes, and unless grad_out is [T, head].
template <typename Scalar, typename Derived, typename GradDerived>
Gradients<Scalar> backward(const Eigen::MatrixBase<Derived>& x, const Linear<Scalar>& q,
                           const Linear<Scalar>& k, const Linear<Scalar>& v,
                           const Eigen::MatrixBase<GradDerived>& grad_out,
                           const MaskRule& rule = MaskRule::causal(), Eigen::Index valid_keys = -1) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const char* where = "head_attention::reference::backward";
  const Eigen::Index valid = detail::checked_valid(x, q, k, &v, valid_keys, where);
  const Eigen::Index T = x.rows();
  const Eigen::Index head = q.out_features();
  detail::require(grad_out.rows() == T && grad_out.cols() == head, where, "grad_out shape",
                  head_attention::detail::shape_string(T, head),
                  head_attention::detail::shape_string(grad_out.rows(), grad_out.cols()));
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(head));
  const Matrix Q = (x * q.weight.transpose()).rowwise() + q.bias.transpose();                   // [T, head]
  const Matrix K = (x * k.weight.transpose()).rowwise() + k.bias.transpose();                   // [T, head]
  const Matrix V = (x * v.weight.transpose()).rowwise() + v.bias.transpose();                   // [T, head]
  const Matrix W = T > 0 ? detail::weights(x, q, k, rule, valid) : Matrix(0, 0);                // [T, T]
  const Matrix dO = grad_out;                                                                   // [T, head]
  const Matrix dV = W.transpose() * dO;                                                         // [T, head]
  const Matrix dW = dO * V.transpose();                                                         // [T, T]
  const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> D = (dW.array() * W.array()).rowwise().sum();  // [T]
  const Matrix dS = (W.array() * (dW.array().colwise() - D.array())).matrix();                  // [T, T]
  const Matrix dQ = scale * (dS * K);                                                           // [T, head]
  const Matrix dK = scale * (dS.transpose() * Q);                                               // [T, head]
  Gradients<Scalar> g;
  const auto fill = [&](Linear<Scalar>& to, const Matrix& dY) {
    to.weight = dY.transpose() * x;  // [head, emb]
    if (dY.rows() > 0)
      to.bias = dY.colwise().sum().transpose();
    else
      to.bias.setZero(dY.cols());  // (colwise() over 0 rows offsets a null pointer)
  };
  fill(g.query, dQ);
  fill(g.key, dK);
  fill(g.value, dV);
  g.input = dQ * q.weight + dK * k.weight + dV * v.weight;  // [T, emb]
  return g;
}

}  // namespace head_attention::reference

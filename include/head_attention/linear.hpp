/// \file
/// head-attention: the affine projection y = x Wᵀ + b in PyTorch's nn.Linear layout.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "detail/rng.hpp"
#include "errors.hpp"
#include "precision.hpp"

namespace head_attention {

/// The parameters of a PyTorch nn.Linear(in_features, out_features): y = x weightᵀ + bias.
/// weight is stored [out, in] exactly as PyTorch stores it, so a state_dict tensor copies in without
/// transposing.
template <typename Scalar>
struct Linear {
  /// Eigen's signed index type.
  using Index = Eigen::Index;
  /// Row-major, so that PyTorch's [out, in] weight copies in as it is.
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  /// Column vector of Scalar.
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  Matrix weight;  ///< [out, in], PyTorch's `weight`
  Vector bias;    ///< [out], PyTorch's `bias`

  /// in: the width of the inputs, weight's columns.
  Index in_features() const { return weight.cols(); }
  /// out: the width of the outputs, weight's rows.
  Index out_features() const { return weight.rows(); }

  /// y = x weightᵀ + bias, what PyTorch's `layer(x)` computes: x [rows, in] (any dense Eigen expression of
  /// Scalar, one sample per row) to y [rows, out]. A 16-bit layer computes in float and rounds y once, as
  /// the attention layers do. Throws shape_error unless x.cols() == in_features() and bias has
  /// out_features() entries.
  template <typename Derived>
  Matrix forward(const Eigen::MatrixBase<Derived>& x) const {
    static_assert(std::is_same<typename Derived::Scalar, Scalar>::value,
                  "Linear<Scalar>::forward needs an input of the same Scalar");
    HEAD_ATTENTION_REQUIRE(x.cols() == in_features(), "Linear::forward", "x.cols() (input width)",
                           "in_features = " + std::to_string(in_features()), std::to_string(x.cols()));
    HEAD_ATTENTION_REQUIRE(bias.size() == out_features(), "Linear::forward", "bias size",
                           "out_features = " + std::to_string(out_features()), std::to_string(bias.size()));
    using Wide = detail::compute_t<Scalar>;
    using WideMatrix = Eigen::Matrix<Wide, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    // No rows: nothing to broadcast the bias over (Eigen's vectorwise ops offset a null pointer, UBSan says).
    if (x.rows() == 0) return Matrix(0, out_features());
    WideMatrix y(x.rows(), out_features());  // [rows, out]
    if constexpr (std::is_same<Wide, Scalar>::value) {
      y.noalias() = x * weight.transpose();
      y.rowwise() += bias.transpose();
      return y;
    } else {
      y.noalias() = x.template cast<Wide>() * weight.template cast<Wide>().transpose();
      y.rowwise() += bias.template cast<Wide>().transpose();
      return y.template cast<Scalar>();
    }
  }

  /// forward(x), spelt as PyTorch calls a layer.
  template <typename Derived>
  Matrix operator()(const Eigen::MatrixBase<Derived>& x) const {
    return forward(x);
  }
};

namespace detail {

/// PyTorch's default nn.Linear init: kaiming_uniform_(a = sqrt(5)) for the weight and U(-1/sqrt(in),
/// 1/sqrt(in)) for the bias, which both reduce to U(-1/sqrt(in), 1/sqrt(in)). Weight first, row by row, then
/// the bias.
template <typename Scalar>
Linear<Scalar> make_linear(Eigen::Index in, Eigen::Index out, UniformSource& uniform) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  Linear<Scalar> layer;
  layer.weight.resize(out, in);
  layer.bias.resize(out);
  for (Eigen::Index i = 0; i < out; ++i)
    for (Eigen::Index j = 0; j < in; ++j)
      layer.weight(i, j) = static_cast<Scalar>(uniform(-bound, bound));
  for (Eigen::Index i = 0; i < out; ++i)
    layer.bias(i) = static_cast<Scalar>(uniform(-bound, bound));
  return layer;
}

/// to = from converted to the type it computes in; `to` has from's shapes already. Uses convert_rows rather
/// than Eigen's cast, which widens 16-bit values one at a time (measured: 2x the time of a whole call at
/// B = 2, T = 10 for bfloat16).
template <typename Scalar>
void widen_into(const Linear<Scalar>& from, Linear<compute_t<Scalar>>& to) noexcept {
  convert_rows(precision_of<Scalar>(), from.weight.data(), from.weight.cols(), from.weight.rows(),
               from.weight.cols(), to.weight.data(), to.weight.cols());
  convert_rows(precision_of<Scalar>(), from.bias.data(), 1, from.bias.size(), 1, to.bias.data(), 1);
}

/// The layer converted to the type it computes in (itself for float and double).
template <typename Scalar>
Linear<compute_t<Scalar>> widen(const Linear<Scalar>& layer) {
  Linear<compute_t<Scalar>> wide;
  wide.weight.resize(layer.weight.rows(), layer.weight.cols());
  wide.bias.resize(layer.bias.size());
  widen_into(layer, wide);
  return wide;
}

/// Throws unless layer has the [out, in] weight and [out] bias that the owning layer expects.
template <typename Scalar>
void check_linear(const Linear<Scalar>& layer, const char* where, const char* name, Eigen::Index in,
                  Eigen::Index out) {
  HEAD_ATTENTION_REQUIRE(layer.weight.rows() == out && layer.weight.cols() == in, where,
                         std::string(name) + ".weight shape", shape_string(out, in),
                         shape_string(layer.weight.rows(), layer.weight.cols()));
  HEAD_ATTENTION_REQUIRE(layer.bias.size() == out, where, std::string(name) + ".bias size",
                         std::to_string(out), std::to_string(layer.bias.size()));
}

}  // namespace detail
}  // namespace head_attention

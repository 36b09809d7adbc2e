// head-attention: the deterministic generator behind the PyTorch-style initialisation.
#pragma once

#include <cstdint>
#include <random>

#include <Eigen/Core>

namespace head_attention::detail {

/// Uniform doubles in [low, high) from std::mt19937_64, whose output sequence the C++ standard fixes. The
/// conversion to double is our own (53 high bits), not std::uniform_real_distribution, whose algorithm
/// differs between standard libraries: a seed gives the same weights with libstdc++ and libc++, in float and
/// double.
class UniformSource {
 public:
  explicit UniformSource(std::uint64_t seed) : m_engine(seed) {}

  double operator()(double low, double high) {
    const double unit = static_cast<double>(m_engine() >> 11) * 0x1.0p-53;  // [0, 1)
    return low + (high - low) * unit;
  }

 private:
  std::mt19937_64 m_engine;
};

/// Inverted dropout in place: each entry of m, in row-major order, is zeroed with probability p and otherwise
/// scaled by 1 / (1 - p), by one draw each from UniformSource(seed). The same seed gives the same mask, so
/// the backward pass re-draws the forward's mask instead of storing it. p = 0 leaves m as it is.
template <typename Derived>
void dropout_in_place(Eigen::MatrixBase<Derived>& m, double p, std::uint64_t seed) {
  using Scalar = typename Derived::Scalar;
  if (p == 0) return;
  UniformSource uniform(seed);
  const Scalar keep_scale = static_cast<Scalar>(1.0 / (1.0 - p));
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j)
      m(i, j) = uniform(0.0, 1.0) < p ? Scalar(0) : m(i, j) * keep_scale;
}

}  // namespace head_attention::detail

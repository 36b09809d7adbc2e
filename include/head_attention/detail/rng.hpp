// head-attention: the deterministic generator behind the PyTorch-style initialisation.
#pragma once

#include <cstdint>
#include <random>

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

}  // namespace head_attention::detail

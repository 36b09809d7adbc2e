// Shared by the libFuzzer targets: reading sizes and values from the fuzz input, and failing loudly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace ha_fuzz {

/// Consumes the fuzz input from the front: small integers, raw scalars (any bit pattern, NaN and Inf
/// included). An exhausted input reads as zeros, so that every input is a complete, deterministic program.
class Input {
 public:
  Input(const std::uint8_t* data, std::size_t size) : m_data(data), m_size(size) {}

  std::uint8_t byte() { return m_at < m_size ? m_data[m_at++] : 0; }
  /// An integer in [lo, hi].
  long range(long lo, long hi) {
    const unsigned value = static_cast<unsigned>(byte()) | static_cast<unsigned>(byte()) << 8;
    return lo + static_cast<long>(value % static_cast<unsigned>(hi - lo + 1));
  }
  bool flag() { return (byte() & 1) != 0; }
  /// A value from the input's bytes: mostly small numbers, sometimes any bit pattern (NaN, Inf, huge).
  template <typename Scalar>
  Scalar value() {
    const std::uint8_t kind = byte();
    if (kind < 240) return static_cast<Scalar>((static_cast<int>(kind) - 120) / 40.0);
    Scalar s{};
    std::uint8_t raw[sizeof(Scalar)] = {};
    for (std::uint8_t& b : raw)
      b = byte();
    std::memcpy(&s, raw, sizeof(Scalar));
    return s;
  }
  bool empty() const { return m_at >= m_size; }

 private:
  const std::uint8_t* m_data;
  std::size_t m_size;
  std::size_t m_at = 0;
};

/// A property that must hold failed: abort, so that libFuzzer records the input.
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "ha_fuzz: %s\n", what);
  std::abort();
}

}  // namespace ha_fuzz

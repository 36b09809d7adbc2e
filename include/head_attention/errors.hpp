/// \file
/// head-attention: exceptions thrown at the API boundary.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>

#include <Eigen/Core>

namespace head_attention {

/// Thrown for every bad argument: a wrong size, shape or sequence length. The message names the quantity, the
/// expected value and the one that came. Derived from std::invalid_argument so callers can catch either.
class shape_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

inline std::string shape_string(Eigen::Index rows, Eigen::Index cols) {
  // Appended piece by piece: GCC 12 at -O2 and above in C++20 mode reports a false -Wrestrict for
  // "literal" + std::string (GCC bug 105329), and a user's -Werror build must not fail on it.
  std::string text = "[";
  text += std::to_string(rows);
  text += ", ";
  text += std::to_string(cols);
  text += "]";
  return text;
}

/// Throws shape_error("<where>: <what> must be <expected>, got <actual>") unless ok.
inline void require(bool ok, const char* where, const std::string& what, const std::string& expected,
                    const std::string& actual) {
  if (!ok) throw shape_error(std::string(where) + ": " + what + " must be " + expected + ", got " + actual);
}

/// Whether the product of the sizes times `bytes` fits in an Index (sizes <= 0 are skipped). Builds nothing:
/// forward calls check their sizes with it on every call.
inline bool fits_index(std::initializer_list<Eigen::Index> sizes, std::size_t bytes) noexcept {
  const Eigen::Index max = std::numeric_limits<Eigen::Index>::max();
  if (bytes > static_cast<std::size_t>(max)) return false;
  Eigen::Index product = static_cast<Eigen::Index>(bytes);
  for (const Eigen::Index size : sizes) {
    if (size <= 0) continue;
    if (product > max / size) return false;
    product *= size;
  }
  return true;
}

/// Throws shape_error("<where>: <what> must be at most <Index max> bytes, got a * b * ... * bytes") unless
/// the product of the sizes times `bytes` fits in an Index, so that a huge size is refused before anything is
/// allocated or any index product overflows. Sizes <= 0 are skipped: their own checks name them. (A product
/// that fits but exceeds the memory gives std::bad_alloc, as any allocation does.) Allocates nothing unless
/// it throws: the message, and `what` as a string, are built only then.
inline void require_fits(std::initializer_list<Eigen::Index> sizes, std::size_t bytes, const char* where,
                         const char* what) {
  if (fits_index(sizes, bytes)) return;
  std::string factors;
  for (const Eigen::Index size : sizes)
    if (size > 0) factors += std::to_string(size) + " * ";
  require(false, where, what,
          "at most " + std::to_string(std::numeric_limits<Eigen::Index>::max()) + " bytes",
          factors + std::to_string(bytes));
}

}  // namespace detail
}  // namespace head_attention

/// Throws head_attention::shape_error("<where>: <what> must be <expected>, got <actual>") unless ok. A macro,
/// so that the message strings are built only on failure: the checks run on every call, decode steps
/// included.
#define HEAD_ATTENTION_REQUIRE(ok, where, what, expected, actual)                       \
  do {                                                                                  \
    if (!(ok)) ::head_attention::detail::require(false, where, what, expected, actual); \
  } while (false)

// head-attention: exceptions thrown at the API boundary.
#pragma once

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

}  // namespace detail
}  // namespace head_attention

/// Throws head_attention::shape_error("<where>: <what> must be <expected>, got <actual>") unless ok. A macro,
/// so that the message strings are built only on failure: the checks run on every call, decode steps
/// included.
#define HEAD_ATTENTION_REQUIRE(ok, where, what, expected, actual)                       \
  do {                                                                                  \
    if (!(ok)) ::head_attention::detail::require(false, where, what, expected, actual); \
  } while (false)

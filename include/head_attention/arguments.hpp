/// \file
/// head-attention: Seed and Probability, the argument types that keep simple_llm's positional order safe;
/// Padding and Batch, the description of how a call's rows are laid out in sequences.
///
/// simple_llm's `MultiHeadAttention(num_heads, emb_size, head_size, max_seq_len, dropout=0.1)` takes a
/// probability fifth; code ported from it passes `0.2` there. With plain `std::uint64_t` and `double`
/// parameters C++ converts silently between the two, so a dropout written where a seed stands (or an old seed
/// where dropout now stands) would compile and change meaning. These two types accept only their own kind of
/// value, and say so at compile time.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

namespace head_attention {

namespace detail {
template <typename T>
constexpr bool always_false = false;
}  // namespace detail

/// The seed of a random draw (a layer's initial weights, a dropout mask): any integer type converts to it
/// implicitly, so `HeadAttention<float>(64, 16, 50, 42)` reads as before. A floating-point value does not
/// compile: in simple_llm's argument order that is a dropout probability, not a seed.
class Seed {
 public:
  /// Any integer (bool excluded); negative values wrap to std::uint64_t as a plain conversion would.
  template <typename Int,
            std::enable_if_t<std::is_integral<Int>::value && !std::is_same<Int, bool>::value, int> = 0>
  constexpr Seed(Int value) noexcept  // NOLINT(google-explicit-constructor): a seed reads as a plain integer
      : m_value(static_cast<std::uint64_t>(value)) {}

  /// Refused at compile time with a message, rather than a silent truncation of 0.2 to seed 0.
  template <typename Float, std::enable_if_t<std::is_floating_point<Float>::value, int> = 0>
  Seed(Float) {  // NOLINT(google-explicit-constructor)
    static_assert(detail::always_false<Float>,
                  "head_attention::Seed: a seed is an integer; a floating-point value here is probably a "
                  "dropout probability (MultiHeadAttention takes dropout fifth and the seed sixth, as "
                  "simple_llm does)");
  }

  /// The seed's value.
  constexpr std::uint64_t value() const noexcept { return m_value; }

 private:
  std::uint64_t m_value;
};

/// A probability such as simple_llm's `dropout`: any floating-point type converts to it implicitly, so
/// `MultiHeadAttention<float>(4, 64, 16, 50, 0.2)` means dropout 0.2, as in simple_llm. An integer does not
/// compile: up to version 0.2 the fifth argument of MultiHeadAttention was the seed, and code written for
/// that must fail loudly instead of becoming a dropout. (The value's range is checked where it is used.)
class Probability {
 public:
  /// Any floating-point value.
  template <typename Float, std::enable_if_t<std::is_floating_point<Float>::value, int> = 0>
  constexpr Probability(Float p) noexcept  // NOLINT(google-explicit-constructor): reads as simple_llm's float
      : m_value(static_cast<double>(p)) {}

  /// Refused at compile time with a message: an integer here is probably a seed written for the old order.
  template <typename Int, std::enable_if_t<std::is_integral<Int>::value, int> = 0>
  Probability(Int) {  // NOLINT(google-explicit-constructor)
    static_assert(detail::always_false<Int>,
                  "head_attention::Probability: a probability is a floating-point value (write 0.0, not 0); "
                  "an integer here is probably a seed: MultiHeadAttention takes dropout fifth and the seed "
                  "sixth, as simple_llm does");
  }

  /// The probability's value.
  constexpr double value() const noexcept { return m_value; }

 private:
  double m_value;
};

/// Right padding of a batch, or none: the number of valid positions of each sequence (sequence b's keys at
/// positions >= lengths[b] are masked for every query; its padded rows still get outputs). Converts
/// implicitly from the `const std::vector<Index>&` every padded call takes, and refers to that vector (as
/// Eigen::Ref refers to a matrix): the vector must outlive the call. Default: no padding.
class Padding {
 public:
  /// No padding: every position of every sequence is valid.
  constexpr Padding() noexcept = default;
  /// lengths[b] valid positions in sequence b (checked by the call: one entry per sequence, each in [0, T]).
  Padding(const std::vector<Eigen::Index>& lengths) noexcept  // NOLINT(google-explicit-constructor)
      : m_lengths(&lengths) {}
  /// The lengths, or null for no padding.
  const std::vector<Eigen::Index>* lengths() const noexcept { return m_lengths; }

 private:
  const std::vector<Eigen::Index>* m_lengths = nullptr;
};

/// How the rows of a matrix call are laid out in sequences: `Batch()` (the default) is one sequence of all
/// rows; `Batch(B)` is B sequences of equal length T stored back to back (x [B · T, emb_size]); `Batch(B,
/// lengths)` adds right padding (see Padding). The sequence count is explicit, so that an integer never
/// becomes a batch by accident.
class Batch {
 public:
  /// One sequence: all rows.
  constexpr Batch() noexcept = default;
  /// `sequences` sequences of equal length back to back (checked by the call: sequences >= 0 and the row
  /// count a multiple of it, 0 rows when 0).
  constexpr explicit Batch(Eigen::Index sequences) noexcept : m_sequences(sequences) {}
  /// The same with right padding: lengths[b] valid positions in sequence b (the vector must outlive the
  /// call).
  constexpr Batch(Eigen::Index sequences, Padding lengths) noexcept
      : m_sequences(sequences), m_padding(lengths) {}
  /// The number of sequences.
  constexpr Eigen::Index sequences() const noexcept { return m_sequences; }
  /// The padding lengths, or null for none.
  const std::vector<Eigen::Index>* lengths() const noexcept { return m_padding.lengths(); }

 private:
  Eigen::Index m_sequences = 1;
  Padding m_padding;
};

}  // namespace head_attention

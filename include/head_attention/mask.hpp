/// \file
/// head-attention: MaskRule, which keys each query of an attention layer sees.
#pragma once

#include <algorithm>
#include <string>

#include <Eigen/Core>

#include "errors.hpp"

namespace head_attention {

/// Which keys each query sees, by absolute position: the query at position i and the key at position j.
/// Every rule gives each query a contiguous range of keys, [first_key(i), end_key(i, n)), which is what lets
/// the tiled kernel skip whole blocks of keys.
class MaskRule {
 public:
  /// Eigen's signed index type, for positions and windows.
  using Index = Eigen::Index;

  /// The three rules; kind() says which one a MaskRule is.
  enum class Kind {
    causal,         ///< j <= i: the seed module's torch.tril mask (the default)
    bidirectional,  ///< every key: the seed module without its masked_fill
    sliding_window  ///< i - window < j <= i: causal, over the last `window` positions only
  };

  /// The seed's rule: query i sees keys 0..i.
  static MaskRule causal() { return MaskRule(Kind::causal, 0); }
  /// No mask: every query sees every key.
  static MaskRule bidirectional() { return MaskRule(Kind::bidirectional, 0); }
  /// Query i sees keys max(0, i - window + 1)..i, its own included. Throws shape_error unless window >= 1.
  static MaskRule sliding_window(Index window) {
    HEAD_ATTENTION_REQUIRE(window >= 1, "MaskRule::sliding_window", "window", ">= 1", std::to_string(window));
    return MaskRule(Kind::sliding_window, window);
  }

  /// Which of the three rules this is.
  Kind kind() const { return m_kind; }
  /// The window of a sliding_window rule; 0 for the others.
  Index window() const { return m_window; }

  /// The first key the query at position i sees.
  Index first_key(Index i) const {
    return m_kind == Kind::sliding_window ? std::max<Index>(0, i - m_window + 1) : 0;
  }
  /// One past the last key the query at position i sees, when keys 0..n-1 exist.
  Index end_key(Index i, Index n) const { return m_kind == Kind::bidirectional ? n : std::min(i + 1, n); }
  /// Whether the query at position i sees the key at position j (of keys 0..n-1).
  bool visible(Index i, Index j, Index n) const { return j >= first_key(i) && j < end_key(i, n); }

  /// "causal", "bidirectional" or "sliding_window(W)", for messages.
  std::string name() const {
    switch (m_kind) {
      case Kind::causal:
        return "causal";
      case Kind::bidirectional:
        return "bidirectional";
      default:
        return "sliding_window(" + std::to_string(m_window) + ")";
    }
  }

  /// Same kind and same window: what a layer checks before accepting a cache made under a rule.
  ///@{
  friend bool operator==(const MaskRule& a, const MaskRule& b) {
    return a.m_kind == b.m_kind && a.m_window == b.m_window;
  }
  friend bool operator!=(const MaskRule& a, const MaskRule& b) { return !(a == b); }
  ///@}

 private:
  MaskRule(Kind kind, Index window) : m_kind(kind), m_window(window) {}

  Kind m_kind;
  Index m_window;
};

}  // namespace head_attention

// Mask rules (causal, bidirectional, sliding window) and right padding on the fast path against the reference
// path, which applies the same rules the plain way; rows that see no key; non-finite values in masked
// positions; the [T, T] mask and the attention weights.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;
using head_attention::MaskRule;

struct Shape {
  Index T, emb, head;
};

// Block edges (detail::Tuning: 96 queries, 384 keys) in different places.
constexpr Index kQueryBlock = head_attention::detail::Tuning::query_block;
const Shape kShapes[] = {
    {1, 8, 4},   {7, 5, 3},  {kQueryBlock, 16, 16}, {kQueryBlock + 1, 6, 5}, {150, 13, 7},
    {300, 8, 4}, {520, 8, 8}};
static_assert(520 > head_attention::detail::Tuning::key_block, "a shape must cross a key block edge");

std::vector<MaskRule> rules() {
  return {MaskRule::causal(),
          MaskRule::bidirectional(),
          MaskRule::sliding_window(1),
          MaskRule::sliding_window(3),
          MaskRule::sliding_window(64),
          MaskRule::sliding_window(100),
          MaskRule::sliding_window(257),
          MaskRule::sliding_window(10000)};
}

}  // namespace

TEST_CASE("MaskRule: ranges, visibility and names", "[masks]") {
  const MaskRule causal = MaskRule::causal();
  CHECK(causal.kind() == MaskRule::Kind::causal);
  CHECK(causal.first_key(5) == 0);
  CHECK(causal.end_key(5, 10) == 6);
  CHECK(causal.end_key(5, 3) == 3);
  CHECK(causal.visible(5, 5, 10));
  CHECK_FALSE(causal.visible(5, 6, 10));
  const MaskRule none = MaskRule::bidirectional();
  CHECK(none.end_key(0, 10) == 10);
  CHECK(none.visible(0, 9, 10));
  const MaskRule window = MaskRule::sliding_window(3);
  CHECK(window.window() == 3);
  CHECK(window.first_key(1) == 0);
  CHECK(window.first_key(10) == 8);
  CHECK(window.visible(10, 8, 20));
  CHECK_FALSE(window.visible(10, 7, 20));
  CHECK_FALSE(window.visible(10, 11, 20));
  CHECK(window.name() == "sliding_window(3)");
  CHECK(causal != window);
  CHECK(window == MaskRule::sliding_window(3));
  check_shape_error([] { (void)MaskRule::sliding_window(0); },
                    {"MaskRule::sliding_window", "window", ">= 1", "got 0"});
}

TEMPLATE_TEST_CASE("every mask rule: fast path equals the reference", "[masks]", float, double) {
  using Scalar = TestType;
  for (const Shape& s : kShapes) {
    for (const MaskRule& rule : rules()) {
      const std::uint64_t seed = 1200 + static_cast<std::uint64_t>(s.T);
      head_attention::HeadAttention<Scalar> layer(s.emb, s.head, s.T, seed, rule);
      CHECK(layer.mask_rule() == rule);
      const Matrix<Scalar> x = random_matrix<Scalar>(s.T, s.emb, seed + 1, 2.0);
      const Matrix<Scalar> expected =
          head_attention::reference::forward(x, layer.query(), layer.key(), layer.value(), rule);
      INFO("T " << s.T << ", rule " << rule.name());
      CHECK(relative_error(layer.forward(x), expected) <= rounding_tolerance<Scalar>());
      // The same rule set afterwards through the setter.
      head_attention::HeadAttention<Scalar> later(s.emb, s.head, s.T, seed);
      later.set_mask_rule(rule);
      CHECK(identical(later.forward(x), layer.forward(x)));
    }
  }
}

TEMPLATE_TEST_CASE("the mask of each rule", "[masks]", float, double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(4, 2, 9, 0, MaskRule::sliding_window(2));
  const auto mask = layer.mask(5);
  for (Index i = 0; i < 5; ++i)
    for (Index j = 0; j < 5; ++j)
      CHECK(mask(i, j) == (j <= i && j > i - 2));
  CHECK(layer.tril_mask(5) == head_attention::HeadAttention<Scalar>(4, 2, 9).mask(5));  // tril stays causal
  layer.set_mask_rule(MaskRule::bidirectional());
  CHECK(layer.mask(4).all());
  check_shape_error([&] { (void)layer.mask(10); }, {"HeadAttention::mask", "T", "max_seq_len = 9", "got 10"});
}

TEMPLATE_TEST_CASE("right padding: fast path equals the reference per sequence", "[masks]", float, double) {
  using Scalar = TestType;
  for (const MaskRule& rule : {MaskRule::causal(), MaskRule::bidirectional(), MaskRule::sliding_window(40)}) {
    for (const Index T : {Index(9), Index(150), Index(300)}) {
      const Index emb = 10, head = 6;
      head_attention::BatchedHeadAttention<Scalar> batched(emb, head, T,
                                                           1300 + static_cast<std::uint64_t>(T));
      batched.head().set_mask_rule(rule);
      const std::vector<Index> lengths = {T, 0, 1, T / 2, T - 1};
      const Index B = static_cast<Index>(lengths.size());
      const Tensor3<Scalar> x = random_tensor<Scalar>(B, T, emb, 1301);
      const Tensor3<Scalar> out = batched.forward(x, lengths);
      const auto& l = batched.head();
      for (Index b = 0; b < B; ++b) {
        INFO("rule " << rule.name() << ", T " << T << ", sequence " << b << ", length " << lengths[b]);
        const Matrix<Scalar> expected = head_attention::reference::forward(
            sequence(x, b), l.query(), l.key(), l.value(), rule, lengths[static_cast<std::size_t>(b)]);
        CHECK(relative_error(sequence(out, b), expected) <= rounding_tolerance<Scalar>());
      }
      // Length 0: no query sees any key, so every row is exactly zero, never NaN.
      CHECK((sequence(out, 1).array() == Scalar(0)).all());
      // Full lengths are the unpadded call.
      const std::vector<Index> full(static_cast<std::size_t>(B), T);
      const Tensor3<Scalar> unpadded = batched.forward(x);
      const Tensor3<Scalar> padded_full = batched.forward(x, full);
      CHECK(max_abs_diff(unpadded.data(), padded_full.data(), unpadded.size()) == 0);
    }
  }
}

TEMPLATE_TEST_CASE("non-finite values in masked positions leave every output that cannot see them unchanged",
                   "[masks]", float, double) {
  using Scalar = TestType;
  const Scalar planted[] = {std::numeric_limits<Scalar>::quiet_NaN(), std::numeric_limits<Scalar>::infinity(),
                            -std::numeric_limits<Scalar>::infinity()};
  constexpr Index T = 300, emb = 8, head = 4;
  for (const MaskRule& rule :
       {MaskRule::sliding_window(1), MaskRule::sliding_window(50), MaskRule::causal()}) {
    head_attention::HeadAttention<Scalar> layer(emb, head, T, 1400, rule);
    layer.set_num_threads(1);
    const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 1401);
    const Matrix<Scalar> clean = layer.forward(x);
    Index failures = 0, unreached = 0;
    for (const Scalar value : planted) {
      for (Index p = 0; p < T; p += 7) {
        Matrix<Scalar> dirty = x;
        dirty(p, 1) = value;
        const Matrix<Scalar> out = layer.forward(dirty);
        for (Index i = 0; i < T; ++i) {
          if (rule.visible(i, p, T)) {
            if (out.row(i).allFinite()) ++unreached;
          } else if (!(out.row(i).array() == clean.row(i).array()).all()) {
            ++failures;
          }
        }
      }
    }
    INFO("rule " << rule.name());
    CHECK(failures == 0);
    CHECK(unreached == 0);
  }

  // Padding: values in padded key positions reach no output at all.
  head_attention::BatchedHeadAttention<Scalar> batched(emb, head, T, 1402);
  batched.head().set_mask_rule(MaskRule::bidirectional());
  const Tensor3<Scalar> x = random_tensor<Scalar>(2, T, emb, 1403);
  const std::vector<Index> lengths = {200, 37};
  const Tensor3<Scalar> clean = batched.forward(x, lengths);
  for (const Scalar value : planted) {
    Tensor3<Scalar> dirty = x;
    for (Index i = 200; i < T; i += 3)
      dirty(0, i, 2) = value;
    for (Index i = 37; i < T; i += 5)
      dirty(1, i, 0) = value;
    // Padded query rows' own Q is non-finite too, so only the valid rows are compared.
    const Tensor3<Scalar> out = batched.forward(dirty, lengths);
    CHECK(identical(sequence(out, 0).topRows(200), sequence(clean, 0).topRows(200)));
    CHECK(identical(sequence(out, 1).topRows(37), sequence(clean, 1).topRows(37)));
  }
}

TEMPLATE_TEST_CASE("attention_weights: the reference's softmax, rows summing to 1, masked entries 0",
                   "[masks]", float, double) {
  using Scalar = TestType;
  for (const MaskRule& rule : {MaskRule::causal(), MaskRule::bidirectional(), MaskRule::sliding_window(5)}) {
    head_attention::HeadAttention<Scalar> layer(9, 4, 40, 1500, rule);
    const Matrix<Scalar> x = random_matrix<Scalar>(33, 9, 1501);
    const Matrix<Scalar> w = layer.attention_weights(x);
    REQUIRE(w.rows() == 33);
    REQUIRE(w.cols() == 33);
    INFO("rule " << rule.name());
    const auto mask = layer.mask(33);
    CHECK((mask.select(Matrix<Scalar>::Zero(33, 33), w).array() == Scalar(0)).all());
    CHECK((w.rowwise().sum().array() - Scalar(1)).abs().maxCoeff() <= 10 * rounding_tolerance<Scalar>());
    // weights · V is the forward output.
    const Matrix<Scalar> V =
        (x * layer.value().weight.transpose()).rowwise() + layer.value().bias.transpose();
    CHECK(relative_error(Matrix<Scalar>(w * V), layer.forward(x)) <= rounding_tolerance<Scalar>());

    head_attention::BatchedHeadAttention<Scalar> batched(layer);
    const Tensor3<Scalar> xb = random_tensor<Scalar>(3, 12, 9, 1502);
    const Tensor3<Scalar> wb = batched.attention_weights(xb);
    REQUIRE(wb.dimension(0) == 3);
    REQUIRE(wb.dimension(1) == 12);
    REQUIRE(wb.dimension(2) == 12);
    for (Index b = 0; b < 3; ++b)
      CHECK(identical(sequence(wb, b), layer.attention_weights(sequence(xb, b))));
  }
}

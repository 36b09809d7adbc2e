// Masked keys never influence an output, even when they hold NaN or Inf: a non-finite value planted in input
// row p may reach only the outputs that attend to row p (rows p and later, under the causal mask). Every
// earlier output must stay bit-identical to the output of the clean input, on every path.
//
// (PyTorch's seed module does not give this: its weights · V multiplies the masked zeros by V, and 0 · NaN is
// NaN, so there a NaN in row p reaches every earlier row too.)
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;

template <typename Scalar>
const Scalar kPlanted[] = {std::numeric_limits<Scalar>::quiet_NaN(), std::numeric_limits<Scalar>::infinity(),
                           -std::numeric_limits<Scalar>::infinity()};

struct Shape {
  Index T, emb, head;
  std::vector<Index>
      rows;  // where a value is planted: every row of the small shape, the block edges of the others
};

constexpr Index kQueryBlock = head_attention::detail::Tuning::query_block;
constexpr Index kKeyBlock = head_attention::detail::Tuning::key_block;

/// The first two rows, the last two, the rows either side of each query block edge and after the first key
/// block edge: planting in every row of the large shapes took 30 s, several minutes under sanitizers.
std::vector<Index> edge_rows(Index T) {
  std::vector<Index> rows = {0, 1, T - 2, T - 1};
  for (Index edge = kQueryBlock; edge < T; edge += kQueryBlock) {
    rows.push_back(edge - 1);
    rows.push_back(edge);
  }
  if (kKeyBlock + 1 < T) rows.push_back(kKeyBlock + 1);
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

// T = 10: one tile, every row planted. Then three query blocks in one key block, and two key blocks, so that
// the planted row sits in the diagonal tile of some query blocks and in a full tile of later ones (block
// sizes from detail::Tuning).
const Shape kShapes[] = {
    {10, 6, 4, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}},
    {2 * kQueryBlock + kQueryBlock / 4, 12, 8, edge_rows(2 * kQueryBlock + kQueryBlock / 4)},
    {kKeyBlock + 2 * kQueryBlock / 3, 16, 8, edge_rows(kKeyBlock + 2 * kQueryBlock / 3)}};
static_assert(2 * kQueryBlock + kQueryBlock / 4 < kKeyBlock, "the middle shape must stay in one key block");

/// Rows [0, p) of `got` are bit-identical to those of `clean` and finite.
template <typename Scalar>
bool earlier_rows_unchanged(const Matrix<Scalar>& got, const Matrix<Scalar>& clean, Index p) {
  return identical(got.topRows(p), clean.topRows(p)) && got.topRows(p).allFinite();
}

}  // namespace

TEMPLATE_TEST_CASE("a non-finite input row reaches only the outputs that attend to it", "[nonfinite]", float,
                   double) {
  using Scalar = TestType;
  for (const Shape& shape : kShapes) {
    const std::uint64_t seed = 900 + static_cast<std::uint64_t>(shape.T);
    head_attention::HeadAttention<Scalar> layer(shape.emb, shape.head, shape.T, seed);
    layer.set_num_threads(1);  // the plants below run thousands of calls; threads are covered elsewhere
    const Matrix<Scalar> x = random_matrix<Scalar>(shape.T, shape.emb, seed + 1);
    const Matrix<Scalar> clean = layer.forward(x);
    const Matrix<Scalar> clean_reference =
        head_attention::reference::forward(x, layer.query(), layer.key(), layer.value());
    REQUIRE(clean.allFinite());

    for (const Scalar value : kPlanted<Scalar>) {
      Index fast_failures = 0, reference_failures = 0, unreached = 0;
      for (const Index p : shape.rows) {
        Matrix<Scalar> planted = x;
        planted(p, p % shape.emb) = value;
        const Matrix<Scalar> fast = layer.forward(planted);
        const Matrix<Scalar> ref =
            head_attention::reference::forward(planted, layer.query(), layer.key(), layer.value());
        if (!earlier_rows_unchanged(fast, clean, p)) ++fast_failures;
        if (!earlier_rows_unchanged(ref, clean_reference, p)) ++reference_failures;
        // The planted row itself must see its own non-finite key and value: the plant did take effect.
        if (fast.row(p).allFinite() || ref.row(p).allFinite()) ++unreached;
      }
      INFO("T " << shape.T << ", planted " << value);
      CHECK(fast_failures == 0);
      CHECK(reference_failures == 0);
      CHECK(unreached == 0);
    }
  }
}

TEMPLATE_TEST_CASE("a non-finite value in one sequence leaves the others and the earlier rows unchanged",
                   "[nonfinite]", float, double) {
  using Scalar = TestType;
  constexpr Index B = 3, T = 200, emb = 16, head = 8;
  head_attention::BatchedHeadAttention<Scalar> batched(emb, head, T, 77);
  batched.head().set_num_threads(2);  // also on the multi-threaded path, when there is one
  const Tensor3<Scalar> x = random_tensor<Scalar>(B, T, emb, 78);
  const Tensor3<Scalar> clean = batched.forward(x);
  for (const Scalar value : kPlanted<Scalar>) {
    for (const Index p : {Index(0), Index(63), Index(64), Index(100), Index(199)}) {
      Tensor3<Scalar> planted = x;
      planted(1, p, 3) = value;
      const Tensor3<Scalar> out = batched.forward(planted);
      INFO("planted " << value << " at sequence 1, row " << p);
      CHECK(identical(sequence(out, 0), sequence(clean, 0)));
      CHECK(identical(sequence(out, 2), sequence(clean, 2)));
      CHECK(earlier_rows_unchanged(sequence(out, 1), sequence(clean, 1), p));
      CHECK_FALSE(sequence(out, 1).row(p).allFinite());
    }
  }
}

TEMPLATE_TEST_CASE("decoding with a cache: a non-finite row reaches only the later positions",
                   "[nonfinite][cache]", float, double) {
  using Scalar = TestType;
  constexpr Index T = 140, emb = 12, head = 8;
  head_attention::HeadAttention<Scalar> layer(emb, head, T, 95);
  const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 96);
  // A prefill of 70 rows, then one row at a time, into a fresh cache.
  const auto decode = [&](const Matrix<Scalar>& in) {
    auto cache = layer.make_cache();
    Matrix<Scalar> out(T, head);
    out.topRows(70) = layer.forward_cached(in.topRows(70), cache);
    for (Index r = 70; r < T; ++r)
      out.row(r) = layer.forward_cached(in.row(r), cache);
    return out;
  };
  const Matrix<Scalar> clean = decode(x);
  REQUIRE(clean.allFinite());
  for (const Scalar value : kPlanted<Scalar>) {
    for (const Index p : {Index(0), Index(69), Index(70), Index(71), Index(139)}) {
      Matrix<Scalar> planted = x;
      planted(p, 2) = value;
      const Matrix<Scalar> out = decode(planted);
      INFO("planted " << value << " at row " << p);
      CHECK(earlier_rows_unchanged(out, clean, p));
      CHECK_FALSE(out.row(p).allFinite());
    }
  }
}

TEMPLATE_TEST_CASE(
    "multi-head: a non-finite row reaches only the outputs that attend to it, on every entry point",
    "[nonfinite][multihead]", float, double) {
  using Scalar = TestType;
  constexpr Index B = 2, T = 130, emb = 16, heads = 3, head = 4;
  head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 0.1, 97);
  const Matrix<Scalar> x = random_matrix<Scalar>(B * T, emb, 98);
  const std::vector<Index> lengths = {T, 90};
  struct Outputs {
    Matrix<Scalar> single, padded, decoded;
  };
  const auto run = [&](const Matrix<Scalar>& in) {
    Outputs o;
    o.single = mha.forward(in.topRows(T));
    o.padded.resize(B * T, emb);
    mha.forward_into(in, o.padded, Batch(B, lengths));
    auto cache = mha.make_cache();
    o.decoded.resize(T, emb);
    o.decoded.topRows(64) = mha.forward_cached(in.topRows(64), cache);
    for (Index r = 64; r < T; ++r)
      o.decoded.row(r) = mha.forward_cached(in.row(r), cache);
    return o;
  };
  const Outputs clean = run(x);
  for (const Scalar value : kPlanted<Scalar>) {
    for (const Index p : {Index(0), Index(63), Index(64), Index(100), Index(129)}) {
      Matrix<Scalar> planted = x;
      planted(p, 5) = value;                           // sequence 0, row p
      planted(T + std::max<Index>(p, 90), 1) = value;  // sequence 1: a padded row (>= lengths[1] = 90)
      const Outputs out = run(planted);
      INFO("planted " << value << " at row " << p);
      CHECK(earlier_rows_unchanged(out.single, clean.single, p));
      CHECK_FALSE(out.single.row(p).allFinite());
      CHECK(earlier_rows_unchanged(out.decoded, clean.decoded, p));
      CHECK_FALSE(out.decoded.row(p).allFinite());
      const Matrix<Scalar> padded0 = out.padded.topRows(T), clean0 = clean.padded.topRows(T);
      CHECK(earlier_rows_unchanged(padded0, clean0, p));
      // Sequence 1's planted row is padding: a masked key for every query, so every valid row is unchanged.
      CHECK(identical(out.padded.middleRows(T, 90), clean.padded.middleRows(T, 90)));
    }
  }
}

namespace {

/// Rows of `got` outside [lo, hi) are finite and equal to those of `clean` within `bound` of clean's scale
/// (the planted run takes the masked products, which sum in another order than the clean run's tiles).
template <typename Scalar>
bool rows_outside_unchanged(const Matrix<Scalar>& got, const Matrix<Scalar>& clean, Index lo, Index hi,
                            double bound) {
  lo = std::max<Index>(lo, 0);
  hi = std::min<Index>(hi, got.rows());
  const Index tail = got.rows() - hi;
  const bool finite = got.topRows(lo).allFinite() && got.bottomRows(tail).allFinite();
  const double scale = std::max(max_abs(clean.data(), clean.size()), 1e-300);
  const double diff =
      std::max(lo > 0 ? max_abs_diff(Matrix<Scalar>(got.topRows(lo)).data(),
                                     Matrix<Scalar>(clean.topRows(lo)).data(), lo * got.cols())
                      : 0.0,
               tail > 0 ? max_abs_diff(Matrix<Scalar>(got.bottomRows(tail)).data(),
                                       Matrix<Scalar>(clean.bottomRows(tail)).data(), tail * got.cols())
                        : 0.0);
  return finite && diff <= bound * scale;
}

}  // namespace

// The backward pass: masked pairs contribute nothing to any gradient, whatever they hold. A sliding window of
// W keys makes it observable: a value planted in x row p changes only the outputs of rows [p, p + W), so the
// input gradients of rows at least W away from p must not move. (The weight gradients sum every row, so they
// see a non-finite row legitimately, as autograd's do.)
TEMPLATE_TEST_CASE("backward: a non-finite input row reaches only the gradients that depend on it",
                   "[nonfinite][backward]", float, double) {
  using Scalar = TestType;
  const double bound = std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
  constexpr Index W = 20, emb = 12, head = 8, heads = 2;
  const head_attention::MaskRule rule = head_attention::MaskRule::sliding_window(W);
  for (const Index T : {Index(150), Index(320)}) {  // one key tile; two, with the plants either side
    head_attention::HeadAttention<Scalar> layer(emb, head, T, 31, rule);
    head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 0.1, 32, rule);
    const Matrix<Scalar> x = random_matrix<Scalar>(2 * T, emb, 33);
    const Matrix<Scalar> g = random_matrix<Scalar>(2 * T, head, 34);
    const Matrix<Scalar> g_mha = random_matrix<Scalar>(2 * T, emb, 35);
    struct Inputs {
      Matrix<Scalar> single, state, batch, multi;
    };
    const auto run = [&](const Matrix<Scalar>& in) {
      Inputs o;
      o.single = layer.backward(in.topRows(T), g.topRows(T)).input;
      o.state = layer.backward(in.topRows(T), g.topRows(T), layer.forward_training(in.topRows(T))).input;
      o.batch = layer.backward(in, g, Batch(2)).input;
      o.multi = mha.backward(in.topRows(T), g_mha.topRows(T)).input;
      return o;
    };
    const Inputs clean = run(x);
    for (const Scalar value : kPlanted<Scalar>) {
      for (const Index p : {Index(0), Index(30), Index(127), Index(128), Index(149)}) {
        Matrix<Scalar> planted = x;
        planted(p, 3) = value;      // sequence 0
        planted(T + p, 5) = value;  // sequence 1 of the batched call
        const Inputs got = run(planted);
        INFO("T " << T << ", planted " << value << " at row " << p);
        CHECK(rows_outside_unchanged(got.single, clean.single, p - W + 1, p + W, bound));
        CHECK(rows_outside_unchanged(got.state, clean.state, p - W + 1, p + W, bound));
        CHECK(rows_outside_unchanged(got.multi, clean.multi, p - W + 1, p + W, bound));
        const Matrix<Scalar> batch0 = got.batch.topRows(T), clean0 = clean.batch.topRows(T);
        const Matrix<Scalar> batch1 = got.batch.bottomRows(T), clean1 = clean.batch.bottomRows(T);
        CHECK(rows_outside_unchanged(batch0, clean0, p - W + 1, p + W, bound));
        CHECK(rows_outside_unchanged(batch1, clean1, p - W + 1, p + W, bound));
        CHECK_FALSE(got.single.row(p).allFinite());  // the plant did take effect
      }
    }
  }
}

// A non-finite gradient row dL/dO[i] flows only into what output i depends on: under the causal rule, keys
// and values at positions <= i. The input gradients of later rows must not move.
TEMPLATE_TEST_CASE("backward: a non-finite output gradient reaches only the positions its output attends",
                   "[nonfinite][backward]", float, double) {
  using Scalar = TestType;
  const double bound = std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
  constexpr Index T = 300, emb = 12, head = 8;
  head_attention::HeadAttention<Scalar> layer(emb, head, T, 41);
  head_attention::MultiHeadAttention<Scalar> mha(2, emb, head, T, 0.1, 42);
  const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 43);
  const Matrix<Scalar> g = random_matrix<Scalar>(T, head, 44);
  const Matrix<Scalar> g_mha = random_matrix<Scalar>(T, emb, 45);
  const Matrix<Scalar> clean = layer.backward(x, g).input;
  const Matrix<Scalar> clean_mha = mha.backward(x, g_mha).input;
  for (const Scalar value : kPlanted<Scalar>) {
    for (const Index i : {Index(0), Index(100), Index(127), Index(128), Index(255), Index(256), Index(298)}) {
      Matrix<Scalar> gi = g, gi_mha = g_mha;
      gi(i, 1) = value;
      gi_mha(i, 2) = value;
      const Matrix<Scalar> got = layer.backward(x, gi).input;
      const Matrix<Scalar> got_mha = mha.backward(x, gi_mha).input;
      INFO("planted " << value << " in grad_out row " << i);
      CHECK(rows_outside_unchanged(got, clean, 0, i + 1, bound));
      CHECK(rows_outside_unchanged(got_mha, clean_mha, 0, i + 1, bound));
      CHECK_FALSE(got.row(i).allFinite());
    }
  }
}

// Masked keys never influence an output, even when they hold NaN or Inf: a non-finite value planted in input
// row p may reach only the outputs that attend to row p (rows p and later, under the causal mask). Every
// earlier output must stay bit-identical to the output of the clean input, on every path.
//
// (PyTorch's seed module does not give this: its weights · V multiplies the masked zeros by V, and 0 · NaN is
// NaN, so there a NaN in row p reaches every earlier row too.)
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

// T = 10: one tile. T = 150: three query blocks in one key block. T = 320: two key blocks, so that the
// planted row sits in the diagonal tile of some query blocks and in a full tile of later ones. Query blocks
// are 64 rows and key blocks 256 (detail::Tuning), so the rows either side of each block edge, the first and
// the last are planted; planting in every row of the large shapes took 30 s, several minutes under
// sanitizers.
const Shape kShapes[] = {{10, 6, 4, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}},
                         {150, 12, 8, {0, 1, 62, 63, 64, 65, 100, 127, 128, 129, 148, 149}},
                         {320, 16, 8, {0, 63, 64, 127, 128, 191, 192, 255, 256, 257, 300, 318, 319}}};

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
  head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 97);
  const Matrix<Scalar> x = random_matrix<Scalar>(B * T, emb, 98);
  const std::vector<Index> lengths = {T, 90};
  struct Outputs {
    Matrix<Scalar> single, padded, decoded;
  };
  const auto run = [&](const Matrix<Scalar>& in) {
    Outputs o;
    o.single = mha.forward(in.topRows(T));
    o.padded.resize(B * T, emb);
    mha.forward_into(in, B, o.padded, &lengths);
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

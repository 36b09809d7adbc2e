// Properties of causal attention that hold whatever the weights: causality, the first row, batching, input
// layouts, softmax invariances (thread counts are in unit-threads.cpp). Random inputs from fixed seeds
// (printed on failure).
#include <cstdint>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;

struct Shape {
  Index T, emb, head;
};

// Shapes that put the tiled kernel's block edges (detail::Tuning: 96 queries, 384 keys) in different places.
constexpr Index kQueryBlock = head_attention::detail::Tuning::query_block;
const std::vector<Shape> kShapes = {
    {1, 8, 4},    {2, 13, 7},  {kQueryBlock, 16, 16}, {kQueryBlock + 1, 5, 12},
    {150, 13, 7}, {300, 8, 4}, {513, 24, 8}};
static_assert(513 > head_attention::detail::Tuning::key_block, "a shape must cross a key block edge");

template <typename Scalar>
Matrix<Scalar> value_projection(const head_attention::HeadAttention<Scalar>& layer, const Matrix<Scalar>& x) {
  return (x * layer.value().weight.transpose()).rowwise() + layer.value().bias.transpose();
}

}  // namespace

TEMPLATE_TEST_CASE("causality: later inputs never change earlier outputs", "[properties]", float, double) {
  using Scalar = TestType;
  for (const Shape& s : kShapes) {
    const std::uint64_t seed = 100 + static_cast<std::uint64_t>(s.T);
    INFO("T " << s.T << ", emb " << s.emb << ", head " << s.head << ", seed " << seed);
    head_attention::HeadAttention<Scalar> layer(s.emb, s.head, s.T, seed);
    const Matrix<Scalar> x = random_matrix<Scalar>(s.T, s.emb, seed);
    const Matrix<Scalar> out = layer.forward(x);
    for (const Index t :
         {Index(0), Index(1), Index(62), Index(63), Index(64), Index(255), Index(256), s.T / 2, s.T - 2}) {
      if (t < 0 || t >= s.T - 1) continue;
      INFO("rows after t = " << t << " replaced");
      Matrix<Scalar> changed = x;
      changed.bottomRows(s.T - t - 1) = random_matrix<Scalar>(s.T - t - 1, s.emb, seed + 7 + t, 3.0);
      const Matrix<Scalar> out_changed = layer.forward(changed);
      // Every row is computed from its own query and keys j <= i only, in the same order of operations
      // whatever the later rows hold (a masked key adds exp(-inf) = 0 times its value): bitwise equal.
      CHECK(identical(out_changed.topRows(t + 1), out.topRows(t + 1)));
      // ... and the rows after t did change.
      CHECK(!identical(out_changed.row(t + 1), out.row(t + 1)));
    }
  }
}

TEMPLATE_TEST_CASE("causality: a prefix gives the prefix of the output", "[properties]", float, double) {
  using Scalar = TestType;
  const Index T = 300;
  head_attention::HeadAttention<Scalar> layer(13, 7, T, 5);
  const Matrix<Scalar> x = random_matrix<Scalar>(T, 13, 55);
  const Matrix<Scalar> out = layer.forward(x);
  for (const Index t : {1, 2, 63, 64, 65, 150, 256, 257, 299}) {
    INFO("prefix of " << t << " rows");
    // Different T, different block shapes and GEMM blocking: equal up to rounding.
    CHECK(relative_error(layer.forward(x.topRows(t)), out.topRows(t)) <= rounding_tolerance<Scalar>());
  }
}

TEMPLATE_TEST_CASE("the first output row is the value projection of the first input", "[properties]", float,
                   double) {
  using Scalar = TestType;
  for (const Shape& s : kShapes) {
    const std::uint64_t seed = 200 + static_cast<std::uint64_t>(s.T);
    INFO("T " << s.T << ", emb " << s.emb << ", head " << s.head << ", seed " << seed);
    head_attention::HeadAttention<Scalar> layer(s.emb, s.head, s.T + 3, seed);
    const Matrix<Scalar> x = random_matrix<Scalar>(s.T, s.emb, seed, 2.0);
    const Matrix<Scalar> out = layer.forward(x);
    const Matrix<Scalar> v0 = value_projection(layer, Matrix<Scalar>(x.topRows(1)));  // x_0 Wvᵀ + bv
    CHECK(relative_error(out.topRows(1), v0) <= rounding_tolerance<Scalar>());
  }
}

TEMPLATE_TEST_CASE("every output row is a convex combination of the visible values", "[properties]", float,
                   double) {
  using Scalar = TestType;
  // Large input scales make the softmax nearly one-hot: it must stay finite and in range.
  for (const double scale : {1.0, 5.0, 30.0}) {
    const Index T = 200, emb = 9, head = 6;
    INFO("input scale " << scale);
    head_attention::HeadAttention<Scalar> layer(emb, head, T, 3);
    const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 33, scale);
    const Matrix<Scalar> out = layer.forward(x);
    REQUIRE(out.allFinite());
    const Matrix<Scalar> v = value_projection(layer, x);
    const double slack = std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
    Eigen::Matrix<Scalar, 1, Eigen::Dynamic> lo = v.row(0), hi = v.row(0);
    bool in_range = true;
    for (Index i = 0; i < T; ++i) {
      lo = lo.cwiseMin(v.row(i));
      hi = hi.cwiseMax(v.row(i));
      const Scalar margin =
          static_cast<Scalar>(slack * (1 + hi.cwiseAbs().maxCoeff() + lo.cwiseAbs().maxCoeff()));
      in_range = in_range && (out.row(i).array() >= lo.array() - margin).all() &&
                 (out.row(i).array() <= hi.array() + margin).all();
    }
    CHECK(in_range);
    CHECK(relative_error(out,
                         head_attention::reference::forward(x, layer.query(), layer.key(), layer.value())) <=
          (std::is_same<Scalar, float>::value ? 1e-4 : 1e-11));
  }
}

TEMPLATE_TEST_CASE("softmax invariances of the biases", "[properties]", float, double) {
  using Scalar = TestType;
  const Index T = 130, emb = 11, head = 5;
  head_attention::HeadAttention<Scalar> layer(emb, head, T, 8);
  const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 88);
  const Matrix<Scalar> out = layer.forward(x);

  SECTION("adding c to the key bias adds q·c to a whole row of scores: no change") {
    auto shifted = layer;
    shifted.key().bias.array() += Scalar(0.75);
    CHECK(relative_error(shifted.forward(x), out) <= rounding_tolerance<Scalar>());
  }
  SECTION("adding d to the value bias adds d to every output row (the weights sum to 1)") {
    auto shifted = layer;
    Eigen::Matrix<Scalar, Eigen::Dynamic, 1> d(head);
    for (Index j = 0; j < head; ++j)
      d(j) = Scalar(0.5) * static_cast<Scalar>(j + 1);
    shifted.value().bias += d;
    const Matrix<Scalar> expected = out.rowwise() + d.transpose();
    CHECK(relative_error(shifted.forward(x), expected) <= rounding_tolerance<Scalar>());
  }
}

TEMPLATE_TEST_CASE("batched equals per-sequence", "[properties]", float, double) {
  using Scalar = TestType;
  const Index B = 3;
  for (const Shape& s : kShapes) {
    const std::uint64_t seed = 300 + static_cast<std::uint64_t>(s.T);
    INFO("B " << B << ", T " << s.T << ", emb " << s.emb << ", head " << s.head << ", seed " << seed);
    const head_attention::BatchedHeadAttention<Scalar> batched(s.emb, s.head, s.T, seed);
    const Tensor3<Scalar> x = random_tensor<Scalar>(B, s.T, s.emb, seed);
    const Tensor3<Scalar> out = batched.forward(x);
    REQUIRE(out.dimension(0) == B);
    REQUIRE(out.dimension(1) == s.T);
    REQUIRE(out.dimension(2) == s.head);
    for (Index b = 0; b < B; ++b) {
      INFO("sequence " << b);
      // The projection GEMM runs over the B·T rows back to back, so its blocking may differ from that of a
      // single sequence: equal up to rounding (in practice usually bitwise).
      CHECK(relative_error(sequence(out, b), batched.head().forward(sequence(x, b))) <=
            rounding_tolerance<Scalar>());
    }
  }
}

TEMPLATE_TEST_CASE("every input layout agrees: row-major column-major Map block expression", "[properties]",
                   float, double) {
  using Scalar = TestType;
  const double tol = rounding_tolerance<Scalar>();
  for (const Shape& s : kShapes) {
    const std::uint64_t seed = 400 + static_cast<std::uint64_t>(s.T);
    INFO("T " << s.T << ", emb " << s.emb << ", head " << s.head << ", seed " << seed);
    const head_attention::HeadAttention<Scalar> layer(s.emb, s.head, s.T, seed);
    const Matrix<Scalar> x = random_matrix<Scalar>(s.T, s.emb, seed);
    const Matrix<Scalar> out = layer.forward(x);

    const ColMatrix<Scalar> col = x;
    CHECK(relative_error(layer.forward(col), out) <= tol);

    std::vector<Scalar> buffer(x.data(), x.data() + x.size());
    const Eigen::Map<const Matrix<Scalar>> row_map(buffer.data(), s.T, s.emb);
    CHECK(identical(layer.forward(row_map), out));
    const Eigen::Map<const ColMatrix<Scalar>> col_map(col.data(), s.T, s.emb);
    CHECK(relative_error(layer.forward(col_map), out) <= tol);

    // Blocks of larger matrices: a leading dimension other than emb, read in place.
    Matrix<Scalar> wide_rows = random_matrix<Scalar>(s.T + 3, s.emb + 5, seed + 1);
    wide_rows.block(2, 3, s.T, s.emb) = x;
    CHECK(identical(layer.forward(wide_rows.block(2, 3, s.T, s.emb)), out));
    ColMatrix<Scalar> wide_cols = random_matrix<Scalar>(s.T + 4, s.emb + 1, seed + 2);
    wide_cols.block(1, 1, s.T, s.emb) = x;
    CHECK(relative_error(layer.forward(wide_cols.block(1, 1, s.T, s.emb)), out) <= tol);

    // Strided views and expressions (evaluated once by the layer).
    std::vector<Scalar> strided(static_cast<std::size_t>(2 * x.size()), Scalar(99));
    for (Index i = 0; i < x.size(); ++i)
      strided[static_cast<std::size_t>(2 * i)] = x.data()[i];
    const Eigen::Map<const Matrix<Scalar>, 0, Eigen::Stride<Eigen::Dynamic, 2>> strided_map(
        strided.data(), s.T, s.emb, Eigen::Stride<Eigen::Dynamic, 2>(2 * s.emb, 2));
    CHECK(identical(layer.forward(strided_map), out));
    CHECK(identical(layer.forward((x * Scalar(2)) * Scalar(0.5)), out));
    const ColMatrix<Scalar> xt = x.transpose();  // [emb, T] column-major; its transpose is row-major
    CHECK(identical(layer.forward(xt.transpose()), out));
  }
}

// The public surface: sizes and accessors, the causal mask, empty inputs, forward_into, nn.Linear's
// layout, the seeded PyTorch-style initialisation, and the version macros.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;

template <typename Scalar>
bool same_weights(const head_attention::HeadAttention<Scalar>& a,
                  const head_attention::HeadAttention<Scalar>& b) {
  return identical(a.query().weight, b.query().weight) && identical(a.query().bias, b.query().bias) &&
         identical(a.key().weight, b.key().weight) && identical(a.key().bias, b.key().bias) &&
         identical(a.value().weight, b.value().weight) && identical(a.value().bias, b.value().bias);
}

}  // namespace

TEST_CASE("version macros follow the CMake project version", "[api]") {
  CHECK(HEAD_ATTENTION_VERSION_MAJOR == HEAD_ATTENTION_TEST_VERSION_MAJOR);
  CHECK(HEAD_ATTENTION_VERSION_MINOR == HEAD_ATTENTION_TEST_VERSION_MINOR);
  CHECK(HEAD_ATTENTION_VERSION_PATCH == HEAD_ATTENTION_TEST_VERSION_PATCH);
}

TEST_CASE("shape_error is an std::invalid_argument", "[api]") {
  STATIC_REQUIRE(std::is_base_of<std::invalid_argument, head_attention::shape_error>::value);
}

TEMPLATE_TEST_CASE("sizes and accessors", "[api]", float, double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(13, 7, 21);
  CHECK(layer.emb_size() == 13);
  CHECK(layer.head_size() == 7);
  CHECK(layer.max_seq_len() == 21);
  const auto& const_layer = layer;
  const std::initializer_list<const head_attention::Linear<Scalar>*> linears = {
      &layer.query(),       &layer.key(),       &layer.value(),
      &const_layer.query(), &const_layer.key(), &const_layer.value()};
  for (const head_attention::Linear<Scalar>* linear : linears) {
    CHECK(linear->in_features() == 13);
    CHECK(linear->out_features() == 7);
    CHECK(linear->weight.rows() == 7);  // [out, in], as in a PyTorch state_dict
    CHECK(linear->weight.cols() == 13);
    CHECK(linear->bias.size() == 7);
  }
  CHECK(&const_layer.query() == &layer.query());
  CHECK(&const_layer.key() == &layer.key());
  CHECK(&const_layer.value() == &layer.value());
  CHECK(&layer.query() != &layer.key());
  CHECK(&layer.key() != &layer.value());

  head_attention::BatchedHeadAttention<Scalar> batched(layer);
  CHECK(batched.head().emb_size() == 13);
  CHECK(batched.head().head_size() == 7);
  CHECK(batched.head().max_seq_len() == 21);
  CHECK(same_weights(batched.head(), layer));
  const auto& const_batched = batched;
  CHECK(&const_batched.head() == &batched.head());
}

TEMPLATE_TEST_CASE("a Linear weight is out by in and acts as x W^T + b", "[api]", float, double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(3, 2, 4);
  // Set V so that v(x) = [x0 + 2 x1 + 3 x2 + 1, -x2]; with T = 1 the output is v(x_0).
  layer.value().weight.resize(2, 3);
  layer.value().weight << 1, 2, 3, 0, 0, -1;
  layer.value().bias.resize(2);
  layer.value().bias << 1, 0;
  Matrix<Scalar> x(1, 3);
  x << 1, 10, 100;
  const Matrix<Scalar> out = layer.forward(x);
  CHECK(out(0, 0) == Scalar(322));
  CHECK(out(0, 1) == Scalar(-100));
}

TEMPLATE_TEST_CASE("tril_mask", "[api]", float, double) {
  using Scalar = TestType;
  const head_attention::HeadAttention<Scalar> layer(4, 2, 9);
  for (const Index T : {0, 1, 2, 5, 9}) {
    INFO("T " << T);
    const auto mask = layer.tril_mask(T);
    REQUIRE(mask.rows() == T);
    REQUIRE(mask.cols() == T);
    bool ok = true;
    for (Index i = 0; i < T; ++i)
      for (Index j = 0; j < T; ++j)
        ok = ok && (mask(i, j) == (j <= i));  // torch.tril(ones): query i sees keys 0..i
    CHECK(ok);
    CHECK(mask.count() == T * (T + 1) / 2);
  }
}

TEMPLATE_TEST_CASE("empty inputs", "[api]", float, double) {
  using Scalar = TestType;
  const head_attention::HeadAttention<Scalar> layer(6, 5, 8);
  const Matrix<Scalar> out = layer.forward(Matrix<Scalar>(0, 6));
  CHECK(out.rows() == 0);
  CHECK(out.cols() == 5);
  const ColMatrix<Scalar> col(0, 6);
  CHECK(layer.forward(col).cols() == 5);

  const head_attention::BatchedHeadAttention<Scalar> batched(layer);
  const Tensor3<Scalar> no_tokens = batched.forward(Tensor3<Scalar>(3, 0, 6));
  CHECK(no_tokens.dimension(0) == 3);
  CHECK(no_tokens.dimension(1) == 0);
  CHECK(no_tokens.dimension(2) == 5);
  const Tensor3<Scalar> no_sequences = batched.forward(Tensor3<Scalar>(0, 4, 6));
  CHECK(no_sequences.dimension(0) == 0);
  CHECK(no_sequences.dimension(1) == 4);
  CHECK(no_sequences.dimension(2) == 5);
}

TEMPLATE_TEST_CASE("forward_into writes forward's result into caller storage", "[api]", float, double) {
  using Scalar = TestType;
  constexpr Index T = 150, emb = 12, head = 5;
  const head_attention::HeadAttention<Scalar> layer(emb, head, T, 31);
  const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 32);
  const Matrix<Scalar> expected = layer.forward(x);

  Matrix<Scalar> out(T, head);
  layer.forward_into(x, out);
  CHECK(identical(out, expected));

  // One head's slice of a concatenation: only those columns are written.
  Matrix<Scalar> wide = Matrix<Scalar>::Constant(T, 3 * head, Scalar(7));
  layer.forward_into(x, wide.middleCols(head, head));
  CHECK(identical(wide.middleCols(head, head), expected));
  CHECK((wide.leftCols(head).array() == Scalar(7)).all());
  CHECK((wide.rightCols(head).array() == Scalar(7)).all());

  // A Map over caller memory, and a column-major input.
  std::vector<Scalar> buffer(static_cast<std::size_t>(T * head));
  layer.forward_into(ColMatrix<Scalar>(x), Eigen::Map<Matrix<Scalar>>(buffer.data(), T, head));
  CHECK(identical(Eigen::Map<const Matrix<Scalar>>(buffer.data(), T, head), expected));

  // Sequences back to back: each one as if alone (up to rounding: the projection GEMMs are cut into other
  // row chunks).
  const Matrix<Scalar> x2 = random_matrix<Scalar>(T, emb, 33);
  Matrix<Scalar> both(2 * T, emb);
  both << x, x2;
  Matrix<Scalar> out2(2 * T, head);
  layer.forward_into(both, 2, out2);
  CHECK(relative_error(out2.topRows(T), expected) <= rounding_tolerance<Scalar>());
  CHECK(relative_error(out2.bottomRows(T), layer.forward(x2)) <= rounding_tolerance<Scalar>());

  // Empty.
  Matrix<Scalar> none(0, head);
  layer.forward_into(Matrix<Scalar>(0, emb), 0, none);
  layer.forward_into(Matrix<Scalar>(0, emb), 4, none);
  CHECK(none.rows() == 0);
}

TEMPLATE_TEST_CASE("BatchedHeadAttention reads tensor expressions of the right rank", "[api]", float,
                   double) {
  using Scalar = TestType;
  const head_attention::BatchedHeadAttention<Scalar> batched(6, 3, 20, 41);
  const Tensor3<Scalar> x = random_tensor<Scalar>(2, 9, 6, 42);
  const Tensor3<Scalar> expected = batched.forward(x);
  const Tensor3<Scalar> doubled = batched.forward((x * Scalar(2)) * Scalar(0.5));  // evaluated once
  CHECK(max_abs_diff(doubled.data(), expected.data(), expected.size()) == 0);
  Tensor3<Scalar> copy = x;
  const Eigen::TensorMap<Tensor3<Scalar>> map(copy.data(), 2, 9, 6);
  const Tensor3<Scalar> from_map = batched.forward(map);
  CHECK(max_abs_diff(from_map.data(), expected.data(), expected.size()) == 0);
  Eigen::Tensor<Scalar, 3, Eigen::RowMajor, int> small_index(2, 9, 6);  // another index type
  std::copy(x.data(), x.data() + x.size(), small_index.data());
  const Tensor3<Scalar> from_int_index = batched.forward(small_index);
  CHECK(max_abs_diff(from_int_index.data(), expected.data(), expected.size()) == 0);
}

TEMPLATE_TEST_CASE("seeded init is deterministic and seed dependent and within the PyTorch bound", "[api]",
                   float, double) {
  using Scalar = TestType;
  using Layer = head_attention::HeadAttention<Scalar>;
  for (const Index emb : {1, 5, 13, 64, 512}) {
    const Index head = emb == 512 ? 64 : 7;
    INFO("emb " << emb << ", head " << head);
    const Layer a(emb, head, 10, 42);
    const Layer b(emb, head, 10, 42);
    const Layer c(emb, head, 10, 43);
    const Layer d(emb, head, 99, 42);  // max_seq_len plays no part in the init
    CHECK(same_weights(a, b));
    CHECK(same_weights(a, d));
    CHECK(!identical(a.query().weight, c.query().weight));
    CHECK(!identical(a.value().bias, c.value().bias));
    // The three projections are distinct draws from one generator.
    CHECK(!identical(a.query().weight, a.key().weight));
    CHECK(!identical(a.key().weight, a.value().weight));

    // nn.Linear's default init: U(-1/sqrt(emb), 1/sqrt(emb)) for weights and biases alike.
    const double bound = 1.0 / std::sqrt(static_cast<double>(emb));
    double largest = 0;
    for (const head_attention::Linear<Scalar>* linear : {&a.query(), &a.key(), &a.value()}) {
      largest = std::max(largest, static_cast<double>(linear->weight.cwiseAbs().maxCoeff()));
      largest = std::max(largest, static_cast<double>(linear->bias.cwiseAbs().maxCoeff()));
    }
    CAPTURE(largest, bound);
    CHECK(largest <= static_cast<double>(static_cast<Scalar>(bound)));
    // ... and spread over it, not clustered (3·head·(emb + 1) draws: at least 21).
    CHECK(largest >= 0.5 * bound);

    const head_attention::BatchedHeadAttention<Scalar> batched(emb, head, 10, 42);
    CHECK(same_weights(batched.head(), a));
  }
  const Layer default_seed(8, 4, 4);
  const Layer seed_zero(8, 4, 4, 0);
  CHECK(same_weights(default_seed, seed_zero));
}

TEST_CASE("seeded init: float and double weights agree to float rounding", "[api]") {
  for (const std::uint64_t seed : {std::uint64_t(0), std::uint64_t(7), std::uint64_t(123456789)}) {
    INFO("seed " << seed);
    const head_attention::HeadAttention<float> f(13, 7, 5, seed);
    const head_attention::HeadAttention<double> d(13, 7, 5, seed);
    // Both are the same double draws, the float ones rounded once.
    CHECK(identical(f.query().weight, d.query().weight.cast<float>()));
    CHECK(identical(f.query().bias, d.query().bias.cast<float>()));
    CHECK(identical(f.key().weight, d.key().weight.cast<float>()));
    CHECK(identical(f.key().bias, d.key().bias.cast<float>()));
    CHECK(identical(f.value().weight, d.value().weight.cast<float>()));
    CHECK(identical(f.value().bias, d.value().bias.cast<float>()));
    const double diff = (f.query().weight.cast<double>() - d.query().weight).cwiseAbs().maxCoeff();
    CHECK(diff <= 0.5 * std::numeric_limits<float>::epsilon());
  }
}

TEMPLATE_TEST_CASE("weights set through query key and value take effect at the next call", "[api]", float,
                   double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(6, 4, 12, 1);
  const head_attention::HeadAttention<Scalar> other(6, 4, 12, 2);
  const Matrix<Scalar> x = random_matrix<Scalar>(12, 6, 3);
  const Matrix<Scalar> before = layer.forward(x);
  const Matrix<Scalar> expected = other.forward(x);
  CHECK(!identical(before, expected));
  layer.query() = other.query();
  layer.key() = other.key();
  layer.value() = other.value();
  CHECK(identical(layer.forward(x), expected));
}

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

/// A cached prefill or a decode step of at most Tuning::rowdot_rows rows against the forward of the same
/// rows: those project through the weights as stored (detail::project_rows, the query's scale applied
/// after), a forward through the prepared weights' GEMMs, so they agree to rounding.
template <typename A, typename B>
bool close_to_forward(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return relative_error(a, b) < rounding_tolerance<typename A::Scalar>();
}

/// A form's decode steps over the B sequences of x ([B · T, emb]), one row per sequence at a time, into
/// [B · T, out] rows in x's order: what every form must give bit for bit as the layer's.
template <typename Form, typename Scalar>
Matrix<Scalar> decode_steps(const Form& form, const Matrix<Scalar>& x, Index B, Index T) {
  auto cache = form.make_cache(B);
  Matrix<Scalar> steps;
  for (Index t = 0; t < T; ++t) {
    Matrix<Scalar> step_x(B, x.cols());
    for (Index b = 0; b < B; ++b)
      step_x.row(b) = x.row(b * T + t);
    const Matrix<Scalar> step = form.forward_cached(step_x, cache);
    if (t == 0) steps.resize(B * T, step.cols());
    for (Index b = 0; b < B; ++b)
      steps.row(b * T + t) = step.row(b);
  }
  return steps;
}

/// A form's cached prefill of the rows of x, one sequence.
template <typename Form, typename Scalar>
Matrix<Scalar> cached_prefill(const Form& form, const Matrix<Scalar>& x) {
  auto cache = form.make_cache(head_attention::precision_of<Scalar>());
  return form.forward_cached(x, cache);
}

template <typename Scalar>
bool same_weights(const head_attention::HeadAttention<Scalar>& a,
                  const head_attention::HeadAttention<Scalar>& b) {
  return identical(a.query().weight, b.query().weight) && identical(a.query().bias, b.query().bias) &&
         identical(a.key().weight, b.key().weight) && identical(a.key().bias, b.key().bias) &&
         identical(a.value().weight, b.value().weight) && identical(a.value().bias, b.value().bias);
}

// Issue 24: every form has every inference entry point, from one definition (AttentionBase,
// TensorAttentionBase), and each gives the layer's result bit for bit.
template <typename Scalar>
Matrix<Scalar> tensor_rows(const Tensor3<Scalar>& t) {
  return Eigen::Map<const Matrix<Scalar>>(t.data(), t.dimension(0) * t.dimension(1), t.dimension(2));
}

// Positions a form's cache of B sequences holds (a single head's make_cache(B) is one KVCache per sequence).
template <typename Cache>
Index positions(const Cache& cache) {
  return cache.size();
}
template <typename Scalar>
Index positions(const std::vector<head_attention::KVCache<Scalar>>& caches) {
  return caches.front().size();
}

template <typename Form, typename Scalar>
void check_inference_form(const Form& form, const Matrix<Scalar>& x, const Tensor3<Scalar>& tx,
                          const std::vector<Index>& lengths, const Matrix<Scalar>& want_one,
                          const Matrix<Scalar>& want_batch, const Matrix<Scalar>& want_padded,
                          const Matrix<Scalar>& want_steps, const Matrix<Scalar>& want_prefill) {
  const Index B = tx.dimension(0), T = tx.dimension(1), width = want_one.cols();
  head_attention::Workspace<Scalar> workspace;
  CHECK(identical(form.forward(x.topRows(T)), want_one));
  Matrix<Scalar> out(T, width);
  form.forward_into(x.topRows(T), out);
  CHECK(identical(out, want_one));
  out.setZero();
  form.forward_into(x.topRows(T), out, workspace);  // one sequence with a workspace: new in 0.x
  CHECK(identical(out, want_one));
  Matrix<Scalar> rows(B * T, width);
  form.forward_into(x, rows, Batch(B));
  CHECK(identical(rows, want_batch));
  rows.setZero();
  form.forward_into(x, rows, workspace, Batch(B, lengths));
  CHECK(identical(rows, want_padded));
  CHECK(identical(tensor_rows<Scalar>(form.forward(tx)), want_batch));
  CHECK(identical(tensor_rows<Scalar>(form.forward(tx, lengths)), want_padded));
  // Decoding: matrix and tensor, into and not, with and without a workspace, all equal to the forward.
  auto cache = form.make_cache(B);
  form.reserve_cached_workspace(workspace, cache, 1);
  Matrix<Scalar> steps(B * T, width);
  for (Index t = 0; t < T; ++t) {
    Matrix<Scalar> step_x(B, x.cols());  // [B·1, emb] each sequence's row t
    for (Index b = 0; b < B; ++b)
      step_x.row(b) = x.row(b * T + t);
    Matrix<Scalar> step(B, width);
    switch (t % 4) {
      case 0:
        step = form.forward_cached(step_x, cache);
        break;
      case 1:
        form.forward_cached_into(step_x, cache, step);
        break;
      case 2:
        form.forward_cached_into(step_x, cache, step, workspace);
        break;
      default: {
        Tensor3<Scalar> step_t(B, 1, x.cols());
        Eigen::Map<Matrix<Scalar>>(step_t.data(), B, x.cols()) = step_x;
        step = tensor_rows<Scalar>(form.forward_cached(step_t, cache));
      }
    }
    for (Index b = 0; b < B; ++b)
      steps.row(b * T + t) = step.row(b);
  }
  CHECK(positions(cache) == T);
  CHECK(relative_error(steps, want_batch) < rounding_tolerance<Scalar>());  // steps sum in another order
  CHECK(identical(steps, want_steps));  // and the layer's steps bit for bit
  // One sequence's cache, by precision alone, as every form's make_cache(storage).
  auto one = form.make_cache(head_attention::precision_of<Scalar>());
  const Matrix<Scalar> prefill = form.forward_cached(x.topRows(T), one);
  CHECK(close_to_forward(prefill, want_one));
  CHECK(identical(prefill, want_prefill));
  form.reserve_workspace(workspace, B, T);
  CHECK(form.workspace_bytes(B, T) > 0);
}

TEMPLATE_TEST_CASE("every form has every inference entry point, bit for bit the layer's", "[api][forms]",
                   float, double) {
  using Scalar = TestType;
  constexpr Index B = 2, T = 6, emb = 8, head = 4, heads = 2, max = 12;
  const Tensor3<Scalar> tx = random_tensor<Scalar>(B, T, emb, 241);
  const Matrix<Scalar> x = tensor_rows<Scalar>(tx);
  const std::vector<Index> lengths{4, 6};
  {
    const head_attention::HeadAttention<Scalar> layer(emb, head, max, 242);
    Matrix<Scalar> batch(B * T, head), padded(B * T, head);
    layer.forward_into(x, batch, Batch(B));
    layer.forward_into(x, padded, Batch(B, lengths));
    const Matrix<Scalar> one = layer.forward(x.topRows(T));
    const Matrix<Scalar> steps = decode_steps(layer, x, B, T),
                         prefill = cached_prefill(layer, Matrix<Scalar>(x.topRows(T)));
    SECTION("BatchedHeadAttention") {
      check_inference_form(head_attention::BatchedHeadAttention<Scalar>(layer), x, tx, lengths, one, batch,
                           padded, steps, prefill);
    }
    SECTION("PackedHeadAttention") {
      check_inference_form(head_attention::PackedHeadAttention<Scalar>(layer), x, tx, lengths, one, batch,
                           padded, steps, prefill);
    }
    SECTION("HeadAttention: the matrix entry points, and the caches of B sequences") {
      CHECK(identical(layer.forward(x.topRows(T)), one));
      Matrix<Scalar> out(T, head);
      head_attention::Workspace<Scalar> workspace;
      layer.forward_into(x.topRows(T), out, workspace);
      CHECK(identical(out, one));
      std::vector<head_attention::KVCache<Scalar>> caches = layer.make_cache(B);
      CHECK(caches.size() == static_cast<std::size_t>(B));
      Matrix<Scalar> first(B, head);
      Matrix<Scalar> step_x(B, emb);
      step_x << x.row(0), x.row(T);
      first = layer.forward_cached(step_x, caches);
      CHECK(close_to_forward(first.row(0), batch.row(0)));
      CHECK(close_to_forward(first.row(1), batch.row(T)));
      CHECK(identical(first.row(0), steps.row(0)));
      CHECK(identical(first.row(1), steps.row(T)));
    }
  }
  {
    const head_attention::MultiHeadAttention<Scalar> layer(heads, emb, head, max, 0.0, 243);
    Matrix<Scalar> batch(B * T, emb), padded(B * T, emb);
    layer.forward_into(x, batch, Batch(B));
    layer.forward_into(x, padded, Batch(B, lengths));
    const Matrix<Scalar> one = layer.forward(x.topRows(T));
    const Matrix<Scalar> steps = decode_steps(layer, x, B, T),
                         prefill = cached_prefill(layer, Matrix<Scalar>(x.topRows(T)));
    SECTION("MultiHeadAttention") {
      check_inference_form(layer, x, tx, lengths, one, batch, padded, steps, prefill);
    }
    SECTION("PackedMultiHeadAttention") {
      check_inference_form(head_attention::PackedMultiHeadAttention<Scalar>(layer), x, tx, lengths, one,
                           batch, padded, steps, prefill);
    }
  }
}

TEMPLATE_TEST_CASE("the training entry points in matrix and tensor form agree", "[api][forms][backward]",
                   float, double) {
  using Scalar = TestType;
  constexpr Index B = 2, T = 5, emb = 6, head = 3, heads = 2, max = 8;
  const Tensor3<Scalar> tx = random_tensor<Scalar>(B, T, emb, 251);
  const Matrix<Scalar> x = tensor_rows<Scalar>(tx);
  const std::vector<Index> lengths{3, 5};
  SECTION("HeadAttention and BatchedHeadAttention") {
    const head_attention::HeadAttention<Scalar> layer(emb, head, max, 252);
    const head_attention::BatchedHeadAttention<Scalar> batched(layer);
    const Tensor3<Scalar> tg = random_tensor<Scalar>(B, T, head, 253);
    const Matrix<Scalar> g = tensor_rows<Scalar>(tg);
    const auto state = layer.forward_training(x, Batch(B, lengths));
    const auto tstate = batched.forward_training(tx, lengths);
    CHECK(identical(state.output, tstate.output));
    CHECK(identical(state.lse, tstate.lse));
    const typename head_attention::HeadAttention<Scalar>::GradientsType m =
        layer.backward(x, g, state, Batch(B, lengths));
    const typename head_attention::BatchedHeadAttention<Scalar>::TensorGradientsType t =
        batched.backward(tx, tg, tstate, lengths);
    CHECK(identical(m.input, tensor_rows<Scalar>(t.input)));
    CHECK(identical(m.query.weight, t.query.weight));
    // The batched form's matrix entry points are its layer's.
    CHECK(identical(batched.backward(x, g, Batch(B)).input, layer.backward(x, g, Batch(B)).input));
  }
  SECTION("MultiHeadAttention: tensor forward_training, backward, backward_training") {
    const head_attention::MultiHeadAttention<Scalar> layer(heads, emb, head, max, 0.25, 254);
    const Tensor3<Scalar> tg = random_tensor<Scalar>(B, T, emb, 255);
    const Matrix<Scalar> g = tensor_rows<Scalar>(tg);
    head_attention::TrainingState<Scalar> state, tstate;
    const Matrix<Scalar> y = layer.forward_training(x, 7, state, Batch(B, lengths));
    CHECK(identical(tensor_rows<Scalar>(layer.forward_training(tx, 7, tstate, lengths)), y));
    CHECK(identical(tensor_rows<Scalar>(layer.forward_training(tx, 7, lengths)), y));
    CHECK(identical(state.output, tstate.output));
    const auto m = layer.backward_training(x, g, 7, state, Batch(B, lengths));
    const auto t = layer.backward_training(tx, tg, 7, tstate, lengths);
    CHECK(identical(m.input, tensor_rows<Scalar>(t.input)));
    CHECK(identical(m.projection.weight, t.projection.weight));
    CHECK(identical(layer.backward_training(x, g, 7, Batch(B)).input,
                    tensor_rows<Scalar>(layer.backward_training(tx, tg, 7).input)));
    CHECK(identical(layer.backward(x, g, Batch(B, lengths)).input,
                    tensor_rows<Scalar>(layer.backward(tx, tg, lengths).input)));
  }
}

TEST_CASE("Batch and Padding: the batch layout of a matrix call", "[api][forms]") {
  const std::vector<Index> lengths{3, 4};
  CHECK(Batch().sequences() == 1);
  CHECK(Batch().lengths() == nullptr);
  CHECK(Batch(3).sequences() == 3);
  CHECK(Batch(2, lengths).lengths() == &lengths);
  CHECK(Padding().lengths() == nullptr);
  // An integer is never a Batch by itself (it would be a seed, a count or a size elsewhere).
  static_assert(!std::is_convertible<Index, Batch>::value, "");
  static_assert(!std::is_convertible<int, Batch>::value, "");
  static_assert(std::is_convertible<const std::vector<Index>&, Padding>::value, "");
}

}  // namespace

TEST_CASE("version macros follow the CMake project version", "[api]") {
  CHECK(HEAD_ATTENTION_VERSION_MAJOR == HEAD_ATTENTION_TEST_VERSION_MAJOR);
  CHECK(HEAD_ATTENTION_VERSION_MINOR == HEAD_ATTENTION_TEST_VERSION_MINOR);
  CHECK(HEAD_ATTENTION_VERSION_PATCH == HEAD_ATTENTION_TEST_VERSION_PATCH);
}

TEST_CASE("shape_error is an std::invalid_argument", "[api]") {
  static_assert(std::is_base_of<std::invalid_argument, head_attention::shape_error>::value, "");
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
  layer.forward_into(both, out2, Batch(2));
  CHECK(relative_error(out2.topRows(T), expected) <= rounding_tolerance<Scalar>());
  CHECK(relative_error(out2.bottomRows(T), layer.forward(x2)) <= rounding_tolerance<Scalar>());

  // Empty.
  Matrix<Scalar> none(0, head);
  layer.forward_into(Matrix<Scalar>(0, emb), none, Batch(0));
  layer.forward_into(Matrix<Scalar>(0, emb), none, Batch(4));
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

// ---------------------------------------------------------------------------------------------------------
// The packed (frozen) inference forms: the same kernels on weights prepared once, so the same bits.

TEMPLATE_TEST_CASE("PackedHeadAttention gives the layer's forward bit for bit", "[api][packed]", float,
                   double) {
  using Scalar = TestType;
  struct Case {
    Index emb, head, B, T;
  };
  // The seed's shape, a head whose 1/sqrt is not a power of two, odd sizes, and several query blocks.
  for (const Case c : {Case{512, 64, 2, 10}, Case{24, 6, 3, 7}, Case{13, 7, 1, 1}, Case{40, 16, 2, 150}}) {
    for (const head_attention::MaskRule& rule :
         {head_attention::MaskRule::causal(), head_attention::MaskRule::bidirectional(),
          head_attention::MaskRule::sliding_window(3)}) {
      for (const int threads : {1, 2}) {
        INFO("emb " << c.emb << ", head " << c.head << ", B " << c.B << ", T " << c.T << ", rule "
                    << rule.name() << ", threads " << threads);
        head_attention::HeadAttention<Scalar> layer(c.emb, c.head, c.T, 5, rule);
        layer.set_num_threads(threads);
        const head_attention::PackedHeadAttention<Scalar> packed(layer);
        CHECK(packed.emb_size() == c.emb);
        CHECK(packed.head_size() == c.head);
        CHECK(packed.max_seq_len() == c.T);
        CHECK(packed.mask_rule() == rule);
        CHECK(packed.num_threads() == layer.num_threads());
        const Matrix<Scalar> x = random_matrix<Scalar>(c.B * c.T, c.emb, 6);
        const Matrix<Scalar> one = x.topRows(c.T);

        // One sequence: plain, column-major, an expression, a strided block.
        CHECK(identical(packed.forward(one), layer.forward(one)));
        CHECK(identical(packed.forward(ColMatrix<Scalar>(one)), layer.forward(ColMatrix<Scalar>(one))));
        CHECK(identical(packed.forward(one * Scalar(2)), layer.forward(one * Scalar(2))));
        CHECK(identical(packed.forward(x.topRows(c.T).leftCols(c.emb)), layer.forward(one)));

        // A batch: into caller storage, with a workspace (twice: the second call reuses it), with padding.
        Matrix<Scalar> expected(c.B * c.T, c.head), out(c.B * c.T, c.head);
        layer.forward_into(x, expected, Batch(c.B));
        packed.forward_into(x, out, Batch(c.B));
        CHECK(identical(out, expected));
        head_attention::Workspace<Scalar> workspace;
        for (int call = 0; call < 2; ++call) {
          out.setZero();
          packed.forward_into(x, out, workspace, Batch(c.B));
          CHECK(identical(out, expected));
        }
        std::vector<Index> lengths(static_cast<std::size_t>(c.B), c.T);
        lengths.back() = c.T / 2;
        layer.forward_into(x, expected, Batch(c.B, lengths));
        packed.forward_into(x, out, Batch(c.B, lengths));
        CHECK(identical(out, expected));

        // The seed's [B, T, emb] tensors, as BatchedHeadAttention takes them.
        const Tensor3<Scalar> xt = random_tensor<Scalar>(c.B, c.T, c.emb, 7);
        const head_attention::BatchedHeadAttention<Scalar> batched(layer);
        const Tensor3<Scalar> got = packed.forward(xt), want = batched.forward(xt);
        const Tensor3<Scalar> got_padded = packed.forward(xt, lengths),
                              want_padded = batched.forward(xt, lengths);
        for (Index b = 0; b < c.B; ++b) {
          CHECK(identical(sequence(got, b), sequence(want, b)));
          CHECK(identical(sequence(got_padded, b), sequence(want_padded, b)));
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("PackedMultiHeadAttention gives the layer's forward bit for bit", "[api][packed]", float,
                   double) {
  using Scalar = TestType;
  constexpr Index heads = 3, emb = 48, head = 16, B = 2, T = 70;
  for (const int threads : {1, 2}) {
    INFO("threads " << threads);
    head_attention::MultiHeadAttention<Scalar> layer(heads, emb, head, T, 0.1, 8);
    layer.set_num_threads(threads);
    const head_attention::PackedMultiHeadAttention<Scalar> packed(layer);
    CHECK(packed.num_heads() == heads);
    CHECK(packed.emb_size() == emb);
    CHECK(packed.head_size() == head);
    CHECK(packed.max_seq_len() == T);
    CHECK(packed.mask_rule() == layer.mask_rule());
    const Matrix<Scalar> x = random_matrix<Scalar>(B * T, emb, 9);
    const Matrix<Scalar> one = x.topRows(T);
    CHECK(identical(packed.forward(one), layer.forward(one)));
    CHECK(identical(packed.forward(ColMatrix<Scalar>(one)), layer.forward(ColMatrix<Scalar>(one))));

    Matrix<Scalar> expected(B * T, emb), out(B * T, emb);
    layer.forward_into(x, expected, Batch(B));
    packed.forward_into(x, out, Batch(B));
    CHECK(identical(out, expected));
    head_attention::Workspace<Scalar> workspace;
    for (int call = 0; call < 2; ++call) {
      out.setZero();
      packed.forward_into(x, out, workspace, Batch(B));
      CHECK(identical(out, expected));
    }
    const std::vector<Index> lengths = {T, 5};
    layer.forward_into(x, expected, Batch(B, lengths));
    packed.forward_into(x, out, workspace, Batch(B, lengths));
    CHECK(identical(out, expected));

    const Tensor3<Scalar> xt = random_tensor<Scalar>(B, T, emb, 10);
    const Tensor3<Scalar> got = packed.forward(xt), want = layer.forward(xt);
    const Tensor3<Scalar> got_padded = packed.forward(xt, lengths), want_padded = layer.forward(xt, lengths);
    for (Index b = 0; b < B; ++b) {
      CHECK(identical(sequence(got, b), sequence(want, b)));
      CHECK(identical(sequence(got_padded, b), sequence(want_padded, b)));
    }
  }
}

TEMPLATE_TEST_CASE("16-bit packed layers give the layer's forward bit for bit", "[api][packed]", Eigen::half,
                   Eigen::bfloat16) {
  using Scalar = TestType;
  constexpr Index emb = 32, head = 8, T = 20;
  const Matrix<Scalar> x = random_matrix<float>(T, emb, 11).template cast<Scalar>();
  const head_attention::HeadAttention<Scalar> layer(emb, head, T, 12);
  const Matrix<float> got =
      head_attention::PackedHeadAttention<Scalar>(layer).forward(x).template cast<float>();
  CHECK(identical(got, layer.forward(x).template cast<float>()));
  const head_attention::MultiHeadAttention<Scalar> multi(2, emb, head, T, 0.1, 13);
  const Matrix<float> got_multi =
      head_attention::PackedMultiHeadAttention<Scalar>(multi).forward(x).template cast<float>();
  CHECK(identical(got_multi, multi.forward(x).template cast<float>()));
}

TEMPLATE_TEST_CASE("a packed layer does not see later changes to its layer", "[api][packed]", float, double) {
  using Scalar = TestType;
  constexpr Index emb = 12, head = 4, T = 9;
  const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 14);
  head_attention::HeadAttention<Scalar> layer(emb, head, T, 15);
  const head_attention::HeadAttention<Scalar> original = layer;
  const head_attention::PackedHeadAttention<Scalar> packed(layer);
  const Matrix<Scalar> before = packed.forward(x);
  CHECK(identical(before, original.forward(x)));
  // New weights, another rule, and finally weights of the wrong shape (the layer would refuse to run).
  layer.query().weight.setConstant(Scalar(0.5));
  layer.value().bias.setConstant(Scalar(-3));
  CHECK(!identical(layer.forward(x), before));
  CHECK(identical(packed.forward(x), before));
  layer.set_mask_rule(head_attention::MaskRule::bidirectional());
  CHECK(identical(packed.forward(x), before));
  CHECK(packed.mask_rule() == head_attention::MaskRule::causal());
  layer.key().weight.resize(head + 1, emb);
  CHECK_THROWS_AS(layer.forward(x), head_attention::shape_error);
  CHECK(identical(packed.forward(x), before));
  // Packing again takes the changes (and checks them).
  check_shape_error([&] { head_attention::PackedHeadAttention<Scalar>{layer}; },
                    {"PackedHeadAttention", "key().weight shape", "[4, 12]", "[5, 12]"});

  head_attention::MultiHeadAttention<Scalar> multi(2, emb, head, T, 0.1, 16);
  const head_attention::MultiHeadAttention<Scalar> multi_original = multi;
  const head_attention::PackedMultiHeadAttention<Scalar> packed_multi(multi);
  const Matrix<Scalar> multi_before = packed_multi.forward(x);
  CHECK(identical(multi_before, multi_original.forward(x)));
  multi.head(1).value().weight.setConstant(Scalar(2));
  multi.projection().bias.setConstant(Scalar(1));
  multi.set_mask_rule(head_attention::MaskRule::sliding_window(2));
  CHECK(!identical(multi.forward(x), multi_before));
  CHECK(identical(packed_multi.forward(x), multi_before));
  multi.projection().weight.resize(emb, 2 * head + 1);
  CHECK(identical(packed_multi.forward(x), multi_before));
  check_shape_error([&] { head_attention::PackedMultiHeadAttention<Scalar>{multi}; },
                    {"PackedMultiHeadAttention", "projection().weight shape"});
  multi.projection() = multi_original.projection();
  multi.head(0).set_mask_rule(head_attention::MaskRule::causal());
  check_shape_error([&] { head_attention::PackedMultiHeadAttention<Scalar>{multi}; },
                    {"PackedMultiHeadAttention", "head 1's mask rule"});
}

TEMPLATE_TEST_CASE("packed layers refuse bad input as the layers do, out untouched", "[api][packed]", float,
                   double) {
  using Scalar = TestType;
  constexpr Index emb = 10, head = 3, T = 6;
  const head_attention::PackedHeadAttention<Scalar> packed(
      head_attention::HeadAttention<Scalar>(emb, head, T, 17));
  const head_attention::PackedMultiHeadAttention<Scalar> multi(
      head_attention::MultiHeadAttention<Scalar>(2, emb, head, T, 0.1, 18));
  const Matrix<Scalar> x = random_matrix<Scalar>(2 * T, emb, 19);
  Matrix<Scalar> out = Matrix<Scalar>::Constant(2 * T, head, Scalar(7));
  Matrix<Scalar> multi_out = Matrix<Scalar>::Constant(2 * T, emb, Scalar(7));
  const auto untouched = [&] {
    CHECK((out.array() == Scalar(7)).all());
    CHECK((multi_out.array() == Scalar(7)).all());
  };

  check_shape_error([&] { packed.forward(Matrix<Scalar>(T, emb + 1)); },
                    {"PackedHeadAttention::forward", "x.cols() (input width)", "emb_size = 10", "11"});
  check_shape_error([&] { packed.forward(Matrix<Scalar>(T + 1, emb)); },
                    {"PackedHeadAttention::forward", "x.rows() (T)", "<= max_seq_len = 6", "7"});
  check_shape_error([&] { packed.forward(random_tensor<Scalar>(1, T + 1, emb, 20)); },
                    {"PackedHeadAttention::forward", "x.dimension(1) (T)", "<= max_seq_len = 6", "7"});
  check_shape_error([&] { packed.forward_into(x, out, Batch(5)); },
                    {"PackedHeadAttention::forward_into", "x.rows()", "a multiple of batch = 5", "12"});
  check_shape_error([&] { packed.forward_into(x, out, Batch(-1)); },
                    {"PackedHeadAttention::forward_into", "batch"});
  check_shape_error([&] { packed.forward_into(x, out); },
                    {"PackedHeadAttention::forward_into", "x.rows() (T)", "<= max_seq_len = 6", "12"});
  check_shape_error([&] { packed.forward_into(x, out.topRows(T), Batch(2)); },
                    {"PackedHeadAttention::forward_into", "out shape", "[12, 3]", "[6, 3]"});
  check_shape_error(
      [&] {
        packed.forward_into(x, out, Batch(2, std::vector<Index>{T, T + 1}));
      },
      {"PackedHeadAttention::forward_into", "lengths[1]", "in [0, T = 6]", "7"});
  check_shape_error([&] { packed.forward_into(x, out, Batch(2, std::vector<Index>{T})); },
                    {"PackedHeadAttention::forward_into", "lengths.size()", "batch = 2", "1"});
  head_attention::Workspace<Scalar> workspace;
  check_shape_error([&] { packed.forward_into(x.leftCols(emb - 1), out, workspace, Batch(2)); },
                    {"PackedHeadAttention::forward_into", "x.cols() (input width)"});

  check_shape_error([&] { multi.forward(Matrix<Scalar>(T, emb - 1)); },
                    {"PackedMultiHeadAttention::forward", "x.cols() (input width)", "emb_size = 10", "9"});
  check_shape_error([&] { multi.forward_into(x, multi_out); },
                    {"PackedMultiHeadAttention::forward_into", "x.rows() (T)", "<= max_seq_len = 6"});
  check_shape_error([&] { multi.forward_into(x, multi_out.leftCols(head), Batch(2)); },
                    {"PackedMultiHeadAttention::forward_into", "out shape", "[12, 10]", "[12, 3]"});
  const std::vector<Index> bad_lengths = {T, -1};
  check_shape_error([&] { multi.forward_into(x, multi_out, workspace, Batch(2, bad_lengths)); },
                    {"PackedMultiHeadAttention::forward_into", "lengths[1]"});
  check_shape_error([&] { multi.forward(random_tensor<Scalar>(2, T, emb + 2, 21)); },
                    {"PackedMultiHeadAttention::forward", "x.dimension(2) (input width)", "12"});
  untouched();

  head_attention::PackedHeadAttention<Scalar> settable(head_attention::HeadAttention<Scalar>(emb, head, T));
  check_shape_error([&] { settable.set_num_threads(-1); }, {"PackedHeadAttention::set_num_threads"});
}

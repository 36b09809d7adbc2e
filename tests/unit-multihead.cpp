// MultiHeadAttention against its definition (every head by the reference path, concatenated, projected in
// double precision), seeded initialisation, the batched, padded, masked and cached forms, and its errors.
// (PyTorch parity of the multi-head layer: unit-safetensors.cpp, from PyTorch's own weights and outputs.)
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;
using head_attention::MaskRule;

/// The layer's definition, in double: each head by reference::forward, side by side, then x Woᵀ + bo.
template <typename Scalar>
Eigen::MatrixXd definition(const head_attention::MultiHeadAttention<Scalar>& mha, const Matrix<Scalar>& x,
                           const MaskRule& rule, Index valid = -1) {
  const Matrix<double> xd = x.template cast<double>();
  Matrix<double> concat(x.rows(), mha.num_heads() * mha.head_size());
  for (Index h = 0; h < mha.num_heads(); ++h) {
    const auto cast = [](const head_attention::Linear<Scalar>& l) {
      head_attention::Linear<double> d;
      d.weight = l.weight.template cast<double>();
      d.bias = l.bias.template cast<double>();
      return d;
    };
    const auto& head = mha.head(h);
    concat.middleCols(h * mha.head_size(), mha.head_size()) = head_attention::reference::forward(
        xd, cast(head.query()), cast(head.key()), cast(head.value()), rule, valid);
  }
  const Matrix<double> w = mha.projection().weight.template cast<double>();
  const Eigen::VectorXd b = mha.projection().bias.template cast<double>();
  return (concat * w.transpose()).rowwise() + b.transpose();
}

template <typename Scalar>
double error_vs(const Matrix<Scalar>& got, const Eigen::MatrixXd& want) {
  return relative_error(Matrix<double>(got.template cast<double>()), Matrix<double>(want));
}

}  // namespace

TEMPLATE_TEST_CASE("MultiHeadAttention equals its definition", "[multihead]", float, double) {
  using Scalar = TestType;
  struct Case {
    Index heads, emb, head, T;
  };
  for (const Case& c : {Case{1, 8, 4, 5}, Case{3, 16, 8, 70}, Case{4, 12, 5, 300}, Case{8, 32, 4, 129}}) {
    for (const MaskRule& rule :
         {MaskRule::causal(), MaskRule::bidirectional(), MaskRule::sliding_window(30)}) {
      head_attention::MultiHeadAttention<Scalar> mha(c.heads, c.emb, c.head, c.T, 0.1, 2200, rule);
      const Matrix<Scalar> x = random_matrix<Scalar>(c.T, c.emb, 2201);
      const Matrix<Scalar> out = mha.forward(x);
      REQUIRE(out.rows() == c.T);
      REQUIRE(out.cols() == c.emb);
      INFO("heads " << c.heads << ", emb " << c.emb << ", head " << c.head << ", T " << c.T << ", rule "
                    << rule.name());
      CHECK(error_vs(out, definition(mha, x, rule)) <= rounding_tolerance<Scalar>());

      // The same as separate HeadAttention calls and one projection.
      Matrix<Scalar> concat(c.T, c.heads * c.head);
      for (Index h = 0; h < c.heads; ++h)
        mha.head(h).forward_into(x, concat.middleCols(h * c.head, c.head));
      const Matrix<Scalar> separate =
          (concat * mha.projection().weight.transpose()).rowwise() + mha.projection().bias.transpose();
      CHECK(relative_error(out, separate) <= rounding_tolerance<Scalar>());
    }
  }
}

TEMPLATE_TEST_CASE("MultiHeadAttention: seeded init draws the heads, then the projection", "[multihead]",
                   float, double) {
  using Scalar = TestType;
  const head_attention::MultiHeadAttention<Scalar> mha(3, 10, 4, 16, 0.1, 77);
  CHECK(mha.num_heads() == 3);
  CHECK(mha.emb_size() == 10);
  CHECK(mha.head_size() == 4);
  CHECK(mha.max_seq_len() == 16);
  CHECK(mha.projection().weight.rows() == 10);
  CHECK(mha.projection().weight.cols() == 12);
  CHECK(mha.projection().bias.size() == 10);
  // Head 0 comes first from the stream: it is the head a HeadAttention with the same seed draws.
  const head_attention::HeadAttention<Scalar> alone(10, 4, 16, 77);
  CHECK(identical(mha.head(0).query().weight, alone.query().weight));
  CHECK(identical(mha.head(0).value().bias, alone.value().bias));
  CHECK_FALSE(identical(mha.head(1).query().weight, alone.query().weight));
  // nn.Linear's bounds: 1/sqrt(emb) for the heads, 1/sqrt(heads · head) for the projection.
  for (Index h = 0; h < 3; ++h)
    CHECK(mha.head(h).key().weight.cwiseAbs().maxCoeff() <= Scalar(1 / std::sqrt(10.0)));
  CHECK(mha.projection().weight.cwiseAbs().maxCoeff() <= Scalar(1 / std::sqrt(12.0)));
  CHECK(mha.projection().weight.cwiseAbs().maxCoeff() > Scalar(0.5 / std::sqrt(12.0)));
  const head_attention::MultiHeadAttention<Scalar> again(3, 10, 4, 16, 0.1, 77);
  CHECK(identical(again.projection().weight, mha.projection().weight));
}

TEMPLATE_TEST_CASE("MultiHeadAttention takes simple_llm's arguments in simple_llm's order", "[multihead]",
                   float, double) {
  using Scalar = TestType;
  // MultiHeadAttention(num_heads, emb_size, head_size, max_seq_len, dropout=0.1): dropout fifth, as
  // simple_llm.
  CHECK(head_attention::MultiHeadAttention<Scalar>(2, 8, 4, 16).dropout() == 0.1);
  CHECK(head_attention::MultiHeadAttention<Scalar>(2, 8, 4, 16, 0.5).dropout() == 0.5);
  CHECK(head_attention::MultiHeadAttention<Scalar>(2, 8, 4, 16, 0.0f).dropout() == 0.0);
  // The seed follows it, and only the seed decides the weights.
  const head_attention::MultiHeadAttention<Scalar> a(2, 8, 4, 16, 0.5, 123), b(2, 8, 4, 16, 0.2, 123),
      c(2, 8, 4, 16, 0.5, 124);
  CHECK(identical(a.projection().weight, b.projection().weight));
  CHECK(identical(a.head(1).key().weight, b.head(1).key().weight));
  CHECK_FALSE(identical(a.projection().weight, c.projection().weight));
  CHECK(identical(head_attention::MultiHeadAttention<Scalar>(2, 8, 4, 16).projection().weight,
                  head_attention::MultiHeadAttention<Scalar>(2, 8, 4, 16, 0.1, 0).projection().weight));
  // The dropout the constructor took is the one training applies: a mask at p = 0.5 zeroes about half the
  // outputs and doubles the rest.
  const Matrix<Scalar> x = random_matrix<Scalar>(12, 8, 2600);
  const Matrix<Scalar> plain = a.forward(x);
  const Matrix<Scalar> trained = a.forward_training(x, 5);
  Index zeros = 0;
  for (Index i = 0; i < plain.rows(); ++i)
    for (Index j = 0; j < plain.cols(); ++j) {
      if (trained(i, j) == Scalar(0)) {
        ++zeros;
      } else {
        CHECK(std::abs(double(trained(i, j)) - 2 * double(plain(i, j))) <=
              1e-6 * std::abs(double(plain(i, j))));
      }
    }
  CHECK(zeros > 24);  // of 96 entries, at p = 0.5: 48 expected, fewer than 25 has probability < 1e-5
  CHECK(zeros < 72);
  // Out of range: refused before anything is built.
  check_shape_error([] { head_attention::MultiHeadAttention<Scalar>(2, 8, 4, 16, 1.0); },
                    {"MultiHeadAttention", "dropout", "in [0, 1)", "got 1"});
  check_shape_error([] { head_attention::MultiHeadAttention<Scalar>(2, 8, 4, 16, -0.1); },
                    {"MultiHeadAttention", "dropout", "in [0, 1)", "got -0.1"});
  check_shape_error([] { head_attention::MultiHeadAttention<Scalar>(2, 8, 4, 16, std::nan("")); },
                    {"MultiHeadAttention", "dropout", "in [0, 1)"});
}

TEMPLATE_TEST_CASE("MultiHeadAttention: batches, padding and threads", "[multihead]", float, double) {
  using Scalar = TestType;
  constexpr Index B = 3, T = 140, emb = 16, head = 8, heads = 4;
  head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 0.1, 2300);
  const Tensor3<Scalar> x = random_tensor<Scalar>(B, T, emb, 2301);
  const Tensor3<Scalar> out = mha.forward(x);
  REQUIRE(out.dimension(2) == emb);
  for (Index b = 0; b < B; ++b)
    CHECK(relative_error(sequence(out, b), mha.forward(sequence(x, b))) <= rounding_tolerance<Scalar>());
  const std::vector<Index> lengths = {T, 1, 77};
  const Tensor3<Scalar> padded = mha.forward(x, lengths);
  for (Index b = 0; b < B; ++b)
    CHECK(error_vs(sequence(padded, b), definition(mha, sequence(x, b), MaskRule::causal(),
                                                   lengths[static_cast<std::size_t>(b)])) <=
          rounding_tolerance<Scalar>());
  // The thread count changes nothing, and a large call does use the threads set.
  mha.set_num_threads(1);
  const Tensor3<Scalar> serial = mha.forward(x);
  CHECK(head_attention::detail::last_team_size() == 1);
  mha.set_num_threads(2);
  const Tensor3<Scalar> parallel = mha.forward(x);
  if (head_attention::detail::has_openmp) CHECK(head_attention::detail::last_team_size() == 2);
  CHECK(max_abs_diff(serial.data(), parallel.data(), serial.size()) == 0);
}

TEMPLATE_TEST_CASE("MultiHeadAttention: decoding with a cache equals the forward", "[multihead][cache]",
                   float, double) {
  using Scalar = TestType;
  constexpr Index T = 90, emb = 12, head = 4, heads = 3;
  for (const MaskRule& rule : {MaskRule::causal(), MaskRule::sliding_window(7)}) {
    head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 0.1, 2400, rule);
    const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 2401);
    const Matrix<Scalar> full = mha.forward(x);
    auto cache = mha.make_cache();
    Matrix<Scalar> pieces(T, emb);
    Index at = 0;
    for (const Index s : {Index(30), Index(1), Index(1), Index(20), Index(38)}) {
      pieces.middleRows(at, s) = mha.forward_cached(x.middleRows(at, s), cache);
      at += s;
    }
    CHECK(cache.size() == T);
    INFO("rule " << rule.name());
    CHECK(relative_error(pieces, full) <= (std::is_same<Scalar, float>::value ? 1e-5 : 1e-12));

    // Two sequences at once.
    const Tensor3<Scalar> xb = random_tensor<Scalar>(2, T, emb, 2402);
    const Tensor3<Scalar> fullb = mha.forward(xb);
    auto bcache = mha.make_cache(2);
    Tensor3<Scalar> piecesb(2, T, emb);
    for (Index i = 0; i < T; i += 30) {
      const Eigen::array<Index, 3> offsets = {0, i, 0}, extents = {2, 30, emb};
      piecesb.slice(offsets, extents) =
          mha.forward_cached(Tensor3<Scalar>(xb.slice(offsets, extents)), bcache);
    }
    CHECK(relative_error(piecesb.data(), fullb.data(), fullb.size()) <=
          (std::is_same<Scalar, float>::value ? 1e-5 : 1e-12));
  }
}

TEMPLATE_TEST_CASE("MultiHeadAttention: bad input is refused, the layer unchanged",
                   "[multihead][errors][bad-input]", float, double) {
  using Scalar = TestType;
  check_shape_error([] { head_attention::MultiHeadAttention<Scalar>(0, 8, 4, 16); },
                    {"MultiHeadAttention", "num_heads", "> 0", "got 0"});
  check_shape_error([] { head_attention::MultiHeadAttention<Scalar>(2, 8, -1, 16); },
                    {"HeadAttention", "head_size", "> 0", "got -1"});
  // Sizes are checked before room for the heads is reserved: the bad size is named, whatever num_heads is.
  const Index many = Index(1) << 58;
  check_shape_error([&] { head_attention::MultiHeadAttention<Scalar>(many, 1, 1, 1); },
                    {"MultiHeadAttention", "num_heads * sizeof(HeadAttention)", "at most"});
  check_shape_error([&] { head_attention::MultiHeadAttention<Scalar>(many, 0, 4, 16); },
                    {"MultiHeadAttention", "emb_size", "> 0", "got 0"});
  check_shape_error([&] { head_attention::MultiHeadAttention<Scalar>(many, 8, -1, 16); },
                    {"MultiHeadAttention", "head_size", "> 0", "got -1"});
  check_shape_error([&] { head_attention::MultiHeadAttention<Scalar>(Index(1) << 40, 8, 4, 0); },
                    {"MultiHeadAttention", "max_seq_len", "> 0", "got 0"});
  head_attention::MultiHeadAttention<Scalar> mha(2, 8, 4, 16, 0.1, 2500);
  const Matrix<Scalar> x = random_matrix<Scalar>(10, 8, 2501);
  const Matrix<Scalar> before = mha.forward(x);
  check_shape_error([&] { (void)mha.head(2); },
                    {"MultiHeadAttention::head", "i", "[0, num_heads = 2)", "got 2"});
  check_shape_error([&] { (void)mha.forward(Matrix<Scalar>(17, 8)); },
                    {"MultiHeadAttention::forward", "T", "max_seq_len = 16", "got 17"});
  check_shape_error([&] { (void)mha.forward(Matrix<Scalar>(3, 9)); },
                    {"MultiHeadAttention::forward", "input width", "emb_size = 8", "got 9"});
  {
    auto copy = mha;
    copy.projection().weight = Matrix<Scalar>::Zero(8, 9);
    check_shape_error([&] { (void)copy.forward(x); },
                      {"MultiHeadAttention::forward", "projection().weight shape", "[8, 8]", "got [8, 9]"});
    copy = mha;
    copy.head(1).key().bias = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>::Zero(3);
    check_shape_error([&] { (void)copy.forward(x); }, {"(head 1)", "key().bias size", "must be 4", "got 3"});
    copy = mha;
    copy.head(1).set_mask_rule(MaskRule::bidirectional());
    check_shape_error([&] { (void)copy.forward(x); }, {"head 1's mask rule", "causal", "got bidirectional"});
  }
  Matrix<Scalar> out = Matrix<Scalar>::Constant(10, 7, Scalar(3));
  check_shape_error([&] { mha.forward_into(x, out); }, {"MultiHeadAttention::forward_into", "out shape"});
  CHECK((out.array() == Scalar(3)).all());
  auto cache = mha.make_cache();
  (void)mha.forward_cached(x, cache);
  check_shape_error(
      [&] { (void)mha.forward_cached(x, cache); },
      {"MultiHeadAttention::forward_cached", "cache.size() + t", "max_seq_len = 16", "10 + 10"});
  CHECK(cache.size() == 10);
  const head_attention::MultiHeadAttention<Scalar> other(2, 8, 5, 16);
  auto other_cache = other.make_cache();
  check_shape_error([&] { (void)mha.forward_cached(x, other_cache); },
                    {"cache sizes", "(8, 4, 16)", "(8, 5, 16)"});
  CHECK(identical(mha.forward(x), before));
}

TEMPLATE_TEST_CASE("a Workspace gives the same results and stops growing", "[multihead][workspace]", float,
                   double) {
  using Scalar = TestType;
  head_attention::MultiHeadAttention<Scalar> mha(3, 24, 8, 300, 0.1, 17);
  head_attention::HeadAttention<Scalar> head(24, 8, 300, 18);
  head_attention::Workspace<Scalar> workspace;
  CHECK(workspace.bytes() == 0);
  std::size_t grown = 0;
  // A large shape, a small one, the large one again, and padding: each equal to the call without a workspace.
  for (const Index T : {Index(300), Index(7), Index(300), Index(65)}) {
    const Index B = 2;
    const Matrix<Scalar> x = random_matrix<Scalar>(B * T, 24, 100 + static_cast<std::uint64_t>(T));
    Matrix<Scalar> with(B * T, 24), without(B * T, 24);
    mha.forward_into(x, with, workspace, Batch(B));
    mha.forward_into(x, without, Batch(B));
    CHECK(identical(with, without));
    const std::vector<Index> lengths = {T, T / 2};
    mha.forward_into(x, with, workspace, Batch(B, lengths));
    mha.forward_into(x, without, Batch(B, lengths));
    CHECK(identical(with, without));
    Matrix<Scalar> one(B * T, 8), two(B * T, 8);
    head.forward_into(x, one, workspace, Batch(B));  // another layer, the same workspace
    head.forward_into(x, two, Batch(B));
    CHECK(identical(one, two));
    if (T == 300) {
      if (grown == 0) grown = workspace.bytes();
      CHECK(workspace.bytes() == grown);  // the second large call found everything in place
    }
  }
  CHECK(grown > 0);
  workspace.release();
  CHECK(workspace.bytes() == 0);
}

TEST_CASE("a Workspace serves 16-bit layers", "[multihead][workspace]") {
  using Scalar = Eigen::half;
  head_attention::MultiHeadAttention<Scalar> mha(2, 16, 8, 80, 0.1, 3);
  head_attention::Workspace<Scalar> workspace;
  for (int call = 0; call < 2; ++call) {
    const Matrix<Scalar> x =
        random_matrix<float>(80, 16, 5 + static_cast<std::uint64_t>(call)).cast<Scalar>();
    Matrix<Scalar> with(80, 16), without(80, 16);
    mha.forward_into(x, with, workspace);
    mha.forward_into(x, without);
    CHECK(identical(with, without));
  }
}

/// One decode step of B sequences at once, on 1 and then 2 threads, by `layer` and by its packed form, each
/// sequence b being x's rows [b · (P + 1), (b + 1) · (P + 1)): its first P rows the prompt, its last the
/// step's row b. Checks that each step ran on the team asked for and that the packed form's step is the
/// layer's bit for bit; returns the layer's steps [B, out] on 1 and on 2 threads.
template <typename Layer, typename Packed, typename Scalar>
std::vector<Matrix<Scalar>> batched_steps(Layer& layer, const Packed& packed, const Matrix<Scalar>& x,
                                          Index B, Index P) {
  Matrix<Scalar> prompt(B * P, x.cols()), next(B, x.cols());
  for (Index b = 0; b < B; ++b) {
    prompt.middleRows(b * P, P) = x.middleRows(b * (P + 1), P);
    next.row(b) = x.row(b * (P + 1) + P);
  }
  std::vector<Matrix<Scalar>> steps;
  for (const int threads : {1, 2}) {
    layer.set_num_threads(threads);
    auto caches = layer.make_cache(B), packed_caches = packed.make_cache(B);
    (void)layer.forward_cached(prompt, caches);
    (void)packed.forward_cached(prompt, packed_caches);
    steps.push_back(layer.forward_cached(next, caches));
    if (head_attention::detail::has_openmp) CHECK(head_attention::detail::last_team_size() == threads);
    CHECK(identical(packed.forward_cached(next, packed_caches), steps.back()));
  }
  return steps;
}

// Many sequences decoded together (issue 25): steps of 8 rows (row dots, Tuning::rowdot_rows) and of 9 to 65
// (the GEMM path's row chunks), emb 160 (two full AVX-512 panels of the output projection and a narrower
// one). Each sequence's new row must be its definition's last row, the packed form's step the layer's bit for
// bit, and neither may depend on the thread count.
TEMPLATE_TEST_CASE("MultiHeadAttention: a step of many sequences equals the definition on any thread count",
                   "[multihead][cache][batched]", float, double) {
  using Scalar = TestType;
  constexpr Index emb = 160, head = 16, heads = 3, P = 5;
  head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, P + 1, 0.1, 2700);
  const head_attention::PackedMultiHeadAttention<Scalar> packed(mha);
  for (const Index B : {Index(8), Index(9), Index(32), Index(64), Index(65)}) {
    INFO("B " << B);
    const Matrix<Scalar> x = random_matrix<Scalar>(B * (P + 1), emb, 2701 + static_cast<std::uint64_t>(B));
    const std::vector<Matrix<Scalar>> steps = batched_steps(mha, packed, x, B, P);
    CHECK(identical(steps[0], steps[1]));
    Matrix<Scalar> want(B, emb);
    for (Index b = 0; b < B; ++b)
      want.row(b) = definition(mha, Matrix<Scalar>(x.middleRows(b * (P + 1), P + 1)), MaskRule::causal())
                        .row(P)
                        .template cast<Scalar>();
    CHECK(relative_error(steps[0], want) <= rounding_tolerance<Scalar>());
  }
}

// The same for a single head, over one cache per sequence.
TEMPLATE_TEST_CASE("HeadAttention: a step of many sequences equals the reference on any thread count",
                   "[cache][batched]", float, double) {
  using Scalar = TestType;
  constexpr Index emb = 48, head = 80, P = 4;
  head_attention::HeadAttention<Scalar> layer(emb, head, P + 1, 2800);
  const head_attention::PackedHeadAttention<Scalar> packed(layer);
  const auto cast = [](const head_attention::Linear<Scalar>& l) {
    head_attention::Linear<double> d;
    d.weight = l.weight.template cast<double>();
    d.bias = l.bias.template cast<double>();
    return d;
  };
  for (const Index B : {Index(9), Index(33), Index(64)}) {
    INFO("B " << B);
    const Matrix<Scalar> x = random_matrix<Scalar>(B * (P + 1), emb, 2801 + static_cast<std::uint64_t>(B));
    const std::vector<Matrix<Scalar>> steps = batched_steps(layer, packed, x, B, P);
    CHECK(identical(steps[0], steps[1]));
    Matrix<Scalar> want(B, head);
    for (Index b = 0; b < B; ++b)
      want.row(b) = head_attention::reference::forward(
                        Matrix<double>(x.middleRows(b * (P + 1), P + 1).template cast<double>()),
                        cast(layer.query()), cast(layer.key()), cast(layer.value()), MaskRule::causal())
                        .row(P)
                        .template cast<Scalar>();
    CHECK(relative_error(steps[0], want) <= rounding_tolerance<Scalar>());
  }
}

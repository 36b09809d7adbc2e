// 16-bit layers (Eigen::half, Eigen::bfloat16) and 16-bit KV caches against the double-precision definition:
// the reference path in double over the very same (16-bit) weights and inputs, so that what is measured is
// the layer's own error: float arithmetic plus the rounding of its outputs (and, for a cache, of the stored
// keys and values) to 16 bits.
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;
using head_attention::MaskRule;
using head_attention::Precision;

/// The bound each type is held to, relative to the output's largest magnitude (issue: 1e-3 half, 1e-2 bf16).
template <typename Scalar>
double bound() {
  return std::is_same<Scalar, Eigen::half>::value ? 1e-3 : 1e-2;
}

template <typename Scalar>
const char* name16() {
  return std::is_same<Scalar, Eigen::half>::value ? "half" : "bfloat16";
}

template <typename Scalar>
head_attention::Linear<double> to_double(const head_attention::Linear<Scalar>& l) {
  return {l.weight.template cast<double>(), l.bias.template cast<double>()};
}

/// The definition in double of one head over x, from the layer's own (16-bit) weights.
template <typename Scalar>
Eigen::MatrixXd definition(const head_attention::HeadAttention<Scalar>& layer, const Matrix<Scalar>& x,
                           const MaskRule& rule, Index valid = -1) {
  return head_attention::reference::forward(Matrix<double>(x.template cast<double>()),
                                            to_double(layer.query()), to_double(layer.key()),
                                            to_double(layer.value()), rule, valid);
}

template <typename Scalar>
double error_vs(const Matrix<Scalar>& got, const Eigen::MatrixXd& want) {
  return relative_error(Matrix<double>(got.template cast<double>()), Matrix<double>(want));
}

template <typename Scalar>
Matrix<Scalar> random16(Index rows, Index cols, std::uint64_t seed) {
  return random_matrix<float>(rows, cols, seed).template cast<Scalar>();
}

}  // namespace

TEMPLATE_TEST_CASE("16-bit HeadAttention matches the double definition", "[precision]", Eigen::half,
                   Eigen::bfloat16) {
  using Scalar = TestType;
  struct Shape {
    Index emb, head, T;
  };
  // T = 450 crosses query blocks and key blocks; 512/64 is simple_llm's size.
  static_assert(450 > head_attention::detail::Tuning::key_block, "T = 450 must cross a key block edge");
  const Shape shapes[] = {{16, 8, 1}, {16, 8, 10}, {64, 16, 77}, {512, 64, 450}, {13, 7, 65}};
  const MaskRule rules[] = {MaskRule::causal(), MaskRule::bidirectional(), MaskRule::sliding_window(5)};
  double worst = 0;
  for (const Shape& s : shapes) {
    for (const MaskRule& rule : rules) {
      head_attention::HeadAttention<Scalar> layer(s.emb, s.head, 512, 11, rule);
      const Matrix<Scalar> x = random16<Scalar>(s.T, s.emb, 5 + static_cast<std::uint64_t>(s.T));
      const Matrix<Scalar> out = layer.forward(x);
      REQUIRE(out.rows() == s.T);
      REQUIRE(out.cols() == s.head);
      const double err = error_vs(out, definition(layer, x, rule));
      INFO(name16<Scalar>() << " emb " << s.emb << " head " << s.head << " T " << s.T << " " << rule.name()
                            << ": " << err);
      CHECK(err < bound<Scalar>());
      worst = std::max(worst, err);
    }
  }
  WARN(name16<Scalar>() << " HeadAttention worst error vs double: " << worst);
  // Not trivially small either: the outputs really are 16-bit (a float layer is ~1e-7).
  CHECK(worst > 1e-5);
}

TEMPLATE_TEST_CASE("16-bit padded batch, Batched and attention weights", "[precision]", Eigen::half,
                   Eigen::bfloat16) {
  using Scalar = TestType;
  const Index B = 3, T = 70, emb = 32, head = 16;
  head_attention::HeadAttention<Scalar> layer(emb, head, 128, 3);
  const Matrix<Scalar> x = random16<Scalar>(B * T, emb, 9);

  SECTION("forward_into with lengths") {
    const std::vector<Index> lengths = {70, 33, 0};
    Matrix<Scalar> out(B * T, head);
    layer.forward_into(x, out, Batch(B, lengths));
    for (Index b = 0; b < B; ++b) {
      const Matrix<Scalar> xb = x.middleRows(b * T, T);
      const Matrix<Scalar> ob = out.middleRows(b * T, T);
      const Eigen::MatrixXd want =
          definition(layer, xb, MaskRule::causal(), lengths[static_cast<std::size_t>(b)]);
      if (lengths[static_cast<std::size_t>(b)] == 0)
        CHECK(ob.template cast<float>().cwiseAbs().maxCoeff() == 0.0f);  // sees no key: zero rows
      else
        CHECK(error_vs(ob, want) < bound<Scalar>());
    }
  }
  SECTION("BatchedHeadAttention over a Tensor") {
    head_attention::BatchedHeadAttention<Scalar> batched(emb, head, 128, 3);
    Tensor3<Scalar> xt(B, T, emb);
    std::copy(x.data(), x.data() + x.size(), xt.data());
    const Tensor3<Scalar> out = batched.forward(xt);
    REQUIRE(out.dimension(0) == B);
    REQUIRE(out.dimension(2) == head);
    for (Index b = 0; b < B; ++b) {
      const Matrix<Scalar> ob = Eigen::Map<const Matrix<Scalar>>(out.data() + b * T * head, T, head);
      CHECK(error_vs(ob, definition(batched.head(), Matrix<Scalar>(x.middleRows(b * T, T)),
                                    MaskRule::causal())) < bound<Scalar>());
    }
  }
  SECTION("attention_weights") {
    const Matrix<Scalar> xb = x.topRows(T);
    const Matrix<Scalar> w = layer.attention_weights(xb);
    const Eigen::MatrixXd want = head_attention::reference::attention_weights(
        Matrix<double>(xb.template cast<double>()), to_double(layer.query()), to_double(layer.key()));
    CHECK(error_vs(w, want) < bound<Scalar>());
    CHECK(static_cast<float>(w(0, 1)) == 0.0f);  // masked: exactly 0
  }
}

TEMPLATE_TEST_CASE("16-bit MultiHeadAttention matches the double definition", "[precision]", Eigen::half,
                   Eigen::bfloat16) {
  using Scalar = TestType;
  const Index heads = 4, emb = 64, head = 16, T = 130;
  head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, 256, 0.1, 21);
  const Matrix<Scalar> x = random16<Scalar>(T, emb, 4);
  Matrix<double> concat(T, heads * head);
  for (Index h = 0; h < heads; ++h)
    concat.middleCols(h * head, head) = definition(mha.head(h), x, MaskRule::causal());
  const Eigen::MatrixXd want =
      (concat * mha.projection().weight.template cast<double>().transpose()).rowwise() +
      mha.projection().bias.template cast<double>().transpose();
  const double err = error_vs(Matrix<Scalar>(mha.forward(x)), want);
  WARN(name16<Scalar>() << " MultiHeadAttention error vs double: " << err);
  CHECK(err < bound<Scalar>());

  // Decoding through the layer's own (16-bit) cache: prefill then one row at a time.
  typename head_attention::MultiHeadAttention<Scalar>::Cache cache = mha.make_cache();
  Matrix<Scalar> decoded(T, emb);
  decoded.topRows(100) = mha.forward_cached(Matrix<Scalar>(x.topRows(100)), cache);
  for (Index i = 100; i < T; ++i)
    decoded.row(i) = mha.forward_cached(Matrix<Scalar>(x.row(i)), cache);
  CHECK(error_vs(decoded, want) < bound<Scalar>());
}

namespace {

/// The definition in double of a multi-head layer over x, from its weights rounded through Narrow (a no-op
/// for a 16-bit layer's own weights).
template <typename Narrow, typename Scalar>
Eigen::MatrixXd multihead_definition(const head_attention::MultiHeadAttention<Scalar>& mha,
                                     const Matrix<Scalar>& x) {
  const auto round = [](const head_attention::Linear<Scalar>& l) {
    return head_attention::Linear<double>{l.weight.template cast<Narrow>().template cast<double>(),
                                          l.bias.template cast<Narrow>().template cast<double>()};
  };
  const Index heads = mha.num_heads(), head = mha.head_size();
  const Matrix<double> xd = x.template cast<double>();
  Matrix<double> concat(x.rows(), heads * head);
  for (Index h = 0; h < heads; ++h)
    concat.middleCols(h * head, head) =
        head_attention::reference::forward(xd, round(mha.head(h).query()), round(mha.head(h).key()),
                                           round(mha.head(h).value()), MaskRule::causal());
  const head_attention::Linear<double> out = round(mha.projection());
  return (concat * out.weight.transpose()).rowwise() + out.bias.transpose();
}

/// A prefill of `prompt` rows then one decode step per remaining row of x, through `form` and a fresh cache
/// of `storage`.
template <typename Form, typename Scalar>
Matrix<Scalar> prefill_and_steps(const Form& form, const Matrix<Scalar>& x, Index prompt, Precision storage) {
  auto cache = form.make_cache(storage);
  Matrix<Scalar> out(x.rows(), form.emb_size());
  out.topRows(prompt) = form.forward_cached(Matrix<Scalar>(x.topRows(prompt)), cache);
  for (Index i = prompt; i < x.rows(); ++i)
    out.row(i) = form.forward_cached(Matrix<Scalar>(x.row(i)), cache);
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("16-bit decode steps read the weights in 16 bits; the packed form's are the layer's",
                   "[precision][cache]", Eigen::half, Eigen::bfloat16) {
  using Scalar = TestType;
  // Sizes that are and are not multiples of the SIMD widths (the 16-bit loads' remainders).
  for (const auto& sizes : {std::array<Index, 3>{4, 64, 16}, std::array<Index, 3>{3, 37, 5}}) {
    const Index heads = sizes[0], emb = sizes[1], head = sizes[2], T = 40;
    const head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, 64, 0.0, 31);
    const Matrix<Scalar> x = random16<Scalar>(T, emb, 32);
    const Eigen::MatrixXd want = multihead_definition<Scalar>(mha, x);
    const Precision storage = head_attention::precision_of<Scalar>();
    // Prompts of 1 and 3 rows take the decode path from the start; 20 rows the GEMMs.
    for (const Index prompt : {Index(1), Index(3), Index(20)}) {
      const Matrix<Scalar> steps = prefill_and_steps(mha, x, prompt, storage);
      INFO(name16<Scalar>() << ", emb " << emb << ", head " << head << ", prompt " << prompt);
      CHECK(error_vs(steps, want) < bound<Scalar>());
      CHECK(identical(
          prefill_and_steps(head_attention::PackedMultiHeadAttention<Scalar>(mha), x, prompt, storage),
          steps));
    }
  }
}

TEMPLATE_TEST_CASE("A float layer packed with 16-bit weights computes as the rounded layer",
                   "[precision][cache]", Eigen::half, Eigen::bfloat16) {
  using Narrow = TestType;
  const Precision weights = head_attention::precision_of<Narrow>();
  for (const auto& sizes : {std::array<Index, 3>{4, 64, 16}, std::array<Index, 3>{2, 37, 5}}) {
    const Index heads = sizes[0], emb = sizes[1], head = sizes[2], T = 40;
    const head_attention::MultiHeadAttention<float> mha(heads, emb, head, 64, 0.0, 41);
    const head_attention::PackedMultiHeadAttention<float> packed(mha, weights);
    const Matrix<float> x = random_matrix<float>(T, emb, 42);
    const Eigen::MatrixXd want = multihead_definition<Narrow>(mha, x);
    INFO(name16<Narrow>() << " weights, emb " << emb << ", head " << head);
    // Its prefill (the GEMMs) and decode steps (the 16-bit rows) both from the rounded weights: closer to
    // them than to the float layer, by the bound of the narrow type.
    const double forward_error =
        relative_error(Matrix<double>(packed.forward(x).cast<double>()), Matrix<double>(want));
    CHECK(forward_error < 1e-5);
    for (const Precision storage : {Precision::float32, weights}) {
      const Matrix<float> steps = prefill_and_steps(packed, x, 2, storage);
      const double err = relative_error(Matrix<double>(steps.cast<double>()), Matrix<double>(want));
      CHECK(err < (storage == Precision::float32 ? 1e-5 : bound<Narrow>()));
    }
    const Eigen::MatrixXd exact = multihead_definition<float>(mha, x);  // the float layer's own weights
    CHECK(relative_error(Matrix<double>(want), Matrix<double>(exact)) > 1e-5);  // rounding does show
    // A single head, likewise.
    const head_attention::PackedHeadAttention<float> single(mha.head(0), weights);
    auto cache = single.make_cache();
    const Matrix<float> one = single.forward_cached(Matrix<float>(x.topRows(1)), cache);
    const auto round = [](const head_attention::Linear<float>& l) {
      return head_attention::Linear<double>{l.weight.cast<Narrow>().template cast<double>(),
                                            l.bias.cast<Narrow>().template cast<double>()};
    };
    const Eigen::MatrixXd want_one = head_attention::reference::forward(
        Matrix<double>(x.topRows(1).cast<double>()), round(mha.head(0).query()), round(mha.head(0).key()),
        round(mha.head(0).value()), MaskRule::causal());
    CHECK(relative_error(Matrix<double>(one.cast<double>()), Matrix<double>(want_one)) < 1e-5);
  }
}

TEST_CASE("Packing to a precision a layer cannot compute in is refused", "[precision][bad-input]") {
  const head_attention::HeadAttention<double> h64(8, 4, 16, 1);
  CHECK_THROWS_AS(head_attention::PackedHeadAttention<double>(h64, Precision::bfloat16),
                  head_attention::shape_error);
  const head_attention::HeadAttention<float> h32(8, 4, 16, 1);
  CHECK_THROWS_AS(head_attention::PackedHeadAttention<float>(h32, Precision::float64),
                  head_attention::shape_error);
  const head_attention::MultiHeadAttention<Eigen::half> m16(2, 8, 4, 16, 0.0, 1);
  CHECK_THROWS_AS(head_attention::PackedMultiHeadAttention<Eigen::half>(m16, Precision::float32),
                  head_attention::shape_error);
  CHECK_NOTHROW(head_attention::PackedMultiHeadAttention<Eigen::half>(m16, Precision::float16));
}

TEMPLATE_TEST_CASE("16-bit layers are seeded like float ones, and thread-count independent", "[precision]",
                   Eigen::half, Eigen::bfloat16) {
  using Scalar = TestType;
  const head_attention::HeadAttention<Scalar> h16(48, 8, 512, 77);
  const head_attention::HeadAttention<double> h64(48, 8, 512, 77);
  // The same draws, rounded once (from double through float, as Eigen's conversion does).
  CHECK(identical(h16.value().weight, h64.value().weight.template cast<float>().template cast<Scalar>()));
  CHECK(identical(h16.query().bias, h64.query().bias.template cast<float>().template cast<Scalar>()));

  head_attention::HeadAttention<Scalar> layer = h16;
  const Matrix<Scalar> x = random16<Scalar>(400, 48, 8);
  layer.set_num_threads(1);
  const Matrix<Scalar> one = layer.forward(x);
  layer.set_num_threads(2);
  const Matrix<Scalar> two = layer.forward(x);
  CHECK(identical(one, two));
}

TEST_CASE("A float layer's KV cache in float16 or bfloat16", "[precision][cache]") {
  // head 32: decode steps read 16-bit keys in place where the build allows it (AVX2 + F16C + FMA); head 12
  // (not a multiple of 8) and other builds convert tiles first. T = 600 crosses key blocks.
  const Index head = GENERATE(Index(32), Index(12));
  const Index emb = 64, T = 600;
  head_attention::HeadAttention<float> layer(emb, head, 1024, 5);
  const Matrix<float> x = random_matrix<float>(T, emb, 12);
  const Eigen::MatrixXd want = definition(layer, x, MaskRule::causal());
  struct Case {
    Precision precision;
    double bound;
  };
  // Keys and values rounded once to 16 bits; a float32 cache stays at float's rounding.
  for (const Case c :
       {Case{Precision::float32, 1e-5}, Case{Precision::float16, 1e-3}, Case{Precision::bfloat16, 1e-2}}) {
    head_attention::KVCache<float> cache = layer.make_cache(c.precision);
    CHECK(cache.precision() == c.precision);
    Matrix<float> out(T, head);
    out.topRows(300) = layer.forward_cached(x.topRows(300), cache);
    for (Index i = 300; i < T; ++i)
      out.row(i) = layer.forward_cached(x.row(i), cache);
    const double err = error_vs(out, want);
    WARN("float layer, " << head_attention::precision_name(c.precision) << " cache: error vs double " << err);
    CHECK(err < c.bound);
    if (c.precision != Precision::float32) CHECK(err > 1e-6);  // the cache really rounds

    // Rolling back and redoing gives the same rows again.
    cache.truncate(T - 10);
    for (Index i = T - 10; i < T; ++i)
      CHECK(identical(layer.forward_cached(x.row(i), cache), out.row(i)));
  }
}

TEST_CASE("A bfloat16 cache under a sliding window keeps O(window) rows", "[precision][cache]") {
  const Index emb = 32, head = 16, T = 700, window = 40;
  head_attention::HeadAttention<float> layer(emb, head, 1024, 6, MaskRule::sliding_window(window));
  const Matrix<float> x = random_matrix<float>(T, emb, 13);
  const Eigen::MatrixXd want = definition(layer, x, MaskRule::sliding_window(window));
  head_attention::KVCache<float> cache = layer.make_cache(Precision::bfloat16);
  Matrix<float> out(T, head);
  for (Index i = 0; i < T; ++i)
    out.row(i) = layer.forward_cached(x.row(i), cache);
  CHECK(error_vs(out, want) < 1e-2);
  CHECK(cache.capacity() <= 4 * window);
}

TEST_CASE("16-bit to float conversion is exact for every bit pattern", "[precision]") {
  std::vector<std::uint16_t> bits(65536 + 5);  // + 5: a tail that is not a whole vector
  for (std::size_t i = 0; i < bits.size(); ++i)
    bits[i] = static_cast<std::uint16_t>(i * 40503u);  // a permutation of the patterns, then 5 more
  std::vector<float> wide(bits.size());
  for (const Precision p : {Precision::float16, Precision::bfloat16}) {
    const Index n = static_cast<Index>(bits.size());
    head_attention::detail::convert_rows(p, bits.data(), n, 1, n, wide.data(), n);
    Index wrong = 0;
    for (std::size_t i = 0; i < bits.size(); ++i) {
      const float want =
          p == Precision::float16
              ? static_cast<float>(Eigen::half(Eigen::half_impl::raw_uint16_to_half(bits[i])))
              : static_cast<float>(Eigen::bfloat16(Eigen::bfloat16_impl::raw_uint16_to_bfloat16(bits[i])));
      const bool same = std::isnan(want) ? std::isnan(wide[i])
                                         : wide[i] == want && std::signbit(wide[i]) == std::signbit(want);
      wrong += same ? 0 : 1;
    }
    INFO(head_attention::precision_name(p));
    CHECK(wrong == 0);
  }
  // Strided rows go row by row.
  const Matrix<Eigen::half> h = random16<Eigen::half>(3, 20, 1);
  Matrix<float> f(3, 20);
  head_attention::detail::convert_rows(Precision::float16, h.data(), 20, 3, 17, f.data(), 20);
  CHECK(identical(f.leftCols(17), h.leftCols(17).cast<float>()));
}

TEST_CASE("Precision names and sizes", "[precision]") {
  using head_attention::precision_bytes;
  using head_attention::precision_name;
  using head_attention::precision_of;
  CHECK(precision_of<double>() == Precision::float64);
  CHECK(precision_of<float>() == Precision::float32);
  CHECK(precision_of<Eigen::half>() == Precision::float16);
  CHECK(precision_of<Eigen::bfloat16>() == Precision::bfloat16);
  CHECK(std::string(precision_name(Precision::bfloat16)) == "bfloat16");
  CHECK(precision_bytes(Precision::float64) == 8);
  CHECK(precision_bytes(Precision::float16) == 2);
  head_attention::MultiHeadAttention<float> mha(2, 16, 8, 32);
  CHECK(mha.make_cache(3, Precision::float16).batch() == 3);
}

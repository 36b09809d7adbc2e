// Golden parity with PyTorch: the fixtures in tests/fixtures/ hold simple_llm's HeadAttention weights, inputs
// and outputs as computed by torch (see tests/generate_fixtures.py). Every path of ours must reproduce them:
// BatchedHeadAttention on a Tensor and on TensorMaps, HeadAttention::forward per sequence and the reference
// implementation.
#include <iostream>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;

/// The parity bound, max|ours - torch| / max|torch|.
template <typename Scalar>
double parity_tolerance() {
  return std::is_same<Scalar, float>::value ? 2e-5 : 1e-10;
}

template <typename Scalar>
Tensor3<Scalar> to_tensor3(const FixtureTensor<Scalar>& t, Index d0, Index d1, Index d2) {
  Tensor3<Scalar> out(d0, d1, d2);
  std::copy(t.values.begin(), t.values.end(), out.data());
  return out;
}

struct Worst {
  double error = 0;
  std::string where = "-";
  void update(double e, const std::string& w) {
    if (e > error || where == "-") {
      error = std::max(error, e);
      where = w;
    }
  }
};

}  // namespace

TEST_CASE("the fixture set covers the required cases", "[parity]") {
  const std::vector<std::string> cases = fixture_cases();
  REQUIRE(cases.size() >= 8);
  bool t1 = false, t_max = false, odd = false, head_gt_emb = false, scale5 = false, batch = false,
       several_query_blocks = false, several_key_blocks = false;
  for (const std::string& name : cases) {
    const Fixture<double> f = load_fixture<double>(name);
    t1 |= f.T == 1;
    t_max |= f.T == f.max_seq_len;
    odd |= f.emb % 8 != 0 && f.head % 8 != 0;
    head_gt_emb |= f.head > f.emb;
    scale5 |= f.scale >= 5;
    batch |= f.B > 1;
    several_query_blocks |= f.T > head_attention::detail::Tuning::query_block &&
                            f.T % head_attention::detail::Tuning::query_block != 0;
    several_key_blocks |= f.T > head_attention::detail::Tuning::key_block;
  }
  CHECK(t1);
  CHECK(t_max);
  CHECK(odd);
  CHECK(head_gt_emb);
  CHECK(scale5);
  CHECK(batch);
  CHECK(several_query_blocks);
  CHECK(several_key_blocks);
}

TEMPLATE_TEST_CASE("every path matches PyTorch on every fixture", "[parity]", float, double) {
  using Scalar = TestType;
  using Layer = head_attention::HeadAttention<Scalar>;
  using Batched = head_attention::BatchedHeadAttention<Scalar>;
  const double tolerance = parity_tolerance<Scalar>();

  Worst batched_tensor, batched_map, per_sequence, reference;
  const std::vector<std::string> cases = fixture_cases();
  REQUIRE(!cases.empty());
  for (const std::string& name : cases) {
    const Fixture<Scalar> f = load_fixture<Scalar>(name);
    INFO("fixture " << name << " (" << scalar_name<Scalar>() << "): B " << f.B << ", T " << f.T << ", emb "
                    << f.emb << ", head " << f.head << ", max_seq_len " << f.max_seq_len << ", scale "
                    << f.scale);
    const Layer layer = f.layer();
    const Batched batched(layer);
    const Tensor3<Scalar> x = f.x();
    const Tensor3<Scalar> expected = f.out();
    const Index n = expected.size();

    // BatchedHeadAttention on a Tensor.
    const Tensor3<Scalar> out = batched.forward(x);
    REQUIRE(out.dimension(0) == f.B);
    REQUIRE(out.dimension(1) == f.T);
    REQUIRE(out.dimension(2) == f.head);
    double e = relative_error(out.data(), expected.data(), n);
    CHECK(e <= tolerance);
    batched_tensor.update(e, name);

    // ... on TensorMaps over the caller's memory, const and mutable.
    std::vector<Scalar> buffer(x.data(), x.data() + x.size());
    const Eigen::TensorMap<const Tensor3<Scalar>> const_map(buffer.data(), f.B, f.T, f.emb);
    const Tensor3<Scalar> out_const_map = batched.forward(const_map);
    e = relative_error(out_const_map.data(), expected.data(), n);
    CHECK(e <= tolerance);
    batched_map.update(e, name);
    const Eigen::TensorMap<Tensor3<Scalar>> map(buffer.data(), f.B, f.T, f.emb);
    const Tensor3<Scalar> out_map = batched.forward(map);
    e = relative_error(out_map.data(), expected.data(), n);
    CHECK(e <= tolerance);
    batched_map.update(e, name);

    // HeadAttention::forward and the reference, one sequence at a time.
    double seq_error = 0, ref_error = 0;
    for (Index b = 0; b < f.B; ++b) {
      const Matrix<Scalar> xb = sequence(x, b);
      const Matrix<Scalar> want = sequence(expected, b);
      const Matrix<Scalar> got = layer.forward(xb);
      REQUIRE(got.rows() == f.T);
      REQUIRE(got.cols() == f.head);
      const double scale = max_abs(expected.data(), n);  // relative to the whole batch, as above
      seq_error = std::max(seq_error, max_abs_diff(got.data(), want.data(), got.size()) / scale);
      const Matrix<Scalar> ref =
          head_attention::reference::forward(xb, layer.query(), layer.key(), layer.value());
      ref_error = std::max(ref_error, max_abs_diff(ref.data(), want.data(), ref.size()) / scale);
    }
    CHECK(seq_error <= tolerance);
    CHECK(ref_error <= tolerance);
    per_sequence.update(seq_error, name);
    reference.update(ref_error, name);
  }

  std::cout << "[parity] " << scalar_name<Scalar>() << ", " << cases.size()
            << " fixtures, worst max|ours - torch| / max|torch| (bound " << tolerance << "):\n"
            << "  BatchedHeadAttention(Tensor)    " << batched_tensor.error << "  (" << batched_tensor.where
            << ")\n"
            << "  BatchedHeadAttention(TensorMap) " << batched_map.error << "  (" << batched_map.where
            << ")\n"
            << "  HeadAttention::forward          " << per_sequence.error << "  (" << per_sequence.where
            << ")\n"
            << "  reference::forward              " << reference.error << "  (" << reference.where << ")\n";
}

TEMPLATE_TEST_CASE("the other masks and the attention weights match PyTorch", "[parity][masks]", float,
                   double) {
  using Scalar = TestType;
  using head_attention::MaskRule;
  const double tolerance = parity_tolerance<Scalar>();
  Worst bidirectional, bidirectional_ref, padded, padded_ref, weights, cached;
  Index weight_cases = 0;
  for (const std::string& name : fixture_cases()) {
    const Fixture<Scalar> f = load_fixture<Scalar>(name);
    INFO("fixture " << name << " (" << scalar_name<Scalar>() << ")");
    head_attention::HeadAttention<Scalar> layer = f.layer();
    const Tensor3<Scalar> x = f.x();

    // Bidirectional: the seed module without its masked_fill.
    const Tensor3<Scalar> want_bi =
        to_tensor3(f.tensor("out_bidirectional", {f.B, f.T, f.head}), f.B, f.T, f.head);
    head_attention::BatchedHeadAttention<Scalar> bi(layer);
    bi.head().set_mask_rule(MaskRule::bidirectional());
    const Tensor3<Scalar> got_bi = bi.forward(x);
    double e = relative_error(got_bi.data(), want_bi.data(), want_bi.size());
    CHECK(e <= tolerance);
    bidirectional.update(e, name);
    double ref_e = 0;
    for (Index b = 0; b < f.B; ++b) {
      const Matrix<Scalar> ref = head_attention::reference::forward(
          sequence(x, b), layer.query(), layer.key(), layer.value(), MaskRule::bidirectional());
      ref_e = std::max(ref_e, max_abs_diff(ref.data(), sequence(want_bi, b).data(), ref.size()) /
                                  max_abs(want_bi.data(), want_bi.size()));
    }
    CHECK(ref_e <= tolerance);
    bidirectional_ref.update(ref_e, name);

    // Causal plus a boolean key-padding mask.
    const auto& length_values = f.tensor("lengths", {f.B}).values;
    std::vector<Index> lengths;
    for (const Scalar v : length_values)
      lengths.push_back(static_cast<Index>(v));
    const Tensor3<Scalar> want_pad = to_tensor3(f.tensor("out_padded", {f.B, f.T, f.head}), f.B, f.T, f.head);
    const head_attention::BatchedHeadAttention<Scalar> causal(layer);
    const Tensor3<Scalar> got_pad = causal.forward(x, lengths);
    e = relative_error(got_pad.data(), want_pad.data(), want_pad.size());
    CHECK(e <= tolerance);
    padded.update(e, name);
    ref_e = 0;
    for (Index b = 0; b < f.B; ++b) {
      const Matrix<Scalar> ref =
          head_attention::reference::forward(sequence(x, b), layer.query(), layer.key(), layer.value(),
                                             MaskRule::causal(), lengths[static_cast<std::size_t>(b)]);
      ref_e = std::max(ref_e, max_abs_diff(ref.data(), sequence(want_pad, b).data(), ref.size()) /
                                  max_abs(want_pad.data(), want_pad.size()));
    }
    CHECK(ref_e <= tolerance);
    padded_ref.update(ref_e, name);

    // Token-by-token decoding reproduces torch's causal output too.
    double cached_e = 0;
    const Tensor3<Scalar> want = f.out();
    for (Index b = 0; b < f.B; ++b) {
      auto cache = layer.make_cache();
      const Matrix<Scalar> xb = sequence(x, b);
      Matrix<Scalar> got(f.T, f.head);
      for (Index i = 0; i < f.T; ++i)
        got.row(i) = layer.forward_cached(xb.row(i), cache);
      cached_e = std::max(cached_e, max_abs_diff(got.data(), sequence(want, b).data(), got.size()) /
                                        max_abs(want.data(), want.size()));
    }
    CHECK(cached_e <= tolerance);
    cached.update(cached_e, name);

    // get_attention_weights, where the fixture has it.
    if (f.tensors.count("weights") != 0) {
      ++weight_cases;
      const Tensor3<Scalar> want_w = to_tensor3(f.tensor("weights", {f.B, f.T, f.T}), f.B, f.T, f.T);
      const Tensor3<Scalar> got_w = causal.attention_weights(x);
      e = relative_error(got_w.data(), want_w.data(), want_w.size());
      CHECK(e <= tolerance);
      weights.update(e, name);
    }
  }
  CHECK(weight_cases >= 5);
  std::cout << "[parity] " << scalar_name<Scalar>()
            << ", other masks, worst max|ours - torch| / max|torch|:\n"
            << "  bidirectional      fast " << bidirectional.error << " (" << bidirectional.where
            << "), reference " << bidirectional_ref.error << "\n"
            << "  causal + padding   fast " << padded.error << " (" << padded.where << "), reference "
            << padded_ref.error << "\n"
            << "  decoded one token at a time " << cached.error << " (" << cached.where << ")\n"
            << "  attention_weights  " << weights.error << " (" << weights.where << ", " << weight_cases
            << " fixtures)\n";
}

TEMPLATE_TEST_CASE("a layer built from the fixture sizes refuses what torch refuses", "[parity]", float,
                   double) {
  using Scalar = TestType;
  for (const std::string& name : fixture_cases()) {
    INFO("fixture " << name);
    const Fixture<Scalar> f = load_fixture<Scalar>(name);
    const auto layer = f.layer();
    // The generator checked that torch raises ValueError for T = max_seq_len + 1.
    const Matrix<Scalar> too_long = Matrix<Scalar>::Zero(f.max_seq_len + 1, f.emb);
    CHECK_THROWS_AS(layer.forward(too_long), head_attention::shape_error);
  }
}

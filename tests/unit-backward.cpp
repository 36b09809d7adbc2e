// The training backward pass: central finite differences in double, the materialising reference backward,
// thread-count independence, PyTorch autograd's gradients, and shape errors.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;
using head_attention::Gradients;
using head_attention::HeadAttention;
using head_attention::Linear;
using head_attention::MaskRule;

/// A layer's parameters in double, for the reference backward.
template <typename Scalar>
Linear<double> to_double(const Linear<Scalar>& l) {
  Linear<double> d;
  d.weight = l.weight.template cast<double>();
  d.bias = l.bias.template cast<double>();
  return d;
}

/// max |ours - expected| / max |expected| over a layer's weight and bias gradients together: the gradient of
/// the key's bias is 0 in exact arithmetic (softmax does not change when a row of scores is shifted), so
/// alone it has no scale to be relative to.
template <typename A, typename B>
double linear_error(const Linear<A>& ours, const Linear<B>& expected, double zero_scale = 0) {
  const Matrix<double> w = ours.weight.template cast<double>(), ew = expected.weight.template cast<double>();
  const Eigen::VectorXd b = ours.bias.template cast<double>(), eb = expected.bias.template cast<double>();
  if (w.rows() != ew.rows() || w.cols() != ew.cols() || b.size() != eb.size())
    return std::numeric_limits<double>::infinity();
  double scale = std::max(ew.cwiseAbs().maxCoeff(), eb.cwiseAbs().maxCoeff());
  if (scale == 0) scale = zero_scale;
  const double diff = std::max((w - ew).cwiseAbs().maxCoeff(), (b - eb).cwiseAbs().maxCoeff());
  return diff == 0 ? 0 : diff / scale;
}

/// The largest relative error of ours against expected over the input and every parameter gradient. A
/// gradient that is exactly 0 (Q's and K's with one key: the softmax of a single score is 1 whatever it is)
/// is measured against the input gradient's scale instead: ours is rounding noise there.
template <typename Scalar, typename Input>
double worst_error(const Gradients<Scalar, Input>& ours, const Gradients<double>& expected) {
  const Matrix<double> input = ours.input.template cast<double>();
  const double zero_scale = expected.input.cwiseAbs().maxCoeff();
  return std::max({relative_error(input, expected.input),
                   linear_error(ours.query, expected.query, zero_scale),
                   linear_error(ours.key, expected.key, zero_scale),
                   linear_error(ours.value, expected.value, zero_scale)});
}

/// Central differences of the scalar loss f with respect to every entry of p (a weight, a bias or x, changed
/// in place and restored): [rows, cols] like p.
template <typename Plain>
Plain finite_differences(Plain& p, const std::function<double()>& f, double h = 1e-6) {
  Plain g(p.rows(), p.cols());
  for (Index i = 0; i < p.rows(); ++i)
    for (Index j = 0; j < p.cols(); ++j) {
      const double saved = p(i, j);
      p(i, j) = saved + h;
      const double up = f();
      p(i, j) = saved - h;
      const double down = f();
      p(i, j) = saved;
      g(i, j) = (up - down) / (2 * h);
    }
  return g;
}

/// Checks the gradients of L = Σ forward ∘ R (R = grad_out) by central differences, for every parameter and
/// the input. forward(layer, x) returns the layer's output for x.
void check_finite_differences(
    HeadAttention<double>& layer, Matrix<double>& x, const Matrix<double>& grad_out,
    const Gradients<double>& g,
    const std::function<Matrix<double>(const HeadAttention<double>&, const Matrix<double>&)>& forward) {
  const std::function<double()> loss = [&] { return (forward(layer, x).array() * grad_out.array()).sum(); };
  const struct {
    const char* name;
    Linear<double>& param;
    const Linear<double>& grad;
  } linears[] = {
      {"query", layer.query(), g.query}, {"key", layer.key(), g.key}, {"value", layer.value(), g.value}};
  for (const auto& l : linears) {
    Linear<double> fd;
    fd.weight = finite_differences(l.param.weight, loss);
    fd.bias = finite_differences(l.param.bias, loss);
    const double error = linear_error(l.grad, fd, g.input.cwiseAbs().maxCoeff());  // see worst_error
    INFO(l.name << " relative error " << error);
    CHECK(error < 1e-6);
  }
  const double input_error = relative_error(g.input, finite_differences(x, loss));
  INFO("input relative error " << input_error);
  CHECK(input_error < 1e-6);
}

MaskRule rule_named(const std::string& name) {
  if (name == "bidirectional") return MaskRule::bidirectional();
  if (name == "sliding_window") return MaskRule::sliding_window(3);
  return MaskRule::causal();
}

}  // namespace

TEST_CASE("backward: central finite differences in double, every parameter and the input", "[backward]") {
  const std::string rule = GENERATE(as<std::string>(), "causal", "bidirectional", "sliding_window");
  const Index T = GENERATE(1, 7);
  CAPTURE(rule, T);
  HeadAttention<double> layer(6, 4, 16, 7, rule_named(rule));
  Matrix<double> x = random_matrix<double>(T, 6, 11);
  const Matrix<double> grad_out = random_matrix<double>(T, 4, 12);
  const Gradients<double> g = layer.backward(x, grad_out);
  check_finite_differences(
      layer, x, grad_out, g,
      [](const HeadAttention<double>& l, const Matrix<double>& in) { return l.forward(in); });
}

TEST_CASE("backward: finite differences with right padding over a batch", "[backward]") {
  const std::string rule = GENERATE(as<std::string>(), "causal", "bidirectional", "sliding_window");
  CAPTURE(rule);
  const Index B = 3, T = 6;
  const std::vector<Index> lengths = {6, 3, 1};
  HeadAttention<double> layer(5, 3, 8, 21, rule_named(rule));
  Matrix<double> x = random_matrix<double>(B * T, 5, 22);
  const Matrix<double> grad_out = random_matrix<double>(B * T, 3, 23);
  const Gradients<double> g = layer.backward(x, grad_out, Batch(B, lengths));
  check_finite_differences(layer, x, grad_out, g,
                           [&](const HeadAttention<double>& l, const Matrix<double>& in) {
                             Matrix<double> out(B * T, 3);
                             l.forward_into(in, out, Batch(B, lengths));
                             return out;
                           });
}

// Regression (fuzz_layers, tests/fuzz/corpus/layers/regression-mha-backward-zero-rows): a multi-head backward
// over no rows took column sums of an empty matrix, which offsets Eigen's null data pointer (UBSan).
TEMPLATE_TEST_CASE("backward over no rows gives zero parameter gradients and an empty input gradient",
                   "[backward]", float, double) {
  using Scalar = TestType;
  const head_attention::HeadAttention<Scalar> layer(6, 4, 10, 71);
  const head_attention::MultiHeadAttention<Scalar> mha(2, 6, 3, 10, 0.1, 72);
  const Matrix<Scalar> x(0, 6), g(0, 4), g_mha(0, 6);
  const auto single = layer.backward(x, g);
  CHECK(single.input.rows() == 0);
  CHECK(single.input.cols() == 6);
  CHECK(single.query.weight.isZero());
  CHECK(single.value.bias.size() == 4);
  CHECK(single.value.bias.isZero());
  const auto batched = layer.backward(x, g, Batch(3));
  CHECK(batched.key.bias.isZero());
  const head_attention::MultiHeadGradients<Scalar> multi = mha.backward(x, g_mha);
  CHECK(multi.input.rows() == 0);
  CHECK(multi.projection.bias.size() == 6);
  CHECK(multi.projection.bias.isZero());
  CHECK(multi.projection.weight.isZero());
  CHECK(multi.heads[1].query.bias.isZero());
  const auto ref = head_attention::reference::backward(x, layer.query(), layer.key(), layer.value(), g);
  CHECK(ref.query.bias.size() == 4);
  CHECK(ref.query.bias.isZero());
}

TEMPLATE_TEST_CASE("backward: the fused pass matches the materialising reference backward", "[backward]",
                   float, double) {
  using Scalar = TestType;
  const std::string rule = GENERATE(as<std::string>(), "causal", "bidirectional", "sliding_window");
  const Index T = GENERATE(1, 10, 64, 65, 150, 300);
  const Index valid = GENERATE(-1, 40);
  CAPTURE(rule, T, valid);
  HeadAttention<Scalar> layer(13, 7, 300, 31,
                              rule == "sliding_window" ? MaskRule::sliding_window(70) : rule_named(rule));
  const Matrix<Scalar> x = random_matrix<Scalar>(T, 13, 32, 2.0);
  const Matrix<Scalar> grad_out = random_matrix<Scalar>(T, 7, 33);
  const Index valid_keys = valid < 0 ? T : std::min(valid, T);
  const Gradients<Scalar> g = valid < 0
                                  ? layer.backward(x, grad_out)
                                  : layer.backward(x, grad_out, Batch(1, std::vector<Index>{valid_keys}));
  const Gradients<double> ref = head_attention::reference::backward(
      x.template cast<double>().eval(), to_double(layer.query()), to_double(layer.key()),
      to_double(layer.value()), grad_out.template cast<double>().eval(), layer.mask_rule(), valid_keys);
  const double error = worst_error(g, ref);
  INFO("worst relative error " << error);
  CHECK(error < (std::is_same<Scalar, float>::value ? 1e-4 : 1e-11));
}

TEMPLATE_TEST_CASE("backward: bit-identical results on 1, 2 and 3 threads", "[backward][threads]", float,
                   double) {
  using Scalar = TestType;
  if (!head_attention::detail::has_openmp) HA_SKIP("built without OpenMP: every call runs on one thread");
  const std::string rule = GENERATE(as<std::string>(), "causal", "bidirectional", "sliding_window");
  CAPTURE(rule);
  const Index B = 3, T = 150;
  HeadAttention<Scalar> layer(32, 16, 200, 41,
                              rule == "sliding_window" ? MaskRule::sliding_window(50) : rule_named(rule));
  const Matrix<Scalar> x = random_matrix<Scalar>(B * T, 32, 42);
  const Matrix<Scalar> grad_out = random_matrix<Scalar>(B * T, 16, 43);
  const std::vector<Index> lengths = {150, 77, 1};
  layer.set_num_threads(1);
  const Gradients<Scalar> one = layer.backward(x, grad_out, Batch(B, lengths));
  REQUIRE(head_attention::detail::last_team_size() == 1);
  for (int threads : {2, 3}) {
    CAPTURE(threads);
    layer.set_num_threads(threads);
    const Gradients<Scalar> many = layer.backward(x, grad_out, Batch(B, lengths));
    REQUIRE(head_attention::detail::last_team_size() == threads);  // the call really ran on that many
    CHECK(identical(many.input, one.input));
    CHECK(identical(many.query.weight, one.query.weight));
    CHECK(identical(many.query.bias, one.query.bias));
    CHECK(identical(many.key.weight, one.key.weight));
    CHECK(identical(many.key.bias, one.key.bias));
    CHECK(identical(many.value.weight, one.value.weight));
    CHECK(identical(many.value.bias, one.value.bias));
  }
}

TEST_CASE("backward: a batch gives each sequence's input gradient and the summed parameter gradients",
          "[backward]") {
  const Index B = 3, T = 70;
  HeadAttention<double> layer(9, 5, 80, 51);
  const Matrix<double> x = random_matrix<double>(B * T, 9, 52);
  const Matrix<double> grad_out = random_matrix<double>(B * T, 5, 53);
  const Gradients<double> all = layer.backward(x, grad_out, Batch(B));
  Gradients<double> sum;
  for (Index b = 0; b < B; ++b) {
    const Gradients<double> one = layer.backward(x.middleRows(b * T, T), grad_out.middleRows(b * T, T));
    CHECK(relative_error(all.input.middleRows(b * T, T), one.input) < 1e-14);
    if (b == 0) {
      sum = one;
    } else {
      for (auto [to, from] : {std::make_pair(&sum.query, &one.query), std::make_pair(&sum.key, &one.key),
                              std::make_pair(&sum.value, &one.value)}) {
        to->weight += from->weight;
        to->bias += from->bias;
      }
    }
  }
  CHECK(linear_error(all.query, sum.query) < 1e-13);
  CHECK(linear_error(all.key, sum.key) < 1e-13);
  CHECK(linear_error(all.value, sum.value) < 1e-13);
}

TEST_CASE("backward: any dense input expression, and empty inputs", "[backward]") {
  HeadAttention<double> layer(6, 4, 16, 61);
  const Matrix<double> x = random_matrix<double>(9, 6, 62);
  const Matrix<double> grad_out = random_matrix<double>(9, 4, 63);
  const Gradients<double> g = layer.backward(x, grad_out);
  const ColMatrix<double> x_col = x;
  const ColMatrix<double> grad_col = grad_out;
  const Gradients<double> from_col = layer.backward(x_col, grad_col);
  CHECK(relative_error(from_col.input, g.input) < 1e-15);
  CHECK(linear_error(from_col.query, g.query) < 1e-15);
  const Gradients<double> from_expr = layer.backward(x * 1.0, grad_out.array().matrix());
  CHECK(identical(from_expr.input, g.input));

  const Gradients<double> empty = layer.backward(Matrix<double>(0, 6), Matrix<double>(0, 4));
  CHECK(empty.input.rows() == 0);
  CHECK(empty.input.cols() == 6);
  CHECK(empty.query.weight.rows() == 4);
  CHECK(empty.query.weight.cols() == 6);
  CHECK(empty.query.weight.isZero(0));
  CHECK(empty.value.bias.isZero(0));
}

TEST_CASE("backward: bad shapes throw shape_error naming the quantity", "[backward][errors]") {
  HeadAttention<double> layer(6, 4, 16, 71);
  const Matrix<double> x = random_matrix<double>(8, 6, 72);
  const Matrix<double> grad_out = random_matrix<double>(8, 4, 73);
  check_shape_error([&] { layer.backward(x, Matrix<double>(8, 5)); },
                    {"HeadAttention::backward", "grad_out shape", "[8, 4]", "[8, 5]"});
  check_shape_error([&] { layer.backward(x, Matrix<double>(7, 4)); }, {"grad_out shape", "[8, 4]", "[7, 4]"});
  check_shape_error([&] { layer.backward(Matrix<double>(8, 5), grad_out); },
                    {"x.cols() (input width)", "emb_size = 6", "5"});
  check_shape_error([&] { layer.backward(Matrix<double>(17, 6), Matrix<double>(17, 4)); },
                    {"max_seq_len = 16", "17"});
  check_shape_error([&] { layer.backward(x, grad_out, Batch(3)); },
                    {"x.rows()", "a multiple of batch = 3", "8"});
  check_shape_error([&] { layer.backward(x, grad_out, Batch(2, std::vector<Index>{4})); },
                    {"lengths.size()", "batch = 2", "1"});
  check_shape_error(
      [&] {
        layer.backward(x, grad_out, Batch(2, std::vector<Index>{4, 5}));
      },
      {"lengths[1]", "in [0, T = 4]", "5"});
  HeadAttention<double> broken = layer;
  broken.value().bias.resize(3);
  check_shape_error([&] { broken.backward(x, grad_out); }, {"value().bias size", "4", "3"});
  check_shape_error(
      [&] {
        head_attention::reference::backward(x, layer.query(), layer.key(), layer.value(),
                                            Matrix<double>(8, 3));
      },
      {"reference::backward", "grad_out shape", "[8, 4]", "[8, 3]"});
}

TEMPLATE_TEST_CASE("backward: PyTorch autograd's gradients (tests/fixtures/gradients)", "[backward][parity]",
                   float, double) {
  using Scalar = TestType;
  const double tolerance = std::is_same<Scalar, float>::value ? 1e-4 : 1e-9;
  for (const std::string& name : fixture_cases("gradients")) {
    const Fixture<Scalar> f = load_fixture<Scalar>(name, "gradients");
    const Tensor3<Scalar> x = f.x();
    const Eigen::Map<const Matrix<Scalar>> rows(x.data(), f.B * f.T, f.emb);  // [B·T, emb]
    const Eigen::Map<const Matrix<Scalar>> grad_out(f.tensor("grad_out", {f.B, f.T, f.head}).values.data(),
                                                    f.B * f.T, f.head);  // [B·T, head]
    std::vector<Index> lengths;
    for (Scalar l : f.tensor("lengths", {f.B}).values)
      lengths.push_back(static_cast<Index>(l));
    const Index window = static_cast<Index>(f.tensor("window", {1}).values[0]);
    for (const std::string mask : {"causal", "bidirectional", "window", "padded"}) {
      CAPTURE(name, mask);
      HeadAttention<Scalar> layer = f.layer();
      if (mask == "bidirectional") layer.set_mask_rule(MaskRule::bidirectional());
      if (mask == "window") layer.set_mask_rule(MaskRule::sliding_window(window));
      const Gradients<Scalar> g = mask == "padded" ? layer.backward(rows, grad_out, Batch(f.B, lengths))
                                                   : layer.backward(rows, grad_out, Batch(f.B));
      Gradients<double> torch;
      torch.input = Eigen::Map<const Matrix<Scalar>>(
                        f.tensor(mask + ".x.grad", {f.B, f.T, f.emb}).values.data(), f.B * f.T, f.emb)
                        .template cast<double>();
      for (auto [to, key] : {std::make_pair(&torch.query, "q"), std::make_pair(&torch.key, "k"),
                             std::make_pair(&torch.value, "v")}) {
        to->weight =
            Eigen::Map<const Matrix<Scalar>>(
                f.tensor(mask + "." + key + ".weight.grad", {f.head, f.emb}).values.data(), f.head, f.emb)
                .template cast<double>();
        to->bias = Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, 1>>(
                       f.tensor(mask + "." + key + ".bias.grad", {f.head}).values.data(), f.head)
                       .template cast<double>();
      }
      const double error = worst_error(g, torch);
      INFO("max |ours - torch| / max |torch| = " << error);
      CHECK(error < tolerance);
    }
  }
}

TEST_CASE("backward: BatchedHeadAttention takes and returns [B, T, ·] tensors", "[backward][batched]") {
  const Index B = 2, T = 12, emb = 7, head = 5;
  head_attention::BatchedHeadAttention<double> batched(emb, head, 16, 81);
  const Tensor3<double> x = random_tensor<double>(B, T, emb, 82);
  const Tensor3<double> grad_out = random_tensor<double>(B, T, head, 83);
  const Eigen::Map<const Matrix<double>> rows(x.data(), B * T, emb);
  const Eigen::Map<const Matrix<double>> grad_rows(grad_out.data(), B * T, head);
  const std::vector<Index> lengths = {12, 5};
  for (const bool padded : {false, true}) {
    CAPTURE(padded);
    const Gradients<double, Tensor3<double>> g =
        padded ? batched.backward(x, grad_out, lengths) : batched.backward(x, grad_out);
    const Gradients<double> flat = padded ? batched.head().backward(rows, grad_rows, Batch(B, lengths))
                                          : batched.head().backward(rows, grad_rows, Batch(B));
    REQUIRE(g.input.dimension(0) == B);
    REQUIRE(g.input.dimension(1) == T);
    REQUIRE(g.input.dimension(2) == emb);
    CHECK(identical(Eigen::Map<const Matrix<double>>(g.input.data(), B * T, emb), flat.input));
    CHECK(identical(g.query.weight, flat.query.weight));
    CHECK(identical(g.value.bias, flat.value.bias));
  }
  check_shape_error([&] { batched.backward(x, random_tensor<double>(B, T, head + 1, 84)); },
                    {"BatchedHeadAttention::backward", "grad_out shape", "[2, 12, 5]", "[2, 12, 6]"});
  check_shape_error([&] { batched.backward(x, grad_out, std::vector<Index>{3}); },
                    {"lengths.size()", "batch = 2"});
}

namespace {

using head_attention::MultiHeadAttention;
using head_attention::MultiHeadGradients;

/// Central differences of every parameter of mha and of x against g, for L = Σ forward(mha, x) ∘ R.
void check_multihead_finite_differences(
    MultiHeadAttention<double>& mha, Matrix<double>& x, const Matrix<double>& grad_out,
    const MultiHeadGradients<double>& g,
    const std::function<Matrix<double>(const MultiHeadAttention<double>&, const Matrix<double>&)>& forward) {
  const std::function<double()> loss = [&] { return (forward(mha, x).array() * grad_out.array()).sum(); };
  const auto check_linear = [&](const std::string& name, Linear<double>& param, const Linear<double>& grad) {
    Linear<double> fd;
    fd.weight = finite_differences(param.weight, loss);
    fd.bias = finite_differences(param.bias, loss);
    const double error = linear_error(grad, fd, g.input.cwiseAbs().maxCoeff());  // see worst_error
    INFO(name << " relative error " << error);
    CHECK(error < 1e-6);
  };
  REQUIRE(static_cast<Index>(g.heads.size()) == mha.num_heads());
  for (Index h = 0; h < mha.num_heads(); ++h) {
    const std::string at = "head " + std::to_string(h) + " ";
    check_linear(at + "query", mha.head(h).query(), g.heads[static_cast<std::size_t>(h)].query);
    check_linear(at + "key", mha.head(h).key(), g.heads[static_cast<std::size_t>(h)].key);
    check_linear(at + "value", mha.head(h).value(), g.heads[static_cast<std::size_t>(h)].value);
  }
  check_linear("projection", mha.projection(), g.projection);
  const double input_error = relative_error(g.input, finite_differences(x, loss));
  INFO("input relative error " << input_error);
  CHECK(input_error < 1e-6);
}

}  // namespace

TEST_CASE("backward: MultiHeadAttention, finite differences for every head, the projection and the input",
          "[backward][multihead]") {
  const std::string rule = GENERATE(as<std::string>(), "causal", "bidirectional", "sliding_window");
  CAPTURE(rule);
  const Index B = 2, T = 5;
  MultiHeadAttention<double> mha(3, 6, 2, 8, 0.1, 91, rule_named(rule));
  Matrix<double> x = random_matrix<double>(B * T, 6, 92);
  const Matrix<double> grad_out = random_matrix<double>(B * T, 6, 93);
  const MultiHeadGradients<double> g = mha.backward(x, grad_out, Batch(B));
  check_multihead_finite_differences(mha, x, grad_out, g,
                                     [&](const MultiHeadAttention<double>& m, const Matrix<double>& in) {
                                       Matrix<double> out(B * T, 6);
                                       m.forward_into(in, out, Batch(B));
                                       return out;
                                     });
}

TEST_CASE("backward: MultiHeadAttention with right padding, finite differences", "[backward][multihead]") {
  const Index B = 3, T = 5;
  const std::vector<Index> lengths = {5, 2, 0};
  MultiHeadAttention<double> mha(2, 4, 3, 8, 0.1, 98);
  Matrix<double> x = random_matrix<double>(B * T, 4, 99);
  const Matrix<double> grad_out = random_matrix<double>(B * T, 4, 100);
  const MultiHeadGradients<double> g = mha.backward(x, grad_out, Batch(B, lengths));
  check_multihead_finite_differences(mha, x, grad_out, g,
                                     [&](const MultiHeadAttention<double>& m, const Matrix<double>& in) {
                                       Matrix<double> out(B * T, 4);
                                       m.forward_into(in, out, Batch(B, lengths));
                                       return out;
                                     });
  check_shape_error(
      [&] {
        mha.backward(x, grad_out, Batch(B, std::vector<Index>{1, 2}));
      },
      {"MultiHeadAttention::backward", "lengths.size()", "batch = 3", "2"});
}

TEST_CASE("backward: MultiHeadAttention through dropout, finite differences with the mask of one seed",
          "[backward][multihead][dropout]") {
  const Index T = 7;
  const std::uint64_t seed = 94;
  MultiHeadAttention<double> mha(2, 5, 3, 8, 0.1, 95);
  mha.set_dropout(0.4);
  Matrix<double> x = random_matrix<double>(T, 5, 96);
  const Matrix<double> grad_out = random_matrix<double>(T, 5, 97);
  const MultiHeadGradients<double> g = mha.backward_training(x, grad_out, seed);
  check_multihead_finite_differences(mha, x, grad_out, g,
                                     [&](const MultiHeadAttention<double>& m, const Matrix<double>& in) {
                                       return m.forward_training(in, seed);
                                     });
  // And the mask really is there: without it the gradients differ.
  const MultiHeadGradients<double> eval = mha.backward(x, grad_out);
  CHECK(relative_error(eval.input, g.input) > 1e-3);
}

TEST_CASE("dropout: p = 0 is inference, kept fraction 1 - p, kept entries scaled by 1 / (1 - p)",
          "[multihead][dropout]") {
  MultiHeadAttention<double> mha(2, 64, 8, 256, 0.1, 101);
  CHECK(mha.dropout() == 0.1);  // simple_llm's default
  const Matrix<double> x = random_matrix<double>(200, 64, 102);
  const Matrix<double> eval = mha.forward(x);
  mha.set_dropout(0);
  CHECK(identical(mha.forward_training(x, 7), eval));
  for (const double p : {0.1, 0.5}) {
    CAPTURE(p);
    mha.set_dropout(p);
    const Matrix<double> train = mha.forward_training(x, 8);
    CHECK(identical(mha.forward_training(x, 8), train));        // the seed fixes the mask
    CHECK_FALSE(identical(mha.forward_training(x, 9), train));  // another seed, another mask
    Index kept = 0;
    double worst = 0;
    for (Index i = 0; i < train.size(); ++i) {
      if (train.data()[i] == 0) continue;
      ++kept;
      worst = std::max(worst, std::abs(train.data()[i] - eval.data()[i] / (1 - p)));
    }
    const double fraction = static_cast<double>(kept) / static_cast<double>(train.size());
    INFO("kept fraction " << fraction << " of " << train.size());
    // 12800 draws, fixed by the seed: 0.01 is 2.3 (p = 0.5) to 3.8 (p = 0.1) standard deviations.
    CHECK(std::abs(fraction - (1 - p)) < 0.01);
    CHECK(worst < 1e-15);
  }
  check_shape_error([&] { mha.set_dropout(1.0); }, {"MultiHeadAttention::set_dropout", "in [0, 1)"});
  check_shape_error([&] { mha.set_dropout(-0.1); }, {"in [0, 1)"});
  check_shape_error([&] { mha.backward(x, Matrix<double>(200, 63)); },
                    {"MultiHeadAttention::backward", "grad_out shape", "[200, 64]", "[200, 63]"});
}

TEMPLATE_TEST_CASE("backward: MultiHeadAttention against PyTorch autograd (eval mode)",
                   "[backward][multihead][parity]", float, double) {
  using Scalar = TestType;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  const double tolerance = std::is_same<Scalar, float>::value ? 1e-4 : 1e-9;
  for (const std::string& name : read_tokens(fixture_dir() + "/gradients/mha_cases.txt")) {
    CAPTURE(name);
    const Fixture<Scalar> f = load_fixture<Scalar>(name, "gradients");
    Index heads = 0;
    while (f.tensors.count("heads." + std::to_string(heads) + ".q.weight") != 0)
      ++heads;
    REQUIRE(heads > 0);
    const auto matrix = [&](const std::string& key, Index rows, Index cols) -> Matrix<Scalar> {
      return Eigen::Map<const Matrix<Scalar>>(f.tensor(key, {rows, cols}).values.data(), rows, cols);
    };
    const auto vector = [&](const std::string& key, Index size) -> Vector {
      return Eigen::Map<const Vector>(f.tensor(key, {size}).values.data(), size);
    };
    const auto linear = [&](const std::string& key, Index out, Index in, const std::string& suffix) {
      Linear<Scalar> l;
      l.weight = matrix(key + ".weight" + suffix, out, in);
      l.bias = vector(key + ".bias" + suffix, out);
      return l;
    };
    MultiHeadAttention<Scalar> mha(heads, f.emb, f.head, f.max_seq_len);
    for (Index h = 0; h < heads; ++h) {
      const std::string at = "heads." + std::to_string(h) + ".";
      mha.head(h).query() = linear(at + "q", f.head, f.emb, "");
      mha.head(h).key() = linear(at + "k", f.head, f.emb, "");
      mha.head(h).value() = linear(at + "v", f.head, f.emb, "");
    }
    mha.projection() = linear("projection", f.emb, heads * f.head, "");
    const Index rows = f.B * f.T;
    const Matrix<Scalar> x =
        Eigen::Map<const Matrix<Scalar>>(f.tensor("x", {f.B, f.T, f.emb}).values.data(), rows, f.emb);
    const Matrix<Scalar> grad_out =
        Eigen::Map<const Matrix<Scalar>>(f.tensor("grad_out", {f.B, f.T, f.emb}).values.data(), rows, f.emb);
    const MultiHeadGradients<Scalar> g = mha.backward(x, grad_out, Batch(f.B));
    const Matrix<Scalar> torch_input =
        Eigen::Map<const Matrix<Scalar>>(f.tensor("x.grad", {f.B, f.T, f.emb}).values.data(), rows, f.emb);
    double worst = relative_error(g.input, torch_input);
    for (Index h = 0; h < heads; ++h) {
      const std::string at = "heads." + std::to_string(h) + ".";
      const head_attention::HeadGradients<Scalar>& gh = g.heads[static_cast<std::size_t>(h)];
      worst = std::max({worst, linear_error(gh.query, linear(at + "q", f.head, f.emb, ".grad")),
                        linear_error(gh.key, linear(at + "k", f.head, f.emb, ".grad")),
                        linear_error(gh.value, linear(at + "v", f.head, f.emb, ".grad"))});
    }
    worst = std::max(worst, linear_error(g.projection, linear("projection", f.emb, heads * f.head, ".grad")));
    INFO("max |ours - torch| / max |torch| = " << worst);
    CHECK(worst < tolerance);
  }
}

TEST_CASE("backward: MultiHeadAttention bit-identical on 1 and 2 threads", "[backward][multihead][threads]") {
  if (!head_attention::detail::has_openmp) HA_SKIP("built without OpenMP: every call runs on one thread");
  // Two heads of one sequence of 3 key blocks: they go to 3 groups whose extra dQ accumulators do not fit in
  // dx's storage ((3 - 1) · 2 heads · 16 > 32 columns), the other storage path of the kernel.
  MultiHeadAttention<float> mha(2, 32, 16, 300, 0.1, 111);
  mha.set_dropout(0.2);
  const Matrix<float> x = random_matrix<float>(300, 32, 112);
  const Matrix<float> grad_out = random_matrix<float>(300, 32, 113);
  mha.set_num_threads(1);
  const MultiHeadGradients<float> one = mha.backward_training(x, grad_out, 5);
  mha.set_num_threads(2);
  const MultiHeadGradients<float> two = mha.backward_training(x, grad_out, 5);
  REQUIRE(head_attention::detail::last_team_size() == 2);
  CHECK(identical(two.input, one.input));
  CHECK(identical(two.projection.weight, one.projection.weight));
  CHECK(identical(two.projection.bias, one.projection.bias));
  for (std::size_t h = 0; h < 2; ++h) {
    CHECK(identical(two.heads[h].query.weight, one.heads[h].query.weight));
    CHECK(identical(two.heads[h].key.weight, one.heads[h].key.weight));
    CHECK(identical(two.heads[h].value.bias, one.heads[h].value.bias));
  }
}

// ---------------------------------------------------------------------------------------------------------
// The training state: a forward that keeps each row's output and logsumexp, and the backward that reuses
// them.

namespace {

using head_attention::TrainingState;

/// max |ours - expected| / max |expected| of one gradient, where a gradient that is 0 in exact arithmetic
/// (Q's and K's with a single key) and so only rounding noise in both (below 100 ε times the input gradient's
/// scale) is measured against the input gradient's scale instead.
template <typename A, typename B>
double noise_aware_error(const Eigen::MatrixBase<A>& ours, const Eigen::MatrixBase<B>& expected,
                         double input_scale) {
  const Matrix<double> o = ours.template cast<double>(), e = expected.template cast<double>();
  if (o.rows() != e.rows() || o.cols() != e.cols()) return std::numeric_limits<double>::infinity();
  if (o.size() == 0) return 0;
  const double diff = (o - e).cwiseAbs().maxCoeff();
  const double own = e.cwiseAbs().maxCoeff();
  using Scalar = typename A::Scalar;
  const double noise = 100 * static_cast<double>(std::numeric_limits<Scalar>::epsilon()) * input_scale;
  const double scale = own < noise ? input_scale : own;
  return diff == 0 ? 0 : diff / scale;
}

/// The same over a layer's weight and bias gradients together: the key bias's gradient is 0 in exact
/// arithmetic (softmax does not change when a row of scores is shifted), so alone it has no scale.
template <typename Scalar>
double noise_aware_error(const Linear<Scalar>& ours, const Linear<Scalar>& expected, double input_scale) {
  const auto stacked = [](const Linear<Scalar>& l) {
    Matrix<Scalar> m(l.weight.rows(), l.weight.cols() + 1);  // [out, in + 1] weight | bias
    m << l.weight, l.bias;
    return m;
  };
  if (ours.bias.size() != ours.weight.rows() || expected.bias.size() != expected.weight.rows())
    return std::numeric_limits<double>::infinity();
  return noise_aware_error(stacked(ours), stacked(expected), input_scale);
}

/// The largest relative error of two gradients of the same Scalar over the input and every parameter.
template <typename Scalar, typename Input>
double gradient_difference(const Gradients<Scalar, Input>& ours, const Gradients<Scalar, Input>& expected) {
  const Index emb = ours.query.weight.cols();
  const Eigen::Map<const Matrix<Scalar>> input(ours.input.data(), ours.input.size() / emb, emb);
  const Eigen::Map<const Matrix<Scalar>> expected_input(expected.input.data(), expected.input.size() / emb,
                                                        emb);
  const double scale = static_cast<double>(expected_input.cwiseAbs().maxCoeff());
  return std::max({noise_aware_error(input, expected_input, scale),
                   noise_aware_error(ours.query, expected.query, scale),
                   noise_aware_error(ours.key, expected.key, scale),
                   noise_aware_error(ours.value, expected.value, scale)});
}

/// The same for the multi-head layer: the input, every head's parameters and the output projection.
template <typename Scalar>
double gradient_difference(const MultiHeadGradients<Scalar>& ours,
                           const MultiHeadGradients<Scalar>& expected) {
  const double scale = static_cast<double>(expected.input.cwiseAbs().maxCoeff());
  double error = std::max(noise_aware_error(ours.input, expected.input, scale),
                          noise_aware_error(ours.projection, expected.projection, scale));
  if (ours.heads.size() != expected.heads.size()) return std::numeric_limits<double>::infinity();
  for (std::size_t h = 0; h < ours.heads.size(); ++h)
    error = std::max({error, noise_aware_error(ours.heads[h].query, expected.heads[h].query, scale),
                      noise_aware_error(ours.heads[h].key, expected.heads[h].key, scale),
                      noise_aware_error(ours.heads[h].value, expected.heads[h].value, scale)});
  return error;
}

template <typename Scalar>
double state_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
}

}  // namespace

TEMPLATE_TEST_CASE("training state: backward from forward_training's state equals the recomputing backward",
                   "[backward][state]", float, double) {
  using Scalar = TestType;
  const std::string rule = GENERATE(as<std::string>(), "causal", "bidirectional", "sliding_window");
  const Index T = GENERATE(1, 10, 65, 300);
  const Index B = GENERATE(1, 3);
  const bool padded = GENERATE(false, true);
  CAPTURE(rule, T, B, padded);
  HeadAttention<Scalar> layer(13, 7, 300, 41,
                              rule == "sliding_window" ? MaskRule::sliding_window(70) : rule_named(rule));
  const Matrix<Scalar> x = random_matrix<Scalar>(B * T, 13, 42, 2.0);
  const Matrix<Scalar> grad_out = random_matrix<Scalar>(B * T, 7, 43);
  std::vector<Index> lengths;
  for (Index b = 0; b < B; ++b)
    lengths.push_back(std::min<Index>(T, 40 / (b + 1) - 1));  // 39, 19, 12: and at T = 10 none for b = 0
  Matrix<Scalar> out(B * T, 7);
  if (padded)
    layer.forward_into(x, out, Batch(B, lengths));
  else
    layer.forward_into(x, out, Batch(B));
  const TrainingState<Scalar> state =
      padded ? layer.forward_training(x, Batch(B, lengths)) : layer.forward_training(x, Batch(B));
  CHECK(identical(state.output, out));  // the forward output, bit for bit
  REQUIRE(state.lse.size() == B * T);
  const Gradients<Scalar> with = padded ? layer.backward(x, grad_out, state, Batch(B, lengths))
                                        : layer.backward(x, grad_out, state, Batch(B));
  const Gradients<Scalar> without =
      padded ? layer.backward(x, grad_out, Batch(B, lengths)) : layer.backward(x, grad_out, Batch(B));
  const double error = gradient_difference(with, without);
  INFO("worst relative error " << error);
  CHECK(error < state_tolerance<Scalar>());
  if (B == 1 && !padded) {  // the single-sequence overloads are the same call
    const TrainingState<Scalar> single = layer.forward_training(x);
    CHECK(identical(single.output, state.output));
    CHECK(identical(single.lse, state.lse));
    const Gradients<Scalar> g = layer.backward(x, grad_out, single);
    CHECK(identical(g.input, with.input));
    CHECK(identical(g.key.weight, with.key.weight));
  }
}

TEST_CASE("training state: lse is each row's logsumexp of Q Kᵀ / sqrt(head) over its visible keys",
          "[backward][state]") {
  const Index T = 20;
  HeadAttention<double> layer(9, 4, 32, 44, MaskRule::sliding_window(6));
  const Matrix<double> x = random_matrix<double>(2 * T, 9, 45, 2.0);
  const std::vector<Index> lengths = {T, 0};  // the second sequence sees no key at all
  const TrainingState<double> state = layer.forward_training(x, Batch(2, lengths));
  const Matrix<double> xs = x.topRows(T);
  const Matrix<double> q = (xs * layer.query().weight.transpose()).rowwise() + layer.query().bias.transpose();
  const Matrix<double> k = (xs * layer.key().weight.transpose()).rowwise() + layer.key().bias.transpose();
  const Matrix<double> scores = q * k.transpose() / 2.0;  // sqrt(4)
  for (Index i = 0; i < T; ++i) {
    double sum = 0;
    for (Index j = 0; j < T; ++j)
      if (layer.mask_rule().visible(i, j, T)) sum += std::exp(scores(i, j));
    CHECK(std::abs(state.lse[i] - std::log(sum)) < 1e-12 * std::max(1.0, std::abs(std::log(sum))));
  }
  for (Index i = T; i < 2 * T; ++i)
    CHECK(state.lse[i] == std::numeric_limits<double>::infinity());  // no visible key
  CHECK(state.output.bottomRows(T).isZero(0));
}

TEST_CASE("training state: BatchedHeadAttention, with and without padding", "[backward][state][batched]") {
  const Index B = 3, T = 70, emb = 7, head = 5;
  head_attention::BatchedHeadAttention<float> batched(emb, head, 80, 46);
  const Tensor3<float> x = random_tensor<float>(B, T, emb, 47);
  const Tensor3<float> grad_out = random_tensor<float>(B, T, head, 48);
  const std::vector<Index> lengths = {70, 33, 0};
  for (const bool padded : {false, true}) {
    CAPTURE(padded);
    const Tensor3<float> out = padded ? batched.forward(x, lengths) : batched.forward(x);
    const TrainingState<float> state =
        padded ? batched.forward_training(x, lengths) : batched.forward_training(x);
    CHECK(identical(state.output, Eigen::Map<const Matrix<float>>(out.data(), B * T, head)));
    const Gradients<float, Tensor3<float>> with =
        padded ? batched.backward(x, grad_out, state, lengths) : batched.backward(x, grad_out, state);
    const Gradients<float, Tensor3<float>> without =
        padded ? batched.backward(x, grad_out, lengths) : batched.backward(x, grad_out);
    const double error = gradient_difference(with, without);
    INFO("worst relative error " << error);
    CHECK(error < state_tolerance<float>());
  }
}

TEMPLATE_TEST_CASE("training state: MultiHeadAttention through dropout, every rule",
                   "[backward][state][multihead]", float, double) {
  using Scalar = TestType;
  const std::string rule = GENERATE(as<std::string>(), "causal", "bidirectional", "sliding_window");
  CAPTURE(rule);
  const Index B = 2, T = 130, emb = 12, heads = 3;
  MultiHeadAttention<Scalar> mha(heads, emb, 4, 200, 0.1, 49,
                                 rule == "sliding_window" ? MaskRule::sliding_window(50) : rule_named(rule));
  mha.set_dropout(0.25);
  const Matrix<Scalar> x = random_matrix<Scalar>(B * T, emb, 50, 2.0);
  const Matrix<Scalar> grad_out = random_matrix<Scalar>(B * T, emb, 51);
  TrainingState<Scalar> state;
  const Matrix<Scalar> out = mha.forward_training(x, 7, state, Batch(B));
  CHECK(identical(out, mha.forward_training(x, 7, Batch(B))));  // bit for bit the stateless training forward
  REQUIRE(state.output.rows() == B * T);
  REQUIRE(state.output.cols() == heads * 4);
  REQUIRE(state.lse.size() == heads * B * T);
  // The concatenation is what each head's forward gives.
  for (Index h = 0; h < heads; ++h) {
    Matrix<Scalar> head_out(B * T, 4);
    mha.head(h).forward_into(x, head_out, Batch(B));
    CHECK(relative_error(state.output.middleCols(h * 4, 4), head_out) < rounding_tolerance<Scalar>());
  }
  const MultiHeadGradients<Scalar> with = mha.backward_training(x, grad_out, 7, state, Batch(B));
  const MultiHeadGradients<Scalar> without = mha.backward_training(x, grad_out, 7, Batch(B));
  const double error = gradient_difference(with, without);
  INFO("worst relative error " << error);
  CHECK(error < state_tolerance<Scalar>());
  // One sequence: the overloads without batch.
  TrainingState<Scalar> single;
  const Matrix<Scalar> x1 = x.topRows(T), grad1 = grad_out.topRows(T);
  CHECK(identical(mha.forward_training(x1, 3, single), mha.forward_training(x1, 3)));
  CHECK(gradient_difference(mha.backward_training(x1, grad1, 3, single),
                            mha.backward_training(x1, grad1, 3)) < state_tolerance<Scalar>());
}

TEST_CASE("training state: a state of the wrong shape throws shape_error", "[backward][state][errors]") {
  HeadAttention<double> layer(6, 4, 16, 52);
  const Matrix<double> x = random_matrix<double>(8, 6, 53);
  const Matrix<double> grad_out = random_matrix<double>(8, 4, 54);
  const TrainingState<double> state = layer.forward_training(x);
  TrainingState<double> bad = state;
  bad.output.resize(8, 5);
  check_shape_error([&] { layer.backward(x, grad_out, bad); },
                    {"HeadAttention::backward", "state.output shape", "[8, 4]", "[8, 5]"});
  bad = state;
  bad.lse.resize(7);
  check_shape_error([&] { layer.backward(x, grad_out, bad); }, {"state.lse size", "8", "7"});
  check_shape_error([&] { layer.backward(x.topRows(4), grad_out.topRows(4), state); },
                    {"state.output shape", "[4, 4]", "[8, 4]"});

  head_attention::BatchedHeadAttention<double> batched(6, 4, 16, 55);
  const Tensor3<double> xt = random_tensor<double>(2, 4, 6, 56);
  const Tensor3<double> gt = random_tensor<double>(2, 4, 4, 57);
  check_shape_error([&] { batched.backward(xt, gt, bad); },
                    {"BatchedHeadAttention::backward", "state.lse size", "8", "7"});

  MultiHeadAttention<double> mha(2, 6, 3, 16, 0.1, 58);
  TrainingState<double> mstate;
  mha.forward_training(x, 1, mstate);
  REQUIRE(mstate.lse.size() == 16);
  check_shape_error(
      [&] { mha.backward_training(x, grad_out.leftCols(4).replicate(1, 2).leftCols(6), 1, state); },
      {"MultiHeadAttention::backward", "state.output shape", "[8, 6]", "[8, 4]"});
  mstate.lse.resize(8);
  check_shape_error([&] { mha.backward_training(x, random_matrix<double>(8, 6, 59), 1, mstate); },
                    {"state.lse size", "16", "8"});
  // A failed forward_training leaves the state as it was.
  const TrainingState<double> before = mstate;
  check_shape_error([&] { mha.forward_training(Matrix<double>(8, 5), 1, mstate); }, {"emb_size = 6"});
  CHECK(identical(mstate.output, before.output));
  CHECK(identical(mstate.lse, before.lse));
}

// Linear::forward / operator(): y = x Wᵀ + b as nn.Linear computes it, against an independent double loop.
#include <cstdint>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;

/// y[r][o] = b[o] + sum_i x[r][i] W[o][i], every term in double, in plain loops (not Eigen's products).
template <typename Scalar>
std::vector<double> reference_linear(const Matrix<Scalar>& x, const head_attention::Linear<Scalar>& layer) {
  const Index rows = x.rows(), in = x.cols(), out = layer.weight.rows();
  std::vector<double> y(static_cast<std::size_t>(rows * out));
  for (Index r = 0; r < rows; ++r)
    for (Index o = 0; o < out; ++o) {
      double sum = static_cast<double>(layer.bias(o));
      for (Index i = 0; i < in; ++i)
        sum += static_cast<double>(x(r, i)) * static_cast<double>(layer.weight(o, i));
      y[static_cast<std::size_t>(r * out + o)] = sum;
    }
  return y;
}

/// max |ours - reference| / max |reference|.
template <typename Scalar>
double error_against(const Matrix<Scalar>& ours, const std::vector<double>& reference) {
  double diff = 0, scale = 0;
  for (Index k = 0; k < ours.size(); ++k) {
    const double r = reference[static_cast<std::size_t>(k)];
    diff = std::max(diff, std::abs(static_cast<double>(ours.data()[k]) - r));
    scale = std::max(scale, std::abs(r));
  }
  return diff / scale;
}

template <typename Scalar>
head_attention::Linear<Scalar> random_linear(Index in, Index out, std::uint64_t seed) {
  head_attention::Linear<Scalar> layer;
  layer.weight = random_matrix<Scalar>(out, in, seed);
  layer.bias = random_matrix<Scalar>(1, out, seed + 1).transpose();
  return layer;
}

}  // namespace

TEMPLATE_TEST_CASE("Linear::forward is x W^T + b, as nn.Linear", "[linear]", float, double) {
  using Scalar = TestType;
  for (const Index rows : {1, 3, 17}) {
    for (const Index in : {1, 16, 37}) {
      const Index out = in == 1 ? 5 : 2 * in + 3;
      const std::uint64_t seed = 1000 + static_cast<std::uint64_t>(rows * 100 + in);
      INFO(scalar_name<Scalar>() << " rows " << rows << " in " << in << " out " << out << " seed " << seed);
      const head_attention::Linear<Scalar> layer = random_linear<Scalar>(in, out, seed);
      const Matrix<Scalar> x = random_matrix<Scalar>(rows, in, seed + 2);
      const Matrix<Scalar> y = layer.forward(x);
      REQUIRE(y.rows() == rows);
      REQUIRE(y.cols() == out);
      CHECK(error_against(y, reference_linear(x, layer)) < rounding_tolerance<Scalar>());
      // The call operator is forward, and an expression (a block of a larger matrix) is read as it is.
      CHECK(identical(layer(x), y));
      const Matrix<Scalar> wide = random_matrix<Scalar>(rows + 2, in + 4, seed + 3);
      const Matrix<Scalar> block = wide.block(1, 2, rows, in);
      CHECK(identical(layer(wide.block(1, 2, rows, in)), layer(block)));
    }
  }
}

TEST_CASE("Linear::forward of a 16-bit layer computes in float and rounds once", "[linear]") {
  using Half = Eigen::half;
  head_attention::Linear<Half> layer;
  const Matrix<float> w = random_matrix<float>(9, 20, 31);
  const Matrix<float> b = random_matrix<float>(1, 9, 32);
  const Matrix<float> x = random_matrix<float>(4, 20, 33);
  layer.weight = w.cast<Half>();
  layer.bias = b.transpose().cast<Half>();
  const Matrix<Half> x_half = x.cast<Half>();
  const Matrix<Half> y = layer.forward(x_half);
  // The double reference on the same (rounded) inputs: the only error left is y's final rounding to half.
  head_attention::Linear<double> wide;
  wide.weight = layer.weight.cast<double>();
  wide.bias = layer.bias.cast<double>();
  const std::vector<double> reference = reference_linear<double>(x_half.cast<double>(), wide);
  CHECK(error_against(y, reference) < 1e-3);  // half's unit roundoff is 4.9e-4
}

TEST_CASE("Linear::forward: no rows give no rows", "[linear]") {
  const head_attention::Linear<float> layer = random_linear<float>(6, 4, 7);
  const Matrix<float> y = layer.forward(Matrix<float>(0, 6));
  CHECK(y.rows() == 0);
  CHECK(y.cols() == 4);
}

TEST_CASE("Linear::forward refuses a wrong input width or bias size", "[linear]") {
  head_attention::Linear<double> layer = random_linear<double>(6, 4, 8);
  const Matrix<double> x = random_matrix<double>(2, 5, 9);
  check_shape_error([&] { (void)layer.forward(x); }, {"Linear::forward", "x.cols()", "in_features = 6", "5"});
  layer.bias.resize(3);
  const Matrix<double> good = random_matrix<double>(2, 6, 10);
  check_shape_error([&] { (void)layer(good); }, {"Linear::forward", "bias size", "out_features = 4", "3"});
}

// The fused, tiled fast path against head_attention::reference, the seed module step by step, on many shapes:
// sequence lengths on both sides of the query block and key block edges (detail::Tuning), odd widths,
// head_size > emb_size, and the 512/64 shape of a real model.
#include <cstdint>
#include <iostream>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;

template <typename Scalar>
double reference_tolerance() {
  return std::is_same<Scalar, float>::value ? 2e-5 : 1e-12;
}

struct Width {
  Index emb, head;
};

constexpr Index kQueryBlock = head_attention::detail::Tuning::query_block;
constexpr Index kKeyBlock = head_attention::detail::Tuning::key_block;
const std::vector<Index> kLengths = {1,
                                     2,
                                     kQueryBlock - 1,
                                     kQueryBlock,
                                     kQueryBlock + 1,
                                     2 * kQueryBlock - 1,
                                     kKeyBlock - 1,
                                     kKeyBlock,
                                     kKeyBlock + 1,
                                     300,
                                     kKeyBlock + kQueryBlock + 1,
                                     1000};
const std::vector<Width> kWidths = {{8, 4}, {13, 7}, {5, 12}, {64, 64}, {512, 64}};

}  // namespace

TEMPLATE_TEST_CASE("fast path equals the reference", "[reference]", float, double) {
  using Scalar = TestType;
  const double tolerance = reference_tolerance<Scalar>();
  double worst = 0;
  for (const Width& w : kWidths) {
    for (const Index T : kLengths) {
      const std::uint64_t seed = static_cast<std::uint64_t>(1000 * w.emb + 10 * w.head + T);
      INFO(scalar_name<Scalar>() << ": T " << T << ", emb " << w.emb << ", head " << w.head << ", seed "
                                 << seed);
      // max_seq_len = T for half the lengths (the mask at its largest), larger for the others.
      const Index max_seq_len = T % 2 == 0 ? T : T + 17;
      const head_attention::HeadAttention<Scalar> layer(w.emb, w.head, max_seq_len, seed);
      const Matrix<Scalar> x = random_matrix<Scalar>(T, w.emb, seed, 2.0);
      const Matrix<Scalar> fast = layer.forward(x);
      const Matrix<Scalar> ref =
          head_attention::reference::forward(x, layer.query(), layer.key(), layer.value());
      REQUIRE(fast.rows() == T);
      REQUIRE(fast.cols() == w.head);
      REQUIRE(fast.allFinite());
      const double error = relative_error(fast, ref);
      CHECK(error <= tolerance);
      worst = std::max(worst, error);
    }
  }
  std::cout << "[reference] " << scalar_name<Scalar>()
            << ": worst max|fast - reference| / max|reference| over " << kWidths.size() * kLengths.size()
            << " shapes: " << worst << " (bound " << tolerance << ")\n";
}

TEMPLATE_TEST_CASE("batched fast path equals the reference per sequence", "[reference]", float, double) {
  using Scalar = TestType;
  const Index B = 3;
  for (const Index T : {Index(1), Index(65), Index(257)}) {
    const std::uint64_t seed = 77 + static_cast<std::uint64_t>(T);
    INFO("B " << B << ", T " << T << ", seed " << seed);
    const head_attention::BatchedHeadAttention<Scalar> batched(24, 10, T, seed);
    const Tensor3<Scalar> x = random_tensor<Scalar>(B, T, 24, seed);
    const Tensor3<Scalar> out = batched.forward(x);
    const auto& layer = batched.head();
    for (Index b = 0; b < B; ++b) {
      INFO("sequence " << b);
      const Matrix<Scalar> ref =
          head_attention::reference::forward(sequence(x, b), layer.query(), layer.key(), layer.value());
      CHECK(relative_error(sequence(out, b), ref) <= reference_tolerance<Scalar>());
    }
  }
}

TEMPLATE_TEST_CASE("reference of an empty sequence", "[reference]", float, double) {
  using Scalar = TestType;
  const head_attention::HeadAttention<Scalar> layer(6, 3, 4);
  const Matrix<Scalar> out =
      head_attention::reference::forward(Matrix<Scalar>(0, 6), layer.query(), layer.key(), layer.value());
  CHECK(out.rows() == 0);
  CHECK(out.cols() == 3);
}

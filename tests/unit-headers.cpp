// What the headers bring in, and the GEMM underneath the kernel in whichever form this build uses.
#include <head_attention/attention.hpp>

// The Tensor module (unsupported/Eigen/CXX11/Tensor) costs every translation unit that includes it about
// 0.6 s of compile time: matrix-only users of HeadAttention must not pay for it. Only batched.hpp needs it.
#if defined(EIGEN_CXX11_TENSOR_TENSOR_H)
#error "head_attention/attention.hpp must not include the Eigen Tensor module"
#endif

#include <array>
#include <cstdint>
#include <random>
#include <type_traits>

#include <Eigen/Core>

#include "catch_compat.hpp"

namespace {

using Index = Eigen::Index;
template <typename Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <typename Scalar, int Order>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Order> random(Index rows, Index cols,
                                                                    std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Order> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j)
      m(i, j) = static_cast<Scalar>(uniform(engine));
  return m;
}

/// Gemm::accumulate on blocks of larger storage (strided operands and result) against a double-precision
/// product of the same numbers.
template <typename Scalar, int LhsOrder, int RhsOrder>
void check_gemm(Index m, Index n, Index k) {
  using Lhs = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, LhsOrder>;
  using Rhs = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, RhsOrder>;
  const Lhs lhs = random<Scalar, LhsOrder>(m + 3, k + 5, 1);  // the operand is its top-left [m, k] block
  const Rhs rhs = random<Scalar, RhsOrder>(k + 2, n + 4, 2);
  RowMatrix<Scalar> res = random<Scalar, Eigen::RowMajor>(m, n + 7, 3);
  const RowMatrix<Scalar> before = res;

  head_attention::detail::Gemm<Scalar> gemm(m, n, k);
  gemm.template accumulate<LhsOrder, RhsOrder>(m, n, k, lhs.data(), lhs.outerStride(), rhs.data(),
                                               rhs.outerStride(), res.data(), res.outerStride());

  const Eigen::MatrixXd expected =
      before.leftCols(n).template cast<double>() +
      lhs.topLeftCorner(m, k).template cast<double>() * rhs.topLeftCorner(k, n).template cast<double>();
  const double tolerance = (std::is_same<Scalar, float>::value ? 1e-5 : 1e-13) * static_cast<double>(k);
  INFO("m " << m << ", n " << n << ", k " << k);
  CHECK((res.leftCols(n).template cast<double>() - expected).cwiseAbs().maxCoeff() <= tolerance);
  CHECK(res.rightCols(7) == before.rightCols(7));  // nothing outside the result block is written
}

}  // namespace

TEST_CASE("the Gemm form matches the build", "[headers]") {
#if defined(HEAD_ATTENTION_GEMM_FALLBACK)
  CHECK_FALSE(head_attention::detail::gemm_uses_eigen_internals);
#elif EIGEN_VERSION_AT_LEAST(3, 4, 0) && !EIGEN_VERSION_AT_LEAST(3, 4, 90)
  CHECK(head_attention::detail::gemm_uses_eigen_internals);
#else
  CHECK_FALSE(head_attention::detail::gemm_uses_eigen_internals);
#endif
  WARN("Gemm: " << (head_attention::detail::gemm_uses_eigen_internals ? "Eigen 3.4 internals"
                                                                      : "public-API fallback"));
}

TEMPLATE_TEST_CASE("Gemm accumulates lhs times rhs onto a strided result", "[headers]", float, double) {
  using Scalar = TestType;
  for (const auto& size : {std::array<Index, 3>{1, 1, 1}, std::array<Index, 3>{7, 5, 3},
                           std::array<Index, 3>{64, 256, 64}, std::array<Index, 3>{300, 64, 200}}) {
    check_gemm<Scalar, Eigen::RowMajor, Eigen::ColMajor>(size[0], size[1], size[2]);
    check_gemm<Scalar, Eigen::RowMajor, Eigen::RowMajor>(size[0], size[1], size[2]);
    check_gemm<Scalar, Eigen::ColMajor, Eigen::ColMajor>(size[0], size[1], size[2]);
  }
}

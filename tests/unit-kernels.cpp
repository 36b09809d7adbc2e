// The forward pass's building blocks on their own: the register-blocked GEMM (detail::gemm_nn) against a
// long-double triple loop, the blocked transpose (detail::transpose_into) against plain indexing, over
// shapes that hit every remainder of the tiles (rows, packets, depth blocks) and strided storage, and the
// softmax's exponentials (detail::exp_sum) against long-double exp.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <random>
#include <vector>

#include <head_attention/detail/flash.hpp>
#include <head_attention/detail/microkernel.hpp>

#include "catch_compat.hpp"

namespace {

using Index = Eigen::Index;
namespace detail = head_attention::detail;

template <typename Scalar>
std::vector<Scalar> random_values(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<Scalar> v(n);
  for (Scalar& x : v)
    x = static_cast<Scalar>(dist(gen));
  return v;
}

/// C = C0 + A · B through gemm_nn with every operand padded (leading dimensions beyond the sizes), checked
/// element by element against a long-double sum within the usual bound k · eps · Σ|a||b| (times 2), and the
/// padding left untouched. A is row-major, or column-major when col_major_a. With a bias, C = bias + A · B
/// (C0 must not matter).
template <typename Scalar>
void check_gemm(Index m, Index n, Index k, bool col_major_a, bool with_bias = false) {
  const Index lda = col_major_a ? m + 3 : k + 5, ldb = n + 2, ldc = n + 7;
  const std::size_t a_size = static_cast<std::size_t>(col_major_a ? lda * k : lda * m);
  const std::vector<Scalar> a = random_values<Scalar>(a_size, 1u + static_cast<unsigned>(m + 7 * n + 31 * k));
  const std::vector<Scalar> b = random_values<Scalar>(static_cast<std::size_t>(ldb * k), 2u);
  const std::vector<Scalar> c0 = random_values<Scalar>(static_cast<std::size_t>(ldc * m), 3u);
  const std::vector<Scalar> bias = random_values<Scalar>(static_cast<std::size_t>(n), 4u);
  std::vector<Scalar> c = c0;
  const auto a_at = [&](Index i, Index p) {
    return a[static_cast<std::size_t>(col_major_a ? i + p * lda : i * lda + p)];
  };
  const Scalar* bias_or_null = with_bias ? bias.data() : nullptr;
  if (col_major_a)
    detail::gemm_nn(m, n, k, a.data(), 1, b.data(), ldb, c.data(), ldc, lda, bias_or_null);
  else
    detail::gemm_nn(m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc, 1, bias_or_null);

  const long double eps = std::numeric_limits<Scalar>::epsilon();
  int wrong = 0, padding_changed = 0;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < ldc; ++j) {
      const std::size_t at = static_cast<std::size_t>(i * ldc + j);
      if (j >= n) {
        padding_changed += c[at] != c0[at];
        continue;
      }
      const Scalar start = with_bias ? bias[static_cast<std::size_t>(j)] : c0[at];
      long double sum = start, magnitude = std::fabs(static_cast<long double>(start));
      for (Index p = 0; p < k; ++p) {
        const long double term = static_cast<long double>(a_at(i, p)) *
                                 static_cast<long double>(b[static_cast<std::size_t>(p * ldb + j)]);
        sum += term;
        magnitude += std::fabs(term);
      }
      const long double bound = 2 * static_cast<long double>(k + 1) * eps * magnitude;
      wrong += std::fabs(static_cast<long double>(c[at]) - sum) > bound;
    }
  INFO("m = " << m << ", n = " << n << ", k = " << k << (col_major_a ? ", A column-major" : ", A row-major")
              << (with_bias ? ", with a bias" : ""));
  CHECK(wrong == 0);
  CHECK(padding_changed == 0);
}

}  // namespace

TEMPLATE_TEST_CASE("gemm_nn: C += A·B against a long-double reference, every remainder", "[kernels]", float,
                   double) {
  using Scalar = TestType;
  for (const Index m : {1, 2, 3, 5, 6, 7, 11, 12, 13, 20, 64})
    for (const Index n : {1, 7, 16, 17, 33, 64, 65, 100})
      for (const Index k : {1, 3, 64, 257})
        check_gemm<Scalar>(m, n, k, false);
  for (const Index m : {1, 6, 13})
    for (const Index n : {5, 64, 192})
      for (const Index k : {2, 255, 256, 600})
        for (const bool col_major : {false, true})
          check_gemm<Scalar>(m, n, k, col_major);
}

TEMPLATE_TEST_CASE("gemm_nn with a bias: C = bias + A·B, C not read", "[kernels]", float, double) {
  using Scalar = TestType;
  for (const Index m : {1, 5, 6, 13})
    for (const Index n : {3, 16, 64, 65, 192})
      for (const Index k : {0, 1, 64, 257, 600})
        for (const bool col_major : {false, true})
          check_gemm<Scalar>(m, n, k, col_major, true);
}

TEMPLATE_TEST_CASE("gemm_nn: a row's result does not depend on which rows it is computed with", "[kernels]",
                   float, double) {
  // The forward pass cuts rows into chunks by input size only; this property makes even that cut invisible.
  if (!detail::gemm_uses_eigen_internals)
    HA_SKIP("the Gemm fallback is Eigen's public product, which rounds a row by the shape it is part of");
  using Scalar = TestType;
  constexpr Index m = 23, n = 70, k = 300;
  const std::vector<Scalar> a = random_values<Scalar>(m * k, 4u), b = random_values<Scalar>(k * n, 5u);
  std::vector<Scalar> all(m * n, Scalar(0)), split(m * n, Scalar(0));
  detail::gemm_nn(m, n, k, a.data(), k, b.data(), n, all.data(), n);
  for (Index r0 = 0, step = 1; r0 < m; r0 += step, step = step % 7 + 1)
    detail::gemm_nn(std::min(step, m - r0), n, k, a.data() + r0 * k, k, b.data(), n, split.data() + r0 * n,
                    n);
  CHECK(all == split);
}

TEMPLATE_TEST_CASE("transpose_into: exact, edges included, padding untouched", "[kernels]", float, double) {
  using Scalar = TestType;
  for (const Index rows : {1, 4, 8, 15, 16, 17, 64})
    for (const Index cols : {1, 3, 8, 16, 31, 512}) {
      const Index src_stride = cols + 3, dst_stride = rows + 2;
      const std::vector<Scalar> src = random_values<Scalar>(static_cast<std::size_t>(rows * src_stride), 6u);
      std::vector<Scalar> dst(static_cast<std::size_t>(cols * dst_stride), Scalar(-7));
      detail::transpose_into(src.data(), src_stride, rows, cols, dst.data(), dst_stride);
      int wrong = 0;
      for (Index c = 0; c < cols; ++c)
        for (Index r = 0; r < dst_stride; ++r) {
          const Scalar expected = r < rows ? src[static_cast<std::size_t>(r * src_stride + c)] : Scalar(-7);
          wrong += dst[static_cast<std::size_t>(c * dst_stride + r)] != expected;
        }
      INFO("rows = " << rows << ", cols = " << cols);
      CHECK(wrong == 0);
    }
}

TEMPLATE_TEST_CASE("exp_sum: each exp(p - shift) within 2 ulp of long-double exp, their sum, and the edges",
                   "[kernels]", float, double) {
  using Scalar = TestType;
  const long double eps = std::numeric_limits<Scalar>::epsilon();
  const long double tiny = std::numeric_limits<Scalar>::min();  // below it the kernel may give 0
  std::mt19937 gen(11u);
  std::uniform_real_distribution<double> dist(-100.0, 0.0);
  int checked = 0;
  for (const Scalar shift : {Scalar(0), Scalar(0.75), Scalar(-3.5)})
    for (Index n = 0; n <= 70; ++n) {  // every packet remainder, with a scalar tail
      std::vector<Scalar> p(static_cast<std::size_t>(n) + 1, Scalar(-7));  // one past the end: untouched
      for (Index i = 0; i < n; ++i)
        p[static_cast<std::size_t>(i)] = static_cast<Scalar>(dist(gen)) + shift;
      std::vector<long double> expected(static_cast<std::size_t>(n));
      long double expected_sum = 0;
      for (Index i = 0; i < n; ++i) {  // the kernel's own argument: p - shift rounded to Scalar
        const Scalar x = p[static_cast<std::size_t>(i)] - shift;
        expected[static_cast<std::size_t>(i)] = std::exp(static_cast<long double>(x));
        expected_sum += expected[static_cast<std::size_t>(i)];
      }
      const Scalar sum = detail::exp_sum(p.data(), n, shift);
      int wrong = 0;
      for (Index i = 0; i < n; ++i) {
        const long double e = expected[static_cast<std::size_t>(i)];
        const long double got = p[static_cast<std::size_t>(i)];
        wrong += e >= tiny ? std::fabs(got - e) > 2 * eps * e : !(got >= 0 && got <= tiny);
        ++checked;
      }
      INFO("n = " << n << ", shift = " << shift);
      CHECK(wrong == 0);
      CHECK(p[static_cast<std::size_t>(n)] == Scalar(-7));
      CHECK(std::fabs(static_cast<long double>(sum) - expected_sum) <=
            2 * (n + 2) * eps * expected_sum + n * tiny);
    }
  CHECK(checked == 3 * 70 * 71 / 2);

  // Edges, in a packet and in the scalar tail: exp(0) = 1, exp(-inf) = 0, far below the normal range 0, NaN
  // stays NaN.
  const Scalar inf = std::numeric_limits<Scalar>::infinity(), nan = std::numeric_limits<Scalar>::quiet_NaN();
  const std::vector<Scalar> edges = {Scalar(0), -inf, Scalar(-1000), nan, Scalar(-0.0), Scalar(-1e30)};
  // As entries 0 to 5 of 70 (in packets), or 64 to 69 (the scalar tail: exp_sum takes packets in pairs, and
  // 70 is a multiple of no pair's width).
  for (const std::size_t at : {std::size_t(0), std::size_t(64)}) {
    std::vector<Scalar> p(70, Scalar(-1));
    std::copy(edges.begin(), edges.end(), p.begin() + static_cast<std::ptrdiff_t>(at));
    const Scalar sum = detail::exp_sum(p.data(), static_cast<Index>(p.size()), Scalar(0));
    INFO("edges from entry " << at);
    CHECK(p[at] == Scalar(1));
    CHECK(p[at + 1] == Scalar(0));
    CHECK(p[at + 2] == Scalar(0));
    CHECK(std::isnan(p[at + 3]));
    CHECK(p[at + 4] == Scalar(1));
    CHECK(p[at + 5] == Scalar(0));
    CHECK(std::isnan(sum));
  }
}

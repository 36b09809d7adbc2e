// The forward pass's building blocks on their own: the register-blocked GEMM (detail::gemm_nn) against a
// long-double triple loop, the blocked transpose (detail::transpose_into) against plain indexing, over
// shapes that hit every remainder of the tiles (rows, packets, depth blocks) and strided storage, and the
// softmax's exponentials (detail::exp_sum) against long-double exp.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
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

namespace {

/// out = (bias + x · Wᵀ) · scale through project_rows over the weight rows [o0, o1) of W [out, in] stored as
/// Stored (float, double, or 16 bits for a float computation), x and out padded; checked element by element
/// against a long-double sum of the same (widened) values within 2 (in + 2) · eps · Σ|terms|, and the padding
/// of out left untouched. Returns the outputs [rows, o1 - o0] (leading dimension o1 - o0 + 3).
template <typename Scalar, typename Stored = Scalar>
std::vector<Scalar> check_project_rows(Index rows, Index in, Index out, Index o0, Index o1, Scalar scale) {
  const Index ldx = in + 5, ldo = o1 - o0 + 3;
  const unsigned seed = 7u + static_cast<unsigned>(rows + 13 * in + 101 * out);
  const std::vector<Scalar> x = random_values<Scalar>(static_cast<std::size_t>(rows * ldx), seed);
  const std::vector<Scalar> w_values = random_values<Scalar>(static_cast<std::size_t>(out * in), seed + 1);
  const std::vector<Scalar> b_values = random_values<Scalar>(static_cast<std::size_t>(out), seed + 2);
  std::vector<Stored> w(w_values.size()), b(b_values.size());
  for (std::size_t i = 0; i < w.size(); ++i)
    w[i] = static_cast<Stored>(w_values[i]);
  for (std::size_t i = 0; i < b.size(); ++i)
    b[i] = static_cast<Stored>(b_values[i]);
  detail::WeightRows layer;
  layer.weight = w.data();
  layer.bias = b.data();
  layer.weight_precision = layer.bias_precision = head_attention::precision_of<Stored>();
  const Scalar sentinel = Scalar(12345);
  std::vector<Scalar> y(static_cast<std::size_t>(rows * ldo), sentinel);
  detail::project_rows(x.data(), ldx, rows, layer, in, o0, o1, scale, y.data(), ldo);

  const long double eps = std::numeric_limits<Scalar>::epsilon();
  const auto wide = [](Stored v) { return static_cast<long double>(static_cast<Scalar>(v)); };
  int wrong = 0, padding_changed = 0;
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < ldo; ++j) {
      const Scalar got = y[static_cast<std::size_t>(r * ldo + j)];
      if (j >= o1 - o0) {
        padding_changed += got != sentinel;
        continue;
      }
      const Index o = o0 + j;
      long double sum = wide(b[static_cast<std::size_t>(o)]), magnitude = std::fabs(sum);
      for (Index k = 0; k < in; ++k) {
        const long double term = static_cast<long double>(x[static_cast<std::size_t>(r * ldx + k)]) *
                                 wide(w[static_cast<std::size_t>(o * in + k)]);
        sum += term;
        magnitude += std::fabs(term);
      }
      const long double want = sum * static_cast<long double>(scale);
      long double bound = 2 * static_cast<long double>(in + 2) * eps * magnitude * std::fabs(scale);
      // With AVX512_BF16, x meets bfloat16 weights split into two bfloat16 (detail::split_bf16): each x
      // within 2^-16 of itself (a single bfloat16 would be 2^-8 off, and fail this for small `in`).
      if (HEAD_ATTENTION_DOT_BF16 &&
          head_attention::precision_of<Stored>() == head_attention::Precision::bfloat16)
        bound += std::ldexp(1.0L, -16) * magnitude * std::fabs(scale);
      wrong += !(std::fabs(static_cast<long double>(got) - want) <= bound);
    }
  INFO("rows = " << rows << ", in = " << in << ", out = " << out << ", o0 = " << o0 << ", o1 = " << o1
                 << ", weights of " << sizeof(Stored) << " bytes");
  CHECK(wrong == 0);
  CHECK(padding_changed == 0);
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("project_rows: (bias + x·Wᵀ)·scale against a long-double reference, every remainder",
                   "[kernels]", float, double) {
  using Scalar = TestType;
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(3));
  // rows around Tuning::rowdot_rows; in around every packet width and its two-packet steps; blocks of
  // weight rows of every group remainder, starting anywhere.
  for (Index rows = 1; rows <= detail::Tuning::rowdot_rows + 1; ++rows)
    for (const Index in : {1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 517})
      for (const Index out : {1, 2, 3, 4, 5, 9, 33}) {
        check_project_rows<Scalar>(rows, in, out, 0, out, rows % 2 == 0 ? Scalar(1) : scale);
        if (out > 2) check_project_rows<Scalar>(rows, in, out, 1, out - 1, scale);
      }
}

TEST_CASE("project_rows: 16-bit weights and biases, read as stored, against a long-double reference",
          "[kernels][precision]") {
  for (const Index rows : {1, 2, 5, 9})
    for (const Index in : {1, 5, 8, 16, 24, 33, 64, 130, 512})
      for (const Index out : {1, 4, 7, 33}) {
        check_project_rows<float, Eigen::half>(rows, in, out, 0, out, 0.125f);
        check_project_rows<float, Eigen::bfloat16>(rows, in, out, 0, out, 0.125f);
        if (out > 1) check_project_rows<float, Eigen::bfloat16>(rows, in, out, 1, out, 1.0f);
      }
}

TEMPLATE_TEST_CASE("project_rows: an output's bits do not depend on its block of weight rows or of x rows",
                   "[kernels]", float, double) {
  // The forward pass cuts weight rows into blocks by shape (and threads take any block): the cut must not
  // show, nor must the number of rows of x a call has.
  using Scalar = TestType;
  for (const Index in : {3, 16, 67, 512}) {
    constexpr Index rows = 7, out = 70;
    const std::vector<Scalar> x = random_values<Scalar>(static_cast<std::size_t>(rows * in), 31u);
    const std::vector<Scalar> w = random_values<Scalar>(static_cast<std::size_t>(out * in), 32u);
    const std::vector<Scalar> b = random_values<Scalar>(static_cast<std::size_t>(out), 33u);
    detail::WeightRows layer;
    layer.weight = w.data();
    layer.bias = b.data();
    layer.weight_precision = layer.bias_precision = head_attention::precision_of<Scalar>();
    const Scalar scale = Scalar(0.3);
    std::vector<Scalar> all(rows * out), split(rows * out, Scalar(0)), single(rows * out, Scalar(0));
    detail::project_rows(x.data(), in, rows, layer, in, 0, out, scale, all.data(), out);
    for (Index o0 = 0, step = 1; o0 < out; o0 += step, step = step % 6 + 1)
      detail::project_rows(x.data(), in, rows, layer, in, o0, std::min(out, o0 + step), scale,
                           split.data() + o0, out);
    for (Index r = 0; r < rows; ++r)
      detail::project_rows(x.data() + r * in, in, 1, layer, in, 0, out, scale, single.data() + r * out, out);
    INFO("in = " << in);
    CHECK(all == split);
    CHECK(all == single);
  }
}

TEMPLATE_TEST_CASE("project_rows: 16-bit weights give the bits of their float widening",
                   "[kernels][precision]", Eigen::half, Eigen::bfloat16) {
  // Widening is exact and the 16-bit path runs the float path's sums. Not bfloat16 with AVX512_BF16, whose
  // vdpbf16ps sums (detail::dot_block_bf16) are sums of their own.
  using Narrow = TestType;
  if (!detail::gemm_uses_eigen_internals)
    HA_SKIP("the portable path is Eigen's dot product, which may vectorise a cast expression differently");
  if (HEAD_ATTENTION_DOT_BF16 && std::is_same<Narrow, Eigen::bfloat16>::value)
    HA_SKIP("bfloat16 weights take vdpbf16ps (AVX512_BF16)");
  for (const Index in : {5, 64, 100, 512}) {
    constexpr Index rows = 3, out = 9;
    const std::vector<float> x = random_values<float>(static_cast<std::size_t>(rows * in), 41u);
    const std::vector<float> w32 = random_values<float>(static_cast<std::size_t>(out * in), 42u);
    std::vector<Narrow> w16(w32.size());
    std::vector<float> widened(w32.size());
    for (std::size_t i = 0; i < w32.size(); ++i) {
      w16[i] = Narrow(w32[i]);
      widened[i] = static_cast<float>(w16[i]);
    }
    const std::vector<float> b = random_values<float>(static_cast<std::size_t>(out), 43u);
    detail::WeightRows narrow{w16.data(), head_attention::precision_of<Narrow>(), b.data(),
                              head_attention::Precision::float32};
    detail::WeightRows wide{widened.data(), head_attention::Precision::float32, b.data(),
                            head_attention::Precision::float32};
    std::vector<float> a(rows * out), c(rows * out);
    detail::project_rows(x.data(), in, rows, narrow, in, 0, out, 0.5f, a.data(), out);
    detail::project_rows(x.data(), in, rows, wide, in, 0, out, 0.5f, c.data(), out);
    CHECK(a == c);
  }
}

TEMPLATE_TEST_CASE("project_rows: NaN and Inf reach exactly the outputs that read them",
                   "[kernels][nonfinite]", float, double) {
  using Scalar = TestType;
  constexpr Index rows = 4, in = 37, out = 11;
  std::vector<Scalar> x = random_values<Scalar>(static_cast<std::size_t>(rows * in), 51u);
  std::vector<Scalar> w = random_values<Scalar>(static_cast<std::size_t>(out * in), 52u);
  const std::vector<Scalar> b = random_values<Scalar>(static_cast<std::size_t>(out), 53u);
  x[static_cast<std::size_t>(1 * in + 36)] = std::numeric_limits<Scalar>::quiet_NaN();  // row 1, the tail
  w[static_cast<std::size_t>(6 * in + 3)] = std::numeric_limits<Scalar>::infinity();    // weight row 6
  detail::WeightRows layer{w.data(), head_attention::precision_of<Scalar>(), b.data(),
                           head_attention::precision_of<Scalar>()};
  std::vector<Scalar> y(rows * out);
  detail::project_rows(x.data(), in, rows, layer, in, 0, out, Scalar(1), y.data(), out);
  for (Index r = 0; r < rows; ++r)
    for (Index o = 0; o < out; ++o) {
      const Scalar v = y[static_cast<std::size_t>(r * out + o)];
      INFO("row " << r << ", output " << o);
      if (r == 1)
        CHECK(std::isnan(v));
      else if (o == 6)
        CHECK(!std::isfinite(v));
      else
        CHECK(std::isfinite(v));
    }
}

#if defined(__AVX512F__)
TEST_CASE("lane_sums8: eight vectors summed at once, the same bits as eight _mm512_reduce_add_ps",
          "[kernels][precision]") {
  for (unsigned seed = 0; seed < 50; ++seed) {
    // Magnitudes from 1e-6 to 1e6 and both signs: each order of the additions rounds differently.
    std::vector<float> v = random_values<float>(8 * 16, 90u + seed);
    for (std::size_t i = 0; i < v.size(); ++i)
      v[i] *= std::pow(10.0f, static_cast<float>(static_cast<int>((i * 7 + seed) % 13) - 6));
    __m512 a[8];
    for (int j = 0; j < 8; ++j)
      a[j] = _mm512_loadu_ps(v.data() + 16 * j);
    float sums[8];
    _mm256_storeu_ps(sums, detail::lane_sums8(a));
    for (int j = 0; j < 8; ++j) {
      INFO("seed " << seed << ", vector " << j);
      const float one_at_a_time = _mm512_reduce_add_ps(a[j]);
      CHECK(std::memcmp(&sums[j], &one_at_a_time, sizeof(float)) == 0);
#if defined(EIGEN_VECTORIZE_AVX512DQ)
      const float eigen = Eigen::internal::predux(a[j]);  // dot_block's sums before lane_sums8
      CHECK(std::memcmp(&sums[j], &eigen, sizeof(float)) == 0);
#endif
      long double exact = 0;
      for (int l = 0; l < 16; ++l)
        exact += v[static_cast<std::size_t>(16 * j + l)];
      long double scale = 0;
      for (int l = 0; l < 16; ++l)
        scale += std::fabs(static_cast<long double>(v[static_cast<std::size_t>(16 * j + l)]));
      CHECK(std::fabs(static_cast<long double>(sums[j]) - exact) <= 16 * 6e-8L * scale);
    }
  }
}
#endif  // __AVX512F__

#if HEAD_ATTENTION_DOT_BF16

namespace {

/// Bits of a bfloat16 as stored.
std::vector<std::uint16_t> bf16_bits(const std::vector<float>& v) {
  std::vector<std::uint16_t> bits(v.size());
  for (std::size_t i = 0; i < v.size(); ++i)
    bits[i] = Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(v[i]));
  return bits;
}

float bf16_value(std::uint16_t bits) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(bits));
}

}  // namespace

TEST_CASE("vdpbf16ps: float x · bfloat16 rows within 2^-16 of the double sums, x not bfloat16",
          "[kernels][precision]") {
  // x keeps bits below bfloat16's 8 (x · (1 + 2^-11) for a start), so that hi alone is off by up to 2^-8 of
  // each term: the bound below fails then for short rows (checked on the data itself: `hi_only` breaks it).
  for (const Index in : {1, 2, 7, 31, 32, 33, 64, 100, 512, 1030}) {
    constexpr Index rows = 3, out = 11;
    std::vector<float> x = random_values<float>(static_cast<std::size_t>(rows * in), 61u);
    for (float& v : x)
      v *= 1.0f + std::ldexp(1.0f, -11);
    const std::vector<std::uint16_t> w =
        bf16_bits(random_values<float>(static_cast<std::size_t>(out * in), 62u));
    const std::vector<float> zeros(out, 0.0f);
    detail::WeightRows layer{w.data(), head_attention::Precision::bfloat16, zeros.data(),
                             head_attention::Precision::float32};
    std::vector<float> y(rows * out);
    detail::project_rows(x.data(), in, rows, layer, in, 0, out, 1.0f, y.data(), out);
    // The query's scores over a bfloat16 cache, the same kernel: keys at a stride past their length.
    const Index stride = in + 3;
    std::vector<std::uint16_t> keys(static_cast<std::size_t>(out * stride), 0x7fc0);  // NaN padding
    for (Index o = 0; o < out; ++o)
      std::copy_n(w.begin() + o * in, in, keys.begin() + o * stride);
    std::vector<float> scores(out);
    if (in % 8 == 0)
      detail::dot_rows16(head_attention::Precision::bfloat16, x.data(), keys.data(), stride, out, in,
                         scores.data());
    const double allowed = std::ldexp(1.0, -16) + 2.0 * double(in + 2) * std::ldexp(1.0, -24);
    double worst = 0, worst_hi_only = 0;
    for (Index r = 0; r < rows; ++r)
      for (Index o = 0; o < out; ++o) {
        double sum = 0, hi_only = 0, magnitude = 0;
        for (Index k = 0; k < in; ++k) {
          const double xv = x[static_cast<std::size_t>(r * in + k)];
          const double wv = bf16_value(w[static_cast<std::size_t>(o * in + k)]);
          sum += xv * wv;
          hi_only += double(static_cast<float>(Eigen::bfloat16(static_cast<float>(xv)))) * wv;
          magnitude += std::fabs(xv * wv);
        }
        worst = std::max(worst, std::fabs(y[static_cast<std::size_t>(r * out + o)] - sum) / magnitude);
        if (r == 0 && in % 8 == 0)
          worst = std::max(worst, std::fabs(scores[static_cast<std::size_t>(o)] - sum) / magnitude);
        worst_hi_only = std::max(worst_hi_only, std::fabs(hi_only - sum) / magnitude);
      }
    INFO("in = " << in << ": worst " << worst << ", hi alone " << worst_hi_only << ", allowed " << allowed);
    CHECK(worst <= allowed);
    if (in <= 64) CHECK(worst_hi_only > allowed);  // longer sums' allowance for rounding covers hi alone too
  }
}

TEST_CASE("vdpbf16ps: the lo pass of an x that is bfloat16 changes no bit, nor do rows of x together",
          "[kernels][precision]") {
  for (const Index in : {5, 32, 67, 512}) {
    constexpr Index rows = 7, out = 21, G = 8;
    // Rows 0, 3, 4 are bfloat16 (lo all zero: skipped); the others are not: pairs of each kind and mixed.
    std::vector<float> x = random_values<float>(static_cast<std::size_t>(rows * in), 71u);
    for (const Index r : {0, 3, 4})
      for (Index k = 0; k < in; ++k)
        x[static_cast<std::size_t>(r * in + k)] =
            static_cast<float>(Eigen::bfloat16(x[static_cast<std::size_t>(r * in + k)]));
    const std::vector<std::uint16_t> w =
        bf16_bits(random_values<float>(static_cast<std::size_t>(out * in), 72u));
    const std::vector<float> b = random_values<float>(static_cast<std::size_t>(out), 73u);
    detail::WeightRows layer{w.data(), head_attention::Precision::bfloat16, b.data(),
                             head_attention::Precision::float32};
    std::vector<float> all(rows * out), single(rows * out);
    detail::project_rows(x.data(), in, rows, layer, in, 0, out, 0.25f, all.data(), out);
    for (Index r = 0; r < rows; ++r)
      detail::project_rows(x.data() + r * in, in, 1, layer, in, 0, out, 0.25f, single.data() + r * out, out);
    INFO("in = " << in);
    CHECK(all == single);
    // The skip itself: row 0 with and without its (zero) lo pass.
    const Index stride = detail::bf16_split_stride(in);
    std::vector<std::uint16_t> hi(static_cast<std::size_t>(stride)), lo(static_cast<std::size_t>(stride));
    CHECK(!detail::split_bf16(x.data(), in, hi.data(), lo.data()));
    CHECK(std::all_of(lo.begin(), lo.end(), [](std::uint16_t v) { return v == 0; }));
    CHECK(detail::split_bf16(x.data() + in, in, hi.data() + 0, lo.data()));  // row 1 is not bfloat16
    CHECK(!detail::split_bf16(x.data(), in, hi.data(), lo.data()));
    float with[G], without[G];
    detail::dot_block_bf16<1, G, true>(hi.data(), lo.data(), 0, w.data(), in, in, with, G);
    detail::dot_block_bf16<1, G, false>(hi.data(), lo.data(), 0, w.data(), in, in, without, G);
    CHECK(std::equal(with, with + G, without));
  }
}

TEST_CASE("vdpbf16ps: NaN, Inf and x past bfloat16's range give what float arithmetic gives",
          "[kernels][nonfinite]") {
  constexpr Index rows = 4, in = 37, out = 11;
  std::vector<float> x = random_values<float>(static_cast<std::size_t>(rows * in), 81u);
  std::vector<float> w_values = random_values<float>(static_cast<std::size_t>(out * in), 82u);
  for (float& v : w_values)
    v = v >= 0 ? v + 0.5f : v - 0.5f;  // no weight near zero: x · w stays infinite
  const std::vector<float> b(out, 0.0f);
  x[static_cast<std::size_t>(1 * in + 36)] = std::numeric_limits<float>::quiet_NaN();  // row 1, the tail
  x[static_cast<std::size_t>(2 * in + 5)] = std::numeric_limits<float>::infinity();    // row 2
  // Row 3: x up to float's largest, where rounding to bfloat16 alone would overflow to inf; tiny weights.
  for (Index k = 0; k < in; ++k)
    x[static_cast<std::size_t>(3 * in + k)] =
        std::numeric_limits<float>::max() * (k % 2 == 0 ? 1.0f : -0.75f);
  std::vector<std::uint16_t> w = bf16_bits(w_values);
  for (Index k = 0; k < in; ++k)
    w[static_cast<std::size_t>(4 * in + k)] = Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(1e-30f));
  detail::WeightRows layer{w.data(), head_attention::Precision::bfloat16, b.data(),
                           head_attention::Precision::float32};
  std::vector<float> y(rows * out);
  detail::project_rows(x.data(), in, rows, layer, in, 0, out, 1.0f, y.data(), out);
  for (Index o = 0; o < out; ++o) {
    INFO("output " << o);
    CHECK(std::isnan(y[static_cast<std::size_t>(1 * out + o)]));
    const float wv = bf16_value(w[static_cast<std::size_t>(o * in + 5)]);
    CHECK(y[static_cast<std::size_t>(2 * out + o)] ==
          (wv > 0 ? 1.0f : -1.0f) * std::numeric_limits<float>::infinity());
    CHECK(std::isfinite(y[static_cast<std::size_t>(0 * out + o)]));
  }
  // Σ x · 1e-30 over row 3: about 19 · 3.4e38 · 1e-30 - 18 · 0.75 · 3.4e38 · 1e-30, finite.
  const double want =
      (19.0 - 18.0 * 0.75) * double(std::numeric_limits<float>::max()) * double(bf16_value(w[4 * in]));
  CHECK(std::fabs(y[static_cast<std::size_t>(3 * out + 4)] - want) <= 1e-4 * std::fabs(want));
}

#endif  // HEAD_ATTENTION_DOT_BF16

#if HEAD_ATTENTION_FUSED_16BIT

TEMPLATE_TEST_CASE("weighted_rows16: each output the chain of FMAs over the rows, whatever the vector width",
                   "[kernels][precision]", Eigen::half, Eigen::bfloat16) {
  // A decode step's P·V over a 16-bit cache: 512-bit, 256-bit and scalar code must give the same bits.
  using Narrow = TestType;
  constexpr auto precision = head_attention::precision_of<Narrow>();
  for (const Index head : {8, 24, 64, 72, 136}) {
    constexpr Index rows = 19;
    const Index stride = head + 8;
    const std::vector<float> p = random_values<float>(static_cast<std::size_t>(rows), 91u);
    const std::vector<float> v_values = random_values<float>(static_cast<std::size_t>(rows * stride), 92u);
    std::vector<std::uint16_t> v(v_values.size());
    for (std::size_t i = 0; i < v.size(); ++i)
      v[i] = Eigen::numext::bit_cast<std::uint16_t>(Narrow(v_values[i]));
    std::vector<float> acc = random_values<float>(static_cast<std::size_t>(head), 93u), want = acc;
    detail::weighted_rows16(precision, p.data(), v.data(), stride, rows, head, acc.data());
    for (Index d = 0; d < head; ++d)
      for (Index j = 0; j < rows; ++j)
        want[static_cast<std::size_t>(d)] = std::fma(
            p[static_cast<std::size_t>(j)],
            static_cast<float>(Eigen::numext::bit_cast<Narrow>(v[static_cast<std::size_t>(j * stride + d)])),
            want[static_cast<std::size_t>(d)]);
    INFO("head = " << head);
    CHECK(acc == want);
  }
}

#endif  // HEAD_ATTENTION_FUSED_16BIT

TEMPLATE_TEST_CASE("dot_keys: a decode query's scores over a cache against a long-double reference",
                   "[kernels]", float, double) {
  // Every group remainder (keys 8 at a time, 4 with 16 registers), heads that are multiples of the packets
  // and others, and a key's score the same bits wherever its range of keys starts: decode steps cut the keys
  // into ranges by shape (flash-decoding) and a sliding window moves the start.
  using Scalar = TestType;
  for (const Index head : {8, 16, 32, 48, 64, 72, 96, 100, 128, 144})
    for (const Index rows : {1, 2, 7, 15, 16, 17, 31, 33, 50}) {
      const std::vector<Scalar> q = random_values<Scalar>(static_cast<std::size_t>(head), 101u);
      const std::vector<Scalar> k = random_values<Scalar>(static_cast<std::size_t>(rows * head), 102u);
      std::vector<Scalar> scores(static_cast<std::size_t>(rows) + 1, Scalar(7));
      detail::dot_keys(q.data(), k.data(), rows, head, scores.data());
      double worst = 0;
      for (Index j = 0; j < rows; ++j) {
        long double sum = 0, magnitude = 0;
        for (Index d = 0; d < head; ++d) {
          const long double term = static_cast<long double>(q[static_cast<std::size_t>(d)]) *
                                   static_cast<long double>(k[static_cast<std::size_t>(j * head + d)]);
          sum += term;
          magnitude += std::fabs(term);
        }
        worst = std::max(
            worst,
            static_cast<double>(
                std::fabs(static_cast<long double>(scores[static_cast<std::size_t>(j)]) - sum) / magnitude));
      }
      const double allowed = 2.0 * double(head) * double(std::numeric_limits<Scalar>::epsilon());
      INFO("head = " << head << ", rows = " << rows << ": worst " << worst << ", allowed " << allowed);
      CHECK(worst <= allowed);
      CHECK(scores[static_cast<std::size_t>(rows)] == Scalar(7));  // nothing written past the last key
      for (Index start = 1; start < std::min<Index>(rows, 18); ++start) {
        std::vector<Scalar> later(static_cast<std::size_t>(rows - start));
        detail::dot_keys(q.data(), k.data() + start * head, rows - start, head, later.data());
        INFO("from key " << start);
        CHECK(std::equal(later.begin(), later.end(), scores.begin() + start));
      }
    }
}

#if HEAD_ATTENTION_KEY_SCORES_16
namespace {

/// attend_keys over `rows` keys and values at stride, checked against long-double softmax attention: the
/// normalised output acc / sum within 8 · head · eps of Σ|p v| (relative to the largest), and the sum
/// against Σ exp(s − max) taken at the max the kernel returned.
void check_attend_keys(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                       Index stride, Index rows, Index head) {
  float max = 0, sum = 0;
  std::vector<float> acc(static_cast<std::size_t>(head) + 1, 7.0f);
  REQUIRE(detail::attend_keys(q.data(), k.data(), v.data(), stride, rows, head, &max, &sum, acc.data()));
  CHECK(acc[static_cast<std::size_t>(head)] == 7.0f);  // nothing written past the head
  std::vector<long double> scores(static_cast<std::size_t>(rows));
  for (Index j = 0; j < rows; ++j) {
    long double s = 0;
    for (Index d = 0; d < head; ++d)
      s += static_cast<long double>(q[static_cast<std::size_t>(d)]) *
           k[static_cast<std::size_t>(j * stride + d)];
    scores[static_cast<std::size_t>(j)] = s;
  }
  const long double true_max = *std::max_element(scores.begin(), scores.end());
  CHECK(std::fabs(static_cast<long double>(max) - true_max) <= 1e-5L * (1 + std::fabs(true_max)));
  long double weight_sum = 0;
  std::vector<long double> out(static_cast<std::size_t>(head), 0.0L), magnitude(out);
  for (Index j = 0; j < rows; ++j) {
    const long double p = std::exp(scores[static_cast<std::size_t>(j)] - static_cast<long double>(max));
    weight_sum += p;
    for (Index d = 0; d < head; ++d) {
      const long double term = p * v[static_cast<std::size_t>(j * stride + d)];
      out[static_cast<std::size_t>(d)] += term;
      magnitude[static_cast<std::size_t>(d)] += std::fabs(term);
    }
  }
  INFO("head = " << head << ", rows = " << rows << ", stride = " << stride);
  CHECK(std::fabs(static_cast<long double>(sum) - weight_sum) <= 1e-5L * weight_sum);
  const long double eps = std::numeric_limits<float>::epsilon();
  for (Index d = 0; d < head; ++d) {
    const long double want = out[static_cast<std::size_t>(d)] / weight_sum;
    const long double got = static_cast<long double>(acc[static_cast<std::size_t>(d)]) / sum;
    CHECK(std::fabs(got - want) <=
          8 * (head + rows) * eps * magnitude[static_cast<std::size_t>(d)] / weight_sum);
  }
}

}  // namespace

TEST_CASE("attend_keys: scores, softmax and values in one pass against a long-double reference",
          "[kernels]") {
  // Every group remainder, heads of every packet count, rows padded past the head, and scores that grow along
  // the keys (the accumulator rescaled at every group) or shrink (never).
  for (const Index head : {16, 32, 48, 64, 128})
    for (const Index rows : {1, 2, 15, 16, 17, 33, 100, 300})
      for (const Index pad : {0, 16}) {
        const Index stride = head + pad;
        const std::vector<float> q = random_values<float>(static_cast<std::size_t>(head), 121u);
        std::vector<float> k = random_values<float>(static_cast<std::size_t>(rows * stride), 122u);
        const std::vector<float> v = random_values<float>(static_cast<std::size_t>(rows * stride), 123u);
        check_attend_keys(q, k, v, stride, rows, head);
        for (const float direction : {1.0f, -1.0f}) {
          std::vector<float> ramp = k;  // score j ≈ ±j / 4 plus noise
          for (Index j = 0; j < rows; ++j)
            for (Index d = 0; d < head; ++d)
              ramp[static_cast<std::size_t>(j * stride + d)] +=
                  direction * 0.25f * float(j) / (float(head) * q[static_cast<std::size_t>(d)]);
          check_attend_keys(q, ramp, v, stride, rows, head);
        }
      }
  float max = 0, sum = 0;
  std::vector<float> acc(64);
  CHECK_FALSE(detail::attend_keys(acc.data(), acc.data(), acc.data(), 72, 1, 72, &max, &sum, acc.data()));
}

TEST_CASE("attend_keys: -inf scores weigh nothing, unless all are; a NaN or +inf score makes the sum NaN",
          "[kernels][nonfinite]") {
  const Index head = 64, rows = 50;
  std::vector<float> q = random_values<float>(head, 131u);
  q[0] = 1.0f;
  const std::vector<float> k = random_values<float>(static_cast<std::size_t>(rows * head), 132u);
  const std::vector<float> v = random_values<float>(static_cast<std::size_t>(rows * head), 133u);
  const float inf = std::numeric_limits<float>::infinity();
  const auto run = [&](const std::vector<float>& keys, Index begin, Index count, std::vector<float>& acc) {
    float max = 0, sum = 0;
    acc.assign(head, 0.0f);
    detail::attend_keys(q.data(), keys.data() + begin * head, v.data() + begin * head, head, count, head,
                        &max, &sum, acc.data());
    for (float& a : acc)
      a /= sum;
    return sum;
  };
  std::vector<float> minus = k;  // keys 0..19 score -inf (more than a group), the rest as k
  for (Index j = 0; j < 20; ++j)
    minus[static_cast<std::size_t>(j * head)] = -inf;
  std::vector<float> with_minus, without;
  CHECK(std::isfinite(run(minus, 0, rows, with_minus)));
  run(k, 20, rows - 20, without);
  for (Index d = 0; d < head; ++d)  // the same keys seen, within rounding (the max met in another order)
    CHECK(std::fabs(with_minus[static_cast<std::size_t>(d)] - without[static_cast<std::size_t>(d)]) <= 1e-6f);
  std::vector<float> scratch;
  CHECK(std::isnan(run(minus, 0, 20, scratch)));  // every score -inf: as softmax, NaN
  std::vector<float> nan_early = minus;           // a NaN among the leading -inf scores, then finite ones
  nan_early[static_cast<std::size_t>(3 * head + 5)] = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(run(nan_early, 0, rows, scratch)));
  std::vector<float> nan_late = k;
  nan_late[static_cast<std::size_t>(37 * head + 9)] = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(run(nan_late, 0, rows, scratch)));
  std::vector<float> plus = k;
  plus[static_cast<std::size_t>(25 * head)] = inf;
  CHECK(std::isnan(run(plus, 0, rows, scratch)));
}
#endif  // HEAD_ATTENTION_KEY_SCORES_16

#if HEAD_ATTENTION_FUSED_16BIT
TEMPLATE_TEST_CASE("dot_rows16: a key's score over a 16-bit cache does not depend on where its range starts",
                   "[kernels][precision]", Eigen::half, Eigen::bfloat16) {
  using Narrow = TestType;
  constexpr auto precision = head_attention::precision_of<Narrow>();
  for (const Index head : {8, 32, 64, 96, 128, 160})
    for (const Index rows : {1, 5, 16, 17, 40}) {
      const Index stride = head + 8;
      const std::vector<float> q = random_values<float>(static_cast<std::size_t>(head), 111u);
      const std::vector<float> k_values = random_values<float>(static_cast<std::size_t>(rows * stride), 112u);
      std::vector<std::uint16_t> k(k_values.size());
      for (std::size_t i = 0; i < k.size(); ++i)
        k[i] = Eigen::numext::bit_cast<std::uint16_t>(Narrow(k_values[i]));
      std::vector<float> scores(static_cast<std::size_t>(rows));
      detail::dot_rows16(precision, q.data(), k.data(), stride, rows, head, scores.data());
      for (Index j = 0; j < rows; ++j) {  // a coarse check that each score is its key's (the bounds: above)
        double sum = 0, magnitude = 0;
        for (Index d = 0; d < head; ++d) {
          const double term = double(q[static_cast<std::size_t>(d)]) *
                              double(static_cast<float>(Eigen::numext::bit_cast<Narrow>(
                                  k[static_cast<std::size_t>(j * stride + d)])));
          sum += term;
          magnitude += std::fabs(term);
        }
        CHECK(std::fabs(scores[static_cast<std::size_t>(j)] - sum) <= 1e-4 * magnitude);
      }
      for (Index start = 1; start < std::min<Index>(rows, 18); ++start) {
        std::vector<float> later(static_cast<std::size_t>(rows - start));
        detail::dot_rows16(precision, q.data(), k.data() + start * stride, stride, rows - start, head,
                           later.data());
        INFO("head = " << head << ", rows = " << rows << ", from key " << start);
        CHECK(std::equal(later.begin(), later.end(), scores.begin() + start));
      }
    }
}
#endif  // HEAD_ATTENTION_FUSED_16BIT

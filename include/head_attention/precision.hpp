/// \file
/// head-attention: the element types layers and KV caches store, and the conversions between them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <Eigen/Core>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace head_attention {

/// An element type of stored values. Layers store their weights, inputs and outputs in their Scalar (float,
/// double, Eigen::half or Eigen::bfloat16); a KV cache stores keys and values in the precision chosen when it
/// is made.
enum class Precision { float64, float32, float16, bfloat16 };

/// The precision of a Scalar type: float64 for double, float32 for float, float16 for Eigen::half, bfloat16
/// for Eigen::bfloat16.
template <typename Scalar>
constexpr Precision precision_of() {
  static_assert(std::is_same<Scalar, double>::value || std::is_same<Scalar, float>::value ||
                    std::is_same<Scalar, Eigen::half>::value || std::is_same<Scalar, Eigen::bfloat16>::value,
                "head_attention: Scalar must be double, float, Eigen::half or Eigen::bfloat16");
  if constexpr (std::is_same<Scalar, double>::value) return Precision::float64;
  if constexpr (std::is_same<Scalar, float>::value) return Precision::float32;
  if constexpr (std::is_same<Scalar, Eigen::half>::value) return Precision::float16;
  return Precision::bfloat16;
}

/// "float64", "float32", "float16" or "bfloat16".
inline const char* precision_name(Precision p) {
  switch (p) {
    case Precision::float64:
      return "float64";
    case Precision::float32:
      return "float32";
    case Precision::float16:
      return "float16";
    default:
      return "bfloat16";
  }
}

/// Bytes per element.
inline std::size_t precision_bytes(Precision p) {
  return p == Precision::float64 ? 8 : p == Precision::float32 ? 4 : 2;
}

namespace detail {

/// Whether a layer can be built over Scalar.
template <typename Scalar>
constexpr bool is_layer_scalar =
    std::is_same<Scalar, double>::value || std::is_same<Scalar, float>::value ||
    std::is_same<Scalar, Eigen::half>::value || std::is_same<Scalar, Eigen::bfloat16>::value;

/// The type a layer over Scalar computes in: Scalar itself for float and double, float for the two 16-bit
/// types (their products and softmax run in float on converted tiles: Eigen's scalar-emulated half
/// arithmetic is slow and rounds every partial sum to 16 bits).
template <typename Scalar>
struct Compute {
  using type = Scalar;
};
template <>
struct Compute<Eigen::half> {
  using type = float;
};
template <>
struct Compute<Eigen::bfloat16> {
  using type = float;
};
template <typename Scalar>
using compute_t = typename Compute<Scalar>::type;

template <typename T>
using RowMajorMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// dst[0, n) = the bfloat16 values at src (their bits) widened to float: exact, a 16-bit shift. Eigen 3.4
/// converts one element at a time; this runs 8 at a time (SSE2 is every x86-64's baseline).
inline void bfloat16_to_float(const std::uint16_t* src, float* dst, Eigen::Index n) noexcept {
  Eigen::Index i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
#elif defined(__SSE2__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm_storeu_ps(dst + i, _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h)));
    _mm_storeu_ps(dst + i + 4, _mm_castsi128_ps(_mm_unpackhi_epi16(_mm_setzero_si128(), h)));
  }
#endif
  for (; i < n; ++i) {
    const std::uint32_t bits = static_cast<std::uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof bits);
  }
}

/// dst[0, n) = the IEEE half values at src (their bits) widened to float, exactly (subnormals, infinities and
/// NaNs included): the F16C instruction where the build has it (-mf16c, -march=haswell or later), else the
/// same in SSE2 integer arithmetic (re-bias the exponent; renormalise subnormals through one float
/// subtraction), else one element at a time.
inline void half_to_float(const std::uint16_t* src, float* dst, Eigen::Index n) noexcept {
  Eigen::Index i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#elif defined(__SSE2__)
  const __m128i exponent = _mm_set1_epi32(0x7c00 << 13);  // a half's exponent field, moved to float's place
  const __m128i rebias = _mm_set1_epi32((127 - 15) << 23);
  const __m128i special = _mm_set1_epi32((128 - 16) << 23);          // infinities and NaNs: exponent all ones
  const __m128 magic = _mm_castsi128_ps(_mm_set1_epi32(113 << 23));  // 2^-14, the smallest normal half
  const auto widen4 = [&](__m128i h) {                               // 4 halves, zero-extended to 32 bits
    const __m128i em = _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x7fff)), 13);
    const __m128i e = _mm_and_si128(em, exponent);
    __m128i o = _mm_add_epi32(em, rebias);
    o = _mm_add_epi32(o, _mm_and_si128(_mm_cmpeq_epi32(e, exponent), special));
    const __m128i tiny = _mm_cmpeq_epi32(e, _mm_setzero_si128());  // zero or subnormal
    const __m128i renormalised =
        _mm_castps_si128(_mm_sub_ps(_mm_castsi128_ps(_mm_add_epi32(o, _mm_set1_epi32(1 << 23))), magic));
    o = _mm_or_si128(_mm_and_si128(tiny, renormalised), _mm_andnot_si128(tiny, o));
    return _mm_castsi128_ps(_mm_or_si128(o, _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x8000)), 16)));
  };
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm_storeu_ps(dst + i, widen4(_mm_unpacklo_epi16(h, _mm_setzero_si128())));
    _mm_storeu_ps(dst + i + 4, widen4(_mm_unpackhi_epi16(h, _mm_setzero_si128())));
  }
#endif
  for (; i < n; ++i)
    dst[i] = static_cast<float>(Eigen::half(Eigen::half_impl::raw_uint16_to_half(src[i])));
}

/// dst[rows, cols] (leading dimension dst_stride, To) = src (stored in `from`, leading dimension src_stride),
/// converted exactly when widening, rounded to nearest even when narrowing.
template <typename To>
void convert_rows(Precision from, const void* src, Eigen::Index src_stride, Eigen::Index rows,
                  Eigen::Index cols, To* dst, Eigen::Index dst_stride) noexcept {
  if constexpr (std::is_same<To, float>::value) {
    if (from == Precision::float16 || from == Precision::bfloat16) {  // the hot path: 16-bit keys, inputs
      const std::uint16_t* bits = static_cast<const std::uint16_t*>(src);
      const bool contiguous = src_stride == cols && dst_stride == cols;
      const Eigen::Index per_call = contiguous ? rows * cols : cols;
      for (Eigen::Index r = 0; r < (contiguous ? 1 : rows); ++r) {
        if (from == Precision::float16)
          half_to_float(bits + r * src_stride, dst + r * dst_stride, per_call);
        else
          bfloat16_to_float(bits + r * src_stride, dst + r * dst_stride, per_call);
      }
      return;
    }
  }
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<RowMajorMatrix<To>, 0, Stride> out(dst, rows, cols, Stride(dst_stride));
  const auto read = [&](auto tag) {
    using From = decltype(tag);
    const Eigen::Map<const RowMajorMatrix<From>, 0, Stride> in(static_cast<const From*>(src), rows, cols,
                                                               Stride(src_stride));
    if constexpr (std::is_same<From, To>::value)
      out = in;
    else
      out = in.template cast<To>();
  };
  switch (from) {
    case Precision::float64:
      read(double());
      break;
    case Precision::float32:
      read(float());
      break;
    case Precision::float16:
      read(Eigen::half());
      break;
    case Precision::bfloat16:
      read(Eigen::bfloat16());
      break;
  }
}

/// dst (stored in `to`, leading dimension dst_stride) = src[rows, cols] (From, leading dimension src_stride).
template <typename From>
void store_rows(const From* src, Eigen::Index src_stride, Eigen::Index rows, Eigen::Index cols, Precision to,
                void* dst, Eigen::Index dst_stride) noexcept {
  using Stride = Eigen::OuterStride<>;
  const Eigen::Map<const RowMajorMatrix<From>, 0, Stride> in(src, rows, cols, Stride(src_stride));
  const auto write = [&](auto tag) {
    using To = decltype(tag);
    Eigen::Map<RowMajorMatrix<To>, 0, Stride> out(static_cast<To*>(dst), rows, cols, Stride(dst_stride));
    if constexpr (std::is_same<From, To>::value)
      out = in;
    else
      out = in.template cast<To>();
  };
  switch (to) {
    case Precision::float64:
      write(double());
      break;
    case Precision::float32:
      write(float());
      break;
    case Precision::float16:
      write(Eigen::half());
      break;
    case Precision::bfloat16:
      write(Eigen::bfloat16());
      break;
  }
}

}  // namespace detail
}  // namespace head_attention

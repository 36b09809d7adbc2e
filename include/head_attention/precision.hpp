// head-attention: the element types layers and KV caches store, and the conversions between them.
#pragma once

#include <cstddef>
#include <type_traits>

#include <Eigen/Core>

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

/// dst[rows, cols] (leading dimension dst_stride, To) = src (stored in `from`, leading dimension src_stride),
/// converted with Eigen's vectorised casts (round to nearest even when narrowing).
template <typename To>
void convert_rows(Precision from, const void* src, Eigen::Index src_stride, Eigen::Index rows,
                  Eigen::Index cols, To* dst, Eigen::Index dst_stride) noexcept {
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

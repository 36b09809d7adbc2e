// head-attention: BatchedHeadAttention, HeadAttention over the leading dimension of a [B, T, emb] tensor.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "attention.hpp"

namespace head_attention {

namespace detail {

/// True for the tensors whose data() is the whole [B, T, emb] row-major array: Eigen::Tensor and
/// Eigen::TensorMap over one. Other tensor expressions are evaluated once first.
template <typename T>
struct is_dense_tensor : std::false_type {};
template <typename S, int Rank, int Options, typename IndexType>
struct is_dense_tensor<Eigen::Tensor<S, Rank, Options, IndexType>> : std::true_type {};
template <typename Plain, int Options, template <class> class MakePointer>
struct is_dense_tensor<Eigen::TensorMap<Plain, Options, MakePointer>> : std::true_type {};

}  // namespace detail

/// The seed module's own calling convention: x [B, T, emb_size] to [B, T, head_size], each of the B sequences
/// attended to independently by one HeadAttention. All B · ceil(T / 64) query blocks share the cores.
template <typename Scalar>
class BatchedHeadAttention {
 public:
  using Index = Eigen::Index;
  using Layer = HeadAttention<Scalar>;
  using Matrix = typename Layer::Matrix;
  using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;

  /// Takes a copy of an existing layer (its weights, sizes and thread setting); head() is that copy.
  explicit BatchedHeadAttention(Layer head) : m_head(std::move(head)) {}

  /// Builds the layer as HeadAttention(emb_size, head_size, max_seq_len, seed) would.
  BatchedHeadAttention(Index emb_size, Index head_size, Index max_seq_len, std::uint64_t seed = 0)
      : m_head(emb_size, head_size, max_seq_len, seed) {}

  Layer& head() { return m_head; }
  const Layer& head() const { return m_head; }

  /// x [B, T, emb_size] to [B, T, head_size]. x is a row-major rank-3 tensor of Scalar: an Eigen::Tensor, an
  /// Eigen::TensorMap over the caller's memory (both read in place, no copy), or any tensor expression of
  /// that shape (evaluated once). Another rank, layout or scalar type does not compile. Throws shape_error if
  /// x.dimension(2) != emb_size, if x.dimension(1) > max_seq_len, or if a projection has the wrong shape.
  /// B = 0 or T = 0 give an empty result.
  template <typename Derived>
  Tensor3 forward(const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x) const {
    using Traits = Eigen::internal::traits<Derived>;
    constexpr bool rank_3 = Traits::NumDimensions == 3;
    constexpr bool row_major = static_cast<int>(Traits::Layout) == static_cast<int>(Eigen::RowMajor);
    constexpr bool same_scalar = std::is_same<std::remove_const_t<typename Traits::Scalar>, Scalar>::value;
    static_assert(rank_3, "BatchedHeadAttention::forward needs a rank-3 tensor [B, T, emb_size]");
    static_assert(row_major,
                  "BatchedHeadAttention::forward needs a row-major tensor (Eigen::RowMajor), laid out as "
                  "PyTorch lays out [B, T, emb_size]");
    static_assert(same_scalar, "BatchedHeadAttention<Scalar>::forward needs a tensor of the same Scalar");
    if constexpr (!(rank_3 && row_major && same_scalar)) {
      return Tensor3();  // not compiled: the static_asserts above have failed; this keeps their message alone
    } else if constexpr (detail::is_dense_tensor<Derived>::value) {
      const Derived& t = static_cast<const Derived&>(x);
      return forward_data(t.data(), t.dimension(0), t.dimension(1), t.dimension(2));
    } else {
      const Tensor3 t = x;  // an expression: evaluate it once
      return forward_data(t.data(), t.dimension(0), t.dimension(1), t.dimension(2));
    }
  }

 private:
  Tensor3 forward_data(const Scalar* data, Index batch, Index seq_len, Index width) const {
    const char* where = "BatchedHeadAttention::forward";
    // Checked here first, so that the messages name this call and the tensor's dimensions.
    detail::check_projections(m_head, where);
    detail::require(width == m_head.emb_size(), where, "x.dimension(2) (input width)",
                    "emb_size = " + std::to_string(m_head.emb_size()), std::to_string(width));
    detail::require(seq_len <= m_head.max_seq_len(), where, "x.dimension(1) (T)",
                    "<= max_seq_len = " + std::to_string(m_head.max_seq_len()), std::to_string(seq_len));
    Tensor3 out(batch, seq_len, m_head.head_size());                    // [B, T, head]
    const Eigen::Map<const Matrix> rows(data, batch * seq_len, width);  // [B·T, emb], the batch back to back
    Eigen::Map<Matrix> out_rows(out.data(), batch * seq_len, m_head.head_size());  // [B·T, head]
    m_head.forward_into(rows, batch, out_rows);
    return out;
  }

  Layer m_head;
};

}  // namespace head_attention

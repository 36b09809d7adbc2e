// head-attention: BatchedHeadAttention, HeadAttention over the leading dimension of a [B, T, emb] tensor.
#pragma once

#include <cstdint>
#include <utility>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "attention.hpp"

namespace head_attention {

/// The seed module's own calling convention: x [B, T, emb_size] to [B, T, head_size], each of the B sequences
/// attended to independently by one HeadAttention. All B · ceil(T / 64) query blocks share the cores.
template <typename Scalar>
class BatchedHeadAttention {
 public:
  using Index = Eigen::Index;
  using Layer = HeadAttention<Scalar>;
  using Matrix = typename Layer::Matrix;
  using Tensor3 = typename Layer::Tensor3;

  /// Wraps an existing layer (its weights, sizes and thread setting).
  explicit BatchedHeadAttention(Layer head) : m_head(std::move(head)) {}

  /// Builds the layer as HeadAttention(emb_size, head_size, max_seq_len, seed) would.
  BatchedHeadAttention(Index emb_size, Index head_size, Index max_seq_len, std::uint64_t seed = 0)
      : m_head(emb_size, head_size, max_seq_len, seed) {}

  Layer& head() { return m_head; }
  const Layer& head() const { return m_head; }

  /// x [B, T, emb_size] to [B, T, head_size]. Throws shape_error if x.dimension(2) != emb_size, if
  /// x.dimension(1) > max_seq_len, or if a projection has the wrong shape. B = 0 or T = 0 give an empty
  /// result.
  Tensor3 forward(const Tensor3& x) const {
    return forward_data(x.data(), x.dimension(0), x.dimension(1), x.dimension(2));
  }

  /// The same over the caller's memory, read in place (no copy of the input).
  Tensor3 forward(const Eigen::TensorMap<const Tensor3>& x) const {
    return forward_data(x.data(), x.dimension(0), x.dimension(1), x.dimension(2));
  }
  Tensor3 forward(const Eigen::TensorMap<Tensor3>& x) const {
    return forward_data(x.data(), x.dimension(0), x.dimension(1), x.dimension(2));
  }

 private:
  Tensor3 forward_data(const Scalar* data, Index batch, Index seq_len, Index width) const {
    m_head.check_call(width, seq_len, "BatchedHeadAttention::forward", "x.dimension(2) (input width)",
                      "x.dimension(1) (T)");
    Tensor3 out(batch, seq_len, m_head.head_size());                    // [B, T, head]
    const Eigen::Map<const Matrix> rows(data, batch * seq_len, width);  // [B·T, emb], the batch back to back
    m_head.forward_rows(rows, batch, seq_len, out.data());
    return out;
  }

  Layer m_head;
};

}  // namespace head_attention

/// \file
/// head-attention: BatchedHeadAttention, HeadAttention over the leading dimension of a [B, T, emb] tensor.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "attention.hpp"
#include "gradients.hpp"
#include "tensor_forms.hpp"

namespace head_attention {

/// The seed module's own calling convention: x [B, T, emb_size] to [B, T, head_size], each of the B sequences
/// attended to independently by one HeadAttention. All B · ceil(T / 64) query blocks share the cores.
///
/// It has every entry point of the other forms (defined once in TensorAttentionBase and
/// HeadTrainingTensorBase): the matrix ones run on its layer.
template <typename Scalar>
class BatchedHeadAttention : public TensorAttentionBase<BatchedHeadAttention<Scalar>, Scalar>,
                             public HeadTrainingTensorBase<BatchedHeadAttention<Scalar>, Scalar> {
 public:
  /// Eigen's signed index type, for every size and position.
  using Index = Eigen::Index;
  /// The layer each sequence goes through.
  using Layer = HeadAttention<Scalar>;
  /// Row-major dynamic matrix of Scalar, the layer's.
  using Matrix = typename Layer::Matrix;
  /// [B, T, features] tensors in and out: row-major, so that each sequence is a contiguous [T, features]
  /// block the layer reads in place.
  using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;
  /// Where the *_into calls write, as the layer's: row-major [rows, head_size] storage with contiguous rows.
  using OutputRef = typename Layer::OutputRef;

  /// Takes a copy of an existing layer (its weights, sizes and thread setting); head() is that copy.
  explicit BatchedHeadAttention(Layer head) : m_head(std::move(head)) {}

  /// Builds the layer as HeadAttention(emb_size, head_size, max_seq_len, seed) would.
  BatchedHeadAttention(Index emb_size, Index head_size, Index max_seq_len, Seed seed = 0)
      : m_head(emb_size, head_size, max_seq_len, seed) {}

  /// The layer itself: its weights, mask rule and thread cap are this module's.
  ///@{
  Layer& head() { return m_head; }
  const Layer& head() const { return m_head; }
  ///@}

  /// simple_llm's get_attention_weights: x [B, T, emb_size] to the softmax weights [B, T, T] under the
  /// layer's mask rule (masked entries exactly 0). Builds [B, T, T], as it must. Throws as forward(x) does.
  template <typename Derived>
  Tensor3 attention_weights(const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x) const {
    return detail::with_tensor_data<Scalar>(
        x, [&](const Scalar* data, Index batch, Index seq_len, Index width) {
          check_call(width, seq_len, "BatchedHeadAttention::attention_weights",
                     "x.dimension(2) (input width)", "x.dimension(1) (T)");
          Tensor3 out(batch, seq_len, seq_len);  // [B, T, T]
          for (Index b = 0; b < batch; ++b) {
            const Eigen::Map<const Matrix> seq(data + b * seq_len * width, seq_len, width);  // [T, emb]
            Eigen::Map<Matrix>(out.data() + b * seq_len * seq_len, seq_len, seq_len) =
                m_head.attention_weights(seq);
          }
          return out;
        });
  }

  /// The KV cache of B sequences that advance together: one HeadAttention cache per sequence.
  class Cache {
   public:
    /// Sequences in the batch.
    Index batch() const { return static_cast<Index>(m_caches.size()); }
    /// Positions processed so far (the same for every sequence).
    Index size() const { return m_caches.empty() ? 0 : m_caches.front().size(); }
    /// Rows of key/value storage allocated per sequence.
    Index capacity() const { return m_caches.empty() ? 0 : m_caches.front().capacity(); }
    /// Forgets every position of every sequence.
    void clear() {
      for (KVCache<Scalar>& cache : m_caches)
        cache.clear();
    }
    /// Allocates every sequence's storage for max_seq_len positions now (see KVCache::reserve).
    void reserve() {
      for (KVCache<Scalar>& cache : m_caches)
        cache.reserve();
    }
    /// Sequence b's cache. Throws shape_error unless 0 <= b < batch().
    const KVCache<Scalar>& sequence(Index b) const {
      HEAD_ATTENTION_REQUIRE(b >= 0 && b < batch(), "BatchedHeadAttention::Cache::sequence", "b",
                             "in [0, batch = " + std::to_string(batch()) + ")", std::to_string(b));
      return m_caches[static_cast<std::size_t>(b)];
    }

   private:
    friend class BatchedHeadAttention;
    std::vector<KVCache<Scalar>> m_caches;
  };

  /// An empty cache for `batch` sequences decoded together, keys and values stored in `storage` (see
  /// HeadAttention::make_cache). Throws shape_error if batch < 0.
  Cache make_cache(Index batch, Precision storage = precision_of<Scalar>()) const {
    HEAD_ATTENTION_REQUIRE(batch >= 0, "BatchedHeadAttention::make_cache", "batch", ">= 0",
                           std::to_string(batch));
    Cache cache;
    cache.m_caches.assign(static_cast<std::size_t>(batch), m_head.make_cache(storage));
    return cache;
  }

  /// An empty cache for one sequence, as make_cache(1, storage).
  Cache make_cache(Precision storage = precision_of<Scalar>()) const { return make_cache(1, storage); }

 private:
  friend class AttentionBase<BatchedHeadAttention, Scalar>;  // the entry points call the hooks below
  friend class TensorAttentionBase<BatchedHeadAttention, Scalar>;
  friend class HeadTrainingBase<BatchedHeadAttention, Scalar>;
  friend class HeadTrainingTensorBase<BatchedHeadAttention, Scalar>;

  // The hooks of the bases: the layer's, with this form's names in the messages.
  static constexpr detail::FormNames names() {
    return {"BatchedHeadAttention::forward",           "BatchedHeadAttention::forward_into",
            "BatchedHeadAttention::forward_cached",    "BatchedHeadAttention::forward_cached_into",
            "BatchedHeadAttention::reserve_workspace", "BatchedHeadAttention::reserve_cached_workspace"};
  }
  Index emb_size() const { return m_head.emb_size(); }
  Index out_features() const { return m_head.head_size(); }
  const Layer& head_layer() const { return m_head; }
  template <typename C>
  static constexpr bool takes_cache = std::is_same<C, Cache>::value || Layer::template takes_cache<C>;
  static Index cache_sequences(const Cache& cache) { return cache.batch(); }
  template <typename C>
  static Index cache_sequences(const C& cache) {
    return Layer::cache_sequences(cache);
  }
  void check_call(Index width, Index length, const char* where, const char* width_name,
                  const char* length_name) const {
    m_head.check_call(width, length, where, width_name, length_name);
  }
  template <typename Derived>
  void rows_into(const Eigen::MatrixBase<Derived>& x, OutputRef& out, const Batch& batch,
                 Workspace<Scalar>* workspace, const char* where) const {
    m_head.rows_into(x, out, batch, workspace, where);
  }
  template <typename Derived>
  void decode_into(const Eigen::MatrixBase<Derived>& x, Cache& cache, OutputRef& out,
                   Workspace<Scalar>* workspace, const char* where) const {
    m_head.decode_into(x, cache.m_caches, out, workspace, where);
  }
  template <typename Derived, typename C>
  void decode_into(const Eigen::MatrixBase<Derived>& x, C& cache, OutputRef& out,
                   Workspace<Scalar>* workspace, const char* where) const {
    m_head.decode_into(x, cache, out, workspace, where);
  }
  void reserve_rows(Workspace<Scalar>& workspace, Index batch, Index seq_len, const char* where) const {
    m_head.reserve_rows(workspace, batch, seq_len, where);
  }
  void reserve_decode(Workspace<Scalar>& workspace, const Cache& cache, Index t, const char* where) const {
    m_head.reserve_decode(workspace, cache.m_caches, t, where);
  }
  template <typename C>
  void reserve_decode(Workspace<Scalar>& workspace, const C& cache, Index t, const char* where) const {
    m_head.reserve_decode(workspace, cache, t, where);
  }

  Layer m_head;
};

}  // namespace head_attention

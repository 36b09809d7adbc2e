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

/// Checks at compile time that x is a row-major rank-3 tensor of Scalar, then returns f(data, B, T, width)
/// over its storage: an Eigen::Tensor or TensorMap is read in place, any other expression evaluated once.
template <typename Scalar, typename Derived, typename F>
auto with_tensor_data(const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x, F&& f)
    -> decltype(f(static_cast<const Scalar*>(nullptr), Eigen::Index(), Eigen::Index(), Eigen::Index())) {
  using Result =
      decltype(f(static_cast<const Scalar*>(nullptr), Eigen::Index(), Eigen::Index(), Eigen::Index()));
  using Traits = Eigen::internal::traits<Derived>;
  constexpr bool rank_3 = Traits::NumDimensions == 3;
  constexpr bool row_major = static_cast<int>(Traits::Layout) == static_cast<int>(Eigen::RowMajor);
  constexpr bool same_scalar = std::is_same<std::remove_const_t<typename Traits::Scalar>, Scalar>::value;
  static_assert(rank_3, "head_attention: forward needs a rank-3 tensor [B, T, emb_size]");
  static_assert(
      row_major,
      "head_attention: forward needs a row-major tensor (Eigen::RowMajor), laid out as PyTorch lays "
      "out [B, T, emb_size]");
  static_assert(same_scalar, "head_attention: forward needs a tensor of the layer's Scalar");
  if constexpr (!(rank_3 && row_major && same_scalar)) {
    return Result();  // not compiled: the static_asserts above have failed; this keeps their message alone
  } else if constexpr (is_dense_tensor<Derived>::value) {
    const Derived& t = static_cast<const Derived&>(x);
    return f(t.data(), Eigen::Index(t.dimension(0)), Eigen::Index(t.dimension(1)),
             Eigen::Index(t.dimension(2)));
  } else {
    const Eigen::Tensor<Scalar, 3, Eigen::RowMajor> t = x;  // an expression: evaluate it once
    return f(t.data(), Eigen::Index(t.dimension(0)), Eigen::Index(t.dimension(1)),
             Eigen::Index(t.dimension(2)));
  }
}

}  // namespace detail

/// The seed module's own calling convention: x [B, T, emb_size] to [B, T, head_size], each of the B sequences
/// attended to independently by one HeadAttention. All B · ceil(T / 64) query blocks share the cores.
template <typename Scalar>
class BatchedHeadAttention {
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

  /// x [B, T, emb_size] to [B, T, head_size]. x is a row-major rank-3 tensor of Scalar: an Eigen::Tensor, an
  /// Eigen::TensorMap over the caller's memory (both read in place, no copy), or any tensor expression of
  /// that shape (evaluated once). Another rank, layout or scalar type does not compile. Throws shape_error if
  /// x.dimension(2) != emb_size, if x.dimension(1) > max_seq_len, or if a projection has the wrong shape.
  /// B = 0 or T = 0 give an empty result.
  template <typename Derived>
  Tensor3 forward(const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x) const {
    return detail::with_tensor_data<Scalar>(x,
                                            [&](const Scalar* data, Index batch, Index seq_len, Index width) {
                                              return forward_data(data, batch, seq_len, width, nullptr);
                                            });
  }

  /// The same with right padding: sequence b has lengths[b] valid positions (0 <= lengths[b] <= T), and its
  /// keys at positions >= lengths[b] are masked for every query (its padded rows still get outputs, from the
  /// valid keys they may see; a sequence of length 0 gives zero rows). Throws shape_error unless lengths has
  /// B entries in [0, T], and as forward(x).
  template <typename Derived>
  Tensor3 forward(const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x,
                  const std::vector<Index>& lengths) const {
    return detail::with_tensor_data<Scalar>(x,
                                            [&](const Scalar* data, Index batch, Index seq_len, Index width) {
                                              return forward_data(data, batch, seq_len, width, &lengths);
                                            });
  }

  /// simple_llm's get_attention_weights: x [B, T, emb_size] to the softmax weights [B, T, T] under the
  /// layer's mask rule (masked entries exactly 0). Builds [B, T, T], as it must. Throws as forward(x) does.
  template <typename Derived>
  Tensor3 attention_weights(const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x) const {
    return detail::with_tensor_data<Scalar>(
        x, [&](const Scalar* data, Index batch, Index seq_len, Index width) {
          check(batch, seq_len, width, "BatchedHeadAttention::attention_weights");
          Tensor3 out(batch, seq_len, seq_len);  // [B, T, T]
          for (Index b = 0; b < batch; ++b) {
            const Eigen::Map<const Matrix> seq(data + b * seq_len * width, seq_len, width);  // [T, emb]
            Eigen::Map<Matrix>(out.data() + b * seq_len * seq_len, seq_len, seq_len) =
                m_head.attention_weights(seq);
          }
          return out;
        });
  }

  /// Training: x [B, T, emb_size] and grad_out = dL/d forward(x) [B, T, head_size] (row-major tensors of
  /// Scalar, as forward takes them) to dL/dx [B, T, emb_size] and the parameter gradients summed over the
  /// batch, as autograd gives them (see HeadAttention::backward). Throws shape_error as forward(x) does, and
  /// unless grad_out is [B, T, head_size].
  template <typename Derived, typename GradDerived>
  Gradients<Scalar, Tensor3> backward(
      const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x,
      const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out) const {
    return backward_data(x, grad_out, nullptr);
  }

  /// The same with right padding, as forward(x, lengths).
  template <typename Derived, typename GradDerived>
  Gradients<Scalar, Tensor3> backward(
      const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x,
      const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out,
      const std::vector<Index>& lengths) const {
    return backward_data(x, grad_out, &lengths);
  }

  /// The training forward: x [B, T, emb_size] to the state backward(x, grad_out, state) reuses, state.output
  /// [B · T, head_size] holding forward(x) bit for bit (flat: sequence b's rows at b · T) and state.lse [B ·
  /// T] each row's softmax logsumexp (see HeadAttention::forward_training). Throws as forward(x).
  template <typename Derived>
  TrainingState<Scalar> forward_training(
      const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x) const {
    return training_data(x, nullptr);
  }

  /// The same with right padding, as forward(x, lengths).
  template <typename Derived>
  TrainingState<Scalar> forward_training(const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x,
                                         const std::vector<Index>& lengths) const {
    return training_data(x, &lengths);
  }

  /// backward(x, grad_out) from forward_training(x)'s state, which it must come from (same x, weights and
  /// rule): the softmax statistics are not recomputed. Throws as backward, and unless state.output is [B · T,
  /// head_size] and state.lse [B · T].
  template <typename Derived, typename GradDerived>
  Gradients<Scalar, Tensor3> backward(
      const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x,
      const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out,
      const TrainingState<Scalar>& state) const {
    return backward_data(x, grad_out, nullptr, &state);
  }

  /// The same with right padding, from forward_training(x, lengths).
  template <typename Derived, typename GradDerived>
  Gradients<Scalar, Tensor3> backward(
      const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x,
      const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out,
      const std::vector<Index>& lengths, const TrainingState<Scalar>& state) const {
    return backward_data(x, grad_out, &lengths, &state);
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

  /// Incremental decoding of B sequences at once: x [B, t, emb_size] holds each sequence's next t rows, and
  /// the result [B, t, head_size] their outputs, as HeadAttention::forward_cached gives for each. Throws
  /// shape_error, with the cache unchanged, if B differs from the cache's, and as forward_cached does.
  template <typename Derived>
  Tensor3 forward_cached(const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x, Cache& cache) const {
    return detail::with_tensor_data<Scalar>(x, [&](const Scalar* data, Index batch, Index t, Index width) {
      const char* where = "BatchedHeadAttention::forward_cached";
      HEAD_ATTENTION_REQUIRE(batch == cache.batch(), where, "x.dimension(0) (B)",
                             "the cache's batch = " + std::to_string(cache.batch()), std::to_string(batch));
      HEAD_ATTENTION_REQUIRE(width == m_head.emb_size(), where, "x.dimension(2) (input width)",
                             "emb_size = " + std::to_string(m_head.emb_size()), std::to_string(width));
      Tensor3 out(batch, t, m_head.head_size());                               // [B, t, head]
      const Eigen::Map<const Matrix> rows(data, batch * t, width);             // [B·t, emb]
      Eigen::Map<Matrix> out_rows(out.data(), batch * t, m_head.head_size());  // [B·t, head]
      m_head.forward_cached_into(rows, cache.m_caches, out_rows);
      return out;
    });
  }

 private:
  /// The checks of every call, here first so that the messages name this call and the tensor's dimensions.
  void check(Index batch, Index seq_len, Index width, const char* where) const {
    (void)batch;
    detail::check_projections(m_head, where);
    HEAD_ATTENTION_REQUIRE(width == m_head.emb_size(), where, "x.dimension(2) (input width)",
                           "emb_size = " + std::to_string(m_head.emb_size()), std::to_string(width));
    HEAD_ATTENTION_REQUIRE(seq_len <= m_head.max_seq_len(), where, "x.dimension(1) (T)",
                           "<= max_seq_len = " + std::to_string(m_head.max_seq_len()),
                           std::to_string(seq_len));
  }

  Tensor3 forward_data(const Scalar* data, Index batch, Index seq_len, Index width,
                       const std::vector<Index>* lengths) const {
    check(batch, seq_len, width, "BatchedHeadAttention::forward");
    if (lengths != nullptr) detail::check_lengths(*lengths, batch, seq_len, "BatchedHeadAttention::forward");
    Tensor3 out(batch, seq_len, m_head.head_size());                    // [B, T, head]
    const Eigen::Map<const Matrix> rows(data, batch * seq_len, width);  // [B·T, emb], back to back
    Eigen::Map<Matrix> out_rows(out.data(), batch * seq_len, m_head.head_size());  // [B·T, head]
    if (lengths == nullptr)
      m_head.forward_into(rows, batch, out_rows);
    else
      m_head.forward_into(rows, batch, out_rows, *lengths);
    return out;
  }

  template <typename Derived>
  TrainingState<Scalar> training_data(const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x,
                                      const std::vector<Index>* lengths) const {
    return detail::with_tensor_data<Scalar>(
        x, [&](const Scalar* data, Index batch, Index seq_len, Index width) {
          const char* where = "BatchedHeadAttention::forward_training";
          check(batch, seq_len, width, where);
          TrainingState<Scalar> state;
          state.output.resize(batch * seq_len, m_head.head_size());           // [B·T, head]
          state.lse.resize(batch * seq_len);                                  // [B·T]
          const Eigen::Map<const Matrix> rows(data, batch * seq_len, width);  // [B·T, emb], back to back
          m_head.batch_into(rows, batch, state.output, lengths, nullptr, state.lse.data(), where);
          return state;
        });
  }

  template <typename Derived, typename GradDerived>
  Gradients<Scalar, Tensor3> backward_data(
      const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& x,
      const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out,
      const std::vector<Index>* lengths, const TrainingState<Scalar>* state = nullptr) const {
    return detail::with_tensor_data<Scalar>(x, [&](const Scalar* data, Index batch, Index seq_len,
                                                   Index width) {
      return detail::with_tensor_data<Scalar>(grad_out, [&](const Scalar* grad, Index gb, Index gt,
                                                            Index gw) {
        const char* where = "BatchedHeadAttention::backward";
        check(batch, seq_len, width, where);
        HEAD_ATTENTION_REQUIRE(
            gb == batch && gt == seq_len && gw == m_head.head_size(), where, "grad_out shape",
            "[" + std::to_string(batch) + ", " + std::to_string(seq_len) + ", " +
                std::to_string(m_head.head_size()) + "]",
            "[" + std::to_string(gb) + ", " + std::to_string(gt) + ", " + std::to_string(gw) + "]");
        const Eigen::Map<const Matrix> rows(data, batch * seq_len, width);                    // [B·T, emb]
        const Eigen::Map<const Matrix> grad_rows(grad, batch * seq_len, m_head.head_size());  // [B·T, head]
        Gradients<Scalar, Tensor3> g;
        g.input.resize(batch, seq_len, width);  // [B, T, emb]
        m_head.backward_into(rows, batch, grad_rows, lengths, g, g.input.data(), where, state);
        return g;
      });
    });
  }

  Layer m_head;
};

}  // namespace head_attention

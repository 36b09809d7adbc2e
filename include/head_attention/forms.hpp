/// \file
/// head-attention: AttentionBase and HeadTrainingBase, the one definition of each matrix entry point that
/// every form (HeadAttention, BatchedHeadAttention, MultiHeadAttention and the packed forms) inherits.
///
/// Each form implements a few private hooks (its checks and its forward pass over rows); the public entry
/// points, their argument conventions and their compile-time checks are written once here, as Eigen's
/// MatrixBase gives every expression the same methods. tensor_forms.hpp adds the [B, T, emb] tensor forms.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "arguments.hpp"
#include "fwd.hpp"
#include "gradients.hpp"
#include "workspace.hpp"

namespace head_attention {

namespace detail {

/// The names a form's calls give in their error messages ("HeadAttention::forward_into", ...): string
/// literals, so that a check on the decode path builds no string unless it fails.
struct FormNames {
  const char* forward;
  const char* forward_into;
  const char* forward_cached;
  const char* forward_cached_into;
  const char* reserve_workspace;
  const char* reserve_cached_workspace;
};

/// True, after a static_assert with a message that says what to do, when an input x is of the layer's
/// Scalar. The callers compile their body only when it holds, so that the message stands alone.
template <typename Scalar, typename Derived>
constexpr bool input_ok() {
  constexpr bool ok = std::is_same<typename Derived::Scalar, Scalar>::value;
  static_assert(ok,
                "head_attention: the layer needs an input of the same Scalar as the layer (a float layer "
                "takes float matrices); convert it with x.template cast<Scalar>()");
  return ok;
}

/// True, after a static_assert with a message that says what to do, when `Out` can be written as a
/// row-major matrix of Scalar with contiguous rows (a Matrix, a Map, a block of columns).
template <typename Scalar, typename Out>
constexpr bool output_ok() {
  using O = std::remove_cv_t<std::remove_reference_t<Out>>;
  constexpr bool dense = std::is_base_of<Eigen::DenseBase<O>, O>::value;
  static_assert(dense, "head_attention: out must be an Eigen matrix (the layer's Matrix, a Map or a block)");
  if constexpr (dense) {
    constexpr bool same_scalar = std::is_same<typename O::Scalar, Scalar>::value;
    constexpr bool row_major = static_cast<bool>(O::IsRowMajor) || O::ColsAtCompileTime == 1;
    constexpr bool writable = !std::is_const<std::remove_reference_t<Out>>::value &&
                              (static_cast<unsigned>(Eigen::internal::traits<O>::Flags) & Eigen::LvalueBit);
    static_assert(same_scalar, "head_attention: out must hold the layer's Scalar");
    static_assert(
        row_major,
        "head_attention: out must be row-major: use the layer's Matrix (Eigen::Matrix<Scalar, "
        "Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>), a Map of one or a block of its columns");
    static_assert(writable, "head_attention: out must be writable (not const)");
    return same_scalar && row_major && writable;
  } else {
    return false;
  }
}

}  // namespace detail

/// The matrix inference entry points of every form, defined once (CRTP: Derived is the form). x is any dense
/// Eigen expression of Scalar (row- or column-major, a Map over caller memory, a block; plain storage is
/// read in place); out is row-major storage with contiguous rows (a Matrix, a Map, a block of columns of a
/// wider matrix). Every call checks everything, and throws shape_error naming what it expected and got,
/// before it writes anything.
template <typename Derived, typename Scalar>
class AttentionBase {
 public:
  /// Eigen's signed index type, for every size and position.
  using Index = Eigen::Index;
  /// Row-major [rows, features], as PyTorch lays out activations.
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  /// Where the *_into calls write: row-major [rows, out_features] storage with contiguous rows.
  using OutputRef = Eigen::Ref<Matrix, 0, Eigen::OuterStride<>>;

  /// One sequence x [T, emb_size] to [T, out_features] (head_size for one head, emb_size for the multi-head
  /// forms). Throws shape_error if x.cols() != emb_size, T > max_seq_len, or a weight has the wrong shape.
  template <typename XDerived>
  Matrix forward(const Eigen::MatrixBase<XDerived>& x) const {
    if constexpr (detail::input_ok<Scalar, XDerived>()) {
      Matrix out(x.rows(), self().out_features());  // [T, out]
      OutputRef ref(out);
      self().rows_into(x, ref, Batch(), nullptr, self().names().forward);
      return out;
    } else {
      return Matrix();
    }
  }

  /// forward written into caller storage out [rows, out_features], the rows laid out as `batch` says: one
  /// sequence (the default), Batch(B) sequences of equal length back to back, or Batch(B, lengths) with
  /// right padding. All query blocks of all sequences share the cores. x is read completely before out is
  /// written. Throws shape_error, before touching out, on any bad shape or batch.
  template <typename XDerived, typename Out>
  void forward_into(const Eigen::MatrixBase<XDerived>& x, Out&& out, const Batch& batch = Batch()) const {
    into(x, out, batch, nullptr);
  }

  /// The same, its working memory taken from (and left in) `workspace`: once the workspace has served a call
  /// of this shape or a larger one (or reserve_workspace sized it), such calls allocate nothing, whatever
  /// other shapes it served in between (see Workspace).
  template <typename XDerived, typename Out>
  void forward_into(const Eigen::MatrixBase<XDerived>& x, Out&& out, Workspace<Scalar>& workspace,
                    const Batch& batch = Batch()) const {
    into(x, out, batch, &workspace);
  }

  /// Incremental decoding: the t new rows of each of the cache's B sequences, x [B · t, emb_size] (each
  /// sequence's rows back to back; B = 1 for a single sequence's cache), extend the cache and give their
  /// outputs [B · t, out_features]. Earlier keys and values are read from the cache, never recomputed; new
  /// row i of a sequence has position cache.size() + i, so prefill plus chunks equals one forward. `cache` is
  /// what this form's make_cache returns (the single-head forms also take a std::vector of KVCache, one per
  /// sequence). Throws shape_error, the cache unchanged, on a bad shape, a cache of other sizes or rule, or
  /// cache.size() + t > max_seq_len.
  template <typename XDerived, typename Cache>
  Matrix forward_cached(const Eigen::MatrixBase<XDerived>& x, Cache& cache) const {
    if constexpr (detail::input_ok<Scalar, XDerived>() && decodes<Cache>()) {
      Matrix out(x.rows(), self().out_features());  // [B·t, out]
      OutputRef ref(out);
      self().decode_into(x, cache, ref, nullptr, self().names().forward_cached);
      return out;
    } else {
      return Matrix();
    }
  }

  /// forward_cached written into out [B · t, out_features]. Throws as forward_cached, and shape_error, before
  /// touching out or the cache, unless out has that shape.
  template <typename XDerived, typename Cache, typename Out>
  void forward_cached_into(const Eigen::MatrixBase<XDerived>& x, Cache& cache, Out&& out) const {
    cached_into(x, cache, out, nullptr);
  }

  /// The same, its working memory taken from (and left in) `workspace`: the no-allocation decode step. Once
  /// the cache is reserve()d and the workspace has served a call of this shape or a larger one over such
  /// caches (a prefill counts for the one-row steps after it), or reserve_cached_workspace sized it, the step
  /// allocates nothing (see Workspace).
  template <typename XDerived, typename Cache, typename Out>
  void forward_cached_into(const Eigen::MatrixBase<XDerived>& x, Cache& cache, Out&& out,
                           Workspace<Scalar>& workspace) const {
    cached_into(x, cache, out, &workspace);
  }

  /// Sizes `workspace` for forward_into calls of `batch` sequences of `seq_len` rows (padded or not), and any
  /// smaller ones, so that even the first such call allocates nothing, for the most threads such a call can
  /// use. What the workspace already holds stays: reserve for several shapes, and it serves each. Throws
  /// shape_error, the workspace unchanged, unless batch >= 0 and 0 <= seq_len <= max_seq_len and the call's
  /// working memory can be addressed (every size product fits an Index).
  void reserve_workspace(Workspace<Scalar>& workspace, Index batch, Index seq_len) const {
    self().reserve_rows(workspace, batch, seq_len, self().names().reserve_workspace);
  }

  /// Sizes `workspace` for forward_cached_into calls of up to t rows per sequence extending caches like
  /// `cache` (same layer, batch and storage precision): a prefill of t rows and the one-row decode steps
  /// after it, in one call. With the caches reserve()d too, none of them allocates, from the first on. Throws
  /// shape_error, nothing changed, unless the cache fits this form and 1 <= t <= max_seq_len.
  template <typename Cache>
  void reserve_cached_workspace(Workspace<Scalar>& workspace, const Cache& cache, Index t = 1) const {
    if constexpr (decodes<Cache>())
      self().reserve_decode(workspace, cache, t, self().names().reserve_cached_workspace);
  }

  /// The bytes of working memory a forward_into call of `batch` sequences of `seq_len` rows uses (what a
  /// Workspace holds after serving it; found by sizing a temporary workspace, which is freed). Throws as
  /// reserve_workspace does.
  std::size_t workspace_bytes(Index batch, Index seq_len) const {
    Workspace<Scalar> workspace;
    reserve_workspace(workspace, batch, seq_len);
    return workspace.bytes();
  }

 protected:
  /// Only a form constructs its base.
  AttentionBase() = default;

  /// The form itself (CRTP).
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  /// True, after a static_assert that says what to pass, when this form decodes with a Cache.
  template <typename Cache>
  static constexpr bool decodes() {
    constexpr bool ok = Derived::template takes_cache<std::remove_const_t<Cache>>;
    static_assert(ok,
                  "head_attention: forward_cached needs the cache this form's make_cache returns (a single "
                  "head also takes std::vector<KVCache<Scalar>>, one per sequence)");
    return ok;
  }

 private:
  template <typename XDerived, typename Out>
  void into(const Eigen::MatrixBase<XDerived>& x, Out& out, const Batch& batch,
            Workspace<Scalar>* workspace) const {
    if constexpr (detail::input_ok<Scalar, XDerived>() && detail::output_ok<Scalar, Out>()) {
      OutputRef ref(out);
      self().rows_into(x, ref, batch, workspace, self().names().forward_into);
    }
  }

  template <typename XDerived, typename Cache, typename Out>
  void cached_into(const Eigen::MatrixBase<XDerived>& x, Cache& cache, Out& out,
                   Workspace<Scalar>* workspace) const {
    if constexpr (detail::input_ok<Scalar, XDerived>() && detail::output_ok<Scalar, Out>() &&
                  decodes<Cache>()) {
      OutputRef ref(out);
      self().decode_into(x, cache, ref, workspace, self().names().forward_cached_into);
    }
  }
};

/// The training entry points of a single head, matrix form, defined once for HeadAttention and
/// BatchedHeadAttention (whose tensor forms tensor_forms.hpp adds). Memory-efficient like
/// FlashAttention-2's backward: Q, K, V and the softmax are recomputed tile by tile, extra memory O(rows ·
/// head_size); results do not depend on the thread count. float and double only.
template <typename Derived, typename Scalar>
class HeadTrainingBase {
 public:
  /// What a matrix backward returns: dL/dx [rows, emb_size] and dL/d each projection's weight and bias.
  using GradientsType = Gradients<Scalar>;

  /// The training forward: forward (bit for bit, in state.output [rows, head_size]) and each row's softmax
  /// logsumexp (state.lse [rows]), which backward(x, grad_out, state, batch) reuses instead of recomputing.
  /// The rows are laid out as `batch` says (see forward_into). Throws as forward_into.
  template <typename XDerived>
  TrainingState<Scalar> forward_training(const Eigen::MatrixBase<XDerived>& x,
                                         const Batch& batch = Batch()) const {
    if constexpr (detail::input_ok<Scalar, XDerived>()) {
      return self().head_layer().training_rows(x, batch);
    } else {
      return {};
    }
  }

  /// The gradients of a loss L given grad_out = dL/d forward(x) [rows, head_size]: dL/dx [rows, emb_size] and
  /// dL/d each weight and bias, summed over the batch's sequences as autograd sums them, under the layer's
  /// mask rule. Throws shape_error as forward_into does, and unless grad_out is [rows, head_size].
  template <typename XDerived, typename GradDerived>
  GradientsType backward(const Eigen::MatrixBase<XDerived>& x, const Eigen::MatrixBase<GradDerived>& grad_out,
                         const Batch& batch = Batch()) const {
    return backward_matrix(x, grad_out, batch, nullptr);
  }

  /// backward from the state forward_training(x, batch) kept: the same gradients (to rounding) without
  /// recomputing the softmax statistics. The state must come from that call (same x, batch, weights, rule);
  /// only its shapes are checked. Throws as backward, and unless state.output is [rows, head_size] and
  /// state.lse [rows].
  template <typename XDerived, typename GradDerived>
  GradientsType backward(const Eigen::MatrixBase<XDerived>& x, const Eigen::MatrixBase<GradDerived>& grad_out,
                         const TrainingState<Scalar>& state, const Batch& batch = Batch()) const {
    return backward_matrix(x, grad_out, batch, &state);
  }

 protected:
  /// Only a form constructs its base.
  HeadTrainingBase() = default;

  /// The form itself (CRTP).
  const Derived& self() const { return static_cast<const Derived&>(*this); }

 private:
  template <typename XDerived, typename GradDerived>
  GradientsType backward_matrix(const Eigen::MatrixBase<XDerived>& x,
                                const Eigen::MatrixBase<GradDerived>& grad_out, const Batch& batch,
                                const TrainingState<Scalar>* state) const {
    if constexpr (detail::input_ok<Scalar, XDerived>() && detail::input_ok<Scalar, GradDerived>()) {
      GradientsType g;
      g.input.resize(x.rows(), self().head_layer().emb_size());  // [rows, emb]
      self().head_layer().backward_into(x, batch.sequences(), grad_out, batch.lengths(), g, g.input.data(),
                                        "HeadAttention::backward", state);
      return g;
    } else {
      return {};
    }
  }
};

}  // namespace head_attention

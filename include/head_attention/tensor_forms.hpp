/// \file
/// head-attention: TensorAttentionBase and HeadTrainingTensorBase, the [B, T, features] tensor entry points
/// (the seed's calling convention) defined once over the matrix ones of forms.hpp. In a header of their own,
/// so that a matrix-only user does not pay for Eigen's Tensor module.
#pragma once

#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "errors.hpp"
#include "forms.hpp"

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

/// "[a, b, c]", a tensor shape in a message.
inline std::string shape_string(Eigen::Index a, Eigen::Index b, Eigen::Index c) {
  return "[" + std::to_string(a) + ", " + std::to_string(b) + ", " + std::to_string(c) + "]";
}

}  // namespace detail

/// The inference entry points of AttentionBase plus their tensor forms, defined once for every form that has
/// them (BatchedHeadAttention, MultiHeadAttention and the packed forms): x [B, T, emb_size] is a row-major
/// rank-3 tensor of Scalar, an Eigen::Tensor or an Eigen::TensorMap over the caller's memory (both read in
/// place, no copy) or any tensor expression of that shape (evaluated once); another rank, layout or scalar
/// type does not compile, with a message that says which.
template <typename Derived, typename Scalar>
class TensorAttentionBase : public AttentionBase<Derived, Scalar> {
  using Base = AttentionBase<Derived, Scalar>;

 public:
  using typename Base::Index;
  using typename Base::Matrix;
  /// [B, T, features] tensors in and out: row-major, so that each sequence is a contiguous [T, features]
  /// block read in place.
  using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;

  using Base::forward;
  using Base::forward_cached;

  /// The seed's calling convention: x [B, T, emb_size] to [B, T, out_features], each sequence attended to
  /// independently, all B · ceil(T / 64) query blocks sharing the cores; with `lengths` (B entries, each in
  /// [0, T]) right padding, keys at positions >= lengths[b] masked. B = 0 or T = 0 give an empty result.
  /// Throws shape_error if x.dimension(2) != emb_size, x.dimension(1) > max_seq_len, a weight has the wrong
  /// shape, or lengths does not fit.
  template <typename TensorDerived>
  Tensor3 forward(const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
                  Padding lengths = Padding()) const {
    return detail::with_tensor_data<Scalar>(x, [&](const Scalar* data, Index batch, Index seq_len,
                                                   Index width) {
      const char* where = this->self().names().forward;
      this->self().check_call(width, seq_len, where, "x.dimension(2) (input width)", "x.dimension(1) (T)");
      const Index out_width = this->self().out_features();
      Tensor3 out(batch, seq_len, out_width);                               // [B, T, out]
      const Eigen::Map<const Matrix> rows(data, batch * seq_len, width);    // [B·T, emb]
      Eigen::Map<Matrix> out_rows(out.data(), batch * seq_len, out_width);  // [B·T, out]
      typename Base::OutputRef ref(out_rows);
      this->self().rows_into(rows, ref, Batch(batch, lengths), nullptr, where);
      return out;
    });
  }

  /// Incremental decoding of the cache's B sequences together: x [B, t, emb_size] to [B, t, out_features],
  /// as forward_cached of the rows. Throws shape_error, the cache unchanged, if B differs from the cache's,
  /// and as forward_cached does.
  template <typename TensorDerived, typename Cache>
  Tensor3 forward_cached(const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
                         Cache& cache) const {
    return detail::with_tensor_data<Scalar>(x, [&](const Scalar* data, Index batch, Index t, Index width) {
      if constexpr (Base::template decodes<Cache>()) {
        const char* where = this->self().names().forward_cached;
        const Index sequences = Derived::cache_sequences(cache);
        HEAD_ATTENTION_REQUIRE(batch == sequences, where, "x.dimension(0) (B)",
                               "the cache's batch = " + std::to_string(sequences), std::to_string(batch));
        HEAD_ATTENTION_REQUIRE(width == this->self().emb_size(), where, "x.dimension(2) (input width)",
                               "emb_size = " + std::to_string(this->self().emb_size()),
                               std::to_string(width));
        const Index out_width = this->self().out_features();
        Tensor3 out(batch, t, out_width);                               // [B, t, out]
        const Eigen::Map<const Matrix> rows(data, batch * t, width);    // [B·t, emb]
        Eigen::Map<Matrix> out_rows(out.data(), batch * t, out_width);  // [B·t, out]
        typename Base::OutputRef ref(out_rows);
        this->self().decode_into(rows, cache, ref, nullptr, where);
        return out;
      } else {
        return Tensor3();
      }
    });
  }

 protected:
  /// Only a form constructs its base.
  TensorAttentionBase() = default;
};

/// HeadTrainingBase plus its tensor forms, for BatchedHeadAttention: x [B, T, emb_size] and grad_out [B, T,
/// head_size] (row-major tensors of Scalar, as forward takes them).
template <typename Derived, typename Scalar>
class HeadTrainingTensorBase : public HeadTrainingBase<Derived, Scalar> {
  using Base = HeadTrainingBase<Derived, Scalar>;

 public:
  /// [B, T, features] tensors.
  using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;
  /// What a tensor backward returns: dL/dx [B, T, emb_size] and dL/d each weight and bias.
  using TensorGradientsType = Gradients<Scalar, Tensor3>;

  using Base::backward;
  using Base::forward_training;

  /// The training forward of x [B, T, emb_size]: state.output [B · T, head_size] holding forward(x) bit for
  /// bit (flat: sequence b's rows at b · T) and state.lse [B · T]; with `lengths`, right padding as
  /// forward(x, lengths). Throws as forward(x).
  template <typename TensorDerived>
  TrainingState<Scalar> forward_training(const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
                                         Padding lengths = Padding()) const {
    return detail::with_tensor_data<Scalar>(x, [&](const Scalar* data, Index batch, Index seq_len,
                                                   Index width) {
      const char* where = "BatchedHeadAttention::forward_training";
      this->self().check_call(width, seq_len, where, "x.dimension(2) (input width)", "x.dimension(1) (T)");
      const Eigen::Map<const typename Derived::Matrix> rows(data, batch * seq_len, width);  // [B·T, emb]
      return this->self().head_layer().training_rows(rows, Batch(batch, lengths), where);
    });
  }

  /// backward of x [B, T, emb_size] given grad_out = dL/d forward(x) [B, T, head_size]: dL/dx [B, T,
  /// emb_size] and the parameter gradients summed over the batch; with `lengths`, right padding. Throws
  /// shape_error as forward(x) does, and unless grad_out is [B, T, head_size].
  template <typename TensorDerived, typename GradDerived>
  TensorGradientsType backward(const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
                               const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out,
                               Padding lengths = Padding()) const {
    return backward_tensor(x, grad_out, lengths, nullptr);
  }

  /// The same from forward_training(x, lengths)'s state (same x, weights and rule; only its shapes are
  /// checked): the softmax statistics are not recomputed.
  template <typename TensorDerived, typename GradDerived>
  TensorGradientsType backward(const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
                               const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out,
                               const TrainingState<Scalar>& state, Padding lengths = Padding()) const {
    return backward_tensor(x, grad_out, lengths, &state);
  }

 protected:
  /// Only a form constructs its base.
  HeadTrainingTensorBase() = default;

 private:
  using Index = Eigen::Index;

  template <typename TensorDerived, typename GradDerived>
  TensorGradientsType backward_tensor(
      const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
      const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out, Padding lengths,
      const TrainingState<Scalar>* state) const {
    using Matrix = typename Derived::Matrix;
    return detail::with_tensor_data<Scalar>(x, [&](const Scalar* data, Index batch, Index seq_len,
                                                   Index width) {
      return detail::with_tensor_data<Scalar>(grad_out, [&](const Scalar* grad, Index gb, Index gt,
                                                            Index gw) {
        const char* where = "BatchedHeadAttention::backward";
        const auto& layer = this->self().head_layer();
        this->self().check_call(width, seq_len, where, "x.dimension(2) (input width)", "x.dimension(1) (T)");
        HEAD_ATTENTION_REQUIRE(gb == batch && gt == seq_len && gw == layer.head_size(), where,
                               "grad_out shape", detail::shape_string(batch, seq_len, layer.head_size()),
                               detail::shape_string(gb, gt, gw));
        const Eigen::Map<const Matrix> rows(data, batch * seq_len, width);                   // [B·T, emb]
        const Eigen::Map<const Matrix> grad_rows(grad, batch * seq_len, layer.head_size());  // [B·T, head]
        TensorGradientsType g;
        g.input.resize(batch, seq_len, width);  // [B, T, emb]
        layer.backward_into(rows, batch, grad_rows, lengths.lengths(), g, g.input.data(), where, state);
        return g;
      });
    });
  }
};

}  // namespace head_attention

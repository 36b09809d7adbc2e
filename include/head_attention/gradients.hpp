/// \file
/// head-attention: Gradients, what a backward pass returns.
#pragma once

#include <vector>

#include <Eigen/Core>

#include "linear.hpp"

namespace head_attention {

/// The gradients of one head's parameters, each in the shape of the parameter: query.weight [head_size,
/// emb_size] holds d loss / d Wq (PyTorch's `_q.weight.grad`), query.bias [head_size] d loss / d bq, and so
/// on.
template <typename Scalar>
struct HeadGradients {
  Linear<Scalar> query;  ///< d/d Wq [head, emb], d/d bq [head]
  Linear<Scalar> key;    ///< d/d Wk [head, emb], d/d bk [head]
  Linear<Scalar> value;  ///< d/d Wv [head, emb], d/d bv [head]
};

/// What HeadAttention::backward returns: the gradient of the loss with respect to the input (`input`, shaped
/// as the input: a Matrix [T, emb_size] or [B·T, emb_size], or a tensor [B, T, emb_size]) and to every
/// parameter, summed over the batch as autograd sums them.
template <typename Scalar,
          typename Input = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>
struct Gradients : HeadGradients<Scalar> {
  Input input;  ///< d loss / d x, the input's shape
};

/// What MultiHeadAttention::backward returns: d loss / d x, every head's parameter gradients and the output
/// projection's (PyTorch's `_layer.weight.grad` [emb_size, num_heads · head_size], `_layer.bias.grad`).
template <typename Scalar,
          typename Input = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>
struct MultiHeadGradients {
  Input input;                               ///< d loss / d x, the input's shape
  std::vector<HeadGradients<Scalar>> heads;  ///< [num_heads]
  Linear<Scalar> projection;                 ///< d/d Wo [emb, heads·head], d/d bo [emb]
};

/// What a training forward keeps for its backward, so that the backward need not recompute the softmax
/// statistics (a forward-like pass over Q·Kᵀ and P·V, about a quarter of its time). Made by
/// forward_training and read by the backward overloads that take it, which require the same x, batch,
/// lengths, weights and mask rule as the forward that made it (only the shapes are checked).
template <typename Scalar>
struct TrainingState {
  /// Row-major, as the layers' inputs and outputs.
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  /// Column vector of Scalar.
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  /// [rows, heads · head_size] the heads' attention outputs, head h in columns [h · head_size, (h + 1) ·
  /// head_size): for HeadAttention, forward(x) itself; for MultiHeadAttention, the concatenation before the
  /// output projection.
  Matrix output;
  /// [heads · rows] each query row's logsumexp of its visible scores Q Kᵀ / sqrt(head_size), head h's row i
  /// at h · rows + i; +inf for a row that sees no key.
  Vector lse;
};

}  // namespace head_attention

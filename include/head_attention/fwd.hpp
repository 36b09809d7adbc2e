/// \file
/// head-attention: forward declarations of the library's class templates, for headers that only name them.
#pragma once

namespace head_attention {

template <typename Scalar>
class HeadAttention;
template <typename Scalar>
class BatchedHeadAttention;
template <typename Scalar>
class MultiHeadAttention;
template <typename Scalar>
class PackedHeadAttention;
template <typename Scalar>
class PackedMultiHeadAttention;
template <typename Scalar>
class KVCache;
template <typename Scalar>
class Workspace;

namespace detail {
template <typename Scalar>
class PackedForm;
}  // namespace detail

}  // namespace head_attention

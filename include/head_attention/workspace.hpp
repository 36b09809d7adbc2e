/// \file
/// head-attention: Workspace, working memory kept between forward calls.
#pragma once

#include <cstddef>
#include <vector>

#include "detail/flash.hpp"
#include "fwd.hpp"
#include "precision.hpp"

namespace head_attention {

/// Working memory for forward calls, kept between them. A forward_into call given a workspace takes its
/// buffers from it (the Q|K|V buffer of all heads, the GEMM packing buffers, the attention scratch, a 16-bit
/// layer's converted weights) and leaves them there: once the workspace has served a shape, further calls of
/// that shape allocate none of them. That saves the allocation and, above all, the page faults of the large
/// buffers: glibc maps a buffer above its threshold fresh for every call (50 MB for 8 heads at B = 8,
/// T = 1024, about 19 ms of page faults per call). Any layer of the same Scalar may use it, one call at a
/// time: threads that run forward calls at once need one workspace each.
///
/// No-allocation mode: forward_into and forward_cached_into given a workspace, after one call of the same
/// shape (the warm-up) and with every cache reserve()d, allocate nothing at all (proven by unit-noalloc with
/// a counting operator new and EIGEN_RUNTIME_NO_MALLOC; not with HEAD_ATTENTION_GEMM_FALLBACK, whose products
/// allocate their own buffers, and not counting the OpenMP runtime's own bookkeeping when a call forks a
/// team).
template <typename Scalar>
class Workspace {
 public:
  /// Bytes of working memory held now.
  std::size_t bytes() const { return m_buffers.bytes(); }
  /// Frees everything; the next call grows it again.
  void release() {
    m_buffers = detail::ForwardBuffers<detail::compute_t<Scalar>>();
    m_stores = std::vector<detail::KVStore*>();
    m_layers = std::vector<const Linear<Scalar>*>();
  }

 private:
  friend class HeadAttention<Scalar>;
  friend class MultiHeadAttention<Scalar>;
  friend class detail::PackedForm<Scalar>;  // both packed forms' calls
  detail::ForwardBuffers<detail::compute_t<Scalar>> m_buffers;
  std::vector<detail::KVStore*> m_stores;       // a cached call's caches, [heads · batch]
  std::vector<const Linear<Scalar>*> m_layers;  // the multi-head layer's projections, [3 · heads]
};

}  // namespace head_attention

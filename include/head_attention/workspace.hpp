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
/// layer's converted weights) and leaves them there. That saves the allocation and, above all, the page
/// faults of the large buffers: glibc maps a buffer above its threshold fresh for every call (50 MB for 8
/// heads at B = 8, T = 1024, about 19 ms of page faults per call). Any layer of the same Scalar may use it,
/// one call at a time: threads that run forward calls at once need one workspace each.
///
/// Every buffer only grows, to the largest size any call served (or reservation) needed, and each call cuts
/// what it needs from them: a workspace that has served or been reserved for several shapes serves all of
/// them, and smaller ones (fewer or shorter sequences, fewer threads), in any order, without allocating. It
/// holds at most the largest of those needs, buffer by buffer. A cached call (a prefill) also keeps room for
/// the one-row decode steps over the same caches, so the steps after a prefill allocate nothing either; one
/// reserve_cached_workspace(workspace, cache, t) sizes it for a prefill of t rows and the steps after it.
///
/// No-allocation mode: forward_into and forward_cached_into given a workspace that served (the warm-up) or
/// was reserved for their shape or a larger one, and with every cache reserve()d, allocate nothing at all
/// (proven by unit-noalloc with a counting operator new and EIGEN_RUNTIME_NO_MALLOC; not with
/// HEAD_ATTENTION_GEMM_FALLBACK, whose products allocate their own buffers, and not counting the OpenMP
/// runtime's own bookkeeping when a call forks a team).
///
/// A call or reservation whose working memory cannot be addressed (a size product past the largest Index)
/// throws shape_error before changing anything; one whose memory is not available throws std::bad_alloc,
/// leaving a workspace that still works (a buffer that could not grow may have been freed: it is allocated
/// again when needed).
template <typename Scalar>
class Workspace {
 public:
  /// Bytes of working memory held now (the Scalar buffers: Q|K|V, weights, scratch, GEMM packing buffers).
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

/// \file
/// head-attention: KVCache, the keys and values of the positions a layer has already processed.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "detail/kv_store.hpp"
#include "errors.hpp"
#include "fwd.hpp"
#include "mask.hpp"
#include "precision.hpp"

namespace head_attention {

namespace detail {

/// This thread's list of T, for calls that come without a workspace to hold their list of caches or layers
/// (each user resizes or clears it first; none runs inside another of the same T): a decode step through
/// forward_cached then allocates nothing but its result.
template <typename T>
std::vector<T>& thread_list() {
  thread_local std::vector<T> list;
  return list;
}

struct CacheAccess;
}  // namespace detail

/// The keys and values of one sequence's positions so far, for incremental decoding: made by
/// HeadAttention::make_cache() and extended by HeadAttention::forward_cached(). It belongs to the sizes and
/// mask rule of the layer that made it (a layer of other sizes or another rule refuses it), holds only what
/// it has seen (its storage grows as it fills, up to max_seq_len rows), and under a sliding window only the
/// last window positions, so that a windowed decode runs in O(window) memory.
template <typename Scalar>
class KVCache {
 public:
  /// Eigen's signed index type, for every size and position.
  using Index = Eigen::Index;

  /// Positions processed so far: the next row given to forward_cached has this position.
  Index size() const { return m_store.length(); }
  /// Rows of key/value storage allocated now.
  Index capacity() const { return m_store.capacity(); }
  /// Forgets every position (the storage stays allocated): the next chunk starts at position 0.
  void clear() { m_store.clear(); }

  /// Allocates storage for max_seq_len positions now (keeping what is stored), so that no later call that
  /// extends this cache allocates for it: the no-allocation mode of forward_cached_into with a Workspace.
  /// Throws std::bad_alloc, with the cache unchanged, if that memory is not available.
  void reserve() {
    if (capacity() < m_max_seq_len) m_store.prepare(m_max_seq_len - m_store.length(), m_store.first());
  }

  /// Forgets the positions at or after `size`, so that decoding resumes at position `size` (to roll back
  /// rejected tokens, say). Throws shape_error, with the cache unchanged, unless 0 <= size <= this->size(),
  /// and, under a sliding window, unless the keys position `size` sees are still stored (the window drops
  /// older ones as it advances).
  void truncate(Index size) {
    const char* where = "KVCache::truncate";
    HEAD_ATTENTION_REQUIRE(size >= 0 && size <= m_store.length(), where, "size",
                           "in [0, size() = " + std::to_string(m_store.length()) + "]", std::to_string(size));
    if (size == 0) {
      m_store.clear();
      return;
    }
    HEAD_ATTENTION_REQUIRE(m_rule.first_key(size) >= m_store.first(), where, "size",
                           ">= " + std::to_string(m_store.first() + m_rule.window() - 1) +
                               " (the sliding window has dropped the positions before " +
                               std::to_string(m_store.first()) + ")",
                           std::to_string(size));
    m_store.truncate(size);
  }

  /// The sizes and rule of the layer that made the cache.
  ///@{
  Index emb_size() const { return m_emb_size; }
  Index head_size() const { return m_store.head(); }
  Index max_seq_len() const { return m_max_seq_len; }
  const MaskRule& mask_rule() const { return m_rule; }
  ///@}
  /// The precision keys and values are stored in (chosen by make_cache).
  Precision precision() const { return m_store.precision(); }

 private:
  friend struct detail::CacheAccess;

  /// Throws shape_error unless the cache belongs to a layer of these sizes and this rule and has room for t
  /// more positions; `name` is what the message calls it.
  void check_fits(Index emb_size, Index head_size, Index max_seq_len, const MaskRule& rule, Index t,
                  const char* where, const std::string& name) const {
    HEAD_ATTENTION_REQUIRE(
        m_emb_size == emb_size && this->head_size() == head_size && m_max_seq_len == max_seq_len, where,
        name + " sizes (emb_size, head_size, max_seq_len)",
        "this layer's (" + std::to_string(emb_size) + ", " + std::to_string(head_size) + ", " +
            std::to_string(max_seq_len) + ")",
        "(" + std::to_string(m_emb_size) + ", " + std::to_string(this->head_size()) + ", " +
            std::to_string(m_max_seq_len) + ")");
    HEAD_ATTENTION_REQUIRE(m_rule == rule, where, name + " mask rule", "this layer's " + rule.name(),
                           m_rule.name());
    HEAD_ATTENTION_REQUIRE(size() + t <= max_seq_len, where, name + ".size() + t",
                           "<= max_seq_len = " + std::to_string(max_seq_len),
                           std::to_string(size()) + " + " + std::to_string(t));
  }

  KVCache(Index emb_size, Index head_size, Index max_seq_len, const MaskRule& rule, Precision storage)
      : m_emb_size(emb_size),
        m_max_seq_len(max_seq_len),
        m_rule(rule),
        m_store(head_size, max_seq_len, storage) {}

  Index m_emb_size;
  Index m_max_seq_len;
  MaskRule m_rule;
  detail::KVStore m_store;  // K and V, [capacity, head_size] each, in precision()
};

namespace detail {

/// What every layer form's decode step needs of a KVCache's insides, in one place: the layers and their
/// packed forms share it.
struct CacheAccess {
  using Index = Eigen::Index;

  /// An empty cache for a layer of these sizes and this rule.
  template <typename Scalar>
  static KVCache<Scalar> make(Index emb_size, Index head_size, Index max_seq_len, const MaskRule& rule,
                              Precision storage) {
    return KVCache<Scalar>(emb_size, head_size, max_seq_len, rule, storage);
  }

  /// KVCache::check_fits: throws shape_error unless `cache` fits a layer of these sizes and rule and has room
  /// for t more positions.
  template <typename Scalar>
  static void check_fits(const KVCache<Scalar>& cache, Index emb_size, Index head_size, Index max_seq_len,
                         const MaskRule& rule, Index t, const char* where, const std::string& name) {
    cache.check_fits(emb_size, head_size, max_seq_len, rule, t, where, name);
  }

  /// The cache's storage, to be read for its sizes only (a workspace's sizing, AttentionPlan::size_only).
  template <typename Scalar>
  static KVStore* sizing_store(const KVCache<Scalar>& cache) {
    return const_cast<KVStore*>(&cache.m_store);
  }

  /// One decode step of t rows over caches[0, count), already checked: prepares every cache's storage for t
  /// more rows into `stores` (under a sliding window dropping the positions before the first key of the
  /// chunk's first query, which no later query sees; other rules keep everything), runs run(stores.data()),
  /// which writes the new keys and values, then commits the t rows.
  template <typename Scalar, typename Run>
  static void step(KVCache<Scalar>* caches, Index count, Index t, const MaskRule& rule,
                   std::vector<KVStore*>& stores, Run&& run) {
    stores.resize(static_cast<std::size_t>(count));
    for (Index b = 0; b < count; ++b) {
      KVStore& store = caches[b].m_store;
      const Index keep_from =
          rule.kind() == MaskRule::Kind::sliding_window ? rule.first_key(store.length()) : 0;
      store.prepare(t, keep_from);
      stores[static_cast<std::size_t>(b)] = &store;
    }
    std::forward<Run>(run)(stores.data());
    for (KVStore* store : stores)
      store->commit(t);
  }
};

}  // namespace detail

}  // namespace head_attention

// head-attention: the storage behind a KV cache, and the view of keys the attention kernel reads.
#pragma once

#include <algorithm>

#include <cstddef>

#include <Eigen/Core>

#include "../precision.hpp"

namespace head_attention::detail {

/// One sequence's keys and values: K and V rows of absolute positions [first, count), stored in `precision`,
/// the row of position j at element k + (j - first) · stride (and v likewise). Keys at or after `valid` are
/// masked for every query (right padding). Positions before `first` (dropped by a sliding-window cache) are
/// never visible. Optionally the same keys transposed, in the compute type, which Q·Kᵀ reads without
/// packing: Kᵀ [head, count - first] cut into column panels of kt_panel keys, each [head, kt_panel] and
/// row-major, one after another, so position j's key is column (j - first) % kt_panel of panel (j - first) /
/// kt_panel (see key_panel). And whether every value is known to be finite (false: unknown, so the kernel
/// checks each masked tile).
struct KeyValues {
  const void* k;
  const void* v;
  Precision precision;
  Eigen::Index stride;
  Eigen::Index first;
  Eigen::Index count;
  Eigen::Index valid;
  const void* kt = nullptr;
  Eigen::Index kt_panel = 0;
  bool values_finite = false;
};

/// One sequence's cached keys and values: rows [offset, offset + stored) of k and v ([capacity, head] each)
/// hold positions [first, length). K and V are kept apart, each contiguous: a decode step streams each once,
/// and two contiguous streams were measured 26% faster than one interleaved [k | v] array. Positions before
/// `first` were dropped (a sliding window can never see them again). Grows by doubling up to `limit` rows, so
/// memory follows what was stored, and compacts instead of growing when dropped rows leave room at the front,
/// so that a windowed decode stays O(window). Rows are kept as raw elements of the precision chosen at
/// construction (a float layer may keep its keys and values in bfloat16 or float16, halving what a decode
/// step streams): written from the layer's compute type, converted back tile by tile by the kernel.
class KVStore {
 public:
  using Index = Eigen::Index;
  using Bytes = Eigen::Matrix<unsigned char, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  KVStore(Index head, Index limit, Precision precision)
      : m_head(head), m_limit(limit), m_precision(precision) {}

  Index head() const { return m_head; }
  Precision precision() const { return m_precision; }
  /// Positions seen so far: the next row appended has this position.
  Index length() const { return m_length; }
  /// The first position still stored.
  Index first() const { return m_first; }
  /// Rows of storage allocated.
  Index capacity() const { return m_k.rows(); }
  /// The most rows the store may hold (the layer's max_seq_len).
  Index limit() const { return m_limit; }

  /// Forgets every position; keeps the storage.
  void clear() { m_first = m_length = m_offset = 0; }

  /// Forgets the positions at or after `length` (first() <= length <= this->length()).
  void truncate(Index length) noexcept { m_length = length; }

  /// Makes room for `t` more rows, first dropping positions before keep_from (those no later query can see).
  /// Throws std::bad_alloc, with nothing changed, if growing fails; the caller has checked that length() + t
  /// stays within the limit.
  void prepare(Index t, Index keep_from) {
    const Index first = std::clamp(keep_from, m_first, m_length);
    const Index stored = m_length - first;
    const Index needed = stored + t;
    const Index offset = m_offset + (first - m_first);
    if (offset + needed > capacity()) {
      if (needed > capacity() || (2 * needed > capacity() && capacity() < m_limit)) {
        const Index grown = std::min(std::max<Index>({2 * capacity(), 2 * needed, 16}), m_limit);
        Bytes k(std::max(grown, needed), row_bytes());  // may throw: nothing has changed yet
        Bytes v(std::max(grown, needed), row_bytes());
        if (stored > 0) {
          k.topRows(stored) = m_k.middleRows(offset, stored);
          v.topRows(stored) = m_v.middleRows(offset, stored);
        }
        m_k.swap(k);
        m_v.swap(v);
      } else {
        // Compact: enough room once the dropped rows at the front are reused. Rows move towards the front, so
        // the row-by-row copy never overwrites a row before it is read.
        for (Index r = 0; r < stored; ++r) {
          m_k.row(r) = m_k.row(offset + r);
          m_v.row(r) = m_v.row(offset + r);
        }
      }
      m_offset = 0;
    } else {
      m_offset = offset;
    }
    m_first = first;
  }

  /// Writes the K and V rows of positions [length, length + t) (k rows at k, stride; V rows at k + head),
  /// converted to the store's precision, into the room made by prepare. Does not advance length(): commit
  /// does, once the call has read them.
  template <typename Scalar>
  void write(const Scalar* k, Index stride, Index t) noexcept {
    const Index at = m_offset + m_length - m_first;
    store_rows(k, stride, t, m_head, m_precision, m_k.row(at).data(), m_head);
    store_rows(k + m_head, stride, t, m_head, m_precision, m_v.row(at).data(), m_head);
  }
  /// write's keys (values false) or values, columns [col0, col0 + cols) only: each projection item of a call
  /// of few rows stores the columns it computed (the same conversion, element by element, as write).
  template <typename Scalar>
  void write_columns(const Scalar* src, Index stride, Index t, bool values, Index col0, Index cols) noexcept {
    const Index at = m_offset + m_length - m_first;
    unsigned char* const row = (values ? m_v : m_k).row(at).data();
    store_rows(src, stride, t, cols, m_precision,
               row + col0 * static_cast<Index>(precision_bytes(m_precision)), m_head);
  }
  void commit(Index t) noexcept { m_length += t; }

  /// The stored keys plus the t rows written after them.
  KeyValues keys(Index t) const noexcept {
    const std::ptrdiff_t skip = static_cast<std::ptrdiff_t>(m_offset) * m_k.cols();
    return KeyValues{m_k.data() + skip, m_v.data() + skip, m_precision, m_head,
                     m_first,           m_length + t,      m_length + t};
  }

 private:
  Index row_bytes() const { return m_head * static_cast<Index>(precision_bytes(m_precision)); }

  Index m_head;
  Index m_limit;
  Precision m_precision;
  Index m_first = 0;
  Index m_length = 0;
  Index m_offset = 0;
  Bytes m_k;  // [capacity, head · element size] keys
  Bytes m_v;  // [capacity, head · element size] values
};

}  // namespace head_attention::detail

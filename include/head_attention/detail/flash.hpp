// head-attention: the fused forward pass. One projection pass for Q, K and V, then a tiled online-softmax
// (FlashAttention-2 style) causal attention over (sequence x query block) work items on all cores. Extra
// memory is O(T · head_size).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../errors.hpp"
#include "../linear.hpp"
#include "../mask.hpp"
#include "../precision.hpp"
#include "exp_sum.hpp"
#include "gemm.hpp"
#include "kernels16.hpp"
#include "keyscores.hpp"
#include "kv_store.hpp"
#include "microkernel.hpp"
#include "parallel.hpp"
#include "rowdot.hpp"

namespace head_attention::detail {

/// Block sizes and thresholds, chosen by measurement with bench/ (the runs: bench/results/block_sizes.md).
struct Tuning {
  /// Rows of Q per work item: a multiple of the GEMM's 6-row tile, so that no tile runs short of rows (64
  /// left a 4-row tile in every block, 5-7% slower in AVX2 builds).
  static constexpr Eigen::Index query_block = 96;
  /// Rows of K and V per inner step: a multiple of query_block and of the Kᵀ panel (key_panel).
  static constexpr Eigen::Index key_block = 384;
  /// Rows of K and V per inner step when each work item has one query row (decoding).
  static constexpr Eigen::Index decode_key_block = 2048;
  /// The same for keys stored in another precision: each tile is converted into scratch first, which must
  /// stay in L2.
  static constexpr Eigen::Index decode_wide_key_block = 256;
  /// Inputs shorter than projection_split · projection_rows rows are cut into about this many projection
  /// chunks (of at least projection_min_rows), whatever the thread count.
  static constexpr Eigen::Index projection_split = 8;
  /// Rows of x per projection work item, at least (unless x has fewer). Nothing is packed per item, so short
  /// chunks are cheap; 12 cuts the seed's B = 2, T = 10 into equal chunks of 10 rows (chunks of whole 6-row
  /// tiles, 12 + 8, were slower on two threads).
  static constexpr Eigen::Index projection_min_rows = 12;
  /// Rows of x per projection work item, at most.
  static constexpr Eigen::Index projection_rows = 256;
  /// Below this many useful flops a forward call stays on one thread (forking is cheap next to the
  /// projection GEMMs: only toy sizes stay serial). A one-head decode step at emb 512, n = 128 (2.3e5 flops)
  /// measured 1.27x faster on two threads than on one in one run and 0.67x in another (Zen 4, shared).
  static constexpr double serial_below_flops = 1e5;
  /// Calls extending caches by at most this many rows in all (decode steps) project through the weights as
  /// stored ([out, in] rows, project_rows) instead of preparing them for the GEMMs: the preparation
  /// (transposing and scaling every weight, widening 16-bit ones) costs a layer more than its call's
  /// products. Both forms take the path (so that the packed ones keep the layer's bits), and it trades the
  /// layer's gain against the packed form's loss to its GEMMs on prepared panels, which grows with the rows.
  /// Measured on Zen 4 (AVX-512, one thread, emb 512, head 64, n = 512 cached, t new rows; layer GEMM /
  /// row dots, packed GEMM / row dots): one head t = 1: 21.8 / 8.3, 7.9 / 8.3 us; t = 4: 35.5 / 25.5,
  /// 22.0 / 25.3; t = 8: 49.3 / 42.2, 35.6 / 42.1; 8 heads t = 4: 363 / 255, 197 / 240; t = 8: 543 / 407,
  /// 332 / 443. At 8 rows the layer's gain and the packed form's loss are about equal (1.2-1.3x each).
  static constexpr Eigen::Index rowdot_rows = 8;
  /// Weight rows per projection work item on that path: a block of one projection (a head's Q, K or V, or
  /// the output projection), so that even a single head's step has work for two threads. By the shape
  /// alone, and an output's bits never depend on its block.
  static constexpr Eigen::Index rowdot_block = 32;
  /// Below this many useful flops a call on the default thread count (set_num_threads(0)) stays on one
  /// thread too: every decode step of one sequence, and short prefills. A team meets at barriers, and on
  /// cores shared with other processes each barrier can wait out a scheduler time slice (milliseconds) for a
  /// preempted thread: forking pays only when a call is long next to that (docs/performance.md, "Threads
  /// under load"; bench/bench_load). An explicit set_num_threads(n) is honoured above serial_below_flops.
  static constexpr double default_serial_below_flops = 2e7;
  /// A decode query (one row) over at least twice this many visible keys is cut into key ranges of about
  /// this many keys, each a work item of its own (flash-decoding), so that one sequence's step has work for
  /// every thread; the partial results are merged in a fixed order. Below, one item per query. Measured on
  /// Zen 4 (bench/results/2026-12-07_decode_threads_load.md): one head, n = 2048, two threads 1.83x faster
  /// than one (1.14x unsplit); each range costs a serial step about 0.2 µs (7% there). 128 and 512 were
  /// not distinguishable from 256 on the shared machine.
  static constexpr Eigen::Index decode_split_keys = 256;
  /// ... into at most enough ranges that heads · batch · ranges reaches this many items (no split when the
  /// heads and sequences alone make that many).
  static constexpr Eigen::Index decode_split_items = 16;
};
// With key blocks a multiple of query blocks, every key block a query block visits starts at or before its
// first query, so no row of a tile is wholly masked. (When T < key_block, one key block covers every key.)
static_assert(Tuning::key_block % Tuning::query_block == 0, "key_block must be a multiple of query_block");

/// Per-thread working storage for the attention loop, fitted before the parallel region (so that a bad_alloc
/// reaches the caller as an exception instead of terminating inside an OpenMP region). Its arrays are views
/// cut from one allocation, which only grows: fitted to another call's sizes, the views are re-cut, and the
/// allocation is replaced only when it is too small for them, so that a workspace's scratch serves every
/// call it served before (and smaller ones) without allocating. One allocation: a call without a workspace
/// builds one scratch per thread, and at the seed's B = 2, T = 10 the ten allocations of each (and the unused
/// GEMM buffers) were 4-5% of a two-thread call's profile.
template <typename Scalar>
struct FlashScratch {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  /// The sizes of one call's scratch. wide_keys: also room for one converted K and V tile (keys stored in
  /// another precision). cached_keys: keys not stored transposed (a KV cache), whose Q·Kᵀ takes Eigen's
  /// packed GEMM and its buffers.
  struct Shape {
    Index block_q = 0, block_k = 0, head = 0;
    bool wide_keys = false, cached_keys = false;
    bool operator==(const Shape& o) const noexcept {
      return block_q == o.block_q && block_k == o.block_k && head == o.head && wide_keys == o.wide_keys &&
             cached_keys == o.cached_keys;
    }
  };

  FlashScratch() = default;  // empty: fit() cuts the arrays
  // The views point into storage: a copy would share it, a move keeps it (Eigen moves the heap block).
  FlashScratch(const FlashScratch&) = delete;
  FlashScratch(FlashScratch&&) = default;
  FlashScratch& operator=(const FlashScratch&) = delete;
  FlashScratch& operator=(FlashScratch&&) = delete;

  /// Elements of storage a call of this shape needs. Never decreases as any size grows (or a flag is set),
  /// so that storage sized for a shape holds every smaller one. The sizes must have been checked (see
  /// check_call_sizes): every product here is at most a few times block_k · head, which fits.
  static Index size(const Shape& s) noexcept {
    const Index tile_k = s.block_q > 1 ? s.block_k : 0, tile_w = s.wide_keys ? s.block_k : 0;
    return aligned(s.block_q * s.block_k) + aligned(s.block_q * s.head) + aligned(tile_k * s.head) +
           2 * aligned(tile_w * s.head) + aligned(s.block_k) + 2 * aligned(s.block_q) +
           Gemm<Scalar>::buffer_size(s.cached_keys ? s.block_q : 1, s.block_k, s.head);
  }

  /// Cuts the arrays for a call of this shape from storage, first growing storage to at least
  /// max(size(shape), reserve) elements if it has fewer (reserve: room kept for another shape to come, a
  /// workspace's decode steps after a prefill). Allocates nothing when storage is large enough; a shape like
  /// the last one's only compares. Throws std::bad_alloc if growing fails, the scratch then empty (the next
  /// fit grows it again).
  void fit(const Shape& shape, Index reserve = 0) {
    const Index needed = std::max(size(shape), reserve);
    const bool grow = storage.size() < needed;
    if (!grow && m_fitted && shape == m_shape) return;
    m_fitted = false;  // until every view is cut (a bad_alloc on the way leaves it so)
    if (grow) {
      storage.resize(0);  // free first: never hold both
      storage.resize(needed);
    }
    if (seen.size() < static_cast<std::size_t>(2 * shape.block_q))
      seen.resize(static_cast<std::size_t>(2 * shape.block_q));
    const Index bq = shape.block_q, bk = shape.block_k, head = shape.head;
    const Index tile_k = bq > 1 ? bk : 0, tile_w = shape.wide_keys ? bk : 0;
    Index used = 0;
    const auto take = [&](Index n) {
      Scalar* p = storage.data() + used;
      used += aligned(n);
      return p;
    };
    // Re-seated in place, Eigen's documented way to point a Map elsewhere.
    new (&probs) Eigen::Map<Matrix>(take(bq * bk), bq, bk);
    new (&acc) Eigen::Map<Matrix>(take(bq * head), bq, head);
    new (&clean_values) Eigen::Map<Matrix>(take(tile_k * head), tile_k, head);
    new (&wide_k) Eigen::Map<Matrix>(take(tile_w * head), tile_w, head);
    new (&wide_v) Eigen::Map<Matrix>(take(tile_w * head), tile_w, head);
    new (&zeros) Eigen::Map<Vector>(take(bk), bk);
    new (&row_max) Eigen::Map<Vector>(take(bq), bq);
    new (&row_sum) Eigen::Map<Vector>(take(bq), bq);
    const Index qk_rows = shape.cached_keys ? bq : 1;
    qk.use(qk_rows, bk, head, take(Gemm<Scalar>::buffer_size(qk_rows, bk, head)));
    zeros.setZero();
    seen_begin = seen.data();
    seen_end = seen.data() + bq;
    m_shape = shape;
    m_fitted = true;
  }

 private:
  static constexpr Index align = 64 / static_cast<Index>(sizeof(Scalar));  // each array on a cache line
  static constexpr Index aligned(Index n) noexcept { return (n + align - 1) / align * align; }

  Shape m_shape;          // the shape the views are cut for
  bool m_fitted = false;  // whether they are

 public:
  Vector storage;                           // every array below, and qk's packing buffers
  Eigen::Map<Matrix> probs{nullptr, 0, 0};  // [block_q, block_k] scores of one tile, then their exponentials
  Eigen::Map<Matrix> acc{nullptr, 0, 0};    // [block_q, head] un-normalised output
  Eigen::Map<Matrix> clean_values{nullptr, 0, 0};  // [block_k, head] a masked tile's V with its non-finite
                                                   // rows zeroed (unused for one row)
  Eigen::Map<Matrix> wide_k{nullptr, 0,
                            0};  // [block_k, head] a K tile converted from the cache's precision (or unused)
  Eigen::Map<Matrix> wide_v{nullptr, 0, 0};  // [block_k, head] its V tile
  Eigen::Map<Vector> zeros{nullptr, 0};      // [block_k] all 0: the bias of probs = 0 + Q·Kᵀ
  Eigen::Map<Vector> row_max{nullptr, 0};    // [block_q] running max of each query's scores
  Eigen::Map<Vector> row_sum{nullptr, 0};    // [block_q] running sum of exp(score - row_max)
  std::vector<Index> seen;                   // [>= 2 · block_q] seen_begin, then seen_end:
  Index* seen_begin = nullptr;  // [block_q] the tile-relative key range each query sees in the current tile
  Index* seen_end = nullptr;    // [block_q]
  Gemm<Scalar> qk;              // probs = Q_tile · K_tileᵀ, for keys not stored transposed (a cache)
};

/// One sequence's queries: the rows at absolute positions [position, position + rows), scaled Q of row r at
/// q + r · stride, its output row at out + r · out_stride (stored as Out: the layer's Scalar, or the compute
/// type for an intermediate buffer). lse, when not null, receives row r's logsumexp at lse[r] (a training
/// forward keeps it for the backward).
template <typename Scalar, typename Out = Scalar>
struct Queries {
  const Scalar* q;
  Eigen::Index stride;
  Eigen::Index position;
  Out* out;
  Eigen::Index out_stride;
  Scalar* lse;
};

/// Whether every entry of the row-major [rows, cols] block at p (leading dimension stride) is finite: x · 0
/// is 0 for a finite x and NaN otherwise, and a sum of such terms stays 0 or becomes NaN. A vectorised sum
/// per row, where Eigen's allFinite() compares entry by entry (measured 1.6% of a call at B = 2, T = 10).
template <typename Scalar>
bool all_finite(const Scalar* p, Eigen::Index stride, Eigen::Index rows, Eigen::Index cols) noexcept {
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  Scalar sum(0);
  for (Eigen::Index r = 0; r < rows; ++r)
    sum += (Eigen::Map<const RowVector>(p + r * stride, cols).array() * Scalar(0)).sum();
  return sum == Scalar(0);
}

/// Rows per group of a masked tile, each of which multiplies only the keys some row of it sees: the register
/// tile's rows. With the Gemm fallback (Eigen's public product, which packs its operands per call) the whole
/// tile is one group: there six-row products made a forward call 4-5% slower.
inline constexpr Eigen::Index masked_group_rows =
    gemm_uses_eigen_internals ? tile_rows : std::numeric_limits<Eigen::Index>::max();

/// acc[bq, head] += probs[bq, bk] · V_tile for a tile where some query cannot see some key (its probs are 0
/// there). A GEMM multiplies those zeros by the V rows, and 0 · NaN or 0 · Inf is NaN: a masked key would
/// leak into outputs that cannot see it. So when the tile's V is not all finite, its non-finite rows are
/// zeroed in a copy for the GEMM and added back afterwards only to the queries whose range [seen_begin[r],
/// seen_end[r]) (tile-relative) contains them. With finite V this is the plain GEMM; either way an output
/// that cannot see a key is bit-identical to what it would be if that key held any finite value.
template <typename Scalar>
void partial_tile_values(const Scalar* v_tile, Eigen::Index stride, Eigen::Index head, Eigen::Index bq,
                         Eigen::Index bk, const Eigen::Index* seen_begin, const Eigen::Index* seen_end,
                         bool known_finite, FlashScratch<Scalar>& s) noexcept {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  const Index block_k = s.probs.cols();
  const Eigen::Map<const Matrix, 0, Stride> v(v_tile, bk, head, Stride(stride));
  if (bq == 1) {  // one query: its keys alone, so a masked row of V is never even read
    const Index a = seen_begin[0], b = seen_end[0];
    if (b > a) s.acc.row(0).noalias() += s.probs.row(0).segment(a, b - a) * v.middleRows(a, b - a);
    return;
  }
  // Non-finite rows of V, if any, zeroed in a copy for the product and added back below.
  const bool finite = known_finite || v.allFinite();
  const Scalar* values = v_tile;
  Index values_stride = stride;
  if (!finite) {
    Eigen::Map<Matrix> clean(s.clean_values.data(), bk, head);
    clean = v;
    for (Index t = 0; t < bk; ++t)
      if (!v.row(t).allFinite()) clean.row(t).setZero();
    values = clean.data();
    values_stride = head;
  }
  // Each group of a tile's rows takes only the keys some row of it sees (probs are 0 elsewhere, and adding
  // 0 · v leaves a sum as it is): on the causal diagonal, about half of the tile. The same groups with or
  // without a copy, so that an output's rounding never depends on whether V is finite (Eigen's own product,
  // the Gemm fallback, rounds differently for another depth even when the extra terms are 0).
  for (Index r = 0; r < bq; r += masked_group_rows) {
    const Index rows = std::min<Index>(masked_group_rows, bq - r);
    const Index a = *std::min_element(seen_begin + r, seen_begin + r + rows);
    const Index b = *std::max_element(seen_end + r, seen_end + r + rows);
    if (b > a)
      gemm_nn(rows, head, b - a, s.probs.data() + r * block_k + a, block_k, values + a * values_stride,
              values_stride, s.acc.data() + r * head, head);
  }
  if (finite) return;
  for (Index t = 0; t < bk; ++t) {
    if (v.row(t).allFinite()) continue;
    for (Index r = 0; r < bq; ++r)
      if (t >= seen_begin[r] && t < seen_end[r]) s.acc.row(r) += s.probs(r, t) * v.row(t);
  }
}

/// probs[bq, n] = Q · Kᵀ for the keys [j0, j0 + n) of a Kᵀ stored in column panels of `panel` keys (see
/// KeyValues::kt): one GEMM per panel, or per piece of one where the range starts or ends inside it. Every
/// score is the same FMA chain over the head as in one GEMM over the whole range, so the cut never changes a
/// bit. (Taking each group of query rows across all the panels before the next, rather than panel after
/// panel, measured 4% faster Q·Kᵀ alone with AVX-512 but no difference in a whole forward call.)
template <typename Scalar>
void scores_from_panels(Eigen::Index bq, Eigen::Index n, Eigen::Index head, const Scalar* q, Eigen::Index ldq,
                        const Scalar* kt, Eigen::Index panel, Eigen::Index j0, const Scalar* zeros,
                        Scalar* probs, Eigen::Index ldp) noexcept {
  for (Eigen::Index j = j0; j < j0 + n;) {
    const Eigen::Index offset = j % panel;
    const Eigen::Index width = std::min(panel - offset, j0 + n - j);
    gemm_nn(bq, width, head, q, ldq, kt + (j - offset) * head + offset, panel, probs + (j - j0), ldp, 1,
            zeros);
    j += width;
  }
}

/// probs[bq, ·] = Q · Kᵀ in a cut tile (the causal diagonal, say), where query r sees the tile's keys
/// [seen_begin[r], seen_end[r]), both non-decreasing in r, and Kᵀ's column key0 is the tile's first key.
/// Panel piece by panel piece, each for the groups of masked_group_rows rows some row of which sees a key
/// in it: every group then runs whole-width tiles up to the panel its range ends in, where one call per
/// group cut its last panel into narrow tiles and a padded copy (the cut tiles' Q·Kᵀ ran 1.25x slower per
/// score than P·V's with AVX2). Scores past a row's range are computed, and zeroed by the softmax; none
/// lies outside the tile's keys [seen_begin[0], seen_end[bq - 1]).
template <typename Scalar>
void cut_tile_scores(Eigen::Index bq, Eigen::Index head, const Scalar* q, Eigen::Index ldq, const Scalar* kt,
                     Eigen::Index panel, Eigen::Index key0, const Eigen::Index* seen_begin,
                     const Eigen::Index* seen_end, const Scalar* zeros, Scalar* probs,
                     Eigen::Index ldp) noexcept {
  using Index = Eigen::Index;
  constexpr Index G = masked_group_rows;
  const Index groups = bq <= G ? 1 : (bq + G - 1) / G;
  const auto first_row = [&](Index g) { return g == 0 ? 0 : g * G; };  // (G may be the largest Index)
  const auto group_begin = [&](Index g) { return seen_begin[first_row(g)]; };
  const auto group_end = [&](Index g) { return seen_end[g + 1 < groups ? first_row(g + 1) - 1 : bq - 1]; };
  const Index lo = seen_begin[0], hi = std::max(lo, seen_end[bq - 1]);
  Index g_lo = 0, g_hi = 0;  // the groups [g_lo, g_hi) that see some key of the current piece
  for (Index j = lo; j < hi;) {
    const Index offset = (key0 + j) % panel;
    const Index width = std::min(panel - offset, hi - j);
    while (g_lo < groups && group_end(g_lo) <= j)
      ++g_lo;
    while (g_hi < groups && group_begin(g_hi) < j + width)
      ++g_hi;
    if (g_lo < g_hi) {
      const Index r = first_row(g_lo), rows = (g_hi == groups ? bq : first_row(g_hi)) - r;
      gemm_nn(rows, width, head, q + r * ldq, ldq, kt + (key0 + j - offset) * head + offset, panel,
              probs + r * ldp + j, ldp, 1, zeros);
    }
    j += width;
  }
}

/// A key range of one decode query, a work item of its own (flash-decoding): attend_query_block visits only
/// the keys [begin, end) (absolute positions) and writes its un-normalised partial result to `partial`
/// ([head + 2]: the running max of the scores, the sum of their exponentials, then the accumulator Σ exp ·
/// v) instead of the output; combine_partials merges the ranges of a query.
template <typename Scalar>
struct KeyRange {
  Eigen::Index begin = 0;
  Eigen::Index end = std::numeric_limits<Eigen::Index>::max();
  Scalar* partial = nullptr;
};

/// Attention of the query rows [r0, r0 + bq) of one sequence over its keys, under `rule` and the padding of
/// `keys` (and within `range`: all keys by default; a partial result for one row). Each query sees the
/// contiguous key range [first_key, end_key) of its position, so only the key blocks between the first row's
/// first key and the last row's end are visited, and only tiles cut by some row's range are masked. A query
/// that sees no key gets a zero row. Keys stored in another precision than Scalar are converted tile by tile
/// into the scratch's wide_k / wide_v. Never throws, never allocates.
template <typename Scalar, typename Out>
void attend_query_block(const Queries<Scalar, Out>& queries, const KeyValues& keys, const MaskRule& rule,
                        Eigen::Index r0, Eigen::Index bq, FlashScratch<Scalar>& s,
                        const KeyRange<Scalar>& range = {}) noexcept {
  using Index = Eigen::Index;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Index head = s.acc.cols();
  const Index block_k = s.probs.cols();
  const Index p0 = queries.position + r0;  // absolute position of the block's first query
  const auto first_key = [&](Index r) { return std::max({rule.first_key(p0 + r), keys.first, range.begin}); };
  const auto end_key = [&](Index r) {
    return std::min({rule.end_key(p0 + r, keys.count), keys.valid, range.end});
  };

  s.row_max.head(bq).setConstant(-std::numeric_limits<Scalar>::infinity());
  s.row_sum.head(bq).setZero();
  s.acc.topRows(bq).setZero();

  // One query over 16-bit keys (a decode step): read them in place, converted in registers.
  const bool fused = bq == 1 && fused_16bit<Scalar>(keys.precision, head);
  // One query over keys of the compute type stored row after row (a cache): dot products over the rows in
  // place, where the GEMM would pack the tile first (one more pass over it).
  const bool dots =
      bq == 1 && keys.kt == nullptr && keys.precision == precision_of<Scalar>() && keys.stride == head;
  // Both ends of a query's range never decrease with its position.
  const Index lo = first_key(0);
  Index hi = end_key(bq - 1);
#if HEAD_ATTENTION_KEY_SCORES_16
  // One query over float rows in place: scores, softmax and values in one pass (attend_keys). (The same
  // pass over a bfloat16 cache was 1.1-1.25x slower than the passes below: its split-query dot products
  // and widening keep the core busier than the rows' reads.)
  if constexpr (std::is_same<Scalar, float>::value)
    if (dots && lo < hi) {
      const std::ptrdiff_t skip = static_cast<std::ptrdiff_t>((lo - keys.first) * keys.stride);
      if (attend_keys(queries.q + r0 * queries.stride, static_cast<const float*>(keys.k) + skip,
                      static_cast<const float*>(keys.v) + skip, keys.stride, hi - lo, head, &s.row_max[0],
                      &s.row_sum[0], s.acc.data()))
        hi = lo;  // the tile loop below visits nothing
    }
#endif
  for (Index j0 = lo; j0 < hi; j0 += block_k) {
    const Index bk = std::min(block_k, hi - j0);
    const Scalar* k_tile = nullptr;
    const Scalar* v_tile = nullptr;
    Index kv_stride = keys.stride;
    const std::ptrdiff_t skip = static_cast<std::ptrdiff_t>((j0 - keys.first) * keys.stride);
    Eigen::Map<Matrix, 0, Eigen::OuterStride<>> probs(s.probs.data(), bq, bk, Eigen::OuterStride<>(block_k));
    if (fused) {
      // Scores of the visible keys only: the loop below zeroes the rest of the row.
      const Index a = std::clamp<Index>(first_key(0) - j0, 0, bk);
      const Index b = std::clamp<Index>(end_key(0) - j0, a, bk);
      dot_rows16(keys.precision, queries.q + r0 * queries.stride,
                 static_cast<const std::uint16_t*>(keys.k) + skip + a * keys.stride, keys.stride, b - a, head,
                 probs.data() + a);
    } else if (keys.precision == precision_of<Scalar>()) {
      k_tile = static_cast<const Scalar*>(keys.k) + skip;
      v_tile = static_cast<const Scalar*>(keys.v) + skip;
    } else {
      const std::ptrdiff_t bytes = skip * static_cast<std::ptrdiff_t>(precision_bytes(keys.precision));
      convert_rows(keys.precision, static_cast<const unsigned char*>(keys.k) + bytes, keys.stride, bk, head,
                   s.wide_k.data(), head);
      convert_rows(keys.precision, static_cast<const unsigned char*>(keys.v) + bytes, keys.stride, bk, head,
                   s.wide_v.data(), head);
      k_tile = s.wide_k.data();
      v_tile = s.wide_v.data();
      kv_stride = head;
    }
    // The tile is whole when the last query's range starts and the first query's range ends outside it.
    const bool whole = first_key(bq - 1) <= j0 && end_key(0) >= j0 + bk;
    // The tile-relative key range [seen_begin[r], seen_end[r]) each query sees.
    for (Index r = 0; r < bq; ++r) {
      s.seen_begin[r] = whole ? 0 : std::clamp<Index>(first_key(r) - j0, 0, bk);
      s.seen_end[r] = whole ? bk : std::clamp<Index>(end_key(r) - j0, s.seen_begin[r], bk);
    }
    if (keys.kt != nullptr) {
      // probs = 0 + Q·Kᵀ: written, not accumulated, so the tile needs no zeroing first.
      const Scalar* kt = static_cast<const Scalar*>(keys.kt);
      if (whole)
        scores_from_panels(bq, bk, head, queries.q + r0 * queries.stride, queries.stride, kt, keys.kt_panel,
                           j0 - keys.first, s.zeros.data(), probs.data(), block_k);
      else
        cut_tile_scores(bq, head, queries.q + r0 * queries.stride, queries.stride, kt, keys.kt_panel,
                        j0 - keys.first, s.seen_begin, s.seen_end, s.zeros.data(), probs.data(), block_k);
    } else if (dots) {
      const Index a = std::clamp<Index>(first_key(0) - j0, 0, bk);
      const Index b = std::clamp<Index>(end_key(0) - j0, a, bk);
      dot_keys(queries.q + r0 * queries.stride, k_tile + a * head, b - a, head, probs.data() + a);
    } else if (!fused) {
      probs.setZero();
      s.qk.template accumulate<Eigen::RowMajor, Eigen::ColMajor>(
          bq, bk, head, queries.q + r0 * queries.stride, queries.stride, k_tile, kv_stride, probs.data(),
          block_k);
    }

    for (Index r = 0; r < bq; ++r) {
      Eigen::Map<RowVector> row(probs.data() + r * block_k, bk);
      const Index a = s.seen_begin[r], b = s.seen_end[r];
      if (a == b) {  // this query sees none of these keys
        row.setZero();
        continue;
      }
      const Scalar old_max = s.row_max[r];
      const Scalar new_max = std::max(old_max, row.segment(a, b - a).maxCoeff());
      const Scalar tile_sum = exp_sum(row.data() + a, b - a, new_max);
      row.head(a).setZero();
      row.tail(bk - b).setZero();
      if (new_max != old_max) {
        const Scalar rescale = std::exp(old_max - new_max);  // 0 on the first visible block
        s.row_sum[r] *= rescale;
        s.acc.row(r) *= rescale;
        s.row_max[r] = new_max;
      }
      s.row_sum[r] += tile_sum;
    }
    if (fused)
      weighted_rows16(keys.precision, probs.data() + s.seen_begin[0],
                      static_cast<const std::uint16_t*>(keys.v) + skip + s.seen_begin[0] * keys.stride,
                      keys.stride, s.seen_end[0] - s.seen_begin[0], head, s.acc.data());
    else if (whole)
      gemm_nn(bq, head, bk, probs.data(), block_k, v_tile, kv_stride, s.acc.data(), head);
    else
      partial_tile_values(v_tile, kv_stride, head, bq, bk, s.seen_begin, s.seen_end, keys.values_finite, s);
  }

  if (range.partial != nullptr) {  // one row's part: merged with the others' by combine_partials
    range.partial[0] = s.row_max[0];
    range.partial[1] = s.row_sum[0];
    std::copy_n(s.acc.data(), head, range.partial + 2);
    return;
  }
  using OutMatrix = Eigen::Matrix<Out, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<OutMatrix, 0, Eigen::OuterStride<>> result(queries.out + r0 * queries.out_stride, bq, head,
                                                        Eigen::OuterStride<>(queries.out_stride));
  for (Index r = 0; r < bq; ++r) {
    if (s.row_sum[r] == Scalar(0))
      result.row(r).setZero();  // no visible key; a NaN sum (a NaN score) propagates below as it should
    else
      result.row(r) = (s.acc.row(r) / s.row_sum[r]).template cast<Out>();
  }
  // In the backward's units (the scores of the scaled Q'); +inf for a row that sees no key, so that the
  // backward's P = exp(S - lse) would be 0 there (it never reads such a row).
  if (queries.lse != nullptr)
    for (Index r = 0; r < bq; ++r)
      queries.lse[r0 + r] = s.row_sum[r] == Scalar(0) ? std::numeric_limits<Scalar>::infinity()
                                                      : s.row_max[r] + std::log(s.row_sum[r]);
}

/// The output row of one decode query (out[head], and *lse when lse is not null) from the partial results
/// of its `splits` key ranges (attend_query_block's, each [head + 2] at partials + i · stride), merged in
/// range order whatever order they were computed in: with M the largest running max, sum = Σ sum_i ·
/// exp(max_i − M) and out = Σ acc_i · exp(max_i − M) / sum. A range that saw no key (sum 0) adds nothing; a
/// NaN in any range makes the row NaN, as without the split. acc: [head] scratch.
template <typename Scalar, typename Out>
void combine_partials(const Scalar* partials, Eigen::Index stride, Eigen::Index splits, Eigen::Index head,
                      Scalar* acc, Out* out, Scalar* lse) noexcept {
  using Index = Eigen::Index;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  Scalar max = -std::numeric_limits<Scalar>::infinity();
  for (Index i = 0; i < splits; ++i) {
    const Scalar* p = partials + i * stride;
    if (p[1] != Scalar(0) && p[0] > max) max = p[0];
  }
  Eigen::Map<RowVector> total(acc, head);
  total.setZero();
  Scalar sum(0);
  for (Index i = 0; i < splits; ++i) {
    const Scalar* p = partials + i * stride;
    if (p[1] == Scalar(0)) continue;  // no visible key in this range
    const Scalar weight = p[0] == max ? Scalar(1) : std::exp(p[0] - max);
    sum += weight * p[1];
    total += weight * Eigen::Map<const RowVector>(p + 2, head);
  }
  Eigen::Map<Eigen::Matrix<Out, 1, Eigen::Dynamic>> result(out, head);
  if (sum == Scalar(0))
    result.setZero();  // no visible key
  else
    result = (total / sum).template cast<Out>();
  if (lse != nullptr) *lse = sum == Scalar(0) ? std::numeric_limits<Scalar>::infinity() : max + std::log(sum);
}

/// The size of the OpenMP team that the last forward call made on this thread ran on (1 for a serial call).
/// For tests, which check that the thread setting is what actually runs.
inline int& last_team_size() noexcept {
  thread_local int size = 0;
  return size;
}

/// Every buffer a forward call needs, kept between the calls that share it (a Workspace). Every buffer only
/// grows, each to the largest size any call it served needed, and each call cuts what it needs from them: so
/// a call of a shape served before, or of a smaller one, allocates nothing, whatever other shapes came
/// between. Scalar is the compute type.
template <typename Scalar>
struct ForwardBuffers {
  using Index = Eigen::Index;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  /// At least `size` elements of v (reallocated only when it has fewer; old contents are not kept).
  static Scalar* grow(Vector& v, Index size) {
    if (v.size() < size) {
      v.resize(0);  // free first: never hold both
      v.resize(size);
    }
    return v.data();
  }

  /// Makes the per-thread scratch cover a call on `threads` threads of this shape, growing only what is too
  /// small: the scratch of threads [0, threads), cut for `shape` and holding at least `reserve` elements
  /// (room for the decode steps that follow a workspace's prefill), and for a 16-bit layer (wide) each
  /// thread's chunk of x ([chunk_rows, emb]) and of the projected output ([chunk_rows, out_width]). Scratch
  /// of more threads, kept from an earlier call, stays.
  void fit(int threads, const typename FlashScratch<Scalar>::Shape& shape, Index reserve, Index chunk_rows,
           Index emb, Index out_width, bool wide) {
    const std::size_t n = static_cast<std::size_t>(threads);
    // Reserved first, in one step: a vector that grows moves its scratch, which is then fitted again.
    if (scratch.size() < n) {
      scratch.reserve(n);
      scratch.resize(n);
    }
    for (std::size_t t = 0; t < n; ++t)
      scratch[t].fit(shape, reserve);
    if (wide) {
      if (x_wide.size() < n) x_wide.resize(n);
      if (projected_wide.size() < n) projected_wide.resize(n);
      for (std::size_t t = 0; t < n; ++t) {
        grow(x_wide[t], chunk_rows * emb);
        grow(projected_wide[t], chunk_rows * out_width);
      }
    }
  }

  /// Bytes held by the buffers of Scalar (the scratch's GEMM packing buffers included).
  std::size_t bytes() const {
    std::size_t n = static_cast<std::size_t>(qkv.size() + weights_t.size() + output_t.size() + biases.size() +
                                             keys_t.size() + concat.size() + x_rows.size() + partials.size());
    for (const Vector& v : x_wide)
      n += static_cast<std::size_t>(v.size());
    for (const Vector& v : projected_wide)
      n += static_cast<std::size_t>(v.size());
    for (const Linear<Scalar>& l : wide_layers)
      n += static_cast<std::size_t>(l.weight.size() + l.bias.size());
    n *= sizeof(Scalar);
    n += sizeof(std::uint16_t) * x_split.size();
    for (const FlashScratch<Scalar>& f : scratch)
      n += sizeof(Scalar) * static_cast<std::size_t>(f.storage.size());
    return n;
  }

  Vector qkv;        // [heads · rows, 3 · head] Q | K | V of every head
  Vector weights_t;  // [3 · heads] × [emb, head] each head's Wqᵀ, Wkᵀ, Wvᵀ, in column panels
  Vector output_t;   // [heads · head, emb] the multi-head output projection's Woᵀ, in column panels
  Vector biases;     // [heads, 3 · head] each head's bq·scale | bk | bv
  std::vector<char>
      values_finite;  // [heads · chunks] whether a row chunk's V is all finite (without a cache)
  Vector keys_t;      // [heads · batch] · [head, T] each sequence's Kᵀ in key panels (without a cache)
  Vector concat;      // [rows, heads · head] the multi-head layer's concatenated head outputs
  std::vector<FlashScratch<Scalar>> scratch;   // per thread
  std::vector<Vector> x_wide, projected_wide;  // per thread, 16-bit layers: a chunk of x and of the output
  std::vector<Index> x_wide_chunk;             // per thread: which chunk x_wide holds
  std::vector<Linear<Scalar>> wide_layers;     // 16-bit layers: the weights converted for this call
  std::vector<const Linear<Scalar>*> wide_pointers;
  Vector x_rows;                        // [rows, emb] a few-row call's x in the compute type, row-major
  std::vector<std::uint16_t> x_split;   // [rows, 2 · padded emb] that x split for vdpbf16ps (SplitRows)
  std::vector<WeightRows> row_weights;  // [3 · heads + 1] a few-row call's weights as stored (project_rows)
  Vector partials;  // [heads · batch · key splits] a split decode query's partial results, a cache line each
  std::unique_ptr<std::atomic<int>[]> ranges_done;  // [heads · batch] its key ranges done (a split decode)
  Index ranges_done_size = 0;

  /// At least `size` counters in ranges_done (reallocated only when it has fewer).
  std::atomic<int>* grow_counters(Index size) {
    if (ranges_done_size < size) {
      ranges_done.reset();
      ranges_done_size = 0;
      ranges_done.reset(new std::atomic<int>[static_cast<std::size_t>(size)]);
      ranges_done_size = size;
    }
    return ranges_done.get();
  }
};

/// The buffers of this thread's calls of few rows that come without a workspace (decode steps through
/// forward_cached): kept from one step to the next, so that a step allocates its scratch once per thread
/// instead of every time (0.45 of a 5 us one-head step). They only grow, and a step's are small (tens of KB
/// for 8 heads, whatever the cache's length); larger calls use buffers of their own.
template <typename Scalar>
ForwardBuffers<Scalar>& step_buffers() {
  thread_local ForwardBuffers<Scalar> buffers;
  return buffers;
}

/// Columns per panel of a prepared projection weight: the register tile's width (64 floats with AVX-512, 16
/// with AVX2), so that the rows of B a tile reads are contiguous and stream in order. Measured on Zen 4
/// against one [emb, head] block per weight: as fast with AVX-512 (one panel either way at head 64), 1.25x
/// faster projections with AVX2 (100 against 80 GFLOP/s).
/// With the Gemm fallback (Eigen's public product) one panel, the whole weight: a narrow last panel would
/// send Eigen to its matrix-vector kernels, whose rounding depends on x's storage order.
template <typename Scalar>
inline constexpr Eigen::Index weight_panel = gemm_uses_eigen_internals
                                                 ? (simd_width<Scalar>* tile_packets)
                                                 : std::numeric_limits<Eigen::Index>::max();

/// Keys per column panel of a sequence's Kᵀ (KeyValues::kt), for sequences of seq_len: the register tile's
/// width, as for the weights, so that the Kᵀ rows a Q·Kᵀ tile reads are contiguous. Measured on Zen 4 against
/// one [head, T] block with rows a cache line longer than T (Q·Kᵀ at a forward call's shapes, one thread):
/// 110 against 77 GFLOP/s with AVX2, where a tile's 64 rows of one cache line each sit 4 KB apart and
/// contend for few L1 sets; 106 against 105 with AVX-512. With the Gemm fallback one panel, the whole
/// sequence, its rows padded by a cache line (unpadded, T = 1024 or 4096 would put them 4 KB apart).
template <typename Scalar>
Eigen::Index key_panel(Eigen::Index seq_len) noexcept {
  if constexpr (gemm_uses_eigen_internals)
    return weight_panel<Scalar>;
  else
    return seq_len + 64 / static_cast<Eigen::Index>(sizeof(Scalar));
}

/// Rows [t0, t1) of a sequence's K ([T, head], row t at k + t · ld) transposed into its Kᵀ in column panels
/// of `panel` keys (the layout of key_panel: key t in column t % panel of the [head, panel] block at
/// kt + (t - t % panel) · head), panel piece by panel piece.
template <typename Scalar>
void transpose_into_key_panels(const Scalar* k, Eigen::Index ld, Eigen::Index t0, Eigen::Index t1,
                               Eigen::Index head, Scalar* kt, Eigen::Index panel) noexcept {
  for (Eigen::Index t = t0; t < t1;) {  // one panel, or the piece of one these rows fill
    const Eigen::Index offset = t % panel, width = std::min(panel - offset, t1 - t);
    transpose_into(k + t * ld, ld, width, head, kt + (t - offset) * head + offset, panel);
    t += width;
  }
}

/// C[m, n] = bias + A · B for a B [k, n] stored as column panels, one after another: [k, weight_panel] each,
/// the last one narrower when n is not a multiple. A as for gemm_nn. cold_a: A is likely not in cache (the
/// first GEMM to read a row chunk of x, say); the first panel's pass over it then prefetches its rows (see
/// gemm_nn), and the other panels find them in cache.
template <typename Scalar>
void gemm_panels(Eigen::Index m, Eigen::Index n, Eigen::Index k, const Scalar* a, Eigen::Index lda,
                 Eigen::Index a_step, const Scalar* panels, const Scalar* bias, Scalar* c, Eigen::Index ldc,
                 bool cold_a) noexcept {
  constexpr Eigen::Index panel = weight_panel<Scalar>;
  for (Eigen::Index j = 0; j < n; j += panel) {
    const Eigen::Index width = std::min(panel, n - j);
    gemm_nn(m, width, k, a, lda, panels + j * k, width, c + j, ldc, a_step, bias + j, cold_a && j == 0);
  }
}

/// dst = src [rows, cols] (row-major, leading dimension ld) in column panels of weight_panel columns (the
/// last one narrower), each [rows, width] row-major, panel after panel: the layout gemm_b_panels reads.
template <typename Scalar>
void pack_column_panels(const Scalar* src, Eigen::Index ld, Eigen::Index rows, Eigen::Index cols,
                        Scalar* dst) noexcept {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  for (Index j = 0; j < cols; j += weight_panel<Scalar>) {
    const Index width = std::min(weight_panel<Scalar>, cols - j);
    Eigen::Map<Matrix>(dst + j * rows, rows, width) =
        Eigen::Map<const Matrix, 0, Stride>(src + j, rows, width, Stride(ld));
  }
}

/// C[m, n] += A[m, k] · B[k, n] for a B packed by pack_column_panels (B's rows [0, k), of a block of `rows`
/// rows). A as for gemm_nn. Every output is the same chain of fused multiply-adds as gemm_nn over B in place
/// gives (it cuts columns the same way), so the bits are too; but a tile's B rows are contiguous, where in
/// place a [k, 16] slice of rows 768 B apart (Q' or K in the backward's Q | K | V buffer, AVX2) maps onto a
/// quarter of L1's sets.
template <typename Scalar>
void gemm_b_panels(Eigen::Index m, Eigen::Index n, Eigen::Index k, const Scalar* a, Eigen::Index lda,
                   Eigen::Index a_step, const Scalar* panels, Eigen::Index rows, Scalar* c,
                   Eigen::Index ldc) noexcept {
  for (Eigen::Index j = 0; j < n; j += weight_panel<Scalar>) {
    const Eigen::Index width = std::min(weight_panel<Scalar>, n - j);
    gemm_nn(m, width, k, a, lda, panels + j * rows, width, c + j, ldc, a_step);
  }
}

/// The projections' weights prepared for the GEMMs of a forward call: what forward() otherwise builds at the
/// start of every call (transposed, the query's 1/sqrt(head) folded in, converted to the compute type), kept
/// by the packed layers (PackedHeadAttention, PackedMultiHeadAttention) so that their calls skip that step.
/// Scalar is the compute type.
template <typename Scalar>
struct PackedWeights {
  using Index = Eigen::Index;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  Index heads = 0;
  Index emb = 0;
  Index head = 0;
  Index out_width = 0;  // the output projection's out_features (emb), 0 without one
  Vector weights_t;    // [3 · heads] × [emb, head] each head's Wqᵀ·scale, Wkᵀ, Wvᵀ, in column panels
  Vector biases;       // [heads, 3 · head] each head's bq·scale | bk | bv
  Vector output_t;     // [heads · head, out_width] the output projection's Woᵀ in column panels (or empty)
  Vector output_bias;  // [out_width] its bias (or empty)
  /// The layers' weights as they store them, for calls of few rows (project_rows), which must give the
  /// layer's bits: [3 · heads] × [head, emb] each head's Wq, Wk, Wv (unscaled), then [out_width, heads ·
  /// head] Wo. In `rows` for float and double weights, as 16-bit bits in `rows16` for 16-bit ones.
  Precision row_precision = precision_of<Scalar>();
  Vector rows;
  Eigen::Matrix<std::uint16_t, Eigen::Dynamic, 1> rows16;
  Vector row_biases;  // [3 · heads · head + out_width] every bias as stored (unscaled), widened exactly

  /// Weight p's rows (p < 3 · heads: head p / 3's projection p % 3; p = 3 · heads: the output projection).
  WeightRows row_weights(Index p) const {
    const Index offset = p * head * emb, bias_offset = p * head;
    WeightRows w;
    w.weight_precision = row_precision;
    w.weight = row_precision == precision_of<Scalar>() ? static_cast<const void*>(rows.data() + offset)
                                                       : static_cast<const void*>(rows16.data() + offset);
    w.bias = row_biases.data() + bias_offset;
    w.bias_precision = precision_of<Scalar>();
    return w;
  }
};

/// Part `part` of 6 · heads of the projections' preparation, the half [c0, c1) of the columns of weight
/// part / 2 (head p / 3, projection p % 3 with p = part / 2): its transpose into weights_t ([3 · heads] ×
/// [emb, head] in column panels, see gemm_panels), scaled by `scale` for a query, and (in the first half) its
/// bias into biases ([heads, 3 · head]). Halves, so that one head's three weights make six items for two
/// threads. One function for the per-call and the packed preparation, so that both give the same bits.
template <typename Scalar>
void pack_projection_part(const Linear<Scalar>* const* layers, Eigen::Index emb, Eigen::Index head,
                          Scalar scale, Eigen::Index part, Scalar* weights_t, Scalar* biases) noexcept {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  const Index ld = 3 * head;
  const Index p = part / 2, c0 = part % 2 == 0 ? 0 : emb / 2, c1 = part % 2 == 0 ? emb / 2 : emb;
  Scalar* wt = weights_t + p * emb * head;  // this projection's Wᵀ [emb, head] in column panels (gemm_panels)
  for (Index j = 0; j < head; j += weight_panel<Scalar>) {
    const Index width = std::min(weight_panel<Scalar>, head - j);
    Scalar* panel = wt + j * emb + c0 * width;  // rows c0 .. c1 of the panel [emb, width]
    transpose_into(layers[p]->weight.data() + j * emb + c0, emb, width, c1 - c0, panel, width);
    if (p % 3 == 0) Eigen::Map<Matrix>(panel, c1 - c0, width) *= scale;
  }
  if (part % 2 == 0) {
    Eigen::Map<Vector> bias(biases + (p / 3) * ld + (p % 3) * head, head);
    bias = layers[p]->bias;
    if (p % 3 == 0) bias *= scale;
  }
}

/// Part `part` of 4 of the output projection's preparation: a quarter of the rows of its weight transposed
/// into output_t, Woᵀ [in_features, out_features] in column panels of weight_panel (see gemm_panels). In one
/// block its rows sat out_features apart, 2 KB at emb 512, where an AVX2 tile's rows of one cache line each
/// share two L1 sets.
template <typename Scalar>
void pack_output_part(const Linear<Scalar>& output, Eigen::Index part, Scalar* output_t) noexcept {
  using Index = Eigen::Index;
  constexpr Index panel = weight_panel<Scalar>;
  const Index rows = output.weight.rows(), cols = output.weight.cols();
  const Index r0 = part * rows / 4, r1 = (part + 1) * rows / 4;
  for (Index r = r0; r < r1;) {  // the rows of one panel, or the piece of one this part holds
    const Index j = r / panel * panel, width = std::min(panel, rows - j);
    const Index n = std::min(r1, j + width) - r;
    transpose_into(output.weight.data() + r * cols, cols, n, cols, output_t + j * cols + (r - j), width);
    r += n;
  }
}

/// The scale folded into the queries: 1/sqrt(head).
template <typename Scalar>
Scalar query_scale(Eigen::Index head) {
  return Scalar(1) / std::sqrt(static_cast<Scalar>(head));
}

/// The weights of `heads` heads (layers: [3 · heads], as forward takes them) and of the output projection
/// (or null) prepared once, exactly as a forward call prepares them (the same functions, so the same bits).
/// Shapes must have been checked. weights: the precision to keep them in, the layers' own or, for a float
/// layer, float16 or bfloat16 (checked by the caller): every weight and bias is then rounded to it first, and
/// the result is the packing of a layer holding those rounded values.
template <typename Stored>
PackedWeights<compute_t<Stored>> pack_weights(const Linear<Stored>* const* stored_layers, Eigen::Index heads,
                                              const Linear<Stored>* output,
                                              Precision weights = precision_of<Stored>()) {
  using Scalar = compute_t<Stored>;
  using Index = Eigen::Index;
  const Index count = 3 * heads;
  if constexpr (std::is_same<Stored, float>::value) {
    if (weights == Precision::float16 || weights == Precision::bfloat16) {
      // The layers rounded to 16 bits, then packed as a layer of those values (kept as float) would be, with
      // their 16-bit rows for the calls of few rows.
      const auto rounded = [&](const Linear<float>& l) {
        Linear<float> r = l;
        const auto round = [&](auto tag) {
          using Narrow = decltype(tag);
          r.weight = l.weight.template cast<Narrow>().template cast<float>();
          r.bias = l.bias.template cast<Narrow>().template cast<float>();
        };
        if (weights == Precision::float16)
          round(Eigen::half());
        else
          round(Eigen::bfloat16());
        return r;
      };
      std::vector<Linear<float>> copies;
      copies.reserve(static_cast<std::size_t>(count + 1));
      std::vector<const Linear<float>*> pointers;
      for (Index p = 0; p < count; ++p) {
        copies.push_back(rounded(*stored_layers[p]));
        pointers.push_back(&copies.back());
      }
      const Linear<float>* out_copy = nullptr;
      if (output != nullptr) {
        copies.push_back(rounded(*output));
        out_copy = &copies.back();
      }
      PackedWeights<float> packed = pack_weights(pointers.data(), heads, out_copy);
      packed.row_precision = weights;
      packed.rows16.resize(packed.rows.size());
      store_rows(packed.rows.data(), packed.rows.size(), 1, packed.rows.size(), weights, packed.rows16.data(),
                 packed.rows.size());
      packed.rows.resize(0);
      return packed;
    }
  }
  // The layers in the compute type: the layer's own for float and double, converted copies otherwise.
  std::vector<Linear<Scalar>> wide;
  std::vector<const Linear<Scalar>*> layers(static_cast<std::size_t>(count));
  Linear<Scalar> wide_output;
  const Linear<Scalar>* out_layer = nullptr;
  if constexpr (std::is_same<Scalar, Stored>::value) {
    for (Index p = 0; p < count; ++p)
      layers[static_cast<std::size_t>(p)] = stored_layers[p];
    out_layer = output;
  } else {
    wide.reserve(static_cast<std::size_t>(count));
    for (Index p = 0; p < count; ++p) {
      wide.push_back(widen(*stored_layers[p]));
      layers[static_cast<std::size_t>(p)] = &wide.back();
    }
    if (output != nullptr) {
      wide_output = widen(*output);
      out_layer = &wide_output;
    }
  }
  PackedWeights<Scalar> packed;
  packed.heads = heads;
  packed.emb = layers[0]->in_features();
  packed.head = layers[0]->out_features();
  packed.out_width = out_layer != nullptr ? out_layer->out_features() : 0;
  packed.weights_t.resize(heads * packed.emb * 3 * packed.head);
  packed.biases.resize(heads * 3 * packed.head);
  const Scalar scale = query_scale<Scalar>(packed.head);
  for (Index part = 0; part < 6 * heads; ++part)
    pack_projection_part(layers.data(), packed.emb, packed.head, scale, part, packed.weights_t.data(),
                         packed.biases.data());
  if (out_layer != nullptr) {
    packed.output_t.resize(out_layer->weight.size());
    for (Index part = 0; part < 4; ++part)
      pack_output_part(*out_layer, part, packed.output_t.data());
    packed.output_bias = out_layer->bias;
  }
  // And the weights as the layers store them, for calls of few rows.
  const Index weight_size = packed.emb * packed.head, bias_count = 3 * heads * packed.head + packed.out_width;
  const Index row_count = count * weight_size + (output != nullptr ? output->weight.size() : 0);
  packed.row_precision = precision_of<Stored>();
  const auto copy_rows = [&](auto* rows) {
    using Row = std::remove_pointer_t<decltype(rows)>;
    for (Index p = 0; p <= count; ++p) {
      const Linear<Stored>* l = p < count ? stored_layers[p] : output;
      if (l != nullptr)
        std::memcpy(rows + p * weight_size, l->weight.data(),
                    sizeof(Row) * static_cast<std::size_t>(l->weight.size()));
    }
  };
  if constexpr (std::is_same<Scalar, Stored>::value) {
    packed.rows.resize(row_count);
    copy_rows(packed.rows.data());
  } else {
    static_assert(sizeof(Stored) == sizeof(std::uint16_t), "pack_weights: 16-bit weights");
    packed.rows16.resize(row_count);
    copy_rows(packed.rows16.data());
  }
  packed.row_biases.resize(bias_count);
  for (Index p = 0; p <= count; ++p) {
    const Linear<Stored>* l = p < count ? stored_layers[p] : output;
    if (l != nullptr)
      packed.row_biases.segment(p * packed.head, l->bias.size()) = l->bias.template cast<Scalar>();
  }
  return packed;
}

/// What differs between forward calls beyond their input: the mask rule, right padding, a KV cache, and the
/// multi-head layer's output projection. Scalar is the layer's (stored) type.
template <typename Scalar>
struct AttentionPlan {
  MaskRule rule = MaskRule::causal();
  /// [batch] valid keys of each sequence (keys at or after it are masked), or null: all keys are valid.
  const Eigen::Index* lengths = nullptr;
  /// [heads · batch] caches the chunk extends, head h's cache of sequence b at h · batch + b: each new K and
  /// V row is appended to its cache (room made by KVStore::prepare beforehand) and the queries, at positions
  /// cache.length() onwards, attend over the cache. Null: the keys are the input's own rows, at positions 0
  /// onwards.
  KVStore* const* caches = nullptr;
  /// The multi-head layer's nn.Linear(heads · head, emb) over the concatenated head outputs, or null. When
  /// set, the concatenation is kept in an internal buffer of the compute type (`out` is not used) and
  /// `projected` ([rows, emb], leading dimension projected_stride) receives its projection.
  const Linear<Scalar>* output = nullptr;
  Scalar* projected = nullptr;
  Eigen::Index projected_stride = 0;
  /// The weights prepared once by a packed layer (its own output projection included), or null: the call
  /// prepares them from its layers and `output`, which are not read when this is set.
  const PackedWeights<compute_t<Scalar>>* packed = nullptr;
  /// Buffers to reuse (a Workspace's), or null: the call allocates its own.
  ForwardBuffers<compute_t<Scalar>>* buffers = nullptr;
  /// Only make `buffers` fit a call of this shape (a workspace's reservation) and return: x and the outputs
  /// are not read or written, the caches only asked for their sizes. Sized for the most threads the shape
  /// can use, so that any later call of it fits.
  bool size_only = false;
  /// [heads · rows] each query row's logsumexp of its visible scores Q'Kᵀ (Q' = Q / sqrt(head)), head h's row
  /// i at h · rows + i (+inf for a row that sees no key), or null. For the backward, which then skips
  /// recomputing it.
  compute_t<Scalar>* lse = nullptr;
  /// The call's name, for the message of a shape_error when its working memory cannot be addressed.
  const char* where = "head_attention forward call";
};

/// Useful flops of a call: the projections plus, per query, its visible keys (QKᵀ and PV), estimated, for one
/// head.
template <typename Scalar>
double useful_flops(Eigen::Index batch, Eigen::Index rows_per_sequence, Eigen::Index emb, Eigen::Index head,
                    Eigen::Index keys_per_sequence, const MaskRule& rule) {
  const double t = static_cast<double>(rows_per_sequence);
  const double n = static_cast<double>(keys_per_sequence);
  double seen = rule.kind() == MaskRule::Kind::bidirectional ? n : std::max(1.0, n - t / 2);
  if (rule.kind() == MaskRule::Kind::sliding_window)
    seen = std::min(seen, static_cast<double>(rule.window()));
  const double b = static_cast<double>(batch);
  return 2.0 * b * t * static_cast<double>(emb) * 3.0 * static_cast<double>(head) +
         4.0 * b * t * seen * static_cast<double>(head);
}

/// The layers a forward call reads, in the compute type (layers: [3 · heads], output: the output projection
/// or null). Scalar is the compute type.
template <typename Scalar>
struct ComputeLayers {
  const Linear<Scalar>* const* layers = nullptr;
  const Linear<Scalar>* output = nullptr;
};

/// forward()'s first stage, the layers in the compute type: the stored layers themselves for float and
/// double; for a 16-bit layer, copies converted to float in buffers.wide_layers (resized in place, so that a
/// call of a shape seen before allocates nothing). Neither when the weights come packed, nor for a call of
/// few rows (rowdot), which reads the stored weights in place.
template <typename Stored>
ComputeLayers<compute_t<Stored>> compute_layers(const Linear<Stored>* const* stored_layers,
                                                Eigen::Index heads, const AttentionPlan<Stored>& plan,
                                                ForwardBuffers<compute_t<Stored>>& buffers, bool rowdot) {
  using Scalar = compute_t<Stored>;
  using Index = Eigen::Index;
  ComputeLayers<Scalar> result;
  if (plan.packed != nullptr) {
    // Prepared once by the packed layer: nothing to convert, transpose or scale here.
  } else if (rowdot && !std::is_same<Scalar, Stored>::value) {
    // Read as stored by project_rows, 16-bit weights widened in registers: nothing to convert here.
  } else if constexpr (!std::is_same<Scalar, Stored>::value) {
    const Index count = 3 * heads + (plan.output != nullptr ? 1 : 0);
    // Never shrunk: a shorter list (another layer's) would free the converted weights past its end.
    if (buffers.wide_layers.size() < static_cast<std::size_t>(count)) {
      buffers.wide_layers.resize(static_cast<std::size_t>(count));
      buffers.wide_pointers.resize(static_cast<std::size_t>(count));
    }
    for (Index p = 0; p < count; ++p) {
      const Linear<Stored>& from = p < 3 * heads ? *stored_layers[p] : *plan.output;
      Linear<Scalar>& to = buffers.wide_layers[static_cast<std::size_t>(p)];
      to.weight.resize(from.weight.rows(), from.weight.cols());  // no reallocation for the same shape
      to.bias.resize(from.bias.size());
      widen_into(from, to);
      buffers.wide_pointers[static_cast<std::size_t>(p)] = &to;
    }
    result.layers = buffers.wide_pointers.data();
    if (plan.output != nullptr) result.output = buffers.wide_pointers[static_cast<std::size_t>(count - 1)];
  } else {
    result.layers = stored_layers;
    result.output = plan.output;
  }
  return result;
}

/// The sizes and work items of one forward call. Everything but `threads` follows from the shape alone, so
/// that results never depend on the thread count.
struct WorkPlan {
  using Index = Eigen::Index;
  Index batch = 0, seq_len = 0, rows = 0;  // sequences, rows of each, batch · seq_len
  Index heads = 0, emb = 0, head = 0;
  Index ld = 0;         // 3 · head: a qkv row of one head, [q | k | v]
  Index out_width = 0;  // the multi-head layer's output projection's width (emb, > 0), 0 without one
  /// The most keys any sequence has after this call (cached: its cache plus the chunk), and the most any
  /// sequence can have: key blocks are sized by the latter, so that the decode steps of one cache all have
  /// the same shape and a workspace serves them all without reallocating (no-allocation mode).
  Index max_keys = 0, key_limit = 0;
  bool wide_keys = false;        // some cache stores its keys in another precision
  bool converted_tiles = false;  // ... and its tiles are converted into scratch (not read in place)
  Index block_q = 0, block_k = 0, query_blocks = 0;
  Index items = 0;  // attention items: head × sequence × query block × key split
  /// Key ranges per decode query (flash-decoding; 1: no split, always when seq_len > 1), from the number
  /// of keys, heads and sequences only; and the most this call's shape can ever take (at key_limit), which
  /// sizes the partials' buffer so that every step of a cache fits it.
  Index key_splits = 1, max_key_splits = 1;
  Index partial_stride = 0;         // a partial result's elements: head + 2, rounded up to a cache line
  Index chunks = 0, proj_rows = 0;  // row chunks of the projections, all but the last of proj_rows rows
  Index proj_items = 0;             // projection items: row chunk × head × q/k/v
  Index kt_panel = 0, kt_size = 0;  // keys per column panel of a sequence's Kᵀ; one sequence's Kᵀ
  /// A call of few rows extending caches (Tuning::rowdot_rows): its projections read the weights as stored
  /// (project_rows), in blocks of row_block weight rows (a whole head's Q, K or V, or Tuning::rowdot_block
  /// where a team needs more items): row_blocks per head's Q, K or V (its proj_items are projection × block),
  /// out_items of the output projection, out_block of its weight rows each. Otherwise out_items = chunks.
  bool rowdot = false;
  Index row_block = 0, row_blocks = 0, out_items = 0, out_block = 0;
  int threads = 1;  // the team size asked for
  // The team a call of this shape could have had, whatever its flops (at least `threads`): the per-thread
  // scratch kept for the steps after a workspace's call, or in a thread's step buffers, so that a step that
  // first runs on more threads, its cache longer, allocates nothing.
  int room_threads = 1;
};

/// Throws shape_error, before anything is allocated or changed, unless every buffer of a forward call of
/// `heads` heads over `batch` sequences of `seq_len` rows can be addressed: each size below, times the
/// compute type's size in bytes, fits an Index. The rest of the call's size products (work items, projection
/// chunks, scratch, the multi-head concatenation, 16-bit conversion buffers) are at most these or the layer's
/// own sizes (a key block holds at most max_seq_len keys, which the layer's constructor checked with 3 ·
/// head_size), so that none of them overflows either.
template <typename Scalar>
void check_call_sizes(Eigen::Index batch, Eigen::Index seq_len, Eigen::Index heads, Eigen::Index emb,
                      Eigen::Index head, Eigen::Index out_width, bool cached, const char* where) {
  const std::size_t bytes = sizeof(Scalar);
  require_fits({batch, seq_len, std::max(emb, out_width)}, bytes, where,
               "batch · seq_len · max(emb_size, out_features) · element size (the input or output)");
  require_fits({heads, batch, seq_len, 3, head}, bytes, where,
               "heads · batch · seq_len · 3 · head_size · element size (the Q|K|V buffer)");
  // Each sequence's Kᵀ in whole panels (key_panel, at most seq_len + 64 keys: no overflow here).
  const Eigen::Index panel = key_panel<Scalar>(seq_len);
  if (!cached)
    require_fits({heads, batch, (seq_len + panel - 1) / panel * panel, head}, bytes, where,
                 "heads · batch · seq_len in whole Kᵀ panels · head_size · element size (the Kᵀ panels)");
}

/// Rows of x per projection chunk a call of `rows` rows aims at (its chunks hold at most this many). Never
/// decreases as rows grows, so that buffers sized by it for a call serve every shorter one.
inline Eigen::Index projection_chunk_target(Eigen::Index rows) noexcept {
  using Index = Eigen::Index;
  return std::min(
      Tuning::projection_rows,
      std::max<Index>(Tuning::projection_min_rows,
                      ((rows + Tuning::projection_split - 1) / Tuning::projection_split + tile_rows - 1) /
                          tile_rows * tile_rows));
}

/// Keys per block of a decode step (one query row per item) over caches of at most key_limit keys;
/// converted_tiles: some cache's tiles are converted into scratch first.
inline Eigen::Index decode_key_block(bool converted_tiles, Eigen::Index key_limit) noexcept {
  return std::min(converted_tiles ? Tuning::decode_wide_key_block : Tuning::decode_key_block, key_limit);
}

/// Whether a call of `rows` rows in all takes project_rows (WorkPlan::rowdot): a decode step extending
/// caches.
inline bool rowdot_call(Eigen::Index rows, bool cached) noexcept {
  return cached && rows <= Tuning::rowdot_rows;
}

/// Key ranges per query of a decode step (one row per sequence, against a cache) whose queries see up to
/// `keys` keys, over `units` = heads · sequences queries: ranges of about Tuning::decode_split_keys keys,
/// no more of them than make Tuning::decode_split_items items in all. The shape alone decides, never the
/// thread count: results are the same bits on any number of threads.
inline Eigen::Index decode_key_splits(Eigen::Index keys, Eigen::Index units) noexcept {
  const Eigen::Index by_keys = keys / Tuning::decode_split_keys;
  const Eigen::Index by_items = (Tuning::decode_split_items + units - 1) / std::max<Eigen::Index>(1, units);
  return std::max<Eigen::Index>(1, std::min(by_keys, by_items));
}

/// forward()'s planning stage: block sizes, work items and the thread count of a call of this shape (threads:
/// the caller's setting, a cap or 0 for the default). Allocates nothing.
template <typename Scalar, typename Stored>
WorkPlan plan_work(Eigen::Index batch, Eigen::Index seq_len, Eigen::Index heads, Eigen::Index emb,
                   Eigen::Index head, Eigen::Index out_width, const AttentionPlan<Stored>& plan,
                   int threads) {
  using Index = Eigen::Index;
  WorkPlan w;
  w.batch = batch;
  w.seq_len = seq_len;
  w.rows = batch * seq_len;
  w.heads = heads;
  w.emb = emb;
  w.head = head;
  w.ld = 3 * head;
  w.out_width = out_width;
  w.max_keys = seq_len;
  w.key_limit = seq_len;
  if (plan.caches != nullptr)
    for (Index c = 0; c < heads * batch; ++c) {
      w.max_keys = std::max(w.max_keys, plan.caches[c]->length() + seq_len);
      w.key_limit = std::max(w.key_limit, plan.caches[c]->limit());
      const Precision p = plan.caches[c]->precision();
      w.wide_keys = w.wide_keys || p != precision_of<Scalar>();
      w.converted_tiles = w.converted_tiles || (p != precision_of<Scalar>() && !fused_16bit<Scalar>(p, head));
    }

  w.block_q = std::min(Tuning::query_block, seq_len);
  // A single query row (a decode step) has no tile to reuse K and V across rows: longer key blocks only cut
  // the per-block overhead.
  w.block_k = w.block_q == 1 ? decode_key_block(w.converted_tiles, w.key_limit)
                             : std::min(Tuning::key_block, w.key_limit);
  w.query_blocks = (seq_len + w.block_q - 1) / w.block_q;
  if (plan.caches != nullptr) {
    // The most keys a query sees: a sliding window's, or all of them.
    const auto visible = [&](Index keys) {
      return plan.rule.kind() == MaskRule::Kind::sliding_window ? std::min(keys, plan.rule.window()) : keys;
    };
    if (seq_len == 1) w.key_splits = decode_key_splits(visible(w.max_keys), heads * batch);
    // The most ranges a step over these caches can have: a prefill sizes its workspace for the steps after
    // it.
    w.max_key_splits = std::max(w.key_splits, decode_key_splits(visible(w.key_limit), heads * batch));
  }
  w.partial_stride = (head + 2 + 15) / 16 * 16;
  w.items = heads * batch * w.query_blocks * w.key_splits;
  const double flops =
      static_cast<double>(heads) * useful_flops<Scalar>(batch, seq_len, emb, head, w.max_keys, plan.rule);
  // threads: the caller's setting, 0 for the default: Eigen's count, but one thread below
  // default_serial_below_flops (an explicit count is honoured down to serial_below_flops). A workspace is
  // sized for the most threads a call of its shape can use.
  const bool by_default = threads <= 0;
  if (by_default) threads = default_thread_count();
  if (!has_openmp || in_parallel_region()) threads = 1;
  const int asked = threads;
  if (!plan.size_only &&
      (flops < Tuning::serial_below_flops || (by_default && flops < Tuning::default_serial_below_flops)))
    threads = 1;
  // Short inputs are cut into up to projection_split chunks, so that the threads all get projection work; all
  // chunks but the last of proj_rows rows, about equal. The cut depends on the input alone, never on the
  // thread count (and gemm_nn rounds a row the same in any chunk, so results do not even depend on the cut).
  const Index rows = w.rows;
  const Index chunk_target = projection_chunk_target(rows);
  w.chunks = std::max<Index>(1, (rows + chunk_target - 1) / chunk_target);
  w.proj_rows = std::max<Index>(1, (rows + w.chunks - 1) / w.chunks);  // chunks of equal size
  w.proj_items = 3 * heads * w.chunks;
  w.out_items = w.chunks;
  w.rowdot = rowdot_call(rows, plan.caches != nullptr);
  if (w.rowdot) {  // every row in one "chunk"; work items are blocks of weight rows
    w.chunks = 1;
    w.proj_rows = rows;
    w.row_block = Tuning::rowdot_block;
    w.row_blocks = (head + Tuning::rowdot_block - 1) / Tuning::rowdot_block;
    w.proj_items = 3 * heads * w.row_blocks;
    w.out_block = Tuning::rowdot_block;
    w.out_items = (out_width + Tuning::rowdot_block - 1) / Tuning::rowdot_block;
  }
  w.threads = static_cast<int>(std::min<Index>(threads, std::max(w.items, w.proj_items)));
  if (w.rowdot) {
    // Items as large as the team allows: each one sets up its kernels and cache writes again, and each item
    // of the output projection converts its input rows for them again (bfloat16 weights split them into
    // hi + lo), 16 times over for Wo of 512 rows by blocks of 32. A whole head's Q, K or V per item alone, or
    // where that leaves a team 4 items a thread; the output projection in one item alone, two a thread in a
    // team.
    if (w.threads == 1 || 3 * heads >= 4 * w.threads) {
      w.row_block = head;
      w.row_blocks = 1;
      w.proj_items = 3 * heads;
    }
    if (out_width > 0) {
      const Index parts = w.threads == 1 ? 1 : 2 * w.threads;
      const Index block = (out_width + parts - 1) / parts;
      w.out_block = (block + Tuning::rowdot_block - 1) / Tuning::rowdot_block * Tuning::rowdot_block;
      w.out_items = (out_width + w.out_block - 1) / w.out_block;
    }
  }
  w.room_threads =
      std::max(w.threads, static_cast<int>(std::min<Index>(asked, std::max(w.items, w.proj_items))));
  w.kt_panel = key_panel<Scalar>(seq_len);
  w.kt_size = head * ((seq_len + w.kt_panel - 1) / w.kt_panel * w.kt_panel);
  return w;
}

/// Where a forward call's stages read and write: every buffer, cut from the caller's ForwardBuffers (or the
/// call's own) before the parallel region. Scalar is the compute type.
template <typename Scalar>
struct ForwardStorage {
  ForwardBuffers<Scalar>* buffers = nullptr;  // the per-thread ones: scratch, x_wide, projected_wide
  Scalar* qkv = nullptr;            // [heads · rows, 3·head] Q | K | V, head h's rows at h · rows
  Scalar* own_weights_t = nullptr;  // the call's own preparation of the weights (null when they come packed)
  Scalar* own_biases = nullptr;
  Scalar* own_output_t = nullptr;
  const Scalar* weights_t = nullptr;  // [3 · heads] × [emb, head] Wqᵀ·scale, Wkᵀ, Wvᵀ in column panels
  const Scalar* biases = nullptr;     // [heads, 3·head] bq·scale | bk | bv
  const Scalar* output_t = nullptr;     // [heads · head, out_width] Woᵀ in column panels (or none)
  const Scalar* output_bias = nullptr;  // [out_width] bo (or null)
  char* values_finite = nullptr;        // [heads · chunks] whether a row chunk's V is all finite (no cache)
  Scalar* keys_t = nullptr;             // [heads · batch] · kt_size each sequence's Kᵀ (no cache)
  Scalar* concat = nullptr;             // [rows, heads · head] the multi-head layer's head outputs
  // A call of few rows (WorkPlan::rowdot):
  Scalar* x_buffer = nullptr;      // [rows, emb] room for x in the compute type, row-major
  const Scalar* x_rows = nullptr;  // [rows, emb] x row-major in the compute type: x itself or x_buffer
  Eigen::Index x_rows_stride = 0;
  WeightRows* rows = nullptr;  // [3 · heads + 1] the weights as stored: head h's Q, K, V at 3h.., then Wo
  std::uint16_t* x_split = nullptr;       // room for x_rows split (SplitRows), where it may be
  SplitRows x_split_rows;                 // x_rows split, bits null when not (project_rows splits then)
  bool x_lo_pass[Tuning::rowdot_rows]{};  // x_split_rows.lo_pass
  Scalar* partials =
      nullptr;  // [heads · batch · key_splits] · partial_stride a split decode's partial results
  std::atomic<int>* ranges_done = nullptr;  // [heads · batch] key ranges done, per query (a split decode)
};

/// forward()'s allocation stage: every buffer the call needs, grown in `buffers` (nothing is allocated
/// inside the parallel region, where an exception terminates), and the per-thread scratch fitted to
/// work.threads. Every buffer is sized by a function of the shape that never decreases as batch or seq_len
/// grows, so that buffers grown for a call serve every smaller one. for_steps (a workspace's cached call):
/// the scratch also keeps room for the one-row decode steps over the same caches, so that a workspace that
/// served (or was reserved for) a prefill serves the steps after it.
template <typename Scalar>
ForwardStorage<Scalar> allocate_storage(const WorkPlan& work, const PackedWeights<Scalar>* packed,
                                        const Linear<Scalar>* output, bool cached, bool wide, bool for_steps,
                                        ForwardBuffers<Scalar>& buffers) {
  using Index = Eigen::Index;
  using Buffers = ForwardBuffers<Scalar>;
  using Shape = typename FlashScratch<Scalar>::Shape;
  const Index heads = work.heads, rows = work.rows, head = work.head, emb = work.emb, ld = work.ld;
  ForwardStorage<Scalar> s;
  s.buffers = &buffers;
  // Q, K and V side by side, each row [q | k | v], head after head (head h's rows at h · rows): one buffer,
  // one pass of GEMMs over the same rows of x, which stay in cache while every head's projections read them.
  // Head-major, so that a head's K and V rows are 3·head apart: interleaving the heads in each row (rows of
  // 3·head·heads) was measured 15% slower for 8 heads, the tiles' rows being that much further apart.
  s.qkv = Buffers::grow(buffers.qkv, heads * rows * ld);
  // Each weight transposed ([emb, head] each, in column panels of the tile's width: head 0's Wqᵀ, Wkᵀ, Wvᵀ,
  // then head 1's, ...), the B operand of the projections' GEMMs, so that a tile's B rows stream from memory
  // in order (measured 4-6% faster at B = 8, T = 1024 than [emb, 3·head] with Wqᵀ | Wkᵀ | Wvᵀ side by side in
  // each row: Zen 4, AVX-512, emb 512, head 64; see weight_panel for AVX2), and each sequence's Kᵀ ([head,
  // T] in column panels, see key_panel), Q·Kᵀ's: transposed once per call, read by every row chunk or query
  // block without packing. The query's 1/sqrt(head) is folded into Wq and bq there (exact for the usual
  // powers of two, 64 and 256 say: the scale is then a power of two too). A packed layer's are read where
  // they are, and this call's buffers for them stay untouched (unallocated without a workspace).
  // A call of few rows reads the weights as stored instead (project_rows).
  const bool prepare = packed == nullptr && !work.rowdot;
  s.own_weights_t = prepare ? Buffers::grow(buffers.weights_t, heads * emb * ld) : nullptr;
  s.own_biases = prepare ? Buffers::grow(buffers.biases, heads * ld) : nullptr;
  s.weights_t = packed != nullptr ? packed->weights_t.data() : s.own_weights_t;
  s.biases = packed != nullptr ? packed->biases.data() : s.own_biases;
  // (Capacity for the most chunks any call of at most these rows has: chunks <= projection_split for up to
  // projection_split · projection_rows rows, then rows / projection_rows + 1.)
  const std::size_t chunk_flags = static_cast<std::size_t>(cached ? 0 : heads * work.chunks);
  if (!cached)
    buffers.values_finite.reserve(
        static_cast<std::size_t>(heads * (Tuning::projection_split + rows / Tuning::projection_rows + 1)));
  buffers.values_finite.resize(chunk_flags);
  s.values_finite = buffers.values_finite.data();
  s.own_output_t = Buffers::grow(buffers.output_t, prepare && output != nullptr ? output->weight.size() : 0);
  s.output_t = packed != nullptr ? packed->output_t.data() : s.own_output_t;
  s.output_bias =
      packed != nullptr ? packed->output_bias.data() : (output != nullptr ? output->bias.data() : nullptr);
  s.keys_t = Buffers::grow(buffers.keys_t, cached ? 0 : heads * work.batch * work.kt_size);
  s.concat = Buffers::grow(buffers.concat, (work.out_width > 0 ? rows : 0) * heads * head);
  const bool split = work.max_key_splits > 1;
  s.partials = Buffers::grow(buffers.partials,
                             split ? heads * work.batch * work.max_key_splits * work.partial_stride : 0);
  s.ranges_done = buffers.grow_counters(split ? heads * work.batch : 0);
  // A call of few rows reads x (converted to the compute type when it must be) and the weights as stored
  // (project_rows); a workspace's cached call also keeps that room for the one-row steps that follow it
  // and the shorter chunks it covers, so that a workspace that served (or was reserved for) a prefill serves
  // them without allocating.
  if (work.rowdot || (for_steps && cached)) {
    s.x_buffer = Buffers::grow(buffers.x_rows, std::min(rows, Tuning::rowdot_rows) * emb);
#if HEAD_ATTENTION_DOT_BF16
    // x split once for every block of bfloat16 weight rows (prepare_rows), not once per block.
    if (std::is_same<Scalar, float>::value && emb <= bf16_split_entries) {
      const std::size_t split_size =
          static_cast<std::size_t>(std::min(rows, Tuning::rowdot_rows) * 2 * bf16_split_stride(emb));
      if (buffers.x_split.size() < split_size) buffers.x_split.resize(split_size);
      s.x_split = buffers.x_split.data();
    }
#endif
    if (buffers.row_weights.size() < static_cast<std::size_t>(3 * heads + 1))
      buffers.row_weights.resize(static_cast<std::size_t>(3 * heads + 1));
    s.rows = buffers.row_weights.data();
  }
  // Per thread: attention scratch, and for a 16-bit layer's GEMMs a row chunk of x and of the projected
  // output in the compute type (sized by the chunk target, which bounds the chunks of every call up to these
  // rows).
  const bool wide_chunks = wide && !work.rowdot;
  const Shape shape{work.block_q, work.block_k, head, work.wide_keys, cached};
  const Index step_room =
      for_steps && cached
          ? FlashScratch<Scalar>::size(
                Shape{1, decode_key_block(work.converted_tiles, work.key_limit), head, work.wide_keys, true})
          : 0;
  buffers.fit(for_steps ? work.room_threads : work.threads, shape, step_room,
              std::min(projection_chunk_target(rows), rows), emb, work.out_width, wide_chunks);
  buffers.x_wide_chunk.assign(static_cast<std::size_t>(wide_chunks ? work.threads : 0), -1);
  return s;
}

/// The stages of forward() that run inside its parallel region, one work item each: a call's input, output,
/// plan and storage, and a function per stage. Stored is the layer's type, x's storage order XOrder.
template <int XOrder, typename Stored>
struct ForwardPass {
  using Scalar = compute_t<Stored>;
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static constexpr bool wide = !std::is_same<Scalar, Stored>::value;  // a 16-bit layer computing in float

  const Stored* x;  // [rows, emb], storage order XOrder, leading dimension x_stride
  Index x_stride;
  Stored* out;  // [rows, heads · head] row-major, leading dimension out_stride (unused with plan.output)
  Index out_stride;
  const AttentionPlan<Stored>& plan;
  const WorkPlan& work;
  const ForwardStorage<Scalar>& storage;

  /// Phase 1, the projections, one item of work.proj_items (row chunk × head × q/k/v): bias + x · Wᵀ into
  /// qkv. Right after a row chunk's K or V is projected, while it is still in cache (each step measured 2% of
  /// a call at B = 8, T = 1024 with AVX2 when done in a pass of its own, reading them back from L3): its K
  /// rows are transposed into their sequences' Kᵀ panels, and whether its V is all finite is noted for the
  /// chunk.
  void project(Index item, std::size_t thread) const {
    if (work.rowdot) {
      project_weight_rows(item);
      return;
    }
    const Index rows = work.rows, emb = work.emb, head = work.head, ld = work.ld, proj_rows = work.proj_rows;
    const Index r0 = (item / (3 * work.heads)) * proj_rows;
    const Index p = item % (3 * work.heads);  // head p / 3, projection p % 3
    const Index n = std::min(proj_rows, rows - r0);
    const Stored* x_rows = XOrder == Eigen::RowMajor ? x + r0 * x_stride : x + r0;
    Scalar* qkv_rows = storage.qkv + ((p / 3) * rows + r0) * ld + (p % 3) * head;
    const Scalar* wt = storage.weights_t + p * emb * head;  // [emb, head] in column panels
    const Scalar* bias = storage.biases + (p / 3) * ld + (p % 3) * head;
    // The chunk's first items read x from memory (the others find it in cache); with several threads, the
    // first few run at once.
    const bool cold_x = p < work.threads;
    if constexpr (wide) {
      Eigen::Map<Matrix> xw(storage.buffers->x_wide[thread].data(), std::min(proj_rows, rows), emb);
      Index& x_wide_chunk = storage.buffers->x_wide_chunk[thread];
      if (x_wide_chunk != r0) {  // items of one chunk often follow each other on a thread
        if constexpr (XOrder == Eigen::RowMajor) {
          convert_rows(precision_of<Stored>(), x_rows, x_stride, n, emb, xw.data(), emb);
        } else {
          using XMatrix = Eigen::Matrix<Stored, Eigen::Dynamic, Eigen::Dynamic, XOrder>;
          const Eigen::Map<const XMatrix, 0, Eigen::OuterStride<>> xs(x_rows, n, emb,
                                                                      Eigen::OuterStride<>(x_stride));
          xw.topRows(n) = xs.template cast<Scalar>();
        }
        x_wide_chunk = r0;
      }
      gemm_panels(n, head, emb, xw.data(), emb, 1, wt, bias, qkv_rows, ld, false);  // (just converted)
    } else if constexpr (XOrder == Eigen::RowMajor) {
      gemm_panels(n, head, emb, x_rows, x_stride, 1, wt, bias, qkv_rows, ld, cold_x);
    } else {  // column-major x: its columns x_stride apart
      gemm_panels(n, head, emb, x_rows, 1, x_stride, wt, bias, qkv_rows, ld, cold_x);
    }
    if (plan.caches == nullptr && p % 3 == 1) transpose_keys(p / 3, r0, n);
    if (plan.caches == nullptr && p % 3 == 2)
      storage.values_finite[(p / 3) * work.chunks + r0 / proj_rows] = all_finite(qkv_rows, ld, n, head);
  }

  /// Phase 1 of a call of few rows (WorkPlan::rowdot), one item of work.proj_items (projection × block of
  /// Tuning::rowdot_block weight rows): those outputs of every row, through the weights as stored. The
  /// query's 1/sqrt(head) scales its results (the GEMM path folds it into Wq and bq instead).
  void project_weight_rows(Index item) const {
    const Index head = work.head, ld = work.ld;
    const Index p = item / work.row_blocks;  // head p / 3, projection p % 3
    const Index o0 = (item % work.row_blocks) * work.row_block;
    const Index o1 = std::min(head, o0 + work.row_block);
    const Scalar scale = p % 3 == 0 ? query_scale<Scalar>(head) : Scalar(1);
    Scalar* const y = storage.qkv + (p / 3) * work.rows * ld + (p % 3) * head + o0;
    project_rows(storage.x_rows, storage.x_rows_stride, work.rows, storage.rows[p], work.emb, o0, o1, scale,
                 y, ld, &storage.x_split_rows);
    // Its K or V columns go to the caches here (phase 2 reads them; no append phase, no barrier for it).
    if (plan.caches != nullptr && p % 3 != 0)
      for (Index b = 0; b < work.batch; ++b)
        plan.caches[(p / 3) * work.batch + b]->write_columns(y + b * work.seq_len * ld, ld, work.seq_len,
                                                             p % 3 == 2, o0, o1 - o0);
  }

  /// Rows [r0, r0 + n) of head h's K transposed into their sequences' Kᵀ panels.
  void transpose_keys(Index h, Index r0, Index n) const {
    const Index seq_len = work.seq_len, head = work.head, ld = work.ld;
    for (Index row = r0; row < r0 + n;) {
      const Index b = row / seq_len, t0 = row % seq_len;
      const Index t1 = std::min(seq_len, t0 + (r0 + n - row));
      transpose_into_key_panels(storage.qkv + (h * work.rows + b * seq_len) * ld + head, ld, t0, t1, head,
                                storage.keys_t + (h * work.batch + b) * work.kt_size, work.kt_panel);
      row += t1 - t0;
    }
  }

  /// Between phases 1 and 2 of a cached call, item c of heads · batch: the new K and V rows of head c / batch
  /// and sequence c % batch appended to its cache.
  void append_to_cache(Index c) const {
    const Index h = c / work.batch, b = c % work.batch;
    plan.caches[c]->write(storage.qkv + (h * work.rows + b * work.seq_len) * work.ld + work.head, work.ld,
                          work.seq_len);
  }

  /// Whether sequence b of head h has only finite values: the chunks that hold its rows all do.
  bool sequence_finite(Index h, Index b) const {
    const Index seq_len = work.seq_len, proj_rows = work.proj_rows;
    for (Index chunk = b * seq_len / proj_rows; chunk <= ((b + 1) * seq_len - 1) / proj_rows; ++chunk)
      if (storage.values_finite[h * work.chunks + chunk] == 0) return false;
    return true;
  }

  /// Phase 2, the attention, one item of work.items: a query block of one (head, sequence), the costliest
  /// blocks of each (head, sequence) first (the last ones see the most keys). Consecutive items read the same
  /// K and V rows (2 MB at T = 4096), which stay in cache; interleaving all heads and sequences at each query
  /// block made every item's K and V cold (the working set is all of Q|K|V, 25 to 50 MB for 8 heads) and was
  /// measured 15-20% slower on one thread.
  ///
  /// A decode step's query cut into work.key_splits key ranges (flash-decoding) is work.key_splits items, one
  /// per range, each writing a partial result; whichever finishes a query's last range merges them
  /// (combine_partials, in range order: the same bits whichever thread ran which range), so no phase waits.
  void attend(Index item, std::size_t thread) const {
    const Index seq_len = work.seq_len, head = work.head, ld = work.ld;
    const Index split = item % work.key_splits;
    item /= work.key_splits;
    const Index qb = work.query_blocks - 1 - item % work.query_blocks;
    const Index c = item / work.query_blocks;  // head h = c / batch, sequence b = c % batch
    const Index h = c / work.batch, b = c % work.batch;
    const Index r0 = qb * work.block_q;
    const Index bq = std::min(work.block_q, seq_len - r0);
    const Scalar* seq_qkv = storage.qkv + (h * work.rows + b * seq_len) * ld;
    KeyValues keys{seq_qkv + head, seq_qkv + 2 * head, precision_of<Scalar>(), ld, 0, seq_len, seq_len};
    Index position = 0;
    if (plan.caches != nullptr) {
      position = plan.caches[c]->length();
      keys = plan.caches[c]->keys(seq_len);
    } else {
      keys.kt = storage.keys_t + c * work.kt_size;
      keys.kt_panel = work.kt_panel;
      keys.values_finite = sequence_finite(h, b);
    }
    if (plan.lengths != nullptr) keys.valid = std::min(keys.valid, plan.lengths[b]);
    const Index first_row = b * seq_len;
    Scalar* const lse = plan.lse != nullptr ? plan.lse + h * work.rows + first_row : nullptr;
    FlashScratch<Scalar>& scratch = storage.buffers->scratch[thread];
    KeyRange<Scalar> range;
    if (work.key_splits > 1) {  // (one query: r0 = 0, bq = 1) range `split` of its visible keys
      const Index lo = std::max(plan.rule.first_key(position), keys.first);
      const Index hi = std::max(lo, std::min(plan.rule.end_key(position, keys.count), keys.valid));
      const Index step = ((hi - lo + work.key_splits - 1) / work.key_splits + 15) / 16 * 16;
      range.begin = std::min(hi, lo + split * step);
      range.end = std::min(hi, range.begin + step);
      range.partial = storage.partials + (c * work.key_splits + split) * work.partial_stride;
    }
    // (Each only where it exists: a single head has no concatenation, the multi-head layer writes no `out`.)
    const Index concat_cols = work.heads * head;
    Scalar* const concat_row =
        work.out_width > 0 ? storage.concat + first_row * concat_cols + h * head : nullptr;
    Stored* const out_row = work.out_width > 0 ? nullptr : out + first_row * out_stride + h * head;
    if (work.out_width > 0)
      attend_query_block(Queries<Scalar>{seq_qkv, ld, position, concat_row, concat_cols, lse}, keys,
                         plan.rule, r0, bq, scratch, range);
    else
      attend_query_block(Queries<Scalar, Stored>{seq_qkv, ld, position, out_row, out_stride, lse}, keys,
                         plan.rule, r0, bq, scratch, range);
    if (work.key_splits == 1) return;
    // The last range of this query to finish merges them all (acq_rel: the others' partials are visible).
    if (storage.ranges_done[c].fetch_add(1, std::memory_order_acq_rel) != work.key_splits - 1) return;
    const Scalar* partials = storage.partials + c * work.key_splits * work.partial_stride;
    if (work.out_width > 0)
      combine_partials(partials, work.partial_stride, work.key_splits, head, scratch.acc.data(), concat_row,
                       lse);
    else
      combine_partials(partials, work.partial_stride, work.key_splits, head, scratch.acc.data(), out_row,
                       lse);
  }

  /// Phase 3, the output projection (multi-head only), one row chunk of work.chunks: that chunk of the
  /// concatenation [rows, heads·head] · Woᵀ + bo into plan.projected, one GEMM.
  void project_output(Index chunk, std::size_t thread) const {
    const Index out_width = work.out_width, concat_cols = work.heads * work.head;
    if (work.rowdot) {  // a call of few rows: item `chunk` is a block of Wo's rows, read as stored
      const Index o0 = chunk * work.out_block, o1 = std::min(out_width, o0 + work.out_block);
      project_rows(static_cast<const Scalar*>(storage.concat), concat_cols, work.rows,
                   storage.rows[3 * work.heads], concat_cols, o0, o1, Scalar(1), plan.projected + o0,
                   plan.projected_stride);
      return;
    }
    const Index r0 = chunk * work.proj_rows;
    const Index n = std::min(work.proj_rows, work.rows - r0);
    using StoredMatrix = Eigen::Matrix<Stored, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    Eigen::Map<StoredMatrix, 0, Eigen::OuterStride<>> dst(plan.projected + r0 * plan.projected_stride, n,
                                                          out_width,
                                                          Eigen::OuterStride<>(plan.projected_stride));
    Scalar* result = nullptr;
    Index result_stride = 0;
    if constexpr (wide) {
      result = storage.buffers->projected_wide[thread].data();
      result_stride = out_width;
    } else {
      result = dst.data();
      result_stride = plan.projected_stride;
    }
    gemm_panels(n, out_width, concat_cols, storage.concat + r0 * concat_cols, concat_cols, 1,
                storage.output_t, storage.output_bias, result, result_stride, true);
    if constexpr (wide)
      dst = Eigen::Map<Matrix>(storage.buffers->projected_wide[thread].data(), n, out_width)
                .template cast<Stored>();
  }
};

/// forward()'s setup of a call of few rows (WorkPlan::rowdot), before the parallel region: x in the compute
/// type and row-major (read in place when it is already), and where each weight is stored (the layers', or a
/// packed form's copy of them).
template <int XOrder, typename Stored>
void prepare_rows(const Stored* x, Eigen::Index x_stride, const WorkPlan& work,
                  const Linear<Stored>* const* stored_layers, const AttentionPlan<Stored>& plan,
                  ForwardStorage<compute_t<Stored>>& storage) noexcept {
  using Scalar = compute_t<Stored>;
  using Index = Eigen::Index;
  const Index rows = work.rows, emb = work.emb;
  if constexpr (std::is_same<Scalar, Stored>::value && XOrder == Eigen::RowMajor) {
    storage.x_rows = x;
    storage.x_rows_stride = x_stride;
  } else {
    if constexpr (XOrder == Eigen::RowMajor) {
      convert_rows(precision_of<Stored>(), x, x_stride, rows, emb, storage.x_buffer, emb);
    } else {
      using XMatrix = Eigen::Matrix<Stored, Eigen::Dynamic, Eigen::Dynamic, XOrder>;
      const Eigen::Map<const XMatrix, 0, Eigen::OuterStride<>> xs(x, rows, emb,
                                                                  Eigen::OuterStride<>(x_stride));
      Eigen::Map<RowMajorMatrix<Scalar>>(storage.x_buffer, rows, emb) = xs.template cast<Scalar>();
    }
    storage.x_rows = storage.x_buffer;
    storage.x_rows_stride = emb;
  }
  const Index count = 3 * work.heads + (work.out_width > 0 ? 1 : 0);
  for (Index p = 0; p < count; ++p) {
    WeightRows& w = storage.rows[p];
    if (plan.packed != nullptr) {
      w = plan.packed->row_weights(p);
    } else {
      const Linear<Stored>& l = p < 3 * work.heads ? *stored_layers[p] : *plan.output;
      w.weight = l.weight.data();
      w.bias = l.bias.data();
      w.weight_precision = w.bias_precision = precision_of<Stored>();
    }
  }
#if HEAD_ATTENTION_DOT_BF16
  storage.x_split_rows = SplitRows{};
  if constexpr (std::is_same<Scalar, float>::value) {
    // bfloat16 projections (a layer's or a packed form's): x split here once (split_bf16) for all of them.
    if (storage.x_split != nullptr && rows <= Tuning::rowdot_rows &&
        storage.rows[0].weight_precision == Precision::bfloat16) {
      const Index stride = bf16_split_stride(emb);
      for (Index r = 0; r < rows; ++r)
        storage.x_lo_pass[r] =
            split_bf16(storage.x_rows + r * storage.x_rows_stride, emb, storage.x_split + 2 * r * stride,
                       storage.x_split + (2 * r + 1) * stride);
      storage.x_split_rows = SplitRows{storage.x_split, 2 * stride, stride, storage.x_lo_pass};
    }
  }
#endif
}

/// The whole forward pass of `heads` attention heads over `batch` sequences of `seq_len` rows stored back to
/// back in x ([batch·seq_len, emb], storage order XOrder, leading dimension x_stride): every head's
/// projections, then every head's attention under `plan`, then (if plan.output) the output projection, all in
/// one parallel region. layers: [3 · heads] nn.Linear(emb, head), head h's Q, K, V at 3h, 3h + 1, 3h + 2.
/// Writes head h's output to columns [h · head, (h + 1) · head) of out ([batch·seq_len, heads·head]
/// row-major, leading dimension out_stride). x is read completely before out is written. Shapes are checked
/// by the caller, and caches prepared. threads: the caller's setting, the most threads to use, or 0 for the
/// default (see plan_work: small calls then run on one thread). With plan.packed, the weights
/// are read from there and stored_layers (which may then be null) and plan.output are not read.
///
/// Stored is the layer's type; everything is computed in compute_t<Stored>. For the 16-bit types the
/// weights are converted once per call, each row chunk of x when it is projected, and outputs when written:
/// no GEMM ever runs on emulated 16-bit arithmetic.
///
/// The stages, in order (docs/design.md): compute_layers, plan_work and allocate_storage before the parallel
/// region; inside it prepare the weights (pack_output_part, pack_projection_part), project, append_to_cache,
/// attend and project_output, each a worksharing loop over its work items.
template <int XOrder, typename Stored>
void forward(const Stored* x, Eigen::Index x_stride, Eigen::Index batch, Eigen::Index seq_len,
             const Linear<Stored>* const* stored_layers, Eigen::Index heads, Stored* out,
             Eigen::Index out_stride, int threads, const AttentionPlan<Stored>& plan = {}) {
  using Scalar = compute_t<Stored>;
  using Index = Eigen::Index;
  constexpr bool wide = !std::is_same<Scalar, Stored>::value;
  last_team_size() = 1;
  if (batch == 0 || seq_len == 0 || heads == 0) return;

  // Every size checked before anything is allocated or changed (a workspace's buffers included).
  const PackedWeights<Scalar>* const packed = plan.packed;
  const Index emb = packed != nullptr ? packed->emb : stored_layers[0]->in_features();
  const Index head = packed != nullptr ? packed->head : stored_layers[0]->out_features();
  const Index out_width =
      packed != nullptr ? packed->out_width : (plan.output != nullptr ? plan.output->out_features() : 0);
  check_call_sizes<Scalar>(batch, seq_len, heads, emb, head, out_width, plan.caches != nullptr, plan.where);
  // Everything is allocated before the parallel region (an exception thrown inside one terminates), in the
  // caller's buffers when it passed some, else in this thread's for decode steps, else in this call's own.
  const bool rowdot = rowdot_call(batch * seq_len, plan.caches != nullptr);
  ForwardBuffers<Scalar> own;
  ForwardBuffers<Scalar>& buffers = plan.buffers != nullptr ? *plan.buffers
                                    : rowdot                ? step_buffers<Scalar>()
                                                            : own;
  const ComputeLayers<Scalar> layers = compute_layers(stored_layers, heads, plan, buffers, rowdot);
  const WorkPlan work = plan_work<Scalar>(batch, seq_len, heads, emb, head, out_width, plan, threads);
  ForwardStorage<Scalar> storage =
      allocate_storage(work, packed, layers.output, plan.caches != nullptr, wide, &buffers != &own, buffers);
  if (plan.size_only) return;
  if (work.rowdot) prepare_rows<XOrder>(x, x_stride, work, stored_layers, plan, storage);
  const Scalar scale = query_scale<Scalar>(head);
  const ForwardPass<XOrder, Stored> pass{x, x_stride, out, out_stride, plan, work, storage};
  if (work.key_splits > 1)
    for (Index c = 0; c < heads * batch; ++c)
      storage.ranges_done[c].store(0, std::memory_order_relaxed);  // (the fork publishes it)

  run_team(work.threads, [&](bool team) {
    // (Alone, this thread is the call's thread 0, even inside a caller's own parallel region.)
    const std::size_t thread = team ? static_cast<std::size_t>(thread_index()) : 0;
    if (thread == 0)
      last_team_size() = team ? team_size() : 1;  // the caller's own thread is the team's first
    // Prepare the weights, here on every call unless they come packed or the call has few rows (those read
    // them as stored): a copy kept by the layer between calls could not be kept in sync with weights that
    // callers change through query()/key()/value() references (a packed layer is the explicit, immutable
    // copy).
    if (packed == nullptr && !work.rowdot) {
      // (nowait: the output projection's weights are read only after the next loop's barrier.)
      if (layers.output != nullptr)
        team_for<Share::fixed_nowait>(
            4, team, [&](Index part) { pack_output_part(*layers.output, part, storage.own_output_t); });
      team_for<Share::fixed>(6 * heads, team, [&](Index part) {
        pack_projection_part(layers.layers, emb, head, scale, part, storage.own_weights_t,
                             storage.own_biases);
      });
    }
    team_for<Share::dynamic>(work.proj_items, team, [&](Index item) { pass.project(item, thread); });
    // (The barrier above: every projection is done before anything reads it. A call of few rows appended
    // its K and V to the caches in its projection items.)
    if (plan.caches != nullptr && !work.rowdot)
      team_for<Share::fixed>(heads * batch, team, [&](Index c) { pass.append_to_cache(c); });
    // Handed out one at a time, in the order ForwardPass::attend describes. The last loop waits for nothing:
    // the team's join follows it.
    const auto attend = [&](Index item) { pass.attend(item, thread); };
    if (out_width > 0) {
      team_for<Share::dynamic>(work.items, team, attend);
      team_for<Share::dynamic_nowait>(work.out_items, team,
                                      [&](Index chunk) { pass.project_output(chunk, thread); });
    } else {
      team_for<Share::dynamic_nowait>(work.items, team, attend);
    }
  });
}

/// forward() over x [batch · seq_len, emb], any dense Eigen expression of Stored: plain storage with
/// contiguous rows or columns is read in place, anything else (an expression, a strided view) evaluated once
/// into a row-major copy.
template <typename Derived, typename Stored>
void forward_expression(const Eigen::MatrixBase<Derived>& x, Eigen::Index batch, Eigen::Index seq_len,
                        const Linear<Stored>* const* layers, Eigen::Index heads, Stored* out,
                        Eigen::Index out_stride, int threads, const AttentionPlan<Stored>& plan) {
  constexpr bool in_place =
      (Derived::Flags & Eigen::DirectAccessBit) != 0 && Derived::InnerStrideAtCompileTime == 1;
  if constexpr (in_place) {
    constexpr int order = Derived::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;
    const Derived& xd = x.derived();
    forward<order>(xd.data(), xd.outerStride(), batch, seq_len, layers, heads, out, out_stride, threads,
                   plan);
  } else {
    using Matrix = Eigen::Matrix<Stored, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const Matrix copy = x;  // [batch · seq_len, emb]: evaluated once
    forward<Eigen::RowMajor>(copy.data(), copy.cols(), batch, seq_len, layers, heads, out, out_stride,
                             threads, plan);
  }
}

}  // namespace head_attention::detail

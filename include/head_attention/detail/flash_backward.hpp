// head-attention: the fused backward pass. FlashAttention-2 style: the softmax is recomputed tile by tile
// from a per-row logsumexp instead of keeping [T, T]; extra memory is O(T · head_size). Every gradient
// element is written by exactly one work item in a fixed order, so results do not depend on the thread count
// at all.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../gradients.hpp"
#include "../linear.hpp"
#include "../mask.hpp"
#include "flash.hpp"
#include "gemm.hpp"
#include "microkernel.hpp"
#include "parallel.hpp"

namespace head_attention::detail {

/// The rows of m as row-major storage with contiguous rows, its leading dimension in `stride`: m's own
/// storage when it has that layout, else a copy in `copy`.
template <typename Derived, typename Matrix>
const typename Derived::Scalar* row_major_data(const Eigen::MatrixBase<Derived>& m, Matrix& copy,
                                               Eigen::Index& stride) {
  constexpr bool in_place = (Derived::Flags & Eigen::DirectAccessBit) != 0 && Derived::IsRowMajor &&
                            Derived::InnerStrideAtCompileTime == 1;
  if constexpr (in_place) {
    stride = m.derived().outerStride();
    return m.derived().data();
  } else {
    copy = m;  // an expression, a column-major or strided view: evaluated once
    stride = copy.cols();
    return copy.data();
  }
}

/// Block sizes of the backward pass.
struct BackwardTuning {
  /// Rows each attention work item owns: a block of queries (their statistics) or of keys (dK, dV, their
  /// share of dQ). Measured at B = 8, T = 1024 and B = 1, T = 4096: 128 was 5-7% faster than 64; 256 no
  /// better.
  static constexpr Eigen::Index block = 128;
  /// Rows of the other side per tile: keys per tile of a query block, queries per tile of a key block. Longer
  /// than `block`, as the forward's key blocks are, so that each small GEMM packs its operands fewer times.
  static constexpr Eigen::Index tile = 256;
  /// Rows of x per projection and input-gradient work item.
  static constexpr Eigen::Index row_chunk = 256;
  /// Columns of x per weight-gradient work item.
  static constexpr Eigen::Index column_block = 64;
  /// Work items of the key pass to aim for: a call with fewer (head, sequence) pairs deals each one's key
  /// blocks to up to max_groups items (each group past the first holds a [T, head] dQ accumulator).
  static constexpr Eigen::Index key_items = 8;
  static constexpr Eigen::Index max_groups = 4;
  /// Below this many flops (estimated) a backward call stays on one thread.
  static constexpr double serial_below_flops = 1e5;
};

/// Per-thread working storage of the attention loops, allocated before the parallel region.
template <typename Scalar>
struct BackwardScratch {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  /// Tiles of up to [tile, tile]: query-major ones are [block, tile], key-major ones [tile, block].
  BackwardScratch(Index block, Index tile, Index head, Index x_block)
      : probs(tile, tile),
        dscores(tile, tile),
        acc(block, head),
        row_max(block),
        row_sum(block),
        x_panels(x_block),
        b_panels((2 * tile + block) * head),
        zeros(Vector::Zero(tile)) {}

  Matrix probs;     // [tile, tile] a tile's scores, then P = exp(S - lse)
  Matrix dscores;   // [tile, tile] dO Vᵀ, then dS = P ∘ (dP - D)
  Matrix acc;       // [block, head] a query block's un-normalised output
  Vector row_max;   // [block] running max of each query's scores
  Vector row_sum;   // [block] running sum of exp(score - row_max)
  Vector x_panels;  // [tile_depth, column_block] a block of x in column panels: dW's B operand
  Vector b_panels;  // [2 · tile + block, head] a query tile's dO and Q', a key block's K, in column panels
  Vector zeros;     // [tile] all 0: the bias of S = 0 + Q' Kᵀ and dP = 0 + dO Vᵀ
};

/// One (head, sequence) of a backward call: where its rows of Q' = Q / sqrt(head), K, V and dO are, its
/// per-row statistics, and where its gradients go.
template <typename Scalar>
struct BackwardSequence {
  using Index = Eigen::Index;
  const Scalar* q;  // [seq_len, head] Q', leading dimension ld; K at q + head, V at q + 2 · head
  const Scalar* kt;  // [head, seq_len] Kᵀ in column panels of kt_panel keys (the forward's layout, key_panel)
  const Scalar* vt;    // [head, seq_len] Vᵀ, the same
  Index kt_panel;      // keys per panel
  Scalar* dq;          // [seq_len, head] dQ, leading dimension ld; dK at dq + head, dV at dq + 2 · head
  Index ld;            // row stride of q and dq
  const Scalar* dout;  // [seq_len, head] dL/dO, leading dimension dout_stride
  Index dout_stride;
  Scalar* lse;    // [seq_len] logsumexp of each query's visible scores
  Scalar* delta;  // [seq_len] D = rowsum(dO ∘ O)
  Scalar* out;    // [seq_len, head] O, leading dimension out_stride, or null
  Index out_stride;
  Index seq_len;  // rows
  Index valid;    // keys at or after it are masked (right padding)
  Index head;
  // Whether Q', K, V and dO are all finite. If not, the tiles with masked entries take the masked products
  // below, which leave those entries out: a product with the masked zeros would turn a NaN or Inf in a row
  // that is masked there into 0 · NaN = NaN in rows that never see it.
  bool finite;
};

/// The key range [first, end) the query at position p of a sequence sees.
template <typename Scalar>
Eigen::Index first_visible(const BackwardSequence<Scalar>& sq, const MaskRule& rule, Eigen::Index p) {
  return std::min(rule.first_key(p), sq.valid);
}
template <typename Scalar>
Eigen::Index end_visible(const BackwardSequence<Scalar>& sq, const MaskRule& rule, Eigen::Index p) {
  return std::min(rule.end_key(p, sq.seq_len), sq.valid);
}

/// Whether every query of rows [r0, r0 + bq) sees every key of [j0, j0 + bk): both ends of a query's range
/// never decrease with its position.
template <typename Scalar>
bool whole_tile(const BackwardSequence<Scalar>& sq, const MaskRule& rule, Eigen::Index r0, Eigen::Index bq,
                Eigen::Index j0, Eigen::Index bk) {
  return first_visible(sq, rule, r0 + bq - 1) <= j0 && end_visible(sq, rule, r0) >= j0 + bk;
}

/// The tile's products over its visible entries only, row by row (the slow path of a sequence that is not
/// all finite): for each query row r of the tile and its visible keys [a, b) (tile-relative, from the rule),
/// f(r, a, b).
template <typename Scalar, typename F>
void for_visible(const BackwardSequence<Scalar>& sq, const MaskRule& rule, Eigen::Index r0, Eigen::Index bq,
                 Eigen::Index j0, Eigen::Index bk, F&& f) {
  using Index = Eigen::Index;
  for (Index r = 0; r < bq; ++r) {
    const Index a = std::clamp<Index>(first_visible(sq, rule, r0 + r) - j0, 0, bk);
    const Index b = std::clamp<Index>(end_visible(sq, rule, r0 + r) - j0, a, bk);
    if (b > a) f(r, a, b);
  }
}

/// Scores of one tile, query rows [r0, r0 + bq) and keys [j0, j0 + bk), into s.probs; then for each row r
/// its visible range, clamped to the tile, in [a[r], b[r]) (tile-relative).
template <typename Scalar>
void tile_scores(const BackwardSequence<Scalar>& sq, Eigen::Index r0, Eigen::Index bq, Eigen::Index j0,
                 Eigen::Index bk, BackwardScratch<Scalar>& s) noexcept {
  // S = 0 + Q' Kᵀ: written, not accumulated, so the tile needs no zeroing first.
  scores_from_panels(bq, bk, sq.head, sq.q + r0 * sq.ld, sq.ld, sq.kt, sq.kt_panel, j0, s.zeros.data(),
                     s.probs.data(), s.probs.cols());
}

/// P and dS of the tile (query rows [r0, r0 + bq), keys [j0, j0 + bk)) into s.probs and s.dscores, from the
/// statistics lse and delta: P = exp(S - lse) on visible entries and 0 elsewhere, dS = P ∘ (dO Vᵀ - D).
template <typename Scalar>
void tile_gradients(const BackwardSequence<Scalar>& sq, const MaskRule& rule, Eigen::Index r0,
                    Eigen::Index bq, Eigen::Index j0, Eigen::Index bk, BackwardScratch<Scalar>& s) noexcept {
  using Index = Eigen::Index;
  using Matrix = typename BackwardScratch<Scalar>::Matrix;
  using Vector = typename BackwardScratch<Scalar>::Vector;
  using Stride = Eigen::OuterStride<>;
  tile_scores(sq, r0, bq, j0, bk, s);
  Eigen::Map<Matrix, 0, Stride> probs(s.probs.data(), bq, bk, Stride(s.probs.cols()));        // [bq, bk]
  Eigen::Map<Matrix, 0, Stride> dscores(s.dscores.data(), bq, bk, Stride(s.dscores.cols()));  // [bq, bk]
  for (Index r = 0; r < bq; ++r) {
    const Index a = std::clamp<Index>(first_visible(sq, rule, r0 + r) - j0, 0, bk);
    const Index b = std::clamp<Index>(end_visible(sq, rule, r0 + r) - j0, a, bk);
    // P = exp(S - lse) by the forward's exp, made for S <= lse (lse is the row's max plus the log of a sum
    // >= 1), right for the ulps above it that a recomputed S may have too.
    if (b > a) exp_sum(probs.row(r).data() + a, b - a, sq.lse[r0 + r]);
    probs.row(r).head(a).setZero();
    probs.row(r).tail(bk - b).setZero();
  }
  scores_from_panels(bq, bk, sq.head, sq.dout + r0 * sq.dout_stride, sq.dout_stride, sq.vt, sq.kt_panel, j0,
                     s.zeros.data(), dscores.data(), s.dscores.cols());  // dP = 0 + dO Vᵀ
  const Eigen::Map<const Vector> delta(sq.delta + r0, bq);               // [bq]
  dscores = (probs.array() * (dscores.array().colwise() - delta.array())).matrix();
  if (!sq.finite)  // masked entries: 0 · (dP - D) is NaN where dP or D is
    for (Index r = 0; r < bq; ++r) {
      const Index a = std::clamp<Index>(first_visible(sq, rule, r0 + r) - j0, 0, bk);
      const Index b = std::clamp<Index>(end_visible(sq, rule, r0 + r) - j0, a, bk);
      dscores.row(r).head(a).setZero();
      dscores.row(r).tail(bk - b).setZero();
    }
}

/// The forward statistics of query rows [r0, r0 + bq): an online softmax over the visible keys, as the
/// forward pass runs it, keeping lse = max + log(sum) and D = dO · O per row (and O itself when sq.out is
/// set). A query that sees no key gets O = 0, D = 0 (its lse is never read: no tile has a visible entry in
/// its row).
template <typename Scalar>
void softmax_statistics(const BackwardSequence<Scalar>& sq, const MaskRule& rule, Eigen::Index r0,
                        Eigen::Index bq, Eigen::Index tile, BackwardScratch<Scalar>& s) noexcept {
  using Index = Eigen::Index;
  using Matrix = typename BackwardScratch<Scalar>::Matrix;
  using Stride = Eigen::OuterStride<>;
  s.row_max.head(bq).setConstant(-std::numeric_limits<Scalar>::infinity());
  s.row_sum.head(bq).setZero();
  s.acc.topRows(bq).setZero();
  const Index lo = first_visible(sq, rule, r0) / tile * tile;
  const Index hi = end_visible(sq, rule, r0 + bq - 1);
  for (Index j0 = lo; j0 < hi; j0 += tile) {
    const Index bk = std::min(tile, sq.seq_len - j0);
    tile_scores(sq, r0, bq, j0, bk, s);
    Eigen::Map<Matrix, 0, Stride> probs(s.probs.data(), bq, bk, Stride(s.probs.cols()));  // [bq, bk]
    for (Index r = 0; r < bq; ++r) {
      const Index a = std::clamp<Index>(first_visible(sq, rule, r0 + r) - j0, 0, bk);
      const Index b = std::clamp<Index>(end_visible(sq, rule, r0 + r) - j0, a, bk);
      if (a == b) {
        probs.row(r).setZero();
        continue;
      }
      const Scalar old_max = s.row_max[r];
      const Scalar new_max = std::max(old_max, probs.row(r).segment(a, b - a).maxCoeff());
      const Scalar tile_sum = exp_sum(probs.row(r).data() + a, b - a, new_max);  // the forward's exp
      probs.row(r).head(a).setZero();
      probs.row(r).tail(bk - b).setZero();
      if (new_max != old_max) {
        const Scalar rescale = std::exp(old_max - new_max);  // 0 on the first visible block
        s.row_sum[r] *= rescale;
        s.acc.row(r) *= rescale;
        s.row_max[r] = new_max;
      }
      s.row_sum[r] += tile_sum;
    }
    if (sq.finite || whole_tile(sq, rule, r0, bq, j0, bk)) {
      gemm_nn(bq, sq.head, bk, probs.data(), s.probs.cols(), sq.q + j0 * sq.ld + 2 * sq.head, sq.ld,
              s.acc.data(),
              sq.head);  // acc += P V
    } else {
      const Eigen::Map<const Matrix, 0, Stride> v(sq.q + j0 * sq.ld + 2 * sq.head, bk, sq.head,
                                                  Stride(sq.ld));  // [bk, head]
      for_visible(sq, rule, r0, bq, j0, bk, [&](Index r, Index a, Index b) {
        s.acc.row(r).noalias() += probs.row(r).segment(a, b - a) * v.middleRows(a, b - a);
      });
    }
  }
  for (Index r = 0; r < bq; ++r) {
    const Index row = r0 + r;
    if (s.row_sum[r] == Scalar(0)) {  // no visible key
      s.acc.row(r).setZero();
      sq.lse[row] = std::numeric_limits<Scalar>::infinity();
    } else {
      s.acc.row(r) /= s.row_sum[r];  // O
      sq.lse[row] = s.row_max[r] + std::log(s.row_sum[r]);
    }
    const Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> dout(sq.dout + row * sq.dout_stride,
                                                                          sq.head);
    sq.delta[row] = dout.dot(s.acc.row(r));
    if (sq.out != nullptr)
      Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(sq.out + row * sq.out_stride, sq.head) =
          s.acc.row(r);
  }
}

/// dK and dV of key rows [j0, j0 + bk), and their share of dQ: over the query tiles that see any of these
/// keys, dV = Σ Pᵀ dO and dK = Σ dSᵀ Q' (written), and dS K added to the accumulator dq_acc ([seq_len, head],
/// leading dimension dq_stride; unscaled: dQ = scale · Σ dS K over all key blocks).
template <typename Scalar>
void key_gradients(const BackwardSequence<Scalar>& sq, const MaskRule& rule, Eigen::Index j0, Eigen::Index bk,
                   Eigen::Index tile, Scalar* dq_acc, Eigen::Index dq_stride,
                   BackwardScratch<Scalar>& s) noexcept {
  using Index = Eigen::Index;
  using Matrix = typename BackwardScratch<Scalar>::Matrix;
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<Matrix, 0, Stride> dk(sq.dq + j0 * sq.ld + sq.head, bk, sq.head, Stride(sq.ld));  // [bk, head]
  Eigen::Map<Matrix, 0, Stride> dv(sq.dq + j0 * sq.ld + 2 * sq.head, bk, sq.head,
                                   Stride(sq.ld));  // [bk, head]
  const Eigen::Map<const Matrix, 0, Stride> k(sq.q + j0 * sq.ld + sq.head, bk, sq.head,
                                              Stride(sq.ld));  // [bk, head]
  dk.setZero();
  dv.setZero();
  // The B operands of the tiles' three GEMMs in column panels (see gemm_b_panels): the block's K here, each
  // query tile's dO and Q' below. Copies of [tile, head], against three GEMMs of [bk, tile, head] each.
  Scalar* const dout_panels = s.b_panels.data();
  Scalar* const q_panels = dout_panels + tile * sq.head;
  Scalar* const k_panels = q_panels + tile * sq.head;
  pack_column_panels(k.data(), sq.ld, bk, sq.head, k_panels);
  for (Index r0 = 0; r0 < sq.seq_len; r0 += tile) {
    const Index bq = std::min(tile, sq.seq_len - r0);
    // Both ends of a query's range never decrease with its position: the tile sees [lo, hi).
    const Index lo = first_visible(sq, rule, r0);
    const Index hi = end_visible(sq, rule, r0 + bq - 1);
    if (hi <= j0 || lo >= j0 + bk || lo >= hi) continue;  // causal: the tiles above the diagonal
    tile_gradients(sq, rule, r0, bq, j0, bk, s);
    if (sq.finite || whole_tile(sq, rule, r0, bq, j0, bk)) {
      // Pᵀ and dSᵀ are the row-major tiles read as column-major (lda = 1, columns a tile row apart).
      pack_column_panels(sq.dout + r0 * sq.dout_stride, sq.dout_stride, bq, sq.head, dout_panels);
      pack_column_panels(sq.q + r0 * sq.ld, sq.ld, bq, sq.head, q_panels);
      gemm_b_panels(bk, sq.head, bq, s.probs.data(), 1, s.probs.cols(), dout_panels, bq, dv.data(),
                    sq.ld);  // dV [bk, head] += Pᵀ dO
      gemm_b_panels(bk, sq.head, bq, s.dscores.data(), 1, s.dscores.cols(), q_panels, bq, dk.data(),
                    sq.ld);  // dK [bk, head] += dSᵀ Q' (Q' carries the scale)
      gemm_b_panels(bq, sq.head, bk, s.dscores.data(), s.dscores.cols(), 1, k_panels, bk,
                    dq_acc + r0 * dq_stride, dq_stride);  // dQ [bq, head] += dS K
    } else {
      const Eigen::Map<const Matrix, 0, Stride> dout(sq.dout + r0 * sq.dout_stride, bq, sq.head,
                                                     Stride(sq.dout_stride));  // [bq, head]
      const Eigen::Map<const Matrix, 0, Stride> q(sq.q + r0 * sq.ld, bq, sq.head,
                                                  Stride(sq.ld));  // [bq, head]
      Eigen::Map<Matrix, 0, Stride> dq(dq_acc + r0 * dq_stride, bq, sq.head,
                                       Stride(dq_stride));  // [bq, head]
      for_visible(sq, rule, r0, bq, j0, bk, [&](Index r, Index a, Index b) {
        dv.middleRows(a, b - a).noalias() += s.probs.row(r).segment(a, b - a).transpose() * dout.row(r);
        dk.middleRows(a, b - a).noalias() += s.dscores.row(r).segment(a, b - a).transpose() * q.row(r);
        dq.row(r).noalias() += s.dscores.row(r).segment(a, b - a) * k.middleRows(a, b - a);
      });
    }
  }
}

/// Where a backward call reads and writes. layers: [3 · heads] nn.Linear(emb, head), head h's Q, K, V at 3h,
/// 3h + 1, 3h + 2; grads: [heads], resized here.
template <typename Scalar>
struct BackwardCall {
  using Index = Eigen::Index;
  const Scalar* x = nullptr;  // [batch · seq_len, emb] row-major, leading dimension x_stride
  Index x_stride = 0;
  Index batch = 0;
  Index seq_len = 0;
  const Linear<Scalar>* const* layers = nullptr;
  Index heads = 1;
  const Scalar* dout = nullptr;  // [rows, heads · head] dL/d (the heads' concatenated outputs), row-major
  Index dout_stride = 0;
  MaskRule rule = MaskRule::causal();
  const Index* lengths = nullptr;          // [batch] valid keys per sequence, or null
  HeadGradients<Scalar>* grads = nullptr;  // [heads] the parameter gradients
  Scalar* dx = nullptr;   // [rows, emb] dL/dx, row-major, contiguous (used as scratch before it is written)
  Scalar* out = nullptr;  // [rows, heads · head] the heads' outputs (recomputed on the way), or null
  Index out_stride = 0;
  // The forward's statistics, kept by a training forward, or null: recomputed. With them the statistics pass
  // is skipped (out is then not written).
  const Scalar* saved_out =
      nullptr;  // [rows, heads · head] the heads' outputs, leading dimension saved_stride
  Index saved_stride = 0;
  const Scalar* saved_lse = nullptr;  // [heads · rows] each row's logsumexp, head h's rows at h · rows
  int threads = 1;
};

/// The whole backward pass: Q, K, V recomputed; per query block the softmax statistics and dQ; per key block
/// dK and dV; then the projections' gradients dW = dYᵀ x, db = Σ rows of dY and dx = Σ dY W, as GEMMs over
/// fixed row chunks and column blocks. Shapes are checked by the caller. Allocates before its parallel
/// region.
template <typename Scalar>
void backward(const BackwardCall<Scalar>& call) {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using Stride = Eigen::OuterStride<>;
  const Index heads = call.heads;
  const Index emb = call.layers[0]->in_features();
  const Index head = call.layers[0]->out_features();
  const Index rows = call.batch * call.seq_len;
  const Index width = 3 * heads * head;  // Q | K | V of every head
  for (Index h = 0; h < heads; ++h) {
    HeadGradients<Scalar>& g = call.grads[h];
    for (Linear<Scalar>* l : {&g.query, &g.key, &g.value}) {
      l->weight.setZero(head, emb);
      l->bias.setZero(head);
    }
  }
  last_team_size() = 1;
  if (rows == 0) return;

  const Index block = std::min(BackwardTuning::block, call.seq_len);
  const Index tile = std::min(BackwardTuning::tile, call.seq_len);
  const Index chunk = std::min(BackwardTuning::row_chunk, rows);
  const Index chunks = (rows + chunk - 1) / chunk;
  const Index column_blocks = (emb + BackwardTuning::column_block - 1) / BackwardTuning::column_block;
  const Index blocks = (call.seq_len + block - 1) / block;
  const Index sequences = heads * call.batch;  // (head, sequence) pairs
  const Index block_items = sequences * blocks;
  // The key blocks of one sequence are dealt, round robin, to `groups` work items that each add their share
  // of dQ into an accumulator of their own, summed in a fixed order afterwards: dQ needs no second pass over
  // the tiles and no atomics, and the sums do not depend on the thread count. The group count follows the
  // shape alone; each group past the first costs one more [seq_len, head] accumulator per sequence.
  const Index groups = std::clamp<Index>((BackwardTuning::key_items + sequences - 1) / sequences, 1,
                                         std::min(blocks, BackwardTuning::max_groups));
  const Index key_items = sequences * groups;
  const Index weight_items = column_blocks;
  const double flops =
      static_cast<double>(rows) * static_cast<double>(width) * static_cast<double>(emb) * 6.0 +
      static_cast<double>(heads * rows) * static_cast<double>(call.seq_len * head) * 8.0;
  int threads = call.threads;
  if (flops < BackwardTuning::serial_below_flops || in_parallel_region()) threads = 1;
  threads =
      static_cast<int>(std::min<Index>(threads, std::max({block_items, chunks * 3 * heads, weight_items})));
  threads = std::max(threads, 1);

  // Every projection's weight in the GEMMs' layouts, column panels of the register tile's width (see
  // weight_panel), so that a tile's B rows are contiguous. For Q', K and V the forward's own preparation
  // (pack_projection_part: Wᵀ of each, the query's scale folded in), so that they are the forward's bits;
  // read in one [emb, 3·heads·head] block they sat 768 bytes apart (85 against 102 GFLOP/s with AVX2, 102
  // against 108 with AVX-512, Zen 4). All of W stacked, [3·heads·head, emb], for dx: in place its rows sat
  // 2 KB apart at emb 512, where a tile's rows of one cache line each share two L1 sets (91 against 113
  // GFLOP/s with AVX2; AVX-512 unchanged).
  constexpr Index panel = weight_panel<Scalar>;
  Vector projections_t(width * emb);   // [3·heads] × [emb, head] in column panels, Wq scaled
  Vector projection_biases(width);     // [heads, 3·head] bq·scale | bk | bv
  Vector weights_panels(width * emb);  // [width, emb] in column panels
  const Vector zeros = Vector::Zero(emb);
  Matrix qkv(rows, width);   // [rows, 3·heads·head] Q' | K | V, head after head
  Matrix dqkv(rows, width);  // [rows, 3·heads·head] dQ | dK | dV (group 0 accumulates dQ here)
  // Scratch: the other groups' dQ accumulators, [(groups - 1) · heads · rows, head], then Kᵀ and Vᵀ of every
  // (head, sequence), [heads · batch, 2] × [head, T] (the B operands of Q'Kᵀ and dO Vᵀ) in the forward's Kᵀ
  // layout: column panels of the register tile's width (key_panel), so that the rows a tile reads are
  // contiguous. (As one [head, T] block with rows a cache line longer than T, a tile's 64 rows sat on 64
  // pages at T >= 1024: S and dP ran 1.3x slower per flop than dV += Pᵀ dO with AVX2.) In dx's storage when
  // it fits there (dx is written only after the attention passes), which keeps a single head's peak memory
  // down.
  const Index kt_panel = key_panel<Scalar>(call.seq_len);
  const Index kt_size = head * ((call.seq_len + kt_panel - 1) / kt_panel * kt_panel);  // one Kᵀ or Vᵀ
  const Index scratch_size = (groups - 1) * heads * rows * head + sequences * 2 * kt_size;
  const bool in_dx = scratch_size <= rows * emb;
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> own_scratch(in_dx ? 0 : scratch_size);
  Scalar* const dq_groups = in_dx ? call.dx : own_scratch.data();
  Scalar* const kv_t = dq_groups + (groups - 1) * heads * rows * head;
  Matrix stats(2, heads * rows);  // [2, heads · rows] lse, D
  // [heads · batch · blocks] whether a key block's rows of Q', K, V and dO are all finite
  std::vector<char> finite_blocks(static_cast<std::size_t>(block_items));
  Matrix dweights(width, emb);  // [3·heads·head, emb]
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(head));
  for (Index part = 0; part < 6 * heads; ++part)
    pack_projection_part(call.layers, emb, head, scale, part, projections_t.data(), projection_biases.data());
  for (Index p = 0; p < 3 * heads; ++p) {
    const typename Linear<Scalar>::Matrix& w = call.layers[p]->weight;  // [head, emb]
    for (Index j = 0; j < emb; j += panel) {
      const Index pw = std::min(panel, emb - j);
      Eigen::Map<Matrix>(weights_panels.data() + j * width + p * head * pw, head, pw) = w.middleCols(j, pw);
    }
  }
  dweights.setZero();
  const Index x_depth = std::min(tile_depth, rows);  // rows of x per packed block (gemm_nn's depth block)
  const Index x_block = x_depth * std::min(BackwardTuning::column_block, emb);
  std::vector<BackwardScratch<Scalar>> scratch;
  scratch.reserve(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t)
    scratch.emplace_back(block, tile, head, x_block);
  const Eigen::Map<const Matrix, 0, Stride> x(call.x, rows, emb, Stride(call.x_stride));  // [rows, emb]
  Eigen::Map<Matrix> dx(call.dx, rows, emb);                                              // [rows, emb]
  const auto sequence = [&](Index c) {  // (head h = c / batch, sequence b = c % batch)
    const Index h = c / call.batch, b = c % call.batch;
    const Index row0 = b * call.seq_len;
    BackwardSequence<Scalar> sq;
    sq.q = qkv.data() + row0 * width + 3 * h * head;
    sq.kt = kv_t + c * 2 * kt_size;
    sq.vt = sq.kt + kt_size;
    sq.kt_panel = kt_panel;
    sq.dq = dqkv.data() + row0 * width + 3 * h * head;
    sq.ld = width;
    sq.dout = call.dout + row0 * call.dout_stride + h * head;
    sq.dout_stride = call.dout_stride;
    sq.lse = stats.data() + h * rows + row0;
    sq.delta = stats.data() + heads * rows + h * rows + row0;
    sq.out = call.out != nullptr ? call.out + row0 * call.out_stride + h * head : nullptr;
    sq.out_stride = call.out_stride;
    sq.seq_len = call.seq_len;
    sq.valid = call.lengths != nullptr ? call.lengths[b] : call.seq_len;
    sq.head = head;
    const auto flags = finite_blocks.begin() + c * blocks;  // written by the Kᵀ | Vᵀ loop
    sq.finite = std::all_of(flags, flags + blocks, [](char f) { return f != 0; });
    return sq;
  };
  // Group g's dQ accumulator of (head, sequence) c: the dQ columns of dqkv for g = 0, else a slice of
  // dq_groups.
  const auto dq_accumulator = [&](Index c, Index g) -> std::pair<Scalar*, Index> {
    if (g == 0) return {sequence(c).dq, width};
    const Index h = c / call.batch, b = c % call.batch;
    return {dq_groups + (((g - 1) * heads + h) * rows + b * call.seq_len) * head, head};
  };
  // Eigen's products below must not fork threads of their own: outside a team of several threads Eigen would
  // parallelise a large one (and round differently with the thread count).
  const SerialEigenProducts serial_products;

  HEAD_ATTENTION_OMP(parallel num_threads(threads) if (threads > 1)) {
    BackwardScratch<Scalar>& s = scratch[static_cast<std::size_t>(thread_index())];
    if (thread_index() == 0) last_team_size() = team_size();  // for the tests of the thread setting
    // Q', K, V: one GEMM per (row chunk, projection).
    HEAD_ATTENTION_OMP(for schedule(dynamic, 1))
    for (Index item = 0; item < chunks * 3 * heads; ++item) {
      const Index r0 = (item / (3 * heads)) * chunk, p = item % (3 * heads);
      const Index n = std::min(chunk, rows - r0);
      Eigen::Block<Matrix> y = qkv.block(r0, p * head, n, head);  // [n, head]
      gemm_panels(
          n, head, emb, x.data() + r0 * call.x_stride, call.x_stride, 1,
          projections_t.data() + p * head * emb, projection_biases.data() + p * head, y.data(), width,
          p < threads);  // y = b + x Wᵀ (both scaled for Q'); a chunk's first items read x from memory
    }
    // Kᵀ and Vᵀ, by key block; and whether the block's rows are all finite.
    HEAD_ATTENTION_OMP(for schedule(static))
    for (Index item = 0; item < block_items; ++item) {
      const Index c = item / blocks, h = c / call.batch, b = c % call.batch;
      const Index j0 = (item % blocks) * block, bk = std::min(block, call.seq_len - j0);
      const Index row = b * call.seq_len + j0;
      Scalar* const kt = kv_t + c * 2 * kt_size;  // Kᵀ, then Vᵀ, in panels of kt_panel keys
      const Eigen::Map<const Matrix, 0, Stride> qkv_rows(qkv.data() + row * width + 3 * h * head, bk,
                                                         3 * head,
                                                         Stride(width));  // [bk, 3 · head] Q' | K | V
      const Scalar* const sequence_rows = qkv.data() + b * call.seq_len * width + 3 * h * head;  // Q' | K | V
      transpose_into_key_panels(sequence_rows + head, width, j0, j0 + bk, head, kt, kt_panel);
      transpose_into_key_panels(sequence_rows + 2 * head, width, j0, j0 + bk, head, kt + kt_size, kt_panel);
      const Eigen::Map<const Matrix, 0, Stride> dout(call.dout + row * call.dout_stride + h * head, bk, head,
                                                     Stride(call.dout_stride));  // [bk, head]
      finite_blocks[static_cast<std::size_t>(item)] = qkv_rows.allFinite() && dout.allFinite();
    }
    // Per query block: the softmax statistics; and its rows of every dQ accumulator zeroed.
    HEAD_ATTENTION_OMP(for schedule(dynamic, 1))
    for (Index item = 0; item < block_items; ++item) {
      const Index c = item / blocks;
      const Index r0 = (blocks - 1 - item % blocks) * block;  // the last blocks see the most keys: first
      const Index bq = std::min(block, call.seq_len - r0);
      if (call.saved_lse != nullptr) {
        // D = rowsum(dO ∘ O) straight from the forward's O: no Q'Kᵀ or P V here.
        const BackwardSequence<Scalar> sq = sequence(c);
        const Index h = c / call.batch, row0 = (c % call.batch) * call.seq_len;
        const Eigen::Map<const Matrix, 0, Stride> o(
            call.saved_out + (row0 + r0) * call.saved_stride + h * head, bq, head,
            Stride(call.saved_stride));  // [bq, head]
        const Eigen::Map<const Matrix, 0, Stride> dout(sq.dout + r0 * sq.dout_stride, bq, head,
                                                       Stride(sq.dout_stride));  // [bq, head]
        Eigen::Map<Eigen::Matrix<Scalar, Eigen::Dynamic, 1>>(sq.delta + r0, bq) =
            (dout.array() * o.array()).rowwise().sum();
        std::copy_n(call.saved_lse + h * rows + row0 + r0, bq, sq.lse + r0);
      } else {
        softmax_statistics(sequence(c), call.rule, r0, bq, tile, s);
      }
      for (Index g = 0; g < groups; ++g) {
        const std::pair<Scalar*, Index> acc = dq_accumulator(c, g);
        Eigen::Map<Matrix, 0, Stride>(acc.first + r0 * acc.second, bq, head, Stride(acc.second)).setZero();
      }
    }
    // Per (sequence, group): dK and dV of the group's key blocks, and their share of dQ.
    HEAD_ATTENTION_OMP(for schedule(dynamic, 1))
    for (Index item = 0; item < key_items; ++item) {
      const Index c = item / groups, g = item % groups;
      const BackwardSequence<Scalar> sq = sequence(c);
      const std::pair<Scalar*, Index> acc = dq_accumulator(c, g);
      for (Index kb = g; kb < blocks; kb += groups)
        key_gradients(sq, call.rule, kb * block, std::min(block, call.seq_len - kb * block), tile, acc.first,
                      acc.second, s);
    }
    // dQ = scale · (the groups' accumulators summed in order), per query block.
    HEAD_ATTENTION_OMP(for schedule(static))
    for (Index item = 0; item < block_items; ++item) {
      const Index c = item / blocks;
      const Index r0 = (item % blocks) * block;
      const Index bq = std::min(block, call.seq_len - r0);
      const std::pair<Scalar*, Index> first = dq_accumulator(c, 0);
      Eigen::Map<Matrix, 0, Stride> dq(first.first + r0 * first.second, bq, head, Stride(first.second));
      for (Index g = 1; g < groups; ++g) {
        const std::pair<Scalar*, Index> acc = dq_accumulator(c, g);
        dq += Eigen::Map<const Matrix, 0, Stride>(acc.first + r0 * acc.second, bq, head, Stride(acc.second));
      }
      dq *= scale;  // Q' = scale · Q
    }
    // dx = dY W by row chunks, and dW = dYᵀ x by column block: each element written once.
    HEAD_ATTENTION_OMP(for schedule(dynamic, 1))
    for (Index item = 0; item < chunks + weight_items; ++item) {
      if (item < chunks) {
        const Index r0 = item * chunk, n = std::min(chunk, rows - r0);
        gemm_panels(n, emb, width, dqkv.data() + r0 * width, width, 1, weights_panels.data(), zeros.data(),
                    dx.data() + r0 * emb, emb, true);
      } else {
        const Index c0 = (item - chunks) * BackwardTuning::column_block;
        const Index nc = std::min(BackwardTuning::column_block, emb - c0);
        // Every projection's dW columns [c0, c0 + nc) at once, block of rows after block: the block of x in
        // column panels (in place its rows sat emb apart, as dx's B rows did), dYᵀ read as a column-major
        // operand. Blocks of gemm_nn's depth, so that each sum has the order of one product over all rows.
        // AVX2 70 → 93 GFLOP/s, AVX-512 89 → 98 (B = 8, T = 1024, emb 512, Zen 4), against one product of
        // all rows per (projection, column block) on x in place.
        Scalar* const xp = s.x_panels.data();
        for (Index r0 = 0; r0 < rows; r0 += x_depth) {
          const Index d = std::min(x_depth, rows - r0);
          for (Index j = 0; j < nc; j += panel) {
            const Index pw = std::min(panel, nc - j);
            Eigen::Map<Matrix>(xp + j * d, d, pw) = x.block(r0, c0 + j, d, pw);
            gemm_nn(width, pw, d, dqkv.data() + r0 * width, 1, xp + j * d, pw, dweights.data() + c0 + j, emb,
                    width);
          }
        }
      }
    }
  }
  for (Index p = 0; p < 3 * heads; ++p) {
    HeadGradients<Scalar>& g = call.grads[p / 3];
    Linear<Scalar>& l = p % 3 == 0 ? g.query : (p % 3 == 1 ? g.key : g.value);
    l.weight = dweights.middleRows(p * head, head);
    l.bias = dqkv.middleCols(p * head, head).colwise().sum().transpose();
  }
}

}  // namespace head_attention::detail

// head-attention: the fused forward pass. One projection pass for Q, K and V, then a tiled online-softmax
// (FlashAttention-2 style) causal attention over (sequence x query block) work items on all cores. Extra
// memory is O(T · head_size).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include <Eigen/Core>

#include "../linear.hpp"
#include "gemm.hpp"
#include "parallel.hpp"

namespace head_attention::detail {

/// Block sizes and thresholds, chosen by measurement with bench/ (see README, "Performance").
struct Tuning {
  /// Rows of Q per work item.
  static constexpr Eigen::Index query_block = 64;
  /// Rows of K and V per inner step.
  static constexpr Eigen::Index key_block = 256;
  /// Rows of x per projection work item, at most.
  static constexpr Eigen::Index projection_rows = 256;
  /// Below this many useful flops a forward call stays on one thread. Forking is cheap next to the
  /// projection GEMMs (two threads already win at B = 1, T = 1, emb 512), so only toy sizes stay serial.
  static constexpr double serial_below_flops = 1e5;
};
// With key blocks a multiple of query blocks, every key block a query block visits starts at or before its
// first query, so no row of a tile is wholly masked. (When T < key_block, one key block covers every key.)
static_assert(Tuning::key_block % Tuning::query_block == 0, "key_block must be a multiple of query_block");

/// Per-thread working storage for the attention loop, allocated once per call.
template <typename Scalar>
struct FlashScratch {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  FlashScratch(Index block_q, Index block_k, Index head)
      : probs(block_q, block_k),
        acc(block_q, head),
        row_max(block_q),
        row_sum(block_q),
        qk(block_q, block_k, head),
        pv(block_q, head, block_k) {}

  Matrix probs;     // [block_q, block_k] scores of one tile, then their exponentials
  Matrix acc;       // [block_q, head] un-normalised output
  Vector row_max;   // [block_q] running max of each query's scores
  Vector row_sum;   // [block_q] running sum of exp(score - row_max)
  Gemm<Scalar> qk;  // probs = Q_tile · K_tileᵀ
  Gemm<Scalar> pv;  // acc += probs · V_tile
};

/// Causal attention of queries [i0, i0 + bq) of one sequence. qkv: [T, 3·head] row-major with Q already
/// scaled; out: [T, head] row-major. Key blocks wholly above the diagonal are never visited, and the last one
/// is clamped to the keys these queries can see; only that one is masked. Never throws, never allocates.
template <typename Scalar>
void attend_query_block(const Scalar* qkv, Eigen::Index head, Eigen::Index i0, Eigen::Index bq, Scalar* out,
                        FlashScratch<Scalar>& s) noexcept {
  using Index = Eigen::Index;
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Index ld = 3 * head;
  const Index block_k = s.probs.cols();
  const Index i1 = i0 + bq;

  s.row_max.head(bq).setConstant(-std::numeric_limits<Scalar>::infinity());
  s.row_sum.head(bq).setZero();
  s.acc.topRows(bq).setZero();

  for (Index j0 = 0; j0 < i1; j0 += block_k) {
    const Index bk = std::min(block_k, i1 - j0);  // keys at or after i1 are invisible to all these queries
    Eigen::Map<Matrix, 0, Eigen::OuterStride<>> probs(s.probs.data(), bq, bk, Eigen::OuterStride<>(block_k));
    probs.setZero();
    s.qk.template accumulate<Eigen::RowMajor, Eigen::ColMajor>(
        bq, bk, head, qkv + i0 * ld, ld, qkv + j0 * ld + head, ld, probs.data(), block_k);

    const bool on_diagonal = j0 + bk - 1 > i0;  // some key lies after some query: mask per row
    for (Index r = 0; r < bq; ++r) {
      Eigen::Map<RowVector> row(probs.data() + r * block_k, bk);
      const Index visible = on_diagonal ? std::clamp<Index>(i0 + r - j0 + 1, 0, bk) : bk;
      if (visible == 0) {
        row.setZero();
        continue;
      }
      const Scalar old_max = s.row_max[r];
      const Scalar new_max = std::max(old_max, row.head(visible).maxCoeff());
      row.head(visible) = (row.head(visible).array() - new_max).exp();
      row.tail(bk - visible).setZero();
      if (new_max != old_max) {
        const Scalar rescale = std::exp(old_max - new_max);  // 0 on the first visible block
        s.row_sum[r] *= rescale;
        s.acc.row(r) *= rescale;
        s.row_max[r] = new_max;
      }
      s.row_sum[r] += row.head(visible).sum();
    }
    s.pv.template accumulate<Eigen::RowMajor, Eigen::RowMajor>(
        bq, head, bk, probs.data(), block_k, qkv + j0 * ld + 2 * head, ld, s.acc.data(), head);
  }

  Eigen::Map<Matrix> result(out + i0 * head, bq, head);
  result = s.acc.topRows(bq).array().colwise() / s.row_sum.head(bq).array();
}

/// The whole forward pass for `batch` sequences of `seq_len` rows stored back to back in x ([batch·seq_len,
/// emb], storage order XOrder, leading dimension x_stride). Writes out [batch·seq_len, head] row-major,
/// contiguous. Shapes are checked by the caller. threads: the most threads to use (>= 1).
template <int XOrder, typename Scalar>
void forward(const Scalar* x, Eigen::Index x_stride, Eigen::Index batch, Eigen::Index seq_len,
             const Linear<Scalar>& q, const Linear<Scalar>& k, const Linear<Scalar>& v, Scalar* out,
             int threads) {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Index rows = batch * seq_len;
  if (rows == 0) return;
  const Index emb = q.in_features();
  const Index head = q.out_features();
  const Index ld = 3 * head;

  // Q, K and V side by side, each row [q | k | v]: one buffer, one pass of GEMMs over the same rows of x.
  Matrix qkv(rows, ld);  // [rows, 3·head], the GEMMs accumulate onto the bias
  qkv.leftCols(head).rowwise() = q.bias.transpose();
  qkv.middleCols(head, head).rowwise() = k.bias.transpose();
  qkv.rightCols(head).rowwise() = v.bias.transpose();
  const Linear<Scalar>* const layers[3] = {&q, &k, &v};
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(head));

  const Index block_q = std::min(Tuning::query_block, seq_len);
  const Index block_k = std::min(Tuning::key_block, seq_len);
  const Index query_blocks = (seq_len + block_q - 1) / block_q;
  const Index items = batch * query_blocks;
  const double flops = 2.0 * static_cast<double>(rows) * static_cast<double>(emb) * static_cast<double>(ld) +
                       2.0 * static_cast<double>(batch) * static_cast<double>(seq_len) *
                           static_cast<double>(seq_len + 1) * static_cast<double>(head);
  if (flops < Tuning::serial_below_flops || in_parallel_region()) threads = 1;
  // Short inputs are cut into one row chunk per thread, so that every thread gets projection work.
  const Index proj_rows =
      std::min(Tuning::projection_rows, std::max<Index>(8, (rows + threads - 1) / threads));
  const Index proj_items = 3 * ((rows + proj_rows - 1) / proj_rows);  // (row chunk, projection) pairs
  threads = static_cast<int>(std::min<Index>(threads, std::max(items, proj_items)));
  (void)threads;  // unused without OpenMP

  HEAD_ATTENTION_OMP(parallel num_threads(threads) if (threads > 1)) {
    {
      // Each of Wq, Wk, Wv is read in place as the [emb, head] column-major matrix Wᵀ. Packing them into one
      // [emb, 3·head] operand for a single GEMM was measured slower: the copy costs 20% at the seed's B = 2,
      // T = 10 and gains nothing at large T, and a packed copy cannot be kept in sync with weights that
      // callers change through query()/key()/value() references.
      Gemm<Scalar> gemm(proj_rows, head, emb);
      HEAD_ATTENTION_OMP(for schedule(dynamic, 1))
      for (Index item = 0; item < proj_items; ++item) {
        const Index r0 = (item / 3) * proj_rows;
        const Index p = item % 3;
        const Index n = std::min(proj_rows, rows - r0);
        const Scalar* x_rows = XOrder == Eigen::RowMajor ? x + r0 * x_stride : x + r0;
        Scalar* qkv_rows = qkv.data() + r0 * ld + p * head;
        gemm.template accumulate<XOrder, Eigen::ColMajor>(n, head, emb, x_rows, x_stride,
                                                          layers[p]->weight.data(), emb, qkv_rows, ld);
        if (p == 0)
          Eigen::Map<Matrix, 0, Eigen::OuterStride<>>(qkv_rows, n, head, Eigen::OuterStride<>(ld)) *= scale;
      }
    }
    FlashScratch<Scalar> scratch(block_q, block_k, head);
    // Costliest items first (the last query blocks see the most keys), handed out one at a time.
    HEAD_ATTENTION_OMP(for schedule(dynamic, 1))
    for (Index item = 0; item < items; ++item) {
      const Index qb = query_blocks - 1 - item / batch;
      const Index b = item % batch;
      const Index i0 = qb * block_q;
      const Index bq = std::min(block_q, seq_len - i0);
      attend_query_block(qkv.data() + b * seq_len * ld, head, i0, bq, out + b * seq_len * head, scratch);
    }
  }
}

}  // namespace head_attention::detail

// head-attention: the fused forward pass. One GEMM for Q, K and V, then a tiled online-softmax
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
  static constexpr Eigen::Index query_block = 64;  // rows of Q per work item
  static constexpr Eigen::Index key_block = 256;  // rows of K and V per inner step; a multiple of query_block
  static constexpr Eigen::Index projection_rows = 256;  // rows of x per projection work item
  static constexpr double serial_below_flops =
      4e6;  // below this much work a forward call stays on one thread
};
static_assert(Tuning::key_block % Tuning::query_block == 0,
              "every visited key block must start at or before the "
              "first query of the block");

/// The three projections packed as one: rows [0, h) are Wq / sqrt(h), [h, 2h) Wk, [2h, 3h) Wv; the scale of
/// the scores is folded into Q. Packed per call (a copy of 3·h·emb scalars) so that weights changed through
/// query()/key()/value() always take effect.
template <typename Scalar>
struct PackedQkv {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  PackedQkv(const Linear<Scalar>& q, const Linear<Scalar>& k, const Linear<Scalar>& v)
      : weight(3 * q.out_features(), q.in_features()), bias(3 * q.out_features()) {
    const Eigen::Index h = q.out_features();
    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(h));
    weight.topRows(h) = q.weight * scale;
    weight.middleRows(h, h) = k.weight;
    weight.bottomRows(h) = v.weight;
    bias.head(h) = q.bias * scale;
    bias.segment(h, h) = k.bias;
    bias.tail(h) = v.bias;
  }

  Matrix weight;  // [3·head, emb]
  Vector bias;    // [3·head]
};

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

  const PackedQkv<Scalar> packed(q, k, v);
  Matrix qkv =
      packed.bias.transpose().replicate(rows, 1);  // [rows, 3·head], the GEMM accumulates onto the bias

  const Index block_q = std::min(Tuning::query_block, seq_len);
  const Index block_k = std::min(Tuning::key_block, seq_len);
  const Index query_blocks = (seq_len + block_q - 1) / block_q;
  const Index items = batch * query_blocks;
  const Index proj_rows = std::min(Tuning::projection_rows, rows);
  const Index proj_items = (rows + proj_rows - 1) / proj_rows;

  const double flops = 2.0 * static_cast<double>(rows) * static_cast<double>(emb) * static_cast<double>(ld) +
                       2.0 * static_cast<double>(batch) * static_cast<double>(seq_len) *
                           static_cast<double>(seq_len + 1) * static_cast<double>(head);
  if (flops < Tuning::serial_below_flops || in_parallel_region()) threads = 1;
  threads = static_cast<int>(std::min<Index>(threads, std::max(items, proj_items)));
  (void)threads;  // unused without OpenMP

  HEAD_ATTENTION_OMP(parallel num_threads(threads) if (threads > 1)) {
    {
      Gemm<Scalar> gemm(proj_rows, ld, emb);
      HEAD_ATTENTION_OMP(for schedule(static))
      for (Index c = 0; c < proj_items; ++c) {
        const Index r0 = c * proj_rows;
        const Index n = std::min(proj_rows, rows - r0);
        const Scalar* x_rows = XOrder == Eigen::RowMajor ? x + r0 * x_stride : x + r0;
        gemm.template accumulate<XOrder, Eigen::ColMajor>(n, ld, emb, x_rows, x_stride, packed.weight.data(),
                                                          emb, qkv.data() + r0 * ld, ld);
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

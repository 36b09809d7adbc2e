// head-attention: the fused forward pass. One projection pass for Q, K and V, then a tiled online-softmax
// (FlashAttention-2 style) causal attention over (sequence x query block) work items on all cores. Extra
// memory is O(T · head_size).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

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

/// Per-thread working storage for the attention loop, allocated before the parallel region (so that a
/// bad_alloc reaches the caller as an exception instead of terminating inside an OpenMP region).
template <typename Scalar>
struct FlashScratch {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  FlashScratch(Index block_q, Index block_k, Index head)
      : probs(block_q, block_k),
        acc(block_q, head),
        clean_values(block_k, head),
        row_max(block_q),
        row_sum(block_q),
        qk(block_q, block_k, head),
        pv(block_q, head, block_k) {}

  Matrix probs;         // [block_q, block_k] scores of one tile, then their exponentials
  Matrix acc;           // [block_q, head] un-normalised output
  Matrix clean_values;  // [block_k, head] a diagonal tile's V with its non-finite masked rows zeroed
  Vector row_max;       // [block_q] running max of each query's scores
  Vector row_sum;       // [block_q] running sum of exp(score - row_max)
  Gemm<Scalar> qk;      // probs = Q_tile · K_tileᵀ
  Gemm<Scalar> pv;      // acc += probs · V_tile
};

/// acc[bq, head] += probs[bq, bk] · V[j0 .. j0 + bk) for the diagonal tile of queries [i0, i0 + bq), where
/// probs is zero at every masked (query, key) pair. A GEMM multiplies those zeros by V rows the query cannot
/// see, and 0 · NaN or 0 · Inf is NaN: masked keys would leak into earlier outputs. So the masked rows of V
/// (keys after i0) that are not finite are zeroed in a copy for the GEMM, and added back afterwards only to
/// the queries that see them. With finite V this is the plain GEMM, and either way every output that cannot
/// see a key is bit-identical to what it would be if that key held any finite value.
template <typename Scalar>
void diagonal_tile_values(const Scalar* values, Eigen::Index ld, Eigen::Index head, Eigen::Index i0,
                          Eigen::Index j0, Eigen::Index bq, Eigen::Index bk, FlashScratch<Scalar>& s) noexcept {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  const Index block_k = s.probs.cols();
  const Eigen::Map<const Matrix, 0, Stride> v(values + j0 * ld, bk, head, Stride(ld));  // V of this tile
  const Index first_masked = i0 + 1 - j0;  // tile rows [first_masked, bk) are masked for some query
  if (v.bottomRows(bk - first_masked).allFinite()) {
    s.pv.template accumulate<Eigen::RowMajor, Eigen::RowMajor>(bq, head, bk, s.probs.data(), block_k,
                                                               v.data(), ld, s.acc.data(), head);
    return;
  }
  Eigen::Map<Matrix> clean(s.clean_values.data(), bk, head);
  clean = v;
  for (Index t = first_masked; t < bk; ++t)
    if (!v.row(t).allFinite()) clean.row(t).setZero();
  s.pv.template accumulate<Eigen::RowMajor, Eigen::RowMajor>(bq, head, bk, s.probs.data(), block_k,
                                                             clean.data(), head, s.acc.data(), head);
  for (Index t = first_masked; t < bk; ++t) {
    if (v.row(t).allFinite()) continue;
    for (Index r = j0 + t - i0; r < bq; ++r)  // the queries at or after key j0 + t
      s.acc.row(r) += s.probs(r, t) * v.row(t);
  }
}

/// Causal attention of queries [i0, i0 + bq) of one sequence. qkv: [T, 3·head] row-major with Q already
/// scaled; out: [T, head] row-major with leading dimension out_stride. Key blocks wholly above the diagonal
/// are never visited, and the last one is clamped to the keys these queries can see; only that one is masked,
/// and masked keys never reach an output. Never throws, never allocates.
template <typename Scalar>
void attend_query_block(const Scalar* qkv, Eigen::Index head, Eigen::Index i0, Eigen::Index bq, Scalar* out,
                        Eigen::Index out_stride, FlashScratch<Scalar>& s) noexcept {
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

    // Some key lies after some query: mask per row. Key blocks start on query-block boundaries at or
    // before i0, so every row sees at least its own key.
    const bool on_diagonal = j0 + bk - 1 > i0;
    for (Index r = 0; r < bq; ++r) {
      Eigen::Map<RowVector> row(probs.data() + r * block_k, bk);
      const Index visible = on_diagonal ? std::min<Index>(i0 + r - j0 + 1, bk) : bk;
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
    if (on_diagonal)
      diagonal_tile_values(qkv + 2 * head, ld, head, i0, j0, bq, bk, s);
    else
      s.pv.template accumulate<Eigen::RowMajor, Eigen::RowMajor>(
          bq, head, bk, probs.data(), block_k, qkv + j0 * ld + 2 * head, ld, s.acc.data(), head);
  }

  Eigen::Map<Matrix, 0, Eigen::OuterStride<>> result(out + i0 * out_stride, bq, head,
                                                      Eigen::OuterStride<>(out_stride));
  result = s.acc.topRows(bq).array().colwise() / s.row_sum.head(bq).array();
}

/// The size of the OpenMP team that the last forward call made on this thread ran on (1 for a serial call).
/// For tests, which check that the thread setting is what actually runs.
inline int& last_team_size() noexcept {
  thread_local int size = 0;
  return size;
}

/// The whole forward pass for `batch` sequences of `seq_len` rows stored back to back in x ([batch·seq_len,
/// emb], storage order XOrder, leading dimension x_stride). Writes out [batch·seq_len, head] row-major with
/// leading dimension out_stride. x is read completely before out is written. Shapes are checked by the caller.
/// threads: the most threads to use (>= 1).
template <int XOrder, typename Scalar>
void forward(const Scalar* x, Eigen::Index x_stride, Eigen::Index batch, Eigen::Index seq_len,
             const Linear<Scalar>& q, const Linear<Scalar>& k, const Linear<Scalar>& v, Scalar* out,
             Eigen::Index out_stride, int threads) {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Index rows = batch * seq_len;
  last_team_size() = 1;
  if (rows == 0) return;
  const Index emb = q.in_features();
  const Index head = q.out_features();
  const Index ld = 3 * head;

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

  // Everything is allocated here, before the parallel region: an exception thrown inside one terminates.
  // Q, K and V side by side, each row [q | k | v]: one buffer, one pass of GEMMs over the same rows of x.
  Matrix qkv(rows, ld);  // [rows, 3·head], the GEMMs accumulate onto the bias
  qkv.leftCols(head).rowwise() = q.bias.transpose();
  qkv.middleCols(head, head).rowwise() = k.bias.transpose();
  qkv.rightCols(head).rowwise() = v.bias.transpose();
  std::vector<Gemm<Scalar>> projection_gemm;
  std::vector<FlashScratch<Scalar>> scratch;
  projection_gemm.reserve(static_cast<std::size_t>(threads));
  scratch.reserve(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t) {
    projection_gemm.emplace_back(proj_rows, head, emb);
    scratch.emplace_back(block_q, block_k, head);
  }
  const Linear<Scalar>* const layers[3] = {&q, &k, &v};
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(head));

  HEAD_ATTENTION_OMP(parallel num_threads(threads) if (threads > 1)) {
    const std::size_t thread = static_cast<std::size_t>(thread_index());
    if (thread == 0) last_team_size() = team_size();  // the caller's own thread is the team's first
    // Each of Wq, Wk, Wv is read in place as the [emb, head] column-major matrix Wᵀ. Packing them into one
    // [emb, 3·head] operand for a single GEMM was measured slower: the copy costs 20% at the seed's B = 2,
    // T = 10 and gains nothing at large T, and a packed copy cannot be kept in sync with weights that
    // callers change through query()/key()/value() references.
    HEAD_ATTENTION_OMP(for schedule(dynamic, 1))
    for (Index item = 0; item < proj_items; ++item) {
      const Index r0 = (item / 3) * proj_rows;
      const Index p = item % 3;
      const Index n = std::min(proj_rows, rows - r0);
      const Scalar* x_rows = XOrder == Eigen::RowMajor ? x + r0 * x_stride : x + r0;
      Scalar* qkv_rows = qkv.data() + r0 * ld + p * head;
      projection_gemm[thread].template accumulate<XOrder, Eigen::ColMajor>(
          n, head, emb, x_rows, x_stride, layers[p]->weight.data(), emb, qkv_rows, ld);
      if (p == 0)
        Eigen::Map<Matrix, 0, Eigen::OuterStride<>>(qkv_rows, n, head, Eigen::OuterStride<>(ld)) *= scale;
    }
    // (The implicit barrier above: every projection is done before any attention item reads it.)
    // Costliest items first (the last query blocks see the most keys), handed out one at a time.
    HEAD_ATTENTION_OMP(for schedule(dynamic, 1))
    for (Index item = 0; item < items; ++item) {
      const Index qb = query_blocks - 1 - item / batch;
      const Index b = item % batch;
      const Index i0 = qb * block_q;
      const Index bq = std::min(block_q, seq_len - i0);
      attend_query_block(qkv.data() + b * seq_len * ld, head, i0, bq, out + b * seq_len * out_stride,
                         out_stride, scratch[thread]);
    }
  }
}

}  // namespace head_attention::detail

// head-attention: a decode query over a cache: its scores q · k_j for many short rows (a head's worth each),
// sixteen keys at a time with one transposed reduction for all sixteen, and over a float cache its softmax
// and values in the same pass.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "dotbf16.hpp"
#include "exp_sum.hpp"
#include "rowdot.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#define HEAD_ATTENTION_KEY_SCORES_16 1
#else
#define HEAD_ATTENTION_KEY_SCORES_16 0
#endif

namespace head_attention::detail {

#if HEAD_ATTENTION_KEY_SCORES_16

/// The lane sums of the 16 vectors a[0..15], as one vector: lane j = the sum of a[j]'s 16 lanes. A key row is
/// a few packets (a head of 64 floats: 4), so a horizontal sum per key cost about twice its multiply-adds;
/// this tree does 45 operations for 16 keys. Each sum's order is fixed by its lanes alone ((0 + 2) + (1 + 3)
/// within each 128-bit block, then blocks (0 + 1) + (2 + 3)), whatever the other vectors hold: a key's score
/// has the same bits in any group, and in a short group padded with zeros.
EIGEN_ALWAYS_INLINE __m512 lane_sums16(const __m512 (&a)[16]) noexcept {
  __m512 t[8], v[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [x0+x2, y0+y2, x1+x3, y1+y3] for x = a[2i], y = a[2i+1]
    t[i] =
        _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int m = 0; m < 4; ++m)  // per 128-bit block: keys 4m .. 4m+3, that block's part of each
    v[m] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * m], t[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * m], t[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int m = 0; m < 2; ++m)  // blocks 0 + 1 and 2 + 3 of v[2m], then of v[2m+1]
    w[m] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // Block b: keys 4b .. 4b+3, in order.
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/// f(std::integral_constant<int, P>{}) for the P in [1, Max] equal to `count`; false when there is none (the
/// kernels below take the number of packets of a key row as a template argument, so the query stays in
/// registers).
template <int Max, int P = 1, typename F>
bool with_packets(Eigen::Index count, F&& f) {
  if (count == P) {
    f(std::integral_constant<int, P>{});
    return true;
  }
  if constexpr (P < Max)
    return with_packets<Max, P + 1>(count, std::forward<F>(f));
  else
    return false;
}

/// scores[j] = the lane sum of key_dot(key j) for j < rows, key j at k + j · stride: 16 keys at a time, their
/// 16 vectors summed by lane_sums16. The keys are read one after the other, as stored (a packet of each of
/// the 16 keys in turn was 1.2x slower from L3). A short last group reads its last key again for the lanes
/// past it (never stored): with a fixed trip count the accumulators stay in registers.
template <typename T, typename KeyDot>
EIGEN_ALWAYS_INLINE __m512 group_scores16(const T* key, Eigen::Index stride, Eigen::Index count,
                                          KeyDot& key_dot) noexcept {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) {
    acc[j] = key_dot(key);
    if (j + 1 < count) key += stride;
  }
  return lane_sums16(acc);
}

template <typename T, typename KeyDot>
EIGEN_ALWAYS_INLINE void scores_by_16(const T* k, Eigen::Index stride, Eigen::Index rows, float* scores,
                                      KeyDot&& key_dot) noexcept {
  const auto group = [&](const T* key, Eigen::Index count, float* out) {
    _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << count) - 1u),
                          group_scores16(key, stride, count, key_dot));
  };
  Eigen::Index j = 0;
  for (; j + 16 <= rows; j += 16)
    group(k + j * stride, 16, scores + j);
  if (j < rows) group(k + j * stride, rows - j, scores + j);
}

/// The packets of q · key for a float key of 16 · P values (attend_keys'): one chain of fused multiply-adds
/// over its packets in order, the query held in registers.
template <int P>
struct FloatKeyDot {
  __m512 q[P];
  explicit FloatKeyDot(const float* query) noexcept {
    for (int p = 0; p < P; ++p)
      q[p] = _mm512_loadu_ps(query + 16 * p);
  }
  EIGEN_ALWAYS_INLINE __m512 operator()(const float* key) const noexcept {
    __m512 dot = _mm512_mul_ps(q[0], _mm512_loadu_ps(key));
    for (int p = 1; p < P; ++p)
      dot = _mm512_fmadd_ps(q[p], _mm512_loadu_ps(key + 16 * p), dot);
    return dot;
  }
};

#if HEAD_ATTENTION_DOT_BF16
/// scores_by_16 over bfloat16 keys with AVX512_BF16: the query split by split_bf16 (hi, and lo when Lo),
/// a head of 32 · P. Per key, one chain over its 32-entry steps in order, hi then lo in each (Lo = false
/// skips lo: the same bits for finite keys, as in dot_block_bf16).
template <int P, bool Lo>
void key_scores16_bf16(const std::uint16_t* hi, const std::uint16_t* lo, const std::uint16_t* k,
                       Eigen::Index stride, Eigen::Index rows, float* scores) noexcept {
  __m512bh qh[P], ql[P];
  for (int p = 0; p < P; ++p) {
    qh[p] = load_bf16x32(hi + 32 * p);
    if constexpr (Lo) ql[p] = load_bf16x32(lo + 32 * p);
  }
  scores_by_16(k, stride, rows, scores, [&](const std::uint16_t* key) {
    __m512 acc = _mm512_setzero_ps();
    for (int p = 0; p < P; ++p) {
      const __m512bh kv = load_bf16x32(key + 32 * p);
      acc = _mm512_dpbf16_ps(acc, qh[p], kv);
      if constexpr (Lo) acc = _mm512_dpbf16_ps(acc, ql[p], kv);
    }
    return acc;
  });
}

/// scores[j] = q · k_j for j < rows over bfloat16 keys (key j at k + j · stride), the query split by
/// split_bf16, 16 keys at a time: for heads of 32, 64, 96 or 128 (returns false for others, which the caller
/// takes elsewhere).
inline bool key_scores_bf16(const std::uint16_t* hi, const std::uint16_t* lo, bool lo_pass,
                            const std::uint16_t* k, Eigen::Index stride, Eigen::Index rows, Eigen::Index head,
                            float* scores) noexcept {
  const auto run = [&](auto packets, auto with_lo) {
    key_scores16_bf16<decltype(packets)::value, decltype(with_lo)::value>(hi, lo, k, stride, rows, scores);
  };
  if (head % 32 != 0) return false;
  return with_packets<4>(head / 32, [&](auto packets) {
    if (lo_pass)
      run(packets, std::true_type{});
    else
      run(packets, std::false_type{});
  });
}
#endif

/// One decode query's attention over `rows` keys and values (row j at k + j · stride and v + j · stride, a
/// head of 16 · PV values) in a single pass: per group of 16 keys, their scores (scores_by_16's groups),
/// their exponentials against the running max (the accumulator rescaled when the max grows), and those
/// weights times the 16 value rows. A step that scored all its keys first, then took their exponentials,
/// then read V, spent about a tenth of its time on the softmax between the two streams; here it runs while
/// the next rows load, and K and V are read side by side. Returns the largest score in *max, Σ exp(s − max)
/// in *sum and Σ exp(s − max) · v in acc[16 · PV], as attend_query_block keeps them (a range's partial
/// result). Scores that are all −inf or NaN give a NaN sum, as a softmax over them does; a −inf score among
/// others weighs 0 wherever it falls, and a NaN score makes the sum NaN.
template <int PV, typename T, typename KeyDot, typename ValuePacket>
EIGEN_ALWAYS_INLINE void attend_by_16(const T* k, const T* v, Eigen::Index stride, Eigen::Index rows,
                                      KeyDot&& key_dot, ValuePacket&& value_packet, float* max, float* sum,
                                      float* acc) noexcept {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  __m512 out[PV];
  for (int i = 0; i < PV; ++i)
    out[i] = _mm512_setzero_ps();
  __m512 sums = _mm512_setzero_ps();
  float running_max = neg_inf;
  bool unordered = false;  // a NaN among scores skipped while every score so far was -inf or NaN
  alignas(64) float weights[16];
  // One loop for full and short groups (a group as a lambda called twice was not inlined, and kept the
  // accumulators in memory). The next group's scores are taken before this group's values are read, so
  // that their loads and multiply-adds overlap this group's softmax and values (5-10% less time).
  const auto scores_at = [&](Eigen::Index j) {
    const Eigen::Index count = std::min<Eigen::Index>(16, rows - j);
    return _mm512_mask_mov_ps(_mm512_set1_ps(neg_inf), static_cast<__mmask16>((1u << count) - 1u),
                              group_scores16(k + j * stride, stride, count, key_dot));
  };
  __m512 next = scores_at(0);
  for (Eigen::Index j = 0; j < rows; j += 16) {
    const Eigen::Index count = std::min<Eigen::Index>(16, rows - j);
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1u);
    const __m512 scores = next;
    if (j + 16 < rows) next = scores_at(j + 16);
    const float group_max = _mm512_reduce_max_ps(scores);
    if (group_max > running_max) {                                               // false for NaN
      const __m512 rescale = _mm512_set1_ps(std::exp(running_max - group_max));  // 0 for the first
      for (int i = 0; i < PV; ++i)
        out[i] = _mm512_mul_ps(out[i], rescale);
      sums = _mm512_mul_ps(sums, rescale);
      running_max = group_max;
    } else if (running_max == neg_inf) {
      // Every score so far -inf or NaN: these weigh 0 against any later finite max (exp(-inf - max)), and
      // a NaN among them is remembered for the sum.
      unordered = unordered || _mm512_mask_cmp_ps_mask(live, scores, scores, _CMP_UNORD_Q) != 0;
      continue;
    }
    const __m512 p = exp_nonpositive(_mm512_sub_ps(scores, _mm512_set1_ps(running_max)));
    sums = _mm512_add_ps(sums, p);
    _mm512_store_ps(weights, p);
    const T* value = v + j * stride;
    for (Eigen::Index t = 0; t < count; ++t, value += stride) {
      const __m512 w = _mm512_set1_ps(weights[t]);
      for (int i = 0; i < PV; ++i)
        out[i] = _mm512_fmadd_ps(w, value_packet(value, i), out[i]);
    }
  }
  *max = running_max;
  *sum = running_max == neg_inf || unordered ? std::numeric_limits<float>::quiet_NaN()
                                             : _mm512_reduce_add_ps(sums);
  for (int i = 0; i < PV; ++i)
    _mm512_storeu_ps(acc + 16 * i, out[i]);
}

/// attend_by_16 over float keys and values, a head of 16 to 128 floats in steps of 16 (returns false for
/// others).
inline bool attend_keys(const float* q, const float* k, const float* v, Eigen::Index stride,
                        Eigen::Index rows, Eigen::Index head, float* max, float* sum, float* acc) noexcept {
  const auto run = [&](auto packets) {
    constexpr int P = decltype(packets)::value;
    attend_by_16<P>(
        k, v, stride, rows, FloatKeyDot<P>(q),
        [](const float* row, int i) { return _mm512_loadu_ps(row + 16 * i); }, max, sum, acc);
  };
  return head % 16 == 0 && with_packets<8>(head / 16, run);
}

#endif  // HEAD_ATTENTION_KEY_SCORES_16

/// scores[j] = q · key_j for the `rows` keys at k (key j's `head` values at k + j · head): a decode step's
/// Q·Kᵀ over a cache, each key read once in place (Eigen's GEMM packs the tile first: one more pass over it,
/// which measured 1.4-1.7x a step's bytes floor once a cache left L2): project_rows's dot products, 8 keys (4
/// with 16 registers) at a time, so a key's score never depends on where a range of keys starts. (Float keys
/// with AVX-512 and a head of 16 to 128 in steps of 16 take attend_keys instead, scores and all.)
template <typename Scalar>
void dot_keys(const Scalar* q, const Scalar* k, Eigen::Index rows, Eigen::Index head,
              Scalar* scores) noexcept {
  constexpr Eigen::Index G = simd_registers == 32 ? 8 : 4;
  for (Eigen::Index j = 0; j < rows; j += G)
    dot_rows<1, G, Scalar, precision_of<Scalar>()>(std::min(G, rows - j), q, 0, k + j * head, head,
                                                   scores + j, G);
}

}  // namespace head_attention::detail

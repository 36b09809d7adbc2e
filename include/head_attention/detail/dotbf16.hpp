// head-attention: dot products of float rows with bfloat16 rows through AVX512_BF16's vdpbf16ps, the float
// row split into two bfloat16 rows (hi + lo) so that it keeps ~16 bits of its 24.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <Eigen/Core>

#include "microkernel.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define HEAD_ATTENTION_DOT_BF16 1
#else
#define HEAD_ATTENTION_DOT_BF16 0
#endif

namespace head_attention::detail {

#if defined(__AVX512F__)
/// Lane i < 8: the sum of a[i]'s 16 lanes, added in _mm512_reduce_add_ps's order (lanes j and j + 8, then
/// j and j + 4, then j and j + 2, then the two left), so the same bits as eight reduce_adds (and as Eigen's
/// predux of a Packet16f with AVX512DQ). All eight at once: 24 instructions, where eight reduce_adds take 64
/// and end a block of dot products with eight chains of four dependent shuffles and adds each.
EIGEN_ALWAYS_INLINE __m256 lane_sums8(const __m512 (&a)[8]) noexcept {
  __m512 h[4], q[2];
  for (int j = 0; j < 4; ++j)  // 128-bit blocks: [a[2j] lanes j + (j+8), j < 8 | a[2j+1] likewise]
    h[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                         _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)));
  for (int m = 0; m < 2; ++m)  // block b: a[4m + b]'s lanes j + (j+8) + (j+4) + (j+12), j < 4
    q[m] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * m], h[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                         _mm512_shuffle_f32x4(h[2 * m], h[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)));
  // Block b: [a[b]'s partials 0 + 2, 1 + 3, a[4 + b]'s likewise], then each pair added.
  const __m512d q0 = _mm512_castps_pd(q[0]), q1 = _mm512_castps_pd(q[1]);
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(q0, q1)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(q0, q1)));
  const __m512 r = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(2, 3, 0, 1)));
  // a[b] at lane 4b, a[4 + b] at lane 4b + 2.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, r));
}
#endif

#if HEAD_ATTENTION_DOT_BF16

/// Rows of x up to this many entries are split on the stack (2 · 2 bytes an entry per row, a call splits
/// as many rows as fit): longer rows take the widening FMA path instead (the choice depends on the row
/// length only, so an output's bits still depend on its x row and weight row alone).
inline constexpr Eigen::Index bf16_split_entries = 4096;

/// Room for a split row of n entries: n rounded up to vdpbf16ps's 32, zero-padded.
inline constexpr Eigen::Index bf16_split_stride(Eigen::Index n) noexcept {
  return (n + 31) / 32 * 32;
}

/// x[0, n) as hi[k] = bf16(x[k]) (round to nearest even) and lo[k] = bf16(x[k] - hi[k]), both zero-padded
/// to bf16_split_stride(n): hi + lo holds x to about 2^-16 of its magnitude (hi's error, at most 2^-8 |x|,
/// rounded again to 8 bits), far below a 16-bit output's 2^-9, and each product with a bfloat16 weight is
/// exact in float, so x · w keeps the semantics of float arithmetic on 16-bit data. x beyond bfloat16's
/// largest finite value (and ±inf) gets hi = ±that largest value and the rest in lo (±inf for inf), so
/// hi · w + lo · w is ±inf or NaN where x · w is (with a finite x, hi alone would round up to inf). A NaN
/// stays NaN. Denormals become zero (vcvtneps2bf16 and vdpbf16ps treat them as zero: DAZ / FTZ),
/// below 1.2e-38 in magnitude. Returns whether some lo is not zero (false when x is bfloat16 already, so that
/// its lo pass can be skipped: see dot_block_bf16).
inline bool split_bf16(const float* x, Eigen::Index n, std::uint16_t* hi, std::uint16_t* lo) noexcept {
  const __m512 largest = _mm512_set1_ps(3.38953139e38f);  // 0x7f7f: bfloat16's largest finite value
  const __m512 neg_largest = _mm512_set1_ps(-3.38953139e38f);
  __m256i any = _mm256_setzero_si256();
  const Eigen::Index padded = bf16_split_stride(n);
  for (Eigen::Index k = 0; k < padded; k += 16) {
    const Eigen::Index left = std::clamp<Eigen::Index>(n - k, 0, 16);
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    // max / min return their second operand when either is NaN: a NaN passes through.
    const __m512 clamped = _mm512_min_ps(largest, _mm512_max_ps(neg_largest, v));
    const __m256bh h = _mm512_cvtneps_pbh(clamped);
    const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, _mm512_cvtpbh_ps(h)));
    __m256i hb, lb;
    std::memcpy(&hb, &h, sizeof hb);
    std::memcpy(&lb, &l, sizeof lb);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), hb);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k), lb);
    any = _mm256_or_si256(any, lb);
  }
  return !_mm256_testz_si256(any, any);
}

/// 32 bfloat16 values at p.
EIGEN_ALWAYS_INLINE __m512bh load_bf16x32(const std::uint16_t* p) noexcept {
  const __m512i v = _mm512_loadu_si512(p);
  __m512bh r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

/// The first `count` < 32 bfloat16 values at p, zeros after (nothing read past them).
EIGEN_ALWAYS_INLINE __m512bh load_bf16x32(const std::uint16_t* p, Eigen::Index count) noexcept {
  const __mmask32 m = static_cast<__mmask32>((std::uint64_t(1) << count) - 1u);
  const __m512i v = _mm512_maskz_loadu_epi16(m, p);
  __m512bh r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

/// sums[r · lds + i] = x_r · w_i for the R rows x_r split by split_bf16 (hi at hi + r · ldx, lo likewise, ldx
/// at least bf16_split_stride(in)) and the G bfloat16 rows w_i at w + i · ldw, `in` entries each. Each sum
/// is the same chain whatever R and G are: hi · w and lo · w in accumulators of their own, 32 products per
/// vdpbf16ps (lane j sums entries 2j and 2j + 1), added and reduced at the end (lane_sums8). Lo = false skips
/// the lo pass: for rows whose lo is all zero that gives the same bits with finite weights, since its
/// accumulator then stays +0 either way (0 · w summed into +0 is +0; an infinite weight would give NaN
/// there).
template <int R, int G, bool Lo>
void dot_block_bf16(const std::uint16_t* hi, const std::uint16_t* lo, Eigen::Index ldx,
                    const std::uint16_t* w, Eigen::Index ldw, Eigen::Index in, float* sums,
                    Eigen::Index lds) noexcept {
  using Index = Eigen::Index;
  __m512 acc_hi[R][G], acc_lo[R][G];
  HEAD_ATTENTION_UNROLL
  for (int r = 0; r < R; ++r)
    HEAD_ATTENTION_UNROLL
  for (int i = 0; i < G; ++i)
    acc_hi[r][i] = acc_lo[r][i] = _mm512_setzero_ps();
  const auto step = [&](Index k, Index count) {
    __m512bh xh[R], xl[R];
    HEAD_ATTENTION_UNROLL
    for (int r = 0; r < R; ++r) {
      xh[r] = load_bf16x32(hi + r * ldx + k);  // zero-padded: whole loads
      if constexpr (Lo) xl[r] = load_bf16x32(lo + r * ldx + k);
    }
    HEAD_ATTENTION_UNROLL
    for (int i = 0; i < G; ++i) {
      // The next block's row i, where the loop will want it: weights stream from L3 at this speed (a hint,
      // never a fault past the end). Medians on Zen 4, 2048 rows of 512 (2 MB) by blocks of 32: 38.1 us
      // against 40.3 without (55 against 52 GB/s); 16 or 32 rows ahead: 44, 47 us.
      _mm_prefetch(reinterpret_cast<const char*>(w + (G + i) * ldw + k), _MM_HINT_T0);
      const __m512bh wv = count == 32 ? load_bf16x32(w + i * ldw + k) : load_bf16x32(w + i * ldw + k, count);
      HEAD_ATTENTION_UNROLL
      for (int r = 0; r < R; ++r) {
        acc_hi[r][i] = _mm512_dpbf16_ps(acc_hi[r][i], xh[r], wv);
        if constexpr (Lo) acc_lo[r][i] = _mm512_dpbf16_ps(acc_lo[r][i], xl[r], wv);
      }
    }
  };
  Index k = 0;
  for (; k + 32 <= in; k += 32)
    step(k, 32);
  if (k < in) step(k, in - k);
  HEAD_ATTENTION_UNROLL
  for (int r = 0; r < R; ++r) {
    __m512 total[8];
    HEAD_ATTENTION_UNROLL
    for (int i = 0; i < 8; ++i)
      total[i] = _mm512_setzero_ps();
    HEAD_ATTENTION_UNROLL
    for (int i = 0; i < G; ++i)
      total[i] = _mm512_add_ps(acc_hi[r][i], acc_lo[r][i]);
    _mm256_mask_storeu_ps(sums + r * lds, static_cast<__mmask8>((1u << G) - 1u), lane_sums8(total));
  }
}

/// dot_block_bf16 over g <= G rows of w (g known at run time only), lo pass or not.
template <int R, int G>
void dot_rows_bf16(Eigen::Index g, bool lo_pass, const std::uint16_t* hi, const std::uint16_t* lo,
                   Eigen::Index ldx, const std::uint16_t* w, Eigen::Index ldw, Eigen::Index in, float* sums,
                   Eigen::Index lds) noexcept {
  if constexpr (G > 1) {
    if (g < G) {
      dot_rows_bf16<R, G - 1>(g, lo_pass, hi, lo, ldx, w, ldw, in, sums, lds);
      return;
    }
  }
  if (lo_pass)
    dot_block_bf16<R, G, true>(hi, lo, ldx, w, ldw, in, sums, lds);
  else
    dot_block_bf16<R, G, false>(hi, lo, ldx, w, ldw, in, sums, lds);
}

#endif  // HEAD_ATTENTION_DOT_BF16

}  // namespace head_attention::detail

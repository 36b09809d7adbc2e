// head-attention: a decode step over keys and values stored in 16 bits, converted in registers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "../precision.hpp"
#include "dotbf16.hpp"
#include "keyscores.hpp"

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define HEAD_ATTENTION_FUSED_16BIT 1
#else
#define HEAD_ATTENTION_FUSED_16BIT 0
#endif

namespace head_attention::detail {

/// Whether one query's scores and weighted sum can read 16-bit keys and values directly: a float layer, a
/// float16 or bfloat16 cache, head a multiple of 8, and a build for AVX2 + F16C + FMA (-march=haswell or
/// later). A decode step reads every key once: converting a tile into scratch and reading it again there
/// costs more than the dot products (measured 2x a float cache's time), converting in registers costs
/// nothing. Elsewhere tiles are converted (detail::convert_rows) and Eigen's kernels run on them.
template <typename Scalar>
constexpr bool fused_16bit(Precision keys, Eigen::Index head) {
  return HEAD_ATTENTION_FUSED_16BIT && std::is_same<Scalar, float>::value &&
         (keys == Precision::float16 || keys == Precision::bfloat16) && head % 8 == 0;
}

#if HEAD_ATTENTION_FUSED_16BIT

/// 8 stored 16-bit values at p, widened to float.
template <Precision P>
inline __m256 load8(const std::uint16_t* p) noexcept {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (P == Precision::float16)
    return _mm256_cvtph_ps(bits);
  else
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

/// scores[j] = q · key_j for j in [0, rows), key j's `head` values at keys + j · stride. Four keys at a time,
/// one reduction for the four; a last group of fewer reads its last key again for the rest (not stored), so
/// that a key's score is the same bits in any group, wherever its range of keys starts.
template <Precision P>
void dot_rows16(const float* q, const std::uint16_t* keys, Eigen::Index stride, Eigen::Index rows,
                Eigen::Index head, float* scores) noexcept {
  for (Eigen::Index j = 0; j < rows; j += 4) {
    const Eigen::Index n = std::min<Eigen::Index>(4, rows - j);
    const std::uint16_t* k0 = keys + j * stride;
    const std::uint16_t* k1 = keys + (j + std::min<Eigen::Index>(1, n - 1)) * stride;
    const std::uint16_t* k2 = keys + (j + std::min<Eigen::Index>(2, n - 1)) * stride;
    const std::uint16_t* k3 = keys + (j + std::min<Eigen::Index>(3, n - 1)) * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (Eigen::Index d = 0; d < head; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qd, load8<P>(k0 + d), a0);
      a1 = _mm256_fmadd_ps(qd, load8<P>(k1 + d), a1);
      a2 = _mm256_fmadd_ps(qd, load8<P>(k2 + d), a2);
      a3 = _mm256_fmadd_ps(qd, load8<P>(k3 + d), a3);
    }
    // [a0 a1 a2 a3] summed lane-wise: two horizontal adds give each row's halves, the last add joins them.
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    alignas(16) float four[4];
    _mm_store_ps(four, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    std::copy_n(four, n, scores + j);
  }
}

/// acc[0, head) += Σ_j weights[j] · value_j over j in [0, rows), value j at values + j · stride.
template <Precision P>
void weighted_rows16(const float* weights, const std::uint16_t* values, Eigen::Index stride,
                     Eigen::Index rows, Eigen::Index head, float* acc) noexcept {
  Eigen::Index d = 0;
#if defined(__AVX512F__)
  // 64 outputs at a time in 512-bit registers: each output's sum is the same chain of FMAs as below (the
  // same bits), with half the instructions and, for a head of 64, one pass over the rows instead of two
  // (each pass waits on its FMA chains: 11% of a bfloat16 step's profile at n = 1024 with 256 bits).
  const auto load16 = [](const std::uint16_t* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (P == Precision::float16)
      return _mm512_cvtph_ps(bits);
    else
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  };
  if constexpr (P == Precision::bfloat16) {
    // bfloat16 values widen without a shuffle: a 32-bit lane holds entries 2i (low half) and 2i + 1 (high
    // half), so a shift gives the even entries as floats and a mask the odd ones. The accumulators hold the
    // outputs split into even and odd (split on entry, joined on exit): the same chains of FMAs, the same
    // bits. Widening by vpmovzxwd (a 512-bit shuffle) bound this loop to about 65 GB/s from L3 on Zen 4.
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i high = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    for (; d + 64 <= head; d += 64) {
      const __m512 a0 = _mm512_loadu_ps(acc + d), a1 = _mm512_loadu_ps(acc + d + 16);
      const __m512 a2 = _mm512_loadu_ps(acc + d + 32), a3 = _mm512_loadu_ps(acc + d + 48);
      __m512 e0 = _mm512_permutex2var_ps(a0, even, a1), o0 = _mm512_permutex2var_ps(a0, odd, a1);
      __m512 e1 = _mm512_permutex2var_ps(a2, even, a3), o1 = _mm512_permutex2var_ps(a2, odd, a3);
      for (Eigen::Index j = 0; j < rows; ++j) {
        const __m512 w = _mm512_set1_ps(weights[j]);
        const std::uint16_t* v = values + j * stride + d;
        const __m512i v0 = _mm512_loadu_si512(v), v1 = _mm512_loadu_si512(v + 32);
        e0 = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), e0);
        o0 = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_and_si512(v0, high_half)), o0);
        e1 = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), e1);
        o1 = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_and_si512(v1, high_half)), o1);
      }
      _mm512_storeu_ps(acc + d, _mm512_permutex2var_ps(e0, low, o0));
      _mm512_storeu_ps(acc + d + 16, _mm512_permutex2var_ps(e0, high, o0));
      _mm512_storeu_ps(acc + d + 32, _mm512_permutex2var_ps(e1, low, o1));
      _mm512_storeu_ps(acc + d + 48, _mm512_permutex2var_ps(e1, high, o1));
    }
  }
  for (; d + 64 <= head; d += 64) {
    __m512 o0 = _mm512_loadu_ps(acc + d), o1 = _mm512_loadu_ps(acc + d + 16);
    __m512 o2 = _mm512_loadu_ps(acc + d + 32), o3 = _mm512_loadu_ps(acc + d + 48);
    for (Eigen::Index j = 0; j < rows; ++j) {
      const __m512 w = _mm512_set1_ps(weights[j]);
      const std::uint16_t* v = values + j * stride + d;
      o0 = _mm512_fmadd_ps(w, load16(v), o0);
      o1 = _mm512_fmadd_ps(w, load16(v + 16), o1);
      o2 = _mm512_fmadd_ps(w, load16(v + 32), o2);
      o3 = _mm512_fmadd_ps(w, load16(v + 48), o3);
    }
    _mm512_storeu_ps(acc + d, o0);
    _mm512_storeu_ps(acc + d + 16, o1);
    _mm512_storeu_ps(acc + d + 32, o2);
    _mm512_storeu_ps(acc + d + 48, o3);
  }
#endif
  for (; d + 32 <= head; d += 32) {  // 32 outputs stay in registers over all rows
    __m256 o0 = _mm256_loadu_ps(acc + d), o1 = _mm256_loadu_ps(acc + d + 8);
    __m256 o2 = _mm256_loadu_ps(acc + d + 16), o3 = _mm256_loadu_ps(acc + d + 24);
    for (Eigen::Index j = 0; j < rows; ++j) {
      const __m256 w = _mm256_set1_ps(weights[j]);
      const std::uint16_t* v = values + j * stride + d;
      o0 = _mm256_fmadd_ps(w, load8<P>(v), o0);
      o1 = _mm256_fmadd_ps(w, load8<P>(v + 8), o1);
      o2 = _mm256_fmadd_ps(w, load8<P>(v + 16), o2);
      o3 = _mm256_fmadd_ps(w, load8<P>(v + 24), o3);
    }
    _mm256_storeu_ps(acc + d, o0);
    _mm256_storeu_ps(acc + d + 8, o1);
    _mm256_storeu_ps(acc + d + 16, o2);
    _mm256_storeu_ps(acc + d + 24, o3);
  }
  for (; d < head; d += 8) {
    __m256 o = _mm256_loadu_ps(acc + d);
    for (Eigen::Index j = 0; j < rows; ++j)
      o = _mm256_fmadd_ps(_mm256_set1_ps(weights[j]), load8<P>(values + j * stride + d), o);
    _mm256_storeu_ps(acc + d, o);
  }
}

#endif  // HEAD_ATTENTION_FUSED_16BIT

/// dot_rows16 for keys stored in `precision` (float16 or bfloat16), when fused_16bit<Scalar> allows it (a
/// no-op otherwise, never called).
template <typename Scalar>
void dot_rows16(Precision precision, const Scalar* q, const void* keys, Eigen::Index stride,
                Eigen::Index rows, Eigen::Index head, Scalar* scores) noexcept {
#if HEAD_ATTENTION_FUSED_16BIT
  if constexpr (std::is_same<Scalar, float>::value) {
    const std::uint16_t* k = static_cast<const std::uint16_t*>(keys);
#if HEAD_ATTENTION_DOT_BF16
    // bfloat16 keys and AVX512_BF16: the query split into bfloat16 hi + lo once, then vdpbf16ps over the
    // keys in place (see split_bf16 for the precision), 16 keys at a time with one reduction for all of them
    // for heads of 32 to 128 (key_scores_bf16), else 8 at a time (project_rows's kernel).
    constexpr Eigen::Index max_head = 1024;
    if (precision == Precision::bfloat16 && head <= max_head) {
      alignas(64) std::uint16_t hi[max_head], lo[max_head];
      const bool lo_pass = split_bf16(q, head, hi, lo);
      if (key_scores_bf16(hi, lo, lo_pass, k, stride, rows, head, scores)) return;
      for (Eigen::Index j = 0; j < rows; j += 8)
        dot_rows_bf16<1, 8>(std::min<Eigen::Index>(8, rows - j), lo_pass, hi, lo, 0, k + j * stride, stride,
                            head, scores + j, 8);
      return;
    }
#endif
    if (precision == Precision::float16)
      dot_rows16<Precision::float16>(q, k, stride, rows, head, scores);
    else
      dot_rows16<Precision::bfloat16>(q, k, stride, rows, head, scores);
    return;
  }
#endif
  (void)precision, (void)q, (void)keys, (void)stride, (void)rows, (void)head, (void)scores;
}

/// weighted_rows16 for values stored in `precision` (float16 or bfloat16), when fused_16bit<Scalar> allows
/// it (a no-op otherwise, never called).
template <typename Scalar>
void weighted_rows16(Precision precision, const Scalar* weights, const void* values, Eigen::Index stride,
                     Eigen::Index rows, Eigen::Index head, Scalar* acc) noexcept {
#if HEAD_ATTENTION_FUSED_16BIT
  if constexpr (std::is_same<Scalar, float>::value) {
    const std::uint16_t* v = static_cast<const std::uint16_t*>(values);
    if (precision == Precision::float16)
      weighted_rows16<Precision::float16>(weights, v, stride, rows, head, acc);
    else
      weighted_rows16<Precision::bfloat16>(weights, v, stride, rows, head, acc);
    return;
  }
#endif
  (void)precision, (void)weights, (void)values, (void)stride, (void)rows, (void)head, (void)acc;
}

}  // namespace head_attention::detail

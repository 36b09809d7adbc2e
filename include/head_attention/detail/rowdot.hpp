// head-attention: y = (x · Wᵀ + b) · s over a few rows of x, reading W as a layer stores it ([out, in] rows,
// float, double or 16 bits): the projections of a decode step, with no weight preparation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "../precision.hpp"
#include "dotbf16.hpp"
#include "gemm.hpp"
#include "microkernel.hpp"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
#include <immintrin.h>
#endif

namespace head_attention::detail {

/// One nn.Linear as stored: its weight [out, in] (row o at weight + o · in) and bias [out], each in its own
/// precision (a layer's own type; a packed form's copy of it). Unscaled: the query's 1/sqrt(head) is applied
/// to the results (project_rows's scale), so that a layer's rows and a packed copy of them give the same
/// bits.
struct WeightRows {
  const void* weight = nullptr;
  Precision weight_precision = Precision::float32;
  const void* bias = nullptr;
  Precision bias_precision = Precision::float32;
};

/// Rows of x already split by split_bf16 (AVX512_BF16 builds): row r's hi at bits + r · ld, its lo at
/// bits + r · ld + stride, lo_pass[r] what split_bf16 returned for it. A call's x split once for all its
/// blocks of weight rows, where project_rows would split it again for each.
struct SplitRows {
  const std::uint16_t* bits = nullptr;
  Eigen::Index ld = 0, stride = 0;
  const bool* lo_pass = nullptr;
};

/// v widened (exactly) to Scalar: 16-bit values through float.
template <typename Scalar, typename T>
EIGEN_ALWAYS_INLINE Scalar widened(T v) noexcept {
  if constexpr (std::is_same<T, Eigen::half>::value || std::is_same<T, Eigen::bfloat16>::value)
    return static_cast<Scalar>(static_cast<float>(v));
  else
    return static_cast<Scalar>(v);
}

/// Entry i of the `precision` values at p, widened (exactly) to Scalar.
template <typename Scalar>
Scalar stored_value(Precision precision, const void* p, Eigen::Index i) noexcept {
  switch (precision) {
    case Precision::float64:
      return widened<Scalar>(static_cast<const double*>(p)[i]);
    case Precision::float32:
      return widened<Scalar>(static_cast<const float*>(p)[i]);
    case Precision::float16:
      return widened<Scalar>(static_cast<const Eigen::half*>(p)[i]);
    case Precision::bfloat16:
      return widened<Scalar>(static_cast<const Eigen::bfloat16*>(p)[i]);
  }
  return Scalar(0);
}

/// A packet of weights at w (stored as W: Scalar itself, or the bits of 16-bit values in precision P)
/// widened to Scalar's packet: in registers for float with AVX-512 or AVX2 + F16C, through a small buffer
/// elsewhere (the portable path; exact either way, so every path gives the same value).
template <typename Scalar, Precision P, typename W>
EIGEN_ALWAYS_INLINE SimdPacket<Scalar> load_weights(const W* w) noexcept {
  using Packet = SimdPacket<Scalar>;
  if constexpr (std::is_same<W, Scalar>::value) {
    return Eigen::internal::ploadu<Packet>(w);
  } else {
#if defined(__AVX512F__)
    if constexpr (simd_width<Scalar> == 16) {  // Packet16f
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      if constexpr (P == Precision::float16)
        return _mm512_cvtph_ps(bits);
      else
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
#endif
#if defined(__AVX2__) && defined(__F16C__)
    if constexpr (simd_width<Scalar> == 8) {  // Packet8f
      const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
      if constexpr (P == Precision::float16)
        return _mm256_cvtph_ps(bits);
      else
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    }
#endif
    constexpr int n = simd_width<Scalar>;
    Scalar wide[n];
    if constexpr (P == Precision::float16)
      half_to_float(w, wide, n);
    else
      bfloat16_to_float(w, wide, n);
    return Eigen::internal::ploadu<Packet>(wide);
  }
}

/// Weight w[k] (as load_weights stores it) widened to Scalar.
template <typename Scalar, Precision P, typename W>
Scalar weight_value(const W* w, Eigen::Index k) noexcept {
  if constexpr (std::is_same<W, Scalar>::value)
    return w[k];
  else
    return stored_value<Scalar>(P, w, k);
}

/// Pins p to a register from here on. With several rows of x (R > 1) and float or double weights, GCC 12
/// otherwise folds the loads of x and of the weights into every FMA that reads them (two loads per FMA),
/// which defeats the sharing dot_block is built on. Medians on Zen 4, 2048 float weight rows of 512 (4 MB)
/// and 2 / 4 / 8 rows of x: 0.72 / 0.80 / 0.69 of the time without (AVX-512; 256 rows, in L2: 0.58 / 0.57 /
/// 0.56), AVX2: 0.85 / 0.76 / 0.71 (bench/results/rowdot_rows.txt). Not for 16-bit weights (widened in
/// registers, not folded): pinning x there gained in L2 (0.73) but lost from L3 (1.04 to 1.07). An empty
/// asm: no instruction, no change to any value or to the order of any sum.
template <typename Packet>
EIGEN_ALWAYS_INLINE void keep_in_register(Packet& p) noexcept {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
  __asm__("" : "+v"(p));
#else
  (void)p;
#endif
}

/// sums[r · lds + i] = x_r · w_i (`in` products) for the R rows x_r of x (at x + r · ldx) and the G weight
/// rows w_i at w + i · in. Each sum is the same chain whatever R and G are and whichever block a row falls
/// in: two packet accumulators (even and odd packets, for the FMA latency), added and reduced, then the last
/// in % W products one at a time. Each load of x serves G weight rows, each load of a weight R rows of x.
template <int R, int G, typename Scalar, Precision P, typename W>
void dot_block(const Scalar* x, Eigen::Index ldx, const W* w, Eigen::Index in, Scalar* sums,
               Eigen::Index lds) noexcept {
  using Index = Eigen::Index;
  Index k = 0;
  if constexpr (gemm_uses_eigen_internals && simd_width < Scalar >> 1) {
    using namespace Eigen::internal;
    using Packet = SimdPacket<Scalar>;
    constexpr Index Wd = simd_width<Scalar>;
    Packet even[R][G], odd[R][G];
    HEAD_ATTENTION_UNROLL
    for (int r = 0; r < R; ++r)
      HEAD_ATTENTION_UNROLL
    for (int i = 0; i < G; ++i)
      even[r][i] = odd[r][i] = pset1<Packet>(Scalar(0));
    for (; k + 2 * Wd <= in; k += 2 * Wd) {
      Packet x0[R], x1[R];
      HEAD_ATTENTION_UNROLL
      for (int r = 0; r < R; ++r) {
        x0[r] = ploadu<Packet>(x + r * ldx + k);
        x1[r] = ploadu<Packet>(x + r * ldx + k + Wd);
        if constexpr (R > 1 && std::is_same<W, Scalar>::value) {
          keep_in_register(x0[r]);
          keep_in_register(x1[r]);
        }
      }
      HEAD_ATTENTION_UNROLL
      for (int i = 0; i < G; ++i) {
        Packet w0 = load_weights<Scalar, P>(w + i * in + k);
        Packet w1 = load_weights<Scalar, P>(w + i * in + k + Wd);
        if constexpr (R > 1 && std::is_same<W, Scalar>::value) {
          keep_in_register(w0);
          keep_in_register(w1);
        }
        HEAD_ATTENTION_UNROLL
        for (int r = 0; r < R; ++r) {
          even[r][i] = pmadd(x0[r], w0, even[r][i]);
          odd[r][i] = pmadd(x1[r], w1, odd[r][i]);
        }
      }
    }
    if (k + Wd <= in) {
      HEAD_ATTENTION_UNROLL
      for (int i = 0; i < G; ++i) {
        const Packet w0 = load_weights<Scalar, P>(w + i * in + k);
        HEAD_ATTENTION_UNROLL
        for (int r = 0; r < R; ++r)
          even[r][i] = pmadd(ploadu<Packet>(x + r * ldx + k), w0, even[r][i]);
      }
      k += Wd;
    }
#if defined(__AVX512F__)
    if constexpr (std::is_same<Scalar, float>::value && Wd == 16 && R * G <= 8) {
      // All R · G sums by one transposed reduction (lane_sums8: predux's order, the same bits).
      __m512 total[8];
      HEAD_ATTENTION_UNROLL
      for (int j = 0; j < 8; ++j)
        total[j] = _mm512_setzero_ps();
      HEAD_ATTENTION_UNROLL
      for (int r = 0; r < R; ++r)
        HEAD_ATTENTION_UNROLL
      for (int i = 0; i < G; ++i)
        total[r * G + i] = padd(even[r][i], odd[r][i]);
      alignas(32) float all[8];
      _mm256_store_ps(all, lane_sums8(total));
      HEAD_ATTENTION_UNROLL
      for (int r = 0; r < R; ++r)
        HEAD_ATTENTION_UNROLL
      for (int i = 0; i < G; ++i)
        sums[r * lds + i] = all[r * G + i];
    } else
#endif
    {
      HEAD_ATTENTION_UNROLL
      for (int r = 0; r < R; ++r)
        HEAD_ATTENTION_UNROLL
      for (int i = 0; i < G; ++i)
        sums[r * lds + i] = predux(padd(even[r][i], odd[r][i]));
    }
  } else {
    // Portable: Eigen's dot product, vectorised as Eigen sees fit (the same for every row of one length).
    using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
    for (int r = 0; r < R; ++r) {
      const Eigen::Map<const RowVector> xs(x + r * ldx, in);
      for (int i = 0; i < G; ++i) {
        if constexpr (std::is_same<W, Scalar>::value) {
          sums[r * lds + i] = xs.dot(Eigen::Map<const RowVector>(w + i * in, in));
        } else {
          using Stored = std::conditional_t<P == Precision::float16, Eigen::half, Eigen::bfloat16>;
          using StoredRow = Eigen::Matrix<Stored, 1, Eigen::Dynamic>;
          sums[r * lds + i] =
              xs.dot(Eigen::Map<const StoredRow>(reinterpret_cast<const Stored*>(w + i * in), in)
                         .template cast<Scalar>());
        }
      }
    }
    k = in;
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < G; ++i)
      for (Index t = k; t < in; ++t)
        sums[r * lds + i] =
            std::fma(x[r * ldx + t], weight_value<Scalar, P>(w + i * in, t), sums[r * lds + i]);
}

/// dot_block over g <= G weight rows (g known at run time only).
template <int R, int G, typename Scalar, Precision P, typename W>
void dot_rows(Eigen::Index g, const Scalar* x, Eigen::Index ldx, const W* w, Eigen::Index in, Scalar* sums,
              Eigen::Index lds) noexcept {
  if constexpr (G > 1) {
    if (g < G) {
      dot_rows<R, G - 1, Scalar, P>(g, x, ldx, w, in, sums, lds);
      return;
    }
  }
  dot_block<R, G, Scalar, P>(x, ldx, w, in, sums, lds);
}

/// project_rows over weights stored as W in precision P.
template <typename Scalar, Precision P, typename W, typename Out>
void project_rows_as(const Scalar* x, Eigen::Index ldx, Eigen::Index rows, const W* weight, Eigen::Index in,
                     Eigen::Index o0, Eigen::Index o1, const WeightRows& layer, Scalar scale, Out* out,
                     Eigen::Index ldo, const SplitRows* presplit) noexcept {
  using Index = Eigen::Index;
  // Weight rows per group for one row of x: 8 where the target has 32 vector registers (16 accumulators), 4
  // where it has 16 (8); each load of x is shared by the group. Rows of x are taken two at a time where
  // there are several (each weight load shared), over 4 of the group's weight rows at a time with 32
  // registers, 2 with 16. Measured on Zen 4 (AVX-512), one row of x against 128 weight rows of 512 in L2:
  // 2.6 us with groups of 8, 3.2 with 4, 3.3 with 2, 5.4 one row at a time (the packed GEMM: 2.4 us).
  constexpr Index G = simd_registers == 32 ? 8 : 4, G2 = simd_registers == 32 ? 4 : 2;
  (void)presplit;  // bfloat16 weights with AVX512_BF16 only
  Scalar sums[2 * G];
  // The bias's precision picked once per block of outputs, not per output, and scale held by value (through a
  // reference it was loaded again after every store, which might have changed it): one-head bfloat16 steps
  // 0.93x on Zen 4, multi-head 0.96-0.99x.
  const auto store = [out, ldo, o0, scale, &layer](Index r, Index o, Index g, const Scalar* s) {
    Out* const dst = out + r * ldo + (o - o0);
    const auto put = [&](const auto* bias) {
      for (Index i = 0; i < g; ++i)
        dst[i] = static_cast<Out>((s[i] + widened<Scalar>(bias[o + i])) * scale);
    };
    switch (layer.bias_precision) {
      case Precision::float64:
        put(static_cast<const double*>(layer.bias));
        break;
      case Precision::float32:
        put(static_cast<const float*>(layer.bias));
        break;
      case Precision::float16:
        put(static_cast<const Eigen::half*>(layer.bias));
        break;
      case Precision::bfloat16:
        put(static_cast<const Eigen::bfloat16*>(layer.bias));
        break;
    }
  };
#if HEAD_ATTENTION_DOT_BF16
  if constexpr (P == Precision::bfloat16 && std::is_same<Scalar, float>::value) {
    // bfloat16 weights and AVX512_BF16: x split into bfloat16 hi + lo (split_bf16) and multiplied by
    // vdpbf16ps, 32 products an instruction with no widening of the weights (the FMA path below spends two
    // instructions widening every 16 weights, and measured op-bound at 2.2-2.4x a decode step's bytes).
    if (in <= bf16_split_entries) {
      // The rows [r0, r0 + n) split at `base` (see SplitRows).
      const auto run = [&](const std::uint16_t* base, Index ld, Index stride, const bool* lo_pass, Index r0,
                           Index n) {
        for (Index o = o0; o < o1; o += G) {
          const Index g = std::min(G, o1 - o);
          const std::uint16_t* wo = weight + o * in;
          Index r = 0;
          for (; r + 2 <= n; r += 2) {
            const std::uint16_t* h = base + r * ld;
            for (Index i = 0; i < g; i += G2) {
              const Index gi = std::min(G2, g - i);
              if (lo_pass[r] == lo_pass[r + 1]) {
                dot_rows_bf16<2, G2>(gi, lo_pass[r], h, h + stride, ld, wo + i * in, in, in, sums, G2);
              } else {  // each row with its own pass, so that its bits are those of any other call
                dot_rows_bf16<1, G2>(gi, lo_pass[r], h, h + stride, ld, wo + i * in, in, in, sums, G2);
                dot_rows_bf16<1, G2>(gi, lo_pass[r + 1], h + ld, h + ld + stride, ld, wo + i * in, in, in,
                                     sums + G2, G2);
              }
              store(r0 + r, o + i, gi, sums);
              store(r0 + r + 1, o + i, gi, sums + G2);
            }
          }
          if (r < n) {
            const std::uint16_t* h = base + r * ld;
            dot_rows_bf16<1, G>(g, lo_pass[r], h, h + stride, ld, wo, in, in, sums, G);
            store(r0 + r, o, g, sums);
          }
        }
      };
      if (presplit != nullptr && presplit->bits != nullptr) {
        run(presplit->bits, presplit->ld, presplit->stride, presplit->lo_pass, 0, rows);
        return;
      }
      // Row r's hi at split + r · ld, its lo `stride` after (as SplitRows): hi and lo a row apart, not a
      // multiple of 4 KB apart, so that their stores cannot alias.
      const Index stride = bf16_split_stride(in), ld = 2 * stride;
      const Index batch = std::min<Index>(rows, bf16_split_entries / stride);  // rows of x split at a time
      alignas(64) std::uint16_t split[2 * bf16_split_entries];
      bool lo_pass[bf16_split_entries / 32];
      for (Index r0 = 0; r0 < rows; r0 += batch) {
        const Index n = std::min(batch, rows - r0);
        for (Index r = 0; r < n; ++r)
          lo_pass[r] = split_bf16(x + (r0 + r) * ldx, in, split + r * ld, split + r * ld + stride);
        run(split, ld, stride, lo_pass, r0, n);
      }
      return;
    }
  }
#endif
  for (Index o = o0; o < o1; o += G) {
    const Index g = std::min(G, o1 - o);
    // The group's rows stay in L1 while every row of x passes: each weight row is read once per call.
    Index r = 0;
    for (; r + 2 <= rows; r += 2) {
      for (Index i = 0; i < g; i += G2) {
        const Index gi = std::min(G2, g - i);
        dot_rows<2, G2, Scalar, P>(gi, x + r * ldx, ldx, weight + (o + i) * in, in, sums, G2);
        store(r, o + i, gi, sums);
        store(r + 1, o + i, gi, sums + G2);
      }
    }
    if (r < rows) {
      dot_rows<1, G, Scalar, P>(g, x + r * ldx, ldx, weight + o * in, in, sums, G);
      store(r, o, g, sums);
    }
  }
}

/// out[r, o - o0] = (bias[o] + x_r · W_o) · scale for the rows r < rows of x (row-major, leading dimension
/// ldx, `in` columns) and the weight rows o in [o0, o1) of `layer` (out row-major, leading dimension ldo,
/// stored as Out). For calls of few rows: W is read in place, each row once, where a GEMM needs it
/// transposed first (Tuning::rowdot_rows). An output's bits depend only on its x row, weight row, bias and
/// scale: not on o0, o1, `rows` or the thread that runs it. presplit: x already split (SplitRows), read
/// instead of x by bfloat16 weights with AVX512_BF16 (the same bits either way). Never throws, never
/// allocates.
template <typename Scalar, typename Out>
void project_rows(const Scalar* x, Eigen::Index ldx, Eigen::Index rows, const WeightRows& layer,
                  Eigen::Index in, Eigen::Index o0, Eigen::Index o1, Scalar scale, Out* out, Eigen::Index ldo,
                  const SplitRows* presplit = nullptr) noexcept {
  switch (layer.weight_precision) {
    case Precision::float16:
      if constexpr (std::is_same<Scalar, float>::value) {
        project_rows_as<Scalar, Precision::float16>(x, ldx, rows,
                                                    static_cast<const std::uint16_t*>(layer.weight), in, o0,
                                                    o1, layer, scale, out, ldo, presplit);
        return;
      }
      break;
    case Precision::bfloat16:
      if constexpr (std::is_same<Scalar, float>::value) {
        project_rows_as<Scalar, Precision::bfloat16>(x, ldx, rows,
                                                     static_cast<const std::uint16_t*>(layer.weight), in, o0,
                                                     o1, layer, scale, out, ldo, presplit);
        return;
      }
      break;
    default:
      break;
  }
  // The compute type's own weights (a float or double layer).
  project_rows_as<Scalar, precision_of<Scalar>()>(x, ldx, rows, static_cast<const Scalar*>(layer.weight), in,
                                                  o0, o1, layer, scale, out, ldo, presplit);
}

}  // namespace head_attention::detail

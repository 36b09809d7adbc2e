// head-attention: a register-blocked GEMM for row-major operands, the products of the forward pass.
#pragma once

#include <algorithm>
#include <cstddef>
#include <type_traits>

#include <Eigen/Core>

#include "gemm.hpp"

// Loops over a tile's registers must be unrolled completely for the accumulators to stay in registers; GCC
// does so by itself only at -O3 (at -O2 the kernel ran 3x slower), so it is asked to.
#if defined(__GNUC__)
#define HEAD_ATTENTION_UNROLL _Pragma("GCC unroll 8")
#else
#define HEAD_ATTENTION_UNROLL
#endif

// A tile's B packets must be loaded once per depth step. With few rows GCC folds each load into every FMA
// that uses it instead (a 2-row AVX-512 tile made 8 loads where 4 do; 2- to 4-row tiles ran at 0.53-0.55 of
// the 6-row tile's speed per row); an empty asm statement that "changes" the packet keeps it in a register.
// (x86 only, where the "v" constraint names any vector register.)
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HEAD_ATTENTION_IN_REGISTER(packet) __asm__("" : "+v"(packet))
#else
#define HEAD_ATTENTION_IN_REGISTER(packet) static_cast<void>(0)
#endif

namespace head_attention::detail {

/// How many SIMD registers the target has: AVX-512 doubles them, and the micro-kernel's tile grows with them.
inline constexpr int simd_registers =
#if defined(__AVX512F__)
    32;
#else
    16;
#endif

/// The SIMD packet of Scalar Eigen picked for this build, and its width (1 without vectorisation).
template <typename Scalar>
using SimdPacket = typename Eigen::internal::packet_traits<Scalar>::type;
template <typename Scalar>
inline constexpr int simd_width = Eigen::internal::unpacket_traits<SimdPacket<Scalar>>::size;

/// Columns (in packets) and rows of the widest tile: accumulators take 24 of AVX-512's 32 registers (6 rows
/// of 4 packets) and 12 of AVX2's or SSE's 16 (6 rows of 2), leaving room for the B row and the broadcast.
inline constexpr int tile_packets = simd_registers == 32 ? 4 : 2;
inline constexpr int tile_rows = 6;
/// Depth of one pass over B: a [256, 4 packets] slice of B (64 KB of float with AVX-512) stays in L2
/// while every row tile of A streams past it.
inline constexpr Eigen::Index tile_depth = 256;

/// One depth step p of gemm_tile: acc[Rows][Packets] += A(:, p) · B(p, :).
template <typename Scalar, int Rows, int Packets>
EIGEN_ALWAYS_INLINE void tile_step(SimdPacket<Scalar> (&acc)[Rows][Packets], Eigen::Index p, const Scalar* a,
                                   Eigen::Index lda, Eigen::Index a_step, const Scalar* b,
                                   Eigen::Index ldb) noexcept {
  using Eigen::internal::ploadu;
  using Eigen::internal::pmadd;
  using Eigen::internal::pset1;
  using Packet = SimdPacket<Scalar>;
  constexpr int W = simd_width<Scalar>;
  Packet row[Packets];
  HEAD_ATTENTION_UNROLL
  for (int v = 0; v < Packets; ++v) {
    row[v] = ploadu<Packet>(b + p * ldb + v * W);
    if constexpr (Rows > 1 && Rows < tile_rows && W > 1) HEAD_ATTENTION_IN_REGISTER(row[v]);
  }
  HEAD_ATTENTION_UNROLL
  for (int i = 0; i < Rows; ++i) {
    const Packet ai = pset1<Packet>(a[i * lda + p * a_step]);
    HEAD_ATTENTION_UNROLL
    for (int v = 0; v < Packets; ++v) {
      acc[i][v] = pmadd(ai, row[v], acc[i][v]);
    }
  }
}

/// C[Rows, Packets·W] += A[Rows, k] · B[k, Packets·W]: A(i, p) at a[i · lda + p · a_step], B and C
/// row-major (rows ldb and ldc apart). The accumulators live in registers for the whole depth; A is read by
/// broadcasts, so it needs no packing, and B row p is Packets consecutive packets. Unaligned loads
/// throughout. With a bias (Packets·W values) it computes C = bias + A·B instead, C written without being
/// read. Prefetch (A row-major): the first next_rows rows of the next tile, at a + Rows · lda, are
/// prefetched over the same depth, a cache line of each per line's worth of steps, so that when A comes from
/// memory the next tile's rows arrive while this one computes. (A template flag, not a test in the loop:
/// with the prefetch in every tile's loop, the key and value projections, whose x is in cache, ran 4%
/// slower with AVX2.)
template <typename Scalar, int Rows, int Packets, bool Prefetch = false>
inline void gemm_tile(Eigen::Index k, const Scalar* a, Eigen::Index lda, Eigen::Index a_step, const Scalar* b,
                      Eigen::Index ldb, const Scalar* bias, Scalar* c, Eigen::Index ldc,
                      Eigen::Index next_rows = 0) noexcept {
  using Eigen::internal::padd;
  using Eigen::internal::ploadu;
  using Eigen::internal::pset1;
  using Eigen::internal::pstoreu;
  using Packet = SimdPacket<Scalar>;
  constexpr int W = simd_width<Scalar>;
  Packet acc[Rows][Packets];
  HEAD_ATTENTION_UNROLL
  for (int i = 0; i < Rows; ++i) {
    HEAD_ATTENTION_UNROLL
    for (int v = 0; v < Packets; ++v) {
      acc[i][v] = bias != nullptr ? ploadu<Packet>(bias + v * W) : pset1<Packet>(Scalar(0));
    }
  }
  Eigen::Index p = 0;
  if constexpr (Prefetch) {
    constexpr Eigen::Index line = 64 / static_cast<Eigen::Index>(sizeof(Scalar));  // elements per cache line
    for (; p + line <= k; p += line) {
      HEAD_ATTENTION_UNROLL
      for (int i = 0; i < Rows; ++i) {
        if (i < next_rows) Eigen::internal::prefetch(a + (Rows + i) * lda + p);
      }
      for (Eigen::Index q = p; q < p + line; ++q)
        tile_step<Scalar, Rows, Packets>(acc, q, a, lda, a_step, b, ldb);
    }
  }
  for (; p < k; ++p)
    tile_step<Scalar, Rows, Packets>(acc, p, a, lda, a_step, b, ldb);
  HEAD_ATTENTION_UNROLL
  for (int i = 0; i < Rows; ++i) {
    HEAD_ATTENTION_UNROLL
    for (int v = 0; v < Packets; ++v) {
      Scalar* to = c + i * ldc + v * W;
      pstoreu(to, bias != nullptr ? acc[i][v] : padd(ploadu<Packet>(to), acc[i][v]));
    }
  }
}

/// gemm_tile over all m rows of A: full tiles of tile_rows rows, then one tile of the rest. With Prefetch
/// (A row-major), each full tile prefetches the next tile's rows.
template <typename Scalar, int Packets, bool Prefetch = false>
inline void gemm_rows(Eigen::Index m, Eigen::Index k, const Scalar* a, Eigen::Index lda, Eigen::Index a_step,
                      const Scalar* b, Eigen::Index ldb, const Scalar* bias, Scalar* c,
                      Eigen::Index ldc) noexcept {
  static_assert(tile_rows == 6, "the remainder cases below are written for 6-row tiles");
  Eigen::Index i = 0;
  for (; i + tile_rows <= m; i += tile_rows)
    gemm_tile<Scalar, tile_rows, Packets, Prefetch>(k, a + i * lda, lda, a_step, b, ldb, bias, c + i * ldc,
                                                    ldc,
                                                    std::min<Eigen::Index>(tile_rows, m - i - tile_rows));
  a += i * lda;
  c += i * ldc;
  switch (m - i) {
    case 1:
      gemm_tile<Scalar, 1, Packets>(k, a, lda, a_step, b, ldb, bias, c, ldc);
      break;
    case 2:
      gemm_tile<Scalar, 2, Packets>(k, a, lda, a_step, b, ldb, bias, c, ldc);
      break;
    case 3:
      gemm_tile<Scalar, 3, Packets>(k, a, lda, a_step, b, ldb, bias, c, ldc);
      break;
    case 4:
      gemm_tile<Scalar, 4, Packets>(k, a, lda, a_step, b, ldb, bias, c, ldc);
      break;
    case 5:
      gemm_tile<Scalar, 5, Packets>(k, a, lda, a_step, b, ldb, bias, c, ldc);
      break;
    default:
      break;
  }
}

/// gemm_nn's last n < W columns: each group of up to tile_rows rows and tile_depth of depth runs the same
/// one-packet tile on zero-padded copies of B's and C's columns, on the stack. A plain loop would do, but at
/// one element per step it made head sizes like 100 (four columns past the last packet) over twice as slow.
template <typename Scalar>
void gemm_tail(Eigen::Index m, Eigen::Index n, Eigen::Index k, const Scalar* a, Eigen::Index lda,
               Eigen::Index a_step, const Scalar* b, Eigen::Index ldb, const Scalar* bias, Scalar* c,
               Eigen::Index ldc) noexcept {
  using Index = Eigen::Index;
  constexpr Index W = simd_width<Scalar>;
  Scalar b_pad[tile_depth * W];  // [tile_depth, W]
  Scalar c_pad[tile_rows * W];   // [tile_rows, W]
  // B's padding columns are 0 in every row and never written: zeroed once. With a single depth block (Q·Kᵀ
  // of fewer keys than a packet, say) B is copied once for every row group too: the copies, element by
  // element, were a third of this function at B = 2, T = 10.
  std::fill(b_pad, b_pad + std::min(k, tile_depth) * W, Scalar(0));
  const auto copy_b = [&](Index p0, Index depth) {
    for (Index p = 0; p < depth; ++p)
      for (Index j = 0; j < n; ++j)
        b_pad[p * W + j] = b[(p0 + p) * ldb + j];
  };
  const bool one_block = k <= tile_depth;
  if (one_block) copy_b(0, k);
  for (Index i0 = 0; i0 < m; i0 += tile_rows) {
    const Index rows = std::min<Index>(tile_rows, m - i0);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < W; ++j)
        c_pad[i * W + j] = j >= n ? Scalar(0) : bias != nullptr ? bias[j] : c[(i0 + i) * ldc + j];
    for (Index p0 = 0; p0 < k; p0 += tile_depth) {
      const Index depth = std::min(tile_depth, k - p0);
      if (!one_block) copy_b(p0, depth);
      gemm_rows<Scalar, 1>(rows, depth, a + i0 * lda + p0 * a_step, lda, a_step, b_pad, W, nullptr, c_pad, W);
    }
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < n; ++j)
        c[(i0 + i) * ldc + j] = c_pad[i * W + j];
  }
}

/// C[m, n] += A[m, k] · B[k, n], B and C row-major (leading dimensions ldb, ldc), A row-major with rows lda
/// apart (a_step = 1) or column-major with columns a_step apart (lda = 1). Serial, no allocation. The
/// forward pass's products all have this form once the weights and K are stored transposed, and so Q·Kᵀ,
/// P·V and the projections run about 1.3x faster than through Eigen's GEMM (Zen 4, AVX-512: 110–117 against
/// 84–89 GFLOP/s at a forward call's shapes), mostly because nothing is packed: A is broadcast in place and
/// B rows are read as they are stored. Every output is one chain of fused multiply-adds over k in order, so
/// it rounds the same wherever its row falls in a tile (results never depend on how rows are cut). Columns
/// that do not fill a packet take the same tile over padded copies. With a bias ([n]) it computes C = bias +
/// A·B instead, without reading C. prefetch: A (row-major) is likely not in cache, as on a first pass over
/// a projection's input; the first column block's tiles then prefetch the rows of the tile after them
/// (measured on Zen 4, AVX2, B = 8, T = 1024: the query projection, the first to read each row chunk of x
/// from memory, went from 88 to 97 GFLOP/s; the key and value projections after it run at 111). With
/// HEAD_ATTENTION_GEMM_FALLBACK (or an Eigen other than 3.4) Eigen's internal packet functions are not
/// used: the product is then Gemm's, Eigen's public one.
template <typename Scalar>
void gemm_nn(Eigen::Index m, Eigen::Index n, Eigen::Index k, const Scalar* a, Eigen::Index lda,
             const Scalar* b, Eigen::Index ldb, Scalar* c, Eigen::Index ldc, Eigen::Index a_step = 1,
             const Scalar* bias = nullptr, bool prefetch = false) noexcept {
  using Index = Eigen::Index;
  if (m == 0 || n == 0 || (k == 0 && bias == nullptr)) return;
  if (k == 0) {  // C = bias; A and B may be empty (null): no pointer into them is formed
    // (A loop, not std::copy: GCC 12 -O3 sees the memmove of the inlined bias == nullptr calls, which never
    // get here, and warns -Wnonnull.)
    for (Index i = 0; i < m; ++i)
      for (Index j = 0; j < n; ++j)
        c[i * ldc + j] = bias[j];
    return;
  }
  constexpr Index W = simd_width<Scalar>;
  if constexpr (gemm_uses_eigen_internals) {  // W = 1 (no SIMD) works too, on scalar "packets"
    Index j = 0;
    for (Index p0 = 0; p0 < k; p0 += tile_depth) {
      const Index depth = std::min(tile_depth, k - p0);
      const Scalar* ap = a + p0 * a_step;
      const Scalar* bp = b + p0 * ldb;
      const Scalar* first_bias = p0 == 0 ? bias : nullptr;  // later depth blocks accumulate
      j = 0;
      for (; j + tile_packets * W <= n; j += tile_packets * W) {
        const Scalar* tile_bias = first_bias != nullptr ? first_bias + j : nullptr;
        if (prefetch && j == 0 && a_step == 1)
          gemm_rows<Scalar, tile_packets, true>(m, depth, ap, lda, a_step, bp + j, ldb, tile_bias, c + j,
                                                ldc);
        else
          gemm_rows<Scalar, tile_packets>(m, depth, ap, lda, a_step, bp + j, ldb, tile_bias, c + j, ldc);
      }
      for (; j + W <= n; j += W)
        gemm_rows<Scalar, 1>(m, depth, ap, lda, a_step, bp + j, ldb,
                             first_bias != nullptr ? first_bias + j : nullptr, c + j, ldc);
    }
    if (j < n)
      gemm_tail(m, n - j, k, a, lda, a_step, b + j, ldb, bias != nullptr ? bias + j : nullptr, c + j, ldc);
  } else {
    // Eigen's public product, whose packing makes the result independent of A's storage order.
    using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
    using Stride = Eigen::OuterStride<>;
    Eigen::Map<Matrix, 0, Stride> res(c, m, n, Stride(ldc));  // [m, n]
    if (bias != nullptr) res.rowwise() = Eigen::Map<const RowVector>(bias, n);
    Gemm<Scalar> product(m, n, k);  // holds nothing in this mode
    if (a_step == 1)
      product.template accumulate<Eigen::RowMajor, Eigen::RowMajor>(m, n, k, a, lda, b, ldb, c, ldc);
    else
      product.template accumulate<Eigen::ColMajor, Eigen::RowMajor>(m, n, k, a, a_step, b, ldb, c, ldc);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
// PacketBlock<__m256, 8> and the like: GCC notes that the vector type's alignment attribute is not part of
// the template argument, which is harmless here (the block lives in registers).
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
/// dst[cols, rows] = srcᵀ for a row-major src[rows, cols] (leading dimensions src_stride, dst_stride):
/// W x W blocks of packets transposed in registers, the edges element by element. Eigen's transpose
/// assignment walks one side a column at a time; on a forward call's weights ([64, 512] float) it was
/// measured 11x slower than even a scalar blocked loop, which is in turn slower than this.
template <typename Scalar>
void transpose_into(const Scalar* src, Eigen::Index src_stride, Eigen::Index rows, Eigen::Index cols,
                    Scalar* dst, Eigen::Index dst_stride) noexcept {
  using Index = Eigen::Index;
  // AVX-512's 16-float transpose was measured 4x slower than AVX's 8-float one (on Zen 4), so blocks of more
  // than 8 lanes take the half packet.
  using Packet = std::conditional_t<(simd_width<Scalar> > 8),
                                    typename Eigen::internal::unpacket_traits<SimdPacket<Scalar>>::half,
                                    SimdPacket<Scalar>>;
  constexpr Index W = Eigen::internal::unpacket_traits<Packet>::size;
  Index r0 = 0, c0 = 0;
  if constexpr (gemm_uses_eigen_internals && W > 1) {
    const Index full_rows = rows / W * W, full_cols = cols / W * W;
    for (r0 = 0; r0 < full_rows; r0 += W)
      for (c0 = 0; c0 < full_cols; c0 += W) {
        Eigen::internal::PacketBlock<Packet, W> block;
        HEAD_ATTENTION_UNROLL
        for (Index i = 0; i < W; ++i) {
          block.packet[i] = Eigen::internal::ploadu<Packet>(src + (r0 + i) * src_stride + c0);
        }
        Eigen::internal::ptranspose(block);
        HEAD_ATTENTION_UNROLL
        for (Index i = 0; i < W; ++i) {
          Eigen::internal::pstoreu(dst + (c0 + i) * dst_stride + r0, block.packet[i]);
        }
      }
    r0 = full_rows;
    c0 = full_cols;
  }
  // The edges: the columns right of the full blocks, then the rows below them.
  for (Index r = 0; r < r0; ++r)
    for (Index c = c0; c < cols; ++c)
      dst[c * dst_stride + r] = src[r * src_stride + c];
  for (Index r = r0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c)
      dst[c * dst_stride + r] = src[r * src_stride + c];
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace head_attention::detail

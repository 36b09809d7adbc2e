// head-attention: a serial, allocation-free GEMM over raw strided storage.
#pragma once

#include <algorithm>

#include <Eigen/Core>

// Eigen's GEMM one layer below its expression templates (general_matrix_matrix_product with a result inner
// stride, gemm_blocking_space) is internal API, and this exact form is the one of Eigen 3.4. Later Eigen
// versions (3.4.90 development, 5.x) may change it, so it is used only with 3.4.x; anything else, or
// HEAD_ATTENTION_GEMM_FALLBACK defined by the user, takes the fallback on Eigen's public product API.
#if !defined(HEAD_ATTENTION_GEMM_FALLBACK) && EIGEN_VERSION_AT_LEAST(3, 4, 0) && \
    !EIGEN_VERSION_AT_LEAST(3, 4, 90)
#define HEAD_ATTENTION_GEMM_USES_EIGEN_INTERNALS 1
#else
#define HEAD_ATTENTION_GEMM_USES_EIGEN_INTERNALS 0
#endif

#if defined(EIGEN_HAS_OPENMP)
#include <omp.h>
#endif

namespace head_attention::detail {

/// Keeps Eigen's public product on the calling thread for its lifetime, where it can. Eigen parallelises a
/// large product unless it is called from inside a team of more than one thread or Eigen::nbThreads() is 1,
/// and nbThreads() follows this thread's OpenMP thread count unless the program called Eigen::setNbThreads.
/// So outside a team that count is set to 1 and restored afterwards; it is a per-thread setting, other
/// threads never see it. serial() tells whether that sufficed (not after Eigen::setNbThreads(n > 1)).
class SerialEigenProducts {
 public:
#if defined(EIGEN_HAS_OPENMP)
  SerialEigenProducts() {
    if (omp_get_num_threads() == 1 && omp_get_max_threads() > 1) {
      m_saved = omp_get_max_threads();
      omp_set_num_threads(1);
    }
  }
  ~SerialEigenProducts() {
    if (m_saved > 0) omp_set_num_threads(m_saved);
  }
  bool serial() const {
    return omp_get_num_threads() > 1 || Eigen::nbThreads() == 1;
  }
#else
  // Declared, since the deleted copy constructor below would otherwise leave no default one: without OpenMP
  // and with HEAD_ATTENTION_GEMM_FALLBACK, nothing compiled (found when CI first built the two together).
  // User- provided, not defaulted: a guard object of a trivial type draws -Wunused-variable where it is
  // declared.
  SerialEigenProducts() {}  // NOLINT(modernize-use-equals-default)
  bool serial() const {
    return true;
  }
#endif
  SerialEigenProducts(const SerialEigenProducts&) = delete;
  SerialEigenProducts& operator=(const SerialEigenProducts&) = delete;

#if defined(EIGEN_HAS_OPENMP)
 private:
  int m_saved = 0;
#endif
};

/// True when Gemm runs Eigen 3.4's GEMM kernel directly, false on the public-API fallback.
inline constexpr bool gemm_uses_eigen_internals = HEAD_ATTENTION_GEMM_USES_EIGEN_INTERNALS != 0;

/// res[m, n] += lhs[m, k] · rhs[k, n], result row-major, operands in either storage order. Serial:
/// it never forks threads, whatever Eigen::nbThreads() says, because the thread count of a forward call must
/// be the caller's alone.
///
/// With Eigen 3.4 this calls Eigen's own GEMM kernel one layer below its expression templates, for two
/// reasons: that layer forks OpenMP threads for any product it deems large enough when it is called outside
/// a parallel region, and it allocates packing buffers on every product (the attention loop runs thousands of
/// small products per call). The buffers here are allocated once, up front.
///
/// The fallback (other Eigen versions, or HEAD_ATTENTION_GEMM_FALLBACK) stays on public API: Eigen's own
/// product (allocating its packing buffers per call), kept serial by SerialEigenProducts; only after the
/// program called Eigen::setNbThreads(n > 1), and outside a team, lazyProduct, Eigen's coefficient-based
/// product, about 2.7x slower but never forking (and rounding differently).
template <typename Scalar>
class Gemm {
 public:
  using Index = Eigen::Index;

  /// Packing buffers for products up to [max_m, max_k] · [max_k, max_n] (none when max_m is 1), owned by
  /// this Gemm; larger products still work, in more cache blocks.
  Gemm(Index max_m, Index max_n, Index max_k) {
    m_own.resize(buffer_size(max_m, max_n, max_k));
    use(max_m, max_n, max_k, m_own.data());
  }
  /// No buffers until use() gives some: products of one row only (or any, on the fallback).
  Gemm() = default;
  // The blocking may point into m_own: a copy would share it.
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  Gemm(Gemm&&) = default;  // (a moved Eigen vector keeps its heap block, so the pointers stay valid)
  Gemm& operator=(Gemm&&) = default;

  /// Elements of packing buffer that use() needs for products up to [max_m, max_k] · [max_k, max_n]: 0 for
  /// one row (the matrix-vector path) and on the fallback, else max_k · (max_m + max_n) plus alignment, a
  /// bound on Eigen's blocks (kc <= k, mc and nc at most the product's sizes) that never decreases as a size
  /// grows, so that a buffer sized for a product serves every smaller one. Sizes must have been checked
  /// (the product fits an Index).
  static Index buffer_size(Index max_m, Index max_n, Index max_k) noexcept {
    if (!gemm_uses_eigen_internals || max_m <= 1) return 0;
    return aligned(max_k * max_n) + aligned(max_k * max_m);
  }

  /// Takes the packing buffers from `buffer` (buffer_size(max_m, max_n, max_k) elements, aligned to 64 bytes,
  /// not owned) for products up to those sizes, with Eigen's cache blocking for exactly these sizes, as a
  /// Gemm constructed with them has (so the same rounding: the depth blocks kc follow the sizes).
  void use(Index max_m, Index max_n, Index max_k, Scalar* buffer) noexcept {
#if HEAD_ATTENTION_GEMM_USES_EIGEN_INTERNALS
    m_blocking.fit(max_m, max_n, max_k, max_m > 1 ? buffer : nullptr, buffer_size(max_m, max_n, max_k));
#else
    (void)max_m;
    (void)max_n;
    (void)max_k;
    (void)buffer;
#endif
  }

  template <int LhsOrder, int RhsOrder>
  void accumulate(Index m, Index n, Index k, const Scalar* lhs, Index lhs_stride, const Scalar* rhs,
                  Index rhs_stride, Scalar* res, Index res_stride) {
    if (m == 0 || n == 0 || k == 0) return;
    if (m == 1) {
      // One row (a decode step): Eigen's matrix-vector product streams rhs once, where the GEMM kernel would
      // first copy it into a packed panel. Public API, never threaded, no heap allocation.
      using Rhs = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, RhsOrder>;
      using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
      const Eigen::Map<const RowVector, 0, Eigen::InnerStride<>> a(
          lhs, k, Eigen::InnerStride<>(LhsOrder == Eigen::RowMajor ? 1 : lhs_stride));  // [1, k]
      const Eigen::Map<const Rhs, 0, Eigen::OuterStride<>> b(rhs, k, n, Eigen::OuterStride<>(rhs_stride));
      Eigen::Map<RowVector> c(res, n);  // [1, n]
      c.noalias() += a * b;
      return;
    }
#if HEAD_ATTENTION_GEMM_USES_EIGEN_INTERNALS
    Eigen::internal::general_matrix_matrix_product<Index, Scalar, LhsOrder, false, Scalar, RhsOrder, false,
                                                   Eigen::RowMajor, 1>::run(m, n, k, lhs, lhs_stride, rhs,
                                                                            rhs_stride, res, 1, res_stride,
                                                                            Scalar(1), m_blocking, nullptr);
#else
    using Lhs = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, LhsOrder>;
    using Rhs = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, RhsOrder>;
    using Res = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using Stride = Eigen::OuterStride<>;
    const Eigen::Map<const Lhs, 0, Stride> a(lhs, m, k, Stride(lhs_stride));  // [m, k]
    const Eigen::Map<const Rhs, 0, Stride> b(rhs, k, n, Stride(rhs_stride));  // [k, n]
    Eigen::Map<Res, 0, Stride> c(res, m, n, Stride(res_stride));              // [m, n]
    const SerialEigenProducts serial_scope;
    if (serial_scope.serial()) {
      c.noalias() += a * b;
    } else {
      // Eigen's GEMM would fork Eigen::nbThreads() threads here; its coefficient-based product never does.
      for (Index p0 = 0; p0 < k; p0 += panel_depth) {
        const Index depth = std::min(panel_depth, k - p0);
        c.noalias() += a.middleCols(p0, depth).lazyProduct(b.middleRows(p0, depth));
      }
    }
#endif
  }

 private:
  static constexpr Index align = 64 / static_cast<Index>(sizeof(Scalar));  // each block on a cache line
  static constexpr Index aligned(Index n) noexcept {
    return (n + align - 1) / align * align;
  }

#if HEAD_ATTENTION_GEMM_USES_EIGEN_INTERNALS
  /// Eigen's cache blocking of a product with a row-major result (gemm_blocking_space<RowMajor>'s, which
  /// computes it for the transposed product), its packing blocks in memory it does not own.
  class Blocking : public Eigen::internal::level3_blocking<Scalar, Scalar> {
   public:
    void fit(Index max_m, Index max_n, Index max_k, Scalar* buffer, Index size) noexcept {
      // Computes the blocking only: it allocates when asked to (allocateAll), never here.
      const Eigen::internal::gemm_blocking_space<Eigen::RowMajor, Scalar, Scalar, Eigen::Dynamic,
                                                 Eigen::Dynamic, Eigen::Dynamic>
          sizes(max_m, max_n, max_k, 1, true);
      this->m_mc = sizes.mc();
      this->m_nc = sizes.nc();
      this->m_kc = sizes.kc();
      const Index size_a = aligned(this->m_mc * this->m_kc), size_b = this->m_kc * this->m_nc;
      // (Always within the bound; were it not, Eigen would allocate its own blocks, as with none.)
      const bool fits = buffer != nullptr && size_a + size_b <= size;
      this->m_blockA = fits ? buffer : nullptr;
      this->m_blockB = fits ? buffer + size_a : nullptr;
    }
  };
  Blocking m_blocking;
#else
  static constexpr Index panel_depth = 128;
#endif
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> m_own;  // the buffer of a Gemm built with its sizes
};

}  // namespace head_attention::detail

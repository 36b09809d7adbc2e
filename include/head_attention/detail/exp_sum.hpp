// head-attention: the softmax's exponentials, exp(x) for x <= 0 in SIMD packets, and a row's exponentials
// with their sum in one pass.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include "gemm.hpp"
#include "microkernel.hpp"

namespace head_attention::detail {

/// exp(x) of a packet of x <= 0 (or NaN), exp_sum's. For float, the degree-5 form of ARM's
/// optimized-routines (v_expf: x = n · ln 2 + r, n rounded by the 1.5 · 2^23 shift, 2^n put straight into
/// the exponent bits, its polynomial for exp(r) - 1), where Eigen's pexp_float has degree 7, rounds by
/// pfloor and builds 2^n in more steps. Worst error 1.6 ulp (Eigen's 1) wherever exp(x) is a normal float
/// (x >= -87.3); 0 below, as Eigen's AVX-512 form; NaN stays NaN. exp_sum on Zen 4: 0.24 against 0.33 ns a
/// score with AVX2 (against the form before: Eigen's polynomial, 2^n by one multiply), 0.21 against Eigen's
/// 0.23 with AVX-512, 0.75 against Eigen's 2.16 with SSE2 (whose pfloor is slow). Double: Eigen's pexp, also
/// 0 below the normal range.
template <typename Packet>
Packet exp_nonpositive(const Packet& x) noexcept {
  using namespace Eigen::internal;
  using Scalar = typename unpacket_traits<Packet>::type;
  if constexpr (std::is_same<Scalar, float>::value) {
    using PacketI = typename unpacket_traits<Packet>::integer_packet;
    const Packet shifter = pset1<Packet>(0x1.8p23f);
    const Packet z = pmadd(x, pset1<Packet>(0x1.715476p+0f), shifter);  // n in the low bits of z
    const Packet n = psub(z, shifter);
    // r = x - n · ln 2, ln 2 in two parts.
    const Packet r = pmadd(n, pset1<Packet>(-0x1.7f7d1cp-20f), pmadd(n, pset1<Packet>(-0x1.62e4p-1f), x));
    // 2^n: n added to the exponent bits of 1 (normal for n >= -126, which the mask below guarantees).
    const Packet scale = preinterpret<Packet>(
        padd(plogical_shift_left<23>(preinterpret<PacketI>(z)), preinterpret<PacketI>(pset1<Packet>(1.0f))));
    const Packet r2 = pmul(r, r);
    const Packet poly =  // exp(r) - 1
        pmadd(pmadd(pmadd(pset1<Packet>(0x1.0e4020p-7f), r, pset1<Packet>(0x1.573e2ep-5f)), r2,
                    pmadd(pset1<Packet>(0x1.555e66p-3f), r, pset1<Packet>(0x1.fffdb6p-2f))),
              r2, pmul(pset1<Packet>(0x1.ffffecp-1f), r));
    // 0 where exp(x) is below the normal range (x < ln 2^-126, where n could wrap the exponent); a NaN x
    // fails the comparison and stays NaN.
    return pandnot(pmadd(poly, scale, scale), pcmp_lt(x, pset1<Packet>(-87.3365447f)));
  } else {
    // Eigen's pexp clamps its argument, and gives exp(-inf) > 0: 0 below the normal range here too.
    static_assert(std::is_same<Scalar, double>::value, "exp_nonpositive: float or double");
    return pandnot(pexp(x), pcmp_lt(x, pset1<Packet>(-708.3964185322641)));  // ln 2^-1022
  }
}

/// p[i] = exp(p[i] - shift) for i < n, and returns their sum: the softmax's exponentials and row sum in one
/// pass over the scores (Eigen's expressions take two). Every score takes the SIMD form when there is one.
template <typename Scalar>
Scalar exp_sum(Scalar* p, Eigen::Index n, Scalar shift) noexcept {
  using Index = Eigen::Index;
  Index i = 0;
  Scalar sum(0);
  if constexpr (gemm_uses_eigen_internals && simd_width < Scalar >> 1) {
    using namespace Eigen::internal;
    using Packet = SimdPacket<Scalar>;
    constexpr Index W = simd_width<Scalar>;
    const Packet shift_packet = pset1<Packet>(shift);
    Packet sum0 = pset1<Packet>(Scalar(0)), sum1 = sum0;  // two chains: pexp's latency is long
    for (; i + 2 * W <= n; i += 2 * W) {
      const Packet e0 = exp_nonpositive(psub(ploadu<Packet>(p + i), shift_packet));
      const Packet e1 = exp_nonpositive(psub(ploadu<Packet>(p + i + W), shift_packet));
      pstoreu(p + i, e0);
      pstoreu(p + i + W, e1);
      sum0 = padd(sum0, e0);
      sum1 = padd(sum1, e1);
    }
    if (i < n) {
      // The last n - i < 2W scores through the same packets, padded with -inf (whose exp is 0): one at a
      // time through std::exp they were up to 31 calls a row with AVX-512, at the end of every row a causal
      // diagonal cuts.
      Scalar tail[2 * W];
      const Index rest = n - i;
      for (Index t = 0; t < 2 * W; ++t)
        tail[t] = t < rest ? p[i + t] : -std::numeric_limits<Scalar>::infinity();
      const Packet e0 = exp_nonpositive(psub(ploadu<Packet>(tail), shift_packet));
      const Packet e1 = exp_nonpositive(psub(ploadu<Packet>(tail + W), shift_packet));
      pstoreu(tail, e0);
      pstoreu(tail + W, e1);
      sum0 = padd(sum0, e0);
      sum1 = padd(sum1, e1);
      std::copy_n(tail, rest, p + i);
      i = n;
    }
    sum = predux(padd(sum0, sum1));
  }
  for (; i < n; ++i) {
    p[i] = std::exp(p[i] - shift);
    sum += p[i];
  }
  return sum;
}

}  // namespace head_attention::detail

// libFuzzer target: the layers' entry points fed shapes, lengths, mask rules and values decoded from the fuzz
// input (sizes that may be wrong, values that may be NaN or Inf). Every call must either succeed or throw
// shape_error (an std::invalid_argument); a crash, a sanitizer report or another exception is a finding.
// Calls that succeed are checked against each other: forward_into equals forward bit for bit, and a failed
// call leaves the output buffer and the cache as they were.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <head_attention/head_attention.hpp>

#include "fuzz_support.hpp"

namespace {

using head_attention::HeadAttention;
using head_attention::MaskRule;
using head_attention::MultiHeadAttention;
using head_attention::shape_error;
using Index = Eigen::Index;

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Bitwise equality (NaN equals itself here: the same computation must give the same bits).
template <typename A, typename B>
bool same_bits(const A& a, const B& b) {
  using Scalar = typename A::Scalar;
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (Index i = 0; i < a.rows(); ++i)
    for (Index j = 0; j < a.cols(); ++j) {
      const Scalar x = a(i, j), y = b(i, j);
      if (std::memcmp(&x, &y, sizeof(Scalar)) != 0) return false;
    }
  return true;
}

/// Runs f; true if it succeeded, false if it threw shape_error. Anything else propagates (a finding).
template <typename F>
bool attempt(F&& f) {
  try {
    f();
    return true;
  } catch (const shape_error&) {
    return false;
  }
}

template <typename Scalar>
Matrix<Scalar> matrix(ha_fuzz::Input& in, Index rows, Index cols) {
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i)
    m.data()[i] = in.value<Scalar>();
  return m;
}

MaskRule rule(ha_fuzz::Input& in) {
  switch (in.range(0, 2)) {
    case 0:
      return MaskRule::causal();
    case 1:
      return MaskRule::bidirectional();
    default:
      return MaskRule::sliding_window(in.range(1, 20));
  }
}

/// A size that is usually right and sometimes off by a little (never negative: that is a matrix the caller
/// could not have made).
Index near(ha_fuzz::Input& in, Index right) {
  const long d = in.range(0, 15);
  return std::max<Index>(0, d < 11 ? right : right + (d - 13));
}

template <typename Scalar>
void single(ha_fuzz::Input& in) {
  const Index emb = in.range(1, 12), head = in.range(1, 12), max = in.range(1, 80);
  HeadAttention<Scalar> layer(emb, head, max, static_cast<std::uint64_t>(in.byte()), rule(in));
  if (in.flag()) layer.query().weight = matrix<Scalar>(in, head, emb);  // arbitrary weights, NaN included

  // forward and forward_into on one sequence, the rows and width sometimes wrong.
  const Index T = in.range(0, max + 2), width = near(in, emb);
  const Matrix<Scalar> x = matrix<Scalar>(in, T, width);
  Matrix<Scalar> fwd;
  const bool ok = attempt([&] { fwd = layer.forward(x); });
  Matrix<Scalar> out = Matrix<Scalar>::Constant(near(in, T), near(in, head), Scalar(7));
  const Matrix<Scalar> out_before = out;
  if (attempt([&] { layer.forward_into(x, out); })) {
    if (!ok || !same_bits(out, fwd)) ha_fuzz::fail("forward_into differs from forward");
  } else if (!same_bits(out, out_before)) {
    ha_fuzz::fail("a refused forward_into wrote its output");
  }

  // Batches with right padding, lengths sometimes out of range.
  const Index batch = in.range(0, 4), seq = in.range(0, max + 1);
  const Matrix<Scalar> xb = matrix<Scalar>(in, batch * seq + (in.range(0, 7) == 0 ? 1 : 0), emb);
  std::vector<Index> lengths(static_cast<std::size_t>(in.range(0, 7) == 0 ? batch + 1 : batch));
  for (Index& l : lengths)
    l = in.range(-1, seq + 1);
  Matrix<Scalar> outb = Matrix<Scalar>::Constant(xb.rows(), head, Scalar(3));
  const Matrix<Scalar> outb_before = outb;
  if (!attempt([&] { layer.forward_into(xb, outb, head_attention::Batch(batch, lengths)); }) &&
      !same_bits(outb, outb_before))
    ha_fuzz::fail("a refused padded forward_into wrote its output");
  head_attention::Workspace<Scalar> workspace;
  Matrix<Scalar> plain = outb;
  const bool plain_ok = attempt([&] { layer.forward_into(xb, plain, head_attention::Batch(batch)); });
  // A workspace sized ahead (reserve_workspace, the shape sometimes off) serves the call bit for bit.
  if (attempt([&] { layer.reserve_workspace(workspace, near(in, batch), near(in, seq)); }) &&
      attempt([&] { layer.forward_into(xb, outb, workspace, head_attention::Batch(batch)); }) &&
      (!plain_ok || !same_bits(outb, plain)))
    ha_fuzz::fail("forward_into with a reserved workspace differs from forward_into");

  // The backward passes (float and double), grad_out sometimes of the wrong shape.
  if constexpr (std::is_same<Scalar, head_attention::detail::compute_t<Scalar>>::value) {
    const Matrix<Scalar> g = matrix<Scalar>(in, near(in, T), near(in, head));
    if (attempt([&] {
          if (layer.backward(x, g).input.rows() != x.rows()) ha_fuzz::fail("dL/dx is not x's shape");
        }) &&
        !ok)
      ha_fuzz::fail("backward accepted an input forward refused");
    const Matrix<Scalar> gb = matrix<Scalar>(in, xb.rows(), head);
    (void)attempt([&] { (void)layer.backward(xb, gb, head_attention::Batch(batch, lengths)); });
  }

  // Decoding in chunks; a refused chunk leaves the cache's size as it was.
  auto cache = layer.make_cache(in.flag() ? head_attention::Precision::bfloat16
                                          : head_attention::precision_of<Scalar>());
  for (int step = 0, steps = static_cast<int>(in.range(0, 6)); step < steps; ++step) {
    const Matrix<Scalar> chunk = matrix<Scalar>(in, in.range(0, 20), near(in, emb));
    const Index size = cache.size();
    if (!attempt([&] { (void)layer.forward_cached(chunk, cache); })) {
      if (cache.size() != size) ha_fuzz::fail("a refused forward_cached changed the cache");
    } else if (cache.size() != size + chunk.rows()) {
      ha_fuzz::fail("forward_cached did not append its rows");
    }
    if (in.range(0, 5) == 0) (void)attempt([&] { cache.truncate(in.range(-1, cache.size() + 1)); });
  }
}

template <typename Scalar>
void multi(ha_fuzz::Input& in) {
  const Index heads = in.range(1, 4), emb = in.range(1, 10), head = in.range(1, 8), max = in.range(1, 70);
  MultiHeadAttention<Scalar> mha(heads, emb, head, max, 0.1, static_cast<std::uint64_t>(in.byte()), rule(in));
  if (in.flag()) mha.head(in.range(0, heads - 1)).set_mask_rule(rule(in));  // heads that disagree: refused
  const Index batch = in.range(0, 3), seq = in.range(0, max + 1);
  const Matrix<Scalar> x = matrix<Scalar>(in, batch * seq, near(in, emb));
  std::vector<Index> lengths(static_cast<std::size_t>(batch));
  for (Index& l : lengths)
    l = in.range(0, seq);
  Matrix<Scalar> out(x.rows(), emb);
  (void)attempt([&] {
    mha.forward_into(x, out,
                     head_attention::Batch(
                         batch, in.flag() ? head_attention::Padding(lengths) : head_attention::Padding()));
  });
  (void)attempt([&] { (void)mha.forward(x); });
  (void)attempt([&] {
    (void)mha.backward(x, matrix<Scalar>(in, x.rows(), near(in, emb)), head_attention::Batch(batch));
  });
  auto cache = mha.make_cache(in.range(0, 2));
  for (int step = 0, steps = static_cast<int>(in.range(0, 4)); step < steps; ++step) {
    const Matrix<Scalar> chunk = matrix<Scalar>(in, in.range(0, 12), near(in, emb));
    const Index size = cache.size();
    if (!attempt([&] { (void)mha.forward_cached(chunk, cache); }) && cache.size() != size)
      ha_fuzz::fail("a refused forward_cached changed the cache");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ha_fuzz::Input in(data, size);
  // One team per call: the fuzzer's own process runs many inputs, and threads add nothing it could find that
  // the ThreadSanitizer job does not.
  Eigen::setNbThreads(1);
  switch (in.range(0, 3)) {
    case 0:
      single<float>(in);
      break;
    case 1:
      single<double>(in);
      break;
    case 2:
      multi<float>(in);
      break;
    default:
      single<Eigen::half>(in);
      break;
  }
  return 0;
}

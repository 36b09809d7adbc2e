// libFuzzer target: the safetensors reader fed arbitrary bytes, loading into HeadAttention and
// MultiHeadAttention of the seed corpus's sizes (so that valid files reach every check) and reading single
// tensors. Every input must either load or throw the library's exceptions (format_error, shape_error) with
// the module unchanged; anything else (a crash, a sanitizer report, another exception) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

#include <unistd.h>

#include <head_attention/head_attention.hpp>
#include <head_attention/safetensors.hpp>

#include "fuzz_support.hpp"

namespace {

using head_attention::format_error;
using head_attention::HeadAttention;
using head_attention::MultiHeadAttention;
using head_attention::shape_error;

// The sizes of the seed corpus (corpus/safetensors/): emb_size 6, head_size 4, max_seq_len 5, 2 heads.
constexpr Eigen::Index kEmb = 6, kHead = 4, kMax = 5, kHeads = 2;

/// Bit for bit: a successful load may have put NaN weights into the layer, and NaN != NaN.
template <typename Derived>
bool same_bits(const Eigen::MatrixBase<Derived>& a, const Eigen::MatrixBase<Derived>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.derived().data(), b.derived().data(),
                     static_cast<std::size_t>(a.size()) * sizeof(typename Derived::Scalar)) == 0;
}
template <typename Scalar>
bool same(const head_attention::Linear<Scalar>& a, const head_attention::Linear<Scalar>& b) {
  return same_bits(a.weight, b.weight) && same_bits(a.bias, b.bias);
}
template <typename Scalar>
bool same_weights(const HeadAttention<Scalar>& a, const HeadAttention<Scalar>& b) {
  return same(a.query(), b.query()) && same(a.key(), b.key()) && same(a.value(), b.value());
}
template <typename Scalar>
bool same_weights(const MultiHeadAttention<Scalar>& a, const MultiHeadAttention<Scalar>& b) {
  for (Eigen::Index h = 0; h < a.num_heads(); ++h)
    if (!same_weights(a.head(h), b.head(h))) return false;
  return same(a.projection(), b.projection());
}

/// Runs load, which must succeed or throw format_error or shape_error leaving the module's weights as they
/// were, bit for bit.
template <typename Layer, typename Load>
void expect_load_or_refuse(Layer& layer, Load&& load) {
  const Layer before = layer;
  bool refused = false;
  try {
    load();
  } catch (const format_error&) {
    refused = true;
  } catch (const shape_error&) {
    refused = true;
  }
  if (refused && !same_weights(layer, before)) ha_fuzz::fail("a refused load changed the layer");
}

template <typename Scalar>
void load_all(const std::string& path) {
  HeadAttention<Scalar> layer(kEmb, kHead, kMax, 1);
  expect_load_or_refuse(layer, [&] { head_attention::load_state_dict(layer, path); });
  expect_load_or_refuse(layer, [&] { head_attention::load_state_dict(layer, path, "_heads.1."); });
  // A loaded layer runs (its weights may be anything the file held, NaN included).
  const typename HeadAttention<Scalar>::Matrix x = HeadAttention<Scalar>::Matrix::Ones(kMax, kEmb);
  (void)layer.forward(x);

  MultiHeadAttention<Scalar> mha(kHeads, kEmb, kHead, kMax, 0.1, 2);
  expect_load_or_refuse(mha, [&] { head_attention::load_state_dict(mha, path); });
  (void)mha.forward(x);

  for (const char* name : {"_q.weight", "_tril_mask", "_layer.bias", "_heads.0._k.weight"}) {
    try {
      (void)head_attention::load_tensor<Scalar>(path, name);
    } catch (const format_error&) {
    } catch (const shape_error&) {
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // One file per fuzzing process (libFuzzer's -jobs/-workers run several), rewritten for every input.
  static const std::string path = [] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir != nullptr ? dir : "/tmp") + "/ha_fuzz_safetensors." + std::to_string(getpid());
  }();
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out) ha_fuzz::fail("cannot write the input file");
  }
  load_all<float>(path);
  load_all<double>(path);
  load_all<Eigen::bfloat16>(path);
  return 0;
}

// libFuzzer target: the safetensors reader fed arbitrary bytes in memory (SafetensorsFile::view: no file),
// loading into HeadAttention and MultiHeadAttention of the seed corpus's sizes (so that valid files reach
// every check) and reading the first tensors of an accepted file into floating, integer and bool types. Every
// input must either be accepted or refused with the library's exceptions (format_error, shape_error), a
// refused load leaving the module unchanged; a tensor read from an accepted file must give a matrix().
// Anything else (a crash, a sanitizer report, another exception) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <head_attention/head_attention.hpp>
#include <head_attention/safetensors.hpp>

#include "fuzz_support.hpp"

namespace {

using head_attention::format_error;
using head_attention::HeadAttention;
using head_attention::MultiHeadAttention;
using head_attention::SafetensorsFile;
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
void load_all(const SafetensorsFile& file) {
  HeadAttention<Scalar> layer(kEmb, kHead, kMax, 1);
  expect_load_or_refuse(layer, [&] { head_attention::load_state_dict(layer, file); });
  expect_load_or_refuse(layer, [&] { head_attention::load_state_dict(layer, file, "_heads.1."); });
  // A loaded layer runs (its weights may be anything the file held, NaN included).
  const typename HeadAttention<Scalar>::Matrix x = HeadAttention<Scalar>::Matrix::Ones(kMax, kEmb);
  (void)layer.forward(x);

  MultiHeadAttention<Scalar> mha(kHeads, kEmb, kHead, kMax, 0.1, 2);
  expect_load_or_refuse(mha, [&] { head_attention::load_state_dict(mha, file); });
  (void)mha.forward(x);
}

/// Tensor `name` as T: refused with format_error (a value T cannot hold, a dtype that does not convert) or
/// read, and then its matrix() must exist: the header's checks bound every shape.
template <typename T>
void read_as(const SafetensorsFile& file, const std::string& name) {
  head_attention::StoredTensor<T> t;
  try {
    t = file.tensor<T>(name);
  } catch (const format_error&) {
    return;
  }
  if (t.shape != file.info(name).shape || static_cast<Eigen::Index>(t.values.size()) != file.info(name).count)
    ha_fuzz::fail("a tensor's shape or count differs from its info()");
  if constexpr (!std::is_same<T, bool>::value) (void)t.matrix();
}

void read_tensors(const SafetensorsFile& file) {
  int budget = 16;  // a header may list thousands of tensors: the first few cover every path
  for (const std::string& name : file.names()) {
    if (budget-- == 0) break;
    read_as<float>(file, name);
    read_as<double>(file, name);
    read_as<Eigen::bfloat16>(file, name);
    read_as<Eigen::half>(file, name);
    read_as<std::int64_t>(file, name);
    read_as<std::uint8_t>(file, name);
    read_as<bool>(file, name);
  }
  try {
    (void)file.tensor<float>("no such tensor");
    ha_fuzz::fail("a missing tensor was read");
  } catch (const shape_error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::optional<SafetensorsFile> file;
  try {
    file.emplace(SafetensorsFile::view(data, size));
  } catch (const format_error&) {
    return 0;
  }
  // Accepted: an owning copy of the same bytes is accepted too, and lists the same tensors.
  if (SafetensorsFile::from_memory(std::vector<unsigned char>(data, data + size)).names() != file->names())
    ha_fuzz::fail("from_memory and view list different tensors");
  load_all<float>(*file);
  load_all<double>(*file);
  load_all<Eigen::bfloat16>(*file);
  read_tensors(*file);
  return 0;
}

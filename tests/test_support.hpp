// Shared helpers of the unit tests: deterministic random inputs, error measures, the fixture reader and the
// shape_error checker.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include <head_attention/head_attention.hpp>

#ifdef HEAD_ATTENTION_TEST_KERNEL_INSTANCES
#include "kernel_instances.hpp"
#endif

#include "catch_compat.hpp"

namespace ha_test {

using Index = Eigen::Index;
using head_attention::Batch;
using head_attention::Padding;

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Scalar>
using ColMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
template <typename Scalar>
using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;

template <typename Scalar>
const char* scalar_name() {
  return std::is_same<Scalar, float>::value ? "float" : "double";
}

/// Uniform draws in [-1, 1) from std::mt19937_64 with our own conversion, so that a seed gives the same
/// numbers with every standard library.
class Random {
 public:
  explicit Random(std::uint64_t seed) : m_engine(seed) {}
  double uniform() { return static_cast<double>(m_engine() >> 11) * 0x1.0p-52 - 1.0; }

 private:
  std::mt19937_64 m_engine;
};

/// [rows, cols] row-major, entries scale · U[-1, 1).
template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  Random random(seed);
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j)
      m(i, j) = static_cast<Scalar>(scale * random.uniform());
  return m;
}

/// [B, T, emb] row-major tensor, entries scale · U[-1, 1).
template <typename Scalar>
Tensor3<Scalar> random_tensor(Index B, Index T, Index emb, std::uint64_t seed, double scale = 1.0) {
  Random random(seed);
  Tensor3<Scalar> t(B, T, emb);
  for (Index i = 0; i < t.size(); ++i)
    t.data()[i] = static_cast<Scalar>(scale * random.uniform());
  return t;
}

/// max |a - b| over two equally sized arrays; +inf on a size mismatch or a non-finite entry.
template <typename Scalar>
double max_abs_diff(const Scalar* a, const Scalar* b, Index n) {
  double worst = 0;
  for (Index i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (!std::isfinite(d)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, d);
  }
  return worst;
}

template <typename Scalar>
double max_abs(const Scalar* a, Index n) {
  double worst = 0;
  for (Index i = 0; i < n; ++i)
    worst = std::max(worst, std::abs(static_cast<double>(a[i])));
  return worst;
}

/// max |ours - expected| / max |expected|: the parity measure (0 when both are empty or both all zero).
template <typename Scalar>
double relative_error(const Scalar* ours, const Scalar* expected, Index n) {
  const double scale = max_abs(expected, n);
  const double diff = max_abs_diff(ours, expected, n);
  if (diff == 0) return 0;
  return scale > 0 ? diff / scale : std::numeric_limits<double>::infinity();
}

template <typename A, typename B>
double relative_error(const Eigen::MatrixBase<A>& ours, const Eigen::MatrixBase<B>& expected) {
  using Scalar = typename A::Scalar;
  if (ours.rows() != expected.rows() || ours.cols() != expected.cols())
    return std::numeric_limits<double>::infinity();
  const Matrix<Scalar> a = ours;
  const Matrix<Scalar> b = expected;
  return relative_error(a.data(), b.data(), a.size());
}

/// True when both have the same shape and identical bits (well, identical values: no NaN is expected).
template <typename A, typename B>
bool identical(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
}

/// Sequence b of a [B, T, C] row-major tensor as a [T, C] matrix.
template <typename Scalar>
Matrix<Scalar> sequence(const Tensor3<Scalar>& t, Index b) {
  return Eigen::Map<const Matrix<Scalar>>(t.data() + b * t.dimension(1) * t.dimension(2), t.dimension(1),
                                          t.dimension(2));
}

/// A tight tolerance for results that differ from each other only by the order of floating-point operations
/// (relative to the largest magnitude): a few hundred units in the last place.
template <typename Scalar>
double rounding_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-13;
}

// ---------------------------------------------------------------------------------------------------------
// Fixtures written by tests/generate_fixtures.py.

inline std::string fixture_dir() {
#if defined(HEAD_ATTENTION_FIXTURE_DIR)
  return HEAD_ATTENTION_FIXTURE_DIR;
#else
  return "fixtures";
#endif
}

/// The non-comment, whitespace-separated tokens of a text file. Throws std::runtime_error if it can't be
/// read.
inline std::vector<std::string> read_tokens(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<std::string> tokens;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] == '#') continue;
    std::istringstream words(line);
    std::string word;
    while (words >> word)
      tokens.push_back(word);
  }
  return tokens;
}

/// The cases listed in <fixture dir>[/subdir]/cases.txt.
inline std::vector<std::string> fixture_cases(const std::string& subdir = "") {
  return read_tokens(fixture_dir() + (subdir.empty() ? "" : "/" + subdir) + "/cases.txt");
}

template <typename Scalar>
Scalar parse_number(const std::string& token, const std::string& path) {
  char* end = nullptr;
  Scalar value;
  if constexpr (std::is_same<Scalar, float>::value)
    value = std::strtof(token.c_str(), &end);
  else
    value = static_cast<Scalar>(std::strtod(token.c_str(), &end));
  if (token.empty() || end != token.c_str() + token.size())
    throw std::runtime_error(path + ": bad number '" + token + "'");
  return value;
}

template <typename Scalar>
struct FixtureTensor {
  std::vector<Index> dims;
  std::vector<Scalar> values;  // row-major
};

/// One fixture: sizes, the six nn.Linear parameters, x [B, T, emb] and torch's out [B, T, head].
template <typename Scalar>
struct Fixture {
  std::string name;
  std::string dtype;
  long seed = 0;
  Index B = 0, T = 0, emb = 0, head = 0, max_seq_len = 0;
  double scale = 0;
  std::map<std::string, FixtureTensor<Scalar>> tensors;

  const FixtureTensor<Scalar>& tensor(const std::string& key, std::initializer_list<Index> dims) const {
    const auto it = tensors.find(key);
    if (it == tensors.end()) throw std::runtime_error(name + ": no tensor " + key);
    if (!std::equal(it->second.dims.begin(), it->second.dims.end(), dims.begin(), dims.end()))
      throw std::runtime_error(name + ": tensor " + key + " has unexpected dimensions");
    return it->second;
  }

  Matrix<Scalar> weight(const std::string& key) const {
    return Eigen::Map<const Matrix<Scalar>>(tensor(key, {head, emb}).values.data(), head, emb);
  }
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> bias(const std::string& key) const {
    return Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, 1>>(tensor(key, {head}).values.data(),
                                                                      head);
  }
  Tensor3<Scalar> x() const { return to_tensor(tensor("x", {B, T, emb})); }
  Tensor3<Scalar> out() const { return to_tensor(tensor("out", {B, T, head})); }

  /// A layer with this fixture's sizes and weights.
  head_attention::HeadAttention<Scalar> layer() const {
    head_attention::HeadAttention<Scalar> layer(emb, head, max_seq_len);
    layer.query().weight = weight("q.weight");
    layer.query().bias = bias("q.bias");
    layer.key().weight = weight("k.weight");
    layer.key().bias = bias("k.bias");
    layer.value().weight = weight("v.weight");
    layer.value().bias = bias("v.bias");
    return layer;
  }

 private:
  static Tensor3<Scalar> to_tensor(const FixtureTensor<Scalar>& t) {
    Tensor3<Scalar> out(t.dims[0], t.dims[1], t.dims[2]);
    std::copy(t.values.begin(), t.values.end(), out.data());
    return out;
  }
};

/// Reads [subdir/]<case>.f64.txt (double) or <case>.f32.txt (float). Throws std::runtime_error on a malformed
/// file.
template <typename Scalar>
Fixture<Scalar> load_fixture(const std::string& name, const std::string& subdir = "") {
  const std::string path = fixture_dir() + (subdir.empty() ? "" : "/" + subdir) + "/" + name +
                           (std::is_same<Scalar, float>::value ? ".f32.txt" : ".f64.txt");
  const std::vector<std::string> tokens = read_tokens(path);
  std::size_t pos = 0;
  const auto next = [&]() -> const std::string& {
    if (pos >= tokens.size()) throw std::runtime_error(path + ": unexpected end of file");
    return tokens[pos++];
  };
  const auto next_index = [&]() -> Index {
    const std::string& token = next();
    char* end = nullptr;
    const long long value = std::strtoll(token.c_str(), &end, 10);
    if (end != token.c_str() + token.size() || value < 0)
      throw std::runtime_error(path + ": bad size '" + token + "'");
    return static_cast<Index>(value);
  };
  const auto expect = [&](const std::string& word) {
    if (next() != word) throw std::runtime_error(path + ": expected '" + word + "'");
  };

  Fixture<Scalar> f;
  expect("head-attention-fixture");
  expect("1");
  expect("case");
  f.name = next();
  expect("dtype");
  f.dtype = next();
  expect("seed");
  f.seed = static_cast<long>(next_index());
  expect("sizes");
  f.B = next_index();
  f.T = next_index();
  f.emb = next_index();
  f.head = next_index();
  f.max_seq_len = next_index();
  expect("scale");
  f.scale = parse_number<double>(next(), path);
  for (;;) {
    const std::string& word = next();
    if (word == "end") break;
    if (word != "tensor") throw std::runtime_error(path + ": expected 'tensor' or 'end', got '" + word + "'");
    const std::string key = next();
    FixtureTensor<Scalar> t;
    const Index rank = next_index();
    Index count = 1;
    for (Index d = 0; d < rank; ++d) {
      t.dims.push_back(next_index());
      count *= t.dims.back();
    }
    t.values.reserve(static_cast<std::size_t>(count));
    for (Index i = 0; i < count; ++i)
      t.values.push_back(parse_number<Scalar>(next(), path));
    f.tensors[key] = std::move(t);
  }
  if (pos != tokens.size()) throw std::runtime_error(path + ": data after 'end'");
  if (f.name != name) throw std::runtime_error(path + ": case name mismatch");
  if (f.dtype != (std::is_same<Scalar, float>::value ? "float32" : "float64"))
    throw std::runtime_error(path + ": wrong dtype " + f.dtype);
  return f;
}

// ---------------------------------------------------------------------------------------------------------
// shape_error checks.

/// Runs f, which must throw head_attention::shape_error; returns its message ("" and a failed check if it
/// threw nothing or something else).
template <typename F>
std::string shape_error_message(F&& f) {
  try {
    f();
  } catch (const head_attention::shape_error& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL_CHECK("expected head_attention::shape_error, got another exception: " << e.what());
    return "";
  }
  FAIL_CHECK("expected head_attention::shape_error, nothing was thrown");
  return "";
}

/// f must throw head_attention::shape_error, be catchable as std::invalid_argument, and its message must
/// contain every one of `parts` (the quantity's name, the expected and the actual value).
template <typename F>
void check_shape_error(F&& f, std::initializer_list<std::string> parts) {
  CHECK_THROWS_AS(f(), head_attention::shape_error);
  CHECK_THROWS_AS(f(), std::invalid_argument);
  const std::string message = shape_error_message(f);
  INFO("message: " << message);
  for (const std::string& part : parts) {
    INFO("expected the message to contain: " << part);
    CHECK(message.find(part) != std::string::npos);
  }
}

}  // namespace ha_test

// safetensors.hpp: PyTorch's state_dict files (tests/generate_safetensors.py) in F64, F32, F16 and BF16 load
// and reproduce PyTorch's outputs; save then load round-trips bit-exactly; a prefix picks one head out of a
// multi-head file; and every malformed file is refused with the right exception type and message, the module
// left exactly as it was.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

#include <head_attention/safetensors.hpp>
#include <nlohmann/json.hpp>

#include "test_support.hpp"

namespace {

using namespace ha_test;
namespace fs = std::filesystem;
namespace st = head_attention::detail::safetensors;
using head_attention::format_error;
using head_attention::HeadAttention;
using head_attention::MultiHeadAttention;
using head_attention::shape_error;
using nlohmann::json;

std::string golden(const std::string& name) {
  return fixture_dir() + "/safetensors/" + name;
}

/// A fresh directory under the system's temp dir, removed with everything in it at the end of the scope.
class TempDir {
 public:
  TempDir() {
    std::random_device entropy;
    for (;;) {
      m_path = fs::temp_directory_path() /
               ("head_attention_safetensors_" + std::to_string(entropy()) + std::to_string(entropy()));
      if (fs::create_directory(m_path)) break;
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(m_path, ignored);
  }
  std::string file(const std::string& name) const { return (m_path / name).string(); }

 private:
  fs::path m_path;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out);
}

std::string le64(std::uint64_t v) {
  std::string s;
  for (int i = 0; i < 8; ++i, v >>= 8)
    s.push_back(static_cast<char>(v & 0xffu));
  return s;
}

/// A safetensors file from its header text and data section, as they are (nothing checked).
std::string file_bytes(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

/// One tensor of a file: its header entry (dtype, shape) and bytes.
struct RawTensor {
  std::string name;
  std::string dtype;
  json shape;
  std::string bytes;
};

/// The tensors of a valid file, in data order.
std::vector<RawTensor> tensors_of(const std::string& path) {
  const std::string raw = read_bytes(path);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = (n << 8) | static_cast<unsigned char>(raw[static_cast<std::size_t>(i)]);
  const json header = json::parse(raw.substr(8, n));
  const std::string data = raw.substr(8 + n);
  std::vector<std::pair<std::uint64_t, RawTensor>> found;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::uint64_t begin = it.value()["data_offsets"][0], end = it.value()["data_offsets"][1];
    found.push_back({begin,
                     {it.key(), it.value()["dtype"].get<std::string>(), it.value()["shape"],
                      data.substr(begin, end - begin)}});
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<RawTensor> tensors;
  for (auto& f : found)
    tensors.push_back(std::move(f.second));
  return tensors;
}

/// A file holding `tensors` back to back in the given order, its header optionally edited before it is
/// written, and `trailing` bytes after the data.
std::string layout(const std::vector<RawTensor>& tensors, const std::function<void(json&)>& edit = {},
                   const std::string& trailing = "") {
  json header = json::object();
  std::string data;
  for (const RawTensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  if (edit) edit(header);
  return file_bytes(header.dump(), data + trailing);
}

std::vector<RawTensor> without(std::vector<RawTensor> tensors, const std::string& name) {
  tensors.erase(
      std::remove_if(tensors.begin(), tensors.end(), [&](const RawTensor& t) { return t.name == name; }),
      tensors.end());
  return tensors;
}

RawTensor& find(std::vector<RawTensor>& tensors, const std::string& name) {
  for (RawTensor& t : tensors)
    if (t.name == name) return t;
  FAIL("no tensor " << name);
  return tensors.front();
}

std::string tril_bytes(std::size_t n) {
  std::string bytes(n * n, '\0');
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j <= i; ++j)
      bytes[i * n + j] = 1;
  return bytes;
}

/// Runs f, which must throw E; returns the message. For format_error also checks that it is a
/// std::runtime_error and not a std::invalid_argument; for shape_error the reverse.
template <typename E, typename F>
std::string expect_error(F&& f) {
  try {
    f();
  } catch (const E& e) {
    const std::exception& base = e;
    if (std::is_same<E, format_error>::value) {
      CHECK(dynamic_cast<const std::runtime_error*>(&base) != nullptr);
      CHECK(dynamic_cast<const std::invalid_argument*>(&base) == nullptr);
    } else {
      CHECK(dynamic_cast<const std::invalid_argument*>(&base) != nullptr);
      CHECK(dynamic_cast<const std::runtime_error*>(&base) == nullptr);
    }
    return e.what();
  } catch (const std::exception& e) {
    FAIL_CHECK("wrong exception type; message: " << e.what());
    return "";
  }
  FAIL_CHECK("nothing was thrown");
  return "";
}

template <typename Scalar>
using Linear = head_attention::Linear<Scalar>;

template <typename Scalar>
bool same(const Linear<Scalar>& a, const Linear<Scalar>& b) {
  return identical(a.weight, b.weight) && a.bias.size() == b.bias.size() &&
         (a.bias.array() == b.bias.array()).all();
}

/// Every output of `layer` on the sequences of x [B, T, emb] stacked: [B·T, out].
template <typename Layer, typename Scalar>
Matrix<Scalar> outputs(const Layer& layer, const head_attention::StoredTensor<Scalar>& x) {
  REQUIRE(x.shape.size() == 3);
  const Index B = x.shape[0], T = x.shape[1];
  const Matrix<Scalar> rows = x.matrix();  // [B·T, emb]
  Matrix<Scalar> out;
  for (Index b = 0; b < B; ++b) {
    const Matrix<Scalar> o = layer.forward(rows.middleRows(b * T, T));
    if (b == 0) out.resize(B * T, o.cols());
    out.middleRows(b * T, T) = o;
  }
  return out;
}

const std::vector<std::string> kDtypes = {"F64", "F32", "F16", "BF16"};

/// The bound of the golden comparison (relative to the output's largest magnitude): 1e-10 for float64 weights
/// in a double layer; 2e-5 whenever float32 arithmetic is involved, on either side (for F16 and BF16 the
/// reference is PyTorch's float32 output of the rounded weights).
template <typename Scalar>
double golden_bound(const std::string& dtype) {
  return std::is_same<Scalar, double>::value && dtype == "F64" ? 1e-10 : 2e-5;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Conversions.

TEST_CASE("F16 and BF16 convert exactly, all 65536 bit patterns against Eigen::half and Eigen::bfloat16",
          "[safetensors]") {
  int nan = 0;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const std::uint16_t bits = static_cast<std::uint16_t>(b);
    const float half = st::half_to_float(bits);
    const float eigen_half = static_cast<float>(Eigen::half(Eigen::half_impl::raw_uint16_to_half(bits)));
    const float bf16 = st::bfloat16_to_float(bits);
    const float eigen_bf16 =
        static_cast<float>(Eigen::bfloat16(Eigen::bfloat16_impl::raw_uint16_to_bfloat16(bits)));
    if (std::isnan(eigen_half)) {
      ++nan;
      CHECK(std::isnan(half));
    } else if (!(half == eigen_half && std::signbit(half) == std::signbit(eigen_half))) {
      FAIL_CHECK("F16 0x" << std::hex << b << ": " << half << " != " << eigen_half);
    }
    if (std::isnan(eigen_bf16))
      CHECK(std::isnan(bf16));
    else if (!(bf16 == eigen_bf16 && std::signbit(bf16) == std::signbit(eigen_bf16)))
      FAIL_CHECK("BF16 0x" << std::hex << b << ": " << bf16 << " != " << eigen_bf16);
  }
  CHECK(nan == 2 * 1023);  // exponent 31 with a non-zero mantissa, both signs
  CHECK(st::half_to_float(0x0001) == std::ldexp(1.0f, -24));  // the smallest subnormal
  CHECK(st::half_to_float(0x7bff) == 65504.0f);               // the largest finite half
  CHECK(st::bfloat16_to_float(0x3f80) == 1.0f);
}

// ---------------------------------------------------------------------------------------------------------
// Golden files from PyTorch.

TEMPLATE_TEST_CASE("golden: PyTorch's HeadAttention state_dict in F64, F32, F16 and BF16", "[safetensors]",
                   float, double) {
  using Scalar = TestType;
  std::ostringstream measured;
  for (const std::string& dtype : kDtypes) {
    INFO("head." << dtype);
    HeadAttention<Scalar> layer(16, 8, 12, 99);
    head_attention::load_state_dict(layer, golden("head." + dtype + ".safetensors"));
    const std::string io = golden("head." + dtype + ".io.safetensors");
    const auto x = head_attention::load_tensor<Scalar>(io, "x");
    const auto expected = head_attention::load_tensor<Scalar>(io, "out");
    REQUIRE(x.shape == std::vector<Index>{2, 10, 16});
    REQUIRE(expected.shape == std::vector<Index>{2, 10, 8});
    const double error = relative_error(outputs(layer, x), expected.matrix());
    CHECK(error <= golden_bound<Scalar>(dtype));
    measured << " " << dtype << " " << error;
  }
  WARN("HeadAttention<" << scalar_name<Scalar>() << "> vs PyTorch, relative error:" << measured.str());
}

TEMPLATE_TEST_CASE("golden: PyTorch's MultiHeadAttention state_dict in F64, F32, F16 and BF16",
                   "[safetensors]", float, double) {
  using Scalar = TestType;
  std::ostringstream measured;
  for (const std::string& dtype : kDtypes) {
    INFO("mha." << dtype);
    MultiHeadAttention<Scalar> mha(3, 16, 8, 12, 0.1, 99);
    head_attention::load_state_dict(mha, golden("mha." + dtype + ".safetensors"));
    const std::string io = golden("mha." + dtype + ".io.safetensors");
    const auto x = head_attention::load_tensor<Scalar>(io, "x");
    const auto expected = head_attention::load_tensor<Scalar>(io, "out");
    REQUIRE(x.shape == std::vector<Index>{2, 10, 16});
    REQUIRE(expected.shape == std::vector<Index>{2, 10, 16});
    const double error = relative_error(outputs(mha, x), expected.matrix());
    CHECK(error <= golden_bound<Scalar>(dtype));
    measured << " " << dtype << " " << error;
  }
  WARN("MultiHeadAttention<" << scalar_name<Scalar>() << "> vs PyTorch, relative error:" << measured.str());
}

TEMPLATE_TEST_CASE("16-bit modules: PyTorch's F16 / BF16 files, and save then load bit-exactly",
                   "[safetensors]", Eigen::half, Eigen::bfloat16) {
  using Scalar = TestType;
  const bool half = std::is_same<Scalar, Eigen::half>::value;
  const std::string dtype = half ? "F16" : "BF16";
  // The weights load exactly (the file's own type); x is rounded to 16 bits and so are the outputs: the
  // bounds of a 16-bit layer against a double definition (unit-precision.cpp).
  const double bound = half ? 1e-3 : 1e-2;
  HeadAttention<Scalar> layer(16, 8, 12, 99);
  head_attention::load_state_dict(layer, golden("head." + dtype + ".safetensors"));
  const std::string io = golden("head." + dtype + ".io.safetensors");
  const double head_error = relative_error(
      Matrix<float>(outputs(layer, head_attention::load_tensor<Scalar>(io, "x")).template cast<float>()),
      head_attention::load_tensor<float>(io, "out").matrix());
  CHECK(head_error <= bound);

  MultiHeadAttention<Scalar> mha(3, 16, 8, 12, 0.1, 99);
  head_attention::load_state_dict(mha, golden("mha." + dtype + ".safetensors"));
  const std::string mha_io = golden("mha." + dtype + ".io.safetensors");
  const double mha_error = relative_error(
      Matrix<float>(outputs(mha, head_attention::load_tensor<Scalar>(mha_io, "x")).template cast<float>()),
      head_attention::load_tensor<float>(mha_io, "out").matrix());
  CHECK(mha_error <= bound);
  WARN("MultiHeadAttention<" << dtype << "> vs PyTorch: head " << head_error << ", multi-head " << mha_error);

  // Saved as the module's own dtype: the file loads back bit-exactly, and into float exactly too.
  const TempDir dir;
  head_attention::save_state_dict(mha, dir.file("mha.safetensors"));
  MultiHeadAttention<Scalar> copy(3, 16, 8, 12, 0.1, 6);
  head_attention::load_state_dict(copy, dir.file("mha.safetensors"));
  for (Index h = 0; h < 3; ++h)
    CHECK(same(mha.head(h).value(), copy.head(h).value()));
  CHECK(same(mha.projection(), copy.projection()));
  const auto weight = head_attention::load_tensor<float>(dir.file("mha.safetensors"), "_layer.weight");
  CHECK(identical(weight.matrix(), mha.projection().weight.template cast<float>()));
}

TEMPLATE_TEST_CASE("a prefix loads one head of a multi-head file", "[safetensors]", float, double) {
  using Scalar = TestType;
  const std::string path = golden("mha.F64.safetensors");
  MultiHeadAttention<Scalar> mha(3, 16, 8, 12, 0.1, 1);
  head_attention::load_state_dict(mha, path);
  const auto x = head_attention::load_tensor<Scalar>(golden("mha.F64.io.safetensors"), "x");
  for (Index h = 0; h < 3; ++h) {
    INFO("head " << h);
    HeadAttention<Scalar> head(16, 8, 12, 2);
    head_attention::load_state_dict(head, path, "_heads." + std::to_string(h) + ".");
    CHECK(same(head.query(), mha.head(h).query()));
    CHECK(same(head.key(), mha.head(h).key()));
    CHECK(same(head.value(), mha.head(h).value()));
    CHECK(identical(outputs(head, x), outputs(mha.head(h), x)));
    // The file's value, converted: _heads.h._q.weight as load_tensor reads it.
    CHECK(identical(
        head.query().weight,
        head_attention::load_tensor<Scalar>(path, "_heads." + std::to_string(h) + "._q.weight").matrix()));
  }

  HeadAttention<Scalar> head(16, 8, 12, 2);
  const Linear<Scalar> q = head.query();
  // Without a prefix the keys are those of the multi-head layer: every head key missing, all others
  // unexpected.
  std::string message = expect_error<shape_error>([&] { head_attention::load_state_dict(head, path); });
  CHECK(message.find("missing key(s): _q.weight") != std::string::npos);
  CHECK(message.find("unexpected key(s): _heads.0._k.bias") != std::string::npos);
  // A head that is not there; and "_heads.1" without its dot does not select "_heads.10.", nor "_heads.1.".
  message = expect_error<shape_error>([&] { head_attention::load_state_dict(head, path, "_heads.3."); });
  CHECK(message.find("under prefix '_heads.3.'") != std::string::npos);
  CHECK(message.find("missing key(s): _heads.3._q.weight") != std::string::npos);
  message = expect_error<shape_error>([&] { head_attention::load_state_dict(head, path, "_heads.1"); });
  CHECK(message.find("missing key(s): _heads.1_q.weight") != std::string::npos);
  CHECK(message.find("unexpected key(s): _heads.1._k.bias") != std::string::npos);
  CHECK(same(head.query(), q));
}

// ---------------------------------------------------------------------------------------------------------
// Save.

TEMPLATE_TEST_CASE("save then load round-trips bit-exactly, with and without a prefix", "[safetensors]",
                   float, double) {
  using Scalar = TestType;
  const TempDir dir;
  const HeadAttention<Scalar> a(16, 8, 12, 1);
  const std::string path = dir.file("head.safetensors");
  head_attention::save_state_dict(a, path);
  HeadAttention<Scalar> b(16, 8, 12, 2);
  REQUIRE_FALSE(same(a.query(), b.query()));
  head_attention::load_state_dict(b, path);
  CHECK(same(a.query(), b.query()));
  CHECK(same(a.key(), b.key()));
  CHECK(same(a.value(), b.value()));
  const Matrix<Scalar> x = random_matrix<Scalar>(12, 16, 3);
  CHECK(identical(a.forward(x), b.forward(x)));

  head_attention::save_state_dict(a, dir.file("prefixed.safetensors"), "model.blocks.0.attn.");
  HeadAttention<Scalar> c(16, 8, 12, 4);
  head_attention::load_state_dict(c, dir.file("prefixed.safetensors"), "model.blocks.0.attn.");
  CHECK(same(a.value(), c.value()));
  CHECK_THROWS_AS(head_attention::load_state_dict(c, dir.file("prefixed.safetensors")), shape_error);

  const MultiHeadAttention<Scalar> m(3, 16, 8, 12, 0.1, 5);
  head_attention::save_state_dict(m, dir.file("mha.safetensors"));
  MultiHeadAttention<Scalar> n(3, 16, 8, 12, 0.1, 6);
  head_attention::load_state_dict(n, dir.file("mha.safetensors"));
  for (Index h = 0; h < 3; ++h) {
    CHECK(same(m.head(h).query(), n.head(h).query()));
    CHECK(same(m.head(h).key(), n.head(h).key()));
    CHECK(same(m.head(h).value(), n.head(h).value()));
  }
  CHECK(same(m.projection(), n.projection()));
  CHECK(identical(m.forward(x), n.forward(x)));

  // float written as F32 loads into double exactly (every float is a double).
  if (std::is_same<Scalar, float>::value) {
    HeadAttention<double> wide(16, 8, 12, 7);
    head_attention::load_state_dict(wide, path);
    CHECK(identical(wide.key().weight, a.key().weight.template cast<double>()));
  }
}

TEMPLATE_TEST_CASE("save writes PyTorch's state_dict: its names, the masks, an aligned data section",
                   "[safetensors]", float, double) {
  using Scalar = TestType;
  const TempDir dir;
  const std::string path = dir.file("mha.safetensors");
  head_attention::save_state_dict(MultiHeadAttention<Scalar>(2, 6, 4, 5, 0.1, 1), path);
  const std::string raw = read_bytes(path);
  REQUIRE(raw.size() >= 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = (n << 8) | static_cast<unsigned char>(raw[static_cast<std::size_t>(i)]);
  CHECK((8 + n) % 8 == 0);
  const json header = json::parse(raw.substr(8, n));
  std::set<std::string> keys;
  for (auto it = header.begin(); it != header.end(); ++it)
    keys.insert(it.key());
  std::set<std::string> expected = {"__metadata__", "_layer.weight", "_layer.bias"};
  for (const char* h : {"_heads.0.", "_heads.1."})
    for (const char* p :
         {"_q.weight", "_q.bias", "_k.weight", "_k.bias", "_v.weight", "_v.bias", "_tril_mask"})
      expected.insert(std::string(h) + p);
  CHECK(keys == expected);
  const char* dtype = std::is_same<Scalar, float>::value ? "F32" : "F64";
  CHECK(header.at("_layer.weight").at("dtype") == dtype);
  CHECK(header.at("_layer.weight").at("shape") == json({6, 8}));
  CHECK(header.at("_heads.1._q.bias").at("shape") == json({4}));
  CHECK(header.at("__metadata__").at("format") == "pt");
  CHECK(header.at("_heads.0._tril_mask").at("dtype") == "BOOL");
  CHECK(header.at("_heads.0._tril_mask").at("shape") == json({5, 5}));
  for (const RawTensor& t : tensors_of(path)) {
    if (t.name.find("_tril_mask") != std::string::npos) CHECK(t.bytes == tril_bytes(5));
  }
  // Every tensor starts at a multiple of its element size (floats first, then the masks).
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::uint64_t alignment = it.value().at("dtype") == "BOOL" ? 1 : sizeof(Scalar);
    CHECK(it.value().at("data_offsets").at(0).get<std::uint64_t>() % alignment == 0);
  }
}

TEST_CASE("save refuses a layer with a malformed projection, and a path it cannot write", "[safetensors]") {
  const TempDir dir;
  HeadAttention<double> layer(6, 4, 5, 1);
  layer.key().weight.resize(4, 7);
  std::string message =
      expect_error<shape_error>([&] { head_attention::save_state_dict(layer, dir.file("x")); });
  CHECK(message.find("key().weight shape") != std::string::npos);
  CHECK_FALSE(fs::exists(dir.file("x")));

  const HeadAttention<double> good(6, 4, 5, 1);
  message = expect_error<format_error>(
      [&] { head_attention::save_state_dict(good, dir.file("no/such/dir/x.safetensors")); });
  CHECK(message.find("cannot open the file for writing") != std::string::npos);

  MultiHeadAttention<float> mha(2, 6, 4, 5, 0.1, 1);
  mha.projection().bias.resize(5);
  message = expect_error<shape_error>([&] { head_attention::save_state_dict(mha, dir.file("y")); });
  CHECK(message.find("projection().bias size") != std::string::npos);
}

TEST_CASE("load_tensor and save_tensors", "[safetensors]") {
  const TempDir dir;
  head_attention::StoredTensor<float> t;
  t.shape = {2, 3, 2};
  for (int i = 0; i < 12; ++i)
    t.values.push_back(0.25f * static_cast<float>(i) - 1.0f);
  head_attention::save_tensors<float>(dir.file("t.safetensors"), {{"x", t}});
  const auto back = head_attention::load_tensor<double>(dir.file("t.safetensors"), "x");
  CHECK(back.shape == t.shape);
  CHECK(back.values == std::vector<double>(t.values.begin(), t.values.end()));
  CHECK(back.matrix().rows() == 6);
  CHECK(back.matrix().cols() == 2);
  const std::string message = expect_error<shape_error>(
      [&] { (void)head_attention::load_tensor<float>(dir.file("t.safetensors"), "y"); });
  CHECK(message.find("no tensor 'y'") != std::string::npos);
  t.values.pop_back();
  CHECK_THROWS_AS(head_attention::save_tensors<float>(dir.file("u.safetensors"), {{"x", t}}), shape_error);
}

// ---------------------------------------------------------------------------------------------------------
// Malformed files.

namespace {

constexpr Index kEmb = 6, kHead = 4, kMax = 5;

enum class Expect { format, shape };

struct Case {
  std::string name;
  std::string bytes;
  Expect expect;
  std::string fragment;
};

/// The malformed files, built from the valid tensors of a HeadAttention(kEmb, kHead, kMax) saved in F64.
std::vector<Case> malformed_cases(const std::vector<RawTensor>& valid) {
  const std::string good = layout(valid);
  std::uint64_t data_size = 0;
  for (const RawTensor& t : valid)
    data_size += t.bytes.size();
  std::vector<Case> cases;
  const auto add = [&](std::string name, std::string bytes, Expect expect, std::string fragment) {
    cases.push_back({std::move(name), std::move(bytes), expect, std::move(fragment)});
  };
  const auto edited = [&](const std::function<void(json&)>& edit) { return layout(valid, edit); };
  const Expect F = Expect::format, S = Expect::shape;

  // The frame.
  add("empty file", "", F, "truncated: 0 bytes");
  add("truncated in the header length", good.substr(0, 5), F, "truncated: 5 bytes");
  add("truncated in the header", good.substr(0, 20), F, "past the end of the file");
  add("truncated in the data section", good.substr(0, good.size() - 10), F, "out of range");
  add("header length past the end", le64(1000) + "{}", F, "header length 1000 is past the end of the file");
  add("header length over the cap", le64(200000000) + "{}", F, "exceeds the cap of 100000000 bytes");
  add("header length 2^64 - 1", le64(~std::uint64_t{0}) + "{}", F, "exceeds the cap");
  // The JSON.
  add("invalid JSON", file_bytes(R"({"_q.weight": {"dtype": )", ""), F, "not valid UTF-8 JSON");
  add("JSON followed by garbage", file_bytes("{} x", ""), F, "not valid UTF-8 JSON");
  add("a JSON array", file_bytes("[]", ""), F, "must start with '{'");
  add("empty header", file_bytes("", ""), F, "must start with '{'");
  add("invalid UTF-8 in a key", file_bytes("{\"_q.weight\xff\xfe\": {}}", ""), F, "ill-formed UTF-8");
  add("a lone UTF-8 continuation byte", file_bytes("{\"__metadata__\": {\"a\": \"\x80\"}}", ""), F,
      "ill-formed UTF-8");
  {
    // The same tensor named twice, pointing at the same bytes: nlohmann alone would keep the second silently.
    const std::string original = good.substr(8, good.size() - 8 - data_size);
    const std::string data = good.substr(good.size() - data_size);
    std::string header = original;
    header.insert(1, "\"_q.bias\":" + json::parse(original).at("_q.bias").dump() + ",");
    add("duplicate tensor key", file_bytes(header, data), F, "duplicate key '_q.bias'");
    std::string twice = original;
    const std::string dtype = "\"dtype\":\"F64\"";
    twice.insert(twice.find(dtype) + dtype.size(), "," + dtype);
    add("duplicate field in an entry", file_bytes(twice, data), F, "duplicate key 'dtype'");
  }
  add("header entry not an object", edited([](json& h) { h["_q.bias"] = 3; }), F, "must be an object");
  add("__metadata__ not strings", edited([](json& h) {
        h["__metadata__"] = {{"format", 1}};
      }),
      F, "__metadata__ entry 'format' is not a string");
  add("an entry without data_offsets", edited([](json& h) { h["_q.bias"].erase("data_offsets"); }), F,
      "tensor '_q.bias': no data_offsets");
  add("an entry with an unknown field", edited([](json& h) { h["_q.bias"]["offsets"] = 0; }), F,
      "unexpected field 'offsets'");
  // Offsets.
  add("offsets out of range", edited([&](json& h) { h["_v.weight"]["data_offsets"][1] = data_size + 8; }), F,
      "out of range: the data section has " + std::to_string(data_size) + " bytes");
  add("offsets begin > end", edited([](json& h) {
        h["_q.bias"]["data_offsets"] = {64, 32};
      }),
      F, "out of range");
  add("negative offsets", edited([](json& h) {
        h["_q.bias"]["data_offsets"] = {-8, 24};
      }),
      F, "two non-negative integers");
  add("fractional offsets", edited([](json& h) {
        h["_q.bias"]["data_offsets"] = {0.0, 32.0};
      }),
      F, "two non-negative integers");
  add("three offsets", edited([](json& h) {
        h["_q.bias"]["data_offsets"] = {0, 16, 32};
      }),
      F, "data_offsets must be [begin, end]");
  add("overlapping tensors", edited([](json& h) {
        // valid[1] (_k.weight) moved 8 bytes back: it overlaps valid[0] and leaves a gap at its end.
        h["_k.weight"]["data_offsets"][0] = h["_k.weight"]["data_offsets"][0].get<std::uint64_t>() - 8;
        h["_k.weight"]["data_offsets"][1] = h["_k.weight"]["data_offsets"][1].get<std::uint64_t>() - 8;
      }),
      F, "overlap");
  {
    std::vector<RawTensor> gap = valid;
    find(gap, "_q.bias").bytes +=
        std::string(8, '\0');  // 8 bytes of the data section after _q.bias: nobody's
    add("a gap between tensors (non-contiguous)",
        layout(gap,
               [](json& h) {
                 h["_q.bias"]["data_offsets"][1] = h["_q.bias"]["data_offsets"][1].get<std::uint64_t>() - 8;
               }),
        F, "gap in the data section: bytes [");
  }
  add("trailing bytes after the last tensor", layout(valid, {}, std::string(8, '\0')), F,
      "gap in the data section: its last 8 bytes");
  // Sizes and dtypes.
  add("byte size != shape x dtype size", edited([](json& h) { h["_q.bias"]["shape"] = {5}; }), F,
      "data_offsets give 32 bytes, but shape [5] of F64 needs 40");
  add("byte size != shape x dtype size (dtype)", edited([](json& h) { h["_q.bias"]["dtype"] = "F32"; }), F,
      "needs 16");
  add("element count overflow", edited([](json& h) {
        h["_q.bias"]["shape"] = {1ull << 32, 1ull << 32, 1ull << 32};
      }),
      F, "overflows");
  add("byte size overflow", edited([](json& h) { h["_q.bias"]["shape"] = {1ull << 62}; }), F, "byte size");
  add("unknown dtype", edited([](json& h) { h["_q.bias"]["dtype"] = "F128"; }), F, "unknown dtype 'F128'");
  add("a dtype that is not a parameter's", edited([](json& h) { h["_q.bias"]["dtype"] = "I64"; }), F,
      "tensor '_q.bias' has dtype I64; it must be one of F64, F32, F16, BF16");
  // The module.
  add("wrong shape for the module", edited([](json& h) {
        h["_k.weight"]["shape"] = {kEmb, kHead};
      }),
      S, "the shape of '_k.weight' must be [4, 6], got [6, 4]");
  add("wrong rank for the module", edited([](json& h) {
        h["_k.bias"]["shape"] = {kHead, 1};
      }),
      S, "the shape of '_k.bias' must be [4], got [4, 1]");
  add("missing key", layout(without(valid, "_v.bias")), S, "missing key(s): _v.bias");
  {
    std::vector<RawTensor> extra = valid;
    extra.push_back({"_extra", "F64", json({1}), std::string(8, '\0')});
    add("extra key", layout(extra), S, "unexpected key(s): _extra");
    extra.push_back({"_tril_mask_2", "BOOL", json({1}), std::string(1, '\1')});
    add("missing and extra keys", layout(without(extra, "_q.weight")), S,
        "missing key(s): _q.weight; unexpected key(s): _extra, _tril_mask_2");
  }
  // The mask buffer.
  {
    std::vector<RawTensor> mask = valid;
    find(mask, "_tril_mask").bytes[1] = 1;  // [0, 1]: above the diagonal
    add("_tril_mask not lower-triangular", layout(mask), F, "'_tril_mask' is not the causal mask");
    mask = valid;
    find(mask, "_tril_mask").bytes[kMax + 0] = 0;  // [1, 0]: below the diagonal, false
    add("_tril_mask with a hole", layout(mask), F, "entry [1, 0] is false");
    mask = valid;
    find(mask, "_tril_mask").bytes[0] = 2;
    add("_tril_mask byte not a BOOL", layout(mask), F, "is byte 2, not a BOOL");
    mask = valid;
    find(mask, "_tril_mask") = {"_tril_mask", "BOOL", json({kMax + 1, kMax + 1}), tril_bytes(kMax + 1)};
    add("_tril_mask of the wrong size", layout(mask), S,
        "the shape of '_tril_mask' (max_seq_len) must be [5, 5], got [6, 6]");
    mask = valid;
    find(mask, "_tril_mask").dtype = "U8";
    add("_tril_mask not BOOL", layout(mask), F, "'_tril_mask' has dtype U8; it must be BOOL");
  }
  return cases;
}

template <typename Scalar>
void check_same_layer(const HeadAttention<Scalar>& layer, const HeadAttention<Scalar>& before) {
  CHECK(same(layer.query(), before.query()));
  CHECK(same(layer.key(), before.key()));
  CHECK(same(layer.value(), before.value()));
  const Matrix<Scalar> x = random_matrix<Scalar>(kMax, kEmb, 21);
  CHECK(identical(layer.forward(x), before.forward(x)));
}

}  // namespace

TEMPLATE_TEST_CASE("malformed files are refused, naming the problem, and the layer is unchanged",
                   "[safetensors][bad-input]", float, double) {
  using Scalar = TestType;
  const TempDir dir;
  const std::string valid_path = dir.file("valid.safetensors");
  head_attention::save_state_dict(HeadAttention<double>(kEmb, kHead, kMax, 7), valid_path);
  const std::vector<RawTensor> valid = tensors_of(valid_path);
  REQUIRE(valid.size() == 7);

  HeadAttention<Scalar> layer(kEmb, kHead, kMax, 8);
  const HeadAttention<Scalar> before = layer;

  // The unmodified layout loads, with and without the mask (a buffer, optional).
  {
    HeadAttention<Scalar> probe(kEmb, kHead, kMax, 9);
    write_bytes(dir.file("good.safetensors"), layout(valid));
    head_attention::load_state_dict(probe, dir.file("good.safetensors"));
    write_bytes(dir.file("no_mask.safetensors"), layout(without(valid, "_tril_mask")));
    head_attention::load_state_dict(probe, dir.file("no_mask.safetensors"));
    write_bytes(dir.file("metadata.safetensors"), layout(valid, [](json& h) {
                  h["__metadata__"] = {{"format", "pt"}, {"note", "ü"}};
                }));
    head_attention::load_state_dict(probe, dir.file("metadata.safetensors"));
    write_bytes(dir.file("padded.safetensors"), file_bytes(json::parse("{}").dump() + "    ", ""));
    CHECK_THROWS_AS(head_attention::load_state_dict(probe, dir.file("padded.safetensors")), shape_error);
  }

  const std::vector<Case> cases = malformed_cases(valid);
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    INFO("case: " << c.name);
    const std::string path = dir.file("case" + std::to_string(i) + ".safetensors");
    write_bytes(path, c.bytes);
    const auto load = [&] { head_attention::load_state_dict(layer, path); };
    const std::string message =
        c.expect == Expect::format ? expect_error<format_error>(load) : expect_error<shape_error>(load);
    INFO("message: " << message);
    CHECK(message.find(c.fragment) != std::string::npos);
    CHECK(message.find(path) != std::string::npos);  // the file is named
    check_same_layer(layer, before);
  }
  WARN(cases.size() << " malformed files refused");

  const std::string missing = dir.file("does_not_exist.safetensors");
  const std::string message =
      expect_error<format_error>([&] { head_attention::load_state_dict(layer, missing); });
  CHECK(message.find("cannot open the file") != std::string::npos);
  check_same_layer(layer, before);
}

TEMPLATE_TEST_CASE("a failed multi-head load leaves every head and the projection unchanged",
                   "[safetensors][bad-input]", float, double) {
  using Scalar = TestType;
  const TempDir dir;
  const std::string valid_path = dir.file("valid.safetensors");
  head_attention::save_state_dict(MultiHeadAttention<double>(3, kEmb, kHead, kMax, 0.1, 7), valid_path);
  const std::vector<RawTensor> valid = tensors_of(valid_path);

  MultiHeadAttention<Scalar> mha(3, kEmb, kHead, kMax, 0.1, 8);
  const MultiHeadAttention<Scalar> before = mha;
  const auto check_unchanged = [&] {
    for (Index h = 0; h < 3; ++h) {
      CHECK(same(mha.head(h).query(), before.head(h).query()));
      CHECK(same(mha.head(h).key(), before.head(h).key()));
      CHECK(same(mha.head(h).value(), before.head(h).value()));
    }
    CHECK(same(mha.projection(), before.projection()));
  };

  std::vector<Case> cases;
  {
    // The last mask is checked after every parameter has been read and converted: still nothing assigned.
    std::vector<RawTensor> t = valid;
    find(t, "_heads.2._tril_mask").bytes[1] = 1;
    cases.push_back(
        {"bad mask of the last head", layout(t), Expect::format, "'_heads.2._tril_mask' is not the causal"});
  }
  cases.push_back({"missing head key", layout(without(valid, "_heads.1._v.weight")), Expect::shape,
                   "missing key(s): _heads.1._v.weight"});
  {
    std::vector<RawTensor> t = valid;
    t.push_back({"_heads.3._q.bias", "F64", json({kHead}), std::string(8 * kHead, '\0')});
    cases.push_back({"a fourth head", layout(t), Expect::shape, "unexpected key(s): _heads.3._q.bias"});
  }
  {
    // Written this way, not as a lambda assigning `= {a, b}` inside the braced Case: built by clang 14 with
    // AddressSanitizer, that form leaked the shape array it replaced (LeakSanitizer, the asan-ubsan CI job).
    const auto transpose_projection = [](json& h) {
      h["_layer.weight"]["shape"] = json::array({3 * kHead, kEmb});
    };
    cases.push_back({"projection of the wrong shape", layout(valid, transpose_projection), Expect::shape,
                     "the shape of '_layer.weight' must be [6, 12], got [12, 6]"});
  }
  cases.push_back({"a head's weight in an unknown dtype",
                   layout(valid, [](json& h) { h["_heads.2._k.weight"]["dtype"] = "Q4"; }), Expect::format,
                   "unknown dtype 'Q4'"});

  for (std::size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    INFO("case: " << c.name);
    const std::string path = dir.file("case" + std::to_string(i) + ".safetensors");
    write_bytes(path, c.bytes);
    const auto load = [&] { head_attention::load_state_dict(mha, path); };
    const std::string message =
        c.expect == Expect::format ? expect_error<format_error>(load) : expect_error<shape_error>(load);
    INFO("message: " << message);
    CHECK(message.find(c.fragment) != std::string::npos);
    check_unchanged();
  }

  // The same file minus its masks loads; and a file of the right keys for other sizes does not.
  write_bytes(dir.file("no_masks.safetensors"),
              layout(without(without(without(valid, "_heads.0._tril_mask"), "_heads.1._tril_mask"),
                             "_heads.2._tril_mask")));
  head_attention::load_state_dict(mha, dir.file("no_masks.safetensors"));
  MultiHeadAttention<Scalar> two(2, kEmb, kHead, kMax, 0.1, 1);
  const std::string message =
      expect_error<shape_error>([&] { head_attention::load_state_dict(two, valid_path); });
  CHECK(message.find("unexpected key(s): _heads.2._k.bias") != std::string::npos);
}

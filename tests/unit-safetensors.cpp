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

// ---------------------------------------------------------------------------------------------------------
// SafetensorsFile: the fixtures as generate_safetensors.py wrote them (manifest.json), every dtype, every way
// of opening.

namespace {

using head_attention::SafetensorsFile;

const json& manifest() {
  static const json m = json::parse(read_bytes(golden("manifest.json")));
  return m;
}

std::vector<unsigned char> file_vector(const std::string& path) {
  const std::string raw = read_bytes(path);
  return std::vector<unsigned char>(raw.begin(), raw.end());
}

/// The manifest's entry for one file (dtype and shape of each tensor, metadata) against what `file` reads.
void check_listing(const SafetensorsFile& file, const json& expected) {
  std::vector<std::string> names;
  for (auto it = expected.at("tensors").begin(); it != expected.at("tensors").end(); ++it)
    names.push_back(it.key());
  std::sort(names.begin(), names.end());
  CHECK(file.names() == names);
  for (const std::string& name : names) {
    INFO("tensor " << name);
    const json& e = expected.at("tensors").at(name);
    CHECK(file.contains(name));
    const head_attention::TensorInfo& info = file.info(name);
    CHECK(info.dtype == e.at("dtype").get<std::string>());
    const std::vector<Index> shape = e.at("shape").get<std::vector<Index>>();
    CHECK(info.shape == shape);
    Index count = 1;
    for (Index d : shape)
      count *= d;
    CHECK(info.count == count);
  }
  CHECK_FALSE(file.contains("no such tensor"));
  CHECK(file.metadata() == expected.at("metadata").get<std::map<std::string, std::string>>());
}

/// Whether an integer value of the manifest (a JSON integer or boolean) fits the integer type T.
template <typename T>
bool fits(const json& v) {
  if (v.is_boolean()) return true;
  if (v.is_number_unsigned())
    return v.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<T>::max());
  return std::is_signed<T>::value &&
         v.get<std::int64_t>() >= static_cast<std::int64_t>(std::numeric_limits<T>::min());
}

template <typename T>
T as(const json& v) {
  if (v.is_boolean()) return static_cast<T>(v.get<bool>());
  if (v.is_number_unsigned()) return static_cast<T>(v.get<std::uint64_t>());
  return static_cast<T>(v.get<std::int64_t>());
}

std::string text(const json& v) {
  return v.is_boolean() ? (v.get<bool>() ? "1" : "0") : v.dump();
}

const std::vector<std::string> kIntegerTensors = {"i64", "i32", "i16", "i8",   "u64",
                                                  "u32", "u16", "u8",  "bool", "empty"};

/// Every integer tensor of dtypes.safetensors into integer type T: the values when all fit, otherwise
/// format_error naming the first element that does not.
template <typename T>
void check_integer_target(const SafetensorsFile& file) {
  const json& values = manifest().at("values").at("dtypes.safetensors");
  for (const std::string& name : kIntegerTensors) {
    INFO("tensor " << name << " into " << head_attention::detail::safetensors::type_name<T>());
    const json& expected = values.at(name);
    std::size_t first_bad = expected.size();
    for (std::size_t i = 0; i < expected.size() && first_bad == expected.size(); ++i)
      if (!fits<T>(expected[i])) first_bad = i;
    if (first_bad == expected.size()) {
      const head_attention::StoredTensor<T> t = file.tensor<T>(name);
      CHECK(t.shape == file.info(name).shape);
      REQUIRE(t.values.size() == expected.size());
      for (std::size_t i = 0; i < expected.size(); ++i)
        CHECK(t.values[i] == as<T>(expected[i]));
    } else {
      const std::string message = expect_error<format_error>([&] { (void)file.tensor<T>(name); });
      CHECK(message.find("tensor '" + name + "': element " + std::to_string(first_bad) + " is " +
                         text(expected[first_bad]) + " (" + file.info(name).dtype + ")") !=
            std::string::npos);
    }
  }
}

/// Integer tensors into floating type T: `refused` maps a tensor to the index of its first element T
/// cannot hold exactly (worked out by hand from the values of generate_safetensors.py); the others must
/// load exactly.
template <typename T>
void check_floating_target(const SafetensorsFile& file, const std::map<std::string, std::size_t>& refused) {
  const json& values = manifest().at("values").at("dtypes.safetensors");
  for (const std::string& name : kIntegerTensors) {
    INFO("tensor " << name << " into " << head_attention::detail::safetensors::type_name<T>());
    const json& expected = values.at(name);
    const auto bad = refused.find(name);
    if (bad == refused.end()) {
      const head_attention::StoredTensor<T> t = file.tensor<T>(name);
      REQUIRE(t.values.size() == expected.size());
      for (std::size_t i = 0; i < expected.size(); ++i) {
        const long double want = expected[i].is_boolean() ? (expected[i].get<bool>() ? 1.0L : 0.0L)
                                 : expected[i].is_number_unsigned()
                                     ? static_cast<long double>(expected[i].get<std::uint64_t>())
                                     : static_cast<long double>(expected[i].get<std::int64_t>());
        // Eigen's 16-bit types convert to float, which holds them exactly.
        const long double got = sizeof(T) == 2 ? static_cast<long double>(static_cast<float>(t.values[i]))
                                               : static_cast<long double>(t.values[i]);
        CHECK(got == want);
      }
    } else {
      const std::string message = expect_error<format_error>([&] { (void)file.tensor<T>(name); });
      CHECK(message.find("tensor '" + name + "': element " + std::to_string(bad->second) + " is " +
                         text(expected[bad->second])) != std::string::npos);
      CHECK(message.find("cannot hold exactly") != std::string::npos);
    }
  }
}

}  // namespace

TEST_CASE("SafetensorsFile lists every fixture's names, dtypes, shapes and metadata as the script wrote them",
          "[safetensors][file]") {
  const json& files = manifest().at("files");
  REQUIRE(files.size() == 17);
  for (auto it = files.begin(); it != files.end(); ++it) {
    INFO("file " << it.key());
    const SafetensorsFile file = SafetensorsFile::open(golden(it.key()));
    check_listing(file, it.value());
  }
  const SafetensorsFile file = SafetensorsFile::open(golden("head.F32.safetensors"));
  const std::string message = expect_error<shape_error>([&] { (void)file.info("_q.weight "); });
  CHECK(message.find("no tensor '_q.weight '") != std::string::npos);
  CHECK(message.find("head.F32.safetensors") != std::string::npos);
  CHECK_THROWS_AS(file.tensor<float>("nothing"), shape_error);
}

TEST_CASE(
    "integer dtypes read exactly into every integer type that holds them, refused where they do not fit",
    "[safetensors][file][dtypes]") {
  const SafetensorsFile file = SafetensorsFile::open(golden("dtypes.safetensors"));
  check_integer_target<std::int64_t>(file);
  check_integer_target<std::int32_t>(file);
  check_integer_target<std::int16_t>(file);
  check_integer_target<std::int8_t>(file);
  check_integer_target<std::uint64_t>(file);
  check_integer_target<std::uint32_t>(file);
  check_integer_target<std::uint16_t>(file);
  check_integer_target<std::uint8_t>(file);
  check_integer_target<bool>(file);
  // The extremes come through: no sign or width mistake can pass the loop above, but say it plainly.
  CHECK(file.tensor<std::int64_t>("i64").values.front() == std::numeric_limits<std::int64_t>::min());
  CHECK(file.tensor<std::uint64_t>("u64").values.back() == std::numeric_limits<std::uint64_t>::max());
  CHECK(file.tensor<std::int8_t>("i8").values.front() == -128);
  // A refusal names the value and the type's range.
  const std::string message = expect_error<format_error>([&] { (void)file.tensor<std::uint8_t>("i16"); });
  CHECK(message.find("tensor 'i16': element 0 is -32768 (I16), which std::uint8_t [0, 255] cannot hold "
                     "exactly") != std::string::npos);
}

TEST_CASE("integer dtypes into float, double, Eigen::half, Eigen::bfloat16 exactly or not at all",
          "[safetensors][file][dtypes]") {
  const SafetensorsFile file = SafetensorsFile::open(golden("dtypes.safetensors"));
  // i64: 2^24 + 1 (element 4) is the first value float cannot hold, 2^53 + 1 (element 5) double's;
  // u64: 2^53 + 1 (element 1); i32: 2^31 - 1 (element 5) for float; u32: 2^32 - 1 (element 2) for float;
  // i16: 32767 (element 3) has 15 significant bits, more than half's 11 and bfloat16's 8; u16: 65535
  // (element 2) likewise; every u8, i8 and BOOL value has at most 8 significant bits.
  check_floating_target<double>(file, {{"i64", 5}, {"u64", 1}});
  check_floating_target<float>(file, {{"i64", 4}, {"u64", 1}, {"i32", 5}, {"u32", 2}});
  // Eigen::half also overflows: its largest finite value is 65504, so -2^63 (i64's element 0), -2^31 (i32's
  // element 0) and 2^31 (u32's element 1) come out infinite; bfloat16 has float's range.
  check_floating_target<Eigen::half>(
      file, {{"i64", 0}, {"u64", 1}, {"i32", 0}, {"u32", 1}, {"i16", 3}, {"u16", 2}});
  check_floating_target<Eigen::bfloat16>(
      file, {{"i64", 4}, {"u64", 1}, {"i32", 5}, {"u32", 2}, {"i16", 3}, {"u16", 2}});
  const std::string message = expect_error<format_error>([&] { (void)file.tensor<double>("i64"); });
  CHECK(message.find("tensor 'i64': element 5 is 9007199254740993 (I64), which double cannot hold exactly") !=
        std::string::npos);
  CHECK(message.find("dtypes.safetensors") != std::string::npos);
}

TEST_CASE("floating dtypes into an integer type are refused; F8 bytes decode as the script decodes them",
          "[safetensors][file][dtypes]") {
  const SafetensorsFile file = SafetensorsFile::open(golden("dtypes.safetensors"));
  std::string message = expect_error<format_error>([&] { (void)file.tensor<std::int32_t>("scalar"); });
  CHECK(message.find("tensor 'scalar' has dtype F32, which does not convert exactly to std::int32_t") !=
        std::string::npos);
  CHECK_THROWS_AS(file.tensor<bool>("f8_e4m3"), format_error);
  CHECK_THROWS_AS(file.tensor<std::uint8_t>("f8_e5m2"), format_error);
  {
    const SafetensorsFile head = SafetensorsFile::open(golden("head.BF16.safetensors"));
    CHECK_THROWS_AS(head.tensor<std::int64_t>("_q.bias"), format_error);
  }

  for (const char* name : {"f8_e4m3", "f8_e5m2"}) {
    INFO(name);
    const auto decoded = file.tensor<float>(name);
    const auto expected = file.tensor<float>(std::string(name) + ".f32");
    REQUIRE(decoded.values.size() == 256);
    REQUIRE(expected.values.size() == 256);
    int nan = 0;
    for (std::size_t b = 0; b < 256; ++b) {
      const float got = decoded.values[b], want = expected.values[b];
      if (std::isnan(want)) {
        ++nan;
        CHECK(std::isnan(got));
      } else if (!(got == want && std::signbit(got) == std::signbit(want))) {
        FAIL_CHECK("byte " << b << ": " << got << " != " << want);
      }
    }
    CHECK(nan == (std::string(name) == "f8_e4m3" ? 2 : 6));  // e4m3fn: S.1111.111; e5m2: as binary16
    const auto wide = file.tensor<double>(name);
    for (std::size_t b = 0; b < 256; ++b)
      if (!std::isnan(decoded.values[b])) CHECK(wide.values[b] == static_cast<double>(decoded.values[b]));
  }
  CHECK(file.tensor<float>("f8_e4m3").values[0x7e] == 448.0f);  // the largest finite e4m3fn
  CHECK(file.tensor<float>("f8_e5m2").values[0x7c] == std::numeric_limits<float>::infinity());
}

TEST_CASE("zero-element and scalar tensors", "[safetensors][file][dtypes]") {
  const SafetensorsFile file = SafetensorsFile::open(golden("dtypes.safetensors"));
  const auto empty = file.tensor<float>("empty");
  CHECK(empty.shape == std::vector<Index>{3, 0, 2});
  CHECK(empty.values.empty());
  CHECK(file.info("empty").count == 0);
  CHECK(empty.matrix().rows() == 0);
  CHECK(empty.matrix().cols() == 2);
  const auto scalar = file.tensor<double>("scalar");
  CHECK(scalar.shape.empty());
  CHECK(file.info("scalar").count == 1);
  CHECK(scalar.values == std::vector<double>{2.5});
  CHECK(scalar.matrix().rows() == 1);
  CHECK(scalar.matrix()(0, 0) == 2.5);
}

TEST_CASE("from_memory and view read what open reads; copies share the bytes", "[safetensors][file]") {
  for (const char* name : {"dtypes.safetensors", "mha.BF16.safetensors", "head.F64.io.safetensors"}) {
    INFO(name);
    const std::string path = golden(name);
    const std::vector<unsigned char> bytes = file_vector(path);
    const SafetensorsFile opened = SafetensorsFile::open(path);
    const SafetensorsFile owned = SafetensorsFile::from_memory(bytes);
    const SafetensorsFile viewed = SafetensorsFile::view(bytes.data(), bytes.size());
    const json& expected = manifest().at("files").at(name);
    for (const SafetensorsFile* f : {&opened, &owned, &viewed}) {
      check_listing(*f, expected);
      for (const std::string& tensor : f->names()) {
        if (f->info(tensor).dtype.rfind("F", 0) != 0) continue;
        const auto a = opened.tensor<double>(tensor), b = f->tensor<double>(tensor);
        CHECK(a.shape == b.shape);
        CHECK(std::memcmp(a.values.data(), b.values.data(), a.values.size() * sizeof(double)) == 0);
      }
    }
  }
  // A copy keeps the buffer alive after the original and the caller's vector are gone.
  std::unique_ptr<SafetensorsFile> copy;
  {
    const SafetensorsFile original = SafetensorsFile::from_memory(file_vector(golden("dtypes.safetensors")));
    copy = std::make_unique<SafetensorsFile>(original);
  }
  CHECK(copy->tensor<std::int32_t>("i32").values.back() == 2147483647);

  std::string message = expect_error<shape_error>([] { (void)SafetensorsFile::view(nullptr, 16); });
  CHECK(message.find("a null pointer") != std::string::npos);
  message = expect_error<format_error>([] { (void)SafetensorsFile::view(nullptr, 0); });
  CHECK(message.find("viewed buffer of 0 bytes: truncated: 0 bytes") != std::string::npos);
  message = expect_error<format_error>([] { (void)SafetensorsFile::from_memory({1, 2, 3}); });
  CHECK(message.find("SafetensorsFile::from_memory: memory buffer of 3 bytes: truncated: 3 bytes") !=
        std::string::npos);
  message = expect_error<format_error>([] { (void)SafetensorsFile::open("/no/such/file.safetensors"); });
  CHECK(message.find("SafetensorsFile::open: /no/such/file.safetensors: cannot open the file") !=
        std::string::npos);
}

TEMPLATE_TEST_CASE("load_state_dict from a file object equals load_state_dict from its path",
                   "[safetensors][file]", float, double) {
  using Scalar = TestType;
  for (const std::string& dtype : kDtypes) {
    INFO(dtype);
    const std::string path = golden("mha." + dtype + ".safetensors");
    const SafetensorsFile file = SafetensorsFile::open(path);
    MultiHeadAttention<Scalar> from_path(3, 16, 8, 12, 0.1, 1), from_file(3, 16, 8, 12, 0.1, 2);
    head_attention::load_state_dict(from_path, path);
    head_attention::load_state_dict(from_file, file);
    for (Index h = 0; h < 3; ++h) {
      CHECK(same(from_path.head(h).query(), from_file.head(h).query()));
      CHECK(same(from_path.head(h).key(), from_file.head(h).key()));
      CHECK(same(from_path.head(h).value(), from_file.head(h).value()));
      // One file object serves every head through a prefix.
      HeadAttention<Scalar> head(16, 8, 12, 3);
      head_attention::load_state_dict(head, file, "_heads." + std::to_string(h) + ".");
      CHECK(same(head.value(), from_path.head(h).value()));
    }
    CHECK(same(from_path.projection(), from_file.projection()));
    CHECK(identical(file.tensor<Scalar>("_layer.weight").matrix(),
                    head_attention::load_tensor<Scalar>(path, "_layer.weight").matrix()));
  }
}

TEMPLATE_TEST_CASE("a file object of a malformed module is refused as the path is, the layer unchanged",
                   "[safetensors][file][bad-input]", float, double) {
  using Scalar = TestType;
  const TempDir dir;
  const std::string valid_path = dir.file("valid.safetensors");
  head_attention::save_state_dict(HeadAttention<double>(kEmb, kHead, kMax, 7), valid_path);
  const std::vector<Case> cases = malformed_cases(tensors_of(valid_path));
  HeadAttention<Scalar> layer(kEmb, kHead, kMax, 8);
  const HeadAttention<Scalar> before = layer;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    INFO("case: " << c.name);
    const std::vector<unsigned char> bytes(c.bytes.begin(), c.bytes.end());
    const auto from_memory = [&] {
      head_attention::load_state_dict(layer, SafetensorsFile::from_memory(bytes));
    };
    const auto from_view = [&] {
      head_attention::load_state_dict(layer, SafetensorsFile::view(bytes.data(), bytes.size()));
    };
    for (const auto& load : {std::function<void()>(from_memory), std::function<void()>(from_view)}) {
      const std::string message =
          c.expect == Expect::format ? expect_error<format_error>(load) : expect_error<shape_error>(load);
      INFO("message: " << message);
      CHECK(message.find(c.fragment) != std::string::npos);
      check_same_layer(layer, before);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Regressions of issue 24.

namespace {

/// `depth` nested arrays around a 1: [[[...[1]...]]].
std::string deep_array(std::size_t depth) {
  return std::string(depth, '[') + "1" + std::string(depth, ']');
}

}  // namespace

TEST_CASE("a header nested 2,000,000 deep anywhere is refused without recursion",
          "[safetensors][bad-input]") {
  const std::size_t deep = 2000000;
  const std::string d = deep_array(deep);
  const std::string objects = [&] {
    std::string s;
    for (std::size_t i = 0; i < deep; ++i)
      s += "{\"a\":";
    return s + "1" + std::string(deep, '}');
  }();
  const std::string entry_head = R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, )";
  const std::vector<std::pair<std::string, std::string>> headers = {
      {"shape", R"({"x": {"dtype": "F32", "data_offsets": [0, 4], "shape": )" + d + "}}"},
      {"shape element", R"({"x": {"dtype": "F32", "data_offsets": [0, 4], "shape": [1, )" + d + "]}}"},
      {"dtype", R"({"x": {"shape": [1], "data_offsets": [0, 4], "dtype": )" + d + "}}"},
      {"data_offsets", R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, )" + d + "]}}"},
      {"__metadata__ value", entry_head + R"("__metadata__": {"k": )" + d + "}}"},
      {"__metadata__ itself", entry_head + R"("__metadata__": )" + objects + "}"},
      {"a top-level value", entry_head + R"("y": )" + d + "}"},
      {"an entry's unknown field",
       R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "z": )" + objects + "}}"},
      {"unterminated", entry_head + R"("y": )" + std::string(deep, '[')},
  };
  for (const auto& h : headers) {
    INFO("nested in " << h.first);
    const std::string bytes = file_bytes(h.second, std::string(4, '\0'));
    const std::string message =
        expect_error<format_error>([&] { (void)SafetensorsFile::view(bytes.data(), bytes.size()); });
    CHECK(message.find("nests deeper than a safetensors header") != std::string::npos);
    CHECK(message.size() < 400);
  }
  // The whole header an array: refused by its first byte.
  const std::string array = file_bytes(d, "");
  const std::string message =
      expect_error<format_error>([&] { (void)SafetensorsFile::view(array.data(), array.size()); });
  CHECK(message.find("must start with '{'") != std::string::npos);
  // One level too deep is refused by the same rule; values are described by kind, never dumped.
  const std::string shallow =
      file_bytes(R"({"x": {"dtype": "F32", "shape": [[1]], "data_offsets": [0, 4]}})", std::string(4, '\0'));
  CHECK(expect_error<format_error>([&] {
          (void)SafetensorsFile::view(shallow.data(), shallow.size());
        }).find("at depth 4 (at most 3") != std::string::npos);
  const std::string kinds = file_bytes(
      R"({"x": {"dtype": "F32", "shape": ["1"], "data_offsets": {"begin": 0}}})", std::string(4, '\0'));
  CHECK(expect_error<format_error>([&] {
          (void)SafetensorsFile::view(kinds.data(), kinds.size());
        }).find("shape entries must be non-negative integers, got a string") != std::string::npos);
}

TEST_CASE("a shape whose non-zero dimensions overflow Eigen::Index is refused at read time; matrix() is safe",
          "[safetensors][bad-input]") {
  const auto header = [](const std::string& shape) {
    return file_bytes(R"({"x": {"dtype": "I32", "shape": )" + shape + R"(, "data_offsets": [0, 0]}})", "");
  };
  for (const char* shape : {"[3, 4611686018427387904, 0]", "[0, 9223372036854775808]",
                            "[4611686018427387904, 2, 0]", "[8589934592, 2147483648, 0]"}) {
    INFO("shape " << shape);
    const std::string bytes = header(shape);
    const std::string message =
        expect_error<format_error>([&] { (void)SafetensorsFile::view(bytes.data(), bytes.size()); });
    CHECK(message.find(std::string("tensor 'x': the element count of shape ") + shape +
                       " overflows Eigen::Index") != std::string::npos);
  }
  // The product of the non-zero dimensions fits: a valid zero-element tensor, whatever the order.
  for (const char* shape :
       {"[0, 4611686018427387904, 1]", "[4611686018427387904, 0]", "[9223372036854775807, 0]"}) {
    INFO("shape " << shape);
    const std::string bytes = header(shape);
    const SafetensorsFile file = SafetensorsFile::view(bytes.data(), bytes.size());
    CHECK(file.info("x").count == 0);
    const auto t = file.tensor<float>("x");
    CHECK(t.values.empty());
    CHECK(t.matrix().size() == 0);
  }

  // A StoredTensor filled by hand.
  head_attention::StoredTensor<float> t;
  t.shape = {3, Index(1) << 62, 0};
  CHECK(expect_error<shape_error>([&] { (void)t.matrix(); }).find("product of the leading dimensions") !=
        std::string::npos);
  t.shape = {-1, 2};
  CHECK(expect_error<shape_error>([&] { (void)t.matrix(); }).find("every dimension must be >= 0, got -1") !=
        std::string::npos);
  t.shape = {2, 3};
  t.values.assign(5, 1.0f);
  CHECK(expect_error<shape_error>([&] { (void)t.matrix(); }).find("the value count must be 6") !=
        std::string::npos);
  t.values.push_back(2.0f);
  CHECK(t.matrix()(1, 2) == 2.0f);
}

TEST_CASE("BOOL bytes other than 0 and 1 are refused by tensor<T>", "[safetensors][bad-input]") {
  const std::string bytes = file_bytes(R"({"b": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}})",
                                       std::string("\1\0\2", 3));
  const SafetensorsFile file = SafetensorsFile::view(bytes.data(), bytes.size());
  for (const auto& read : {std::function<void()>([&] { (void)file.tensor<bool>("b"); }),
                           std::function<void()>([&] { (void)file.tensor<float>("b"); })})
    CHECK(expect_error<format_error>(read).find("tensor 'b': element 2 is byte 2, not a BOOL (0 or 1)") !=
          std::string::npos);
}

TEST_CASE("save refuses a shape that overflows and a name that is not UTF-8, before touching the file",
          "[safetensors][bad-input]") {
  const TempDir dir;
  head_attention::StoredTensor<float> zero;
  zero.shape = {Index(1) << 33, Index(1) << 31, 0};  // the product of the non-zero dimensions is 2^64
  std::string message = expect_error<shape_error>([&] {
    head_attention::save_tensors<float>(dir.file("a"), {{"x", zero}});
  });
  CHECK(message.find("the product of the non-zero dimensions of 'x' must be at most") != std::string::npos);
  CHECK_FALSE(fs::exists(dir.file("a")));
  // Fits: written and read back.
  zero.shape = {Index(1) << 31, 0, Index(1) << 31};
  head_attention::save_tensors<float>(dir.file("b"), {{"x", zero}});
  CHECK(SafetensorsFile::open(dir.file("b")).info("x").shape == zero.shape);

  head_attention::StoredTensor<double> one;
  one.shape = {1};
  one.values = {1.0};
  for (const std::string& name :
       {std::string("bad\xff"), std::string("\xc3("), std::string("\xed\xa0\x80"), std::string("\xc0\xaf")}) {
    message = expect_error<shape_error>([&] {
      head_attention::save_tensors<double>(dir.file("c"), {{name, one}});
    });
    CHECK(message.find("must be valid UTF-8") != std::string::npos);
    CHECK_FALSE(fs::exists(dir.file("c")));
  }
  CHECK(expect_error<shape_error>([&] {
          head_attention::save_tensors<double>(dir.file("c"), {{"__metadata__", one}});
        }).find("anything but '__metadata__'") != std::string::npos);
  head_attention::save_tensors<double>(dir.file("d"), {{"caf\xc3\xa9 \xe2\x88\x91", one}});  // valid UTF-8
  CHECK(SafetensorsFile::open(dir.file("d")).contains("caf\xc3\xa9 \xe2\x88\x91"));

  const HeadAttention<float> layer(kEmb, kHead, kMax, 1);
  message =
      expect_error<shape_error>([&] { head_attention::save_state_dict(layer, dir.file("e"), "\xc3("); });
  CHECK(message.find("a tensor name (prefix included) must be valid UTF-8") != std::string::npos);
  CHECK_FALSE(fs::exists(dir.file("e")));
  // Loading with such a prefix matches no key: the module's keys are missing, nothing else escapes.
  head_attention::save_state_dict(layer, dir.file("f"));
  HeadAttention<float> other(kEmb, kHead, kMax, 2);
  CHECK(expect_error<shape_error>([&] {
          head_attention::load_state_dict(other, dir.file("f"), "\xc3(");
        }).find("missing key(s)") != std::string::npos);
}

TEST_CASE("a header's parse error quotes at most a bounded piece of the offending token",
          "[safetensors][bad-input]") {
  // A 1 MB key ending in an invalid UTF-8 byte: nlohmann's message holds the whole token.
  const std::string bytes = file_bytes("{\"" + std::string(1000000, 'k') + "\xff\": 1}", "");
  const std::string message =
      expect_error<format_error>([&] { (void)SafetensorsFile::view(bytes.data(), bytes.size()); });
  CHECK(message.find("not valid UTF-8 JSON") != std::string::npos);
  CHECK(message.size() < 600);
}

TEST_CASE("a key mismatch names the first 16 keys of each kind, then how many more",
          "[safetensors][bad-input]") {
  const TempDir dir;
  const std::string path = dir.file("valid.safetensors");
  head_attention::save_state_dict(HeadAttention<double>(kEmb, kHead, kMax, 7), path);
  std::vector<RawTensor> tensors = tensors_of(path);
  for (int i = 0; i < 20; ++i)
    tensors.push_back({"_extra" + std::to_string(100 + i), "F64", json({1}), std::string(8, '\0')});
  const std::string bytes = layout(tensors);
  HeadAttention<double> layer(kEmb, kHead, kMax, 8);
  const std::string message = expect_error<shape_error>(
      [&] { head_attention::load_state_dict(layer, SafetensorsFile::view(bytes.data(), bytes.size())); });
  CHECK(message.find("unexpected key(s): _extra100, _extra101") != std::string::npos);
  CHECK(message.find("_extra115 and 4 more") != std::string::npos);
  CHECK(message.find("_extra116") == std::string::npos);
}

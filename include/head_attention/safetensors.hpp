/// \file
/// head-attention: weights from and to PyTorch in the safetensors format
/// (https://github.com/huggingface/safetensors), with the exact state_dict() names of simple_llm's modules.
/// SafetensorsFile validates a file (or a buffer) once and then serves its tensors by name, converted to the
/// type asked for; load_state_dict, load_tensor, save_state_dict and save_tensors are built on it.
///
/// Not part of the umbrella header head_attention.hpp: this one needs nlohmann/json (3.x), which the rest of
/// the library does not. Include it explicitly and link HeadAttention::safetensors.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "attention.hpp"
#include "errors.hpp"
#include "linear.hpp"
#include "multi_head_attention.hpp"
#include "precision.hpp"

namespace head_attention {

/// Thrown when a safetensors file is not a valid one: truncated, a bad header length, invalid JSON or UTF-8,
/// JSON nested deeper than a safetensors header (3 levels), duplicate keys, data offsets out of range,
/// overlapping or leaving gaps, a byte size that disagrees with the shape and dtype, a shape whose non-zero
/// dimensions multiply past Eigen::Index, an unknown or unusable dtype, a value that does not convert exactly
/// to the requested type, a _tril_mask that is not the causal mask. (A valid file that does not fit the
/// module, by its keys or shapes, gives shape_error instead.) Also thrown when the file cannot be opened,
/// read or written.
class format_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// One tensor of a safetensors file, converted to Scalar: its shape and its values in row-major order.
template <typename Scalar>
struct StoredTensor {
  /// Eigen's signed index type.
  using Index = Eigen::Index;
  /// Row-major, as the file stores the values.
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  std::vector<Index> shape;  ///< the dimensions as the file gives them, outermost first; empty for a scalar
  std::vector<Scalar>
      values;  ///< row-major, product(shape) of them (for bool a std::vector<bool>: no matrix())

  /// The values as a row-major matrix [product of all dimensions but the last, last dimension]: [B, T, C]
  /// gives [B·T, C], [n] gives [1, n], a scalar [1, 1]. Throws shape_error if a dimension is negative, if
  /// that product overflows Eigen::Index, or if there are not product(shape) values (the struct is public:
  /// a caller may have filled it by hand).
  Matrix matrix() const {
    const char* where = "head_attention::StoredTensor::matrix";
    const Index max = std::numeric_limits<Index>::max();
    Index rows = 1;
    for (std::size_t d = 0; d < shape.size(); ++d) {
      detail::require(shape[d] >= 0, where, "every dimension", ">= 0", std::to_string(shape[d]));
      if (d + 1 == shape.size()) break;
      detail::require(shape[d] == 0 || rows <= max / shape[d], where, "the product of the leading dimensions",
                      "at most " + std::to_string(max), "an overflow");
      rows *= shape[d];
    }
    const Index cols = shape.empty() ? 1 : shape.back();
    const bool fits = cols == 0 || rows <= max / cols;
    detail::require(fits && static_cast<std::size_t>(rows * cols) == values.size(), where, "the value count",
                    fits ? std::to_string(rows * cols) + " (the product of the shape)" : "a count that fits",
                    std::to_string(values.size()));
    return Eigen::Map<const Matrix>(values.data(), rows, cols);
  }
};

/// The dtype and shape of one tensor of a safetensors file, as its header gives them.
struct TensorInfo {
  std::string dtype;  ///< the format's name: F64, F32, F16, BF16, I64, ..., U8, BOOL, F8_E4M3, ...
  std::vector<Eigen::Index> shape;  ///< outermost first; empty for a scalar
  Eigen::Index count = 0;           ///< product(shape): 1 for a scalar, 0 when a dimension is 0
};

class SafetensorsFile;

namespace detail {
namespace safetensors {

/// The largest JSON header accepted, in bytes (the reference implementation's cap).
constexpr std::uint64_t max_header_size = 100000000;

/// How deep a safetensors header nests: the top object holds entries (objects) that hold the shape and
/// data_offsets arrays. The parser refuses anything deeper before building it, so that no recursive code
/// (nlohmann's dump(), a destructor) ever meets a deep value from a file.
constexpr int max_depth = 3;

/// The dtypes of the safetensors format.
enum class Dtype { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

/// The dtype of a header's name and its element size; false for a name the format does not have.
inline bool dtype_from_name(const std::string& name, Dtype& dtype, std::uint64_t& size) {
  static const std::map<std::string, std::pair<Dtype, std::uint64_t>> dtypes = {
      {"F64", {Dtype::F64, 8}},   {"F32", {Dtype::F32, 4}},         {"F16", {Dtype::F16, 2}},
      {"BF16", {Dtype::BF16, 2}}, {"F8_E4M3", {Dtype::F8_E4M3, 1}}, {"F8_E5M2", {Dtype::F8_E5M2, 1}},
      {"I64", {Dtype::I64, 8}},   {"I32", {Dtype::I32, 4}},         {"I16", {Dtype::I16, 2}},
      {"I8", {Dtype::I8, 1}},     {"U64", {Dtype::U64, 8}},         {"U32", {Dtype::U32, 4}},
      {"U16", {Dtype::U16, 2}},   {"U8", {Dtype::U8, 1}},           {"BOOL", {Dtype::BOOL, 1}}};
  const auto it = dtypes.find(name);
  if (it == dtypes.end()) return false;
  dtype = it->second.first;
  size = it->second.second;
  return true;
}

inline bool is_floating(Dtype d) {
  return d == Dtype::F64 || d == Dtype::F32 || d == Dtype::F16 || d == Dtype::BF16 || d == Dtype::F8_E4M3 ||
         d == Dtype::F8_E5M2;
}
inline bool is_signed(Dtype d) {
  return d == Dtype::I64 || d == Dtype::I32 || d == Dtype::I16 || d == Dtype::I8;
}

inline std::string shape_string(const std::vector<Eigen::Index>& shape) {
  std::string s = "[";
  for (std::size_t d = 0; d < shape.size(); ++d)
    s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + "]";
}

/// A name from a file as messages show it, quoted: at most 200 bytes of it (cut at a UTF-8 character
/// boundary), since a key may be as long as the header.
inline std::string shown(const std::string& name) {
  constexpr std::size_t limit = 200;
  if (name.size() <= limit) return "'" + name + "'";
  std::size_t cut = limit;
  while (cut > 0 && (static_cast<unsigned char>(name[cut]) & 0xc0u) == 0x80u)
    --cut;
  return "'" + name.substr(0, cut) + "...' (" + std::to_string(name.size()) + " bytes)";
}

/// A JSON value from a file as messages show it: a scalar as it is, a container by its kind and size only
/// (dump() recurses, and a file's value may be nested arbitrarily deep).
inline std::string describe(const nlohmann::json& v) {
  switch (v.type()) {
    case nlohmann::json::value_t::null:
      return "null";
    case nlohmann::json::value_t::boolean:
      return v.get<bool>() ? "true" : "false";
    case nlohmann::json::value_t::number_integer:
      return std::to_string(v.get<std::int64_t>());
    case nlohmann::json::value_t::number_unsigned:
      return std::to_string(v.get<std::uint64_t>());
    case nlohmann::json::value_t::number_float:
      return v.dump();
    case nlohmann::json::value_t::string:
      return "a string";
    case nlohmann::json::value_t::array:
      return "an array of " + std::to_string(v.size()) + " elements";
    case nlohmann::json::value_t::object:
      return "an object of " + std::to_string(v.size()) + " members";
    default:
      return std::string("a JSON ") + v.type_name();
  }
}

/// Whether s is well-formed UTF-8 (no overlong forms, no surrogates, at most U+10FFFF): what nlohmann
/// accepts in a file, and what its dump() needs in order not to throw json::type_error.
inline bool valid_utf8(const std::string& s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    std::size_t length;
    std::uint32_t code;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      length = 2, code = c & 0x1fu;
    } else if (c >= 0xe0 && c <= 0xef) {
      length = 3, code = c & 0x0fu;
    } else if (c >= 0xf0 && c <= 0xf4) {
      length = 4, code = c & 0x07u;
    } else {
      return false;
    }
    if (s.size() - i < length) return false;
    for (std::size_t k = 1; k < length; ++k) {
      const unsigned char next = static_cast<unsigned char>(s[i + k]);
      if ((next & 0xc0u) != 0x80u) return false;
      code = (code << 6) | (next & 0x3fu);
    }
    if ((length == 3 && code < 0x800) || (length == 4 && (code < 0x10000 || code > 0x10ffff)) ||
        (code >= 0xd800 && code <= 0xdfff))
      return false;
    i += length;
  }
  return true;
}

inline std::uint64_t read_le(const unsigned char* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i)
    v = (v << 8) | p[i];
  return v;
}

inline void write_le(std::uint64_t v, int bytes, std::string& out) {
  for (int i = 0; i < bytes; ++i) {
    out.push_back(static_cast<char>(v & 0xffu));
    v >>= 8;
  }
}

/// IEEE binary16 to float, exactly (every half is a float): normal, subnormal, zero, infinity and NaN.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // infinity, NaN (payload kept)
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else if (mantissa == 0) {
    bits = sign;  // ±0
  } else {
    // Subnormal: mantissa · 2^-24. Normalise: shift until the implicit bit (0x400) is set.
    std::uint32_t e = 113;  // the exponent field of 2^-14, the smallest normal half
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// bfloat16 to float, exactly: the top 16 bits of a float.
inline float bfloat16_to_float(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// F8_E5M2 to float, exactly: the top 8 bits of a binary16 (infinities and NaNs as there).
inline float f8_e5m2_to_float(std::uint8_t b) {
  return half_to_float(static_cast<std::uint16_t>(b << 8));
}

/// F8_E4M3 (PyTorch's float8_e4m3fn) to float, exactly: bias 7, 3 mantissa bits, no infinities, NaN only
/// for exponent and mantissa all ones; the largest finite value is 448.
inline float f8_e4m3_to_float(std::uint8_t b) {
  const int exponent = (b >> 3) & 0xf, mantissa = b & 0x7;
  float magnitude;
  if (exponent == 0xf && mantissa == 0x7)
    magnitude = std::numeric_limits<float>::quiet_NaN();
  else if (exponent == 0)
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: mantissa/8 · 2^(1 - 7)
  else
    magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);  // (1 + m/8) · 2^(e - 7)
  return (b & 0x80u) ? -magnitude : magnitude;
}

/// One tensor of the header.
struct Entry {
  TensorInfo info;
  Dtype dtype = Dtype::F32;
  std::uint64_t element_size = 0;
  std::uint64_t begin = 0;  // data_offsets, relative to the start of the data section
  std::uint64_t end = 0;
};

/// A validated safetensors buffer: where its bytes are, and its parsed header.
struct Contents {
  std::shared_ptr<const std::vector<unsigned char>> owned;  // null for a view
  const unsigned char* data = nullptr;
  std::uint64_t size = 0;
  std::string source;  // the path, or which kind of buffer, for messages
  std::uint64_t data_start = 0;
  std::map<std::string, Entry> entries;
  std::map<std::string, std::string> metadata;

  const unsigned char* bytes(const Entry& e) const { return data + data_start + e.begin; }
};

[[noreturn]] inline void fail(const std::string& where, const Contents& c, const std::string& what) {
  throw format_error(where + ": " + c.source + ": " + what);
}

inline Entry parse_entry(const Contents& c, const std::string& where, const std::string& name,
                         const nlohmann::json& value, std::uint64_t data_size) {
  const std::string tensor = "tensor " + shown(name);
  const auto bad = [&](const std::string& what) { fail(where, c, tensor + ": " + what); };
  if (!value.is_object()) bad("its header entry must be an object, got " + describe(value));
  for (auto f = value.begin(); f != value.end(); ++f)
    if (f.key() != "dtype" && f.key() != "shape" && f.key() != "data_offsets")
      bad("unexpected field " + shown(f.key()) + " (only dtype, shape, data_offsets)");
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!value.contains(field)) bad(std::string("no ") + field);

  Entry e;
  const nlohmann::json& dtype = value["dtype"];
  if (!dtype.is_string()) bad("dtype must be a string, got " + describe(dtype));
  e.info.dtype = dtype.get<std::string>();
  if (!dtype_from_name(e.info.dtype, e.dtype, e.element_size)) bad("unknown dtype " + shown(e.info.dtype));

  // Every dimension, and the product of the non-zero ones, must fit Eigen::Index: then every partial
  // product, in any order, fits too (StoredTensor::matrix, a caller's strides), zero-element tensors
  // included.
  const nlohmann::json& shape = value["shape"];
  if (!shape.is_array()) bad("shape must be an array, got " + describe(shape));
  const std::uint64_t index_max = static_cast<std::uint64_t>(std::numeric_limits<Eigen::Index>::max());
  std::uint64_t nonzero = 1;
  bool overflow = false, empty = false;
  for (const nlohmann::json& d : shape) {
    if (!d.is_number_unsigned()) bad("shape entries must be non-negative integers, got " + describe(d));
    const std::uint64_t size = d.get<std::uint64_t>();
    if (size == 0) empty = true;
    if (size > index_max || (size != 0 && nonzero > index_max / size))
      overflow = true;
    else if (size != 0)
      nonzero *= size;
    e.info.shape.push_back(overflow ? 0 : static_cast<Eigen::Index>(size));
  }
  if (overflow) {
    std::string text = "[";
    for (std::size_t i = 0; i < shape.size(); ++i)
      text += (i ? ", " : "") + std::to_string(shape[i].get<std::uint64_t>());
    bad("the element count of shape " + text + "] overflows Eigen::Index: the product of its non-zero " +
        "dimensions must be at most " + std::to_string(index_max));
  }
  const std::uint64_t count = empty ? 0 : nonzero;
  e.info.count = static_cast<Eigen::Index>(count);
  if (count > std::numeric_limits<std::uint64_t>::max() / e.element_size)
    bad("the byte size of shape " + shape_string(e.info.shape) + " of " + e.info.dtype + " overflows");

  const nlohmann::json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    bad("data_offsets must be [begin, end], two non-negative integers, got " + describe(offsets));
  e.begin = offsets[0].get<std::uint64_t>();
  e.end = offsets[1].get<std::uint64_t>();
  if (e.begin > e.end || e.end > data_size)
    bad("data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
        "] out of range: the data section has " + std::to_string(data_size) + " bytes");
  if (e.end - e.begin != count * e.element_size)
    bad("data_offsets give " + std::to_string(e.end - e.begin) + " bytes, but shape " +
        shape_string(e.info.shape) + " of " + e.info.dtype + " needs " +
        std::to_string(count * e.element_size));
  return e;
}

/// Validates c.data[0, c.size) as a safetensors file and fills the rest of c:
///   8 bytes: N, the header length, little-endian, N <= max_header_size and 8 + N <= size;
///   N bytes: a UTF-8 JSON object starting with '{' (trailing spaces allowed), no key twice in any object,
///            nested at most max_depth deep;
///            "__metadata__" (optional): an object of strings; every other key a tensor name mapped to
///            exactly {"dtype": known dtype, "shape": [non-negative integers], "data_offsets": [begin, end]};
///   the rest: the data section. Sorted by begin, the tensors tile it exactly, from 0 to its end (no gap,
///   no overlap), and end - begin == product(shape) · dtype size for each.
/// Every violation throws format_error naming `where`, the source, and the key where there is one.
inline void parse(Contents& c, const std::string& where) {
  if (c.size < 8)
    fail(where, c, "truncated: " + std::to_string(c.size) + " bytes, shorter than the 8-byte header length");
  const std::uint64_t n = read_le(c.data, 8);
  if (n > max_header_size)
    fail(where, c,
         "header length " + std::to_string(n) + " exceeds the cap of " + std::to_string(max_header_size) +
             " bytes");
  if (n > c.size - 8)
    fail(where, c,
         "header length " + std::to_string(n) + " is past the end of the file (" + std::to_string(c.size) +
             " bytes, so at most " + std::to_string(c.size - 8) + ")");
  c.data_start = 8 + n;
  const std::uint64_t data_size = c.size - c.data_start;
  const char* header = reinterpret_cast<const char*>(c.data + 8);
  if (n == 0 || header[0] != '{') fail(where, c, "the JSON header must start with '{'");

  // nlohmann keeps the last of two equal keys in an object: a callback sees every key first. One set of
  // keys per open object. Its parser is iterative; the callback refuses a container deeper than a header's
  // at its start, so the document built stays shallow.
  std::vector<std::set<std::string>> open;
  std::string duplicate;
  const nlohmann::json::parser_callback_t callback = [&](int depth, nlohmann::json::parse_event_t event,
                                                         nlohmann::json& parsed) {
    using event_t = nlohmann::json::parse_event_t;
    if ((event == event_t::object_start || event == event_t::array_start) && depth >= max_depth)
      fail(where, c,
           "the JSON header nests deeper than a safetensors header: an object or array at depth " +
               std::to_string(depth + 1) + " (at most " + std::to_string(max_depth) +
               ": the header, its entries, their shape and data_offsets)");
    if (event == event_t::object_start) {
      open.emplace_back();
    } else if (event == event_t::object_end) {
      if (!open.empty()) open.pop_back();
    } else if (event == event_t::key && !open.empty() && parsed.is_string()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!open.back().insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(header, header + n, callback);
  } catch (const nlohmann::json::exception& e) {
    // nlohmann's message quotes the offending token whole, and a token may be most of the header.
    const std::string what = e.what();
    fail(where, c,
         "the header is not valid UTF-8 JSON: " + (what.size() <= 400 ? what : what.substr(0, 400) + "..."));
  }
  if (!duplicate.empty()) fail(where, c, "duplicate key " + shown(duplicate) + " in the JSON header");
  if (!json.is_object()) fail(where, c, "the JSON header must be an object");

  for (auto it = json.begin(); it != json.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object())
        fail(where, c, "__metadata__ must be an object of strings, got " + describe(value));
      for (auto m = value.begin(); m != value.end(); ++m) {
        if (!m.value().is_string())
          fail(where, c, "__metadata__ entry " + shown(m.key()) + " is not a string: " + describe(m.value()));
        c.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    c.entries[name] = parse_entry(c, where, name, value, data_size);
  }

  // Sorted by begin (then end, so that empty tensors come first), the tensors must tile [0, data size).
  std::vector<std::pair<const std::string*, const Entry*>> sorted;
  for (const auto& kv : c.entries)
    sorted.emplace_back(&kv.first, &kv.second);
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) {
    return a.second->begin != b.second->begin ? a.second->begin < b.second->begin
                                              : a.second->end < b.second->end;
  });
  std::uint64_t covered = 0;
  const std::string* previous = nullptr;
  for (const auto& s : sorted) {
    const Entry& e = *s.second;
    if (e.begin < covered)
      fail(where, c,
           "tensors " + shown(*previous) + " and " + shown(*s.first) + " overlap (data_offsets begin " +
               std::to_string(e.begin) + " < " + std::to_string(covered) + ")");
    if (e.begin > covered)
      fail(where, c,
           "gap in the data section: bytes [" + std::to_string(covered) + ", " + std::to_string(e.begin) +
               ") before tensor " + shown(*s.first) + " belong to no tensor");
    covered = e.end;
    previous = s.first;
  }
  if (covered != data_size)
    fail(where, c,
         "gap in the data section: its last " + std::to_string(data_size - covered) + " bytes (from " +
             std::to_string(covered) + " to " + std::to_string(data_size) + ") belong to no tensor");
}

/// The whole file, read once.
inline std::vector<unsigned char> read_file(const std::string& path, const std::string& where) {
  Contents named;
  named.source = path;
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(where, named, "cannot open the file");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (!in || size < 0) fail(where, named, "cannot determine the file size");
  if (static_cast<std::uint64_t>(size) > std::numeric_limits<std::size_t>::max())
    fail(where, named, "too large to read into memory: " + std::to_string(size) + " bytes");
  std::vector<unsigned char> bytes(static_cast<std::size_t>(size));
  in.seekg(0, std::ios::beg);
  if (size > 0) in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (!in || in.gcount() != static_cast<std::streamsize>(size))
    fail(where, named, "cannot read its " + std::to_string(size) + " bytes");
  return bytes;
}

/// What tensor<T> reads into: a floating type, or bool or a standard integer type (not a character type).
template <typename T>
struct Target {
  static constexpr bool floating = std::is_same<T, float>::value || std::is_same<T, double>::value ||
                                   std::is_same<T, Eigen::half>::value ||
                                   std::is_same<T, Eigen::bfloat16>::value;
  static constexpr bool integer = std::is_integral<T>::value && std::is_same<T, std::remove_cv_t<T>>::value &&
                                  !std::is_same<T, char>::value && !std::is_same<T, wchar_t>::value &&
                                  !std::is_same<T, char16_t>::value && !std::is_same<T, char32_t>::value
#if defined(__cpp_char8_t)
                                  && !std::is_same<T, char8_t>::value
#endif
      ;
};

template <typename T>
std::string type_name() {
  if constexpr (std::is_same<T, float>::value) return "float";
  if constexpr (std::is_same<T, double>::value) return "double";
  if constexpr (std::is_same<T, Eigen::half>::value) return "Eigen::half";
  if constexpr (std::is_same<T, Eigen::bfloat16>::value) return "Eigen::bfloat16";
  if constexpr (std::is_same<T, bool>::value) return "bool";
  return std::string(std::is_signed<T>::value ? "std::int" : "std::uint") + std::to_string(8 * sizeof(T)) +
         "_t [" + std::to_string(+std::numeric_limits<T>::min()) + ", " +
         std::to_string(+std::numeric_limits<T>::max()) + "]";
}

template <typename T>
double to_double(T x) {
  if constexpr (sizeof(T) == 2) return static_cast<double>(static_cast<float>(x));
  return static_cast<double>(x);
}

/// v into out if T holds it exactly: within range for an integer T, without rounding for a floating T
/// (converted, then compared back; NaN and infinity compare false).
template <typename T>
bool exact(std::int64_t v, T& out) {
  if constexpr (Target<T>::floating) {
    out = static_cast<T>(v);
    const double back = to_double(out);
    return back >= -0x1p63 && back < 0x1p63 && static_cast<std::int64_t>(back) == v;
  } else if constexpr (std::is_signed<T>::value) {
    if (v < static_cast<std::int64_t>(std::numeric_limits<T>::min()) ||
        v > static_cast<std::int64_t>(std::numeric_limits<T>::max()))
      return false;
    out = static_cast<T>(v);
    return true;
  } else {
    if (v < 0 || static_cast<std::uint64_t>(v) > static_cast<std::uint64_t>(std::numeric_limits<T>::max()))
      return false;
    out = static_cast<T>(v);
    return true;
  }
}

template <typename T>
bool exact(std::uint64_t v, T& out) {
  if constexpr (Target<T>::floating) {
    out = static_cast<T>(v);
    const double back = to_double(out);
    return back >= 0 && back < 0x1p64 && static_cast<std::uint64_t>(back) == v;
  } else {
    if (v > static_cast<std::uint64_t>(std::numeric_limits<T>::max())) return false;
    out = static_cast<T>(v);
    return true;
  }
}

/// The values of entry e converted to T: floating dtypes into a floating T (rounded to nearest when T is
/// narrower), integer and BOOL dtypes into any T exactly (a value T cannot hold exactly throws format_error
/// naming it). A floating dtype into an integer or bool T throws format_error.
template <typename T>
std::vector<T> convert_checked(const Contents& c, const std::string& where, const std::string& name,
                               const Entry& e) {
  const std::string tensor = "tensor " + shown(name);
  const unsigned char* p = c.bytes(e);
  const std::size_t n = static_cast<std::size_t>(e.info.count);
  const int size = static_cast<int>(e.element_size);
  std::vector<T> out(n);
  if (is_floating(e.dtype)) {
    if constexpr (!Target<T>::floating) {
      fail(where, c,
           tensor + " has dtype " + e.info.dtype + ", which does not convert exactly to " + type_name<T>() +
               ": read floating-point tensors as float, double, Eigen::half or Eigen::bfloat16");
    } else {
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint64_t bits = read_le(p + size * i, size);
        switch (e.dtype) {
          case Dtype::F64: {
            double d;
            std::memcpy(&d, &bits, sizeof d);
            out[i] = static_cast<T>(d);
            break;
          }
          case Dtype::F32: {
            const std::uint32_t b = static_cast<std::uint32_t>(bits);
            float f;
            std::memcpy(&f, &b, sizeof f);
            out[i] = static_cast<T>(f);
            break;
          }
          case Dtype::F16:
            out[i] = static_cast<T>(half_to_float(static_cast<std::uint16_t>(bits)));
            break;
          case Dtype::BF16:
            out[i] = static_cast<T>(bfloat16_to_float(static_cast<std::uint16_t>(bits)));
            break;
          case Dtype::F8_E4M3:
            out[i] = static_cast<T>(f8_e4m3_to_float(static_cast<std::uint8_t>(bits)));
            break;
          default:
            out[i] = static_cast<T>(f8_e5m2_to_float(static_cast<std::uint8_t>(bits)));
            break;
        }
      }
    }
    return out;
  }
  const auto inexact = [&](std::size_t i, const std::string& value) {
    fail(where, c,
         tensor + ": element " + std::to_string(i) + " is " + value + " (" + e.info.dtype + "), which " +
             type_name<T>() + " cannot hold exactly");
  };
  const bool signed_dtype = is_signed(e.dtype);
  for (std::size_t i = 0; i < n; ++i) {
    std::uint64_t bits = read_le(p + size * i, size);
    if (signed_dtype) {
      if (size < 8 && ((bits >> (8 * size - 1)) & 1u)) bits |= ~std::uint64_t{0} << (8 * size);
      std::int64_t v;
      std::memcpy(&v, &bits, sizeof v);
      T value{};
      if (!exact(v, value)) inexact(i, std::to_string(v));
      out[i] = value;  // not exact(v, out[i]): std::vector<bool>'s elements are proxies
    } else {
      if (e.dtype == Dtype::BOOL && bits > 1)
        fail(where, c,
             tensor + ": element " + std::to_string(i) + " is byte " + std::to_string(bits) +
                 ", not a BOOL (0 or 1)");
      T value{};
      if (!exact(bits, value)) inexact(i, std::to_string(bits));
      out[i] = value;
    }
  }
  return out;
}

template <typename T>
std::vector<T> convert(const Contents& c, const std::string& where, const std::string& name, const Entry& e) {
  static_assert(Target<T>::floating || Target<T>::integer,
                "head_attention::SafetensorsFile::tensor<T>: T must be float, double, Eigen::half, "
                "Eigen::bfloat16, bool or a standard integer type (std::int8_t ... std::uint64_t)");
  if constexpr (Target<T>::floating || Target<T>::integer)
    return convert_checked<T>(c, where, name, e);
  else
    return {};  // the static_assert has said it; no cascade of errors from the body
}

/// The entry `name` of c; shape_error if there is none.
inline const Entry& entry(const Contents& c, const std::string& where, const std::string& name) {
  const auto it = c.entries.find(name);
  if (it == c.entries.end()) throw shape_error(where + ": " + c.source + ": no tensor " + shown(name));
  return it->second;
}

/// The tensor `name` of c converted to T.
template <typename T>
StoredTensor<T> read_tensor(const Contents& c, const std::string& where, const std::string& name) {
  const Entry& e = entry(c, where, name);
  StoredTensor<T> t;
  t.values = convert<T>(c, where, name, e);
  t.shape = e.info.shape;
  return t;
}

struct Access;

}  // namespace safetensors
}  // namespace detail

/// A safetensors file, validated once as a whole when it is opened (see format_error for every rule), then
/// queried by name: the tensors' dtypes and shapes, the metadata, and any tensor converted to the type asked
/// for. Copies share the bytes. Names are the header's keys, valid UTF-8.
class SafetensorsFile {
 public:
  /// Reads the whole file at `path` into memory and validates it. Throws format_error if it cannot be read
  /// or is not a valid safetensors file. (For a file larger than the memory one wants to spend, map it and
  /// use view().)
  static SafetensorsFile open(const std::string& path) {
    return open_as(path, "head_attention::SafetensorsFile::open");
  }

  /// Takes ownership of `bytes`, the contents of a safetensors file, and validates them as open() does.
  static SafetensorsFile from_memory(std::vector<unsigned char> bytes) {
    std::string source = "memory buffer of " + std::to_string(bytes.size()) + " bytes";
    return owning(std::move(bytes), std::move(source), "head_attention::SafetensorsFile::from_memory");
  }

  /// Validates the `size` bytes at `data` as open() does, without copying them: the caller keeps them alive
  /// and unchanged for as long as this object or a copy of it is used (e.g. a memory-mapped file). Throws
  /// shape_error if data is null and size is not 0, format_error if the bytes are not a valid file.
  static SafetensorsFile view(const void* data, std::size_t size) {
    const char* where = "head_attention::SafetensorsFile::view";
    detail::require(data != nullptr || size == 0, where, "data",
                    "a pointer to " + std::to_string(size) + " bytes", "a null pointer");
    detail::safetensors::Contents c;
    c.source = "viewed buffer of " + std::to_string(size) + " bytes";
    c.data = static_cast<const unsigned char*>(data);
    c.size = size;
    detail::safetensors::parse(c, where);
    return SafetensorsFile(std::move(c));
  }

  /// The tensor names, sorted (byte-wise); "__metadata__" is not a tensor.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(m_contents.entries.size());
    for (const auto& kv : m_contents.entries)
      out.push_back(kv.first);
    return out;
  }

  /// Whether the file has a tensor of that name.
  bool contains(const std::string& name) const { return m_contents.entries.count(name) != 0; }

  /// The dtype, shape and element count of tensor `name`. Throws shape_error if there is none.
  const TensorInfo& info(const std::string& name) const {
    return detail::safetensors::entry(m_contents, "head_attention::SafetensorsFile::info", name).info;
  }

  /// The header's "__metadata__" (string to string), empty if the file has none.
  const std::map<std::string, std::string>& metadata() const { return m_contents.metadata; }

  /// Tensor `name`, its shape and its values converted to T, row-major. T is float, double, Eigen::half or
  /// Eigen::bfloat16, or bool or a standard integer type (std::int8_t ... std::uint64_t); any other T does
  /// not compile.
  ///  - F64, F32, F16, BF16, F8_E4M3 (float8_e4m3fn: no infinities) and F8_E5M2 into a floating T: converted,
  ///    rounded to nearest where T is narrower (F64 into Eigen::half or Eigen::bfloat16 rounds through
  ///    float).
  ///  - I8 ... I64, U8 ... U64 and BOOL into any T: exactly. A value T cannot hold exactly (out of an integer
  ///    T's range, or not representable in a floating T, e.g. 2^53 + 1 in double; BOOL's 0 and 1 fit
  ///    everywhere) throws format_error naming the tensor, the element's row-major index and its value.
  ///  - A floating dtype into an integer or bool T throws format_error: that conversion is not exact.
  ///  - A BOOL byte other than 0 or 1 throws format_error.
  /// Throws shape_error if there is no tensor of that name.
  template <typename T>
  StoredTensor<T> tensor(const std::string& name) const {
    return detail::safetensors::read_tensor<T>(m_contents, "head_attention::SafetensorsFile::tensor", name);
  }

 private:
  friend struct detail::safetensors::Access;

  explicit SafetensorsFile(detail::safetensors::Contents contents) : m_contents(std::move(contents)) {}

  static SafetensorsFile open_as(const std::string& path, const std::string& where) {
    return owning(detail::safetensors::read_file(path, where), path, where);
  }

  static SafetensorsFile owning(std::vector<unsigned char> bytes, std::string source,
                                const std::string& where) {
    detail::safetensors::Contents c;
    c.source = std::move(source);
    auto owned = std::make_shared<const std::vector<unsigned char>>(std::move(bytes));
    c.data = owned->data();
    c.size = owned->size();
    c.owned = std::move(owned);
    detail::safetensors::parse(c, where);
    return SafetensorsFile(std::move(c));
  }

  detail::safetensors::Contents m_contents;
};

namespace detail {
namespace safetensors {

/// What the free functions of this header need of a SafetensorsFile beyond its public interface: its
/// contents, and opening a path with their own name in the messages.
struct Access {
  static const Contents& contents(const SafetensorsFile& file) { return file.m_contents; }
  static SafetensorsFile open(const std::string& path, const std::string& where) {
    return SafetensorsFile::open_as(path, where);
  }
};

/// One tensor to write: name, dtype, shape and its little-endian bytes.
struct OutTensor {
  std::string name;
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::string bytes;
};

/// The safetensors dtype a module's Scalar is written as: its own, so that save then load is exact.
template <typename Scalar>
const char* dtype_of() {
  switch (precision_of<Scalar>()) {
    case Precision::float64:
      return "F64";
    case Precision::float32:
      return "F32";
    case Precision::float16:
      return "F16";
    default:
      return "BF16";
  }
}

template <typename Scalar>
OutTensor make_out(std::string name, std::vector<std::uint64_t> shape, const Scalar* values, std::size_t n) {
  OutTensor t{std::move(name), dtype_of<Scalar>(), std::move(shape), std::string()};
  t.bytes.reserve(n * sizeof(Scalar));
  for (std::size_t i = 0; i < n; ++i) {
    if constexpr (sizeof(Scalar) == 2) {  // Eigen::half, Eigen::bfloat16: their 16 bits as they are
      std::uint16_t bits;
      std::memcpy(&bits, &values[i], sizeof bits);
      write_le(bits, 2, t.bytes);
    } else if constexpr (std::is_same<Scalar, float>::value) {
      std::uint32_t bits;
      std::memcpy(&bits, &values[i], sizeof bits);
      write_le(bits, 4, t.bytes);
    } else {
      std::uint64_t bits;
      std::memcpy(&bits, &values[i], sizeof bits);
      write_le(bits, 8, t.bytes);
    }
  }
  return t;
}

/// The causal mask buffer as PyTorch stores it: BOOL [n, n], 1 on and below the diagonal.
inline OutTensor tril_tensor(std::string name, std::uint64_t n) {
  OutTensor t{std::move(name), "BOOL", {n, n}, std::string()};
  t.bytes.resize(static_cast<std::size_t>(n * n), '\0');
  for (std::uint64_t i = 0; i < n; ++i)
    for (std::uint64_t j = 0; j <= i; ++j)
      t.bytes[static_cast<std::size_t>(i * n + j)] = 1;
  return t;
}

/// Writes a safetensors file: tensors of larger elements first (so every tensor is aligned to its element
/// size within an 8-byte aligned data section), by name within a dtype; the header padded with spaces to a
/// multiple of 8 bytes, with __metadata__ {"format": "pt"} as PyTorch's writers put it. Throws shape_error
/// for a name that is not valid UTF-8, is "__metadata__" or comes twice, before the file is touched.
inline void write_file(const std::string& path, std::vector<OutTensor> tensors, const std::string& where) {
  std::uint64_t size = 0;
  std::sort(tensors.begin(), tensors.end(), [](const OutTensor& a, const OutTensor& b) {
    std::uint64_t sa = 0, sb = 0;
    Dtype unused;
    dtype_from_name(a.dtype, unused, sa);
    dtype_from_name(b.dtype, unused, sb);
    return sa != sb ? sa > sb : a.name < b.name;
  });
  // Names are checked before anything is written: nlohmann's dump() throws json::type_error on invalid
  // UTF-8, which is not an exception this header promises.
  for (const OutTensor& t : tensors) {
    detail::require(valid_utf8(t.name), where.c_str(), "a tensor name (prefix included)", "valid UTF-8",
                    "a name with invalid UTF-8 bytes");
    detail::require(t.name != "__metadata__", where.c_str(), "a tensor name", "anything but '__metadata__'",
                    "'__metadata__'");
  }
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = {{"format", "pt"}};
  for (const OutTensor& t : tensors) {
    if (header.contains(t.name))
      throw shape_error(where + ": " + path + ": tensor " + shown(t.name) + " twice");
    header[t.name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {size, size + t.bytes.size()}}};
    size += t.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string length;
  write_le(text.size(), 8, length);

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw format_error(where + ": " + path + ": cannot open the file for writing");
  out.write(length.data(), static_cast<std::streamsize>(length.size()));
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const OutTensor& t : tensors)
    out.write(t.bytes.data(), static_cast<std::streamsize>(t.bytes.size()));
  out.close();
  if (!out) throw format_error(where + ": " + path + ": writing the file failed");
}

/// What a module's state_dict holds: parameters (names without the prefix, shapes) and causal mask buffers,
/// all [mask_size, mask_size].
struct ModuleSpec {
  std::vector<std::pair<std::string, std::vector<Eigen::Index>>> params;
  std::vector<std::string> masks;
  Eigen::Index mask_size = 0;
};

inline std::uint64_t u64(Eigen::Index v) {
  return static_cast<std::uint64_t>(v);
}

inline void add_linear(ModuleSpec& spec, const std::string& name, Eigen::Index in, Eigen::Index out) {
  spec.params.push_back({name + ".weight", {out, in}});
  spec.params.push_back({name + ".bias", {out}});
}

/// simple_llm's HeadAttention: _q, _k, _v (nn.Linear(emb_size, head_size)) and the _tril_mask buffer.
inline void add_head(ModuleSpec& spec, const std::string& base, Eigen::Index emb, Eigen::Index head,
                     Eigen::Index max_seq_len) {
  for (const char* name : {"_q", "_k", "_v"})
    add_linear(spec, base + name, emb, head);
  spec.masks.push_back(base + "_tril_mask");
  spec.mask_size = max_seq_len;
}

/// The names, prefixed, for a message: the first 16 of them, then how many more (a file may hold millions).
inline std::string join(const std::vector<std::string>& names, const std::string& prefix) {
  constexpr std::size_t shown_names = 16;
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < shown_names; ++i)
    s += (s.empty() ? "" : ", ") + prefix + names[i];
  if (names.size() > shown_names) s += " and " + std::to_string(names.size() - shown_names) + " more";
  return s;
}

/// Checks everything the spec names in the file, keys taken relative to `prefix` (keys outside it are
/// ignored): every parameter present with its exact shape and a floating-point dtype (F64, F32, F16, BF16),
/// no other key but the masks, and each mask present BOOL [mask_size, mask_size] equal to the causal mask.
/// Returns the parameters converted to Scalar, by name. Throws format_error (file content) or shape_error
/// (mismatch with the module).
template <typename Scalar>
std::map<std::string, std::vector<Scalar>> load_module(const Contents& c, const std::string& prefix,
                                                       const ModuleSpec& spec, const std::string& where) {
  const std::string in_file = where + ": " + c.source;

  std::map<std::string, const Entry*> selected;  // key without the prefix
  for (const auto& kv : c.entries)
    if (kv.first.compare(0, prefix.size(), prefix) == 0)
      selected[kv.first.substr(prefix.size())] = &kv.second;

  std::vector<std::string> missing, extra;
  std::set<std::string> known;
  for (const auto& p : spec.params) {
    known.insert(p.first);
    if (!selected.count(p.first)) missing.push_back(p.first);
  }
  for (const std::string& m : spec.masks)
    known.insert(m);
  for (const auto& kv : selected)
    if (!known.count(kv.first)) extra.push_back(kv.first);
  if (!missing.empty() || !extra.empty()) {
    std::string message = in_file + ": the keys do not match the module";
    if (!prefix.empty()) message += " (under prefix " + shown(prefix) + ")";
    if (!missing.empty()) message += "; missing key(s): " + join(missing, prefix);
    if (!extra.empty()) message += "; unexpected key(s): " + join(extra, prefix);
    throw shape_error(message);
  }

  for (const auto& p : spec.params) {
    const Entry& e = *selected.at(p.first);
    require(e.info.shape == p.second, in_file.c_str(), "the shape of '" + prefix + p.first + "'",
            shape_string(p.second), shape_string(e.info.shape));
  }
  const std::vector<Eigen::Index> mask_shape = {spec.mask_size, spec.mask_size};
  for (const std::string& m : spec.masks) {
    const auto it = selected.find(m);
    if (it == selected.end()) continue;
    require(it->second->info.shape == mask_shape, in_file.c_str(),
            "the shape of '" + prefix + m + "' (max_seq_len)", shape_string(mask_shape),
            shape_string(it->second->info.shape));
  }

  std::map<std::string, std::vector<Scalar>> values;
  for (const auto& p : spec.params) {
    const Entry& e = *selected.at(p.first);
    if (e.dtype != Dtype::F64 && e.dtype != Dtype::F32 && e.dtype != Dtype::F16 && e.dtype != Dtype::BF16)
      fail(where, c,
           "tensor '" + prefix + p.first + "' has dtype " + e.info.dtype +
               "; it must be one of F64, F32, F16, BF16");
    values[p.first] = convert<Scalar>(c, where, prefix + p.first, e);
  }
  for (const std::string& m : spec.masks) {
    const auto it = selected.find(m);
    if (it == selected.end()) continue;
    const std::string name = "'" + prefix + m + "'";
    if (it->second->dtype != Dtype::BOOL)
      fail(where, c, name + " has dtype " + it->second->info.dtype + "; it must be BOOL");
    const unsigned char* bytes = c.bytes(*it->second);
    const std::size_t n = static_cast<std::size_t>(spec.mask_size);
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t j = 0; j < n; ++j) {
        const unsigned char b = bytes[i * n + j];
        if (b > 1)
          fail(where, c,
               name + ": entry [" + std::to_string(i) + ", " + std::to_string(j) + "] is byte " +
                   std::to_string(b) + ", not a BOOL (0 or 1)");
        if ((b == 1) != (j <= i))
          fail(where, c,
               name + " is not the causal mask (lower-triangular ones): entry [" + std::to_string(i) + ", " +
                   std::to_string(j) + "] is " + (b ? "true" : "false"));
      }
  }
  return values;
}

/// The Linear `name` of a load_module result, weight [out, in] and bias [out].
template <typename Scalar>
Linear<Scalar> take_linear(std::map<std::string, std::vector<Scalar>>& values, const std::string& name,
                           Eigen::Index in, Eigen::Index out) {
  Linear<Scalar> layer;
  layer.weight =
      Eigen::Map<const typename Linear<Scalar>::Matrix>(values.at(name + ".weight").data(), out, in);
  layer.bias = Eigen::Map<const typename Linear<Scalar>::Vector>(values.at(name + ".bias").data(), out);
  return layer;
}

template <typename Scalar>
void put_linear(std::vector<OutTensor>& out, const std::string& name, const Linear<Scalar>& layer) {
  out.push_back(make_out(name + ".weight", {u64(layer.weight.rows()), u64(layer.weight.cols())},
                         layer.weight.data(), static_cast<std::size_t>(layer.weight.size())));
  out.push_back(make_out(name + ".bias", {u64(layer.bias.size())}, layer.bias.data(),
                         static_cast<std::size_t>(layer.bias.size())));
}

template <typename Scalar>
void put_head(std::vector<OutTensor>& out, const std::string& base, const HeadAttention<Scalar>& head) {
  put_linear(out, base + "_q", head.query());
  put_linear(out, base + "_k", head.key());
  put_linear(out, base + "_v", head.value());
  out.push_back(tril_tensor(base + "_tril_mask", u64(head.max_seq_len())));
}

/// Loads a HeadAttention from c into temporaries, then moves them into the layer (nothing after can throw).
template <typename Scalar>
void load_head(HeadAttention<Scalar>& layer, const Contents& c, const std::string& prefix,
               const std::string& where) {
  ModuleSpec spec;
  add_head(spec, "", layer.emb_size(), layer.head_size(), layer.max_seq_len());
  auto values = load_module<Scalar>(c, prefix, spec, where);
  Linear<Scalar> q = take_linear(values, "_q", layer.emb_size(), layer.head_size());
  Linear<Scalar> k = take_linear(values, "_k", layer.emb_size(), layer.head_size());
  Linear<Scalar> v = take_linear(values, "_v", layer.emb_size(), layer.head_size());
  layer.query() = std::move(q);  // moves of Eigen storage: nothing below can throw
  layer.key() = std::move(k);
  layer.value() = std::move(v);
}

/// Loads a MultiHeadAttention from c, with the same guarantee.
template <typename Scalar>
void load_multi_head(MultiHeadAttention<Scalar>& mha, const Contents& c, const std::string& prefix,
                     const std::string& where) {
  using Index = Eigen::Index;
  const Index heads = mha.num_heads(), emb = mha.emb_size(), head = mha.head_size();
  ModuleSpec spec;
  for (Index i = 0; i < heads; ++i)
    add_head(spec, "_heads." + std::to_string(i) + ".", emb, head, mha.max_seq_len());
  add_linear(spec, "_layer", heads * head, emb);
  auto values = load_module<Scalar>(c, prefix, spec, where);
  std::vector<Linear<Scalar>> linears;
  for (Index i = 0; i < heads; ++i)
    for (const char* name : {"._q", "._k", "._v"})
      linears.push_back(take_linear(values, "_heads." + std::to_string(i) + name, emb, head));
  Linear<Scalar> layer = take_linear(values, "_layer", heads * head, emb);
  for (Index i = 0; i < heads; ++i) {
    const std::size_t at = static_cast<std::size_t>(3 * i);
    mha.head(i).query() = std::move(linears[at]);
    mha.head(i).key() = std::move(linears[at + 1]);
    mha.head(i).value() = std::move(linears[at + 2]);
  }
  mha.projection() = std::move(layer);
}

}  // namespace safetensors
}  // namespace detail

/// Loads simple_llm's HeadAttention state_dict from a safetensors file object: keys `<prefix>_q.weight`
/// [head_size, emb_size], `<prefix>_q.bias` [head_size], the same for `_k` and `_v`, and optionally
/// `<prefix>_tril_mask` (BOOL [max_seq_len, max_seq_len], checked to be the causal mask, otherwise ignored).
/// Keys outside the prefix are ignored; those inside must be exactly these. F64, F32, F16 and BF16 tensors
/// are converted to Scalar. Throws format_error for a parameter of another dtype or a bad mask, shape_error
/// for a missing or unexpected key or a shape that does not fit the layer; the layer is left unchanged by a
/// failed load.
template <typename Scalar>
void load_state_dict(HeadAttention<Scalar>& layer, const SafetensorsFile& file,
                     const std::string& prefix = "") {
  namespace st = detail::safetensors;
  st::load_head(layer, st::Access::contents(file), prefix, "head_attention::load_state_dict");
}

/// Loads simple_llm's MultiHeadAttention state_dict from a safetensors file object: for each head i,
/// `<prefix>_heads.<i>.` followed by the HeadAttention keys (each `_tril_mask` optional and checked), and
/// `<prefix>_layer.weight` [emb_size, num_heads · head_size], `<prefix>_layer.bias` [emb_size]. Same rules
/// and guarantees as for HeadAttention.
template <typename Scalar>
void load_state_dict(MultiHeadAttention<Scalar>& mha, const SafetensorsFile& file,
                     const std::string& prefix = "") {
  namespace st = detail::safetensors;
  st::load_multi_head(mha, st::Access::contents(file), prefix, "head_attention::load_state_dict");
}

/// Loads simple_llm's HeadAttention state_dict from the safetensors file at `path`, read and validated
/// once (as SafetensorsFile::open does); the keys and guarantees of the SafetensorsFile overload. Throws
/// format_error also when the file cannot be read or is not a valid safetensors file.
template <typename Scalar>
void load_state_dict(HeadAttention<Scalar>& layer, const std::string& path, const std::string& prefix = "") {
  namespace st = detail::safetensors;
  const std::string where = "head_attention::load_state_dict";
  st::load_head(layer, st::Access::contents(st::Access::open(path, where)), prefix, where);
}

/// Loads simple_llm's MultiHeadAttention state_dict from the safetensors file at `path`, as the
/// HeadAttention overload does.
template <typename Scalar>
void load_state_dict(MultiHeadAttention<Scalar>& mha, const std::string& path,
                     const std::string& prefix = "") {
  namespace st = detail::safetensors;
  const std::string where = "head_attention::load_state_dict";
  st::load_multi_head(mha, st::Access::contents(st::Access::open(path, where)), prefix, where);
}

/// Writes the layer's state_dict as PyTorch's HeadAttention has it, so that torch's
/// load_state_dict(strict=True) takes it: `<prefix>_q.weight`, `<prefix>_q.bias`, ... and
/// `<prefix>_tril_mask` (BOOL [max_seq_len, max_seq_len]), in the layer's own precision: F32 for float, F64
/// for double, F16 for Eigen::half, BF16 for Eigen::bfloat16. Throws shape_error if a projection does not
/// have the layer's shape, format_error if the file cannot be written.
template <typename Scalar>
void save_state_dict(const HeadAttention<Scalar>& layer, const std::string& path,
                     const std::string& prefix = "") {
  namespace st = detail::safetensors;
  detail::check_projections(layer, "head_attention::save_state_dict");
  std::vector<st::OutTensor> tensors;
  st::put_head(tensors, prefix, layer);
  st::write_file(path, std::move(tensors), "head_attention::save_state_dict");
}

/// Writes MultiHeadAttention's state_dict: `<prefix>_heads.<i>.` + the HeadAttention keys for each head,
/// `<prefix>_layer.weight`, `<prefix>_layer.bias`. Throws as the HeadAttention overload.
template <typename Scalar>
void save_state_dict(const MultiHeadAttention<Scalar>& mha, const std::string& path,
                     const std::string& prefix = "") {
  namespace st = detail::safetensors;
  using Index = Eigen::Index;
  const char* where = "head_attention::save_state_dict";
  std::vector<st::OutTensor> tensors;
  for (Index i = 0; i < mha.num_heads(); ++i) {
    detail::check_projections(mha.head(i), where);
    st::put_head(tensors, prefix + "_heads." + std::to_string(i) + ".", mha.head(i));
  }
  detail::check_linear(mha.projection(), where, "projection()", mha.num_heads() * mha.head_size(),
                       mha.emb_size());
  st::put_linear(tensors, prefix + "_layer", mha.projection());
  st::write_file(path, std::move(tensors), where);
}

/// One tensor of any safetensors file (e.g. an input and PyTorch's output stored next to the weights),
/// converted to Scalar as SafetensorsFile::tensor does. The whole file is read and validated once, as
/// SafetensorsFile::open does. Throws format_error for an invalid file or a value that does not convert
/// exactly, shape_error if there is no tensor of that name.
template <typename Scalar>
StoredTensor<Scalar> load_tensor(const std::string& path, const std::string& name) {
  namespace st = detail::safetensors;
  const std::string where = "head_attention::load_tensor";
  return st::read_tensor<Scalar>(st::Access::contents(st::Access::open(path, where)), where, name);
}

/// Writes tensors (name -> shape and row-major values) to a safetensors file, in F32 for float and F64 for
/// double (F16, BF16 for Eigen::half, Eigen::bfloat16). Throws shape_error, before the file is touched, if a
/// dimension is negative, if the product of a shape's non-zero dimensions overflows Eigen::Index (a file
/// that could not be read back), if a tensor's value count is not the product of its shape, or if a name is
/// not valid UTF-8 or is "__metadata__"; format_error if the file cannot be written.
template <typename Scalar>
void save_tensors(const std::string& path, const std::map<std::string, StoredTensor<Scalar>>& tensors) {
  namespace st = detail::safetensors;
  const std::string where = "head_attention::save_tensors";
  const Eigen::Index max = std::numeric_limits<Eigen::Index>::max();
  std::vector<st::OutTensor> out;
  for (const auto& kv : tensors) {
    std::vector<std::uint64_t> shape;
    Eigen::Index nonzero = 1;
    bool empty = false;
    for (Eigen::Index d : kv.second.shape) {
      detail::require(d >= 0, where.c_str(), "the dimensions of " + st::shown(kv.first), ">= 0",
                      std::to_string(d));
      detail::require(d == 0 || nonzero <= max / d, where.c_str(),
                      "the product of the non-zero dimensions of " + st::shown(kv.first),
                      "at most " + std::to_string(max),
                      "an overflow, shape " + st::shape_string(kv.second.shape));
      if (d == 0)
        empty = true;
      else
        nonzero *= d;
      shape.push_back(st::u64(d));
    }
    const std::uint64_t count = empty ? 0 : st::u64(nonzero);
    detail::require(
        count == kv.second.values.size(), where.c_str(), "the value count of " + st::shown(kv.first),
        std::to_string(count) + " (the product of its shape)", std::to_string(kv.second.values.size()));
    out.push_back(st::make_out(kv.first, std::move(shape), kv.second.values.data(), kv.second.values.size()));
  }
  st::write_file(path, std::move(out), where);
}

}  // namespace head_attention

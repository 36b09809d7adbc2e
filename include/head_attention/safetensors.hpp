/// \file
/// head-attention: weights from and to PyTorch in the safetensors format
/// (https://github.com/huggingface/safetensors), with the exact state_dict() names of simple_llm's modules.
///
/// Not part of the umbrella header head_attention.hpp: this one needs nlohmann/json (3.x), which the rest of
/// the library does not. Include it explicitly and link HeadAttention::safetensors.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
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
/// duplicate keys, data offsets out of range, overlapping or leaving gaps, a byte size that disagrees with
/// the shape and dtype, an unknown or unusable dtype, a _tril_mask that is not the causal mask. (A valid file
/// that does not fit the module, by its keys or shapes, gives shape_error instead.) Also thrown when the file
/// cannot be opened, read or written.
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

  std::vector<Index> shape;    ///< the dimensions as the file gives them, outermost first; empty for a scalar
  std::vector<Scalar> values;  ///< row-major, product(shape) of them

  /// The values as a row-major matrix [product of all dimensions but the last, last dimension]: [B, T, C]
  /// gives [B·T, C], [n] gives [1, n], a scalar [1, 1].
  Matrix matrix() const {
    Index cols = shape.empty() ? 1 : shape.back();
    Index rows = 1;
    for (std::size_t d = 0; d + 1 < shape.size(); ++d)
      rows *= shape[d];
    return Eigen::Map<const Matrix>(values.data(), rows, cols);
  }
};

namespace detail {
namespace safetensors {

/// The largest JSON header accepted, in bytes (the reference implementation's cap).
constexpr std::uint64_t max_header_size = 100000000;

/// Element sizes of the dtypes of the safetensors format. Any other dtype string is refused.
inline bool dtype_size(const std::string& dtype, std::uint64_t& size) {
  static const std::map<std::string, std::uint64_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"F64", 8},     {"I64", 8}, {"U64", 8}};
  const auto it = sizes.find(dtype);
  if (it == sizes.end()) return false;
  size = it->second;
  return true;
}

inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t d = 0; d < shape.size(); ++d)
    s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + "]";
}

/// One entry of the header.
struct Entry {
  std::string dtype;
  std::uint64_t element_size = 0;
  std::vector<std::uint64_t> shape;
  std::uint64_t count = 0;  // product(shape)
  std::uint64_t begin = 0;  // data_offsets, relative to the start of the data section
  std::uint64_t end = 0;
};

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

/// A safetensors file opened for reading, its header fully validated:
///   8 bytes: N, the header length, little-endian, N <= max_header_size and 8 + N <= file size;
///   N bytes: a UTF-8 JSON object starting with '{' (trailing spaces allowed), no key twice in any object;
///            "__metadata__" (optional): an object of strings; every other key a tensor name mapped to
///            exactly
///            {"dtype": known dtype, "shape": [non-negative integers], "data_offsets": [begin, end]};
///   the rest: the data section. Sorted by begin, the tensors tile it exactly, from 0 to its end (no gap,
///   no overlap), and end - begin == product(shape) · dtype size for each.
/// Every violation throws format_error naming the file, and the key where there is one.
class Reader {
 public:
  Reader(const std::string& path, const std::string& where) : m_path(path), m_where(where) {
    m_in.open(path, std::ios::binary);
    if (!m_in) fail("cannot open the file");
    m_in.seekg(0, std::ios::end);
    const std::streamoff file_size = m_in.tellg();
    if (!m_in || file_size < 0) fail("cannot determine the file size");
    m_in.seekg(0, std::ios::beg);
    const std::uint64_t size = static_cast<std::uint64_t>(file_size);
    if (size < 8)
      fail("truncated: " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
    unsigned char length_bytes[8];
    read_exact(0, length_bytes, 8);
    const std::uint64_t n = read_le(length_bytes, 8);
    if (n > max_header_size)
      fail("header length " + std::to_string(n) + " exceeds the cap of " + std::to_string(max_header_size) +
           " bytes");
    if (n > size - 8)
      fail("header length " + std::to_string(n) + " is past the end of the file (" + std::to_string(size) +
           " bytes, so at most " + std::to_string(size - 8) + ")");
    m_data_start = 8 + n;
    m_data_size = size - m_data_start;
    std::string header(static_cast<std::size_t>(n), '\0');
    if (n > 0) read_exact(8, reinterpret_cast<unsigned char*>(&header[0]), n);
    parse_header(header);
  }

  const std::map<std::string, Entry>& entries() const { return m_entries; }
  const std::map<std::string, std::string>& metadata() const { return m_metadata; }

  /// The raw bytes of one entry of entries().
  std::vector<unsigned char> bytes(const Entry& e) {
    const std::uint64_t n = e.end - e.begin;
    if (n > static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max()))
      fail("a tensor is too large");
    std::vector<unsigned char> out(static_cast<std::size_t>(n));
    if (n > 0) read_exact(m_data_start + e.begin, out.data(), n);
    return out;
  }

  /// The values of a floating-point entry (F64, F32, F16, BF16) converted to Scalar. Throws format_error for
  /// another dtype.
  template <typename Scalar>
  std::vector<Scalar> floats(const std::string& name, const Entry& e) {
    if (e.dtype != "F64" && e.dtype != "F32" && e.dtype != "F16" && e.dtype != "BF16")
      fail("tensor '" + name + "' has dtype " + e.dtype + "; it must be one of F64, F32, F16, BF16");
    const std::vector<unsigned char> raw = bytes(e);
    std::vector<Scalar> out(static_cast<std::size_t>(e.count));
    const unsigned char* p = raw.data();
    if (e.dtype == "F64") {
      for (std::size_t i = 0; i < out.size(); ++i) {
        const std::uint64_t bits = read_le(p + 8 * i, 8);
        double d;
        std::memcpy(&d, &bits, sizeof d);
        out[i] = static_cast<Scalar>(d);
      }
    } else if (e.dtype == "F32") {
      for (std::size_t i = 0; i < out.size(); ++i) {
        const std::uint32_t bits = static_cast<std::uint32_t>(read_le(p + 4 * i, 4));
        float f;
        std::memcpy(&f, &bits, sizeof f);
        out[i] = static_cast<Scalar>(f);
      }
    } else {
      const bool half = e.dtype == "F16";
      for (std::size_t i = 0; i < out.size(); ++i) {
        const std::uint16_t bits = static_cast<std::uint16_t>(read_le(p + 2 * i, 2));
        out[i] = static_cast<Scalar>(half ? half_to_float(bits) : bfloat16_to_float(bits));
      }
    }
    return out;
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw format_error(m_where + ": " + m_path + ": " + what);
  }

 private:
  void read_exact(std::uint64_t offset, unsigned char* out, std::uint64_t n) {
    m_in.clear();
    m_in.seekg(static_cast<std::streamoff>(offset), std::ios::beg);
    m_in.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(n));
    if (!m_in || static_cast<std::uint64_t>(m_in.gcount()) != n)
      fail("truncated: cannot read " + std::to_string(n) + " bytes at offset " + std::to_string(offset));
  }

  static bool is_index(const nlohmann::json& v) { return v.is_number_unsigned(); }

  void parse_header(const std::string& header) {
    if (header.empty() || header[0] != '{') fail("the JSON header must start with '{'");
    // nlohmann keeps the last of two equal keys in an object: a callback sees every key first. One set of
    // keys per open object.
    std::vector<std::set<std::string>> open;
    std::string duplicate;
    const nlohmann::json::parser_callback_t callback = [&](int, nlohmann::json::parse_event_t event,
                                                           nlohmann::json& parsed) {
      if (event == nlohmann::json::parse_event_t::object_start) {
        open.emplace_back();
      } else if (event == nlohmann::json::parse_event_t::object_end) {
        if (!open.empty()) open.pop_back();
      } else if (event == nlohmann::json::parse_event_t::key && !open.empty() && parsed.is_string()) {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!open.back().insert(key).second && duplicate.empty()) duplicate = key;
      }
      return true;
    };
    nlohmann::json json;
    try {
      json = nlohmann::json::parse(header.begin(), header.end(), callback);
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("the header is not valid UTF-8 JSON: ") + e.what());
    }
    if (!duplicate.empty()) fail("duplicate key '" + duplicate + "' in the JSON header");
    if (!json.is_object()) fail("the JSON header must be an object");

    for (auto it = json.begin(); it != json.end(); ++it) {
      const std::string& name = it.key();
      const nlohmann::json& value = it.value();
      if (name == "__metadata__") {
        if (!value.is_object()) fail("__metadata__ must be an object of strings");
        for (auto m = value.begin(); m != value.end(); ++m) {
          if (!m.value().is_string()) fail("__metadata__ entry '" + m.key() + "' is not a string");
          m_metadata[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      m_entries[name] = parse_entry(name, value);
    }

    // Sorted by begin (then end, so that empty tensors come first), the tensors must tile [0, data size).
    std::vector<std::pair<const std::string*, const Entry*>> sorted;
    for (const auto& kv : m_entries)
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
        fail("tensors '" + *previous + "' and '" + *s.first + "' overlap (data_offsets begin " +
             std::to_string(e.begin) + " < " + std::to_string(covered) + ")");
      if (e.begin > covered)
        fail("gap in the data section: bytes [" + std::to_string(covered) + ", " + std::to_string(e.begin) +
             ") before tensor '" + *s.first + "' belong to no tensor");
      covered = e.end;
      previous = s.first;
    }
    if (covered != m_data_size)
      fail("gap in the data section: its last " + std::to_string(m_data_size - covered) + " bytes (from " +
           std::to_string(covered) + " to " + std::to_string(m_data_size) + ") belong to no tensor");
  }

  Entry parse_entry(const std::string& name, const nlohmann::json& value) const {
    const std::string tensor = "tensor '" + name + "'";
    if (!value.is_object()) fail(tensor + ": its header entry must be an object");
    for (auto f = value.begin(); f != value.end(); ++f)
      if (f.key() != "dtype" && f.key() != "shape" && f.key() != "data_offsets")
        fail(tensor + ": unexpected field '" + f.key() + "' (only dtype, shape, data_offsets)");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!value.contains(field)) fail(tensor + ": no " + field);

    Entry e;
    const nlohmann::json& dtype = value["dtype"];
    if (!dtype.is_string()) fail(tensor + ": dtype must be a string");
    e.dtype = dtype.get<std::string>();
    if (!dtype_size(e.dtype, e.element_size)) fail(tensor + ": unknown dtype '" + e.dtype + "'");

    const nlohmann::json& shape = value["shape"];
    if (!shape.is_array()) fail(tensor + ": shape must be an array");
    bool empty = false;
    for (const nlohmann::json& d : shape) {
      if (!is_index(d)) fail(tensor + ": shape entries must be non-negative integers, got " + d.dump());
      e.shape.push_back(d.get<std::uint64_t>());
      empty = empty || e.shape.back() == 0;
    }
    const std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
    e.count = empty ? 0 : 1;
    for (std::uint64_t d : e.shape) {
      if (empty) break;
      if (e.count > max / d)
        fail(tensor + ": the element count of shape " + shape_string(e.shape) + " overflows");
      e.count *= d;
    }
    if (e.count > max / e.element_size)
      fail(tensor + ": the byte size of shape " + shape_string(e.shape) + " overflows");

    const nlohmann::json& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !is_index(offsets[0]) || !is_index(offsets[1]))
      fail(tensor + ": data_offsets must be [begin, end], two non-negative integers, got " + offsets.dump());
    e.begin = offsets[0].get<std::uint64_t>();
    e.end = offsets[1].get<std::uint64_t>();
    if (e.begin > e.end || e.end > m_data_size)
      fail(tensor + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
           "] out of range: the data section has " + std::to_string(m_data_size) + " bytes");
    if (e.end - e.begin != e.count * e.element_size)
      fail(tensor + ": data_offsets give " + std::to_string(e.end - e.begin) + " bytes, but shape " +
           shape_string(e.shape) + " of " + e.dtype + " needs " + std::to_string(e.count * e.element_size));
    return e;
  }

  std::ifstream m_in;
  std::string m_path;
  std::string m_where;
  std::uint64_t m_data_start = 0;
  std::uint64_t m_data_size = 0;
  std::map<std::string, Entry> m_entries;
  std::map<std::string, std::string> m_metadata;
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
/// multiple of 8 bytes, with __metadata__ {"format": "pt"} as PyTorch's writers put it.
inline void write_file(const std::string& path, std::vector<OutTensor> tensors, const std::string& where) {
  std::uint64_t size = 0;
  std::sort(tensors.begin(), tensors.end(), [](const OutTensor& a, const OutTensor& b) {
    std::uint64_t sa = 0, sb = 0;
    dtype_size(a.dtype, sa);
    dtype_size(b.dtype, sb);
    return sa != sb ? sa > sb : a.name < b.name;
  });
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = {{"format", "pt"}};
  for (const OutTensor& t : tensors) {
    if (header.contains(t.name)) throw format_error(where + ": " + path + ": tensor '" + t.name + "' twice");
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
  std::vector<std::pair<std::string, std::vector<std::uint64_t>>> params;
  std::vector<std::string> masks;
  std::uint64_t mask_size = 0;
};

inline std::uint64_t u64(Eigen::Index v) {
  return static_cast<std::uint64_t>(v);
}

inline void add_linear(ModuleSpec& spec, const std::string& name, Eigen::Index in, Eigen::Index out) {
  spec.params.push_back({name + ".weight", {u64(out), u64(in)}});
  spec.params.push_back({name + ".bias", {u64(out)}});
}

/// simple_llm's HeadAttention: _q, _k, _v (nn.Linear(emb_size, head_size)) and the _tril_mask buffer.
inline void add_head(ModuleSpec& spec, const std::string& base, Eigen::Index emb, Eigen::Index head,
                     Eigen::Index max_seq_len) {
  for (const char* name : {"_q", "_k", "_v"})
    add_linear(spec, base + name, emb, head);
  spec.masks.push_back(base + "_tril_mask");
  spec.mask_size = u64(max_seq_len);
}

inline std::string join(const std::vector<std::string>& names, const std::string& prefix) {
  std::string s;
  for (const std::string& n : names)
    s += (s.empty() ? "" : ", ") + prefix + n;
  return s;
}

/// Reads and checks everything the spec names from the file, keys taken relative to `prefix` (keys outside it
/// are ignored): every parameter present with its exact shape and a floating-point dtype, no other key but
/// the masks, and each mask present BOOL [mask_size, mask_size] equal to the causal mask. Returns the
/// parameters converted to Scalar, by name. Throws format_error (file content) or shape_error (mismatch with
/// the module).
template <typename Scalar>
std::map<std::string, std::vector<Scalar>> load_module(const std::string& path, const std::string& prefix,
                                                       const ModuleSpec& spec, const std::string& where) {
  Reader reader(path, where);
  const std::string in_file = where + ": " + path;

  std::map<std::string, const Entry*> selected;  // key without the prefix
  for (const auto& kv : reader.entries())
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
    if (!prefix.empty()) message += " (under prefix '" + prefix + "')";
    if (!missing.empty()) message += "; missing key(s): " + join(missing, prefix);
    if (!extra.empty()) message += "; unexpected key(s): " + join(extra, prefix);
    throw shape_error(message);
  }

  for (const auto& p : spec.params) {
    const Entry& e = *selected.at(p.first);
    require(e.shape == p.second, in_file.c_str(), "the shape of '" + prefix + p.first + "'",
            shape_string(p.second), shape_string(e.shape));
  }
  for (const std::string& m : spec.masks) {
    const auto it = selected.find(m);
    if (it == selected.end()) continue;
    require(it->second->shape == std::vector<std::uint64_t>{spec.mask_size, spec.mask_size}, in_file.c_str(),
            "the shape of '" + prefix + m + "' (max_seq_len)", shape_string({spec.mask_size, spec.mask_size}),
            shape_string(it->second->shape));
  }

  std::map<std::string, std::vector<Scalar>> values;
  for (const auto& p : spec.params)
    values[p.first] = reader.template floats<Scalar>(prefix + p.first, *selected.at(p.first));
  for (const std::string& m : spec.masks) {
    const auto it = selected.find(m);
    if (it == selected.end()) continue;
    const std::string name = "'" + prefix + m + "'";
    if (it->second->dtype != "BOOL")
      reader.fail(name + " has dtype " + it->second->dtype + "; it must be BOOL");
    const std::vector<unsigned char> bytes = reader.bytes(*it->second);
    const std::uint64_t n = spec.mask_size;
    for (std::uint64_t i = 0; i < n; ++i)
      for (std::uint64_t j = 0; j < n; ++j) {
        const unsigned char b = bytes[static_cast<std::size_t>(i * n + j)];
        if (b > 1)
          reader.fail(name + ": entry [" + std::to_string(i) + ", " + std::to_string(j) + "] is byte " +
                      std::to_string(b) + ", not a BOOL (0 or 1)");
        if ((b == 1) != (j <= i))
          reader.fail(name + " is not the causal mask (lower-triangular ones): entry [" + std::to_string(i) +
                      ", " + std::to_string(j) + "] is " + (b ? "true" : "false"));
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

}  // namespace safetensors
}  // namespace detail

/// Loads simple_llm's HeadAttention state_dict from a safetensors file: keys `<prefix>_q.weight`
/// [head_size, emb_size], `<prefix>_q.bias` [head_size], the same for `_k` and `_v`, and optionally
/// `<prefix>_tril_mask` (BOOL [max_seq_len, max_seq_len], checked to be the causal mask, otherwise ignored).
/// Keys outside the prefix are ignored; those inside must be exactly these. F64, F32, F16 and BF16 tensors
/// are converted to Scalar. Throws format_error for an invalid file, shape_error for a missing or unexpected
/// key or a shape that does not fit the layer; the layer is left unchanged by a failed load.
template <typename Scalar>
void load_state_dict(HeadAttention<Scalar>& layer, const std::string& path, const std::string& prefix = "") {
  namespace st = detail::safetensors;
  st::ModuleSpec spec;
  st::add_head(spec, "", layer.emb_size(), layer.head_size(), layer.max_seq_len());
  auto values = st::load_module<Scalar>(path, prefix, spec, "head_attention::load_state_dict");
  Linear<Scalar> q = st::take_linear(values, "_q", layer.emb_size(), layer.head_size());
  Linear<Scalar> k = st::take_linear(values, "_k", layer.emb_size(), layer.head_size());
  Linear<Scalar> v = st::take_linear(values, "_v", layer.emb_size(), layer.head_size());
  layer.query() = std::move(q);  // moves of Eigen storage: nothing below can throw
  layer.key() = std::move(k);
  layer.value() = std::move(v);
}

/// Loads simple_llm's MultiHeadAttention state_dict: for each head i, `<prefix>_heads.<i>.` followed by the
/// HeadAttention keys (each `_tril_mask` optional and checked), and `<prefix>_layer.weight` [emb_size,
/// num_heads · head_size], `<prefix>_layer.bias` [emb_size]. Same rules and guarantees as for HeadAttention.
template <typename Scalar>
void load_state_dict(MultiHeadAttention<Scalar>& mha, const std::string& path,
                     const std::string& prefix = "") {
  namespace st = detail::safetensors;
  using Index = Eigen::Index;
  const Index heads = mha.num_heads(), emb = mha.emb_size(), head = mha.head_size();
  st::ModuleSpec spec;
  for (Index i = 0; i < heads; ++i)
    st::add_head(spec, "_heads." + std::to_string(i) + ".", emb, head, mha.max_seq_len());
  st::add_linear(spec, "_layer", heads * head, emb);
  auto values = st::load_module<Scalar>(path, prefix, spec, "head_attention::load_state_dict");
  std::vector<Linear<Scalar>> linears;
  for (Index i = 0; i < heads; ++i)
    for (const char* name : {"._q", "._k", "._v"})
      linears.push_back(st::take_linear(values, "_heads." + std::to_string(i) + name, emb, head));
  Linear<Scalar> layer = st::take_linear(values, "_layer", heads * head, emb);
  for (Index i = 0; i < heads; ++i) {
    const std::size_t at = static_cast<std::size_t>(3 * i);
    mha.head(i).query() = std::move(linears[at]);
    mha.head(i).key() = std::move(linears[at + 1]);
    mha.head(i).value() = std::move(linears[at + 2]);
  }
  mha.projection() = std::move(layer);
}

/// Writes the layer's state_dict as PyTorch's HeadAttention has it, so that torch's
/// load_state_dict(strict=True) takes it: `<prefix>_q.weight`, `<prefix>_q.bias`, ... and
/// `<prefix>_tril_mask` (BOOL [max_seq_len, max_seq_len]), in F32 for float and F64 for double. Throws
/// shape_error if a projection does not have the layer's shape, format_error if the file cannot be written.
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
/// converted to Scalar from F64, F32, F16 or BF16. The whole file is validated as load_state_dict does.
/// Throws format_error for an invalid file or another dtype, shape_error if there is no tensor of that name.
template <typename Scalar>
StoredTensor<Scalar> load_tensor(const std::string& path, const std::string& name) {
  const std::string where = "head_attention::load_tensor";
  detail::safetensors::Reader reader(path, where);
  const auto it = reader.entries().find(name);
  if (it == reader.entries().end()) throw shape_error(where + ": " + path + ": no tensor '" + name + "'");
  StoredTensor<Scalar> t;
  for (std::uint64_t d : it->second.shape) {
    if (d > static_cast<std::uint64_t>(std::numeric_limits<Eigen::Index>::max()))
      reader.fail("tensor '" + name + "' has a dimension too large for Eigen::Index");
    t.shape.push_back(static_cast<Eigen::Index>(d));
  }
  t.values = reader.template floats<Scalar>(name, it->second);
  return t;
}

/// Writes tensors (name -> shape and row-major values) to a safetensors file, in F32 for float and F64 for
/// double. Throws shape_error if a tensor's value count is not the product of its shape, format_error if the
/// file cannot be written.
template <typename Scalar>
void save_tensors(const std::string& path, const std::map<std::string, StoredTensor<Scalar>>& tensors) {
  namespace st = detail::safetensors;
  const std::string where = "head_attention::save_tensors";
  std::vector<st::OutTensor> out;
  for (const auto& kv : tensors) {
    std::vector<std::uint64_t> shape;
    std::uint64_t count = 1;
    for (Eigen::Index d : kv.second.shape) {
      detail::require(d >= 0, where.c_str(), "the dimensions of '" + kv.first + "'", ">= 0",
                      std::to_string(d));
      shape.push_back(st::u64(d));
      count *= st::u64(d);
    }
    detail::require(count == kv.second.values.size(), where.c_str(), "the value count of '" + kv.first + "'",
                    std::to_string(count) + " (the product of its shape)",
                    std::to_string(kv.second.values.size()));
    out.push_back(st::make_out(kv.first, std::move(shape), kv.second.values.data(), kv.second.values.size()));
  }
  st::write_file(path, std::move(out), where);
}

}  // namespace head_attention

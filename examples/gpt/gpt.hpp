/// \file
/// simple_llm's GPT at inference on head-attention: token and learned positional embeddings, post-norm
/// Decoder blocks (MultiHeadAttention, FeedForward with ReLU, two LayerNorms), the Linear to the vocabulary,
/// and GPT.generate with a KV cache. Weights and sizes come from a safetensors file written by
/// examples/gpt/export_gpt.py (simple_llm's state_dict names, the sizes in __metadata__).
///
/// Needs <head_attention/safetensors.hpp>, so nlohmann_json: link HeadAttention::safetensors.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <head_attention/arguments.hpp>
#include <head_attention/errors.hpp>
#include <head_attention/linear.hpp>
#include <head_attention/multi_head_attention.hpp>
#include <head_attention/packed.hpp>
#include <head_attention/safetensors.hpp>

namespace simple_llm {

/// Eigen's signed index type: sizes, positions and token ids.
using Index = Eigen::Index;

/// A sequence of token ids (simple_llm's are int64: one row of its [B, T] input).
using Tokens = std::vector<Index>;

/// The six sizes of simple_llm's GPT(vocab_size, max_seq_len, emb_size, num_heads, head_size, num_layers),
/// as its GPT.save stores them.
struct GPTConfig {
  Index vocab_size = 0;   ///< token ids are in [0, vocab_size)
  Index max_seq_len = 0;  ///< positions with an embedding: the longest window the model sees
  Index emb_size = 0;     ///< E, the width of every hidden row
  Index num_heads = 0;    ///< attention heads per Decoder
  Index head_size = 0;    ///< features per head
  Index num_layers = 0;   ///< Decoder blocks
};

/// The seed of generate's sampling: the library's, which takes any integer and refuses a floating-point
/// value at compile time (a temperature or top_p one place off).
using Seed = head_attention::Seed;

namespace detail {

/// nn.LayerNorm(E) with its affine parameters (eps 1e-5, PyTorch's default, which simple_llm keeps).
template <typename Scalar>
struct LayerNorm {
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  Vector weight;  // [E]
  Vector bias;    // [E]

  /// Each row of x [rows, E] normalised in place: (x - mean) · rstd · weight + bias, rstd = 1 / sqrt(var +
  /// eps) with the biased variance, in PyTorch's order of operations.
  template <typename Matrix>
  void apply(Matrix& x) const {
    constexpr double eps = 1e-5;
    for (Index r = 0; r < x.rows(); ++r) {
      const Scalar mean = x.row(r).mean();
      x.row(r).array() -= mean;
      const Scalar variance = x.row(r).squaredNorm() / static_cast<Scalar>(x.cols());
      const Scalar rstd = Scalar(1) / std::sqrt(variance + static_cast<Scalar>(eps));
      x.row(r) = ((x.row(r).array() * rstd) * weight.transpose().array() + bias.transpose().array()).matrix();
    }
  }
};

/// The text of a size for messages: "[50, 16]".
inline std::string shape_text(const std::vector<Index>& shape) {
  std::string text = "[";
  for (std::size_t d = 0; d < shape.size(); ++d)
    text += (d ? ", " : "") + std::to_string(shape[d]);
  return text + "]";
}

/// Up to 8 names of a list, then how many more.
inline std::string some_names(const std::vector<std::string>& names) {
  std::string text;
  for (std::size_t i = 0; i < names.size() && i < 8; ++i)
    text += (i ? ", " : "") + names[i];
  if (names.size() > 8) text += " and " + std::to_string(names.size() - 8) + " more";
  return text;
}

}  // namespace detail

/// simple_llm's GPT for inference (its dropouts are the identity there): logits of a sequence, a KV-cache
/// decode step, and generate. Built only by load(), which validates the whole file first: a GPT object always
/// holds a complete model. const after loading, and safe to call from many threads at once (each generate
/// call has its own caches and generator).
///
/// The attention runs through PackedMultiHeadAttention, one per Decoder, its weights prepared once:
/// MultiHeadAttention::forward_cached prepares them on every call, which made its decode step 1.3x slower at
/// this example's tiny sizes and 2.4x slower at emb 512 with 8 heads of 64 (one thread, x86-64 without
/// -march).
template <typename Scalar>
class GPT {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "simple_llm::GPT<Scalar> needs float or double");

 public:
  /// Row-major [rows, features], as the library's layers.
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  /// Column vector of Scalar.
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  /// The library's nn.Linear.
  using LinearType = head_attention::Linear<Scalar>;
  /// A Decoder's attention, frozen for inference.
  using Attention = head_attention::PackedMultiHeadAttention<Scalar>;

  /// The keys and values of every Decoder for the positions decoded so far (one sequence): made by
  /// make_cache(), extended by forward_cached().
  class Cache {
   public:
    /// Positions processed so far: the next token given to forward_cached has this position.
    Index size() const { return m_layers.empty() ? 0 : m_layers.front().size(); }
    /// Forgets every position: the next call starts at position 0.
    void clear() {
      for (auto& layer : m_layers)
        layer.clear();
    }
    /// Forgets the positions at or after `size`, so that decoding resumes at position `size` (to roll back
    /// rejected tokens, or to time one step again). Throws head_attention::shape_error, the cache unchanged,
    /// unless 0 <= size <= this->size().
    void truncate(Index size) {
      if (!m_layers.empty()) m_layers.front().truncate(size);  // throws, if it does, before any change
      for (auto& layer : m_layers)
        layer.truncate(size);
    }

   private:
    friend class GPT;
    std::vector<typename Attention::Cache> m_layers;  // one per Decoder
  };

  /// Reads a GPT from a safetensors file written by export_gpt.py (see load(const SafetensorsFile&)).
  /// Throws head_attention::format_error if the file is not a valid safetensors file or cannot be read.
  static GPT load(const std::string& path) { return load(head_attention::SafetensorsFile::open(path)); }

  /// Builds the GPT a safetensors file describes: the six sizes from its __metadata__ (decimal strings
  /// "vocab_size", "max_seq_len", "emb_size", "num_heads", "head_size", "num_layers"), the weights from its
  /// tensors under simple_llm's state_dict names (F64, F32, F16 or BF16, converted to Scalar; the bool
  /// `_tril_mask` buffers optional and checked to be causal). Throws head_attention::shape_error, naming what
  /// was expected and what came, if a size is missing or not a positive integer, a key is missing or
  /// unexpected, or a tensor's shape disagrees with the sizes; format_error for an invalid file. Nothing is
  /// returned unless everything checked.
  static GPT load(const head_attention::SafetensorsFile& file) {
    GPT gpt;
    gpt.m_config = read_config(file);
    check_keys(file, gpt.m_config);
    gpt.read_weights(file);
    return gpt;
  }

  /// The sizes read from the file.
  const GPTConfig& config() const { return m_config; }

  /// The thread cap of every Decoder's attention, as PackedMultiHeadAttention::set_num_threads (0, the
  /// default: OpenMP's default count). The Linear layers' products follow Eigen's own setting
  /// (Eigen::setNbThreads). Throws head_attention::shape_error if n < 0.
  void set_num_threads(int n) {
    HEAD_ATTENTION_REQUIRE(n >= 0, "simple_llm::GPT::set_num_threads", "the thread count", ">= 0",
                           std::to_string(n));
    for (Layer& layer : m_layers)
      layer.attention.set_num_threads(n);
  }
  /// The thread count the attention of a large call made now, from this thread, would run on (1 inside a
  /// parallel region or without OpenMP).
  int num_threads() const { return m_layers.front().attention.num_threads(); }  // num_layers >= 1

  /// simple_llm's forward for one sequence: token ids x (1 <= T <= max_seq_len, each in [0, vocab_size)) to
  /// the logits [T, vocab_size] of every position. Throws head_attention::shape_error otherwise.
  Matrix forward(const Tokens& x) const {
    check_tokens(x, "simple_llm::GPT::forward");
    HEAD_ATTENTION_REQUIRE(static_cast<Index>(x.size()) <= m_config.max_seq_len, "simple_llm::GPT::forward",
                           "the sequence length", "<= max_seq_len = " + std::to_string(m_config.max_seq_len),
                           std::to_string(x.size()));
    Matrix h = embed(x.data(), static_cast<Index>(x.size()), 0);  // [T, E]
    for (const Layer& layer : m_layers)
      h = layer.run(h, [&](const Matrix& in) { return layer.attention.forward(in); });
    return m_linear(h);  // [T, vocab]
  }

  /// An empty cache for forward_cached.
  Cache make_cache() const {
    Cache cache;
    cache.m_layers.reserve(m_layers.size());
    for (const Layer& layer : m_layers)
      cache.m_layers.push_back(layer.attention.make_cache(1));
    return cache;
  }

  /// Incremental decoding: the logits [t, vocab_size] of t new tokens at positions cache.size() ..
  /// cache.size() + t - 1, equal to rows cache.size().. of forward(all tokens so far); the cache is extended.
  /// Throws head_attention::shape_error, the cache unchanged, unless t >= 1, every id is in [0, vocab_size)
  /// and cache.size() + t <= max_seq_len (learned absolute positions end there).
  Matrix forward_cached(const Tokens& x, Cache& cache) const { return m_linear(hidden_cached(x, cache)); }

  /// simple_llm's GPT.generate(x, max_new_tokens, do_sample, temperature=1.0, top_k=None, top_p=None) for
  /// one sequence: returns x followed by max_new_tokens new tokens. For each: the last position's logits;
  /// greedy (argmax, the first on ties) unless do_sample; when sampling, logits / temperature, top_k keeps
  /// the k largest (the others -inf), top_p keeps the tokens, by probability descending, whose cumulative
  /// probability is <= top_p (always the first), then softmax and a draw from std::mt19937_64 seeded with
  /// `seed`: the same seed gives the same tokens (torch.multinomial's draws cannot be reproduced here). Both
  /// filters apply when both are given, as simple_llm's code does (its docstring says they exclude each
  /// other).
  ///
  /// Cost: the prompt is run once (a prefill), then one cached decode step per token, while the sequence
  /// fits max_seq_len. Past it, simple_llm crops to the last max_seq_len tokens; with learned absolute
  /// positions every cached key then belongs to a stale position, so each token past the limit recomputes
  /// the whole window from scratch (a prefill of max_seq_len tokens), as simple_llm does for every token.
  ///
  /// do_sample must be a bool (anything else does not compile). Throws head_attention::shape_error for an
  /// empty x or an id outside [0, vocab_size), max_new_tokens < 0, top_k outside [1, vocab_size] or top_p
  /// outside (0, 1] (checked even when greedy, which ignores them), and, when sampling, a temperature that is
  /// not a finite number > 0.
  template <typename Bool>
  Tokens generate(const Tokens& x, Index max_new_tokens, Bool do_sample, double temperature = 1.0,
                  std::optional<Index> top_k = std::nullopt, std::optional<double> top_p = std::nullopt,
                  Seed seed = 0) const {
    // A template only to refuse what would convert silently: generate(x, n, 0.8) meant a temperature.
    static_assert(std::is_same<Bool, bool>::value,
                  "simple_llm::GPT::generate: do_sample (the third argument) must be a bool");
    const char* where = "simple_llm::GPT::generate";
    check_tokens(x, where);
    HEAD_ATTENTION_REQUIRE(max_new_tokens >= 0, where, "max_new_tokens", ">= 0",
                           std::to_string(max_new_tokens));
    if (do_sample)
      HEAD_ATTENTION_REQUIRE(temperature > 0 && std::isfinite(temperature), where,
                             "temperature (when sampling)", "a finite number > 0",
                             std::to_string(temperature));
    if (top_k)
      HEAD_ATTENTION_REQUIRE(*top_k >= 1 && *top_k <= m_config.vocab_size, where, "top_k",
                             "in [1, vocab_size = " + std::to_string(m_config.vocab_size) + "]",
                             std::to_string(*top_k));
    if (top_p)
      HEAD_ATTENTION_REQUIRE(*top_p > 0 && *top_p <= 1, where, "top_p", "in (0, 1]", std::to_string(*top_p));

    Tokens out = x;
    out.reserve(x.size() + static_cast<std::size_t>(max_new_tokens));
    Cache cache = make_cache();
    std::mt19937_64 engine(seed.value());
    const Index window = m_config.max_seq_len;
    for (Index step = 0; step < max_new_tokens; ++step) {
      const Index length = static_cast<Index>(out.size());
      Matrix hidden;          // [t, E]
      if (length > window) {  // a new window: every position shifted, so nothing cached is valid
        cache.clear();
        hidden = hidden_cached(Tokens(out.end() - window, out.end()), cache);
      } else if (cache.size() == 0) {  // the prompt
        hidden = hidden_cached(out, cache);
      } else {  // the newest token only
        hidden = hidden_cached(Tokens{out.back()}, cache);
      }
      const Matrix logits = m_linear(hidden.bottomRows(1));  // [1, vocab]
      out.push_back(next_token(logits, do_sample, temperature, top_k, top_p, engine));
    }
    return out;
  }

 private:
  /// One Decoder: post-norm, as simple_llm's Decoder.forward.
  struct Layer {
    Attention attention;  // _heads
    LinearType ff1, ff2;  // _ff._layer1 [4E, E], _ff._layer2 [E, 4E]
    detail::LayerNorm<Scalar> norm1, norm2;

    /// out = norm1(attention(x) + x); return norm2(ff(out) + out). x [t, E] to [t, E].
    template <typename AttentionCall>
    Matrix run(const Matrix& x, AttentionCall&& attend) const {
      Matrix out = attend(x);  // [t, E]
      out += x;
      norm1.apply(out);
      Matrix h = ff1(out);        // [t, 4E]
      h = h.cwiseMax(Scalar(0));  // ReLU
      Matrix y = ff2(h);          // [t, E]
      y += out;
      norm2.apply(y);
      return y;
    }
  };

  GPT() = default;

  static Index read_size(const head_attention::SafetensorsFile& file, const char* key) {
    const char* where = "simple_llm::GPT::load";
    const auto& metadata = file.metadata();
    const auto it = metadata.find(key);
    HEAD_ATTENTION_REQUIRE(it != metadata.end(), where, std::string("__metadata__[\"") + key + "\"]",
                           "present (simple_llm's GPT sizes, as export_gpt.py writes them)", "no such key");
    const std::string& text = it->second;
    Index value = 0;
    bool ok = !text.empty() && text.size() <= 18;  // up to 10^18 - 1: no overflow below
    for (const char c : text) {
      ok = ok && c >= '0' && c <= '9';
      if (ok) value = value * 10 + (c - '0');
    }
    HEAD_ATTENTION_REQUIRE(ok && value > 0, where, std::string("__metadata__[\"") + key + "\"]",
                           "a positive decimal integer", "\"" + text + "\"");
    return value;
  }

  static GPTConfig read_config(const head_attention::SafetensorsFile& file) {
    GPTConfig c;
    c.vocab_size = read_size(file, "vocab_size");
    c.max_seq_len = read_size(file, "max_seq_len");
    c.emb_size = read_size(file, "emb_size");
    c.num_heads = read_size(file, "num_heads");
    c.head_size = read_size(file, "head_size");
    c.num_layers = read_size(file, "num_layers");
    return c;
  }

  static std::string config_text(const GPTConfig& c) {
    return "GPT(vocab_size=" + std::to_string(c.vocab_size) +
           ", max_seq_len=" + std::to_string(c.max_seq_len) + ", emb_size=" + std::to_string(c.emb_size) +
           ", num_heads=" + std::to_string(c.num_heads) + ", head_size=" + std::to_string(c.head_size) +
           ", num_layers=" + std::to_string(c.num_layers) + ")";
  }

  static std::string decoder(Index l) { return "_decoders." + std::to_string(l) + "."; }
  static std::string head(Index l, Index i) {
    return decoder(l) + "_heads._heads." + std::to_string(i) + ".";
  }

  /// Every parameter of the model the sizes describe, with its shape and the sizes it follows from.
  static std::map<std::string, std::pair<std::vector<Index>, std::string>> expected_params(
      const GPTConfig& c) {
    std::map<std::string, std::pair<std::vector<Index>, std::string>> p;
    const Index E = c.emb_size, hs = c.head_size;
    p["_token_embeddings._embedding.weight"] = {{c.vocab_size, E}, "vocab_size, emb_size"};
    p["_position_embeddings.embedding.weight"] = {{c.max_seq_len, E}, "max_seq_len, emb_size"};
    for (Index l = 0; l < c.num_layers; ++l) {
      for (Index i = 0; i < c.num_heads; ++i)
        for (const char* name : {"_q", "_k", "_v"}) {
          p[head(l, i) + name + ".weight"] = {{hs, E}, "head_size, emb_size"};
          p[head(l, i) + name + ".bias"] = {{hs}, "head_size"};
        }
      p[decoder(l) + "_heads._layer.weight"] = {{E, c.num_heads * hs}, "emb_size, num_heads * head_size"};
      p[decoder(l) + "_heads._layer.bias"] = {{E}, "emb_size"};
      p[decoder(l) + "_ff._layer1.weight"] = {{4 * E, E}, "4 * emb_size, emb_size"};
      p[decoder(l) + "_ff._layer1.bias"] = {{4 * E}, "4 * emb_size"};
      p[decoder(l) + "_ff._layer2.weight"] = {{E, 4 * E}, "emb_size, 4 * emb_size"};
      p[decoder(l) + "_ff._layer2.bias"] = {{E}, "emb_size"};
      for (const char* norm : {"_norm1", "_norm2"}) {
        p[decoder(l) + norm + ".weight"] = {{E}, "emb_size"};
        p[decoder(l) + norm + ".bias"] = {{E}, "emb_size"};
      }
    }
    p["_linear.weight"] = {{c.vocab_size, E}, "vocab_size, emb_size"};
    p["_linear.bias"] = {{c.vocab_size}, "vocab_size"};
    return p;
  }

  /// Throws shape_error unless the file's keys are exactly the model's (the masks optional) and every
  /// parameter has the shape the metadata's sizes give it.
  static void check_keys(const head_attention::SafetensorsFile& file, const GPTConfig& c) {
    const std::string where = "simple_llm::GPT::load";
    const auto params = expected_params(c);
    std::set<std::string> masks;
    for (Index l = 0; l < c.num_layers; ++l)
      for (Index i = 0; i < c.num_heads; ++i)
        masks.insert(head(l, i) + "_tril_mask");
    std::vector<std::string> missing, extra;
    for (const auto& kv : params)
      if (!file.contains(kv.first)) missing.push_back(kv.first);
    for (const std::string& name : file.names())
      if (!params.count(name) && !masks.count(name)) extra.push_back(name);
    if (!missing.empty() || !extra.empty()) {
      std::string got;
      if (!missing.empty()) got += "missing key(s) " + detail::some_names(missing);
      if (!extra.empty())
        got += std::string(got.empty() ? "" : "; ") + "unexpected key(s) " + detail::some_names(extra);
      // Thrown here rather than through HEAD_ATTENTION_REQUIRE: the message is built already.
      throw head_attention::shape_error(where +
                                        ": the tensors must be the state_dict of the __metadata__'s " +
                                        config_text(c) + ", got " + got);
    }
    for (const auto& kv : params) {
      const std::vector<Index>& shape = file.info(kv.first).shape;
      HEAD_ATTENTION_REQUIRE(shape == kv.second.first, where.c_str(), "the shape of '" + kv.first + "'",
                             detail::shape_text(kv.second.first) + " (" + kv.second.second +
                                 " of the __metadata__'s " + config_text(c) + ")",
                             detail::shape_text(shape));
    }
  }

  Matrix matrix(const head_attention::SafetensorsFile& file, const std::string& name) const {
    return file.tensor<Scalar>(name).matrix();
  }
  Vector vector(const head_attention::SafetensorsFile& file, const std::string& name) const {
    return matrix(file, name).transpose();  // [1, n] -> [n]
  }
  LinearType linear(const head_attention::SafetensorsFile& file, const std::string& name) const {
    LinearType layer;
    layer.weight = matrix(file, name + ".weight");
    layer.bias = vector(file, name + ".bias");
    return layer;
  }

  /// The weights, after check_keys: each Decoder's attention through the library's load_state_dict (which
  /// also checks the causal masks), then packed.
  void read_weights(const head_attention::SafetensorsFile& file) {
    const GPTConfig& c = m_config;
    m_token_embeddings = matrix(file, "_token_embeddings._embedding.weight");
    m_position_embeddings = matrix(file, "_position_embeddings.embedding.weight");
    for (Index l = 0; l < c.num_layers; ++l) {
      // Four arguments: the fifth is simple_llm's dropout, which inference does not use.
      head_attention::MultiHeadAttention<Scalar> mha(c.num_heads, c.emb_size, c.head_size, c.max_seq_len);
      head_attention::load_state_dict(mha, file, decoder(l) + "_heads.");
      const std::string d = decoder(l);
      m_layers.push_back(Layer{Attention(mha),
                               linear(file, d + "_ff._layer1"),
                               linear(file, d + "_ff._layer2"),
                               {vector(file, d + "_norm1.weight"), vector(file, d + "_norm1.bias")},
                               {vector(file, d + "_norm2.weight"), vector(file, d + "_norm2.bias")}});
    }
    m_linear = linear(file, "_linear");
  }

  /// Throws shape_error unless x is a non-empty sequence of ids in [0, vocab_size).
  void check_tokens(const Tokens& x, const char* where) const {
    HEAD_ATTENTION_REQUIRE(!x.empty(), where, "the number of tokens", ">= 1", "0");
    for (std::size_t i = 0; i < x.size(); ++i)
      HEAD_ATTENTION_REQUIRE(x[i] >= 0 && x[i] < m_config.vocab_size, where,
                             "token id " + std::to_string(i) + " (counting from 0)",
                             "in [0, vocab_size = " + std::to_string(m_config.vocab_size) + ")",
                             std::to_string(x[i]));
  }

  /// Token plus position embeddings of ids[0, t) at positions first.. : [t, E].
  Matrix embed(const Index* ids, Index t, Index first) const {
    Matrix h(t, m_config.emb_size);
    for (Index i = 0; i < t; ++i)
      h.row(i) = m_token_embeddings.row(ids[i]) + m_position_embeddings.row(first + i);
    return h;
  }

  /// The last Decoder's output [t, E] for t new tokens extending the cache (forward_cached before the final
  /// Linear).
  Matrix hidden_cached(const Tokens& x, Cache& cache) const {
    const char* where = "simple_llm::GPT::forward_cached";
    check_tokens(x, where);
    HEAD_ATTENTION_REQUIRE(
        static_cast<Index>(cache.m_layers.size()) == m_config.num_layers, where, "the cache's layers",
        "num_layers = " + std::to_string(m_config.num_layers) + " (a cache from this model's make_cache())",
        std::to_string(cache.m_layers.size()));
    const Index t = static_cast<Index>(x.size());
    HEAD_ATTENTION_REQUIRE(cache.size() + t <= m_config.max_seq_len, where, "cache.size() + new tokens",
                           "<= max_seq_len = " + std::to_string(m_config.max_seq_len),
                           std::to_string(cache.size()) + " + " + std::to_string(t));
    Matrix h = embed(x.data(), t, cache.size());  // [t, E]
    for (std::size_t l = 0; l < m_layers.size(); ++l)
      h = m_layers[l].run(
          h, [&](const Matrix& in) { return m_layers[l].attention.forward_cached(in, cache.m_layers[l]); });
    return h;
  }

  /// The token generate appends, from the last position's logits [1, vocab] (see generate).
  static Index next_token(const Matrix& logits, bool do_sample, double temperature,
                          std::optional<Index> top_k, std::optional<double> top_p, std::mt19937_64& engine) {
    const Index vocab = logits.cols();
    if (!do_sample) {  // argmax; dividing by a positive temperature would not change it
      Index best = 0;
      for (Index v = 1; v < vocab; ++v)
        if (logits(0, v) > logits(0, best)) best = v;
      return best;
    }
    std::vector<double> scaled(static_cast<std::size_t>(vocab));  // logits / temperature, filtered: -inf
    for (Index v = 0; v < vocab; ++v)
      scaled[static_cast<std::size_t>(v)] = static_cast<double>(logits(0, v)) / temperature;
    // Ids by scaled logit, descending (by id on ties): the order of both filters.
    std::vector<Index> order(static_cast<std::size_t>(vocab));
    std::iota(order.begin(), order.end(), Index(0));
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
      return scaled[static_cast<std::size_t>(a)] > scaled[static_cast<std::size_t>(b)];
    });
    constexpr double minus_infinity = -std::numeric_limits<double>::infinity();
    if (top_k)
      for (std::size_t r = static_cast<std::size_t>(*top_k); r < order.size(); ++r)
        scaled[static_cast<std::size_t>(order[r])] = minus_infinity;
    if (top_p) {
      const std::vector<double> probs = softmax(scaled);
      double cumulative = 0;
      for (std::size_t r = 0; r < order.size(); ++r) {
        cumulative += probs[static_cast<std::size_t>(order[r])];
        if (r > 0 && !(cumulative <= *top_p)) scaled[static_cast<std::size_t>(order[r])] = minus_infinity;
      }
    }
    const std::vector<double> probs = softmax(scaled);
    // Inverse CDF with our own 53-bit conversion (std::uniform_real_distribution differs between standard
    // libraries), over the ids in descending order; the last id with a non-zero probability if rounding
    // leaves u past the total.
    const double u = static_cast<double>(engine() >> 11) * 0x1.0p-53;
    double cumulative = 0;
    Index chosen = order.front();
    for (const Index v : order) {
      const double p = probs[static_cast<std::size_t>(v)];
      if (p == 0) continue;
      chosen = v;
      cumulative += p;
      if (u < cumulative) break;
    }
    return chosen;
  }

  /// softmax of values with -inf entries (at least one finite), in double.
  static std::vector<double> softmax(const std::vector<double>& values) {
    const double top = *std::max_element(values.begin(), values.end());
    std::vector<double> p(values.size());
    double sum = 0;
    for (std::size_t i = 0; i < values.size(); ++i)
      sum += p[i] = std::exp(values[i] - top);
    for (double& x : p)
      x /= sum;
    return p;
  }

  GPTConfig m_config;
  Matrix m_token_embeddings;     // [vocab_size, E]
  Matrix m_position_embeddings;  // [max_seq_len, E]
  std::vector<Layer> m_layers;   // num_layers Decoders
  LinearType m_linear;           // weight [vocab_size, E], bias [vocab_size]
};

}  // namespace simple_llm

// simple_llm's GPT (examples/gpt/gpt.hpp) against PyTorch: the tiny model of examples/gpt/data, made by
// examples/gpt/make_tiny_gpt.py. Logits at every position (forward and the cached decode path), greedy
// generation past max_seq_len token for token, the sampling filters' properties, and every refused input.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../examples/gpt/gpt.hpp"
#include "test_support.hpp"

namespace {

using namespace ha_test;
using simple_llm::GPT;
using simple_llm::Seed;
using simple_llm::Tokens;

std::string gpt_data(const std::string& file) {
  return std::string(HEAD_ATTENTION_GPT_DATA_DIR) + "/" + file;
}

template <typename Scalar>
const char* dtype_name() {
  return std::is_same<Scalar, float>::value ? "F32" : "F64";
}

template <typename Scalar>
const GPT<Scalar>& tiny_model() {
  static const GPT<Scalar> gpt =
      GPT<Scalar>::load(gpt_data(std::string("tiny_gpt.") + dtype_name<Scalar>() + ".safetensors"));
  return gpt;
}

/// PyTorch's outputs for the model of that dtype.
template <typename Scalar>
const head_attention::SafetensorsFile& tiny_outputs() {
  static const head_attention::SafetensorsFile file = head_attention::SafetensorsFile::open(
      gpt_data(std::string("tiny_gpt.") + dtype_name<Scalar>() + ".io.safetensors"));
  return file;
}

/// Token ids stored as F64 (exact) in the outputs file.
Tokens ids(const head_attention::SafetensorsFile& file, const std::string& name) {
  Tokens out;
  for (const double v : file.tensor<double>(name).values)
    out.push_back(static_cast<simple_llm::Index>(v));
  return out;
}

/// The tolerance of the logits, relative to their largest magnitude (max |ours - PyTorch| / max |PyTorch|).
template <typename Scalar>
double logits_tolerance() {
  return std::is_same<Scalar, float>::value ? 2e-5 : 1e-10;
}

/// The logits generate's next step sees after `prefix`: the last position of forward(last max_seq_len
/// tokens).
template <typename Scalar>
std::vector<double> last_logits(const GPT<Scalar>& gpt, const Tokens& prefix) {
  const auto window = static_cast<std::ptrdiff_t>(
      std::min<std::size_t>(prefix.size(), static_cast<std::size_t>(gpt.config().max_seq_len)));
  const auto logits = gpt.forward(Tokens(prefix.end() - window, prefix.end()));
  std::vector<double> row;
  for (Index v = 0; v < logits.cols(); ++v)
    row.push_back(static_cast<double>(logits(logits.rows() - 1, v)));
  return row;
}

/// How many logits are larger than the token's: 0 for the best.
Index rank_of(const std::vector<double>& logits, Index token) {
  Index rank = 0;
  for (const double l : logits)
    rank += l > logits[static_cast<std::size_t>(token)];
  return rank;
}

/// The tokens simple_llm's top_p keeps: by probability (softmax of logits / temperature) descending, those
/// whose cumulative probability is <= top_p, and always the first. Written independently of gpt.hpp's.
std::set<Index> nucleus(const std::vector<double>& logits, double temperature, double top_p) {
  std::vector<std::pair<double, Index>> by_prob;
  double top = -INFINITY;
  for (const double l : logits)
    top = std::max(top, l / temperature);
  double sum = 0;
  for (std::size_t v = 0; v < logits.size(); ++v) {
    const double e = std::exp(logits[v] / temperature - top);
    sum += e;
    by_prob.emplace_back(e, static_cast<Index>(v));
  }
  std::sort(by_prob.begin(), by_prob.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::set<Index> kept;
  double cumulative = 0;
  for (const auto& [e, v] : by_prob) {
    cumulative += e / sum;
    if (kept.empty() || cumulative <= top_p) kept.insert(v);
  }
  return kept;
}

/// The first index of the largest value.
Index argmax(const std::vector<double>& logits) {
  return static_cast<Index>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// A safetensors file built in memory from F32 tensors and metadata, to make the malformed models below.
struct RawTensor {
  std::vector<Index> shape;
  std::vector<float> values;
};
using RawTensors = std::map<std::string, RawTensor>;

std::vector<unsigned char> safetensors_bytes(const RawTensors& tensors,
                                             const std::map<std::string, std::string>& metadata) {
  nlohmann::json header;
  header["__metadata__"] = metadata;
  std::size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const std::size_t bytes = t.values.size() * sizeof(float);
    header[name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<unsigned char> out(8);
  for (int i = 0; i < 8; ++i)
    out[static_cast<std::size_t>(i)] =
        static_cast<unsigned char>(static_cast<std::uint64_t>(text.size()) >> (8 * i));
  out.insert(out.end(), text.begin(), text.end());
  for (const auto& kv : tensors) {  // little-endian hosts, as the format
    const auto* p = reinterpret_cast<const unsigned char*>(kv.second.values.data());
    out.insert(out.end(), p, p + kv.second.values.size() * sizeof(float));
  }
  return out;
}

/// The tiny F32 model's tensors (its bool masks left out: they are optional) and metadata.
std::pair<RawTensors, std::map<std::string, std::string>> tiny_raw() {
  const auto file = head_attention::SafetensorsFile::open(gpt_data("tiny_gpt.F32.safetensors"));
  RawTensors tensors;
  for (const std::string& name : file.names())
    if (file.info(name).dtype == "F32") {
      const auto t = file.tensor<float>(name);
      tensors[name] = {t.shape, t.values};
    }
  return {tensors, file.metadata()};
}

GPT<float> load_raw(const RawTensors& tensors, const std::map<std::string, std::string>& metadata) {
  return GPT<float>::load(head_attention::SafetensorsFile::from_memory(safetensors_bytes(tensors, metadata)));
}

}  // namespace

TEMPLATE_TEST_CASE("GPT reads its sizes from the file's metadata", "[gpt]", float, double) {
  const simple_llm::GPTConfig& c = tiny_model<TestType>().config();
  CHECK(c.vocab_size == 50);
  CHECK(c.max_seq_len == 12);
  CHECK(c.emb_size == 16);
  CHECK(c.num_heads == 2);
  CHECK(c.head_size == 8);
  CHECK(c.num_layers == 2);
  // Only load() makes one, so no GPT object is ever incomplete.
  STATIC_REQUIRE(!std::is_default_constructible<GPT<TestType>>::value);
}

TEMPLATE_TEST_CASE("GPT::forward gives PyTorch's logits at every position", "[gpt]", float, double) {
  using Scalar = TestType;
  const GPT<Scalar>& gpt = tiny_model<Scalar>();
  const Tokens prompt = ids(tiny_outputs<Scalar>(), "prompt");
  const Matrix<Scalar> expected =
      tiny_outputs<Scalar>().template tensor<Scalar>("logits").matrix();  // [12, 50]
  REQUIRE(prompt.size() == 12);
  const Matrix<Scalar> logits = gpt.forward(prompt);
  REQUIRE(logits.rows() == 12);
  REQUIRE(logits.cols() == 50);
  INFO(scalar_name<Scalar>() << ": max |logit| " << max_abs(expected.data(), expected.size())
                             << ", max |difference| "
                             << max_abs_diff(logits.data(), expected.data(), logits.size()));
  CHECK(relative_error(logits, expected) < logits_tolerance<Scalar>());

  // The cached path: every prefill length, then one token per step; row p is position p's logits.
  for (std::size_t prefill = 1; prefill <= prompt.size(); ++prefill) {
    INFO("prefill of " << prefill << " tokens");
    typename GPT<Scalar>::Cache cache = gpt.make_cache();
    Matrix<Scalar> cached(12, 50);
    cached.topRows(static_cast<Index>(prefill)) = gpt.forward_cached(
        Tokens(prompt.begin(), prompt.begin() + static_cast<std::ptrdiff_t>(prefill)), cache);
    for (std::size_t p = prefill; p < prompt.size(); ++p)
      cached.row(static_cast<Index>(p)) = gpt.forward_cached(Tokens{prompt[p]}, cache);
    CHECK(cache.size() == 12);
    CHECK(relative_error(cached, expected) < logits_tolerance<Scalar>());
  }
}

TEMPLATE_TEST_CASE("GPT::generate greedy is PyTorch's, token for token, past max_seq_len", "[gpt]", float,
                   double) {
  using Scalar = TestType;
  const GPT<Scalar>& gpt = tiny_model<Scalar>();
  for (const std::string name : {"greedy", "long"}) {
    const Tokens prompt = ids(tiny_outputs<Scalar>(), name + ".prompt");
    const Tokens expected = ids(tiny_outputs<Scalar>(), name);
    const auto new_tokens = static_cast<Index>(expected.size() - prompt.size());
    INFO(scalar_name<Scalar>() << " " << name << ": prompt of " << prompt.size() << ", " << new_tokens
                               << " new tokens");
    REQUIRE(new_tokens >= (name == "greedy" ? 20 : 8));
    REQUIRE(expected.size() > 12);  // the crop to max_seq_len is exercised
    CHECK(gpt.generate(prompt, new_tokens, false) == expected);
    // Greedy ignores the sampling arguments, as simple_llm's generate does.
    CHECK(gpt.generate(prompt, new_tokens, false, 0.5, 3, 0.5, Seed{9}) == expected);
  }
}

TEST_CASE("GPT::generate: no new tokens returns the prompt", "[gpt]") {
  const Tokens prompt = {4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23, 42, 1};  // longer than max_seq_len
  CHECK(tiny_model<float>().generate(prompt, 0, true) == prompt);
}

TEST_CASE("GPT::generate sampling: the same seed gives the same tokens, other seeds others", "[gpt]") {
  const GPT<float>& gpt = tiny_model<float>();
  const Tokens prompt = {1, 2, 3};
  const Tokens a =
      gpt.generate(prompt, 20, true, 1.0, std::nullopt, std::nullopt, 1);  // any integer is a Seed
  CHECK(a.size() == 23);
  CHECK(gpt.generate(prompt, 20, true, 1.0, std::nullopt, std::nullopt, Seed{1}) == a);
  CHECK(gpt.generate(prompt, 20, true, 1.0, std::nullopt, std::nullopt, Seed{2}) != a);
  CHECK(gpt.generate(prompt, 20, true, 1.0, std::nullopt, std::nullopt, Seed{3}) != a);
}

TEST_CASE("GPT::generate sampling: top_k never leaves the k best", "[gpt]") {
  const GPT<float>& gpt = tiny_model<float>();
  for (const Index k : {1, 2, 5}) {
    for (std::uint64_t seed = 0; seed < 4; ++seed) {
      INFO("top_k " << k << " seed " << seed);
      const Tokens out = gpt.generate({7, 3}, 16, true, 1.5, k, std::nullopt, Seed{seed});
      for (std::size_t n = 2; n < out.size(); ++n) {
        INFO("step " << n);
        CHECK(rank_of(last_logits(gpt, Tokens(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(n))),
                      out[n]) < k);
      }
    }
  }
}

TEST_CASE("GPT::generate sampling: top_p stays in simple_llm's nucleus", "[gpt]") {
  const GPT<float>& gpt = tiny_model<float>();
  std::size_t outside_best = 0;  // draws of a token other than the best: the test must see some
  for (const double p : {0.3, 0.6, 0.9}) {
    for (std::uint64_t seed = 0; seed < 4; ++seed) {
      INFO("top_p " << p << " seed " << seed);
      const double temperature = 2.0;
      const Tokens out = gpt.generate({11}, 16, true, temperature, std::nullopt, p, Seed{seed});
      for (std::size_t n = 1; n < out.size(); ++n) {
        const std::vector<double> logits =
            last_logits(gpt, Tokens(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(n)));
        INFO("step " << n);
        CHECK(nucleus(logits, temperature, p).count(out[n]) == 1);
        outside_best += out[n] != argmax(logits);
      }
    }
  }
  CHECK(outside_best > 0);
}

TEST_CASE("GPT::generate sampling: a tiny temperature, top_k = 1 or a tiny top_p is greedy", "[gpt]") {
  const GPT<float>& gpt = tiny_model<float>();
  for (const Tokens& prompt :
       {Tokens{0}, Tokens{5, 9, 13}, Tokens{49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39}}) {
    const Tokens greedy = gpt.generate(prompt, 20, false);
    for (std::uint64_t seed = 0; seed < 3; ++seed) {
      CHECK(gpt.generate(prompt, 20, true, 1e-6, std::nullopt, std::nullopt, Seed{seed}) == greedy);
      CHECK(gpt.generate(prompt, 20, true, 1.0, 1, std::nullopt, Seed{seed}) == greedy);
      CHECK(gpt.generate(prompt, 20, true, 1.0, std::nullopt, 1e-9, Seed{seed}) == greedy);
    }
  }
}

TEST_CASE("GPT::generate sampling draws by probability", "[gpt]") {
  // One step from a fixed prompt over many seeds: each token's frequency is within 5 standard deviations of
  // its softmax probability (top_k = 4 renormalises over the 4 best).
  const GPT<float>& gpt = tiny_model<float>();
  const Tokens prompt = {3, 1, 4, 1, 5};
  const std::vector<double> logits = last_logits(gpt, prompt);
  std::vector<std::pair<double, Index>> best;
  for (std::size_t v = 0; v < logits.size(); ++v)
    best.emplace_back(logits[v], static_cast<Index>(v));
  std::sort(best.rbegin(), best.rend());
  best.resize(4);
  double sum = 0;
  for (const auto& b : best)
    sum += std::exp(b.first - best.front().first);
  const int draws = 4000;
  std::map<Index, int> counts;
  for (int s = 0; s < draws; ++s)
    ++counts[gpt.generate(prompt, 1, true, 1.0, 4, std::nullopt, Seed{static_cast<std::uint64_t>(s)}).back()];
  CHECK(counts.size() <= 4);
  for (const auto& [logit, token] : best) {
    const double p = std::exp(logit - best.front().first) / sum;
    const double frequency = counts[token] / static_cast<double>(draws);
    INFO("token " << token << ": probability " << p << ", frequency " << frequency);
    CHECK(std::abs(frequency - p) < 5 * std::sqrt(p * (1 - p) / draws));
  }
}

TEST_CASE("GPT::Cache::truncate rolls decoding back", "[gpt]") {
  const GPT<float>& gpt = tiny_model<float>();
  const Tokens text = {9, 8, 7, 6, 5, 4, 3, 2, 1, 0};
  auto cache = gpt.make_cache();
  const Matrix<float> first = gpt.forward_cached(text, cache);  // [10, 50]
  cache.truncate(4);
  CHECK(cache.size() == 4);
  const Matrix<float> again = gpt.forward_cached(Tokens(text.begin() + 4, text.end()), cache);
  // The rows past 4 are gone: a cache whose 10 tokens differed after the 4th, truncated to 4, gives the same
  // bits. (Against `first` to rounding: a call of 6 rows projects through the weights as stored, the 10-row
  // prefill through GEMMs.)
  auto other = gpt.make_cache();
  (void)gpt.forward_cached(Tokens{9, 8, 7, 6, 11, 12, 13, 14, 15, 16}, other);
  other.truncate(4);
  CHECK(identical(again, gpt.forward_cached(Tokens(text.begin() + 4, text.end()), other)));
  CHECK(relative_error(again, Matrix<float>(first.bottomRows(6))) < 1e-5);
  check_shape_error([&] { cache.truncate(11); }, {"truncate", "size", "[0, size() = 10]", "11"});
  CHECK(cache.size() == 10);
}

TEST_CASE("GPT::set_num_threads does not change the results", "[gpt]") {
  const GPT<float>& gpt = tiny_model<float>();
  GPT<float> two = gpt;
  two.set_num_threads(2);
  const Tokens prompt = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  CHECK(identical(two.forward(prompt), gpt.forward(prompt)));
  CHECK(two.generate({5, 6}, 20, true, 1.0, 10, 0.9, 4) == gpt.generate({5, 6}, 20, true, 1.0, 10, 0.9, 4));
  check_shape_error([&] { two.set_num_threads(-1); }, {"simple_llm::GPT::set_num_threads", ">= 0", "-1"});
}

TEST_CASE("GPT refuses bad tokens and sampling arguments", "[gpt]") {
  const GPT<float>& gpt = tiny_model<float>();
  const char* g = "simple_llm::GPT::generate";
  check_shape_error(
      [&] {
        (void)gpt.generate({3, 50}, 5, false);
      },
      {g, "token id 1", "in [0, vocab_size = 50)", "got 50"});
  check_shape_error([&] { (void)gpt.generate({-1}, 5, false); }, {g, "token id 0", "got -1"});
  check_shape_error([&] { (void)gpt.generate({}, 5, false); }, {g, "the number of tokens", ">= 1", "got 0"});
  check_shape_error([&] { (void)gpt.generate({1}, -1, false); }, {g, "max_new_tokens", ">= 0", "got -1"});
  for (const double t : {0.0, -1.0, std::nan(""), std::numeric_limits<double>::infinity()})
    check_shape_error([&] { (void)gpt.generate({1}, 5, true, t); },
                      {g, "temperature", "a finite number > 0"});
  CHECK(gpt.generate({1}, 2, false, 0.0).size() == 3);  // greedy does not use the temperature
  for (const Index k : {0, -2, 51})
    check_shape_error([&] { (void)gpt.generate({1}, 5, true, 1.0, k); },
                      {g, "top_k", "in [1, vocab_size = 50]", "got " + std::to_string(k)});
  for (const double p : {0.0, -0.5, 1.5, std::nan("")})
    check_shape_error([&] { (void)gpt.generate({1}, 5, true, 1.0, std::nullopt, p); },
                      {g, "top_p", "in (0, 1]"});

  const char* f = "simple_llm::GPT::forward";
  check_shape_error([&] { (void)gpt.forward(Tokens(13, 1)); },
                    {f, "sequence length", "<= max_seq_len = 12", "13"});
  check_shape_error([&] { (void)gpt.forward({}); }, {f, "the number of tokens", "got 0"});
  check_shape_error([&] { (void)gpt.forward({0, 1, 2, 999}); }, {f, "token id 3", "got 999"});
  auto cache = gpt.make_cache();
  (void)gpt.forward_cached(Tokens(10, 2), cache);
  check_shape_error([&] { (void)gpt.forward_cached(Tokens(3, 2), cache); },
                    {"simple_llm::GPT::forward_cached", "<= max_seq_len = 12", "10 + 3"});
  CHECK(cache.size() == 10);  // unchanged by the refused call
}

TEST_CASE("GPT::load refuses files that are not simple_llm's GPT", "[gpt]") {
  // Not a structured binding: C++17 lambdas cannot capture those (clang refuses).
  const auto raw = tiny_raw();
  const RawTensors& tensors = raw.first;
  const std::map<std::string, std::string>& metadata = raw.second;
  const char* where = "simple_llm::GPT::load";
  // The rebuilt file itself loads (the masks are optional) and gives the committed model's logits.
  const Tokens prompt = {1, 2, 3, 4};
  CHECK(identical(load_raw(tensors, metadata).forward(prompt), tiny_model<float>().forward(prompt)));

  SECTION("a missing key") {
    RawTensors t = tensors;
    t.erase("_decoders.1._norm2.bias");
    check_shape_error(
        [&] { (void)load_raw(t, metadata); },
        {where, "GPT(vocab_size=50, max_seq_len=12, emb_size=16, num_heads=2, head_size=8, num_layers=2)",
         "missing key(s) _decoders.1._norm2.bias"});
  }
  SECTION("an unexpected key") {
    RawTensors t = tensors;
    t["_decoders.2._norm1.weight"] = {{16}, std::vector<float>(16, 1.0f)};
    check_shape_error([&] { (void)load_raw(t, metadata); },
                      {where, "unexpected key(s) _decoders.2._norm1.weight"});
  }
  SECTION("metadata that disagrees with the shapes") {
    auto m = metadata;
    m["emb_size"] = "8";
    check_shape_error([&] { (void)load_raw(tensors, m); }, {where, "the shape of", "emb_size=8", "got [64]"});
    m = metadata;
    m["num_layers"] = "1";  // the second layer's keys are then extra
    check_shape_error([&] { (void)load_raw(tensors, m); },
                      {where, "num_layers=1", "unexpected key(s) _decoders.1."});
    m = metadata;
    m["vocab_size"] = "49";
    check_shape_error([&] { (void)load_raw(tensors, m); },
                      {where, "'_linear.bias'", "[49] (vocab_size", "got [50]"});
  }
  SECTION("a tensor of the wrong shape") {
    RawTensors t = tensors;
    t["_decoders.0._ff._layer2.weight"] = {{16, 32}, std::vector<float>(16 * 32, 0.5f)};
    check_shape_error(
        [&] { (void)load_raw(t, metadata); },
        {where, "'_decoders.0._ff._layer2.weight'", "[16, 64] (emb_size, 4 * emb_size", "got [16, 32]"});
  }
  SECTION("sizes missing from the metadata or not positive integers") {
    auto m = metadata;
    m.erase("head_size");
    check_shape_error([&] { (void)load_raw(tensors, m); },
                      {where, "__metadata__[\"head_size\"]", "no such key"});
    for (const char* bad : {"", "abc", "8.0", "-2", "0", " 8", "99999999999999999999"}) {
      m = metadata;
      m["num_heads"] = bad;
      check_shape_error([&] { (void)load_raw(tensors, m); },
                        {where, "__metadata__[\"num_heads\"]", "a positive decimal integer",
                         std::string("\"") + bad + "\""});
    }
  }
}

// simple_llm's GPT.generate in C++: loads a model exported by export_gpt.py and continues a prompt.
//
//   gpt_generate <model.safetensors> <token id>... [--max-new-tokens N] [--sample] [--temperature T]
//                [--top-k K] [--top-p P] [--seed S] [--double]
//
// Prints "generated: " and the whole sequence (the prompt, then the new tokens), as simple_llm's generate
// returns it. Greedy unless --sample; --double computes in double instead of float. Exit status 0 on success,
// 1 on a bad model or argument (with the library's message), 2 on a usage error.
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "gpt.hpp"

namespace {

struct Options {
  std::string model;
  simple_llm::Tokens prompt;
  simple_llm::Index max_new_tokens = 20;
  bool do_sample = false;
  double temperature = 1.0;
  std::optional<simple_llm::Index> top_k;
  std::optional<double> top_p;
  std::uint64_t seed = 0;
  bool use_double = false;
};

// Whole-string conversions: "12abc" is refused rather than read as 12.
long long to_integer(const std::string& text) {
  std::size_t used = 0;
  const long long value = std::stoll(text, &used);
  if (used != text.size()) throw std::invalid_argument("not an integer: " + text);
  return value;
}

double to_number(const std::string& text) {
  std::size_t used = 0;
  const double value = std::stod(text, &used);
  if (used != text.size()) throw std::invalid_argument("not a number: " + text);
  return value;
}

Options parse(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    // Every option but the two flags takes the next argument as its value.
    const auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw std::invalid_argument(a + " needs a value");
      return args[++i];
    };
    if (a == "--max-new-tokens") {
      o.max_new_tokens = to_integer(value());
    } else if (a == "--sample") {
      o.do_sample = true;
    } else if (a == "--temperature") {
      o.temperature = to_number(value());
    } else if (a == "--top-k") {
      o.top_k = to_integer(value());
    } else if (a == "--top-p") {
      o.top_p = to_number(value());
    } else if (a == "--seed") {
      const long long seed = to_integer(value());
      if (seed < 0) throw std::invalid_argument("--seed must be >= 0, got " + value());
      o.seed = static_cast<std::uint64_t>(seed);
    } else if (a == "--double") {
      o.use_double = true;
    } else if (a.size() > 2 && a.compare(0, 2, "--") == 0) {
      throw std::invalid_argument("unknown option " + a);
    } else if (o.model.empty()) {
      o.model = a;
    } else {
      o.prompt.push_back(to_integer(a));
    }
  }
  if (o.model.empty()) throw std::invalid_argument("no model file given");
  return o;
}

template <typename Scalar>
void run(const Options& o) {
  const simple_llm::GPT<Scalar> gpt = simple_llm::GPT<Scalar>::load(o.model);
  const simple_llm::GPTConfig& c = gpt.config();
  std::cout << "model: vocab_size " << c.vocab_size << ", max_seq_len " << c.max_seq_len << ", emb_size "
            << c.emb_size << ", " << c.num_heads << " heads of " << c.head_size << ", " << c.num_layers
            << " layers\n";
  const simple_llm::Tokens out = gpt.generate(o.prompt, o.max_new_tokens, o.do_sample, o.temperature, o.top_k,
                                              o.top_p, simple_llm::Seed{o.seed});
  std::cout << "generated:";
  for (const simple_llm::Index token : out)
    std::cout << ' ' << token;
  std::cout << '\n';
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = parse(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "usage: gpt_generate <model.safetensors> <token id>... [--max-new-tokens N] [--sample]\n"
                 "       [--temperature T] [--top-k K] [--top-p P] [--seed S] [--double]\n"
              << e.what() << '\n';
    return 2;
  }
  try {
    if (options.use_double)
      run<double>(options);
    else
      run<float>(options);
  } catch (const std::exception& e) {
    std::cout << "error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}

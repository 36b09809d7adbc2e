// Text generation with simple_llm's GPT on the library (examples/gpt/gpt.hpp): the cost of one generated
// token when the text is n tokens long, the number gpt_compare.py sets against simple_llm's PyTorch generate.
//
//   gpt/step/n:<n>/threads:<t>      one token at position n < max_seq_len: a cached decode step through every
//                                   Decoder, the last Linear to the vocabulary and the argmax (what generate
//                                   does per token while the text fits the window)
//   gpt/window/threads:<t>          one token past max_seq_len: the window of max_seq_len tokens recomputed
//                                   (learned absolute positions shift, so nothing cached stays valid), then
//                                   the last row's logits and the argmax
//   gpt/generate/prompt:<p>/new:<k>/threads:<t>
//                                   a whole greedy generate call, p prompt tokens and k new ones
//
//   bench_gpt --model=FILE.safetensors [Google Benchmark flags]
// The model is a file export_gpt.py wrote; without --model, examples/gpt/data/tiny_gpt.F32.safetensors.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "gpt.hpp"

namespace {

using GPT = simple_llm::GPT<float>;
using Index = simple_llm::Index;

std::string g_model = HEAD_ATTENTION_BENCH_TINY_GPT;

/// Fixed pseudo-random token ids: the cost does not depend on which tokens they are.
simple_llm::Tokens tokens(const GPT& gpt, Index n) {
  std::mt19937_64 engine(7);
  std::uniform_int_distribution<Index> id(0, gpt.config().vocab_size - 1);
  simple_llm::Tokens out(static_cast<std::size_t>(n));
  for (auto& t : out)
    t = id(engine);
  return out;
}

const GPT& model() {
  static const GPT gpt = GPT::load(g_model);
  return gpt;
}

void step(benchmark::State& state, Index n, int threads) {
  GPT local = model();
  local.set_num_threads(threads);
  GPT::Cache cache = local.make_cache();
  (void)local.forward_cached(tokens(local, n), cache);  // the text so far, untimed
  const simple_llm::Tokens next{3};
  for (auto _ : state) {
    cache.truncate(n);
    const GPT::Matrix logits = local.forward_cached(next, cache);  // [1, vocab]
    Index best = 0;
    logits.row(0).maxCoeff(&best);
    benchmark::DoNotOptimize(best);
  }
  state.counters["ms_per_token"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * 1e-3,
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void window(benchmark::State& state, int threads) {
  GPT local = model();
  local.set_num_threads(threads);
  const simple_llm::Tokens text = tokens(local, local.config().max_seq_len);
  for (auto _ : state) {
    // generate's work for a token past the window: the window from scratch, the last row's logits.
    const simple_llm::Tokens out = local.generate(text, 1, false);
    benchmark::DoNotOptimize(out.back());
  }
  state.counters["ms_per_token"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * 1e-3,
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void generate(benchmark::State& state, Index prompt, Index fresh, int threads) {
  GPT local = model();
  local.set_num_threads(threads);
  const simple_llm::Tokens text = tokens(local, prompt);
  for (auto _ : state) {
    const simple_llm::Tokens out = local.generate(text, fresh, false);
    benchmark::DoNotOptimize(out.back());
  }
  state.counters["ms_per_token"] =
      benchmark::Counter(static_cast<double>(state.iterations() * fresh) * 1e-3,
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void register_all() {
  const Index max = model().config().max_seq_len;
  for (const int threads : {1, 2}) {
    for (const Index n : {Index(16), Index(128), Index(256), max - 1})
      if (n < max)
        benchmark::RegisterBenchmark(
            ("gpt/step/n:" + std::to_string(n) + "/threads:" + std::to_string(threads)).c_str(),
            [=](benchmark::State& state) { step(state, n, threads); })
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
    benchmark::RegisterBenchmark(("gpt/window/threads:" + std::to_string(threads)).c_str(),
                                 [=](benchmark::State& state) { window(state, threads); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    const Index prompt = std::min<Index>(16, max), fresh = max;  // to the window's end, then as far past it
    benchmark::RegisterBenchmark(("gpt/generate/prompt:" + std::to_string(prompt) +
                                  "/new:" + std::to_string(fresh) + "/threads:" + std::to_string(threads))
                                     .c_str(),
                                 [=](benchmark::State& state) { generate(state, prompt, fresh, threads); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->Iterations(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // --model=FILE is ours: taken out before Google Benchmark sees the flags.
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::strncmp(argv[i], "--model=", 8) == 0)
      g_model = argv[i] + 8;
    else
      rest.push_back(argv[i]);
  }
  int rest_count = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_count, rest.data());
  register_all();
  benchmark::AddCustomContext("model", g_model);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

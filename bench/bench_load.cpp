// bench_load: decode steps under load, and what a second thread gains on a quiet machine. A plain main with
// steady_clock (it measures percentiles of single calls, which Google Benchmark does not report).
//
// bench_load load [steps]: `steps` (2000) decode steps of HeadAttention, PackedHeadAttention and
// PackedMultiHeadAttention (8 heads of 64), emb 512, n = 256 cached positions, float, forward_cached_into
// with a Workspace (the cache is truncated back to n after each step, outside the timing), on the default
// thread setting (set_num_threads(0)) and on set_num_threads(2): first quiet, then with a child process
// spinning on one core (a busy loop, nice 0, started 100 ms before the steps). Prints the team each setting
// ran on, the median, 99th percentile and worst step, and p99 / the quiet median of the same setting.
//
// bench_load scale [rounds]: one thread against two for decode steps (one row per sequence) of the packed
// single-head and multi-head forms (8 x 64) and of the layers, B = 1, 8, 32 sequences, n = 128, 512, 2048:
// `rounds` (7) rounds, each timing a batch of steps on 1 thread then on 2, interleaved; the median over
// rounds of each batch's median step, and their ratio.
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include <Eigen/Core>

#include <head_attention/head_attention.hpp>

namespace {

using Index = Eigen::Index;
using Clock = std::chrono::steady_clock;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index kEmb = 512, kHead = 64, kHeads = 8;
constexpr std::uint64_t kSeed = 42;

Matrix random_rows(Index rows, std::uint64_t seed) {
  std::srand(static_cast<unsigned>(seed));
  return Matrix::Random(rows, kEmb);
}

/// One decode setup: a layer (or packed form) with caches of B sequences holding n positions each.
struct Case {
  std::string name;
  std::function<void()> step;        // one decode step (not timed: the truncation back to n)
  std::function<void()> rewind;      // the caches back to n positions
  std::function<void(int)> threads;  // set_num_threads
};

template <typename Layer, typename Cache>
struct Decoder {
  Layer layer;
  Cache cache;
  Matrix next, out;
  head_attention::Workspace<float> workspace;
  Index n;
};

template <typename Layer, typename Cache>
Case make_case(std::string name, std::shared_ptr<Decoder<Layer, Cache>> d, Index batch) {
  Case c;
  c.name = std::move(name);
  c.step = [d] { d->layer.forward_cached_into(d->next, d->cache, d->out, d->workspace); };
  c.rewind = [d] {
    if constexpr (std::is_same<Cache, std::vector<head_attention::KVCache<float>>>::value) {
      for (auto& one : d->cache)
        one.truncate(d->n);
    } else {
      d->cache.truncate(d->n);
    }
  };
  c.threads = [d](int t) { d->layer.set_num_threads(t); };
  (void)batch;
  return c;
}

/// form: "layer" (HeadAttention), "packed" (PackedHeadAttention), "multi" (MultiHeadAttention),
/// "packed_multi" (PackedMultiHeadAttention).
Case build(const std::string& form, Index batch, Index n) {
  const Matrix prompt = random_rows(batch * n, kSeed + static_cast<std::uint64_t>(n));
  const Matrix next = random_rows(batch, kSeed + 1);
  const std::string name = form + "/B:" + std::to_string(batch) + "/n:" + std::to_string(n);
  const bool multi = form == "multi" || form == "packed_multi";
  const Index width = multi ? kEmb : kHead;
  const auto fill = [&](auto& d) {
    d->n = n;
    d->next = next;
    d->out.resize(batch, width);
    Matrix prompt_out(batch * n, width);
    d->layer.set_num_threads(0);
    d->layer.forward_cached_into(prompt, d->cache, prompt_out);
    d->layer.reserve_cached_workspace(d->workspace, d->cache);
  };
  if (!multi) {
    head_attention::HeadAttention<float> layer(kEmb, kHead, n + 1, kSeed);
    if (form == "layer") {
      using D = Decoder<head_attention::HeadAttention<float>, std::vector<head_attention::KVCache<float>>>;
      auto d = std::make_shared<D>(D{layer, layer.make_cache(batch), {}, {}, {}, 0});
      fill(d);
      return make_case(name, d, batch);
    }
    using D =
        Decoder<head_attention::PackedHeadAttention<float>, std::vector<head_attention::KVCache<float>>>;
    head_attention::PackedHeadAttention<float> packed(layer);
    auto d = std::make_shared<D>(D{packed, packed.make_cache(batch), {}, {}, {}, 0});
    fill(d);
    return make_case(name, d, batch);
  }
  head_attention::MultiHeadAttention<float> mha(kHeads, kEmb, kHead, n + 1, 0.1, kSeed);
  if (form == "multi") {
    using D =
        Decoder<head_attention::MultiHeadAttention<float>, head_attention::MultiHeadAttention<float>::Cache>;
    auto d = std::make_shared<D>(D{mha, mha.make_cache(batch), {}, {}, {}, 0});
    fill(d);
    return make_case(name, d, batch);
  }
  using D = Decoder<head_attention::PackedMultiHeadAttention<float>,
                    head_attention::PackedMultiHeadAttention<float>::Cache>;
  head_attention::PackedMultiHeadAttention<float> packed(mha);
  auto d = std::make_shared<D>(D{packed, packed.make_cache(batch), {}, {}, {}, 0});
  fill(d);
  return make_case(name, d, batch);
}

/// Seconds of each of `steps` steps.
std::vector<double> time_steps(const Case& c, Index steps) {
  std::vector<double> t(static_cast<std::size_t>(steps));
  for (Index i = 0; i < steps; ++i) {
    const auto t0 = Clock::now();
    c.step();
    t[static_cast<std::size_t>(i)] = std::chrono::duration<double>(Clock::now() - t0).count();
    c.rewind();
  }
  return t;
}

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const std::size_t i =
      std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

double median(std::vector<double> v) {
  return percentile(std::move(v), 0.5);
}

/// A child process spinning on a core until stop().
struct Spinner {
  pid_t pid = -1;
  void start() {
    pid = fork();
    if (pid == 0) {
      volatile std::uint64_t x = 0;
      for (;;)
        x = x + 1;
    }
    usleep(100000);  // let the scheduler settle it on a core
  }
  void stop() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    pid = -1;
  }
  ~Spinner() { stop(); }
};

int run_load(Index steps) {
  constexpr Index n = 256;
  std::printf("decode steps under load: emb %d, n = %d, float, %d steps each; default threads = %d\n",
              static_cast<int>(kEmb), static_cast<int>(n), static_cast<int>(steps), Eigen::nbThreads());
  std::printf("%-22s %-9s %4s %-6s %10s %10s %10s %12s\n", "form", "setting", "team", "load", "median_us",
              "p99_us", "max_us", "p99/quiet");
  for (const std::string form : {"layer", "packed", "packed_multi"}) {
    const Case c = build(form, 1, n);
    for (const int setting : {0, 2}) {
      c.threads(setting);
      (void)time_steps(c, 200);  // warm-up
      const int team = head_attention::detail::last_team_size();
      const std::vector<double> quiet = time_steps(c, steps);
      Spinner spinner;
      spinner.start();
      const std::vector<double> loaded = time_steps(c, steps);
      spinner.stop();
      const double quiet_median = median(quiet);
      for (const auto* t : {&quiet, &loaded})
        std::printf("%-22s %-9s %4d %-6s %10.1f %10.1f %10.1f %12.2f\n", c.name.c_str(),
                    setting == 0 ? "default" : "2", team, t == &quiet ? "quiet" : "busy", median(*t) * 1e6,
                    percentile(*t, 0.99) * 1e6, *std::max_element(t->begin(), t->end()) * 1e6,
                    percentile(*t, 0.99) / quiet_median);
    }
  }
  return 0;
}

int run_scale(int rounds, const std::vector<std::string>& forms, const std::vector<Index>& batches,
              const std::vector<Index>& lengths) {
  std::printf("decode steps, 1 against 2 threads: emb %d, float, %d interleaved rounds, medians\n",
              static_cast<int>(kEmb), rounds);
  std::printf("%-28s %6s %10s %10s %8s\n", "case", "steps", "1t_us", "2t_us", "1t/2t");
  for (const std::string& form : forms)
    for (const Index batch : batches)
      for (const Index n : lengths) {
        const Case c = build(form, batch, n);
        c.threads(1);
        const double estimate = median(time_steps(c, 5));
        const Index steps = std::clamp<Index>(static_cast<Index>(0.1 / estimate), 5, 400);
        std::vector<double> one, two;
        for (int r = 0; r < rounds; ++r) {
          c.threads(1);
          one.push_back(median(time_steps(c, steps)));
          c.threads(2);
          two.push_back(median(time_steps(c, steps)));
          if (head_attention::detail::last_team_size() != 2)
            std::printf("(%s: 2 threads ran serial)\n", c.name.c_str());
        }
        std::printf("%-28s %6d %10.2f %10.2f %8.2f\n", c.name.c_str(), static_cast<int>(steps),
                    median(one) * 1e6, median(two) * 1e6, median(one) / median(two));
        std::fflush(stdout);
      }
  return 0;
}

std::vector<std::string> split_list(const char* s) {
  std::vector<std::string> v;
  std::string cur;
  for (const char* p = s; *p; ++p) {
    if (*p == ',') {
      v.push_back(cur);
      cur.clear();
    } else {
      cur += *p;
    }
  }
  if (!cur.empty()) v.push_back(cur);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "load";
  if (mode == "load") return run_load(argc > 2 ? std::atoi(argv[2]) : 2000);
  if (mode == "scale") {
    // bench_load scale [rounds] [forms] [batches] [lengths], lists comma-separated.
    const int rounds = argc > 2 ? std::atoi(argv[2]) : 7;
    const std::vector<std::string> forms = split_list(argc > 3 ? argv[3] : "packed,packed_multi,layer,multi");
    std::vector<Index> batches, lengths;
    for (const std::string& s : split_list(argc > 4 ? argv[4] : "1,8,32"))
      batches.push_back(std::atoi(s.c_str()));
    for (const std::string& s : split_list(argc > 5 ? argv[5] : "128,512,2048"))
      lengths.push_back(std::atoi(s.c_str()));
    return run_scale(rounds, forms, batches, lengths);
  }
  std::fprintf(stderr, "usage: bench_load [load [steps] | scale [rounds] [forms] [batches] [lengths]]\n");
  return 2;
}

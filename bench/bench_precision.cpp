// bench_precision: the forward pass of 16-bit layers against float, one thread, the same shapes.
//
// precision/<float|half|bfloat16>/<head|multihead>/B:<B>/T:<T>: HeadAttention<Scalar>::forward_into (emb 512,
// head 64) and MultiHeadAttention<Scalar>::forward_into (8 heads of 64), one thread. A 16-bit layer stores
// weights, inputs and outputs in 16 bits and computes in float: the cost over float is the conversions
// (weights once per call, each chunk of x, the outputs). Counter x_float: the float layer's time (same
// process, same shape, measured once before) over this one's.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <head_attention/head_attention.hpp>

namespace {

using Index = Eigen::Index;
using Clock = std::chrono::steady_clock;

constexpr Index kEmb = 512, kHead = 64, kHeads = 8;
constexpr std::uint64_t kSeed = 42;

struct Shape {
  Index batch, seq_len;
};
const Shape kShapes[] = {{2, 10}, {8, 1024}, {1, 4096}};

template <typename Scalar>
const char* type_name() {
  return head_attention::precision_name(head_attention::precision_of<Scalar>());
}

template <typename Scalar>
struct Layer {
  explicit Layer(bool multi, Index max_seq_len)
      : head(kEmb, kHead, max_seq_len, kSeed), mha(multi ? kHeads : 1, kEmb, kHead, max_seq_len, 0.1, kSeed) {
    head.set_num_threads(1);
    mha.set_num_threads(1);
  }
  head_attention::HeadAttention<Scalar> head;
  head_attention::MultiHeadAttention<Scalar> mha;
};

/// Seconds per forward call of a `Scalar` layer over shape s: best of 5 timings of a few calls.
template <typename Scalar>
double seconds_per_call(bool multi, const Shape& s) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Layer<Scalar> layer(multi, s.seq_len);
  std::srand(7);
  const Matrix x = Eigen::MatrixXf::Random(s.batch * s.seq_len, kEmb).cast<Scalar>();
  Matrix out(s.batch * s.seq_len, multi ? kEmb : kHead);
  const int calls = s.seq_len > 100 ? 2 : 200;
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    for (int c = 0; c < calls; ++c) {
      if (multi)
        layer.mha.forward_into(x, out, head_attention::Batch(s.batch));
      else
        layer.head.forward_into(x, out, head_attention::Batch(s.batch));
      benchmark::DoNotOptimize(out.data());
    }
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count() / calls);
  }
  return best;
}

std::map<std::string, double> g_float_seconds;

template <typename Scalar>
void bm_forward(benchmark::State& state, bool multi, Shape s) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const std::string key =
      std::string(multi ? "multihead" : "head") + std::to_string(s.batch) + "x" + std::to_string(s.seq_len);
  if (g_float_seconds.count(key) == 0) g_float_seconds[key] = seconds_per_call<float>(multi, s);
  Layer<Scalar> layer(multi, s.seq_len);
  std::srand(7);
  const Matrix x = Eigen::MatrixXf::Random(s.batch * s.seq_len, kEmb).cast<Scalar>();
  Matrix out(s.batch * s.seq_len, multi ? kEmb : kHead);
  const auto t0 = Clock::now();
  for (auto _ : state) {
    if (multi)
      layer.mha.forward_into(x, out, head_attention::Batch(s.batch));
    else
      layer.head.forward_into(x, out, head_attention::Batch(s.batch));
    benchmark::DoNotOptimize(out.data());
  }
  const double per_call = std::chrono::duration<double>(Clock::now() - t0).count() /
                          static_cast<double>(std::max<benchmark::IterationCount>(state.iterations(), 1));
  state.counters["x_float"] = g_float_seconds[key] / per_call;
}

template <typename Scalar>
void register_type() {
  for (const bool multi : {false, true})
    for (const Shape& s : kShapes) {
      const std::string name = std::string("precision/") + type_name<Scalar>() + "/" +
                               (multi ? "multihead" : "head") + "/B:" + std::to_string(s.batch) +
                               "/T:" + std::to_string(s.seq_len);
      benchmark::RegisterBenchmark(name.c_str(), bm_forward<Scalar>, multi, s)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
}

}  // namespace

int main(int argc, char** argv) {
  Eigen::setNbThreads(1);
  register_type<float>();
  register_type<Eigen::half>();
  register_type<Eigen::bfloat16>();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

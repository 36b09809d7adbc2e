// bench_backward: the training backward pass against the forward pass of the same HeadAttention.
//
// backward/<forward|backward>/float/B:<B>/T:<T>/threads:<n>: emb 512, head 64, causal, float. forward is
// forward_into over the batch; backward is HeadAttention::backward over the same input and a random dL/d out
// (it recomputes Q, K, V and the softmax statistics itself: the forward's outputs are not reused).
#include <cstdint>
#include <cstdlib>
#include <string>

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <head_attention/head_attention.hpp>

namespace {

using Index = Eigen::Index;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index kEmb = 512, kHead = 64;
constexpr std::uint64_t kSeed = 42;

struct Shape {
  Index batch, seq_len;
};
const Shape kShapes[] = {{2, 10}, {8, 1024}, {1, 4096}};

void bm_pass(benchmark::State& state, Shape s, int threads, bool backward) {
  head_attention::HeadAttention<float> layer(kEmb, kHead, s.seq_len, kSeed);
  layer.set_num_threads(threads);
  std::srand(7);
  const Matrix x = Matrix::Random(s.batch * s.seq_len, kEmb);          // [B·T, emb]
  const Matrix grad_out = Matrix::Random(s.batch * s.seq_len, kHead);  // [B·T, head]
  Matrix out(s.batch * s.seq_len, kHead);
  for (auto _ : state) {
    if (backward) {
      const head_attention::Gradients<float> g = layer.backward(x, s.batch, grad_out);
      benchmark::DoNotOptimize(g.input.data());
    } else {
      layer.forward_into(x, s.batch, out);
      benchmark::DoNotOptimize(out.data());
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Eigen::setNbThreads(1);
  for (const Shape& s : kShapes)
    for (const int threads : {1, 2})
      for (const bool backward : {false, true}) {
        const std::string name = std::string("backward/") + (backward ? "backward" : "forward") +
                                 "/float/B:" + std::to_string(s.batch) + "/T:" + std::to_string(s.seq_len) +
                                 "/threads:" + std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(), bm_pass, s, threads, backward)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

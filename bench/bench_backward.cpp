// bench_backward: the training backward pass against the forward pass of the same HeadAttention.
//
// backward/<pass>/float/B:<B>/T:<T>/threads:<n>: emb 512, head 64, causal, float, passes:
//   forward         forward_into over the batch;
//   backward        HeadAttention::backward over the same input and a random dL/d out (it recomputes Q, K, V
//                   and the softmax statistics itself: the forward's outputs are not reused);
//   forward_state   forward_training, which also keeps each row's output and logsumexp (a TrainingState);
//   backward_state  backward from that state: Q, K, V recomputed, the statistics pass skipped.
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

enum class Pass { forward, backward, forward_state, backward_state };
const char* const kPassNames[] = {"forward", "backward", "forward_state", "backward_state"};

void bm_pass(benchmark::State& state, Shape s, int threads, Pass pass) {
  head_attention::HeadAttention<float> layer(kEmb, kHead, s.seq_len, kSeed);
  layer.set_num_threads(threads);
  std::srand(7);
  const Matrix x = Matrix::Random(s.batch * s.seq_len, kEmb);          // [B·T, emb]
  const Matrix grad_out = Matrix::Random(s.batch * s.seq_len, kHead);  // [B·T, head]
  Matrix out(s.batch * s.seq_len, kHead);
  // backward_state's state, made once outside the timed loop.
  const head_attention::TrainingState<float> saved =
      pass == Pass::backward_state ? layer.forward_training(x, head_attention::Batch(s.batch))
                                   : head_attention::TrainingState<float>{};
  for (auto _ : state) {
    switch (pass) {
      case Pass::forward:
        layer.forward_into(x, out, head_attention::Batch(s.batch));
        benchmark::DoNotOptimize(out.data());
        break;
      case Pass::backward: {
        const head_attention::Gradients<float> g =
            layer.backward(x, grad_out, head_attention::Batch(s.batch));
        benchmark::DoNotOptimize(g.input.data());
        break;
      }
      case Pass::forward_state: {
        const head_attention::TrainingState<float> t =
            layer.forward_training(x, head_attention::Batch(s.batch));
        benchmark::DoNotOptimize(t.lse.data());
        break;
      }
      case Pass::backward_state: {
        const head_attention::Gradients<float> g =
            layer.backward(x, grad_out, saved, head_attention::Batch(s.batch));
        benchmark::DoNotOptimize(g.input.data());
        break;
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Eigen::setNbThreads(1);
  for (const Shape& s : kShapes)
    for (const int threads : {1, 2})
      for (const Pass pass : {Pass::forward, Pass::backward, Pass::forward_state, Pass::backward_state}) {
        const std::string name = std::string("backward/") + kPassNames[static_cast<int>(pass)] +
                                 "/float/B:" + std::to_string(s.batch) + "/T:" + std::to_string(s.seq_len) +
                                 "/threads:" + std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(), bm_pass, s, threads, pass)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

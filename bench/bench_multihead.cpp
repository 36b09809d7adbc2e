// bench_multihead: MultiHeadAttention's one-pass forward against the same layer run as separate HeadAttention
// calls (each head's forward_into writing its slice of the concatenation) plus one projection GEMM.
//
// multihead/<fused|fused_workspace|packed|packed_workspace|separate>/float/B:<B>/T:<T>/threads:<n>: emb 512,
// 8 heads of 64, simple_llm's sizes. The fused path shares one parallel region between all heads'
// projections, attention blocks and the output projection (fused_workspace: with a Workspace kept across
// calls, so that its buffers are not allocated and page-faulted again each call; packed: the same through a
// PackedMultiHeadAttention, its weights prepared once); the separate path forks once per head and once for
// the GEMM (Eigen's, limited to n threads).
#include <cstdint>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include <head_attention/head_attention.hpp>

namespace {

using Index = Eigen::Index;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index kEmb = 512, kHead = 64, kHeads = 8;
constexpr std::uint64_t kSeed = 42;

struct Shape {
  Index batch, seq_len;
};
const Shape kShapes[] = {{2, 10}, {8, 1024}, {1, 4096}};

void bm_fused(benchmark::State& state, Shape s, int threads, bool reuse, bool packed) {
  head_attention::MultiHeadAttention<float> mha(kHeads, kEmb, kHead, s.seq_len, 0.1, kSeed);
  mha.set_num_threads(threads);
  const head_attention::PackedMultiHeadAttention<float> frozen(mha);
  std::srand(7);
  const Matrix x = Matrix::Random(s.batch * s.seq_len, kEmb);  // [B·T, emb]
  Matrix out(s.batch * s.seq_len, kEmb);
  head_attention::Workspace<float> workspace;
  for (auto _ : state) {
    if (packed && reuse)
      frozen.forward_into(x, out, workspace, head_attention::Batch(s.batch));
    else if (packed)
      frozen.forward_into(x, out, head_attention::Batch(s.batch));
    else if (reuse)
      mha.forward_into(x, out, workspace, head_attention::Batch(s.batch));
    else
      mha.forward_into(x, out, head_attention::Batch(s.batch));
    benchmark::DoNotOptimize(out.data());
  }
}

void bm_separate(benchmark::State& state, Shape s, int threads) {
  head_attention::MultiHeadAttention<float> mha(kHeads, kEmb, kHead, s.seq_len, 0.1, kSeed);
  std::vector<head_attention::HeadAttention<float>> heads;
  for (Index h = 0; h < kHeads; ++h) {
    heads.push_back(mha.head(h));
    heads.back().set_num_threads(threads);
  }
  std::srand(7);
  const Matrix x = Matrix::Random(s.batch * s.seq_len, kEmb);  // [B·T, emb]
  Matrix concat(s.batch * s.seq_len, kHeads * kHead);
  Matrix out(s.batch * s.seq_len, kEmb);
  Eigen::setNbThreads(threads);
  for (auto _ : state) {
    for (Index h = 0; h < kHeads; ++h)
      heads[static_cast<std::size_t>(h)].forward_into(x, concat.middleCols(h * kHead, kHead),
                                                      head_attention::Batch(s.batch));
    out.noalias() = concat * mha.projection().weight.transpose();
    out.rowwise() += mha.projection().bias.transpose();
    benchmark::DoNotOptimize(out.data());
  }
  Eigen::setNbThreads(1);
}

}  // namespace

int main(int argc, char** argv) {
  Eigen::setNbThreads(1);
  for (const Shape& s : kShapes)
    for (const int threads : {1, 2})
      for (const char* kind : {"fused", "fused_workspace", "packed", "packed_workspace", "separate"}) {
        const std::string name = std::string("multihead/") + kind + "/float/B:" + std::to_string(s.batch) +
                                 "/T:" + std::to_string(s.seq_len) + "/threads:" + std::to_string(threads);
        const std::string k = kind;
        benchmark::internal::Benchmark* b =
            k == "separate" ? benchmark::RegisterBenchmark(name.c_str(), bm_separate, s, threads)
                            : benchmark::RegisterBenchmark(name.c_str(), bm_fused, s, threads,
                                                           k == "fused_workspace" || k == "packed_workspace",
                                                           k.rfind("packed", 0) == 0);
        b->Unit(benchmark::kMillisecond)->UseRealTime();
      }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

// peak_memory: the peak resident set size of ONE forward call, B = 1, emb 512, head 64, float.
//
//   peak_memory [fast|backward|reference] [T] [--threads N] [--limit-mib M]
//
// fast (default T = 32768) runs BatchedHeadAttention::forward, the fused path whose extra memory is
// O(T · head); backward (default T = 32768) runs HeadAttention::backward with a random dL/d out [T, head]
// (allocated before the peak is read), whose result dL/dx is as large as the input; reference (default T =
// 8192) runs head_attention::reference::forward, which materialises [T, T] scores (256 MiB in float at T =
// 8192). ru_maxrss is a per-process high-water mark, so each mode runs in its own process. With --limit-mib
// the exit status is 1 when the peak exceeds M MiB.
#include <sys/resource.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include <head_attention/head_attention.hpp>

namespace {

constexpr Eigen::Index kEmb = 512;
constexpr Eigen::Index kHead = 64;
constexpr double kMiB = 1024.0 * 1024.0;

/// Peak RSS of this process so far, in MiB (Linux reports ru_maxrss in KiB).
double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024.0 / kMiB;
}

/// Current RSS in MiB, from /proc/self/statm (0 where that file does not exist).
double current_rss_mib() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0.0;
  long pages_total = 0;
  long pages_resident = 0;
  const int n = std::fscanf(f, "%ld %ld", &pages_total, &pages_resident);
  std::fclose(f);
  if (n != 2) return 0.0;
  return static_cast<double>(pages_resident) * 4096.0 / kMiB;
}

void report(const char* when) {
  std::printf("%-34s peak RSS %8.1f MiB   current RSS %8.1f MiB\n", when, peak_rss_mib(), current_rss_mib());
}

int usage(const char* argv0) {
  std::fprintf(stderr, "usage: %s [fast|backward|reference] [T] [--threads N] [--limit-mib M]\n", argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = "fast";
  long T = -1;
  int threads = 0;
  double limit_mib = -1.0;
  int positional = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (arg == "--limit-mib" && i + 1 < argc) {
      limit_mib = std::atof(argv[++i]);
    } else if (arg == "-h" || arg == "--help") {
      return usage(argv[0]);
    } else if (positional == 0 && (arg == "fast" || arg == "backward" || arg == "reference")) {
      mode = arg;
      ++positional;
    } else if (positional <= 1 && !arg.empty() && arg[0] != '-') {
      T = std::atol(arg.c_str());
      positional = 2;
    } else {
      return usage(argv[0]);
    }
  }
  if (T < 0) T = mode == "reference" ? 8192 : 32768;
  if (T == 0) return usage(argv[0]);

  using Tensor3 = Eigen::Tensor<float, 3, Eigen::RowMajor>;
  std::printf("mode %s, B = 1, T = %ld, emb = %ld, head = %ld, float, threads %s\n", mode.c_str(), T,
              static_cast<long>(kEmb), static_cast<long>(kHead),
              threads > 0 ? std::to_string(threads).c_str() : "default");
  const double input_mib = static_cast<double>(T) * kEmb * sizeof(float) / kMiB;
  const double output_mib = static_cast<double>(T) * kHead * sizeof(float) / kMiB;
  const double scores_mib = static_cast<double>(T) * static_cast<double>(T) * sizeof(float) / kMiB;
  std::printf("input [1, %ld, %ld] %.1f MiB, output [1, %ld, %ld] %.1f MiB, a [T, T] float matrix %.1f MiB\n",
              T, static_cast<long>(kEmb), input_mib, T, static_cast<long>(kHead), output_mib, scores_mib);
  report("at start:");

  head_attention::BatchedHeadAttention<float> layer(kEmb, kHead, T, 42);
  if (threads > 0) layer.head().set_num_threads(threads);
  Tensor3 x(1, T, kEmb);
  x.setRandom();
  x = x * 2.0f - 1.0f;
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RowMatrix grad_out;  // backward only: dL/d out [T, head]
  if (mode == "backward") grad_out = RowMatrix::Random(T, kHead);
  report("after the layer and the input:");
  const double before = peak_rss_mib();

  double checksum = 0.0;
  if (mode == "fast") {
    const Tensor3 out = layer.forward(x);
    for (Eigen::Index i = 0; i < out.size(); ++i)
      checksum += out.data()[i];
  } else if (mode == "backward") {
    const Eigen::Map<const RowMatrix> rows(x.data(), T, kEmb);
    const head_attention::Gradients<float> g = layer.head().backward(rows, grad_out);
    checksum = static_cast<double>(g.input.sum() + g.query.weight.sum());
  } else {
    const Eigen::Map<const RowMatrix> rows(x.data(), T, kEmb);
    const RowMatrix out = head_attention::reference::forward(rows, layer.head().query(), layer.head().key(),
                                                             layer.head().value());
    checksum = static_cast<double>(out.sum());
  }
  report(mode == "backward" ? "after one backward call:" : "after one forward call:");
  const double after = peak_rss_mib();
  std::printf("checksum %.6g\n", checksum);
  std::printf("%s call raised the peak by %.1f MiB (%.2f x the input)\n",
              mode == "backward" ? "backward" : "forward", after - before, (after - before) / input_mib);
  std::printf("PEAK_RSS_MIB %.1f\n", after);
  if (!std::isfinite(checksum)) {
    std::printf("FAIL: the output is not finite\n");
    return 1;
  }
  if (limit_mib > 0.0) {
    const bool ok = after <= limit_mib;
    std::printf("%s: peak RSS %.1f MiB %s the limit of %.1f MiB\n", ok ? "PASS" : "FAIL", after,
                ok ? "within" : "above", limit_mib);
    return ok ? 0 : 1;
  }
  return 0;
}

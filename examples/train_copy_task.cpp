// train_copy_task: trains a HeadAttention with Adam over the library's gradients on a task only attention can
// solve: at every position, output the token seen one position earlier.
//
//   train_copy_task [--steps N] [--seed S]
//
// Each input row is [one-hot token (vocab) | one-hot position (T)]; the target at position t >= 1 is the
// one-hot of the token at t - 1 (position 0 has no target). A position-wise layer cannot know the previous
// token: the head must learn to attend from position t to t - 1 (queries and keys from the position part) and
// to copy the token through its values. The loss is the mean squared error over the positions that have a
// target. Prints the loss as it trains; exits 0 when the final loss is below 5% of the first, 1 otherwise.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <head_attention/head_attention.hpp>

namespace {

using Index = Eigen::Index;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index kVocab = 8, kT = 12, kBatch = 32;
constexpr Index kEmb = kVocab + kT, kHead = kVocab;
constexpr double kTarget = 0.05;  // the final loss must fall below this fraction of the first

/// Adam over one nn.Linear's weight and bias (Kingma & Ba, with bias correction).
struct Adam {
  float lr = 0.05f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  Matrix m_w, v_w;           // [out, in] moment estimates of the weight
  Eigen::VectorXf m_b, v_b;  // [out] and of the bias
  int step = 0;

  void update(head_attention::Linear<float>& p, const head_attention::Linear<float>& g) {
    if (step++ == 0) {
      m_w = v_w = Matrix::Zero(p.weight.rows(), p.weight.cols());
      m_b = v_b = Eigen::VectorXf::Zero(p.bias.size());
    }
    const float c1 = 1 - std::pow(beta1, static_cast<float>(step));
    const float c2 = 1 - std::pow(beta2, static_cast<float>(step));
    m_w = beta1 * m_w + (1 - beta1) * g.weight;
    v_w = beta2 * v_w + (1 - beta2) * g.weight.cwiseAbs2();
    m_b = beta1 * m_b + (1 - beta1) * g.bias;
    v_b = beta2 * v_b + (1 - beta2) * g.bias.cwiseAbs2();
    p.weight.array() -= lr * (m_w.array() / c1) / ((v_w.array() / c2).sqrt() + eps);
    p.bias.array() -= lr * (m_b.array() / c1) / ((v_b.array() / c2).sqrt() + eps);
  }
};

}  // namespace

int main(int argc, char** argv) {
  int steps = 300;
  std::uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--steps" && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else if (arg == "--seed" && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--steps N] [--seed S]\n", argv[0]);
      return 2;
    }
  }

  head_attention::HeadAttention<float> head(kEmb, kHead, kT, seed);  // causal, PyTorch's default init
  head.set_num_threads(1);  // [384, 20] inputs: forking a team would cost more than it saves
  Adam adam[3];
  std::mt19937_64 engine(seed);
  std::uniform_int_distribution<int> token(0, kVocab - 1);
  const Index rows = kBatch * kT;
  Matrix x(rows, kEmb), target(rows, kHead), out(rows, kHead), grad_out(rows, kHead);
  const float count = static_cast<float>(kBatch * (kT - 1));  // positions with a target
  double first = 0, loss = 0;
  for (int step = 0; step < steps; ++step) {
    // A fresh batch of random sequences.
    x.setZero();
    target.setZero();
    for (Index b = 0; b < kBatch; ++b)
      for (Index t = 0; t < kT; ++t) {
        const int tok = token(engine);
        x(b * kT + t, tok) = 1;
        x(b * kT + t, kVocab + t) = 1;
        if (t + 1 < kT) target(b * kT + t + 1, tok) = 1;
      }
    head.forward_into(x, out, head_attention::Batch(kBatch));
    grad_out = (out - target) * (2 / count);  // d/d out of mean ||out - target||²
    for (Index b = 0; b < kBatch; ++b)
      grad_out.row(b * kT).setZero();  // position 0 has no target
    loss = 0;
    for (Index r = 0; r < rows; ++r)
      if (r % kT != 0) loss += (out.row(r) - target.row(r)).squaredNorm();
    loss /= count;
    if (step == 0) first = loss;
    if (step % 50 == 0 || step == steps - 1) std::printf("step %4d  loss %.5f\n", step, loss);

    const head_attention::Gradients<float> g = head.backward(x, grad_out, head_attention::Batch(kBatch));
    adam[0].update(head.query(), g.query);
    adam[1].update(head.key(), g.key);
    adam[2].update(head.value(), g.value);
  }
  const bool ok = loss < kTarget * first;
  std::printf("%s: final loss %.5f is %.2f%% of the first (%.5f); the target is below %.0f%%\n",
              ok ? "PASS" : "FAIL", loss, 100 * loss / first, first, 100 * kTarget);
  return ok ? 0 : 1;
}

// Quickstart: the seed module's own usage, in C++. The PyTorch original reads
//
//   head = HeadAttention(emb_size=512, head_size=64, max_seq_len=1024)
//   x = torch.randn(2, 10, 512)  # [batch, seq_len, emb_size]
//   out = head(x)                # [2, 10, 64]
#include <iostream>
#include <random>

#include <head_attention/head_attention.hpp>

int main() {
  constexpr Eigen::Index batch = 2, seq_len = 10, emb_size = 512, head_size = 64, max_seq_len = 1024;

  // The weights get PyTorch's default nn.Linear initialisation from a seeded generator, so they are the same
  // on every run and platform. They are not torch's numbers: to reproduce a PyTorch model, copy its trained
  // weights in (see load_weights.cpp).
  head_attention::BatchedHeadAttention<float> head(emb_size, head_size, max_seq_len, /*seed=*/42);

  // Row-major, like a PyTorch tensor, so a [B, T, emb] buffer from elsewhere has the same memory layout (an
  // Eigen::TensorMap over it works too, without a copy).
  Eigen::Tensor<float, 3, Eigen::RowMajor> x(batch, seq_len, emb_size);
  std::mt19937 rng(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);  // torch.randn; its values vary by std library
  for (Eigen::Index i = 0; i < x.size(); ++i)
    x.data()[i] = normal(rng);

  const Eigen::Tensor<float, 3, Eigen::RowMajor> out = head.forward(x);

  std::cout << "output shape: [" << out.dimension(0) << ", " << out.dimension(1) << ", " << out.dimension(2)
            << "]\n";
  std::cout << "out[0, 0, :4] =";
  for (Eigen::Index j = 0; j < 4; ++j)
    std::cout << ' ' << out(0, 0, j);
  std::cout << "\nout[1, 9, :4] =";
  for (Eigen::Index j = 0; j < 4; ++j)
    std::cout << ' ' << out(1, 9, j);
  std::cout << '\n';
  return 0;
}

// FetchContent consumer: the batched [B, T, emb] entry point, checked for shape and finite values.
#include <cmath>
#include <iostream>

#include <head_attention/head_attention.hpp>

int main() {
  head_attention::BatchedHeadAttention<float> head(/*emb_size=*/8, /*head_size=*/4, /*max_seq_len=*/16);
  Eigen::Tensor<float, 3, Eigen::RowMajor> x(2, 5, 8);  // [B, T, emb_size]
  x.setRandom();
  const Eigen::Tensor<float, 3, Eigen::RowMajor> out = head.forward(x);
  bool finite = true;
  for (Eigen::Index i = 0; i < out.size(); ++i)
    finite = finite && std::isfinite(out.data()[i]);
  if (out.dimension(0) != 2 || out.dimension(1) != 5 || out.dimension(2) != 4 || !finite) {
    std::cerr << "fetchcontent consumer: bad output [" << out.dimension(0) << ", " << out.dimension(1) << ", "
              << out.dimension(2) << "]\n";
    return 1;
  }
  std::cout << "fetchcontent consumer: output [2, 5, 4], all finite\n";
  return 0;
}

// add_subdirectory consumer: the headers are not system headers here, so the warnings (errors under
// HEAD_ATTENTION_WERROR) cover them too.
#include <iostream>

#include <head_attention/head_attention.hpp>

int main() {
  head_attention::HeadAttention<float> layer(/*emb_size=*/8, /*head_size=*/4, /*max_seq_len=*/16);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(6, 8);  // [T, emb_size]
  const auto out = layer.forward(x);
  if (out.rows() != 6 || out.cols() != 4 || !out.allFinite()) {
    std::cerr << "add_subdirectory consumer: bad output [" << out.rows() << ", " << out.cols() << "]\n"
              << out << '\n';
    return 1;
  }
  std::cout << "add_subdirectory consumer: output [6, 4], all finite\n";
  return 0;
}

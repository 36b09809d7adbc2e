// find_package consumer: one forward through the installed headers, checked for shape and finite values.
#include <iostream>

#include <head_attention/head_attention.hpp>

static_assert(HEAD_ATTENTION_VERSION_MAJOR == PACKAGE_VERSION_MAJOR &&
                  HEAD_ATTENTION_VERSION_MINOR == PACKAGE_VERSION_MINOR &&
                  HEAD_ATTENTION_VERSION_PATCH == PACKAGE_VERSION_PATCH,
              "version.hpp and the CMake package disagree on the version");

int main() {
  head_attention::HeadAttention<float> layer(/*emb_size=*/8, /*head_size=*/4, /*max_seq_len=*/16);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(5, 8);  // [T, emb_size]
  const auto out = layer.forward(x);
  if (out.rows() != 5 || out.cols() != 4 || !out.allFinite()) {
    std::cerr << "find_package consumer: bad output [" << out.rows() << ", " << out.cols() << "]\n"
              << out << '\n';
    return 1;
  }
  std::cout << "find_package consumer: output [5, 4], all finite\n";
  return 0;
}

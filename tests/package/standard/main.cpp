// Built with nothing but what HeadAttention::HeadAttention (or `pkg-config head_attention`) provides.
#if defined(_MSVC_LANG)
#define CONSUMER_CPLUSPLUS _MSVC_LANG
#else
#define CONSUMER_CPLUSPLUS __cplusplus
#endif
#if CONSUMER_CPLUSPLUS < 201703L
#error "HeadAttention did not bring C++17 to its consumer"
#endif
// When the consumer asked for a newer standard (the test driver passes e.g. 202002L for C++20), it must get
// it: nothing HeadAttention's package or pkg-config file adds may downgrade it.
#if defined(CONSUMER_EXPECTED_CPLUSPLUS) && CONSUMER_CPLUSPLUS < CONSUMER_EXPECTED_CPLUSPLUS
#error "the consumer was compiled as an older C++ standard than the one it asked for"
#endif

#include <iostream>

// Found only through the package's Eigen3::Eigen dependency.
#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>
#if !EIGEN_VERSION_AT_LEAST(3, 4, 0)
#error "HeadAttention needs Eigen 3.4, but its package let an older Eigen through"
#endif

#include <head_attention/head_attention.hpp>

int main() {
  head_attention::HeadAttention<float> layer(/*emb_size=*/6, /*head_size=*/2, /*max_seq_len=*/8);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(4, 6);  // [T, emb_size]
  const auto out = layer.forward(x);
  if (out.rows() != 4 || out.cols() != 2 || !out.allFinite()) {
    std::cerr << "standard consumer: bad output\n" << out << '\n';
    return 1;
  }
  std::cout << "standard consumer: C++" << CONSUMER_CPLUSPLUS << ", Eigen " << EIGEN_WORLD_VERSION << '.'
            << EIGEN_MAJOR_VERSION << ", output [4, 2], all finite\n";
  return 0;
}

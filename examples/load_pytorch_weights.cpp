// A PyTorch attention layer in C++, the whole way: examples/export_pytorch_weights.py saved simple_llm's
// MultiHeadAttention(num_heads=4, emb_size=32, head_size=8, max_seq_len=16) as data/mha_small.safetensors
// (its state_dict, names as they are: _heads.0._q.weight, ..., _layer.bias), and an input with PyTorch's
// output as data/mha_small.io.safetensors. Here: load the weights, run the same input, compare.
//
//   ./load_pytorch_weights [directory of the two files, default examples/data]
#include <iostream>
#include <string>

#include <head_attention/head_attention.hpp>
#include <head_attention/safetensors.hpp>  // not in the umbrella header: it needs nlohmann_json

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "examples/data";
  using Layer = head_attention::MultiHeadAttention<float>;
  try {
    // The sizes must be those of the PyTorch module; the weights drawn here are all replaced by the load.
    Layer mha(/*num_heads=*/4, /*emb_size=*/32, /*head_size=*/8, /*max_seq_len=*/16);
    head_attention::load_state_dict(mha, dir + "/mha_small.safetensors");

    const std::string io = dir + "/mha_small.io.safetensors";
    const Layer::Matrix x = head_attention::load_tensor<float>(io, "x").matrix();  // [12, 32]
    const Layer::Matrix expected =
        head_attention::load_tensor<float>(io, "out").matrix();  // PyTorch's, [12, 32]

    const Layer::Matrix out = mha.forward(x);  // [T, emb_size]
    std::cout << "output [" << out.rows() << ", " << out.cols() << "], first row, first 8 values:\n"
              << out.row(0).head(8) << "\nPyTorch's:\n"
              << expected.row(0).head(8) << '\n';

    const float max_difference = (out - expected).cwiseAbs().maxCoeff();
    const float scale = expected.cwiseAbs().maxCoeff();
    if (!(out.rows() == expected.rows() && max_difference <= 2e-5f * scale)) {
      std::cout << "differs from PyTorch: max |difference| " << max_difference << " (output scale " << scale
                << ")\n";
      return 1;
    }
    std::cout << "matches PyTorch: max |difference| " << max_difference << " (output scale " << scale
              << ")\n";
  } catch (const std::exception& e) {  // format_error (the file), shape_error (the sizes)
    std::cerr << "load_pytorch_weights: " << e.what() << '\n';
    return 1;
  }
  return 0;
}

// safetensors component consumer: save a layer, load it into another, compare; or, without nlohmann_json, the
// core target alone.
#include <iostream>

#include <head_attention/head_attention.hpp>
#if defined(HEAD_ATTENTION_CONSUMER_SAFETENSORS)
#include <head_attention/safetensors.hpp>
#endif

int main() {
  head_attention::HeadAttention<float> layer(/*emb_size=*/8, /*head_size=*/4, /*max_seq_len=*/16, /*seed=*/1);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(5, 8);  // [T, emb_size]
#if defined(HEAD_ATTENTION_CONSUMER_SAFETENSORS)
  head_attention::save_state_dict(layer, CONSUMER_FILE);
  head_attention::HeadAttention<float> copy(8, 4, 16, /*seed=*/2);
  head_attention::load_state_dict(copy, CONSUMER_FILE);
  if (!(copy.forward(x) == layer.forward(x))) {
    std::cerr << "safetensors consumer: the loaded layer differs\n";
    return 1;
  }
  std::cout << "safetensors consumer: save and load round-trip\n";
#else
  const auto out = layer.forward(x);
  if (out.rows() != 5 || out.cols() != 4 || !out.allFinite()) return 1;
  std::cout << "core consumer without nlohmann_json: output [5, 4], all finite\n";
#endif
  return 0;
}

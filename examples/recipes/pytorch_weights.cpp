// Recipe: a PyTorch MultiHeadAttention's weights into C++ (docs/pytorch-weights.md).
//
//   ./pytorch_weights FILE.safetensors [PREFIX]
//
// FILE is a state_dict saved as safetensors: by the safetensors package (safetensors.torch.save_file), or
// without it by write_safetensors.py next to this file (json + numpy only). PREFIX selects one module of a
// larger model, e.g. "_decoders.0._heads." for the attention of a simple_llm GPT's first decoder ("" for a
// file of the module alone). The sizes are read from the tensors' shapes, so one program loads any simple_llm
// MultiHeadAttention.
#include <iostream>
#include <string>

#include <head_attention/head_attention.hpp>
#include <head_attention/safetensors.hpp>  // not in the umbrella header: it needs nlohmann_json

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: pytorch_weights FILE.safetensors [PREFIX]\n";
    return 2;
  }
  const std::string prefix = argc > 2 ? argv[2] : "";
  try {
    const auto file = head_attention::SafetensorsFile::open(argv[1]);  // read and validated once

    // simple_llm's names: _heads.<i>._q.weight [head_size, emb_size], ..., _layer.weight [emb_size, N ·
    // head_size].
    Eigen::Index heads = 0;
    while (file.contains(prefix + "_heads." + std::to_string(heads) + "._q.weight"))
      ++heads;
    if (heads == 0) throw std::runtime_error("no " + prefix + "_heads.0._q.weight in " + argv[1]);
    const auto q_shape = file.info(prefix + "_heads.0._q.weight").shape;  // [head_size, emb_size]
    const std::string mask = prefix + "_heads.0._tril_mask";  // [max_seq_len, max_seq_len], optional
    const Eigen::Index max_seq_len = file.contains(mask) ? file.info(mask).shape[0] : 1024;

    head_attention::MultiHeadAttention<float> mha(heads, q_shape[1], q_shape[0], max_seq_len);
    head_attention::load_state_dict(mha, file, prefix);  // every key checked; on error mha is unchanged

    const auto x = head_attention::MultiHeadAttention<float>::Matrix::Ones(3, mha.emb_size());
    std::cout << "loaded MultiHeadAttention(num_heads=" << mha.num_heads() << ", emb_size=" << mha.emb_size()
              << ", head_size=" << mha.head_size() << ", max_seq_len=" << mha.max_seq_len() << ") from "
              << argv[1] << "\nforward of 3 rows of ones, first values: " << mha.forward(x).row(2).head(4)
              << '\n';
  } catch (const std::exception& e) {  // format_error: not a valid file; shape_error: not this module's
    std::cerr << "pytorch_weights: " << e.what() << '\n';
    return 1;
  }
  return 0;
}

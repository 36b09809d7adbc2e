// The C++ half of the PyTorch check of save_state_dict (tests/safetensors_pytorch_check.cmake): writes, into
// the directory given as its argument, the state_dict of a HeadAttention and of a MultiHeadAttention in float
// and in double, each with <name>.io.safetensors holding an input x [B, T, emb] and our output for it. Then
// prints one line per file with the arguments of `tests/generate_safetensors.py --check`: <file> <kind>
// <sizes...>.
#include <cstdint>
#include <iostream>
#include <map>
#include <random>
#include <string>

#include <head_attention/safetensors.hpp>

namespace {

using Index = Eigen::Index;
constexpr Index kBatch = 2, kSeq = 10;

template <typename Scalar>
head_attention::StoredTensor<Scalar> random_input(Index emb, std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  head_attention::StoredTensor<Scalar> x;
  x.shape = {kBatch, kSeq, emb};
  for (Index i = 0; i < kBatch * kSeq * emb; ++i)
    x.values.push_back(static_cast<Scalar>(uniform(engine)));
  return x;
}

/// Writes <dir>/<name>.safetensors and <name>.io.safetensors (x and layer.forward of each sequence of x).
template <typename Layer, typename Scalar>
std::string export_case(const std::string& dir, const std::string& name, const Layer& layer, Index emb,
                        Index out_width) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const std::string path = dir + "/" + name + ".safetensors";
  head_attention::save_state_dict(layer, path);
  const head_attention::StoredTensor<Scalar> x = random_input<Scalar>(emb, 42);
  const Matrix rows = x.matrix();  // [B·T, emb]
  head_attention::StoredTensor<Scalar> out;
  out.shape = {kBatch, kSeq, out_width};
  for (Index b = 0; b < kBatch; ++b) {
    const Matrix o = layer.forward(rows.middleRows(b * kSeq, kSeq));  // [T, out_width], row-major
    out.values.insert(out.values.end(), o.data(), o.data() + o.size());
  }
  head_attention::save_tensors<Scalar>(dir + "/" + name + ".io.safetensors", {{"x", x}, {"out", out}});
  return path;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: safetensors_export <directory>\n";
    return 2;
  }
  const std::string dir = argv[1];
  try {
    std::cout << export_case<head_attention::HeadAttention<double>, double>(
                     dir, "head.f64", head_attention::HeadAttention<double>(16, 8, 12, 1), 16, 8)
              << " head 16 8 12\n";
    std::cout << export_case<head_attention::HeadAttention<float>, float>(
                     dir, "head.f32", head_attention::HeadAttention<float>(16, 8, 12, 2), 16, 8)
              << " head 16 8 12\n";
    std::cout << export_case<head_attention::MultiHeadAttention<double>, double>(
                     dir, "mha.f64", head_attention::MultiHeadAttention<double>(3, 16, 8, 12, 0.1, 3), 16, 16)
              << " mha 3 16 8 12\n";
    std::cout << export_case<head_attention::MultiHeadAttention<float>, float>(
                     dir, "mha.f32", head_attention::MultiHeadAttention<float>(3, 16, 8, 12, 0.1, 4), 16, 16)
              << " mha 3 16 8 12\n";
  } catch (const std::exception& e) {
    std::cerr << "safetensors_export: " << e.what() << '\n';
    return 1;
  }
  return 0;
}

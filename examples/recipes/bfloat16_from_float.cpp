// Recipe: a bfloat16 layer from a float one (docs/half-precision.md).
//
// There is no converting constructor: build the 16-bit layer with the same sizes, then assign every
// projection converted (Eigen's cast rounds to nearest even). The 16-bit layer stores weights, inputs and
// outputs in 16 bits and computes in float.
#include <iostream>

#include <head_attention/head_attention.hpp>

// Every weight and bias of a Linear, converted to another Scalar.
template <typename To, typename From>
head_attention::Linear<To> converted(const head_attention::Linear<From>& from) {
  head_attention::Linear<To> to;
  to.weight = from.weight.template cast<To>();
  to.bias = from.bias.template cast<To>();
  return to;
}

// A MultiHeadAttention of another Scalar with the same sizes, mask rule and (converted) weights.
template <typename To, typename From>
head_attention::MultiHeadAttention<To> converted(const head_attention::MultiHeadAttention<From>& from) {
  head_attention::MultiHeadAttention<To> to(from.num_heads(), from.emb_size(), from.head_size(),
                                            from.max_seq_len(), from.dropout(), /*seed=*/0, from.mask_rule());
  for (Eigen::Index h = 0; h < from.num_heads(); ++h) {
    to.head(h).query() = converted<To>(from.head(h).query());
    to.head(h).key() = converted<To>(from.head(h).key());
    to.head(h).value() = converted<To>(from.head(h).value());
  }
  to.projection() = converted<To>(from.projection());
  return to;
}

int main() {
  using bf16 = Eigen::bfloat16;
  const head_attention::MultiHeadAttention<float> mha(/*num_heads=*/8, /*emb_size=*/512, /*head_size=*/64,
                                                      /*max_seq_len=*/1024);  // trained weights in practice
  const head_attention::MultiHeadAttention<bf16> mha16 = converted<bf16>(mha);

  const head_attention::MultiHeadAttention<float>::Matrix x =
      head_attention::MultiHeadAttention<float>::Matrix::Random(300, 512);  // [T, emb]
  const auto y = mha.forward(x);                                            // float
  const auto y16 = mha16.forward(x.cast<bf16>().eval());                    // bfloat16 in and out
  const float error = (y16.cast<float>() - y).cwiseAbs().maxCoeff() / y.cwiseAbs().maxCoeff();

  // bfloat16 keeps 8 significant bits: expect errors of a few 1e-3 of the output's scale.
  std::cout << "bfloat16 layer: weights " << sizeof(bf16) << " bytes each (float: " << sizeof(float)
            << "); max |bf16 - float| / max |float| = " << error << (error < 2e-2f ? ": OK" : ": FAILED")
            << '\n';
  return error < 2e-2f ? 0 : 1;
}

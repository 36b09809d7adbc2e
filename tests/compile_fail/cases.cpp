// Inputs that must not compile, each selected by one HEAD_ATTENTION_COMPILE_FAIL_<case> macro, and, with none
// defined, the control: the same calls with the right types, which must compile (it is built with the tests).
#include <cstdint>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include <head_attention/head_attention.hpp>

int main() {
  head_attention::BatchedHeadAttention<float> batched(4, 2, 8);
  head_attention::HeadAttention<float> layer(4, 2, 8);
#if defined(HEAD_ATTENTION_COMPILE_FAIL_RANK2)
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(3, 4);  // [T, emb]: a sequence, not a batch
  x.setZero();
  (void)batched.forward(x);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_RANK4)
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(1, 2, 3, 4);
  x.setZero();
  (void)batched.forward(x);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_COLUMN_MAJOR)
  Eigen::Tensor<float, 3> x(2, 3, 4);  // Eigen's default layout: column-major
  x.setZero();
  (void)batched.forward(x);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_SCALAR)
  Eigen::Tensor<double, 3, Eigen::RowMajor> x(2, 3, 4);
  x.setZero();
  (void)batched.forward(x);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_MAP_RANK2)
  float data[12] = {};
  const Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor> > x(data, 3, 4);
  (void)batched.forward(x);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_MATRIX_SCALAR)
  const Eigen::MatrixXd x = Eigen::MatrixXd::Zero(3, 4);
  (void)layer.forward(x);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_MATRIX_SCALAR_INTO)
  const head_attention::MultiHeadAttention<float> mha(2, 4, 2, 8);
  const Eigen::MatrixXd x = Eigen::MatrixXd::Zero(3, 4);
  head_attention::MultiHeadAttention<float>::Matrix out(3, 4);
  mha.forward_into(x, out);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_MATRIX_SCALAR_BACKWARD)
  const Eigen::MatrixXd x = Eigen::MatrixXd::Zero(3, 4);
  (void)layer.backward(x, Eigen::MatrixXf::Zero(3, 2));
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_COLUMN_MAJOR_OUT)
  Eigen::MatrixXf out(3, 2);  // Eigen's default layout: column-major
  layer.forward_into(Eigen::MatrixXf::Zero(3, 4), out);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_CONST_OUT)
  const head_attention::HeadAttention<float>::Matrix out(3, 2);
  layer.forward_into(Eigen::MatrixXf::Zero(3, 4), out);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_WRONG_CACHE)
  const head_attention::MultiHeadAttention<float> mha(2, 4, 2, 8);
  head_attention::KVCache<float> cache = layer.make_cache();  // a single head's, not the multi-head form's
  (void)mha.forward_cached(Eigen::MatrixXf::Zero(1, 4), cache);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_OLD_POSITIONAL_BATCH)
  // Up to 0.2 the batch count came second; now it is a trailing Batch(2), and the old call does not compile.
  head_attention::HeadAttention<float>::Matrix out(4, 2);
  layer.forward_into(Eigen::MatrixXf::Zero(4, 4), 2, out);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_INTEGER_BATCH)
  // An integer is never a Batch: write Batch(2).
  (void)layer.forward_training(Eigen::MatrixXf::Zero(4, 4), 2);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_MHA_OLD_SEED)
  // Written for the old order, where the seed was fifth: now the dropout probability stands there.
  head_attention::MultiHeadAttention<float> mha(4, 64, 16, 50, 42);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_MHA_FLOAT_SEED)
  head_attention::MultiHeadAttention<float> mha(4, 64, 16, 50, 0.1, 0.5);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_HEAD_FLOAT_SEED)
  head_attention::HeadAttention<float> dropout_by_mistake(4, 2, 8, 0.2);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_BATCHED_FLOAT_SEED)
  head_attention::BatchedHeadAttention<float> dropout_by_mistake(4, 2, 8, 0.2f);
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_TRAINING_FLOAT_SEED)
  const head_attention::MultiHeadAttention<float> mha(2, 4, 2, 8);
  (void)mha.forward_training(Eigen::MatrixXf::Zero(3, 4), 0.2);
#else
  // simple_llm's order, MultiHeadAttention(num_heads, emb_size, head_size, max_seq_len, dropout), the seed
  // after it; integer seeds of any type.
  const head_attention::MultiHeadAttention<float> mha(2, 4, 2, 8);
  const head_attention::MultiHeadAttention<float> with_dropout(2, 4, 2, 8, 0.2);
  const head_attention::MultiHeadAttention<float> with_seed(2, 4, 2, 8, 0.2f, 7);
  const head_attention::MultiHeadAttention<double> with_unsigned_seed(2, 4, 2, 8, 0.0, 7u);
  const head_attention::HeadAttention<float> seeded(4, 2, 8, std::uint64_t{9});
  const head_attention::BatchedHeadAttention<float> batched_seeded(4, 2, 8, 9L);
  (void)mha.forward_training(Eigen::MatrixXf::Zero(3, 4), 3);
  Eigen::Tensor<float, 3, Eigen::RowMajor> x(2, 3, 4);
  x.setZero();
  (void)batched.forward(x);
  const Eigen::TensorMap<const Eigen::Tensor<float, 3, Eigen::RowMajor> > map(x.data(), 2, 3, 4);
  (void)batched.forward(map);
  (void)batched.forward(x * 2.0f);
  (void)layer.forward(Eigen::MatrixXf::Zero(3, 4));
  head_attention::HeadAttention<float>::Matrix out(4, 2);
  layer.forward_into(Eigen::MatrixXf::Zero(4, 4), out, head_attention::Batch(2));
  layer.forward_into(Eigen::MatrixXf::Zero(4, 4), out.leftCols(2));
  (void)layer.forward_training(Eigen::MatrixXf::Zero(4, 4), head_attention::Batch(2));
  (void)layer.backward(Eigen::MatrixXf::Zero(3, 4), Eigen::MatrixXf::Zero(3, 2));
  head_attention::KVCache<float> cache = layer.make_cache();
  (void)layer.forward_cached(Eigen::MatrixXf::Zero(1, 4), cache);
#endif
  return 0;
}

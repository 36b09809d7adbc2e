// Compile-fail cases that need HeadAttention::safetensors (nlohmann_json): SafetensorsFile::tensor<T> of a
// type that is not a number, and simple_llm::GPT::generate (examples/gpt/gpt.hpp) with a temperature where
// do_sample stands. With no HEAD_ATTENTION_COMPILE_FAIL_<case> macro defined, the control: the right calls,
// which must compile (built with the tests).
#include <string>

#include <head_attention/safetensors.hpp>

#include "gpt.hpp"

int main(int argc, char** argv) {
  if (argc < 2) return 0;
  const head_attention::SafetensorsFile file = head_attention::SafetensorsFile::open(argv[1]);
  const simple_llm::GPT<float> gpt = simple_llm::GPT<float>::load(file);
#if defined(HEAD_ATTENTION_COMPILE_FAIL_TENSOR_STRING)
  (void)file.tensor<std::string>("_linear.bias");
#elif defined(HEAD_ATTENTION_COMPILE_FAIL_GENERATE_TEMPERATURE)
  // generate(x, max_new_tokens, do_sample, temperature = 1.0, ...): a temperature third is a mistake.
  (void)gpt.generate({1, 2}, 5, 0.8);
#else
  (void)file.tensor<float>("_linear.bias");
  (void)file.tensor<long long>("_linear.bias");
  (void)gpt.generate({1, 2}, 5, true, 0.8);
#endif
  return 0;
}

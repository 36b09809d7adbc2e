// The library's two heavy kernels, detail::forward (every forward entry point: single, batched, cached,
// multi-head, packed) and detail::backward, compiled once per build in kernel_instances.cpp instead of once
// in every test executable: each unit test that includes this header (through test_support.hpp) declares them
// extern, so it calls the one copy, compiled with the build's own flags. Compile time only: the code is the
// header-only library's, unchanged. unit-noalloc does not use it, since it must compile the kernels itself
// with EIGEN_RUNTIME_NO_MALLOC.
#pragma once

#include <head_attention/head_attention.hpp>

// X(XOrder, Stored) for every input order and stored type of detail::forward, and B(Scalar) for every
// scalar of detail::backward.
#define HEAD_ATTENTION_TEST_KERNELS(X, B) \
  X(Eigen::RowMajor, float)               \
  X(Eigen::ColMajor, float)               \
  X(Eigen::RowMajor, double)              \
  X(Eigen::ColMajor, double)              \
  X(Eigen::RowMajor, Eigen::half)         \
  X(Eigen::ColMajor, Eigen::half)         \
  X(Eigen::RowMajor, Eigen::bfloat16)     \
  X(Eigen::ColMajor, Eigen::bfloat16)     \
  B(float)                                \
  B(double)

#define HEAD_ATTENTION_TEST_FORWARD(XOrder, Stored)                                                        \
  template void forward<XOrder, Stored>(const Stored*, Eigen::Index, Eigen::Index, Eigen::Index,           \
                                        const Linear<Stored>* const*, Eigen::Index, Stored*, Eigen::Index, \
                                        int, const AttentionPlan<Stored>&);
#define HEAD_ATTENTION_TEST_BACKWARD(Scalar) template void backward<Scalar>(const BackwardCall<Scalar>&);

#ifndef HEAD_ATTENTION_TEST_DEFINE_KERNELS
namespace head_attention::detail {
#define HEAD_ATTENTION_TEST_EXTERN_FORWARD(XOrder, Stored) extern HEAD_ATTENTION_TEST_FORWARD(XOrder, Stored)
#define HEAD_ATTENTION_TEST_EXTERN_BACKWARD(Scalar) extern HEAD_ATTENTION_TEST_BACKWARD(Scalar)
HEAD_ATTENTION_TEST_KERNELS(HEAD_ATTENTION_TEST_EXTERN_FORWARD, HEAD_ATTENTION_TEST_EXTERN_BACKWARD)
#undef HEAD_ATTENTION_TEST_EXTERN_FORWARD
#undef HEAD_ATTENTION_TEST_EXTERN_BACKWARD
}  // namespace head_attention::detail
#endif

// The one copy of the kernels that the unit tests declare extern (kernel_instances.hpp).
#define HEAD_ATTENTION_TEST_DEFINE_KERNELS
#include "kernel_instances.hpp"

namespace head_attention::detail {
HEAD_ATTENTION_TEST_KERNELS(HEAD_ATTENTION_TEST_FORWARD, HEAD_ATTENTION_TEST_BACKWARD)
}  // namespace head_attention::detail

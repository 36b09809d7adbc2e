// Recipe: a decode loop that allocates nothing, for a real-time thread (docs/decoding.md,
// docs/guarantees.md "No allocation").
//
// Everything a step needs is allocated before the loop: the cache's storage for max_seq_len positions
// (reserve), the working memory (a Workspace sized by reserve_cached_workspace), the output row. One thread,
// so that no OpenMP team is forked (the OpenMP runtime's own bookkeeping is outside the library's promise).
//
// The check below counts both ways memory is allocated here: operator new (std::vector, std::string) and
// malloc, which is what Eigen allocates with. Counting operator new alone would miss every Eigen matrix;
// EIGEN_RUNTIME_NO_MALLOC makes Eigen report each of its heap allocations through eigen_assert, which this
// program redefines to count them (Release builds compile eigen_assert out otherwise).
#define EIGEN_RUNTIME_NO_MALLOC
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
static std::atomic<long> g_allocations{0};
#define eigen_assert(x)                                                           \
  do {                                                                            \
    if (!(x) && std::strstr(#x, "heap allocation is forbidden")) ++g_allocations; \
  } while (false)

#include <iostream>

#include <head_attention/head_attention.hpp>

// Not inlined: GCC 12 at -O3 inlines them into the library's containers and then warns that memory from
// malloc is freed by operator delete, or memory from operator new by free() (-Wmismatched-new-delete), which
// is what replacing both means.
#if defined(__GNUC__)
#define REALTIME_NOINLINE __attribute__((noinline))
#else
#define REALTIME_NOINLINE
#endif
REALTIME_NOINLINE void* operator new(std::size_t size) {
  ++g_allocations;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
REALTIME_NOINLINE void operator delete(void* p) noexcept {
  std::free(p);
}
REALTIME_NOINLINE void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}

int main() {
  using Layer = head_attention::MultiHeadAttention<float>;
  const Layer mha(/*num_heads=*/4, /*emb_size=*/256, /*head_size=*/64, /*max_seq_len=*/512);
  head_attention::PackedMultiHeadAttention<float> model(mha);
  model.set_num_threads(1);

  // Before the real-time part: every allocation.
  auto cache = model.make_cache();
  cache.reserve();  // storage for max_seq_len positions, now
  head_attention::Workspace<float> workspace;
  model.reserve_cached_workspace(workspace, cache);  // sized for one-row steps
  Layer::Matrix token = Layer::Matrix::Random(1, 256), out(1, 256);

  // The real-time part: 500 steps, nothing allocated.
  const long before = g_allocations;
  Eigen::internal::set_is_malloc_allowed(false);
  for (int step = 0; step < 500; ++step) {
    model.forward_cached_into(token, cache, out, workspace);
    token = out;  // the next input (in a model: the next token's embedding)
  }
  Eigen::internal::set_is_malloc_allowed(true);
  const long allocated = g_allocations - before;

  std::cout << "500 decode steps, cache at " << cache.size() << " positions, workspace " << workspace.bytes()
            << " bytes: " << allocated << " allocations" << (allocated == 0 ? ": OK" : ": FAILED") << '\n';
  return allocated == 0 ? 0 : 1;
}

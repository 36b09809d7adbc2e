// The no-allocation mode: with a Workspace, after one call of the same shape (the warm-up) and with every
// cache reserve()d, forward_into and the decode step forward_cached_into allocate nothing. Its own
// executable: it replaces the global operator new with a counting one, and is built with
// EIGEN_RUNTIME_NO_MALLOC, which makes every Eigen heap allocation (Eigen allocates with malloc, not new)
// call eigen_assert; eigen_assert is redefined below to count instead of abort, so that Release builds
// (NDEBUG) check it too.
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace ha_noalloc {
inline std::atomic<long> eigen_allocations{0};
}  // namespace ha_noalloc

#if !defined(EIGEN_RUNTIME_NO_MALLOC)
#error "unit-noalloc must be built with EIGEN_RUNTIME_NO_MALLOC (tests/CMakeLists.txt defines it)"
#endif
// Only the no-malloc check's message contains "heap allocation is forbidden"; every other assertion keeps
// failing as an assertion (aborting in builds without NDEBUG, nothing with it, as Eigen's own).
#define eigen_assert(x)                      \
  do {                                       \
    if (!static_cast<bool>(x)) {             \
      if (::ha_noalloc::is_malloc_check(#x)) \
        ++::ha_noalloc::eigen_allocations;   \
      else                                   \
        ::ha_noalloc::assertion_failed(#x);  \
    }                                        \
  } while (false)

#include <cstdio>
#include <cstring>

namespace ha_noalloc {
inline bool is_malloc_check(const char* text) {
  return std::strstr(text, "heap allocation is forbidden") != nullptr;
}
[[noreturn]] inline void assertion_failed(const char* text) {
  std::fprintf(stderr, "eigen_assert failed: %s\n", text);
  std::abort();
}
}  // namespace ha_noalloc

#include "test_support.hpp"

namespace {

std::atomic<long> g_news{0};

/// Heap allocations (operator new, and Eigen's own) made by f.
template <typename F>
long allocations(F&& f) {
  const long news = g_news, eigen = ha_noalloc::eigen_allocations;
  Eigen::internal::set_is_malloc_allowed(false);
  f();
  Eigen::internal::set_is_malloc_allowed(true);
  return (g_news - news) + (ha_noalloc::eigen_allocations - eigen);
}

}  // namespace

// GCC 12 sees the replaced operator delete free() what operator new returned, and calls it mismatched
// (-Wmismatched-new-delete): here it is the very malloc of the replaced operator new.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t size) {
  ++g_news;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) {
  ++g_news;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
// The nothrow forms too: under AddressSanitizer its own would pair with the free() below, a mismatch.
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  ++g_news;
  return std::malloc(size == 0 ? 1 : size);
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  ++g_news;
  return std::malloc(size == 0 ? 1 : size);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}

using namespace ha_test;

TEST_CASE("the counters see allocations", "[noalloc]") {
  // Each counter must be able to fail the tests below: a vector (operator new) and an Eigen matrix (malloc).
  CHECK(allocations([] { std::vector<int> v(100); }) == 1);
  CHECK(allocations([] { Eigen::VectorXf v(100); }) == 1);
  CHECK(allocations([] {}) == 0);
}

TEMPLATE_TEST_CASE("forward_into and decode steps allocate nothing after warm-up", "[noalloc]", float, double,
                   Eigen::half) {
  using Scalar = TestType;
  if (head_attention::detail::gemm_uses_eigen_internals == false)
    HA_SKIP("HEAD_ATTENTION_GEMM_FALLBACK: Eigen's public products allocate their own packing buffers");
  constexpr Index emb = 32, head = 16, T = 300, heads = 3, B = 2;
  for (const int threads : {1, 2}) {
    INFO("threads " << threads);
    head_attention::HeadAttention<Scalar> layer(emb, head, T, 91);
    head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 0.1, 92,
                                                   head_attention::MaskRule::sliding_window(50));
    layer.set_num_threads(threads);
    mha.set_num_threads(threads);
    const Matrix<Scalar> x = random_matrix<float>(B * T, emb, 93).template cast<Scalar>();
    head_attention::Workspace<Scalar> workspace;

    // A forward over a batch, and a multi-head one: the second call of each shape allocates nothing.
    Matrix<Scalar> out(B * T, head), out_mha(B * T, emb);
    layer.forward_into(x, out, workspace, Batch(B));
    const Matrix<Scalar> expected = out;
    CHECK(allocations([&] { layer.forward_into(x, out, workspace, Batch(B)); }) == 0);
    CHECK(identical(out, expected));
    mha.forward_into(x, out_mha, workspace, Batch(B));
    CHECK(allocations([&] { mha.forward_into(x, out_mha, workspace, Batch(B)); }) == 0);

    // The packed forms, which have no weights to prepare; and short sequences (one query block each, whose
    // keys the attention items prepare themselves).
    const head_attention::PackedHeadAttention<Scalar> packed(layer);
    const head_attention::PackedMultiHeadAttention<Scalar> packed_mha(mha);
    packed.forward_into(x, out, workspace, Batch(B));
    CHECK(allocations([&] { packed.forward_into(x, out, workspace, Batch(B)); }) == 0);
    CHECK(identical(out, expected));
    packed_mha.forward_into(x, out_mha, workspace, Batch(B));
    CHECK(allocations([&] { packed_mha.forward_into(x, out_mha, workspace, Batch(B)); }) == 0);
    const Matrix<Scalar> short_x = x.topRows(B * 10);  // [B · 10, emb]
    Matrix<Scalar> short_out(B * 10, head);
    packed.forward_into(short_x, short_out, workspace, Batch(B));
    CHECK(allocations([&] { packed.forward_into(short_x, short_out, workspace, Batch(B)); }) == 0);

    // Decoding: a prefill, then single rows; every step after the first allocates nothing, across the
    // whole sequence (the cache reserved up front, the key blocks sized by max_seq_len).
    auto cache = layer.make_cache();
    cache.reserve();
    CHECK(cache.capacity() == T);
    Matrix<Scalar> prefill(100, head), step(1, head), decoded(T, head);
    layer.forward_cached_into(x.topRows(100), cache, prefill, workspace);
    decoded.topRows(100) = prefill;
    long step_allocations = 0;
    for (Index r = 100; r < T; ++r) {
      const long n = allocations([&] { layer.forward_cached_into(x.row(r), cache, step, workspace); });
      if (r > 100) step_allocations += n;  // the first step after the prefill is the warm-up of its shape
      decoded.row(r) = step.row(0);
    }
    CHECK(step_allocations == 0);
    CHECK(relative_error(decoded.template cast<double>().eval(),
                         layer.forward(x.topRows(T)).template cast<double>().eval()) <= 1e-2);

    auto mcache = mha.make_cache(B);
    mcache.reserve();
    Matrix<Scalar> mstep(B, emb);
    Matrix<Scalar> rows(B, emb);
    long multi_allocations = 0;
    for (Index r = 0; r < 120; ++r) {
      rows.row(0) = x.row(r);
      rows.row(1) = x.row(T + r);
      const long n = allocations([&] { mha.forward_cached_into(rows, mcache, mstep, workspace); });
      if (r > 0) multi_allocations += n;
    }
    CHECK(multi_allocations == 0);
    CHECK(mcache.size() == 120);
  }
}

TEMPLATE_TEST_CASE("a reserved workspace makes even the first call allocate nothing", "[noalloc]", float,
                   double, Eigen::half) {
  using Scalar = TestType;
  if (head_attention::detail::gemm_uses_eigen_internals == false)
    HA_SKIP("HEAD_ATTENTION_GEMM_FALLBACK: Eigen's public products allocate their own packing buffers");
  constexpr Index emb = 32, head = 16, T = 200, heads = 2, B = 3;
  for (const int threads : {1, 2}) {
    INFO("threads " << threads);
    head_attention::HeadAttention<Scalar> layer(emb, head, T, 94);
    head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 0.1, 95);
    layer.set_num_threads(threads);
    mha.set_num_threads(threads);
    const Matrix<Scalar> x = random_matrix<float>(B * T, emb, 96).template cast<Scalar>();

    // forward_into: reserved, then the very first call; and the same call with its own buffers must agree.
    head_attention::Workspace<Scalar> workspace;
    layer.reserve_workspace(workspace, B, T);
    const std::size_t reserved = workspace.bytes();
    CHECK(reserved > 0);
    CHECK(reserved == layer.workspace_bytes(B, T));
    Matrix<Scalar> out(B * T, head);
    CHECK(allocations([&] { layer.forward_into(x, out, workspace, Batch(B)); }) == 0);
    Matrix<Scalar> own(B * T, head);  // the same call with buffers of its own
    layer.forward_into(x, own, Batch(B));
    CHECK(identical(out, own));
    CHECK(workspace.bytes() == reserved);  // the call needed nothing more

    head_attention::Workspace<Scalar> mha_workspace;
    mha.reserve_workspace(mha_workspace, B, T);
    CHECK(mha_workspace.bytes() == mha.workspace_bytes(B, T));
    Matrix<Scalar> out_mha(B * T, emb);
    CHECK(allocations([&] { mha.forward_into(x, out_mha, mha_workspace, Batch(B)); }) == 0);
    Matrix<Scalar> own_mha(B * T, emb);
    mha.forward_into(x, own_mha, Batch(B));
    CHECK(identical(out_mha, own_mha));

    // Decode steps of several sequences at once (one cache each), from the first step on: the caches
    // reserve()d, the workspace reserved for single rows.
    std::vector<head_attention::KVCache<Scalar>> caches;
    for (Index b = 0; b < B; ++b) {
      caches.push_back(layer.make_cache());
      caches.back().reserve();
    }
    head_attention::Workspace<Scalar> decode;
    layer.reserve_cached_workspace(decode, caches);
    Matrix<Scalar> rows(B, emb), step(B, head), decoded(B * T, head);
    long step_allocations = 0;
    for (Index r = 0; r < T; ++r) {
      for (Index b = 0; b < B; ++b)
        rows.row(b) = x.row(b * T + r);
      step_allocations += allocations([&] { layer.forward_cached_into(rows, caches, step, decode); });
      for (Index b = 0; b < B; ++b)
        decoded.row(b * T + r) = step.row(b);
    }
    CHECK(step_allocations == 0);
    CHECK(relative_error(decoded.template cast<double>().eval(), own.template cast<double>().eval()) <= 1e-2);

    // The packed form: its first forward_into with a workspace it reserved, and its decode steps from the
    // first on: no allocation, and the layer's outputs bit for bit.
    const head_attention::PackedHeadAttention<Scalar> packed(layer);
    head_attention::Workspace<Scalar> packed_workspace;
    packed.reserve_workspace(packed_workspace, B, T);
    CHECK(packed_workspace.bytes() == packed.workspace_bytes(B, T));
    CHECK(packed_workspace.bytes() < reserved);  // no room for the weights
    Matrix<Scalar> packed_out(B * T, head);
    CHECK(allocations([&] { packed.forward_into(x, packed_out, packed_workspace, Batch(B)); }) == 0);
    CHECK(identical(packed_out, own));
    std::vector<head_attention::KVCache<Scalar>> packed_caches;
    for (Index b = 0; b < B; ++b) {
      packed_caches.push_back(packed.make_cache());
      packed_caches.back().reserve();
    }
    head_attention::Workspace<Scalar> packed_decode;
    packed.reserve_cached_workspace(packed_decode, packed_caches);
    long packed_allocations = 0;
    bool packed_identical = true;
    for (Index r = 0; r < T; ++r) {
      for (Index b = 0; b < B; ++b)
        rows.row(b) = x.row(b * T + r);
      packed_allocations +=
          allocations([&] { packed.forward_cached_into(rows, packed_caches, step, packed_decode); });
      for (Index b = 0; b < B; ++b)
        packed_identical = packed_identical &&
                           identical(Matrix<Scalar>(step.row(b)), Matrix<Scalar>(decoded.row(b * T + r)));
    }
    CHECK(packed_allocations == 0);
    CHECK(packed_identical);

    auto mcache = mha.make_cache(B);
    mcache.reserve();
    head_attention::Workspace<Scalar> mha_decode;
    mha.reserve_cached_workspace(mha_decode, mcache);
    Matrix<Scalar> mrows(B, emb), mstep(B, emb);
    long multi_allocations = 0;
    for (Index r = 0; r < 50; ++r) {
      for (Index b = 0; b < B; ++b)
        mrows.row(b) = x.row(b * T + r);
      multi_allocations += allocations([&] { mha.forward_cached_into(mrows, mcache, mstep, mha_decode); });
    }
    CHECK(multi_allocations == 0);

    const head_attention::PackedMultiHeadAttention<Scalar> packed_mha(mha);
    head_attention::Workspace<Scalar> packed_mha_workspace;
    packed_mha.reserve_workspace(packed_mha_workspace, B, T);
    CHECK(packed_mha_workspace.bytes() == packed_mha.workspace_bytes(B, T));
    CHECK(allocations([&] { packed_mha.forward_into(x, out_mha, packed_mha_workspace, Batch(B)); }) == 0);
    CHECK(identical(out_mha, own_mha));
    auto packed_mcache = packed_mha.make_cache(B);
    packed_mcache.reserve();
    head_attention::Workspace<Scalar> packed_mha_decode;
    packed_mha.reserve_cached_workspace(packed_mha_decode, packed_mcache);
    long packed_multi_allocations = 0;
    for (Index r = 0; r < 50; ++r) {
      for (Index b = 0; b < B; ++b)
        mrows.row(b) = x.row(b * T + r);
      packed_multi_allocations += allocations(
          [&] { packed_mha.forward_cached_into(mrows, packed_mcache, mstep, packed_mha_decode); });
    }
    CHECK(packed_multi_allocations == 0);
  }
}

// Steps of many sequences at once (more rows than the row dots take: the GEMM path, a 16-bit layer's rows
// widened per thread in chunks): a workspace reserved for single-row steps, or one that served the prefill,
// serves them from the first step on.
TEMPLATE_TEST_CASE("decode steps of many sequences at once allocate nothing", "[noalloc][batched]", float,
                   double, Eigen::half) {
  using Scalar = TestType;
  if (head_attention::detail::gemm_uses_eigen_internals == false)
    HA_SKIP("HEAD_ATTENTION_GEMM_FALLBACK: Eigen's public products allocate their own packing buffers");
  constexpr Index emb = 96, head = 16, heads = 3, P = 6, steps = 4;
  for (const Index B : {Index(12), Index(32)})
    for (const int threads : {1, 2}) {
      INFO("B " << B << ", threads " << threads);
      head_attention::HeadAttention<Scalar> layer(emb, head, P + steps, 97);
      head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, P + steps, 0.1, 98);
      layer.set_num_threads(threads);
      mha.set_num_threads(threads);
      const head_attention::PackedMultiHeadAttention<Scalar> packed_mha(mha);
      const Matrix<Scalar> x = random_matrix<float>(B * (P + steps), emb, 99 + static_cast<std::uint64_t>(B))
                                   .template cast<Scalar>();
      const Matrix<Scalar> prompt = x.topRows(B * P);
      std::vector<head_attention::KVCache<Scalar>> caches(static_cast<std::size_t>(B), layer.make_cache());
      for (auto& c : caches)
        c.reserve();
      auto mcache = mha.make_cache(B), packed_mcache = packed_mha.make_cache(B);
      mcache.reserve();
      packed_mcache.reserve();
      (void)layer.forward_cached(prompt, caches);
      (void)packed_mha.forward_cached(prompt, packed_mcache);
      // The layer's workspace served its prefill; the others are reserved for single-row steps.
      head_attention::Workspace<Scalar> served, reserved, packed_reserved;
      Matrix<Scalar> prefill_out(B * P, emb);
      mha.forward_cached_into(prompt, mcache, prefill_out, served);
      layer.reserve_cached_workspace(reserved, caches);
      packed_mha.reserve_cached_workspace(packed_reserved, packed_mcache);
      const std::size_t served_bytes = served.bytes(), reserved_bytes = reserved.bytes();
      Matrix<Scalar> out(B, emb), packed_out(B, emb), head_out(B, head);
      long n = 0;
      bool same = true;
      for (Index t = 0; t < steps; ++t) {
        const Matrix<Scalar> rows = x.middleRows(B * P + t * B, B);
        n += allocations([&] {
          mha.forward_cached_into(rows, mcache, out, served);
          packed_mha.forward_cached_into(rows, packed_mcache, packed_out, packed_reserved);
          layer.forward_cached_into(rows, caches, head_out, reserved);
        });
        same = same && identical(out, packed_out);
      }
      CHECK(n == 0);
      CHECK(same);
      CHECK(served.bytes() == served_bytes);
      CHECK(reserved.bytes() == reserved_bytes);
    }
}

// A workspace keeps every buffer at the largest size any call needed, and each call cuts what it needs from
// them: every shape it served, and every smaller one, runs without allocating, in any order (issue 25: it
// used to keep only the last shape's GEMM buffers and scratch, so alternating shapes reallocated them).
TEMPLATE_TEST_CASE("a workspace serves every shape it served, and smaller ones, in any order", "[noalloc]",
                   float, double, Eigen::half, Eigen::bfloat16) {
  using Scalar = TestType;
  if (head_attention::detail::gemm_uses_eigen_internals == false)
    HA_SKIP("HEAD_ATTENTION_GEMM_FALLBACK: Eigen's public products allocate their own packing buffers");
  constexpr Index emb = 32, head = 16, T = 300, heads = 2;
  for (const int threads : {1, 2}) {
    INFO("threads " << threads);
    head_attention::HeadAttention<Scalar> layer(emb, head, T, 97);
    head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 0.1, 98);
    layer.set_num_threads(threads);
    mha.set_num_threads(threads);
    const head_attention::PackedHeadAttention<Scalar> packed(layer);
    const head_attention::PackedMultiHeadAttention<Scalar> packed_mha(mha);
    const Matrix<Scalar> x = random_matrix<float>(3 * T, emb, 99).template cast<Scalar>();

    // Alternating batch shapes, each of every form: after one round, no call allocates, and each output is
    // the one the same call gives with buffers of its own, bit for bit (the arrays cut differently from the
    // same memory).
    struct Shape {
      Index batch, seq_len;
    };
    const Shape shapes[] = {{2, T}, {3, 40}, {1, 256}, {1, 7}};
    head_attention::Workspace<Scalar> workspace;
    long later = 0;
    bool same = true;
    for (int round = 0; round < 3; ++round)
      for (const Shape& s : shapes) {
        const Index rows = s.batch * s.seq_len;
        const Matrix<Scalar> xs = x.topRows(rows);
        Matrix<Scalar> out(rows, head), out_mha(rows, emb), out_packed(rows, head), out_packed_mha(rows, emb);
        const long n = allocations([&] {
          layer.forward_into(xs, out, workspace, Batch(s.batch));
          mha.forward_into(xs, out_mha, workspace, Batch(s.batch));
          packed.forward_into(xs, out_packed, workspace, Batch(s.batch));
          packed_mha.forward_into(xs, out_packed_mha, workspace, Batch(s.batch));
        });
        if (round > 0) later += n;
        if (round == 2) {
          Matrix<Scalar> own(rows, head), own_mha(rows, emb);
          layer.forward_into(xs, own, Batch(s.batch));
          mha.forward_into(xs, own_mha, Batch(s.batch));
          same = same && identical(out, own) && identical(out_mha, own_mha) && identical(out_packed, own) &&
                 identical(out_packed_mha, own_mha);
        }
      }
    CHECK(later == 0);
    CHECK(same);

    // Smaller shapes than any served: fewer sequences, shorter ones, and 250 rows after 256 (cut into
    // longer projection chunks than 256 rows are, which a 16-bit layer converts into per-thread buffers).
    const std::size_t bytes = workspace.bytes();
    const Shape smaller[] = {{1, T}, {2, 100}, {1, 250}, {3, 9}, {1, 1}, {2, 1}};
    long small = 0;
    for (const Shape& s : smaller) {
      INFO("batch " << s.batch << ", seq_len " << s.seq_len);
      const Index rows = s.batch * s.seq_len;
      const Matrix<Scalar> xs = x.topRows(rows);
      Matrix<Scalar> out(rows, head), out_mha(rows, emb);
      const long n = allocations([&] {
        layer.forward_into(xs, out, workspace, Batch(s.batch));
        mha.forward_into(xs, out_mha, workspace, Batch(s.batch));
      });
      CHECK(n == 0);
      small += n;
    }
    CHECK(small == 0);
    CHECK(workspace.bytes() == bytes);  // nothing grew

    // Reserved for several shapes (in either order): the first call of each allocates nothing, and the
    // calls leave the reservation's size as it was.
    head_attention::Workspace<Scalar> reserved;
    for (const Shape& s : {shapes[2], shapes[1], shapes[0]}) {  // ({1, 7} is smaller than {2, T})
      layer.reserve_workspace(reserved, s.batch, s.seq_len);
      mha.reserve_workspace(reserved, s.batch, s.seq_len);
    }
    const std::size_t reserved_bytes = reserved.bytes();
    // Bounded by the largest needs: at most what the shapes' own reservations hold together, and for these
    // shapes, where {2, T} needs the most of every buffer but the scratch, hardly more than its own.
    CHECK(reserved_bytes <=
          mha.workspace_bytes(2, T) + mha.workspace_bytes(3, 40) + mha.workspace_bytes(1, 256));
    CHECK(reserved_bytes >= mha.workspace_bytes(2, T));
    long first_calls = 0;
    for (const Shape& s : shapes) {
      const Index rows = s.batch * s.seq_len;
      const Matrix<Scalar> xs = x.topRows(rows);
      Matrix<Scalar> out(rows, head), out_mha(rows, emb);
      first_calls += allocations([&] {
        layer.forward_into(xs, out, reserved, Batch(s.batch));
        mha.forward_into(xs, out_mha, reserved, Batch(s.batch));
      });
    }
    CHECK(first_calls == 0);
    CHECK(reserved.bytes() == reserved_bytes);
  }
}

// Decoding: a prefill, steps, another prefill (a new prompt in the same cache, cleared), steps again. The
// workspace that served the first prefill serves the steps after it (it keeps room for them), and nothing
// after the first prefill allocates. reserve_cached_workspace(workspace, cache, T) sizes it for all of it at
// once: the prefill of T rows and the one-row steps after it.
TEMPLATE_TEST_CASE("prefill, steps, prefill: one workspace, nothing allocated after the first prefill",
                   "[noalloc]", float, double, Eigen::half, Eigen::bfloat16) {
  using Scalar = TestType;
  if (head_attention::detail::gemm_uses_eigen_internals == false)
    HA_SKIP("HEAD_ATTENTION_GEMM_FALLBACK: Eigen's public products allocate their own packing buffers");
  constexpr Index emb = 32, head = 16, L = 400, heads = 2, B = 2;
  for (const int threads : {1, 2}) {
    for (const Index prefill : {Index(16), Index(100)}) {
      INFO("threads " << threads << ", prefill of " << prefill << " rows");
      head_attention::HeadAttention<Scalar> layer(emb, head, L, 101);
      head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, L, 0.1, 102);
      layer.set_num_threads(threads);
      mha.set_num_threads(threads);
      const head_attention::PackedHeadAttention<Scalar> packed(layer);
      const head_attention::PackedMultiHeadAttention<Scalar> packed_mha(mha);
      const Matrix<Scalar> x = random_matrix<float>(B * L, emb, 103).template cast<Scalar>();
      const Index steps = 40;

      // Runs `rounds` rounds of prefill + steps of each form over its cache (cleared first), all in
      // `workspace`: the allocations of each round, and whether every output equals the same call's with
      // buffers of its own.
      const auto rounds = [&](head_attention::Workspace<Scalar>& workspace, int count) {
        auto cache = layer.make_cache(), own_cache = layer.make_cache();
        auto packed_cache = packed.make_cache();
        auto mcache = mha.make_cache(B), own_mcache = mha.make_cache(B);
        auto packed_mcache = packed_mha.make_cache(B);
        for (auto* c : {&cache, &own_cache, &packed_cache})
          c->reserve();
        for (auto* c : {&mcache, &own_mcache, &packed_mcache})
          c->reserve();
        std::vector<long> counts;
        bool same = true;
        Matrix<Scalar> out(prefill, head), own(prefill, head), step(1, head), own_step(1, head);
        Matrix<Scalar> mout(B * prefill, emb), mown(B * prefill, emb), mstep(B, emb), mown_step(B, emb);
        Matrix<Scalar> mx(B * prefill, emb), mrow(B, emb);
        for (Index b = 0; b < B; ++b)
          mx.middleRows(b * prefill, prefill) = x.middleRows(b * L, prefill);
        for (int round = 0; round < count; ++round) {
          for (auto* c : {&cache, &own_cache, &packed_cache})
            c->clear();
          for (auto* c : {&mcache, &own_mcache, &packed_mcache})
            c->clear();
          long n = allocations([&] {
            layer.forward_cached_into(x.topRows(prefill), cache, out, workspace);
            mha.forward_cached_into(mx, mcache, mout, workspace);
          });
          layer.forward_cached_into(x.topRows(prefill), own_cache, own);
          mha.forward_cached_into(mx, own_mcache, mown);
          same = same && identical(out, own) && identical(mout, mown);
          n += allocations([&] {
            packed.forward_cached_into(x.topRows(prefill), packed_cache, out, workspace);
            packed_mha.forward_cached_into(mx, packed_mcache, mout, workspace);
          });
          same = same && identical(out, own) && identical(mout, mown);
          for (Index r = prefill; r < prefill + steps; ++r) {
            for (Index b = 0; b < B; ++b)
              mrow.row(b) = x.row(b * L + r);
            n += allocations([&] {
              layer.forward_cached_into(x.row(r), cache, step, workspace);
              mha.forward_cached_into(mrow, mcache, mstep, workspace);
            });
            layer.forward_cached_into(x.row(r), own_cache, own_step);
            mha.forward_cached_into(mrow, own_mcache, mown_step);
            same = same && identical(step, own_step) && identical(mstep, mown_step);
            n += allocations([&] {
              packed.forward_cached_into(x.row(r), packed_cache, step, workspace);
              packed_mha.forward_cached_into(mrow, packed_mcache, mstep, workspace);
            });
            same = same && identical(step, own_step) && identical(mstep, mown_step);
          }
          counts.push_back(n);
        }
        CHECK(same);
        return counts;
      };

      // Served: the first prefill is the warm-up (it allocates), every step after it and every later round
      // allocates nothing.
      head_attention::Workspace<Scalar> served;
      const std::vector<long> counts = rounds(served, 3);
      CHECK(counts[0] > 0);  // (the counters see the warm-up)
      CHECK(counts[1] == 0);
      CHECK(counts[2] == 0);

      // The first round alone, each call in a fresh workspace: a prefill's workspace serves the steps after
      // it from the first step on.
      {
        head_attention::Workspace<Scalar> workspace;
        auto cache = layer.make_cache();
        cache.reserve();
        Matrix<Scalar> out(prefill, head), step(1, head);
        layer.forward_cached_into(x.topRows(prefill), cache, out, workspace);
        const std::size_t bytes = workspace.bytes();
        long n = 0;
        for (Index r = prefill; r < prefill + steps; ++r)
          n += allocations([&] { layer.forward_cached_into(x.row(r), cache, step, workspace); });
        CHECK(n == 0);
        CHECK(workspace.bytes() == bytes);
      }

      // Reserved by one call per form, for the prefill and the steps after it: nothing allocates from the
      // first call on, and the calls need nothing more than the reservation.
      head_attention::Workspace<Scalar> reserved;
      {
        const auto cache = layer.make_cache();
        const auto mcache = mha.make_cache(B);
        layer.reserve_cached_workspace(reserved, cache, prefill);
        mha.reserve_cached_workspace(reserved, mcache, prefill);
        packed.reserve_cached_workspace(reserved, packed.make_cache(), prefill);
        packed_mha.reserve_cached_workspace(reserved, packed_mha.make_cache(B), prefill);
      }
      const std::size_t reserved_bytes = reserved.bytes();
      const std::vector<long> reserved_counts = rounds(reserved, 2);
      CHECK(reserved_counts[0] == 0);
      CHECK(reserved_counts[1] == 0);
      CHECK(reserved.bytes() == reserved_bytes);
      // Chunks of fewer rows than the reservation's t, then a step: nothing allocates either.
      {
        auto cache = layer.make_cache();
        cache.reserve();
        const Index chunk = prefill / 2 + 1;
        Matrix<Scalar> out(chunk, head), out3(3, head), step(1, head);
        CHECK(allocations([&] {
                layer.forward_cached_into(x.topRows(chunk), cache, out, reserved);
                layer.forward_cached_into(x.middleRows(chunk, 3), cache, out3, reserved);
                layer.forward_cached_into(x.row(chunk + 3), cache, step, reserved);
              }) == 0);
        CHECK(cache.size() == chunk + 4);
      }
      // The memory the served workspace ended with: the largest needs of these shapes, no more (a reservation
      // sizes the scratch of every thread a call of the shape may use, where these small calls run on one).
      if (threads == 1)
        CHECK(reserved_bytes == served.bytes());
      else
        CHECK(reserved_bytes >= served.bytes());
    }
  }
}

// Decode steps whose queries are cut into more and more key ranges as the cache fills (flash-decoding: one
// range below 512 keys, five at 1400): the workspace reserved for single rows holds the partial results of
// the most ranges the cache can reach, so no step allocates. Without a workspace (forward_cached), the first
// step of each form sizes this thread's step buffers and the later ones reuse them: each allocates its result
// and nothing else.
TEMPLATE_TEST_CASE(
    "decode steps cut into key ranges allocate nothing; without a workspace, only their result",
    "[noalloc][split]", float, double) {
  using Scalar = TestType;
  if (head_attention::detail::gemm_uses_eigen_internals == false)
    HA_SKIP("HEAD_ATTENTION_GEMM_FALLBACK: Eigen's public products allocate their own packing buffers");
  constexpr Index emb = 32, head = 16, T = 1400, heads = 2;
  const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 97);
  const long result = allocations([&] { Matrix<Scalar> y(1, emb); });
  REQUIRE(result == 1);
  for (const int threads : {1, 2}) {
    INFO("threads " << threads);
    head_attention::HeadAttention<Scalar> layer(emb, head, T, 98);
    head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 0.1, 99);
    layer.set_num_threads(threads);
    mha.set_num_threads(threads);
    const head_attention::PackedMultiHeadAttention<Scalar> packed(mha);
    auto cache = layer.make_cache(), plain_cache = layer.make_cache();
    auto multi_cache = packed.make_cache(), plain_multi_cache = mha.make_cache(),
         plain_packed_cache = packed.make_cache();
    cache.reserve();
    plain_cache.reserve();
    multi_cache.reserve();
    plain_multi_cache.reserve();
    plain_packed_cache.reserve();
    head_attention::Workspace<Scalar> workspace, multi_workspace;
    layer.reserve_cached_workspace(workspace, cache);
    packed.reserve_cached_workspace(multi_workspace, multi_cache);
    Matrix<Scalar> step(1, head), multi_step(1, emb);
    Matrix<Scalar> y, z, w;  // [1, head], [1, emb], [1, emb]: forward_cached's results
    long step_allocations = 0, plain_allocations = 0;
    for (Index r = 0; r < T; ++r) {
      step_allocations += allocations([&] {
        layer.forward_cached_into(x.row(r), cache, step, workspace);
        packed.forward_cached_into(x.row(r), multi_cache, multi_step, multi_workspace);
      });
      const long plain = allocations([&] {
        y = layer.forward_cached(x.row(r), plain_cache);
        z = mha.forward_cached(x.row(r), plain_multi_cache);
        w = packed.forward_cached(x.row(r), plain_packed_cache);
      });
      if (r > 0) plain_allocations += plain;
    }
    CHECK(step_allocations == 0);
    CHECK(plain_allocations == 3 * result * (T - 1));  // y, z and w: a new result each step, nothing else
    CHECK(head_attention::detail::decode_key_splits(T, 1) >= 4);  // the last steps were cut
  }
}

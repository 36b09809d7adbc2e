// ggml_attention: head-attention against llama.cpp's CPU backend (ggml) on the same attention steps, same
// weights, same inputs, in one process (issue 25). Not built by CMake: bench/ggml_setup.sh installs the npm
// packages that ship ggml's libraries and headers and compiles this file; bench/ggml_compare.py runs it and
// writes results/ggml_comparison.{md,json}. See bench/README.md ("ggml_compare.py").
//
// What each side computes (emb 512, head 64, float inputs and weights, scale 1/sqrt(64)):
//   prefill, h1:  x [B, T, 512] -> Q|K|V projections with bias -> causal softmax(Q Kᵀ / 8) V -> [B, T, 64]
//   prefill, h8:  the same for 8 heads of 64 (one [512, 1536] projection), the heads concatenated, then the
//                 output projection [512, 512] with bias -> [B, T, 512]   (simple_llm's MultiHeadAttention)
//   decode, hH:   one new row x [1, 512] of a sequence whose n earlier positions are cached: its Q|K|V
//                 projections, its K and V appended to the cache (position n), attention over the n + 1
//                 cached keys, (h8: output projection) -> [1, 64] or [1, 512]; the step is timed again and
//                 again with position n overwritten each time (ours: KVCache::truncate(n) after each step).
// ours:  PackedHeadAttention / PackedMultiHeadAttention (weights prepared once) with a Workspace and a
//        preallocated output: forward_into for prefill, forward_cached_into over a reserve()d cache for
//        decode (float32 or float16 cache storage, ours-f32 / ours-f16).
// ggml:  one graph per case, built once, ggml_graph_compute with a persistent ggml_threadpool of n threads
//        (llama.cpp's default polling), fresh for each timing. Weights F32 [512, 3·H·64] (one mul_mat + add),
//        K/V F32 or F16 (prefill: K and V converted by ggml_cpy into F16 tensors, as llama.cpp writes its
//        cache; F32 uses the projection's views directly):
//   fa:  ggml_flash_attn_ext(q, k, v, mask F16 [n_kv, n_q] causal, scale 1/8)  (decode: mask of zeros)
//   mm:  kq = ggml_mul_mat(k, q); ggml_soft_max_ext(kq, mask F16, 1/8, 0); ggml_mul_mat(vᵀ, kq), V stored
//        transposed (llama.cpp's cache layout without flash attention: decode appends a column of Vᵀ), then
//        (h8 prefill) ggml_cont(ggml_permute(...)) into [H·64, T].
// CPU variant: every libggml-cpu-*.so in --lib-dir is dlopen'ed and asked ggml_backend_score(), and the best
// one is used (ggml_backend_load_best's rule); ggml's graph code comes from libggml-base.so, linked.
//
// Output: JSON on stdout (context, limits, parity, every round's medians); progress on stderr.
//   ggml_attention --lib-dir DIR [--rounds 5] [--first-round K] [--min-time 0.2] [--threads 1,2] [--quick]
//                  [--prefill-shapes 8x1024,2x10] [--only REGEX] [--no-limits]
// Each round times every case once, in an order rotated by the round's number (reversed on odd rounds); a
// case's figure is the median of its per-call times (and of the calling thread's CPU time) over --min-time
// seconds (0.3 s and at least 3 calls for B = 8, T = 1024; at least 20 calls otherwise), after warm-up calls.
// --prefill-shapes BxT,... replaces the prefill shapes (default 8x1024,2x10). --only keeps the shapes whose
// "prefill/h1/B8_T1024" / "decode/h8/n512" prefix matches REGEX. Limits: one core's FMA peak and read
// bandwidth over 4.5 MiB and 64 MiB buffers, before and after the rounds.
#include <dlfcn.h>
#include <glob.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <Eigen/Core>

#include <head_attention/head_attention.hpp>

#include "ggml-cpu.h"
#include "ggml.h"
#include "machine_limits.hpp"

namespace {

using Index = Eigen::Index;
using Clock = std::chrono::steady_clock;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
namespace ha = head_attention;

constexpr Index kEmb = 512;
constexpr Index kHead = 64;
constexpr float kScale = 0.125f;  // 1 / sqrt(64)
constexpr std::uint64_t kSeed = 42;

// ------------------------------------------------------------------------------------------ the CPU library
struct CpuLib {
  std::string path;
  int score = 0;
  void* handle = nullptr;
  decltype(&ggml_cpu_init) cpu_init = nullptr;
  decltype(&ggml_graph_plan) graph_plan = nullptr;
  decltype(&ggml_graph_compute) graph_compute = nullptr;
  decltype(&ggml_threadpool_new) threadpool_new = nullptr;
  decltype(&ggml_threadpool_free) threadpool_free = nullptr;
  std::vector<std::pair<std::string, int>> scores;
};

template <typename F>
F sym(void* lib, const char* name) {
  void* p = dlsym(lib, name);
  if (p == nullptr) {
    std::fprintf(stderr, "ggml_attention: %s not found in the CPU library\n", name);
    std::exit(2);
  }
  return reinterpret_cast<F>(p);
}

CpuLib load_cpu(const std::string& dir, const std::string& forced) {
  CpuLib best;
  std::vector<std::string> candidates;
  if (!forced.empty()) {
    candidates.push_back(forced);
  } else {
    glob_t g;
    if (glob((dir + "/libggml-cpu-*.so").c_str(), 0, nullptr, &g) == 0)
      for (size_t i = 0; i < g.gl_pathc; ++i)
        candidates.emplace_back(g.gl_pathv[i]);
    globfree(&g);
  }
  for (const std::string& path : candidates) {
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      std::fprintf(stderr, "ggml_attention: cannot load %s: %s\n", path.c_str(), dlerror());
      continue;
    }
    auto score_fn = reinterpret_cast<int (*)()>(dlsym(lib, "ggml_backend_score"));
    const int score = score_fn ? score_fn() : (forced.empty() ? 0 : 1);
    best.scores.emplace_back(path.substr(path.find_last_of('/') + 1), score);
    if (score > best.score) {
      if (best.handle) dlclose(best.handle);
      best.handle = lib;
      best.score = score;
      best.path = path;
    } else {
      dlclose(lib);
    }
  }
  if (best.handle == nullptr) {
    std::fprintf(stderr, "ggml_attention: no usable libggml-cpu-*.so in %s\n", dir.c_str());
    std::exit(2);
  }
  best.cpu_init = sym<decltype(best.cpu_init)>(best.handle, "ggml_cpu_init");
  best.graph_plan = sym<decltype(best.graph_plan)>(best.handle, "ggml_graph_plan");
  best.graph_compute = sym<decltype(best.graph_compute)>(best.handle, "ggml_graph_compute");
  best.threadpool_new = sym<decltype(best.threadpool_new)>(best.handle, "ggml_threadpool_new");
  best.threadpool_free = sym<decltype(best.threadpool_free)>(best.handle, "ggml_threadpool_free");
  best.cpu_init();
  return best;
}

CpuLib g_cpu;

// ----------------------------------------------------------------------------------------------- the layers
/// Our layers and the weights both sides use.
struct Model {
  int heads;
  std::unique_ptr<ha::HeadAttention<float>> head;        // heads == 1
  std::unique_ptr<ha::MultiHeadAttention<float>> multi;  // heads == 8
  Matrix w_qkv;  // [3·H·64, 512]: Wq of heads 0..H-1, then Wk, then Wv (PyTorch's [out, in] rows)
  Eigen::VectorXf b_qkv;
  Matrix w_o;  // [512, H·64]
  Eigen::VectorXf b_o;

  Model(int h, Index max_len) : heads(h) {
    const Index hd = h * kHead;
    w_qkv.resize(3 * hd, kEmb);
    b_qkv.resize(3 * hd);
    auto put = [&](int which, int i, const ha::Linear<float>& lin) {
      w_qkv.middleRows(which * hd + i * kHead, kHead) = lin.weight;
      b_qkv.segment(which * hd + i * kHead, kHead) = lin.bias;
    };
    if (h == 1) {
      head = std::make_unique<ha::HeadAttention<float>>(kEmb, kHead, max_len, kSeed);
      put(0, 0, head->query());
      put(1, 0, head->key());
      put(2, 0, head->value());
    } else {
      multi = std::make_unique<ha::MultiHeadAttention<float>>(h, kEmb, kHead, max_len, 0.1, kSeed);
      for (int i = 0; i < h; ++i) {
        put(0, i, multi->head(i).query());
        put(1, i, multi->head(i).key());
        put(2, i, multi->head(i).value());
      }
      w_o = multi->projection().weight;
      b_o = multi->projection().bias;
    }
  }
};

Matrix random_rows(Index rows, std::uint64_t seed) {
  std::srand(static_cast<unsigned>(seed));
  return Matrix::Random(rows, kEmb);  // U(-1, 1)
}

// ------------------------------------------------------------------------------------------------ ggml side
struct GgmlGraph {
  ggml_context* ctx = nullptr;
  ggml_cgraph* graph = nullptr;
  ggml_tensor* x = nullptr;
  ggml_tensor* out = nullptr;
  size_t bytes = 0;
  ~GgmlGraph() {
    if (ctx) ggml_free(ctx);
  }
};

void set_f32(ggml_tensor* t, const float* src) {
  std::memcpy(t->data, src, ggml_nbytes(t));
}

void set_rows(ggml_tensor* t, const float* src, size_t count, size_t offset_elems) {
  if (t->type == GGML_TYPE_F32) {
    std::memcpy(static_cast<float*>(t->data) + offset_elems, src, count * sizeof(float));
  } else {
    ggml_fp32_to_fp16_row(src, static_cast<ggml_fp16_t*>(t->data) + offset_elems,
                          static_cast<int64_t>(count));
  }
}

void fill_causal_mask(ggml_tensor* mask, Index n_kv, Index n_q, Index offset) {
  auto* m = static_cast<ggml_fp16_t*>(mask->data);
  const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), minus_inf = ggml_fp32_to_fp16(-INFINITY);
  for (Index i = 0; i < mask->ne[1]; ++i)
    for (Index j = 0; j < n_kv; ++j)
      m[i * mask->ne[0] + j] = (i < n_q && j <= i + offset) ? zero : minus_inf;
}

/// Builds with `build(ctx)` twice: once in a no_alloc context to size the memory, once for real.
template <typename Build>
void make_graph(GgmlGraph& g, Build build) {
  ggml_init_params probe{64 * 1024 * 1024, nullptr, true};
  ggml_context* pctx = ggml_init(probe);
  build(pctx, g, false);
  size_t need = ggml_graph_overhead() + 1024 * 1024;
  for (ggml_tensor* t = ggml_get_first_tensor(pctx); t; t = ggml_get_next_tensor(pctx, t))
    need += ggml_tensor_overhead() + (t->view_src ? 0 : GGML_PAD(ggml_nbytes(t), GGML_MEM_ALIGN) + 64);
  ggml_free(pctx);
  g = GgmlGraph();
  ggml_init_params params{need, nullptr, false};
  g.ctx = ggml_init(params);
  g.bytes = need;
  build(g.ctx, g, true);
}

struct Weights {
  ggml_tensor *w, *b, *wo = nullptr, *bo = nullptr;
};

Weights weights(ggml_context* ctx, const Model& m, bool fill) {
  Weights w;
  const Index hd = m.heads * kHead;
  w.w = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kEmb, 3 * hd);
  w.b = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 3 * hd);
  if (fill) {
    set_f32(w.w, m.w_qkv.data());
    set_f32(w.b, m.b_qkv.data());
  }
  if (m.heads > 1) {
    w.wo = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hd, kEmb);
    w.bo = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, kEmb);
    if (fill) {
      set_f32(w.wo, m.w_o.data());
      set_f32(w.bo, m.b_o.data());
    }
  }
  return w;
}

/// Prefill: x [512, T, B] -> [H·64, T·B] (h8: after the output projection, [512, T·B]).
void build_prefill(GgmlGraph& g, const Model& m, Index B, Index T, bool flash, ggml_type kv,
                   const Matrix& x) {
  make_graph(g, [&](ggml_context* ctx, GgmlGraph& gg, bool fill) {
    const Index H = m.heads, D = kHead, hd = H * D;
    const Weights w = weights(ctx, m, fill);
    gg.x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kEmb, T, B);
    if (fill) set_f32(gg.x, x.data());
    ggml_tensor* qkv = ggml_add(ctx, ggml_mul_mat(ctx, w.w, ggml_reshape_2d(ctx, gg.x, kEmb, T * B)), w.b);
    const size_t es = sizeof(float), row = 3 * hd * es;
    auto part = [&](int which) {  // [D, H, T, B] view -> [D, T, H, B]
      ggml_tensor* v = ggml_view_4d(ctx, qkv, D, H, T, B, D * es, row, row * T, which * hd * es);
      return ggml_permute(ctx, v, 0, 2, 1, 3);
    };
    ggml_tensor *q = part(0), *k = part(1), *v = part(2);
    ggml_tensor* mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, T, T);
    if (fill) fill_causal_mask(mask, T, T, 0);
    ggml_tensor* o;
    if (flash) {
      if (kv == GGML_TYPE_F16) {
        k = ggml_cpy(ctx, k, ggml_new_tensor_4d(ctx, kv, D, T, H, B));
        v = ggml_cpy(ctx, v, ggml_new_tensor_4d(ctx, kv, D, T, H, B));
      }
      o = ggml_flash_attn_ext(ctx, q, k, v, mask, kScale, 0.0f, 0.0f);  // [D, H, T, B]
      o = ggml_reshape_2d(ctx, o, hd, T * B);
    } else {
      if (kv == GGML_TYPE_F16) k = ggml_cpy(ctx, k, ggml_new_tensor_4d(ctx, kv, D, T, H, B));
      ggml_tensor* vt = ggml_cpy(ctx, ggml_transpose(ctx, v), ggml_new_tensor_4d(ctx, kv, T, D, H, B));
      ggml_tensor* kq = ggml_mul_mat(ctx, k, q);  // [Tk, Tq, H, B]
      kq = ggml_soft_max_ext(ctx, kq, mask, kScale, 0.0f);
      ggml_tensor* kqv = ggml_mul_mat(ctx, vt, kq);                          // [D, Tq, H, B]
      o = H > 1 ? ggml_cont(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3)) : kqv;  // [D, H, T, B]
      o = ggml_reshape_2d(ctx, o, hd, T * B);
    }
    if (H > 1) o = ggml_add(ctx, ggml_mul_mat(ctx, w.wo, o), w.bo);
    gg.out = o;
    gg.graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(gg.graph, o);
  });
}

/// Decode: cache of n positions (filled from the prompt's K and V) + x [512, 1] -> [H·64 or 512, 1].
void build_decode(GgmlGraph& g, const Model& m, Index n, bool flash, ggml_type kv, const Matrix& prompt_kv_k,
                  const Matrix& prompt_kv_v, const Matrix& next) {
  make_graph(g, [&](ggml_context* ctx, GgmlGraph& gg, bool fill) {
    const Index H = m.heads, D = kHead, hd = H * D, n_kv = n + 1;
    const Weights w = weights(ctx, m, fill);
    gg.x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kEmb, 1);
    if (fill) set_f32(gg.x, next.data());
    ggml_tensor* qkv = ggml_add(ctx, ggml_mul_mat(ctx, w.w, gg.x), w.b);  // [3·H·D, 1]
    const size_t es = sizeof(float);
    ggml_tensor* q = ggml_view_3d(ctx, qkv, D, 1, H, 3 * hd * es, D * es, 0);
    ggml_tensor* kn = ggml_view_3d(ctx, qkv, D, 1, H, 3 * hd * es, D * es, hd * es);
    ggml_tensor* kc = ggml_new_tensor_3d(ctx, kv, D, n_kv, H);
    ggml_tensor* cpy_k =
        ggml_cpy(ctx, kn, ggml_view_3d(ctx, kc, D, 1, H, kc->nb[1], kc->nb[2], n * kc->nb[1]));
    ggml_tensor* mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, 1);
    if (fill) {
      fill_causal_mask(mask, n_kv, 1, n);
      for (Index h = 0; h < H; ++h)
        for (Index p = 0; p < n; ++p)
          set_rows(kc, prompt_kv_k.row(p).data() + h * D, D, (h * n_kv + p) * D);
    }
    ggml_tensor *cpy_v, *o;
    if (flash) {
      ggml_tensor* vc = ggml_new_tensor_3d(ctx, kv, D, n_kv, H);
      ggml_tensor* vn = ggml_view_3d(ctx, qkv, D, 1, H, 3 * hd * es, D * es, 2 * hd * es);
      cpy_v = ggml_cpy(ctx, vn, ggml_view_3d(ctx, vc, D, 1, H, vc->nb[1], vc->nb[2], n * vc->nb[1]));
      if (fill)
        for (Index h = 0; h < H; ++h)
          for (Index p = 0; p < n; ++p)
            set_rows(vc, prompt_kv_v.row(p).data() + h * D, D, (h * n_kv + p) * D);
      o = ggml_flash_attn_ext(ctx, q, kc, vc, mask, kScale, 0.0f, 0.0f);  // [D, H, 1]
    } else {
      ggml_tensor* vct = ggml_new_tensor_3d(ctx, kv, n_kv, D, H);  // Vᵀ per head
      ggml_tensor* vn = ggml_view_3d(ctx, qkv, 1, D, H, es, D * es, 2 * hd * es);
      cpy_v = ggml_cpy(ctx, vn,
                       ggml_view_3d(ctx, vct, 1, D, H, vct->nb[1], vct->nb[2], n * ggml_element_size(vct)));
      if (fill) {
        std::vector<float> col(static_cast<size_t>(n));
        for (Index h = 0; h < H; ++h)
          for (Index d = 0; d < D; ++d) {
            for (Index p = 0; p < n; ++p)
              col[static_cast<size_t>(p)] = prompt_kv_v(p, h * D + d);
            set_rows(vct, col.data(), static_cast<size_t>(n), (h * D + d) * n_kv);
          }
      }
      ggml_tensor* kq = ggml_mul_mat(ctx, kc, q);  // [n_kv, 1, H]
      kq = ggml_soft_max_ext(ctx, kq, mask, kScale, 0.0f);
      o = ggml_mul_mat(ctx, vct, kq);  // [D, 1, H]
    }
    o = ggml_reshape_2d(ctx, o, hd, 1);
    if (H > 1) o = ggml_add(ctx, ggml_mul_mat(ctx, w.wo, o), w.bo);
    gg.out = o;
    gg.graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(gg.graph, cpy_k);
    ggml_build_forward_expand(gg.graph, cpy_v);
    ggml_build_forward_expand(gg.graph, o);
  });
}

struct Runner {  // one graph on n threads
  GgmlGraph* g;
  ggml_threadpool* pool = nullptr;
  ggml_cplan plan{};
  std::vector<uint8_t> work;
  Runner(GgmlGraph* graph, int threads) : g(graph) {
    ggml_threadpool_params p = ggml_threadpool_params_default(threads);
    pool = g_cpu.threadpool_new(&p);
    plan = g_cpu.graph_plan(g->graph, threads, pool);
    work.resize(plan.work_size + 64);
    plan.work_data = work.data();
  }
  void run() {
    if (g_cpu.graph_compute(g->graph, &plan) != GGML_STATUS_SUCCESS) {
      std::fprintf(stderr, "ggml_attention: ggml_graph_compute failed\n");
      std::exit(3);
    }
  }
  ~Runner() { g_cpu.threadpool_free(pool); }
};

// ------------------------------------------------------------------------------------------------ the cases
struct Case {
  std::string name;  // step/h<H>/<shape>/<impl>/t<threads>
  std::string step, impl, kv;
  int heads, threads;
  Index B = 0, T = 0, n = 0;
  std::function<void()> prepare, call, finish;
  std::function<void(int)> set_threads;
};

double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Timing {
  double median_us, min_us, cpu_median_us;
  long calls;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

/// Per-call times of fn until min_time seconds and min_calls calls (after warm-up calls for ~10% of that).
Timing time_calls(const std::function<void()>& fn, double min_time, long min_calls, long max_calls) {
  const auto w0 = Clock::now();
  for (int i = 0; i < 3 || std::chrono::duration<double>(Clock::now() - w0).count() < 0.1 * min_time; ++i)
    fn();
  std::vector<double> wall, cpu;
  const auto t0 = Clock::now();
  while (static_cast<long>(wall.size()) < max_calls) {
    const double c0 = thread_cpu_seconds();
    const auto s = Clock::now();
    fn();
    wall.push_back(std::chrono::duration<double>(Clock::now() - s).count());
    cpu.push_back(thread_cpu_seconds() - c0);
    if (static_cast<long>(wall.size()) >= min_calls &&
        std::chrono::duration<double>(Clock::now() - t0).count() >= min_time)
      break;
  }
  return {median(wall) * 1e6, *std::min_element(wall.begin(), wall.end()) * 1e6, median(cpu) * 1e6,
          static_cast<long>(wall.size())};
}

// ------------------------------------------------------------------------------------------ machine limits
/// One core's float FMA rate (GFLOP/s) and read bandwidth (GB/s) over a buffer of `bytes`:
/// machine_limits.hpp.
double peak_fma_gflops() {
  return bench_limits::peak_gflops<float>();
}
double read_bandwidth_gbps(double bytes) {
  return bench_limits::read_bandwidth_gbps(bytes);
}

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o + "\"";
}

}  // namespace

int main(int argc, char** argv) {
  std::string lib_dir, cpu_lib, only;
  int rounds = 5, first_round = 0;
  double min_time = 0.2;
  bool quick = false, limits = true;
  std::vector<int> thread_counts{1, 2};
  std::vector<std::pair<Index, Index>> prefill_arg;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "ggml_attention: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--lib-dir")
      lib_dir = next();
    else if (a == "--cpu-lib")
      cpu_lib = next();
    else if (a == "--rounds")
      rounds = std::atoi(next().c_str());
    else if (a == "--first-round")
      first_round = std::atoi(next().c_str());
    else if (a == "--min-time")
      min_time = std::atof(next().c_str());
    else if (a == "--only")
      only = next();
    else if (a == "--quick")
      quick = true;
    else if (a == "--no-limits")
      limits = false;
    else if (a == "--prefill-shapes") {
      std::stringstream ss(next());
      for (std::string bt; std::getline(ss, bt, ',');) {
        const size_t x = bt.find('x');
        prefill_arg.emplace_back(std::atol(bt.substr(0, x).c_str()), std::atol(bt.substr(x + 1).c_str()));
      }
    } else if (a == "--threads") {
      thread_counts.clear();
      std::stringstream ss(next());
      for (std::string t; std::getline(ss, t, ',');)
        thread_counts.push_back(std::atoi(t.c_str()));
    } else {
      std::fprintf(
          stderr,
          "usage: ggml_attention --lib-dir DIR [--cpu-lib PATH] [--rounds N] [--min-time S] "
          "[--first-round K] [--threads 1,2] [--prefill-shapes 8x1024,2x10] [--only REGEX] [--quick] "
          "[--no-limits]\n");
      return 2;
    }
  }
  if (lib_dir.empty() && cpu_lib.empty()) {
    std::fprintf(stderr, "ggml_attention: --lib-dir DIR (the folder with libggml-cpu-*.so) is required\n");
    return 2;
  }
  Eigen::setNbThreads(1);
  g_cpu = load_cpu(lib_dir, cpu_lib);
  std::fprintf(stderr, "ggml CPU library: %s (score %d)\n", g_cpu.path.c_str(), g_cpu.score);

  const std::vector<std::pair<Index, Index>> prefill_shapes =
      !prefill_arg.empty() ? prefill_arg
      : quick              ? std::vector<std::pair<Index, Index>>{{2, 10}}
                           : std::vector<std::pair<Index, Index>>{{8, 1024}, {2, 10}};
  const std::vector<Index> decode_h1 =
      quick ? std::vector<Index>{128} : std::vector<Index>{128, 512, 2048, 4096};
  const std::vector<Index> decode_h8 = quick ? std::vector<Index>{128} : std::vector<Index>{128, 512, 2048};
  Index max_len = 4096 + 1;
  for (auto [B, T] : prefill_shapes)
    max_len = std::max(max_len, T);

  Model m1(1, max_len), m8(8, max_len);
  std::vector<std::unique_ptr<GgmlGraph>> graphs;
  std::vector<Case> cases;
  std::ostringstream parity;
  bool first_parity = true;
  auto add_parity = [&](const std::string& name, const float* ggml_out, const Matrix& ours, double tol) {
    double max_abs = 0, max_ref = 0;
    for (Index i = 0; i < ours.size(); ++i) {
      max_abs = std::max(max_abs, double(std::fabs(ggml_out[i] - ours.data()[i])));
      max_ref = std::max(max_ref, double(std::fabs(ours.data()[i])));
    }
    const bool ok = max_abs <= tol * max_ref;
    std::fprintf(stderr,
                 "parity %-36s max|ggml - ours| = %.3g (max|ours| %.3g, %s, tolerance %.0e relative)\n",
                 name.c_str(), max_abs, max_ref, ok ? "ok" : "FAIL", tol);
    parity << (first_parity ? "" : ",\n  ") << "{\"case\": " << json_str(name)
           << ", \"max_abs_diff\": " << max_abs << ", \"max_abs_ours\": " << max_ref
           << ", \"tolerance_rel\": " << tol << ", \"ok\": " << (ok ? "true" : "false") << "}";
    first_parity = false;
  };
  const std::regex only_re(only.empty() ? ".*" : only);
  auto wanted = [&](const std::string& prefix) { return only.empty() || std::regex_search(prefix, only_re); };

  // ---------------------------------------------------------------- prefill
  struct PrefillOurs {
    std::unique_ptr<ha::PackedHeadAttention<float>> p1;
    std::unique_ptr<ha::PackedMultiHeadAttention<float>> p8;
    Matrix x, out;
    ha::Workspace<float> ws;
    Index B;
    void call() {
      if (p1)
        p1->forward_into(x, out, ws, ha::Batch(B));
      else
        p8->forward_into(x, out, ws, ha::Batch(B));
    }
  };
  std::vector<std::unique_ptr<PrefillOurs>> prefill_ours;
  for (Model* m : {&m1, &m8})
    for (auto [B, T] : prefill_shapes) {
      const std::string base =
          "prefill/h" + std::to_string(m->heads) + "/B" + std::to_string(B) + "_T" + std::to_string(T);
      if (!wanted(base)) continue;
      auto o = std::make_unique<PrefillOurs>();
      o->B = B;
      o->x = random_rows(B * T, kSeed + 1000 + static_cast<std::uint64_t>(T));
      const Index out_cols = m->heads == 1 ? kHead : kEmb;
      o->out.resize(B * T, out_cols);
      if (m->heads == 1)
        o->p1 = std::make_unique<ha::PackedHeadAttention<float>>(*m->head);
      else
        o->p8 = std::make_unique<ha::PackedMultiHeadAttention<float>>(*m->multi);
      PrefillOurs* op = o.get();
      op->call();
      const Matrix ours = op->out;
      for (int t : thread_counts) {
        Case c{base + "/ours/t" + std::to_string(t), "prefill", "ours", "f32", m->heads, t, B, T, 0};
        c.call = [op] { op->call(); };
        c.set_threads = [op](int n) {
          if (op->p1)
            op->p1->set_num_threads(n);
          else
            op->p8->set_num_threads(n);
        };
        cases.push_back(c);
      }
      for (bool flash : {true, false})
        for (ggml_type kv : {GGML_TYPE_F32, GGML_TYPE_F16}) {
          const std::string impl = flash ? "ggml_fa" : "ggml_mm", kvs = kv == GGML_TYPE_F32 ? "f32" : "f16";
          graphs.push_back(std::make_unique<GgmlGraph>());
          GgmlGraph* g = graphs.back().get();
          build_prefill(*g, *m, B, T, flash, kv, o->x);
          {
            Runner r(g, 1);
            r.run();
          }
          add_parity(base + "/" + impl + "/" + kvs, static_cast<const float*>(g->out->data), ours,
                     kv == GGML_TYPE_F32 ? 1e-4 : 1e-2);
          for (int t : thread_counts) {
            Case c{base + "/" + impl + "_" + kvs + "/t" + std::to_string(t),
                   "prefill",
                   impl,
                   kvs,
                   m->heads,
                   t,
                   B,
                   T,
                   0};
            auto runner = std::make_shared<std::unique_ptr<Runner>>();
            c.prepare = [runner, g, t] { *runner = std::make_unique<Runner>(g, t); };
            c.call = [runner] { (*runner)->run(); };
            c.finish = [runner] { runner->reset(); };
            cases.push_back(c);
          }
        }
      prefill_ours.push_back(std::move(o));
    }

  // ---------------------------------------------------------------- decode
  struct DecodeOurs {
    std::unique_ptr<ha::PackedHeadAttention<float>> p1;
    std::unique_ptr<ha::PackedMultiHeadAttention<float>> p8;
    std::unique_ptr<ha::KVCache<float>> c1;
    std::unique_ptr<ha::MultiHeadAttention<float>::Cache> c8;
    Matrix next, out;
    ha::Workspace<float> ws;
    Index n;
    void call() {
      if (p1) {
        p1->forward_cached_into(next, *c1, out, ws);
        c1->truncate(n);
      } else {
        p8->forward_cached_into(next, *c8, out, ws);
        c8->truncate(n);
      }
    }
  };
  std::vector<std::unique_ptr<DecodeOurs>> decode_ours;
  for (Model* m : {&m1, &m8})
    for (Index n : (m->heads == 1 ? decode_h1 : decode_h8)) {
      const std::string base = "decode/h" + std::to_string(m->heads) + "/n" + std::to_string(n);
      if (!wanted(base)) continue;
      const Matrix prompt = random_rows(n + 1, kSeed + 2000 + static_cast<std::uint64_t>(n));
      const Matrix next = prompt.bottomRows(1);
      // The prompt's K and V, [n, H·64], for ggml's caches: x Wkᵀ + bk (what our caches hold).
      const Index hd = m->heads * kHead;
      const Matrix pk = (prompt.topRows(n) * m->w_qkv.middleRows(hd, hd).transpose()).rowwise() +
                        m->b_qkv.segment(hd, hd).transpose();
      const Matrix pv = (prompt.topRows(n) * m->w_qkv.middleRows(2 * hd, hd).transpose()).rowwise() +
                        m->b_qkv.segment(2 * hd, hd).transpose();
      Matrix ours_out[2];
      for (int s = 0; s < 2; ++s) {
        const ha::Precision storage = s == 0 ? ha::Precision::float32 : ha::Precision::float16;
        auto o = std::make_unique<DecodeOurs>();
        o->n = n;
        o->next = next;
        o->out.resize(1, m->heads == 1 ? kHead : kEmb);
        if (m->heads == 1) {
          o->p1 = std::make_unique<ha::PackedHeadAttention<float>>(*m->head);
          o->c1 = std::make_unique<ha::KVCache<float>>(o->p1->make_cache(storage));
          o->c1->reserve();
          (void)o->p1->forward_cached(prompt.topRows(n), *o->c1);
          o->p1->reserve_cached_workspace(o->ws, *o->c1);
        } else {
          o->p8 = std::make_unique<ha::PackedMultiHeadAttention<float>>(*m->multi);
          o->c8 = std::make_unique<ha::MultiHeadAttention<float>::Cache>(o->p8->make_cache(1, storage));
          o->c8->reserve();
          (void)o->p8->forward_cached(prompt.topRows(n), *o->c8);
          o->p8->reserve_cached_workspace(o->ws, *o->c8);
        }
        DecodeOurs* op = o.get();
        op->call();
        ours_out[s] = op->out;
        const std::string kvs = s == 0 ? "f32" : "f16";
        for (int t : thread_counts) {
          Case c{
              base + "/ours_" + kvs + "/t" + std::to_string(t), "decode", "ours", kvs, m->heads, t, 0, 0, n};
          c.call = [op] { op->call(); };
          c.set_threads = [op](int k) {
            if (op->p1)
              op->p1->set_num_threads(k);
            else
              op->p8->set_num_threads(k);
          };
          cases.push_back(c);
        }
        decode_ours.push_back(std::move(o));
      }
      for (bool flash : {true, false})
        for (ggml_type kv : {GGML_TYPE_F32, GGML_TYPE_F16}) {
          const std::string impl = flash ? "ggml_fa" : "ggml_mm", kvs = kv == GGML_TYPE_F32 ? "f32" : "f16";
          graphs.push_back(std::make_unique<GgmlGraph>());
          GgmlGraph* g = graphs.back().get();
          build_decode(*g, *m, n, flash, kv, pk, pv, next);
          {
            Runner r(g, 1);
            r.run();
          }
          add_parity(base + "/" + impl + "/" + kvs, static_cast<const float*>(g->out->data),
                     ours_out[kv == GGML_TYPE_F32 ? 0 : 1], kv == GGML_TYPE_F32 ? 1e-4 : 1e-2);
          for (int t : thread_counts) {
            Case c{base + "/" + impl + "_" + kvs + "/t" + std::to_string(t),
                   "decode",
                   impl,
                   kvs,
                   m->heads,
                   t,
                   0,
                   0,
                   n};
            auto runner = std::make_shared<std::unique_ptr<Runner>>();
            c.prepare = [runner, g, t] { *runner = std::make_unique<Runner>(g, t); };
            c.call = [runner] { (*runner)->run(); };
            c.finish = [runner] { runner->reset(); };
            cases.push_back(c);
          }
        }
    }

  // ---------------------------------------------------------------- limits (before and after the rounds)
  std::ostringstream lim;
  auto measure_limits = [&](const char* when) {
    const double fma = peak_fma_gflops();
    const double bw_small = read_bandwidth_gbps(4.5 * 1024 * 1024),
                 bw_big = read_bandwidth_gbps(64.0 * 1024 * 1024);
    std::fprintf(
        stderr,
        "limits (%s): FMA peak %.1f GFLOP/s/core; read bandwidth %.1f GB/s (4.5 MiB), %.1f GB/s (64 MiB)\n",
        when, fma, bw_small, bw_big);
    lim << (lim.tellp() > 0 ? ", " : "") << "{\"when\": " << json_str(when)
        << ", \"peak_fma_gflops_1core\": " << fma << ", \"read_gbps_4_5MiB\": " << bw_small
        << ", \"read_gbps_64MiB\": " << bw_big << "}";
  };
  if (limits) measure_limits("before");

  // ---------------------------------------------------------------- rounds
  std::ostringstream res;
  bool first = true;
  const size_t nc = cases.size();
  for (int r = first_round; r < first_round + rounds; ++r) {
    std::fprintf(stderr, "round %d: %zu cases\n", r, nc);
    // Rotated by a different amount each round, and reversed on odd rounds.
    for (size_t k = 0; k < nc; ++k) {
      const size_t idx0 = (k + static_cast<size_t>(r) * (nc / 5 + 7)) % nc;
      const size_t idx = (r % 2) ? nc - 1 - idx0 : idx0;
      Case& c = cases[idx];
      if (c.set_threads) c.set_threads(c.threads);
      if (c.prepare) c.prepare();
      const bool big = c.step == "prefill" && c.T >= 1024;
      const Timing t = time_calls(c.call, big ? std::max(min_time, 0.3) : min_time, big ? 3 : 20, 200000);
      if (c.finish) c.finish();
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // let spinning pool threads go to sleep
      res << (first ? "" : ",\n  ") << "{\"round\": " << r << ", \"case\": " << json_str(c.name)
          << ", \"step\": " << json_str(c.step) << ", \"heads\": " << c.heads << ", \"B\": " << c.B
          << ", \"T\": " << c.T << ", \"n\": " << c.n << ", \"impl\": " << json_str(c.impl)
          << ", \"kv\": " << json_str(c.kv) << ", \"threads\": " << c.threads
          << ", \"median_us\": " << t.median_us << ", \"min_us\": " << t.min_us
          << ", \"cpu_median_us\": " << t.cpu_median_us << ", \"calls\": " << t.calls << "}";
      first = false;
    }
  }
  if (limits) measure_limits("after");

  std::printf("{\"ggml_cpu_library\": %s, \"ggml_cpu_score\": %d, \"ggml_cpu_scores\": {",
              json_str(g_cpu.path).c_str(), g_cpu.score);
  for (size_t i = 0; i < g_cpu.scores.size(); ++i)
    std::printf("%s%s: %d", i ? ", " : "", json_str(g_cpu.scores[i].first).c_str(), g_cpu.scores[i].second);
  std::printf(
      "},\n \"eigen_version\": \"%d.%d.%d\", \"simd_float_width\": %d, \"rounds\": %d, \"min_time\": %g,\n",
      EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION,
      int(Eigen::internal::unpacket_traits<Eigen::internal::packet_traits<float>::type>::size), rounds,
      min_time);
  std::printf(" \"limits\": [%s],\n \"parity\": [\n  %s],\n \"results\": [\n  %s]}\n", lim.str().c_str(),
              parity.str().c_str(), res.str().c_str());
  return 0;
}

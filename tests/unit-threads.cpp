// Thread counts: what num_threads() reports is what a call runs on (observed through the team size the kernel
// records), results do not depend on it, a call inside a parallel region forks no second team, and callers'
// own threads each get a team of their own.
#include <cstdint>
#include <thread>
#include <vector>

#include "test_support.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using namespace ha_test;

/// The team size of the last forward call made on this thread.
int observed_team() {
  return head_attention::detail::last_team_size();
}

}  // namespace

TEMPLATE_TEST_CASE("num_threads reports the thread count a call would run on", "[threads]", float, double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(8, 4, 16);
  layer.set_num_threads(3);
  if (!head_attention::detail::has_openmp) {
    CHECK(layer.num_threads() == 1);  // the setting is kept, but without OpenMP every call is serial
    layer.set_num_threads(0);
    CHECK(layer.num_threads() == 1);
    return;
  }
  CHECK(layer.num_threads() == 3);
  layer.set_num_threads(1);
  CHECK(layer.num_threads() == 1);
  layer.set_num_threads(0);
  CHECK(layer.num_threads() == Eigen::nbThreads());  // 0, the default, follows Eigen
  CHECK(layer.num_threads() >= 1);

  // The setting travels with a copy into BatchedHeadAttention.
  layer.set_num_threads(2);
  const head_attention::BatchedHeadAttention<Scalar> batched(layer);
  CHECK(batched.head().num_threads() == 2);
}

TEMPLATE_TEST_CASE("a large call runs on the threads set, with the same result on any count", "[threads]",
                   float, double) {
  using Scalar = TestType;
  if (!head_attention::detail::has_openmp) HA_SKIP("built without OpenMP: every call runs on one thread");
  struct Case {
    Index B, T, emb, head;
  };
  // Each well above the kernel's serial threshold (Tuning::serial_below_flops, 1e5 flops): the smallest,
  // B = 2, T = 1000, emb 16, head 8, is about 3e7.
  for (const Case& c : {Case{1, 700, 64, 32}, Case{4, 300, 32, 16}, Case{2, 1000, 16, 8}}) {
    const std::uint64_t seed = 500 + static_cast<std::uint64_t>(c.T);
    INFO("B " << c.B << ", T " << c.T << ", emb " << c.emb << ", head " << c.head << ", seed " << seed);
    head_attention::BatchedHeadAttention<Scalar> batched(c.emb, c.head, c.T, seed);
    const Tensor3<Scalar> x = random_tensor<Scalar>(c.B, c.T, c.emb, seed);

    batched.head().set_num_threads(1);
    const Tensor3<Scalar> serial = batched.forward(x);
    CHECK(observed_team() == 1);
    const Matrix<Scalar> serial_seq = batched.head().forward(sequence(x, 0));
    CHECK(observed_team() == 1);

    batched.head().set_num_threads(2);
    const Tensor3<Scalar> parallel = batched.forward(x);
    CHECK(observed_team() == 2);
    const Matrix<Scalar> parallel_seq = batched.head().forward(sequence(x, 0));
    CHECK(observed_team() == 2);

    // The work is split into the same items whatever the thread count, each computed in the same order.
    CHECK(max_abs_diff(parallel.data(), serial.data(), serial.size()) == 0);
    CHECK(identical(parallel_seq, serial_seq));
  }
}

TEMPLATE_TEST_CASE("a toy call stays on one thread", "[threads]", float, double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(8, 4, 16, 3);
  layer.set_num_threads(2);
  const Matrix<Scalar> x = random_matrix<Scalar>(4, 8, 4);  // about 1e3 flops, under the serial threshold
  (void)layer.forward(x);
  CHECK(observed_team() == 1);
}

#if defined(_OPENMP)
TEMPLATE_TEST_CASE("forward inside an OpenMP parallel region forks no second team", "[threads]", float,
                   double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(64, 32, 700, 10);
  layer.set_num_threads(2);
  const Matrix<Scalar> x = random_matrix<Scalar>(700, 64, 700);
  const Matrix<Scalar> expected = layer.forward(x);
  REQUIRE(observed_team() == 2);  // outside a region this call is parallel: the check below means something
  std::vector<Matrix<Scalar>> results(2);
  std::vector<int> teams(2, -1), reported(2, -1);
  int outer_team = 0;
#pragma omp parallel num_threads(2)
  {
    const std::size_t i = static_cast<std::size_t>(omp_get_thread_num());
#pragma omp single
    outer_team = omp_get_num_threads();
    reported[i] = layer.num_threads();
    results[i] = layer.forward(x);
    teams[i] = observed_team();
  }
  if (outer_team != 2) HA_SKIP("the OpenMP runtime gave the outer region " << outer_team << " thread(s)");
  for (std::size_t i = 0; i < 2; ++i) {
    INFO("outer thread " << i);
    CHECK(reported[i] == 1);
    CHECK(teams[i] == 1);
    CHECK(identical(results[i], expected));
  }
}

TEMPLATE_TEST_CASE("backward inside an OpenMP parallel region forks no second team", "[threads]", float,
                   double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(64, 32, 400, 12);
  layer.set_num_threads(2);
  const Matrix<Scalar> x = random_matrix<Scalar>(400, 64, 701);
  const Matrix<Scalar> grad_out = random_matrix<Scalar>(400, 32, 702);
  const head_attention::Gradients<Scalar> expected = layer.backward(x, grad_out);
  REQUIRE(observed_team() == 2);  // outside a region this call is parallel: the check below means something
  std::vector<head_attention::Gradients<Scalar>> results(2);
  std::vector<int> teams(2, -1);
  int outer_team = 0;
#pragma omp parallel num_threads(2)
  {
    const std::size_t i = static_cast<std::size_t>(omp_get_thread_num());
#pragma omp single
    outer_team = omp_get_num_threads();
    results[i] = layer.backward(x, grad_out);
    teams[i] = observed_team();
  }
  if (outer_team != 2) HA_SKIP("the OpenMP runtime gave the outer region " << outer_team << " thread(s)");
  for (std::size_t i = 0; i < 2; ++i) {
    INFO("outer thread " << i);
    CHECK(teams[i] == 1);
    CHECK(identical(results[i].input, expected.input));
    CHECK(identical(results[i].query.weight, expected.query.weight));
    CHECK(identical(results[i].key.weight, expected.key.weight));
    CHECK(identical(results[i].value.weight, expected.value.weight));
    CHECK(identical(results[i].value.bias, expected.value.bias));
  }
}
#endif

TEMPLATE_TEST_CASE("callers' own threads each get a team of the size set", "[threads]", float, double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(32, 16, 400, 9);
  std::vector<Matrix<Scalar>> inputs, expected;
  for (std::uint64_t i = 0; i < 4; ++i) {
    inputs.push_back(random_matrix<Scalar>(100 + 100 * static_cast<Index>(i), 32, 600 + i));
    expected.push_back(layer.forward(inputs.back()));
  }
  // set_num_threads(1) is how a caller that runs its own threads avoids oversubscription; with 2, each caller
  // forks its own team of 2 (4 callers: 8 threads on the cores), which is what the README warns about.
  for (const int setting : {1, 2}) {
    layer.set_num_threads(setting);
    const int expected_team = head_attention::detail::has_openmp ? setting : 1;
    std::vector<Matrix<Scalar>> results(inputs.size());
    std::vector<int> teams(inputs.size(), -1);
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < inputs.size(); ++i)
      threads.emplace_back([&, i] {
        int smallest = 1 << 30;
        for (int repeat = 0; repeat < 3; ++repeat) {
          results[i] = layer.forward(inputs[i]);
          smallest = std::min(smallest, observed_team());
        }
        teams[i] = smallest;
      });
    for (std::thread& t : threads)
      t.join();
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      INFO("setting " << setting << ", caller " << i);
      CHECK(teams[i] == expected_team);
      CHECK(identical(results[i], expected[i]));
    }
  }
}

namespace {

/// Every gradient of a head, side by side: [head, emb + 1] per projection (weight | bias), then dL/dx.
template <typename Scalar, typename Input>
Matrix<Scalar> flatten(const head_attention::HeadGradients<Scalar>& g, const Input& input) {
  const Index head = g.query.weight.rows(), emb = g.query.weight.cols();
  Matrix<Scalar> all(3 * head + input.rows(), std::max(emb + 1, input.cols()));
  all.setZero();
  Index row = 0;
  for (const head_attention::Linear<Scalar>* l : {&g.query, &g.key, &g.value}) {
    all.block(row, 0, head, emb) = l->weight;
    all.block(row, emb, head, 1) = l->bias;
    row += head;
  }
  all.block(row, 0, input.rows(), input.cols()) = input;
  return all;
}

/// What one caller computes: every forward and backward entry point on the shared layers, and a prefill
/// plus decode steps on caches of its own (the layers' and the packed forms').
template <typename Scalar>
struct Calls {
  Matrix<Scalar> single, padded, multi, decoded, multi_decoded, packed_single, packed_multi, packed_decoded,
      packed_multi_decoded;
  Matrix<Scalar> grad, grad_state, grad_padded, grad_multi;  // flattened gradients
  Tensor3<Scalar> batched;

  bool operator==(const Calls& o) const {
    return identical(single, o.single) && identical(padded, o.padded) && identical(multi, o.multi) &&
           identical(packed_single, o.packed_single) && identical(packed_multi, o.packed_multi) &&
           identical(decoded, o.decoded) && identical(multi_decoded, o.multi_decoded) &&
           identical(packed_decoded, o.packed_decoded) &&
           identical(packed_multi_decoded, o.packed_multi_decoded) && identical(grad, o.grad) &&
           identical(grad_state, o.grad_state) && identical(grad_padded, o.grad_padded) &&
           identical(grad_multi, o.grad_multi) && batched.size() == o.batched.size() &&
           max_abs_diff(batched.data(), o.batched.data(), batched.size()) == 0;
  }
};

template <typename Scalar>
struct Shared {
  static constexpr Index kEmb = 24, kHead = 8, kMax = 160;
  head_attention::HeadAttention<Scalar> layer{kEmb, kHead, kMax, 41};
  head_attention::BatchedHeadAttention<Scalar> batched{kEmb, kHead, kMax, 42};
  head_attention::MultiHeadAttention<Scalar> mha{3, kEmb, kHead, kMax, 0.1, 43};
  head_attention::PackedHeadAttention<Scalar> packed{layer};
  head_attention::PackedMultiHeadAttention<Scalar> packed_mha{mha};

  /// Caller i's inputs differ from caller j's, so that a result landing in the wrong caller's buffer shows.
  Calls<Scalar> run(std::uint64_t i) const {
    const Index T = 40 + 30 * static_cast<Index>(i % 4);
    const Matrix<Scalar> x = random_matrix<Scalar>(T, kEmb, 700 + i);
    Calls<Scalar> c;
    c.single = layer.forward(x);
    c.padded.resize(T, kHead);
    layer.forward_into(x, c.padded, Batch(2, std::vector<Index>{T / 2 - 3, T / 2}));
    c.batched = batched.forward(random_tensor<Scalar>(2, T, kEmb, 800 + i), std::vector<Index>{T, T - 5});
    c.multi = mha.forward(x);
    c.packed_single = packed.forward(x);
    c.packed_multi.resize(T, kEmb);
    packed_mha.forward_into(x, c.packed_multi);
    auto cache = layer.make_cache();
    c.decoded.resize(T, kHead);
    c.decoded.topRows(T - 4) = layer.forward_cached(x.topRows(T - 4), cache);
    for (Index r = T - 4; r < T; ++r)
      c.decoded.row(r) = layer.forward_cached(x.row(r), cache);
    auto multi_cache = mha.make_cache();
    c.multi_decoded.resize(T, kEmb);
    c.multi_decoded.topRows(T - 2) = mha.forward_cached(x.topRows(T - 2), multi_cache);
    c.multi_decoded.bottomRows(2) = mha.forward_cached(x.bottomRows(2), multi_cache);
    auto packed_cache = packed.make_cache();
    c.packed_decoded.resize(T, kHead);
    c.packed_decoded.topRows(T - 3) = packed.forward_cached(x.topRows(T - 3), packed_cache);
    for (Index r = T - 3; r < T; ++r)
      c.packed_decoded.row(r) = packed.forward_cached(x.row(r), packed_cache);
    auto packed_multi_cache = packed_mha.make_cache();
    c.packed_multi_decoded.resize(T, kEmb);
    c.packed_multi_decoded.topRows(T - 1) = packed_mha.forward_cached(x.topRows(T - 1), packed_multi_cache);
    c.packed_multi_decoded.bottomRows(1) = packed_mha.forward_cached(x.bottomRows(1), packed_multi_cache);
    // The backward passes: recomputing, from a training state, batched with padding, and multi-head.
    const Matrix<Scalar> g = random_matrix<Scalar>(T, kHead, 900 + i);
    const auto grads = layer.backward(x, g);  // Gradients<Scalar>
    c.grad = flatten(grads, grads.input);
    const auto from_state = layer.backward(x, g, layer.forward_training(x));
    c.grad_state = flatten(from_state, from_state.input);
    const auto padded = layer.backward(x, g, Batch(2, std::vector<Index>{T / 2 - 3, T / 2}));
    c.grad_padded = flatten(padded, padded.input);
    const head_attention::MultiHeadGradients<Scalar> multi =
        mha.backward(x, random_matrix<Scalar>(T, kEmb, 950 + i));
    c.grad_multi = flatten(multi.heads[1], multi.input);
    return c;
  }
};

}  // namespace

// The "const and may be called from many threads at once" of the class comments, checked: callers share one
// const module of each kind and each has its own inputs, outputs and caches. Run under ThreadSanitizer by CI
// (.ci/run, the tsan job, built without OpenMP: libgomp is not instrumented), where a data race fails the
// run.
TEMPLATE_TEST_CASE("many threads calling forward on shared const modules get the serial results",
                   "[threads][concurrency]", float, double) {
  using Scalar = TestType;
  const Shared<Scalar> shared;
  constexpr std::uint64_t callers = 6;
  std::vector<Calls<Scalar>> serial;
  for (std::uint64_t i = 0; i < callers; ++i)
    serial.push_back(shared.run(i));
  std::vector<Calls<Scalar>> concurrent(callers);
  std::vector<std::thread> threads;
  for (std::uint64_t i = 0; i < callers; ++i)
    threads.emplace_back([&, i] {
      for (int repeat = 0; repeat < 2; ++repeat)
        concurrent[i] = shared.run(i);
    });
  for (std::thread& t : threads)
    t.join();
  for (std::uint64_t i = 0; i < callers; ++i) {
    INFO("caller " << i);
    CHECK(concurrent[i] == serial[i]);
  }
}

TEMPLATE_TEST_CASE("multi-head, padded and cached results are bit-identical on 1 and 2 threads", "[threads]",
                   float, double) {
  using Scalar = TestType;
  if (!head_attention::detail::has_openmp) HA_SKIP("built without OpenMP: every call runs on one thread");
  constexpr Index B = 2, T = 400, emb = 32, head = 16;
  head_attention::MultiHeadAttention<Scalar> mha(4, emb, head, T, 0.1, 61);
  head_attention::HeadAttention<Scalar> layer(emb, head, T, 62);
  const Matrix<Scalar> x = random_matrix<Scalar>(B * T, emb, 63);
  const std::vector<Index> lengths = {T, 250};
  struct Results {
    Matrix<Scalar> multi, multi_padded, padded, decoded, multi_decoded;
    std::vector<int> teams;
  };
  const auto run = [&](int threads) {
    mha.set_num_threads(threads);
    layer.set_num_threads(threads);
    Results r;
    r.multi = mha.forward(x.topRows(T));
    r.teams.push_back(observed_team());
    r.multi_padded.resize(B * T, emb);
    mha.forward_into(x, r.multi_padded, Batch(B, lengths));
    r.teams.push_back(observed_team());
    r.padded.resize(B * T, head);
    layer.forward_into(x, r.padded, Batch(B, lengths));
    r.teams.push_back(observed_team());
    auto cache = layer.make_cache();
    r.decoded.resize(T, head);
    r.decoded.topRows(T - 1) = layer.forward_cached(x.topRows(T - 1), cache);
    r.teams.push_back(observed_team());
    r.decoded.bottomRows(1) = layer.forward_cached(x.row(T - 1), cache);
    auto multi_cache = mha.make_cache();
    r.multi_decoded.resize(T, emb);
    r.multi_decoded.topRows(T - 1) = mha.forward_cached(x.topRows(T - 1), multi_cache);
    r.teams.push_back(observed_team());
    r.multi_decoded.bottomRows(1) = mha.forward_cached(x.row(T - 1), multi_cache);
    return r;
  };
  const Results one = run(1), two = run(2);
  // Every large call did run on the team asked for: the comparison below compares 1 thread with 2.
  CHECK(one.teams == std::vector<int>(5, 1));
  CHECK(two.teams == std::vector<int>(5, 2));
  CHECK(identical(one.multi, two.multi));
  CHECK(identical(one.multi_padded, two.multi_padded));
  CHECK(identical(one.padded, two.padded));
  CHECK(identical(one.decoded, two.decoded));
  CHECK(identical(one.multi_decoded, two.multi_decoded));
}

// The default thread policy (set_num_threads(0)): a call below Tuning::default_serial_below_flops, every
// decode step of one sequence, stays on one thread (on cores shared with other processes a team's barriers
// can each wait out a scheduler slice); an explicit count is honoured for it; a prefill still forks.
TEMPLATE_TEST_CASE("on the default thread count a decode step is serial and a prefill forks", "[threads]",
                   float, double) {
  using Scalar = TestType;
  using Packed = head_attention::PackedMultiHeadAttention<Scalar>;
  constexpr Index emb = 512, head = 64, heads = 8, n = 512;
  head_attention::HeadAttention<Scalar> layer(emb, head, n + 1, 70);
  head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, n + 1, 0.1, 71);
  const Packed packed_mha(mha);
  const Matrix<Scalar> x = random_matrix<Scalar>(n + 1, emb, 72);
  const bool forks = head_attention::detail::has_openmp && Eigen::nbThreads() > 1;

  layer.set_num_threads(0);
  auto cache = layer.make_cache();
  (void)layer.forward_cached(x.topRows(n), cache);  // a prefill of 512 rows: about 2e8 flops
  CHECK(observed_team() == (forks ? std::min(Eigen::nbThreads(), layer.num_threads()) : 1));
  CHECK((observed_team() > 1) == forks);
  const Matrix<Scalar> step_default = layer.forward_cached(x.row(n), cache);
  CHECK(observed_team() == 1);
  cache.truncate(n);
  layer.set_num_threads(2);
  const Matrix<Scalar> step_two = layer.forward_cached(x.row(n), cache);
  CHECK(observed_team() == (head_attention::detail::has_openmp ? 2 : 1));
  CHECK(identical(step_default, step_two));

  auto multi_cache = packed_mha.make_cache();
  Matrix<Scalar> prompt_out(n, emb), step(1, emb), step_again(1, emb);
  head_attention::Workspace<Scalar> workspace;
  Packed frozen = packed_mha;
  frozen.set_num_threads(0);
  frozen.forward_cached_into(x.topRows(n), multi_cache, prompt_out, workspace);
  CHECK((observed_team() > 1) == forks);
  frozen.forward_cached_into(x.row(n), multi_cache, step, workspace);
  CHECK(observed_team() == 1);
  multi_cache.truncate(n);
  frozen.set_num_threads(2);
  frozen.forward_cached_into(x.row(n), multi_cache, step_again, workspace);
  CHECK(observed_team() == (head_attention::detail::has_openmp ? 2 : 1));
  CHECK(identical(step, step_again));
}

// Decode steps cut into key ranges (flash-decoding): the cut follows the number of keys, heads and sequences,
// never the thread count, so 1 and 2 threads give the same bits; on every form, batched, with a sliding
// window and a 16-bit cache.
TEMPLATE_TEST_CASE("decode steps cut into key ranges are bit-identical on 1 and 2 threads",
                   "[threads][split]", float, double) {
  using Scalar = TestType;
  using head_attention::MaskRule;
  if (!head_attention::detail::has_openmp) HA_SKIP("built without OpenMP: every call runs on one thread");
  constexpr Index emb = 64, head = 32, heads = 3, n = 1500, B = 3;
  std::vector<head_attention::Precision> storages = {head_attention::precision_of<Scalar>()};
  if (std::is_same<Scalar, float>::value) storages.push_back(head_attention::Precision::bfloat16);
  for (const MaskRule& rule : {MaskRule::causal(), MaskRule::sliding_window(900)})
    for (const head_attention::Precision storage : storages) {
      INFO("rule " << rule.name() << ", storage " << head_attention::precision_name(storage));
      head_attention::HeadAttention<Scalar> layer(emb, head, n + 2, 80, rule);
      head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, n + 2, 0.1, 81);
      mha.set_mask_rule(rule);
      const head_attention::PackedHeadAttention<Scalar> packed(layer);
      const Matrix<Scalar> x = random_matrix<Scalar>(B * (n + 2), emb, 82);
      const Matrix<Scalar> prompt = x.topRows(B * n), next = x.bottomRows(B), next1 = x.bottomRows(1);
      struct Steps {
        Matrix<Scalar> single, second, batched, multi, packed;
        std::vector<int> teams;
      };
      const auto run = [&](int threads) {
        layer.set_num_threads(threads);
        mha.set_num_threads(threads);
        head_attention::PackedHeadAttention<Scalar> p = packed;
        p.set_num_threads(threads);
        Steps s;
        auto cache = layer.make_cache(storage);
        (void)layer.forward_cached(prompt.topRows(n), cache);
        s.single = layer.forward_cached(next1, cache);
        s.teams.push_back(observed_team());
        s.second = layer.forward_cached(next1, cache);  // one key more: the ranges move
        s.teams.push_back(observed_team());
        auto caches = layer.make_cache(B, storage);
        (void)layer.forward_cached(prompt, caches);
        s.batched = layer.forward_cached(next, caches);
        s.teams.push_back(observed_team());
        auto multi_cache = mha.make_cache(storage);
        (void)mha.forward_cached(prompt.topRows(n), multi_cache);
        s.multi = mha.forward_cached(next1, multi_cache);
        s.teams.push_back(observed_team());
        auto packed_cache = p.make_cache(storage);
        (void)p.forward_cached(prompt.topRows(n), packed_cache);
        s.packed = p.forward_cached(next1, packed_cache);
        s.teams.push_back(observed_team());
        return s;
      };
      const Steps one = run(1), two = run(2);
      CHECK(one.teams == std::vector<int>(5, 1));
      CHECK(two.teams == std::vector<int>(5, 2));  // every step did fork: the comparison means something
      CHECK(identical(one.single, two.single));
      CHECK(identical(one.second, two.second));
      CHECK(identical(one.batched, two.batched));
      CHECK(identical(one.multi, two.multi));
      CHECK(identical(one.packed, two.packed));
      CHECK(identical(one.packed, one.single));  // the packed form decodes as its layer
    }
}

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

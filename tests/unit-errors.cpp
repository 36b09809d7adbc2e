// Every bad input is refused with head_attention::shape_error (an std::invalid_argument) whose message names
// the quantity, the expected and the actual value, and a failed call leaves the object as it was.
#include <algorithm>
#include <array>
#include <initializer_list>
#include <string>

#include "test_support.hpp"

namespace {

using namespace ha_test;

constexpr Index kEmb = 13;
constexpr Index kHead = 7;
constexpr Index kMax = 20;

template <typename Scalar>
struct Setup {
  head_attention::HeadAttention<Scalar> layer{kEmb, kHead, kMax, 11};
  Matrix<Scalar> x = random_matrix<Scalar>(kMax, kEmb, 12);    // a valid [T, emb] input
  Tensor3<Scalar> xb = random_tensor<Scalar>(2, 9, kEmb, 13);  // a valid [B, T, emb] input
  Matrix<Scalar> out = layer.forward(x);                       // its output before any failed call
  Tensor3<Scalar> outb = head_attention::BatchedHeadAttention<Scalar>(layer).forward(xb);

  /// The layer still has its sizes and gives the same results as before the failed call.
  void check_unchanged(const head_attention::HeadAttention<Scalar>& l) const {
    CHECK(l.emb_size() == kEmb);
    CHECK(l.head_size() == kHead);
    CHECK(l.max_seq_len() == kMax);
    CHECK(identical(l.forward(x), out));
  }
  void check_unchanged(const head_attention::BatchedHeadAttention<Scalar>& b) const {
    check_unchanged(b.head());
    const Tensor3<Scalar> again = b.forward(xb);
    CHECK(max_abs_diff(again.data(), outb.data(), outb.size()) == 0);
  }
};

}  // namespace

TEMPLATE_TEST_CASE("HeadAttention::forward: T > max_seq_len", "[errors][bad-input]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const Matrix<Scalar> too_long = random_matrix<Scalar>(kMax + 1, kEmb, 1);
  check_shape_error([&] { (void)s.layer.forward(too_long); },
                    {"HeadAttention::forward", "T", "max_seq_len = 20", "got 21"});
  const ColMatrix<Scalar> much_too_long = random_matrix<Scalar>(3 * kMax, kEmb, 2);
  check_shape_error([&] { (void)s.layer.forward(much_too_long); }, {"T", "max_seq_len = 20", "got 60"});
  s.check_unchanged(s.layer);
}

TEMPLATE_TEST_CASE("BatchedHeadAttention::forward: T > max_seq_len", "[errors][bad-input]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const head_attention::BatchedHeadAttention<Scalar> batched(s.layer);
  Tensor3<Scalar> too_long = random_tensor<Scalar>(2, kMax + 1, kEmb, 3);
  check_shape_error([&] { (void)batched.forward(too_long); },
                    {"BatchedHeadAttention::forward", "x.dimension(1)", "T", "max_seq_len = 20", "got 21"});
  const Eigen::TensorMap<const Tensor3<Scalar>> map(too_long.data(), 2, kMax + 1, kEmb);
  check_shape_error([&] { (void)batched.forward(map); }, {"x.dimension(1)", "max_seq_len = 20", "got 21"});
  const Eigen::TensorMap<Tensor3<Scalar>> mutable_map(too_long.data(), 2, kMax + 1, kEmb);
  check_shape_error([&] { (void)batched.forward(mutable_map); },
                    {"x.dimension(1)", "max_seq_len = 20", "got 21"});
  s.check_unchanged(batched);
}

TEMPLATE_TEST_CASE("tril_mask: T outside 0 to max_seq_len", "[errors][bad-input]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  check_shape_error([&] { (void)s.layer.tril_mask(kMax + 1); },
                    {"HeadAttention::tril_mask", "T", "max_seq_len = 20", "got 21"});
  check_shape_error([&] { (void)s.layer.tril_mask(-1); }, {"tril_mask", "T", "max_seq_len = 20", "got -1"});
  CHECK(s.layer.tril_mask(kMax).rows() == kMax);
  s.check_unchanged(s.layer);
}

TEMPLATE_TEST_CASE("HeadAttention::forward: input width != emb_size", "[errors][bad-input]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  for (const Index width : {kEmb - 1, kEmb + 1, Index(0), Index(1)}) {
    INFO("width " << width);
    const Matrix<Scalar> x = random_matrix<Scalar>(5, width, 4);
    check_shape_error([&] { (void)s.layer.forward(x); }, {"HeadAttention::forward", "x.cols()",
                                                          "emb_size = 13", "got " + std::to_string(width)});
  }
  // Also when there are no rows, or too many rows as well (either complaint will do).
  const Matrix<Scalar> empty(0, kEmb + 2);
  check_shape_error([&] { (void)s.layer.forward(empty); }, {"x.cols()", "emb_size = 13", "got 15"});
  const Matrix<Scalar> both_wrong = random_matrix<Scalar>(kMax + 1, kEmb + 1, 5);
  check_shape_error([&] { (void)s.layer.forward(both_wrong); }, {"HeadAttention::forward", "got"});
  s.check_unchanged(s.layer);
}

TEMPLATE_TEST_CASE("BatchedHeadAttention::forward: input width != emb_size", "[errors][bad-input]", float,
                   double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const head_attention::BatchedHeadAttention<Scalar> batched(s.layer);
  for (const Index width : {kEmb - 1, kEmb + 1, Index(1)}) {
    INFO("width " << width);
    Tensor3<Scalar> x = random_tensor<Scalar>(3, 4, width, 6);
    const std::string got = "got " + std::to_string(width);
    check_shape_error([&] { (void)batched.forward(x); },
                      {"BatchedHeadAttention::forward", "x.dimension(2)", "emb_size = 13", got});
    const Eigen::TensorMap<const Tensor3<Scalar>> map(x.data(), 3, 4, width);
    check_shape_error([&] { (void)batched.forward(map); }, {"x.dimension(2)", "emb_size = 13", got});
  }
  // Empty batches are checked too.
  const Tensor3<Scalar> empty(0, 4, kEmb - 2);
  check_shape_error([&] { (void)batched.forward(empty); }, {"x.dimension(2)", "emb_size = 13", "got 11"});
  s.check_unchanged(batched);
}

namespace {

/// Both constructors must reject `bad` as the size called `name`; make(bad) gives the (emb, head, max)
/// triple.
template <typename Scalar, typename Sizes>
void check_constructors_reject(const char* name, std::initializer_list<Index> bads, Sizes make) {
  for (const Index bad : bads) {
    INFO(name << " " << bad);
    const std::string got = "got " + std::to_string(bad);
    const std::array<Index, 3> sizes = make(bad);  // not a structured binding: lambdas below capture it
    const Index emb = sizes[0], head = sizes[1], max = sizes[2];
    check_shape_error([&] { head_attention::HeadAttention<Scalar> l(emb, head, max); }, {name, "> 0", got});
    check_shape_error([&] { head_attention::BatchedHeadAttention<Scalar> l(emb, head, max); },
                      {name, "> 0", got});
  }
}

}  // namespace

TEMPLATE_TEST_CASE("constructor: emb_size <= 0", "[errors][bad-input]", float, double) {
  check_constructors_reject<TestType>("emb_size", {0, -1, -13}, [](Index bad) {
    return std::array<Index, 3>{bad, kHead, kMax};
  });
}

TEMPLATE_TEST_CASE("constructor: head_size <= 0", "[errors][bad-input]", float, double) {
  check_constructors_reject<TestType>("head_size", {0, -1, -7}, [](Index bad) {
    return std::array<Index, 3>{kEmb, bad, kMax};
  });
}

TEMPLATE_TEST_CASE("constructor: max_seq_len <= 0", "[errors][bad-input]", float, double) {
  check_constructors_reject<TestType>("max_seq_len", {0, -1, -20}, [](Index bad) {
    return std::array<Index, 3>{kEmb, kHead, bad};
  });
}

TEMPLATE_TEST_CASE("weight of the wrong shape set through query or key or value", "[errors][bad-input]",
                   float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  struct Bad {
    Index rows, cols;
  };
  for (const char* which : {"query()", "key()", "value()"}) {
    for (const Bad bad : {Bad{kHead, kEmb - 1}, Bad{kHead + 1, kEmb}, Bad{kEmb, kHead}, Bad{0, 0}}) {
      INFO(which << ".weight set to [" << bad.rows << ", " << bad.cols << "]");
      head_attention::HeadAttention<Scalar> layer = s.layer;
      head_attention::Linear<Scalar>& linear = std::string(which) == "query()" ? layer.query()
                                               : std::string(which) == "key()" ? layer.key()
                                                                               : layer.value();
      const Matrix<Scalar> good = linear.weight;
      linear.weight = Matrix<Scalar>::Ones(bad.rows, bad.cols);  // accepted now, refused at the next call
      const std::string expected = "[" + std::to_string(kHead) + ", " + std::to_string(kEmb) + "]";
      const std::string got = "got [" + std::to_string(bad.rows) + ", " + std::to_string(bad.cols) + "]";
      check_shape_error([&] { (void)layer.forward(s.x); },
                        {"HeadAttention::forward", std::string(which) + ".weight shape", expected, got});
      const head_attention::BatchedHeadAttention<Scalar> batched(layer);
      check_shape_error(
          [&] { (void)batched.forward(s.xb); },
          {"BatchedHeadAttention::forward", std::string(which) + ".weight shape", expected, got});
      // The failed call changed nothing: the bad weight is still there, and putting the good one back gives
      // the original results.
      CHECK(linear.weight.rows() == bad.rows);
      CHECK(linear.weight.cols() == bad.cols);
      linear.weight = good;
      s.check_unchanged(layer);
    }
  }
}

TEMPLATE_TEST_CASE("bias of the wrong size set through query or key or value", "[errors][bad-input]", float,
                   double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  for (const char* which : {"query()", "key()", "value()"}) {
    for (const Index bad : {kHead - 1, kHead + 1, kEmb, Index(0)}) {
      INFO(which << ".bias set to size " << bad);
      head_attention::HeadAttention<Scalar> layer = s.layer;
      head_attention::Linear<Scalar>& linear = std::string(which) == "query()" ? layer.query()
                                               : std::string(which) == "key()" ? layer.key()
                                                                               : layer.value();
      const auto good = linear.bias;
      linear.bias = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>::Ones(bad);
      const std::string got = "got " + std::to_string(bad);
      check_shape_error([&] { (void)layer.forward(s.x); },
                        {"HeadAttention::forward", std::string(which) + ".bias size", "must be 7", got});
      const head_attention::BatchedHeadAttention<Scalar> batched(layer);
      check_shape_error(
          [&] { (void)batched.forward(s.xb); },
          {"BatchedHeadAttention::forward", std::string(which) + ".bias size", "must be 7", got});
      CHECK(linear.bias.size() == bad);
      linear.bias = good;
      s.check_unchanged(layer);
    }
  }
}

TEMPLATE_TEST_CASE("set_num_threads: a negative count", "[errors][bad-input]", float, double) {
  using Scalar = TestType;
  Setup<Scalar> s;
  s.layer.set_num_threads(2);
  const int before = s.layer.num_threads();  // 2, or 1 without OpenMP
  for (const int bad : {-1, -8}) {
    INFO("set_num_threads(" << bad << ")");
    check_shape_error(
        [&] { s.layer.set_num_threads(bad); },
        {"HeadAttention::set_num_threads", "thread count", ">= 0", "got " + std::to_string(bad)});
    CHECK(s.layer.num_threads() == before);  // the old setting stays
  }
  s.check_unchanged(s.layer);
}

TEMPLATE_TEST_CASE("forward_into: bad output shapes and batch counts", "[errors][bad-input]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const Scalar sentinel = Scalar(-12345);
  for (const auto& shape : {std::array<Index, 2>{kMax - 1, kHead}, std::array<Index, 2>{kMax, kHead + 1},
                            std::array<Index, 2>{kMax, kHead - 1}, std::array<Index, 2>{0, 0}}) {
    Matrix<Scalar> out = Matrix<Scalar>::Constant(shape[0], shape[1], sentinel);
    const std::string got = "got [" + std::to_string(shape[0]) + ", " + std::to_string(shape[1]) + "]";
    INFO("out " << got);
    check_shape_error([&] { s.layer.forward_into(s.x, out); },
                      {"HeadAttention::forward_into", "out shape", "[20, 7]", got});
    CHECK((out.array() == sentinel).all());  // never touched
  }

  Matrix<Scalar> out = Matrix<Scalar>::Constant(kMax, kHead, sentinel);
  check_shape_error([&] { s.layer.forward_into(s.x, out, Batch(-1)); },
                    {"HeadAttention::forward_into", "batch", ">= 0", "got -1"});
  check_shape_error([&] { s.layer.forward_into(s.x, out, Batch(3)); },
                    {"HeadAttention::forward_into", "x.rows()", "a multiple of batch = 3", "got 20"});
  check_shape_error([&] { s.layer.forward_into(s.x, out, Batch(0)); },
                    {"HeadAttention::forward_into", "x.rows()", "batch = 0", "got 20"});
  // T is x.rows() / batch: 40 rows as one sequence are too long, as two they are fine.
  const Matrix<Scalar> two = random_matrix<Scalar>(2 * kMax, kEmb, 14);
  Matrix<Scalar> out_two = Matrix<Scalar>::Constant(2 * kMax, kHead, sentinel);
  check_shape_error([&] { s.layer.forward_into(two, out_two); },
                    {"HeadAttention::forward_into", "T", "max_seq_len = 20", "got 40"});
  const Matrix<Scalar> narrow = random_matrix<Scalar>(kMax, kEmb - 1, 15);
  check_shape_error([&] { s.layer.forward_into(narrow, out); },
                    {"HeadAttention::forward_into", "input width", "emb_size = 13", "got 12"});
  CHECK((out.array() == sentinel).all());
  CHECK((out_two.array() == sentinel).all());
  s.layer.forward_into(two, out_two, Batch(2));  // the same storage, used rightly
  CHECK(out_two.allFinite());
  s.check_unchanged(s.layer);
}

TEMPLATE_TEST_CASE("reference::forward: mismatched shapes", "[errors][bad-input]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const auto& l = s.layer;
  const Matrix<Scalar> narrow = random_matrix<Scalar>(4, kEmb - 1, 7);
  check_shape_error([&] { (void)head_attention::reference::forward(narrow, l.query(), l.key(), l.value()); },
                    {"reference::forward", "x.cols()", "13", "got 12"});
  head_attention::Linear<Scalar> bad_key = l.key();
  bad_key.weight = Matrix<Scalar>::Zero(kHead, kEmb + 1);
  check_shape_error([&] { (void)head_attention::reference::forward(s.x, l.query(), bad_key, l.value()); },
                    {"reference::forward", "key.weight shape", "[7, 13]", "got [7, 14]"});
  head_attention::Linear<Scalar> bad_value = l.value();
  bad_value.bias = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>::Zero(kHead - 2);
  check_shape_error([&] { (void)head_attention::reference::forward(s.x, l.query(), l.key(), bad_value); },
                    {"reference::forward", "value.bias size", "7", "got 5"});
}

// ---------------------------------------------------------------------------------------------------------
// Sizes whose products overflow, padding lengths, caches and workspaces: each refused call leaves the layer,
// the output buffer, the caches (their size and their contents: decoding continues bit for bit as if the call
// had not been made) and the workspace as they were.

TEMPLATE_TEST_CASE("constructors: sizes whose products overflow Index", "[errors][bad-input]", float,
                   double) {
  using Scalar = TestType;
  const Index huge = Index(1) << 40;
  // Refused before anything is allocated: 2^40 · 2^40 elements would overflow, not just fail to allocate.
  check_shape_error([&] { head_attention::HeadAttention<Scalar> l(huge, huge, 4); },
                    {"HeadAttention", "emb_size * head_size * element size", "at most",
                     "got 1099511627776 * "
                     "1099511627776 * "});
  check_shape_error([&] { head_attention::HeadAttention<Scalar> l(4, huge, huge); },
                    {"HeadAttention", "max_seq_len * 3 * head_size", "at most"});
  check_shape_error([&] { head_attention::BatchedHeadAttention<Scalar> l(huge, huge, 4); },
                    {"HeadAttention", "emb_size * head_size"});
  check_shape_error([&] { head_attention::MultiHeadAttention<Scalar> l(huge, 4, huge, 4); },
                    {"MultiHeadAttention", "num_heads * max_seq_len * 3 * head_size"});
  check_shape_error(
      [&] { head_attention::MultiHeadAttention<Scalar> l(Index(1) << 31, Index(1) << 31, 4, 4); },
      {"MultiHeadAttention", "num_heads * head_size * emb_size"});
  // Large but addressable sizes are accepted (nothing is allocated for max_seq_len until it is used).
  const head_attention::HeadAttention<Scalar> long_context(4, 2, Index(1) << 40);
  CHECK(long_context.max_seq_len() == Index(1) << 40);
  auto cache = long_context.make_cache();
  CHECK(cache.capacity() == 0);
}

TEMPLATE_TEST_CASE("padding lengths: wrong count, negative, past T", "[errors][bad-input]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const head_attention::BatchedHeadAttention<Scalar> batched(s.layer);
  const head_attention::MultiHeadAttention<Scalar> mha(2, kEmb, kHead, kMax, 0.1, 31);
  const Matrix<Scalar> x = random_matrix<Scalar>(18, kEmb, 32);  // 2 sequences of 9
  const Scalar sentinel = Scalar(-7);
  Matrix<Scalar> out = Matrix<Scalar>::Constant(18, kHead, sentinel);
  Matrix<Scalar> out_mha = Matrix<Scalar>::Constant(18, kEmb, sentinel);
  struct Bad {
    std::vector<Index> lengths;
    std::vector<std::string> parts;
  };
  const Bad bads[] = {{{9}, {"lengths.size()", "batch = 2", "got 1"}},
                      {{9, 9, 9}, {"lengths.size()", "batch = 2", "got 3"}},
                      {{9, -1}, {"lengths[1]", "in [0, T = 9]", "got -1"}},
                      {{10, 3}, {"lengths[0]", "in [0, T = 9]", "got 10"}}};
  for (const Bad& bad : bads) {
    INFO("lengths of size " << bad.lengths.size());
    const auto expect = [&](const char* where, auto&& call) {
      const std::string message = shape_error_message(call);
      CHECK(message.find(where) != std::string::npos);
      for (const std::string& part : bad.parts) {
        INFO("message " << message << " should contain " << part);
        CHECK(message.find(part) != std::string::npos);
      }
    };
    expect("HeadAttention::forward_into", [&] { s.layer.forward_into(x, out, Batch(2, bad.lengths)); });
    expect("BatchedHeadAttention::forward", [&] { (void)batched.forward(s.xb, bad.lengths); });
    expect("MultiHeadAttention::forward_into", [&] { mha.forward_into(x, out_mha, Batch(2, bad.lengths)); });
    CHECK_THROWS_AS(mha.forward(s.xb, bad.lengths), std::invalid_argument);
  }
  CHECK((out.array() == sentinel).all());
  CHECK((out_mha.array() == sentinel).all());
  s.check_unchanged(batched);
}

namespace {

/// Decodes x's rows [from, to) one at a time into `cache`, returning the outputs.
template <typename Layer, typename Scalar, typename Cache>
Matrix<Scalar> decode(const Layer& layer, const Matrix<Scalar>& x, Index from, Index to, Cache& cache) {
  Matrix<Scalar> out;
  for (Index r = from; r < to; ++r) {
    const Matrix<Scalar> step = layer.forward_cached(x.row(r), cache);
    out.conservativeResize(r - from + 1, step.cols());
    out.row(r - from) = step.row(0);
  }
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("refused decode steps leave the cache's contents as they were",
                   "[errors][bad-input][cache]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const Matrix<Scalar>& x = s.x;  // [20, 13], max_seq_len 20
  auto cache = s.layer.make_cache(), twin = s.layer.make_cache();
  (void)s.layer.forward_cached(x.topRows(12), cache);
  (void)s.layer.forward_cached(x.topRows(12), twin);
  const Index capacity = cache.capacity();

  check_shape_error([&] { (void)s.layer.forward_cached(x.topRows(9), cache); },
                    {"HeadAttention::forward_cached", "cache.size() + t", "max_seq_len = 20", "12 + 9"});
  check_shape_error([&] { (void)s.layer.forward_cached(Matrix<Scalar>(1, kEmb + 1), cache); },
                    {"HeadAttention::forward_cached", "input width", "got 14"});
  // forward_cached_into: a wrong output shape, then one bad cache among good ones; the good ones stay.
  std::vector<head_attention::KVCache<Scalar>> caches = {cache, cache};
  Matrix<Scalar> out = Matrix<Scalar>::Constant(2, kHead + 1, Scalar(5));
  check_shape_error([&] { s.layer.forward_cached_into(x.middleRows(12, 2), caches, out); },
                    {"HeadAttention::forward_cached_into", "out shape", "[2, 7]", "got [2, 8]"});
  CHECK((out.array() == Scalar(5)).all());
  caches.push_back(head_attention::HeadAttention<Scalar>(kEmb, kHead, kMax - 1).make_cache());
  Matrix<Scalar> out3 = Matrix<Scalar>::Constant(3, kHead, Scalar(5));
  check_shape_error(
      [&] { s.layer.forward_cached_into(x.middleRows(12, 3), caches, out3); },
      {"HeadAttention::forward_cached_into", "caches[2] sizes", "(13, 7, 20)", "got (13, 7, 19)"});
  CHECK((out3.array() == Scalar(5)).all());
  CHECK(caches[0].size() == 12);
  CHECK(caches[1].size() == 12);
  check_shape_error(
      [&] { s.layer.forward_cached_into(x.middleRows(12, 4), caches, out3); },
      {"HeadAttention::forward_cached_into", "x.rows()", "a multiple of the number of caches = 3", "got 4"});
  CHECK(cache.size() == 12);
  CHECK(cache.capacity() == capacity);
  // Bit for bit the twin's continuation: nothing stored by the refused calls.
  CHECK(identical(decode(s.layer, x, 12, kMax, cache), decode(s.layer, x, 12, kMax, twin)));
  CHECK(identical(decode(s.layer, x, 12, kMax, caches[0]), decode(s.layer, x, 12, kMax, caches[1])));
  s.check_unchanged(s.layer);
}

TEMPLATE_TEST_CASE("MultiHeadAttention: refused decode steps and bad cache batches",
                   "[errors][bad-input][cache]", float, double) {
  using Scalar = TestType;
  const head_attention::MultiHeadAttention<Scalar> mha(3, kEmb, kHead, kMax, 0.1, 33);
  const Matrix<Scalar> x = random_matrix<Scalar>(kMax, kEmb, 34);
  check_shape_error([&] { (void)mha.make_cache(-2); }, {"MultiHeadAttention::make_cache", "batch", "got -2"});
  auto cache = mha.make_cache(), twin = mha.make_cache();
  (void)mha.forward_cached(x.topRows(5), cache);
  (void)mha.forward_cached(x.topRows(5), twin);
  // Two sequences given to a cache of one, as a tensor and as stacked rows of the wrong count.
  const Tensor3<Scalar> two = random_tensor<Scalar>(2, 1, kEmb, 35);
  check_shape_error([&] { (void)mha.forward_cached(two, cache); },
                    {"MultiHeadAttention::forward_cached", "x.dimension(0) (B)", "batch = 1", "got 2"});
  auto pair = mha.make_cache(2);
  check_shape_error([&] { (void)mha.forward_cached(x.topRows(3), pair); },
                    {"MultiHeadAttention::forward_cached", "x.rows()", "cache's batch = 2", "got 3"});
  CHECK(pair.size() == 0);
  check_shape_error([&] { (void)mha.forward_cached(x, cache); }, {"cache.size() + t", "5 + 20"});
  check_shape_error([&] { cache.truncate(6); }, {"KVCache::truncate", "in [0, size() = 5]", "got 6"});
  CHECK(cache.size() == 5);
  CHECK(
      identical(mha.forward_cached(x.middleRows(5, 3), cache), mha.forward_cached(x.middleRows(5, 3), twin)));
}

TEMPLATE_TEST_CASE("forward_into with a Workspace: bad shapes leave the output and the workspace",
                   "[errors][bad-input][workspace]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const head_attention::MultiHeadAttention<Scalar> mha(2, kEmb, kHead, kMax, 0.1, 36);
  head_attention::Workspace<Scalar> workspace;
  Matrix<Scalar> out(kMax, kHead), out_mha(kMax, kEmb);
  s.layer.forward_into(s.x, out, workspace);
  mha.forward_into(s.x, out_mha, workspace);
  const std::size_t bytes = workspace.bytes();
  const Matrix<Scalar> good = out, good_mha = out_mha;
  Matrix<Scalar> wrong = Matrix<Scalar>::Constant(kMax, kHead - 1, Scalar(9));
  check_shape_error([&] { s.layer.forward_into(s.x, wrong, workspace); },
                    {"HeadAttention::forward_into", "out shape", "[20, 7]", "got [20, 6]"});
  check_shape_error([&] { s.layer.forward_into(s.x, out, workspace, Batch(3)); },
                    {"a multiple of batch = 3"});
  check_shape_error([&] { mha.forward_into(s.x, wrong, workspace); },
                    {"MultiHeadAttention::forward_into", "out shape", "[20, 13]", "got [20, 6]"});
  const Matrix<Scalar> too_long = random_matrix<Scalar>(kMax + 1, kEmb, 37);
  Matrix<Scalar> out_long(kMax + 1, kEmb);
  check_shape_error([&] { mha.forward_into(too_long, out_long, workspace); }, {"T", "max_seq_len = 20"});
  CHECK((wrong.array() == Scalar(9)).all());
  CHECK(workspace.bytes() == bytes);
  CHECK(identical(out, good));
  s.layer.forward_into(s.x, out, workspace);
  mha.forward_into(s.x, out_mha, workspace);
  CHECK(identical(out, good));
  CHECK(identical(out_mha, good_mha));
}

TEMPLATE_TEST_CASE("reserve_workspace and workspace_bytes: bad shapes and foreign caches leave the workspace",
                   "[errors][bad-input][workspace]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const head_attention::MultiHeadAttention<Scalar> mha(2, kEmb, kHead, kMax, 0.1, 38);
  const head_attention::HeadAttention<Scalar> other(kEmb, kHead + 1, kMax, 39);
  head_attention::Workspace<Scalar> workspace;
  s.layer.reserve_workspace(workspace, 2, 9);
  const std::size_t bytes = workspace.bytes();
  check_shape_error([&] { s.layer.reserve_workspace(workspace, -1, 9); },
                    {"HeadAttention::reserve_workspace", "batch", ">= 0", "got -1"});
  check_shape_error([&] { s.layer.reserve_workspace(workspace, 2, kMax + 1); },
                    {"HeadAttention::reserve_workspace", "seq_len", "max_seq_len = 20", "got 21"});
  check_shape_error([&] { (void)s.layer.workspace_bytes(1, -3); }, {"seq_len", "got -3"});
  check_shape_error([&] { s.layer.reserve_workspace(workspace, Index(1) << 60, Index(20)); },
                    {"HeadAttention::reserve_workspace", "batch · seq_len · emb_size", "bytes"});
  std::vector<head_attention::KVCache<Scalar>> caches;
  caches.push_back(s.layer.make_cache());
  caches.push_back(other.make_cache());
  check_shape_error(
      [&] { s.layer.reserve_cached_workspace(workspace, caches); },
      {"HeadAttention::reserve_cached_workspace", "caches[1] sizes", "(13, 7, 20)", "(13, 8, 20)"});
  check_shape_error([&] { s.layer.reserve_cached_workspace(workspace, caches[0], 0); },
                    {"t", ">= 1", "got 0"});
  auto mcache = mha.make_cache(2);
  check_shape_error([&] { mha.reserve_cached_workspace(workspace, mcache, kMax + 1); },
                    {"MultiHeadAttention::reserve_cached_workspace", "seq_len", "got 21"});
  check_shape_error([&] { mha.reserve_workspace(workspace, -2, 3); },
                    {"MultiHeadAttention::reserve_workspace", "batch", "got -2"});
  CHECK(workspace.bytes() == bytes);
  CHECK(caches[0].size() == 0);
  CHECK(mcache.size() == 0);
  s.check_unchanged(s.layer);
}

// Sizes the layer's checks accept (batch · seq_len · emb_size fits) but whose working memory cannot be
// addressed: every size product of a call is checked before anything is allocated or written (it used to
// overflow and leave a workspace without its Q|K|V buffer, or try to zero 16 GiB of chunk flags). Huge
// inputs are Maps over a few elements, never read: the call must throw before touching them.
TEMPLATE_TEST_CASE("working memory that overflows Index: refused, the workspace and output unchanged",
                   "[errors][bad-input][workspace]", float, double, Eigen::half) {
  using Scalar = TestType;
  using Map = Eigen::Map<Matrix<Scalar>>;
  using ConstMap = Eigen::Map<const Matrix<Scalar>>;
  const Index head = Index(1) << 18, heads = 2, huge = Index(1) << 42;
  const head_attention::HeadAttention<Scalar> layer(1, head, 2, 41);
  const head_attention::MultiHeadAttention<Scalar> mha(heads, 1, head, 2, 0.1, 42);
  const head_attention::PackedHeadAttention<Scalar> packed(layer);
  const head_attention::PackedMultiHeadAttention<Scalar> packed_mha(mha);
  const Matrix<Scalar> x = random_matrix<float>(2, 1, 43).template cast<Scalar>();  // 2 sequences of 1 row

  // A workspace that served real calls of each form.
  head_attention::Workspace<Scalar> workspace;
  Matrix<Scalar> out(2, head), out_mha(2, 1);
  layer.forward_into(x, out, workspace, Batch(2));
  mha.forward_into(x, out_mha, workspace, Batch(2));
  const Matrix<Scalar> expected = out, expected_mha = out_mha;
  const std::size_t bytes = workspace.bytes();

  // Reservations: 2^42 sequences of one row, whose Q|K|V needs 2^42 · 3 · 2^18 elements (heads of them).
  check_shape_error([&] { layer.reserve_workspace(workspace, huge, 1); },
                    {"HeadAttention::reserve_workspace", "Q|K|V", "at most 9223372036854775807 bytes",
                     "got 1 * 4398046511104 * 1 * 3 * 262144 * "});
  check_shape_error([&] { layer.reserve_workspace(workspace, huge / 2, 2); },
                    {"HeadAttention::reserve_workspace", "Q|K|V", "2199023255552 * 2 * 3 * 262144"});
  check_shape_error([&] { (void)layer.workspace_bytes(huge, 1); },
                    {"HeadAttention::reserve_workspace", "Q|K|V"});
  check_shape_error([&] { mha.reserve_workspace(workspace, huge, 1); },
                    {"MultiHeadAttention::reserve_workspace", "Q|K|V", "got 2 * 4398046511104"});
  check_shape_error([&] { packed.reserve_workspace(workspace, huge, 1); },
                    {"PackedHeadAttention::reserve_workspace", "Q|K|V"});
  check_shape_error([&] { packed_mha.reserve_workspace(workspace, huge, 1); },
                    {"PackedMultiHeadAttention::reserve_workspace", "Q|K|V"});
  // Q|K|V fits (2^40 · 3 · 2^18 elements of 4 or 8 bytes < 2^63 for one head) but each sequence's Kᵀ, in
  // whole panels (of 8 floats or 4 doubles at least), does not.
  check_shape_error([&] { layer.reserve_workspace(workspace, Index(1) << 40, 1); },
                    {"HeadAttention::reserve_workspace", "Kᵀ panels", "got 1 * 1099511627776 * "});
  CHECK(workspace.bytes() == bytes);

  // Forward calls over Maps of 2^42 rows (2^42 sequences of one row): refused before x is read or out
  // written, with and without a workspace.
  const std::vector<Scalar> x_data(4, Scalar(1));
  std::vector<Scalar> out_data(4, Scalar(-3));
  const ConstMap x_huge(x_data.data(), huge, 1);
  Map out_huge(out_data.data(), huge, head), out_huge_mha(out_data.data(), huge, 1);
  check_shape_error([&] { layer.forward_into(x_huge, out_huge, workspace, Batch(huge)); },
                    {"HeadAttention::forward_into", "Q|K|V", "got 1 * 4398046511104 * 1 * 3 * 262144"});
  check_shape_error([&] { layer.forward_into(x_huge, out_huge, Batch(huge)); },
                    {"HeadAttention::forward_into", "Q|K|V"});
  check_shape_error([&] { mha.forward_into(x_huge, out_huge_mha, workspace, Batch(huge)); },
                    {"MultiHeadAttention::forward_into", "Q|K|V"});
  check_shape_error([&] { packed.forward_into(x_huge, out_huge, workspace, Batch(huge)); },
                    {"PackedHeadAttention::forward_into", "Q|K|V"});
  check_shape_error([&] { packed_mha.forward_into(x_huge, out_huge_mha, workspace, Batch(huge)); },
                    {"PackedMultiHeadAttention::forward_into", "Q|K|V"});
  CHECK(std::all_of(out_data.begin(), out_data.end(), [](Scalar v) { return v == Scalar(-3); }));

  // The workspace is as it was: the same size, and the same calls give the same outputs.
  CHECK(workspace.bytes() == bytes);
  layer.forward_into(x, out, workspace, Batch(2));
  mha.forward_into(x, out_mha, workspace, Batch(2));
  CHECK(identical(out, expected));
  CHECK(identical(out_mha, expected_mha));
  CHECK(workspace.bytes() == bytes);
}

TEMPLATE_TEST_CASE("BatchedHeadAttention::Cache::sequence: b out of range", "[errors][bad-input][cache]",
                   float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const head_attention::BatchedHeadAttention<Scalar> batched(s.layer);
  auto cache = batched.make_cache(2);
  (void)batched.forward_cached(s.xb, cache);
  for (const Index b : {Index(-1), Index(2), Index(100)})
    check_shape_error([&] { (void)cache.sequence(b); }, {"BatchedHeadAttention::Cache::sequence", "b",
                                                         "in [0, batch = 2)", "got " + std::to_string(b)});
  CHECK(cache.sequence(1).size() == 9);
  CHECK(cache.size() == 9);
}

TEMPLATE_TEST_CASE("attention_weights: bad shapes", "[errors][bad-input]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const head_attention::BatchedHeadAttention<Scalar> batched(s.layer);
  check_shape_error([&] { (void)s.layer.attention_weights(Matrix<Scalar>(kMax + 1, kEmb)); },
                    {"HeadAttention::attention_weights", "T", "max_seq_len = 20", "got 21"});
  check_shape_error([&] { (void)s.layer.attention_weights(Matrix<Scalar>(3, kEmb - 2)); },
                    {"HeadAttention::attention_weights", "input width", "got 11"});
  check_shape_error([&] { (void)batched.attention_weights(Tensor3<Scalar>(2, 3, kEmb + 3)); },
                    {"BatchedHeadAttention::attention_weights", "x.dimension(2)", "got 16"});
  s.check_unchanged(batched);
}

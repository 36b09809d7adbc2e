// Every bad input is refused with head_attention::shape_error (an std::invalid_argument) whose message names
// the quantity, the expected and the actual value, and a failed call leaves the object as it was.
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

TEMPLATE_TEST_CASE("HeadAttention::forward: T > max_seq_len", "[errors]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  const Matrix<Scalar> too_long = random_matrix<Scalar>(kMax + 1, kEmb, 1);
  check_shape_error([&] { (void)s.layer.forward(too_long); },
                    {"HeadAttention::forward", "T", "max_seq_len = 20", "got 21"});
  const ColMatrix<Scalar> much_too_long = random_matrix<Scalar>(3 * kMax, kEmb, 2);
  check_shape_error([&] { (void)s.layer.forward(much_too_long); }, {"T", "max_seq_len = 20", "got 60"});
  s.check_unchanged(s.layer);
}

TEMPLATE_TEST_CASE("BatchedHeadAttention::forward: T > max_seq_len", "[errors]", float, double) {
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

TEMPLATE_TEST_CASE("tril_mask: T outside 0 to max_seq_len", "[errors]", float, double) {
  using Scalar = TestType;
  const Setup<Scalar> s;
  check_shape_error([&] { (void)s.layer.tril_mask(kMax + 1); },
                    {"HeadAttention::tril_mask", "T", "max_seq_len = 20", "got 21"});
  check_shape_error([&] { (void)s.layer.tril_mask(-1); }, {"tril_mask", "T", "max_seq_len = 20", "got -1"});
  CHECK(s.layer.tril_mask(kMax).rows() == kMax);
  s.check_unchanged(s.layer);
}

TEMPLATE_TEST_CASE("HeadAttention::forward: input width != emb_size", "[errors]", float, double) {
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

TEMPLATE_TEST_CASE("BatchedHeadAttention::forward: input width != emb_size", "[errors]", float, double) {
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

TEMPLATE_TEST_CASE("constructor: emb_size <= 0", "[errors]", float, double) {
  check_constructors_reject<TestType>("emb_size", {0, -1, -13}, [](Index bad) {
    return std::array<Index, 3>{bad, kHead, kMax};
  });
}

TEMPLATE_TEST_CASE("constructor: head_size <= 0", "[errors]", float, double) {
  check_constructors_reject<TestType>("head_size", {0, -1, -7}, [](Index bad) {
    return std::array<Index, 3>{kEmb, bad, kMax};
  });
}

TEMPLATE_TEST_CASE("constructor: max_seq_len <= 0", "[errors]", float, double) {
  check_constructors_reject<TestType>("max_seq_len", {0, -1, -20}, [](Index bad) {
    return std::array<Index, 3>{kEmb, kHead, bad};
  });
}

TEMPLATE_TEST_CASE("weight of the wrong shape set through query or key or value", "[errors]", float, double) {
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

TEMPLATE_TEST_CASE("bias of the wrong size set through query or key or value", "[errors]", float, double) {
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

TEMPLATE_TEST_CASE("set_num_threads: a negative count", "[errors]", float, double) {
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

TEMPLATE_TEST_CASE("forward_into: bad output shapes and batch counts", "[errors]", float, double) {
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
  check_shape_error([&] { s.layer.forward_into(s.x, -1, out); },
                    {"HeadAttention::forward_into", "batch", ">= 0", "got -1"});
  check_shape_error([&] { s.layer.forward_into(s.x, 3, out); },
                    {"HeadAttention::forward_into", "x.rows()", "a multiple of batch = 3", "got 20"});
  check_shape_error([&] { s.layer.forward_into(s.x, 0, out); },
                    {"HeadAttention::forward_into", "x.rows()", "batch = 0", "got 20"});
  // T is x.rows() / batch: 40 rows as one sequence are too long, as two they are fine.
  const Matrix<Scalar> two = random_matrix<Scalar>(2 * kMax, kEmb, 14);
  Matrix<Scalar> out_two = Matrix<Scalar>::Constant(2 * kMax, kHead, sentinel);
  check_shape_error([&] { s.layer.forward_into(two, 1, out_two); },
                    {"HeadAttention::forward_into", "T", "max_seq_len = 20", "got 40"});
  const Matrix<Scalar> narrow = random_matrix<Scalar>(kMax, kEmb - 1, 15);
  check_shape_error([&] { s.layer.forward_into(narrow, out); },
                    {"HeadAttention::forward_into", "input width", "emb_size = 13", "got 12"});
  CHECK((out.array() == sentinel).all());
  CHECK((out_two.array() == sentinel).all());
  s.layer.forward_into(two, 2, out_two);  // the same storage, used rightly
  CHECK(out_two.allFinite());
  s.check_unchanged(s.layer);
}

TEMPLATE_TEST_CASE("reference::forward: mismatched shapes", "[errors]", float, double) {
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

// Incremental decoding with a KV cache: prefill plus chunks equals one forward over the whole sequence, for
// many random splits, under the causal and the sliding-window rules, one sequence and a batch; the cache's
// storage; overflow and mismatch errors that leave the cache as it was.
#include <cstdint>
#include <random>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace ha_test;
using head_attention::MaskRule;

/// Chunk sizes that add up to T: the given ones first, then random ones.
std::vector<Index> split(Index T, std::uint64_t seed, std::vector<Index> first = {}) {
  std::mt19937_64 engine(seed);
  std::vector<Index> sizes;
  Index used = 0;
  for (const Index s : first) {
    if (used + s > T) break;
    sizes.push_back(s);
    used += s;
  }
  const Index choices[] = {1, 1, 2, 3, 7, 64, 65, 100};
  while (used < T) {
    const Index s = std::min(T - used, choices[engine() % 8]);
    sizes.push_back(s);
    used += s;
  }
  return sizes;
}

/// Tolerance relative to the output scale for a result computed in another order.
template <typename Scalar>
double decode_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-5 : 1e-12;
}

}  // namespace

TEMPLATE_TEST_CASE("prefill plus chunks equals one forward", "[cache]", float, double) {
  using Scalar = TestType;
  constexpr Index T = 400, emb = 12, head = 8;
  for (const MaskRule& rule : {MaskRule::causal(), MaskRule::sliding_window(1), MaskRule::sliding_window(37),
                               MaskRule::sliding_window(300)}) {
    head_attention::HeadAttention<Scalar> layer(emb, head, T, 1600, rule);
    const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 1601);
    const Matrix<Scalar> full = layer.forward(x);
    for (std::uint64_t trial = 0; trial < 6; ++trial) {
      std::vector<Index> sizes =
          trial == 0 ? std::vector<Index>(static_cast<std::size_t>(T), 1)
                     : split(T, 1700 + trial,
                             trial == 1 ? std::vector<Index>{65, 64, 1, 2, 7} : std::vector<Index>{});
      auto cache = layer.make_cache();
      Matrix<Scalar> pieces(T, head);
      Index at = 0;
      for (const Index s : sizes) {
        const Matrix<Scalar> out = layer.forward_cached(x.middleRows(at, s), cache);
        REQUIRE(out.rows() == s);
        pieces.middleRows(at, s) = out;
        at += s;
        REQUIRE(cache.size() == at);
      }
      INFO("rule " << rule.name() << ", trial " << trial << ", " << sizes.size() << " chunks");
      CHECK(relative_error(pieces, full) <= decode_tolerance<Scalar>());
    }
  }
}

TEMPLATE_TEST_CASE("a sliding-window decode keeps O(window) rows", "[cache]", float, double) {
  using Scalar = TestType;
  constexpr Index T = 3000, emb = 4, head = 4, window = 16;
  head_attention::HeadAttention<Scalar> layer(emb, head, T, 1750, MaskRule::sliding_window(window));
  const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 1751);
  const Matrix<Scalar> full = layer.forward(x);
  auto cache = layer.make_cache();
  Matrix<Scalar> pieces(T, head);
  Index most = 0;
  for (Index i = 0; i < T; ++i) {
    pieces.row(i) = layer.forward_cached(x.row(i), cache);
    most = std::max(most, cache.capacity());
  }
  CHECK(relative_error(pieces, full) <= decode_tolerance<Scalar>());
  CHECK(most <= 4 * window + 16);  // storage for a few windows, never for T
}

TEMPLATE_TEST_CASE("a cache grows as it fills", "[cache]", float, double) {
  using Scalar = TestType;
  head_attention::HeadAttention<Scalar> layer(6, 4, 5000, 1800);
  auto cache = layer.make_cache();
  CHECK(cache.size() == 0);
  CHECK(cache.capacity() == 0);
  const Matrix<Scalar> x = random_matrix<Scalar>(40, 6, 1801);
  (void)layer.forward_cached(x.topRows(3), cache);
  CHECK(cache.capacity() >= 3);
  CHECK(cache.capacity() <= 64);
  (void)layer.forward_cached(x.bottomRows(37), cache);
  CHECK(cache.size() == 40);
  CHECK(cache.capacity() >= 40);
  CHECK(cache.capacity() <= 128);
  CHECK(cache.emb_size() == 6);
  CHECK(cache.head_size() == 4);
  CHECK(cache.max_seq_len() == 5000);
  // clear() starts over at position 0: the same outputs again.
  const Matrix<Scalar> first = layer.forward_cached(x.topRows(5), cache);
  CHECK(cache.size() == 45);
  cache.clear();
  CHECK(cache.size() == 0);
  CHECK(relative_error(layer.forward_cached(x.topRows(5), cache), layer.forward(x.topRows(5))) <=
        decode_tolerance<Scalar>());
  (void)first;
}

TEMPLATE_TEST_CASE("batched decoding equals the batched forward", "[cache]", float, double) {
  using Scalar = TestType;
  constexpr Index B = 3, T = 150, emb = 10, head = 6;
  for (const MaskRule& rule : {MaskRule::causal(), MaskRule::sliding_window(20)}) {
    head_attention::BatchedHeadAttention<Scalar> batched(emb, head, T, 1900);
    batched.head().set_mask_rule(rule);
    const Tensor3<Scalar> x = random_tensor<Scalar>(B, T, emb, 1901);
    const Tensor3<Scalar> full = batched.forward(x);
    auto cache = batched.make_cache(B);
    CHECK(cache.batch() == B);
    Tensor3<Scalar> pieces(B, T, head);
    Index at = 0;
    for (const Index s : split(T, 1902, {70, 1, 1, 2})) {
      const Eigen::array<Index, 3> offsets = {0, at, 0};
      const Eigen::array<Index, 3> extents = {B, s, emb};
      const Tensor3<Scalar> chunk = x.slice(offsets, extents);
      const Tensor3<Scalar> out = batched.forward_cached(chunk, cache);
      const Eigen::array<Index, 3> out_extents = {B, s, head};
      pieces.slice(offsets, out_extents) = out;
      at += s;
    }
    CHECK(cache.size() == T);
    INFO("rule " << rule.name());
    CHECK(relative_error(Eigen::Map<const Matrix<Scalar>>(pieces.data(), B * T, head),
                         Eigen::Map<const Matrix<Scalar>>(full.data(), B * T, head)) <=
          decode_tolerance<Scalar>());
  }
}

TEMPLATE_TEST_CASE("cache errors leave the cache as it was", "[cache][errors][bad-input]", float, double) {
  using Scalar = TestType;
  constexpr Index emb = 7, head = 3, max = 20;
  head_attention::HeadAttention<Scalar> layer(emb, head, max, 2000);
  const Matrix<Scalar> x = random_matrix<Scalar>(max + 5, emb, 2001);
  auto cache = layer.make_cache();
  (void)layer.forward_cached(x.topRows(15), cache);
  const auto state = [&] { return std::make_pair(cache.size(), cache.capacity()); };
  const auto before = state();

  // Past max_seq_len.
  check_shape_error([&] { (void)layer.forward_cached(x.middleRows(15, 6), cache); },
                    {"HeadAttention::forward_cached", "cache.size() + t", "max_seq_len = 20", "15 + 6"});
  CHECK(state() == before);
  // Wrong width.
  const Matrix<Scalar> narrow = random_matrix<Scalar>(2, emb - 1, 2002);
  check_shape_error([&] { (void)layer.forward_cached(narrow, cache); },
                    {"HeadAttention::forward_cached", "input width", "emb_size = 7", "got 6"});
  CHECK(state() == before);
  // A cache from a layer of other sizes, or another rule.
  head_attention::HeadAttention<Scalar> other(emb, head + 1, max, 2003);
  auto other_cache = other.make_cache();
  check_shape_error([&] { (void)layer.forward_cached(x.topRows(1), other_cache); },
                    {"HeadAttention::forward_cached", "cache sizes", "(7, 3, 20)", "got (7, 4, 20)"});
  head_attention::HeadAttention<Scalar> windowed(emb, head, max, 2000, MaskRule::sliding_window(4));
  check_shape_error([&] { (void)windowed.forward_cached(x.middleRows(15, 1), cache); },
                    {"HeadAttention::forward_cached", "cache mask rule", "sliding_window(4)", "got causal"});
  CHECK(state() == before);
  CHECK(other_cache.size() == 0);

  // The cache still continues correctly.
  const Matrix<Scalar> rest = layer.forward_cached(x.middleRows(15, 5), cache);
  CHECK(relative_error(rest, Matrix<Scalar>(layer.forward(x.topRows(20)).bottomRows(5))) <=
        decode_tolerance<Scalar>());

  // Batched: the batch must match, and nothing changes when one sequence's check fails.
  head_attention::BatchedHeadAttention<Scalar> batched(layer);
  auto bcache = batched.make_cache(2);
  const Tensor3<Scalar> three = random_tensor<Scalar>(3, 2, emb, 2004);
  check_shape_error([&] { (void)batched.forward_cached(three, bcache); },
                    {"BatchedHeadAttention::forward_cached", "x.dimension(0) (B)", "batch = 2", "got 3"});
  CHECK(bcache.size() == 0);
  check_shape_error([&] { (void)batched.make_cache(-1); },
                    {"BatchedHeadAttention::make_cache", "batch", "got -1"});
}

TEMPLATE_TEST_CASE("truncate rolls a cache back", "[cache]", float, double) {
  using Scalar = TestType;
  constexpr Index emb = 6, head = 4, T = 80;
  head_attention::HeadAttention<Scalar> layer(emb, head, T, 2100);
  const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 2101);
  const Matrix<Scalar> other = random_matrix<Scalar>(10, emb, 2102);
  const Matrix<Scalar> full = layer.forward(x);
  auto cache = layer.make_cache();
  (void)layer.forward_cached(x.topRows(50), cache);
  (void)layer.forward_cached(other, cache);  // ten rejected tokens
  cache.truncate(50);
  CHECK(cache.size() == 50);
  const Matrix<Scalar> rest = layer.forward_cached(x.bottomRows(T - 50), cache);
  CHECK(relative_error(rest, Matrix<Scalar>(full.bottomRows(T - 50))) <= decode_tolerance<Scalar>());
  check_shape_error([&] { cache.truncate(T + 1); },
                    {"KVCache::truncate", "size", "in [0, size() = 80]", "got 81"});
  check_shape_error([&] { cache.truncate(-1); }, {"KVCache::truncate", "size", "got -1"});
  CHECK(cache.size() == T);
  cache.truncate(0);
  CHECK(cache.size() == 0);

  // A sliding window drops old positions: truncating to before them is refused, with the cache unchanged.
  head_attention::HeadAttention<Scalar> windowed(emb, head, T, 2100, MaskRule::sliding_window(4));
  auto wcache = windowed.make_cache();
  for (Index i = 0; i < 60; ++i)
    (void)windowed.forward_cached(x.row(i), wcache);
  check_shape_error([&] { wcache.truncate(10); }, {"KVCache::truncate", "size", "sliding window", "got 10"});
  CHECK(wcache.size() == 60);
  // Kept: positions 56..59, what the query at position 59 sees; position 58 would need 55 too.
  check_shape_error([&] { wcache.truncate(58); }, {"KVCache::truncate", "must be >= 59", "got 58"});
  wcache.truncate(59);
  const Matrix<Scalar> wfull = windowed.forward(x);
  const Matrix<Scalar> again = windowed.forward_cached(x.middleRows(59, 2), wcache);
  CHECK(relative_error(again, Matrix<Scalar>(wfull.middleRows(59, 2))) <= decode_tolerance<Scalar>());
}

TEMPLATE_TEST_CASE("packed forms decode bit for bit as their layers", "[cache][packed]", float, double) {
  using Scalar = TestType;
  constexpr Index emb = 16, head = 8, heads = 3, T = 150, B = 3;
  for (const MaskRule& rule : {MaskRule::causal(), MaskRule::sliding_window(20)}) {
    INFO("rule " << rule.name());
    const head_attention::HeadAttention<Scalar> layer(emb, head, T, 2100, rule);
    const head_attention::PackedHeadAttention<Scalar> packed(layer);
    const Matrix<Scalar> x = random_matrix<Scalar>(T, emb, 2101);
    // One sequence: the layer's cache and the packed form's, each extended by its own form; then a cache
    // passed from one form to the other continues as if it had stayed.
    auto layer_cache = layer.make_cache();
    auto packed_cache = packed.make_cache();
    head_attention::Workspace<Scalar> workspace;
    Matrix<Scalar> pieces(T, head);
    Index at = 0;
    bool all_equal = true;
    for (const Index s : split(T, 2102, {70, 1, 1, 2})) {
      const Matrix<Scalar> expected = layer.forward_cached(x.middleRows(at, s), layer_cache);
      Matrix<Scalar> got(s, head);
      if (at % 2 == 0)
        got = packed.forward_cached(x.middleRows(at, s), packed_cache);
      else
        packed.forward_cached_into(x.middleRows(at, s), packed_cache, got, workspace);
      all_equal = all_equal && got == expected;
      pieces.middleRows(at, s) = got;
      at += s;
    }
    CHECK(all_equal);
    CHECK(packed_cache.size() == T);
    CHECK(relative_error(pieces, Matrix<Scalar>(layer.forward(x))) <= decode_tolerance<Scalar>());
    auto handed_over = layer.make_cache();  // prefilled by the layer, continued by the packed form
    auto stayed = layer.make_cache();       // the same chunks, all by the layer
    (void)layer.forward_cached(x.topRows(100), handed_over);
    (void)layer.forward_cached(x.topRows(100), stayed);
    CHECK(packed.forward_cached(x.middleRows(100, 7), handed_over) ==
          layer.forward_cached(x.middleRows(100, 7), stayed));

    // Several sequences at once.
    std::vector<head_attention::KVCache<Scalar>> layer_caches(B, layer.make_cache());
    std::vector<head_attention::KVCache<Scalar>> packed_caches(B, packed.make_cache());
    const Matrix<Scalar> xb = random_matrix<Scalar>(B * T, emb, 2103);  // step i: rows [B · i, B · i + B)
    Matrix<Scalar> expected(B, head), got(B, head);
    all_equal = true;
    for (Index i = 0; i < 40; ++i) {
      layer.forward_cached_into(xb.middleRows(B * i, B), layer_caches, expected);
      if (i % 2 == 0)
        packed.forward_cached_into(xb.middleRows(B * i, B), packed_caches, got);
      else
        packed.forward_cached_into(xb.middleRows(B * i, B), packed_caches, got, workspace);
      all_equal = all_equal && got == expected;
    }
    CHECK(all_equal);
    CHECK(packed_caches[2].size() == 40);

    // Multi-head.
    const head_attention::MultiHeadAttention<Scalar> mha(heads, emb, head, T, 0.1, 2104, rule);
    const head_attention::PackedMultiHeadAttention<Scalar> packed_mha(mha);
    auto mha_cache = mha.make_cache(2);
    auto packed_mha_cache = packed_mha.make_cache(2);
    CHECK(packed_mha_cache.batch() == 2);
    const Matrix<Scalar> x2 = random_matrix<Scalar>(2 * T, emb, 2105);  // [2 · T, emb]: per step, 2 chunks
    at = 0;
    all_equal = true;
    for (const Index s : split(T, 2106, {64, 1, 3})) {
      Matrix<Scalar> chunk(2 * s, emb);  // sequence 0's s rows, then sequence 1's
      chunk.topRows(s) = x2.middleRows(at, s);
      chunk.bottomRows(s) = x2.middleRows(T + at, s);
      const Matrix<Scalar> want = mha.forward_cached(chunk, mha_cache);
      Matrix<Scalar> have(2 * s, emb);
      if (at % 2 == 0)
        have = packed_mha.forward_cached(chunk, packed_mha_cache);
      else
        packed_mha.forward_cached_into(chunk, packed_mha_cache, have, workspace);
      all_equal = all_equal && have == want;
      at += s;
    }
    CHECK(all_equal);
    CHECK(packed_mha_cache.size() == T);
  }
}

TEMPLATE_TEST_CASE("packed decode errors leave the caches as they were", "[cache][packed][errors][bad-input]",
                   float, double) {
  using Scalar = TestType;
  constexpr Index emb = 7, head = 3, max = 20;
  const head_attention::HeadAttention<Scalar> layer(emb, head, max, 2200);
  const head_attention::PackedHeadAttention<Scalar> packed(layer);
  const Matrix<Scalar> x = random_matrix<Scalar>(max + 5, emb, 2201);
  auto cache = packed.make_cache();
  (void)packed.forward_cached(x.topRows(15), cache);
  const auto state = [&] { return std::make_pair(cache.size(), cache.capacity()); };
  const auto before = state();
  check_shape_error(
      [&] { (void)packed.forward_cached(x.middleRows(15, 6), cache); },
      {"PackedHeadAttention::forward_cached", "cache.size() + t", "max_seq_len = 20", "15 + 6"});
  const Matrix<Scalar> narrow = random_matrix<Scalar>(2, emb - 1, 2202);
  check_shape_error([&] { (void)packed.forward_cached(narrow, cache); },
                    {"PackedHeadAttention::forward_cached", "input width", "emb_size = 7", "got 6"});
  head_attention::HeadAttention<Scalar> other(emb, head + 1, max, 2203);
  auto other_cache = other.make_cache();
  check_shape_error([&] { (void)packed.forward_cached(x.topRows(1), other_cache); },
                    {"PackedHeadAttention::forward_cached", "cache sizes", "(7, 3, 20)", "got (7, 4, 20)"});
  Matrix<Scalar> wrong_out(1, head + 1);
  head_attention::Workspace<Scalar> workspace;
  check_shape_error([&] { packed.forward_cached_into(x.topRows(1), cache, wrong_out, workspace); },
                    {"PackedHeadAttention::forward_cached_into", "out shape", "[1, 3]", "[1, 4]"});
  CHECK(state() == before);
  CHECK(other_cache.size() == 0);
  // Several caches: one that does not fit refuses the call before any cache changes.
  std::vector<head_attention::KVCache<Scalar>> caches{packed.make_cache(), other.make_cache()};
  Matrix<Scalar> out2(2, head);
  check_shape_error([&] { packed.forward_cached_into(x.topRows(2), caches, out2); },
                    {"PackedHeadAttention::forward_cached_into", "caches[1] sizes"});
  Matrix<Scalar> out3(3, head);
  check_shape_error([&] { packed.forward_cached_into(x.topRows(3), caches, out3); },
                    {"PackedHeadAttention::forward_cached_into", "x.rows()",
                     "multiple of the number of sequences = 2", "got 3"});
  CHECK(caches[0].size() == 0);
  CHECK(caches[1].size() == 0);

  // Multi-head: a cache of another head count, or another batch.
  const head_attention::MultiHeadAttention<Scalar> mha(2, emb, head, max, 0.1, 2204);
  const head_attention::PackedMultiHeadAttention<Scalar> packed_mha(mha);
  const head_attention::MultiHeadAttention<Scalar> three_heads(3, emb, head, max, 0.1, 2205);
  auto foreign = three_heads.make_cache(1);
  check_shape_error([&] { (void)packed_mha.forward_cached(x.topRows(2), foreign); },
                    {"PackedMultiHeadAttention::forward_cached", "cache heads", "2", "got 3"});
  auto mha_cache = packed_mha.make_cache(2);
  check_shape_error([&] { (void)packed_mha.forward_cached(x.topRows(3), mha_cache); },
                    {"PackedMultiHeadAttention::forward_cached", "x.rows()", "= 2", "got 3"});
  check_shape_error([&] { (void)packed_mha.make_cache(-1); },
                    {"PackedMultiHeadAttention::make_cache", "batch", "got -1"});
  CHECK(foreign.size() == 0);
  CHECK(mha_cache.size() == 0);

  // reserve_workspace: bad sizes, t, or caches leave the workspace empty.
  head_attention::Workspace<Scalar> reserved;
  check_shape_error([&] { packed.reserve_workspace(reserved, -1, 4); },
                    {"PackedHeadAttention::reserve_workspace", "batch", ">= 0", "got -1"});
  check_shape_error([&] { packed.reserve_workspace(reserved, 2, max + 1); },
                    {"PackedHeadAttention::reserve_workspace", "seq_len", "max_seq_len = 20", "got 21"});
  check_shape_error([&] { (void)packed.workspace_bytes(Index(1) << 60, 4); },
                    {"PackedHeadAttention::reserve_workspace", "batch · seq_len · emb_size"});
  check_shape_error([&] { packed.reserve_cached_workspace(reserved, cache, 0); },
                    {"PackedHeadAttention::reserve_cached_workspace", "t", ">= 1", "got 0"});
  check_shape_error(
      [&] { packed.reserve_cached_workspace(reserved, caches); },
      {"PackedHeadAttention::reserve_cached_workspace", "caches[1] sizes", "(7, 3, 20)", "got (7, 4, 20)"});
  check_shape_error([&] { packed_mha.reserve_cached_workspace(reserved, foreign); },
                    {"PackedMultiHeadAttention::reserve_cached_workspace", "cache heads", "2", "got 3"});
  check_shape_error([&] { packed_mha.reserve_workspace(reserved, 0, max + 2); },
                    {"PackedMultiHeadAttention::reserve_workspace", "seq_len", "got 22"});
  CHECK(reserved.bytes() == 0);
}

namespace {

/// The last row of x's attention output under `rule`, the plain way in double: its query against every key it
/// sees, keys and values first rounded to `storage` (as a 16-bit cache stores them; through float, as the
/// layer computes them). Independent of the library's kernels.
template <typename Scalar>
Eigen::RowVectorXd reference_last_row(const head_attention::HeadAttention<Scalar>& layer,
                                      const Matrix<Scalar>& x, const MaskRule& rule,
                                      head_attention::Precision storage) {
  using Dense = Eigen::MatrixXd;
  const Dense xd = x.template cast<double>();
  const auto project = [&](const head_attention::Linear<Scalar>& l) {
    Dense y = xd * l.weight.template cast<double>().transpose();
    y.rowwise() += l.bias.template cast<double>().transpose();
    return y;
  };
  const auto stored = [&](Dense m) {
    if (storage == head_attention::Precision::float16)
      m = m.unaryExpr([](double v) { return double(float(Eigen::half(float(v)))); });
    else if (storage == head_attention::Precision::bfloat16)
      m = m.unaryExpr([](double v) { return double(float(Eigen::bfloat16(float(v)))); });
    return m;
  };
  const Index T = x.rows(), i = T - 1;
  const Dense q = project(layer.query()), k = stored(project(layer.key())),
              v = stored(project(layer.value()));
  const Index first = rule.first_key(i), end = rule.end_key(i, T);
  const Eigen::VectorXd scores =
      k.middleRows(first, end - first) * q.row(i).transpose() / std::sqrt(double(layer.head_size()));
  const Eigen::VectorXd w = (scores.array() - scores.maxCoeff()).exp();
  return (w.transpose() * v.middleRows(first, end - first)) / w.sum();
}

}  // namespace

// A decode step whose query sees hundreds of keys or more is cut into key ranges, each its own work item
// (flash-decoding), merged afterwards: checked against the plain double computation, under the causal rule
// and sliding windows (one that cuts the ranges, one too short to split), with float and 16-bit caches.
TEMPLATE_TEST_CASE("a decode step cut into key ranges matches the double reference", "[cache][split]", float,
                   double) {
  using Scalar = TestType;
  using head_attention::Precision;
  constexpr Index emb = 16, head = 8;
  std::vector<Precision> storages = {head_attention::precision_of<Scalar>()};
  if (std::is_same<Scalar, float>::value) {
    storages.push_back(Precision::float16);
    storages.push_back(Precision::bfloat16);
  }
  for (const MaskRule& rule :
       {MaskRule::causal(), MaskRule::sliding_window(700), MaskRule::sliding_window(64)})
    for (const Index n : {Index(600), Index(1300), Index(2900)})
      for (const Precision storage : storages) {
        const std::uint64_t seed = 3000 + static_cast<std::uint64_t>(n);
        head_attention::HeadAttention<Scalar> layer(emb, head, n + 1, seed, rule);
        const Matrix<Scalar> x = random_matrix<Scalar>(n + 1, emb, seed + 1, 2.0);
        auto cache = layer.make_cache(storage);
        (void)layer.forward_cached(x.topRows(n), cache);
        const Matrix<Scalar> step = layer.forward_cached(x.row(n), cache);
        const Index visible = std::min(n + 1, rule.end_key(n, n + 1) - rule.first_key(n));
        INFO("rule " << rule.name() << ", n " << n << ", storage " << head_attention::precision_name(storage)
                     << ", " << head_attention::detail::decode_key_splits(visible, 1) << " key ranges");
        if (rule.kind() != MaskRule::Kind::sliding_window || rule.window() > 256)
          CHECK(head_attention::detail::decode_key_splits(visible, 1) >= 2);  // the split is under test
        const Eigen::RowVectorXd expected = reference_last_row(layer, x, rule, storage);
        const Eigen::RowVectorXd got = step.row(0).template cast<double>();
        CHECK(relative_error(got, expected) <= decode_tolerance<Scalar>());
      }
}

// NaN and Inf in a split decode step: a non-finite key or value reaches the output if and only if the query
// sees it, whichever key range it falls in; a range that sees none of it leaves the result bit-identical.
TEMPLATE_TEST_CASE("a decode step cut into key ranges keeps non-finite values to the outputs that see them",
                   "[cache][split][nonfinite]", float, double) {
  using Scalar = TestType;
  constexpr Index emb = 16, head = 8, n = 1500;
  for (const MaskRule& rule : {MaskRule::causal(), MaskRule::sliding_window(800)}) {
    head_attention::HeadAttention<Scalar> layer(emb, head, n + 1, 77, rule);
    const Matrix<Scalar> x = random_matrix<Scalar>(n + 1, emb, 78);
    const auto step = [&](const Matrix<Scalar>& in) {
      auto cache = layer.make_cache();
      (void)layer.forward_cached(in.topRows(n), cache);
      return Matrix<Scalar>(layer.forward_cached(in.row(n), cache));
    };
    const Matrix<Scalar> clean = step(x);
    REQUIRE(clean.allFinite());
    for (const Scalar value :
         {std::numeric_limits<Scalar>::quiet_NaN(), std::numeric_limits<Scalar>::infinity()})
      for (const Index p : {Index(0), Index(650), Index(701), Index(1200), Index(n - 1)}) {
        Matrix<Scalar> planted = x;
        planted(p, 3) = value;
        const Matrix<Scalar> out = step(planted);
        const bool seen = p >= rule.first_key(n);
        INFO("rule " << rule.name() << ", " << value << " at row " << p);
        if (seen)
          CHECK_FALSE(out.allFinite());
        else
          CHECK(identical(out, clean));
      }
  }
}

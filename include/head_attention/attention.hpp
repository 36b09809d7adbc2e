/// \file
/// head-attention: HeadAttention, the causal single-head self-attention layer of simple_llm.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "arguments.hpp"
#include "detail/flash.hpp"
#include "detail/flash_backward.hpp"
#include "detail/parallel.hpp"
#include "detail/rng.hpp"
#include "errors.hpp"
#include "forms.hpp"
#include "fwd.hpp"
#include "gradients.hpp"
#include "kv_cache.hpp"
#include "linear.hpp"
#include "mask.hpp"
#include "reference.hpp"
#include "workspace.hpp"

namespace head_attention {

namespace detail {

/// Throws shape_error unless all three projections of the layer are [head_size, emb_size] + [head_size].
template <typename Scalar>
void check_projections(const HeadAttention<Scalar>& layer, const char* where) {
  check_linear(layer.query(), where, "query()", layer.emb_size(), layer.head_size());
  check_linear(layer.key(), where, "key()", layer.emb_size(), layer.head_size());
  check_linear(layer.value(), where, "value()", layer.emb_size(), layer.head_size());
}

/// The length T of `batch` equal sequences stored back to back in `rows` rows. Throws shape_error unless
/// batch >= 0 and rows is a multiple of it (0 rows when batch = 0).
inline Eigen::Index sequence_length(Eigen::Index rows, Eigen::Index batch, const char* where) {
  HEAD_ATTENTION_REQUIRE(batch >= 0, where, "batch", ">= 0", std::to_string(batch));
  HEAD_ATTENTION_REQUIRE(batch > 0 ? rows % batch == 0 : rows == 0, where, "x.rows()",
                         "a multiple of batch = " + std::to_string(batch), std::to_string(rows));
  return batch > 0 ? rows / batch : 0;
}

/// Throws shape_error unless lengths has `batch` entries, each in [0, seq_len].
inline void check_lengths(const std::vector<Eigen::Index>& lengths, Eigen::Index batch, Eigen::Index seq_len,
                          const char* where) {
  HEAD_ATTENTION_REQUIRE(static_cast<Eigen::Index>(lengths.size()) == batch, where, "lengths.size()",
                         "batch = " + std::to_string(batch), std::to_string(lengths.size()));
  for (std::size_t b = 0; b < lengths.size(); ++b)
    HEAD_ATTENTION_REQUIRE(lengths[b] >= 0 && lengths[b] <= seq_len, where,
                           "lengths[" + std::to_string(b) + "]",
                           "in [0, T = " + std::to_string(seq_len) + "]", std::to_string(lengths[b]));
}

/// Throws shape_error unless a TrainingState fits `rows` input rows of `heads` heads of `head` columns:
/// output [rows, heads · head], lse [heads · rows].
template <typename Scalar>
void check_state(const TrainingState<Scalar>& state, Eigen::Index rows, Eigen::Index heads, Eigen::Index head,
                 const char* where) {
  HEAD_ATTENTION_REQUIRE(state.output.rows() == rows && state.output.cols() == heads * head, where,
                         "state.output shape", shape_string(rows, heads * head),
                         shape_string(state.output.rows(), state.output.cols()));
  HEAD_ATTENTION_REQUIRE(state.lse.size() == heads * rows, where, "state.lse size",
                         std::to_string(heads * rows), std::to_string(state.lse.size()));
}

}  // namespace detail

/// Causal single-head self-attention, the C++ twin of simple_llm's PyTorch HeadAttention(emb_size, head_size,
/// max_seq_len): out = softmax(mask(Q Kᵀ / sqrt(head_size))) V with Q, K, V = nn.Linear(emb_size,
/// head_size)(x).
///
/// forward() runs the fused path: one pass of projection GEMMs into a single Q|K|V buffer, then a tiled
/// online softmax that never builds the [T, T] score matrix, on all cores when compiled with OpenMP. It is
/// const and may be called from many threads at once.
template <typename Scalar>
class HeadAttention : public AttentionBase<HeadAttention<Scalar>, Scalar>,
                      public HeadTrainingBase<HeadAttention<Scalar>, Scalar> {
  static_assert(detail::is_layer_scalar<Scalar>,
                "HeadAttention<Scalar> needs float, double, Eigen::half or Eigen::bfloat16");

 public:
  /// Eigen's signed index type, for every size and position.
  using Index = Eigen::Index;
  /// Row-major, as PyTorch lays out [T, features] activations and [out, in] weights, so that both copy in
  /// without a transpose.
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  /// Column vector of Scalar (biases).
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  /// A [T, T] boolean mask, true where a query sees a key.
  using Mask = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  /// The projections' type, Linear<Scalar>.
  using LinearType = Linear<Scalar>;
  /// The type products and softmax run in: Scalar for float and double, float for Eigen::half and
  /// Eigen::bfloat16 (which only store).
  using Compute = detail::compute_t<Scalar>;
  /// Where forward_into writes: any row-major [rows, head_size] storage with contiguous rows (a Matrix, a
  /// Map over caller memory, a block of columns of a wider row-major matrix).
  using OutputRef = Eigen::Ref<Matrix, 0, Eigen::OuterStride<>>;

  /// Builds the layer with PyTorch's default nn.Linear init, U(-1/sqrt(emb_size), 1/sqrt(emb_size)) for every
  /// weight and bias, drawn in the order q.weight, q.bias, k.weight, k.bias, v.weight, v.bias from a
  /// generator seeded with `seed` (the same seed gives the same weights, in float and double alike; an
  /// integer, see Seed). Throws shape_error unless all three sizes are positive. `rule` is which keys each
  /// query sees (causal, the seed's, by default; see MaskRule).
  HeadAttention(Index emb_size, Index head_size, Index max_seq_len, Seed seed = 0,
                const MaskRule& rule = MaskRule::causal())
      : m_emb_size(checked_size(emb_size, "emb_size")),
        m_head_size(checked_size(head_size, "head_size")),
        m_max_seq_len(checked_size(max_seq_len, "max_seq_len")),
        m_rule(rule) {
    // The weights, and the Q|K|V rows of a full-length sequence (also the most a cache holds), must be
    // addressable: sizes whose products overflow are refused here, not at the first allocation.
    detail::require_fits({emb_size, head_size}, sizeof(Compute), "HeadAttention",
                         "emb_size * head_size * element size");
    detail::require_fits({max_seq_len, 3, head_size}, sizeof(Compute), "HeadAttention",
                         "max_seq_len * 3 * head_size * element size");
    detail::UniformSource uniform(seed.value());
    m_query = detail::make_linear<Scalar>(emb_size, head_size, uniform);
    m_key = detail::make_linear<Scalar>(emb_size, head_size, uniform);
    m_value = detail::make_linear<Scalar>(emb_size, head_size, uniform);
  }

  /// The sizes the layer was built with: input features, output features, longest sequence.
  ///@{
  Index emb_size() const { return m_emb_size; }
  Index head_size() const { return m_head_size; }
  Index max_seq_len() const { return m_max_seq_len; }
  ///@}

  /// The Q, K and V projections (PyTorch's _q, _k, _v). Assign trained weights here: weight [head_size,
  /// emb_size] exactly as in a PyTorch state_dict, bias [head_size]. Shapes are checked at the next forward
  /// call.
  ///@{
  LinearType& query() { return m_query; }
  const LinearType& query() const { return m_query; }
  LinearType& key() { return m_key; }
  const LinearType& key() const { return m_key; }
  LinearType& value() { return m_value; }
  const LinearType& value() const { return m_value; }
  ///@}

  /// Which keys each query sees: causal (the default, the seed's), bidirectional or a sliding window. A
  /// change takes effect on the next call; caches made under another rule are then refused.
  ///@{
  const MaskRule& mask_rule() const { return m_rule; }
  void set_mask_rule(const MaskRule& rule) { m_rule = rule; }
  ///@}

  /// The [T, T] causal mask, true where query i may see key j (j <= i): the seed's _tril_mask buffer, built
  /// on request (the layer stores none), whatever the layer's own rule. Throws shape_error unless 0 <= T <=
  /// max_seq_len.
  Mask tril_mask(Index T) const {
    check_seq_len(T, "HeadAttention::tril_mask");
    return rule_mask(MaskRule::causal(), T);
  }

  /// The [T, T] mask of the layer's rule, true where query i sees key j. Throws shape_error unless 0 <= T <=
  /// max_seq_len.
  Mask mask(Index T) const {
    check_seq_len(T, "HeadAttention::mask");
    return rule_mask(m_rule, T);
  }

  /// Caps the threads of one forward call at n; 0 (the default) follows Eigen::setNbThreads, else
  /// OMP_NUM_THREADS, else one per core, but runs a call of less than about 2e7 flops on one thread (every
  /// decode step of one sequence, short prefills): on cores shared with other processes a team's barriers
  /// can each wait out a scheduler time slice, milliseconds for a step of microseconds. An explicit n is
  /// honoured for any call above about 1e5 flops: set_num_threads(2) or more speeds up decode steps (a
  /// query's keys are then cut into ranges, one per work item) where the cores are not shared
  /// (docs/decoding.md, "Which thread count for decoding"). Every thread that calls forward forks a team of
  /// its own: callers that run several forward calls at once on their own threads should set 1 here (or
  /// OMP_NUM_THREADS=1) to avoid oversubscribing the cores. Without OpenMP the setting is kept but every call
  /// runs on one thread. Throws shape_error if n < 0.
  void set_num_threads(int n) {
    HEAD_ATTENTION_REQUIRE(n >= 0, "HeadAttention::set_num_threads", "the thread count", ">= 0",
                           std::to_string(n));
    m_threads = n;
  }
  /// The thread count a large forward call made now, from this thread, would run on: the setting (or its
  /// default), 1 inside an active OpenMP parallel region (a forward call never forks a nested team), and 1
  /// without OpenMP. Small inputs run on one thread whatever this says (below about 2e7 flops on the default
  /// setting, 1e5 on an explicit one).
  int num_threads() const {
    if (!detail::has_openmp || detail::in_parallel_region()) return 1;
    return requested_threads();
  }

  /// simple_llm's get_attention_weights for one sequence: the softmax weights [T, T] under the layer's rule,
  /// without the product with V (masked entries are exactly 0; a row that sees no key is all 0). This one
  /// builds the [T, T] matrix, as it must; forward() never does. Throws as forward() does.
  template <typename Derived>
  Matrix attention_weights(const Eigen::MatrixBase<Derived>& x) const {
    check_input<Derived>();
    check_call(x.cols(), x.rows(), "HeadAttention::attention_weights", "x.cols() (input width)",
               "x.rows() (T)");
    if constexpr (std::is_same<Compute, Scalar>::value) {
      return reference::attention_weights(x, m_query, m_key, m_rule);
    } else {  // computed in float, like forward
      const Eigen::Matrix<Compute, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> wide =
          x.template cast<Compute>();
      return reference::attention_weights(wide, detail::widen(m_query), detail::widen(m_key), m_rule)
          .template cast<Scalar>();
    }
  }

  /// An empty KV cache for incremental decoding with this layer (its sizes and mask rule), storing keys and
  /// values in `storage` (by default the layer's Scalar). A float layer's cache in bfloat16 or float16 holds
  /// half the bytes, so a decode step streams half as much; keys and values are rounded to nearest even
  /// when stored and computed with in the layer's precision.
  KVCache<Scalar> make_cache(Precision storage = precision_of<Scalar>()) const {
    return detail::CacheAccess::make<Scalar>(m_emb_size, m_head_size, m_max_seq_len, m_rule, storage);
  }

  /// The caches of `batch` sequences decoded together, one KVCache each (forward_cached and
  /// forward_cached_into take the vector), as every form's make_cache(batch, storage). Throws shape_error if
  /// batch < 0.
  std::vector<KVCache<Scalar>> make_cache(Index batch, Precision storage = precision_of<Scalar>()) const {
    HEAD_ATTENTION_REQUIRE(batch >= 0, "HeadAttention::make_cache", "batch", ">= 0", std::to_string(batch));
    return std::vector<KVCache<Scalar>>(static_cast<std::size_t>(batch), make_cache(storage));
  }

 private:
  friend class AttentionBase<HeadAttention, Scalar>;  // the entry points call the hooks below
  friend class HeadTrainingBase<HeadAttention, Scalar>;
  template <typename, typename>
  friend class HeadTrainingBase;  // BatchedHeadAttention's training calls run on its layer
  template <typename, typename>
  friend class HeadTrainingTensorBase;
  friend class BatchedHeadAttention<Scalar>;  // forwards its hooks to its layer's
  friend class PackedHeadAttention<Scalar>;   // copies the thread setting

  // The hooks of AttentionBase and HeadTrainingBase.
  static constexpr detail::FormNames names() {
    return {"HeadAttention::forward",           "HeadAttention::forward_into",
            "HeadAttention::forward_cached",    "HeadAttention::forward_cached_into",
            "HeadAttention::reserve_workspace", "HeadAttention::reserve_cached_workspace"};
  }
  Index out_features() const { return m_head_size; }
  const HeadAttention& head_layer() const { return *this; }
  template <typename Cache>
  static constexpr bool takes_cache =
      std::is_same<Cache, KVCache<Scalar>>::value || std::is_same<Cache, std::vector<KVCache<Scalar>>>::value;
  static Index cache_sequences(const KVCache<Scalar>&) { return 1; }
  static Index cache_sequences(const std::vector<KVCache<Scalar>>& caches) {
    return static_cast<Index>(caches.size());
  }

  template <typename Derived>
  void rows_into(const Eigen::MatrixBase<Derived>& x, OutputRef& out, const Batch& batch,
                 Workspace<Scalar>* workspace, const char* where) const {
    batch_into(x, batch.sequences(), out, batch.lengths(), workspace, nullptr, where);
  }
  template <typename Derived>
  void decode_into(const Eigen::MatrixBase<Derived>& x, KVCache<Scalar>& cache, OutputRef& out,
                   Workspace<Scalar>* workspace, const char* where) const {
    cached(x, &cache, 1, out, where, workspace);
  }
  template <typename Derived>
  void decode_into(const Eigen::MatrixBase<Derived>& x, std::vector<KVCache<Scalar>>& caches, OutputRef& out,
                   Workspace<Scalar>* workspace, const char* where) const {
    cached(x, caches.data(), static_cast<Index>(caches.size()), out, where, workspace);
  }
  void reserve_rows(Workspace<Scalar>& workspace, Index batch, Index seq_len, const char* where) const {
    check_reservation(batch, seq_len, where);
    size_workspace(workspace, batch, seq_len, nullptr, where);
  }
  void reserve_decode(Workspace<Scalar>& workspace, const KVCache<Scalar>& cache, Index t,
                      const char* where) const {
    reserve_for_caches(workspace, &cache, 1, t, where);
  }
  void reserve_decode(Workspace<Scalar>& workspace, const std::vector<KVCache<Scalar>>& caches, Index t,
                      const char* where) const {
    reserve_for_caches(workspace, caches.data(), static_cast<Index>(caches.size()), t, where);
  }

  template <typename Derived>
  static constexpr void check_input() {
    static_assert(std::is_same<typename Derived::Scalar, Scalar>::value,
                  "HeadAttention<Scalar>::forward needs an input of the same Scalar");
  }

  int requested_threads() const { return m_threads > 0 ? m_threads : detail::default_thread_count(); }

  static Mask rule_mask(const MaskRule& rule, Index T) {
    Mask mask(T, T);
    for (Index i = 0; i < T; ++i)
      for (Index j = 0; j < T; ++j)
        mask(i, j) = rule.visible(i, j, T);
    return mask;
  }

  void check_out(const OutputRef& out, Index rows, const char* where) const {
    HEAD_ATTENTION_REQUIRE(out.rows() == rows && out.cols() == m_head_size, where, "out shape",
                           detail::shape_string(rows, m_head_size),
                           detail::shape_string(out.rows(), out.cols()));
  }

  /// forward_into over `batch` sequences back to back, with right padding when lengths is not null; also
  /// each row's logsumexp into lse ([x.rows()]) when it is not null (a training forward).
  template <typename Derived>
  void batch_into(const Eigen::MatrixBase<Derived>& x, Index batch, OutputRef out,
                  const std::vector<Index>* lengths, Workspace<Scalar>* workspace, Compute* lse = nullptr,
                  const char* where = "HeadAttention::forward_into") const {
    check_input<Derived>();
    const Index seq_len = detail::sequence_length(x.rows(), batch, where);
    check_call(x.cols(), seq_len, where, "x.cols() (input width)",
               batch == 1 ? "x.rows() (T)" : "x.rows() / batch (T)");
    check_out(out, x.rows(), where);
    detail::AttentionPlan<Scalar> plan;
    plan.rule = m_rule;
    if (lengths != nullptr) {
      detail::check_lengths(*lengths, batch, seq_len, where);
      plan.lengths = lengths->data();
    }
    if (workspace != nullptr) plan.buffers = &workspace->m_buffers;
    plan.lse = lse;
    plan.where = where;
    run(x, batch, seq_len, out.data(), out.outerStride(), plan);
  }

  /// forward_training over the rows laid out as `batch` says.
  template <typename Derived>
  TrainingState<Scalar> training_rows(const Eigen::MatrixBase<Derived>& x, const Batch& batch,
                                      const char* where = "HeadAttention::forward_training") const {
    static_assert(std::is_same<Compute, Scalar>::value,
                  "HeadAttention::forward_training needs float or double");
    TrainingState<Scalar> state;
    state.output.resize(x.rows(), m_head_size);  // [rows, head]
    state.lse.resize(x.rows());                  // [rows]
    batch_into(x, batch.sequences(), state.output, batch.lengths(), nullptr, state.lse.data(), where);
    return state;
  }

  /// The backward of `batch` sequences back to back, with right padding when lengths is not null, from a
  /// training forward's state when it is not null, into `grads` and dx ([x.rows(), emb_size], contiguous
  /// rows), which the caller allocated.
  template <typename Derived, typename GradDerived>
  void backward_into(const Eigen::MatrixBase<Derived>& x, Index batch,
                     const Eigen::MatrixBase<GradDerived>& grad_out, const std::vector<Index>* lengths,
                     HeadGradients<Scalar>& grads, Scalar* dx, const char* where,
                     const TrainingState<Scalar>* state = nullptr) const {
    static_assert(std::is_same<Compute, Scalar>::value, "HeadAttention::backward needs float or double");
    check_input<Derived>();
    check_input<GradDerived>();
    const Index seq_len = detail::sequence_length(x.rows(), batch, where);
    check_call(x.cols(), seq_len, where, "x.cols() (input width)",
               batch == 1 ? "x.rows() (T)" : "x.rows() / batch (T)");
    HEAD_ATTENTION_REQUIRE(grad_out.rows() == x.rows() && grad_out.cols() == m_head_size, where,
                           "grad_out shape", detail::shape_string(x.rows(), m_head_size),
                           detail::shape_string(grad_out.rows(), grad_out.cols()));
    if (lengths != nullptr) detail::check_lengths(*lengths, batch, seq_len, where);
    if (state != nullptr) detail::check_state(*state, x.rows(), 1, m_head_size, where);
    Matrix x_copy, grad_copy;
    const LinearType* const layers[3] = {&m_query, &m_key, &m_value};
    detail::BackwardCall<Scalar> call;
    call.x = detail::row_major_data(x, x_copy, call.x_stride);
    call.dout = detail::row_major_data(grad_out, grad_copy, call.dout_stride);
    call.batch = batch;
    call.seq_len = seq_len;
    call.layers = layers;
    call.rule = m_rule;
    call.lengths = lengths != nullptr ? lengths->data() : nullptr;
    call.grads = &grads;
    call.dx = dx;
    if (state != nullptr) {
      call.saved_out = state->output.data();
      call.saved_stride = state->output.outerStride();
      call.saved_lse = state->lse.data();
    }
    call.threads = num_threads();
    detail::backward(call);
  }

  /// The cached forward of `count` chunks stored back to back in x, chunk b extending *caches[b].
  template <typename Derived>
  void cached(const Eigen::MatrixBase<Derived>& x, KVCache<Scalar>* caches, Index count, OutputRef out,
              const char* where, Workspace<Scalar>* workspace) const {
    check_input<Derived>();
    HEAD_ATTENTION_REQUIRE(count > 0 ? x.rows() % count == 0 : x.rows() == 0, where, "x.rows()",
                           "a multiple of the number of caches = " + std::to_string(count),
                           std::to_string(x.rows()));
    const Index t = count > 0 ? x.rows() / count : 0;
    check_call(x.cols(), t, where, "x.cols() (input width)", "x.rows() (t)");
    check_out(out, x.rows(), where);
    for (Index b = 0; b < count; ++b)
      detail::CacheAccess::check_fits(caches[b], m_emb_size, m_head_size, m_max_seq_len, m_rule, t, where,
                                      count == 1 ? "cache" : "caches[" + std::to_string(b) + "]");
    if (t == 0) return;
    detail::CacheAccess::step(
        caches, count, t, m_rule,
        workspace != nullptr ? workspace->m_stores : detail::thread_list<detail::KVStore*>(),
        [&](detail::KVStore** stores) {
          detail::AttentionPlan<Scalar> plan;
          plan.rule = m_rule;
          plan.caches = stores;
          plan.where = where;
          if (workspace != nullptr) plan.buffers = &workspace->m_buffers;
          run(x, count, t, out.data(), out.outerStride(), plan);
        });
  }

  void check_reservation(Index batch, Index seq_len, const char* where) const {
    detail::check_projections(*this, where);
    HEAD_ATTENTION_REQUIRE(batch >= 0, where, "batch", ">= 0", std::to_string(batch));
    HEAD_ATTENTION_REQUIRE(seq_len >= 0 && seq_len <= m_max_seq_len, where, "seq_len",
                           "in [0, max_seq_len = " + std::to_string(m_max_seq_len) + "]",
                           std::to_string(seq_len));
    detail::require_fits({batch, seq_len, m_emb_size}, sizeof(Scalar), where, "batch · seq_len · emb_size");
  }

  void reserve_for_caches(Workspace<Scalar>& workspace, const KVCache<Scalar>* caches, Index count, Index t,
                          const char* where) const {
    HEAD_ATTENTION_REQUIRE(t >= 1, where, "t", ">= 1", std::to_string(t));
    check_reservation(count, t, where);
    for (Index b = 0; b < count; ++b)
      detail::CacheAccess::check_fits(caches[b], m_emb_size, m_head_size, m_max_seq_len, m_rule, 0, where,
                                      count == 1 ? "cache" : "caches[" + std::to_string(b) + "]");
    workspace.m_stores.resize(static_cast<std::size_t>(count));
    for (Index b = 0; b < count; ++b)  // read for their sizes only (AttentionPlan::size_only)
      workspace.m_stores[static_cast<std::size_t>(b)] = detail::CacheAccess::sizing_store(caches[b]);
    size_workspace(workspace, count, t, workspace.m_stores.data(), where);
  }

  /// Sizes the workspace's buffers through the forward pass itself (AttentionPlan::size_only).
  void size_workspace(Workspace<Scalar>& workspace, Index batch, Index seq_len,
                      detail::KVStore* const* caches, const char* where) const {
    if (batch == 0 || seq_len == 0) return;
    detail::AttentionPlan<Scalar> plan;
    plan.where = where;
    plan.rule = m_rule;
    plan.caches = caches;
    plan.buffers = &workspace.m_buffers;
    plan.size_only = true;
    const LinearType* const layers[3] = {&m_query, &m_key, &m_value};
    detail::forward<Eigen::RowMajor>(static_cast<const Scalar*>(nullptr), m_emb_size, batch, seq_len, layers,
                                     1, static_cast<Scalar*>(nullptr), m_head_size, m_threads, plan);
  }

  /// `batch` sequences of `seq_len` rows stored back to back in x ([batch · seq_len, emb_size]) into out
  /// ([batch · seq_len, head_size], row-major, leading dimension out_stride). Shapes must have been checked
  /// with check_call.
  template <typename Derived>
  void run(const Eigen::MatrixBase<Derived>& x, Index batch, Index seq_len, Scalar* out,
           Index out_stride) const {
    detail::AttentionPlan<Scalar> plan;
    plan.rule = m_rule;
    run(x, batch, seq_len, out, out_stride, plan);
  }

  template <typename Derived>
  void run(const Eigen::MatrixBase<Derived>& x, Index batch, Index seq_len, Scalar* out, Index out_stride,
           const detail::AttentionPlan<Scalar>& plan) const {
    const LinearType* const layers[3] = {&m_query, &m_key, &m_value};
    detail::forward_expression(x, batch, seq_len, layers, 1, out, out_stride, m_threads, plan);
  }

  /// Throws shape_error unless an input of this width and length can be run now: width == emb_size,
  /// length <= max_seq_len, and all three projections of shape [head_size, emb_size] + [head_size].
  void check_call(Index width, Index length, const char* where, const char* width_name,
                  const char* length_name) const {
    detail::check_projections(*this, where);
    HEAD_ATTENTION_REQUIRE(width == m_emb_size, where, width_name, "emb_size = " + std::to_string(m_emb_size),
                           std::to_string(width));
    HEAD_ATTENTION_REQUIRE(length <= m_max_seq_len, where, length_name,
                           "<= max_seq_len = " + std::to_string(m_max_seq_len), std::to_string(length));
  }

  static Index checked_size(Index value, const char* name) {
    HEAD_ATTENTION_REQUIRE(value > 0, "HeadAttention", name, "> 0", std::to_string(value));
    return value;
  }

  void check_seq_len(Index T, const char* where) const {
    HEAD_ATTENTION_REQUIRE(T >= 0 && T <= m_max_seq_len, where, "T",
                           "in [0, max_seq_len = " + std::to_string(m_max_seq_len) + "]", std::to_string(T));
  }

  Index m_emb_size;
  Index m_head_size;
  Index m_max_seq_len;
  MaskRule m_rule;
  int m_threads = 0;
  LinearType m_query;  // weight [head_size, emb_size], bias [head_size]
  LinearType m_key;    // weight [head_size, emb_size], bias [head_size]
  LinearType m_value;  // weight [head_size, emb_size], bias [head_size]
};

}  // namespace head_attention

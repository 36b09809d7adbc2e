/// \file
/// head-attention: MultiHeadAttention, simple_llm's num_heads HeadAttentions concatenated and projected back.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "attention.hpp"
#include "batched.hpp"
#include "detail/flash.hpp"
#include "detail/flash_backward.hpp"
#include "detail/parallel.hpp"
#include "detail/rng.hpp"
#include "errors.hpp"
#include "gradients.hpp"
#include "kv_cache.hpp"
#include "linear.hpp"
#include "mask.hpp"
#include "tensor_forms.hpp"

namespace head_attention {

/// simple_llm's MultiHeadAttention(num_heads, emb_size, head_size, max_seq_len) at inference: num_heads
/// HeadAttentions over the same input, their outputs concatenated ([T, num_heads · head_size]) and projected
/// back by nn.Linear(num_heads · head_size, emb_size) (PyTorch's `_layer`; its dropout is the identity at
/// inference). x [T, emb_size] to [T, emb_size].
///
/// forward() runs every head in one pass: the projections of all heads over each chunk of x (which stays in
/// cache while they read it), then the attention blocks of all heads and sequences as work items of one
/// parallel region (all cores busy even for one sequence), then the output projection, one GEMM per row
/// chunk. Extra memory is O(T · num_heads · head_size). const, and safe to call from many threads at once.
template <typename Scalar>
class MultiHeadAttention : public TensorAttentionBase<MultiHeadAttention<Scalar>, Scalar> {
  static_assert(detail::is_layer_scalar<Scalar>,
                "MultiHeadAttention<Scalar> needs float, double, Eigen::half or Eigen::bfloat16");

 public:
  /// Eigen's signed index type, for every size and position.
  using Index = Eigen::Index;
  /// One head: each is a full HeadAttention, its weights loaded through head(i).
  using Head = HeadAttention<Scalar>;
  /// Row-major dynamic matrix of Scalar, as HeadAttention's.
  using Matrix = typename Head::Matrix;
  /// Column vector of Scalar (biases).
  using Vector = typename Head::Vector;
  /// The projections' type, Linear<Scalar>.
  using LinearType = Linear<Scalar>;
  /// Where forward_into writes: any row-major [rows, emb_size] storage with contiguous rows.
  using OutputRef = Eigen::Ref<Matrix, 0, Eigen::OuterStride<>>;
  /// [B, T, features] tensors, row-major as in BatchedHeadAttention.
  using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;

  /// simple_llm's MultiHeadAttention(num_heads, emb_size, head_size, max_seq_len, dropout=0.1), in its
  /// argument order: `dropout` is the probability the training-mode calls apply (see dropout()), a
  /// floating-point value (an integer there does not compile; see Probability). Builds num_heads heads and
  /// the output projection with PyTorch's default nn.Linear init, all drawn from one generator seeded with
  /// `seed`: heads 0..num_heads-1 (each q.weight, q.bias, k.weight, k.bias, v.weight, v.bias,
  /// U(±1/sqrt(emb_size))), then the projection's weight and bias, U(±1/sqrt(num_heads · head_size)). `rule`
  /// is every head's mask rule (causal by default). Throws shape_error unless all four sizes are positive and
  /// dropout is in [0, 1).
  MultiHeadAttention(Index num_heads, Index emb_size, Index head_size, Index max_seq_len,
                     Probability dropout = 0.1, Seed seed = 0, const MaskRule& rule = MaskRule::causal())
      : m_dropout(dropout.value()) {
    HEAD_ATTENTION_REQUIRE(num_heads > 0, "MultiHeadAttention", "num_heads", "> 0",
                           std::to_string(num_heads));
    HEAD_ATTENTION_REQUIRE(m_dropout >= 0 && m_dropout < 1, "MultiHeadAttention", "dropout", "in [0, 1)",
                           std::to_string(m_dropout));
    // Every size before anything is reserved: a bad one must be named, not surface as length_error or
    // bad_alloc from reserving num_heads heads.
    HEAD_ATTENTION_REQUIRE(emb_size > 0, "MultiHeadAttention", "emb_size", "> 0", std::to_string(emb_size));
    HEAD_ATTENTION_REQUIRE(head_size > 0, "MultiHeadAttention", "head_size", "> 0",
                           std::to_string(head_size));
    HEAD_ATTENTION_REQUIRE(max_seq_len > 0, "MultiHeadAttention", "max_seq_len", "> 0",
                           std::to_string(max_seq_len));
    detail::require_fits({num_heads}, sizeof(Head), "MultiHeadAttention",
                         "num_heads * sizeof(HeadAttention)");
    // All heads' Q|K|V rows of a full-length sequence, and the projection's weight, must be addressable.
    detail::require_fits({num_heads, max_seq_len, 3, head_size}, sizeof(detail::compute_t<Scalar>),
                         "MultiHeadAttention", "num_heads * max_seq_len * 3 * head_size * element size");
    detail::require_fits({num_heads, head_size, emb_size}, sizeof(detail::compute_t<Scalar>),
                         "MultiHeadAttention", "num_heads * head_size * emb_size * element size");
    m_heads.reserve(static_cast<std::size_t>(num_heads));
    detail::UniformSource uniform(seed.value());
    for (Index h = 0; h < num_heads; ++h) {
      m_heads.emplace_back(emb_size, head_size, max_seq_len, 0, rule);  // checks the sizes
      m_heads.back().query() = detail::make_linear<Scalar>(emb_size, head_size, uniform);
      m_heads.back().key() = detail::make_linear<Scalar>(emb_size, head_size, uniform);
      m_heads.back().value() = detail::make_linear<Scalar>(emb_size, head_size, uniform);
    }
    m_projection = detail::make_linear<Scalar>(num_heads * head_size, emb_size, uniform);
  }

  /// The sizes the layer was built with; head_size is each head's, the output is [T, emb_size].
  ///@{
  Index num_heads() const { return static_cast<Index>(m_heads.size()); }
  Index emb_size() const { return m_heads.front().emb_size(); }
  Index head_size() const { return m_heads.front().head_size(); }
  Index max_seq_len() const { return m_heads.front().max_seq_len(); }
  ///@}

  /// Head i (PyTorch's `_heads[i]`): load its trained weights through query(), key(), value(). Throws
  /// shape_error unless 0 <= i < num_heads.
  ///@{
  Head& head(Index i) { return m_heads[checked_head(i)]; }
  const Head& head(Index i) const { return m_heads[checked_head(i)]; }
  ///@}

  /// The output projection (PyTorch's `_layer`): weight [emb_size, num_heads · head_size], bias [emb_size].
  ///@{
  LinearType& projection() { return m_projection; }
  const LinearType& projection() const { return m_projection; }
  ///@}

  /// Every head's mask rule (see MaskRule); set_mask_rule sets it on all heads.
  ///@{
  const MaskRule& mask_rule() const { return m_heads.front().mask_rule(); }
  void set_mask_rule(const MaskRule& rule) {
    for (Head& head : m_heads)
      head.set_mask_rule(rule);
  }
  ///@}

  /// The thread cap of a forward call, as HeadAttention::set_num_threads (0: Eigen's default, and one thread
  /// for a call below about 2e7 flops, every decode step of one sequence up to several thousand cached
  /// positions; an explicit n is honoured). Throws shape_error if n < 0.
  void set_num_threads(int n) {
    HEAD_ATTENTION_REQUIRE(n >= 0, "MultiHeadAttention::set_num_threads", "the thread count", ">= 0",
                           std::to_string(n));
    m_threads = n;
  }
  /// The thread count a large call made now, from this thread, would run on (1 inside a parallel region or
  /// without OpenMP).
  int num_threads() const {
    if (!detail::has_openmp || detail::in_parallel_region()) return 1;
    return m_threads > 0 ? m_threads : detail::default_thread_count();
  }

  /// simple_llm's dropout probability on the projected output (its `_dropout`, 0.1 by default): forward() is
  /// inference and ignores it; forward_training() and backward_training() apply it. Throws shape_error unless
  /// 0 <= p < 1.
  ///@{
  double dropout() const { return m_dropout; }
  void set_dropout(double p) {
    HEAD_ATTENTION_REQUIRE(p >= 0 && p < 1, "MultiHeadAttention::set_dropout", "p", "in [0, 1)",
                           std::to_string(p));
    m_dropout = p;
  }
  ///@}

  /// What backward and backward_training return for a matrix x: dL/dx [rows, emb_size], every head's
  /// parameter gradients and the output projection's.
  using GradientsType = MultiHeadGradients<Scalar>;
  /// The same for a tensor x: dL/dx [B, T, emb_size].
  using TensorGradientsType = MultiHeadGradients<Scalar, Tensor3>;

  /// The training-mode forward: forward_into's output (the rows laid out as `batch` says), then inverted
  /// dropout, each output entry zeroed with probability dropout() and the others scaled by 1 / (1 -
  /// dropout()). The mask is drawn from `seed` (row-major, one draw per entry): backward_training with the
  /// same seed re-draws it. Throws as forward_into.
  template <typename Derived>
  Matrix forward_training(const Eigen::MatrixBase<Derived>& x, Seed seed,
                          const Batch& batch = Batch()) const {
    return training_matrix(x, seed, nullptr, batch);
  }

  /// forward_training that also keeps, in `state`, what backward_training(x, grad_out, seed, state, batch)
  /// reuses instead of recomputing: state.output [rows, num_heads · head_size] the heads' concatenated
  /// outputs (before the output projection and dropout) and state.lse [num_heads · rows] each head's per-row
  /// softmax logsumexp. The returned output equals forward_training(x, seed, batch) bit for bit. float and
  /// double only. Throws as forward_into, leaving state unchanged.
  template <typename Derived>
  Matrix forward_training(const Eigen::MatrixBase<Derived>& x, Seed seed, TrainingState<Scalar>& state,
                          const Batch& batch = Batch()) const {
    static_assert(std::is_same<detail::compute_t<Scalar>, Scalar>::value,
                  "MultiHeadAttention::forward_training with a state needs float or double");
    return training_matrix(x, seed, &state, batch);
  }

  /// Training at inference semantics (dropout as the identity, as forward runs): x [rows, emb_size] (laid
  /// out as `batch` says) and grad_out = dL/d forward(x) [rows, emb_size] to dL/dx, every head's parameter
  /// gradients and the output projection's, summed over the sequences. The heads' backward is HeadAttention's
  /// (memory-efficient, thread-count independent). float and double only. Throws shape_error as forward_into
  /// does, and unless grad_out is [rows, emb_size].
  template <typename Derived, typename GradDerived>
  GradientsType backward(const Eigen::MatrixBase<Derived>& x, const Eigen::MatrixBase<GradDerived>& grad_out,
                         const Batch& batch = Batch()) const {
    return backward_matrix(x, grad_out, nullptr, nullptr, batch);
  }

  /// The backward of forward_training(x, seed, batch): grad_out = dL/d forward_training(x, seed, batch), the
  /// same dropout mask re-drawn from `seed`.
  template <typename Derived, typename GradDerived>
  GradientsType backward_training(const Eigen::MatrixBase<Derived>& x,
                                  const Eigen::MatrixBase<GradDerived>& grad_out, Seed seed,
                                  const Batch& batch = Batch()) const {
    return backward_matrix(x, grad_out, &seed, nullptr, batch);
  }

  /// backward_training from the state forward_training(x, seed, state, batch) kept: the heads' softmax
  /// statistics and outputs are not recomputed. The state must come from that call (same x, batch, weights
  /// and rule); only its shapes are checked. Throws as backward_training, and unless state.output is [rows,
  /// num_heads · head_size] and state.lse [num_heads · rows].
  template <typename Derived, typename GradDerived>
  GradientsType backward_training(const Eigen::MatrixBase<Derived>& x,
                                  const Eigen::MatrixBase<GradDerived>& grad_out, Seed seed,
                                  const TrainingState<Scalar>& state, const Batch& batch = Batch()) const {
    return backward_matrix(x, grad_out, &seed, &state, batch);
  }

  /// The tensor forms of the training calls: x [B, T, emb_size] and grad_out [B, T, emb_size] (row-major
  /// tensors of Scalar, as forward takes them), with `lengths` right padding; results [B, T, emb_size],
  /// state.output and state.lse flat as for the matrix form of the same rows. Throw as the matrix forms.
  ///@{
  template <typename TensorDerived>
  Tensor3 forward_training(const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x, Seed seed,
                           Padding lengths = Padding()) const {
    return training_tensor(x, seed, nullptr, lengths);
  }
  template <typename TensorDerived>
  Tensor3 forward_training(const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x, Seed seed,
                           TrainingState<Scalar>& state, Padding lengths = Padding()) const {
    static_assert(std::is_same<detail::compute_t<Scalar>, Scalar>::value,
                  "MultiHeadAttention::forward_training with a state needs float or double");
    return training_tensor(x, seed, &state, lengths);
  }
  template <typename TensorDerived, typename GradDerived>
  TensorGradientsType backward(const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
                               const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out,
                               Padding lengths = Padding()) const {
    return backward_tensor(x, grad_out, nullptr, nullptr, lengths);
  }
  template <typename TensorDerived, typename GradDerived>
  TensorGradientsType backward_training(
      const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
      const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out, Seed seed,
      Padding lengths = Padding()) const {
    return backward_tensor(x, grad_out, &seed, nullptr, lengths);
  }
  template <typename TensorDerived, typename GradDerived>
  TensorGradientsType backward_training(
      const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
      const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out, Seed seed,
      const TrainingState<Scalar>& state, Padding lengths = Padding()) const {
    return backward_tensor(x, grad_out, &seed, &state, lengths);
  }
  ///@}

  /// The KV caches of `batch` sequences (every head's keys and values), for incremental decoding.
  class Cache {
   public:
    /// Sequences in the batch.
    Index batch() const { return m_batch; }
    /// Positions processed so far (the same for every sequence).
    Index size() const { return m_caches.empty() ? 0 : m_caches.front().size(); }
    /// Rows of key/value storage allocated per head and sequence.
    Index capacity() const { return m_caches.empty() ? 0 : m_caches.front().capacity(); }
    /// Forgets every position.
    void clear() {
      for (KVCache<Scalar>& cache : m_caches)
        cache.clear();
    }
    /// Allocates every head's storage for max_seq_len positions now (see KVCache::reserve).
    void reserve() {
      for (KVCache<Scalar>& cache : m_caches)
        cache.reserve();
    }
    /// Forgets the positions at or after `size` (see KVCache::truncate).
    void truncate(Index size) {
      if (!m_caches.empty()) m_caches.front().truncate(size);  // throws, if it does, before any change
      for (KVCache<Scalar>& cache : m_caches)
        cache.truncate(size);
    }

   private:
    friend class MultiHeadAttention;
    friend class PackedMultiHeadAttention<Scalar>;
    Index m_batch = 0;
    std::vector<KVCache<Scalar>> m_caches;  // [num_heads · batch], head h of sequence b at h · batch + b
  };

  /// An empty cache for `batch` sequences decoded together, keys and values stored in `storage` (see
  /// HeadAttention::make_cache). Throws shape_error if batch < 0.
  Cache make_cache(Index batch, Precision storage = precision_of<Scalar>()) const {
    HEAD_ATTENTION_REQUIRE(batch >= 0, "MultiHeadAttention::make_cache", "batch", ">= 0",
                           std::to_string(batch));
    Cache cache;
    cache.m_batch = batch;
    cache.m_caches.reserve(static_cast<std::size_t>(num_heads() * batch));
    for (const Head& head : m_heads)
      for (Index b = 0; b < batch; ++b)
        cache.m_caches.push_back(head.make_cache(storage));
    return cache;
  }

  /// An empty cache for one sequence, as make_cache(1, storage).
  Cache make_cache(Precision storage = precision_of<Scalar>()) const { return make_cache(1, storage); }

 private:
  friend class AttentionBase<MultiHeadAttention, Scalar>;  // the entry points call the hooks below
  friend class TensorAttentionBase<MultiHeadAttention, Scalar>;

  // The hooks of the bases.
  static constexpr detail::FormNames names() {
    return {"MultiHeadAttention::forward",           "MultiHeadAttention::forward_into",
            "MultiHeadAttention::forward_cached",    "MultiHeadAttention::forward_cached_into",
            "MultiHeadAttention::reserve_workspace", "MultiHeadAttention::reserve_cached_workspace"};
  }
  Index out_features() const { return emb_size(); }
  template <typename C>
  static constexpr bool takes_cache = std::is_same<C, Cache>::value;
  static Index cache_sequences(const Cache& cache) { return cache.batch(); }
  void check_call(Index width, Index length, const char* where, const char* width_name,
                  const char* length_name) const {
    check(width, length, where, width_name, length_name);
  }
  template <typename Derived>
  void rows_into(const Eigen::MatrixBase<Derived>& x, OutputRef& out, const Batch& batch,
                 Workspace<Scalar>* workspace, const char* where) const {
    batch_into(x, batch.sequences(), out, batch.lengths(), workspace, nullptr, where);
  }
  template <typename Derived>
  void decode_into(const Eigen::MatrixBase<Derived>& x, Cache& cache, OutputRef& out,
                   Workspace<Scalar>* workspace, const char* where) const {
    cached(x, cache, out, where, workspace);
  }
  void reserve_rows(Workspace<Scalar>& workspace, Index batch, Index seq_len, const char* where) const {
    check_reservation(batch, seq_len, where);
    size_workspace(workspace, batch, seq_len, nullptr, where);
  }
  void reserve_decode(Workspace<Scalar>& workspace, const Cache& cache, Index t, const char* where) const {
    HEAD_ATTENTION_REQUIRE(t >= 1, where, "t", ">= 1", std::to_string(t));
    check_reservation(cache.batch(), t, where);
    HEAD_ATTENTION_REQUIRE(static_cast<Index>(cache.m_caches.size()) == num_heads() * cache.batch(), where,
                           "cache heads", std::to_string(num_heads()),
                           std::to_string(cache.batch() > 0 ? cache.m_caches.size() / cache.batch() : 0));
    for (const KVCache<Scalar>& c : cache.m_caches)
      detail::CacheAccess::check_fits(c, emb_size(), head_size(), max_seq_len(), mask_rule(), 0, where,
                                      "cache");
    workspace.m_stores.clear();
    workspace.m_stores.reserve(cache.m_caches.size());
    for (const KVCache<Scalar>& c : cache.m_caches)  // read for their sizes only (AttentionPlan::size_only)
      workspace.m_stores.push_back(detail::CacheAccess::sizing_store(c));
    size_workspace(workspace, cache.batch(), t, workspace.m_stores.data(), where);
  }

  /// forward_training into out [rows, emb_size] (leading dimension out_stride), then its dropout.
  template <typename Derived>
  void training_rows(const Eigen::MatrixBase<Derived>& x, Seed seed, TrainingState<Scalar>* state,
                     const Batch& batch, Scalar* out, Index out_stride) const {
    Eigen::Map<Matrix, 0, Eigen::OuterStride<>> out_rows(out, x.rows(), emb_size(),
                                                         Eigen::OuterStride<>(out_stride));  // [rows, emb]
    OutputRef out_ref(out_rows);
    batch_into(x, batch.sequences(), out_ref, batch.lengths(), nullptr, state,
               "MultiHeadAttention::forward_into");
    detail::dropout_in_place(out_rows, m_dropout, seed.value());
  }

  template <typename Derived>
  Matrix training_matrix(const Eigen::MatrixBase<Derived>& x, Seed seed, TrainingState<Scalar>* state,
                         const Batch& batch) const {
    if constexpr (detail::input_ok<Scalar, Derived>()) {
      Matrix out(x.rows(), emb_size());  // [rows, emb]
      training_rows(x, seed, state, batch, out.data(), emb_size());
      return out;
    } else {
      return Matrix();
    }
  }

  template <typename TensorDerived>
  Tensor3 training_tensor(const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x, Seed seed,
                          TrainingState<Scalar>* state, Padding lengths) const {
    return detail::with_tensor_data<Scalar>(
        x, [&](const Scalar* data, Index batch, Index seq_len, Index width) {
          const char* where = "MultiHeadAttention::forward_training";
          check(width, seq_len, where, "x.dimension(2) (input width)", "x.dimension(1) (T)");
          Tensor3 out(batch, seq_len, emb_size());                            // [B, T, emb]
          const Eigen::Map<const Matrix> rows(data, batch * seq_len, width);  // [B·T, emb]
          training_rows(rows, seed, state, Batch(batch, lengths), out.data(), emb_size());
          return out;
        });
  }

  template <typename Derived, typename GradDerived>
  GradientsType backward_matrix(const Eigen::MatrixBase<Derived>& x,
                                const Eigen::MatrixBase<GradDerived>& grad_out, const Seed* seed,
                                const TrainingState<Scalar>* state, const Batch& batch) const {
    if constexpr (detail::input_ok<Scalar, Derived>() && detail::input_ok<Scalar, GradDerived>()) {
      GradientsType g;
      g.input.resize(x.rows(), emb_size());  // [rows, emb]
      backward_rows(x, batch.sequences(), grad_out, seed, batch.lengths(), state, g, g.input.data());
      return g;
    } else {
      return {};
    }
  }

  template <typename TensorDerived, typename GradDerived>
  TensorGradientsType backward_tensor(
      const Eigen::TensorBase<TensorDerived, Eigen::ReadOnlyAccessors>& x,
      const Eigen::TensorBase<GradDerived, Eigen::ReadOnlyAccessors>& grad_out, const Seed* seed,
      const TrainingState<Scalar>* state, Padding lengths) const {
    return detail::with_tensor_data<Scalar>(
        x, [&](const Scalar* data, Index batch, Index seq_len, Index width) {
          return detail::with_tensor_data<Scalar>(
              grad_out, [&](const Scalar* grad, Index gb, Index gt, Index gw) {
                const char* where = "MultiHeadAttention::backward";
                check(width, seq_len, where, "x.dimension(2) (input width)", "x.dimension(1) (T)");
                HEAD_ATTENTION_REQUIRE(gb == batch && gt == seq_len && gw == emb_size(), where,
                                       "grad_out shape", detail::shape_string(batch, seq_len, emb_size()),
                                       detail::shape_string(gb, gt, gw));
                const Eigen::Map<const Matrix> rows(data, batch * seq_len, width);            // [B·T, emb]
                const Eigen::Map<const Matrix> grad_rows(grad, batch * seq_len, emb_size());  // [B·T, emb]
                TensorGradientsType g;
                g.input.resize(batch, seq_len, width);  // [B, T, emb]
                backward_rows(rows, batch, grad_rows, seed, lengths.lengths(), state, g, g.input.data());
                return g;
              });
        });
  }

  /// forward_into; with `state`, also the heads' concatenated outputs and logsumexps into it (after every
  /// check).
  template <typename Derived>
  void batch_into(const Eigen::MatrixBase<Derived>& x, Index batch, OutputRef& out,
                  const std::vector<Index>* lengths, Workspace<Scalar>* workspace,
                  TrainingState<Scalar>* state, const char* where) const {
    check_input<Derived>();
    const Index seq_len = detail::sequence_length(x.rows(), batch, where);
    check(x.cols(), seq_len, where, "x.cols() (input width)",
          batch == 1 ? "x.rows() (T)" : "x.rows() / batch (T)");
    HEAD_ATTENTION_REQUIRE(out.rows() == x.rows() && out.cols() == emb_size(), where, "out shape",
                           detail::shape_string(x.rows(), emb_size()),
                           detail::shape_string(out.rows(), out.cols()));
    detail::AttentionPlan<Scalar> plan;
    plan.where = where;
    if (lengths != nullptr) {
      detail::check_lengths(*lengths, batch, seq_len, where);
      plan.lengths = lengths->data();
    }
    if (workspace != nullptr) plan.buffers = &workspace->m_buffers;
    if constexpr (std::is_same<detail::compute_t<Scalar>, Scalar>::value) {  // training: float, double
      if (state != nullptr) {
        // The concatenation stays in the forward's buffers: given our own, it is read from there afterwards.
        detail::ForwardBuffers<Scalar> buffers;
        plan.buffers = &buffers;
        const Index rows = x.rows(), width = num_heads() * head_size();
        Vector lse(num_heads() * rows);  // [heads · rows]
        plan.lse = lse.data();
        run(x, batch, seq_len, out.data(), out.outerStride(), plan, workspace);
        if (rows > 0)
          state->output = Eigen::Map<const Matrix>(buffers.concat.data(), rows, width);
        else
          state->output.resize(0, width);
        state->lse.swap(lse);
        return;
      }
    }
    run(x, batch, seq_len, out.data(), out.outerStride(), plan, workspace);
  }

  /// The backward of `batch` sequences back to back, through the dropout mask of `seed` when it is not null,
  /// with right padding when lengths is not null, from a training forward's state when it is not null: the
  /// parameter gradients into g, dL/dx into dx ([x.rows(), emb_size], contiguous rows), which the caller
  /// allocated.
  template <typename Derived, typename GradDerived, typename Grads>
  void backward_rows(const Eigen::MatrixBase<Derived>& x, Index batch,
                     const Eigen::MatrixBase<GradDerived>& grad_out, const Seed* seed,
                     const std::vector<Index>* lengths, const TrainingState<Scalar>* state, Grads& g,
                     Scalar* dx) const {
    static_assert(std::is_same<detail::compute_t<Scalar>, Scalar>::value,
                  "MultiHeadAttention::backward needs float or double");
    check_input<Derived>();
    check_input<GradDerived>();
    const char* where = "MultiHeadAttention::backward";
    const Index seq_len = detail::sequence_length(x.rows(), batch, where);
    check(x.cols(), seq_len, where, "x.cols() (input width)",
          batch == 1 ? "x.rows() (T)" : "x.rows() / batch (T)");
    HEAD_ATTENTION_REQUIRE(grad_out.rows() == x.rows() && grad_out.cols() == emb_size(), where,
                           "grad_out shape", detail::shape_string(x.rows(), emb_size()),
                           detail::shape_string(grad_out.rows(), grad_out.cols()));
    if (lengths != nullptr) detail::check_lengths(*lengths, batch, seq_len, where);
    const Index rows = x.rows();
    const Index width = num_heads() * head_size();
    if (state != nullptr) detail::check_state(*state, rows, num_heads(), head_size(), where);
    Matrix dy = grad_out;  // [rows, emb] dL/d (the projection's output)
    if (seed != nullptr) detail::dropout_in_place(dy, m_dropout, seed->value());
    Matrix dconcat(rows, width);  // [rows, heads·head] dL/d (the heads' concatenated outputs)
    // [rows, heads·head] the heads' outputs: the state's, else recomputed by the backward
    Matrix recomputed(state != nullptr ? 0 : rows, width);
    const Matrix& concat = state != nullptr ? state->output : recomputed;
    g.heads.resize(static_cast<std::size_t>(num_heads()));
    {
      const detail::SerialEigenProducts serial;  // rounding independent of the thread count
      dconcat.noalias() = dy * m_projection.weight;
    }
    std::vector<const LinearType*> layers;
    for (const Head& head : m_heads)
      for (const LinearType* l : {&head.query(), &head.key(), &head.value()})
        layers.push_back(l);
    Matrix x_copy;
    detail::BackwardCall<Scalar> call;
    call.x = detail::row_major_data(x, x_copy, call.x_stride);
    call.batch = batch;
    call.seq_len = seq_len;
    call.layers = layers.data();
    call.heads = num_heads();
    call.dout = dconcat.data();
    call.dout_stride = width;
    call.rule = mask_rule();
    call.lengths = lengths != nullptr ? lengths->data() : nullptr;
    call.grads = g.heads.data();
    call.dx = dx;
    if (state != nullptr) {
      call.saved_out = state->output.data();
      call.saved_stride = state->output.outerStride();
      call.saved_lse = state->lse.data();
    } else {
      call.out = recomputed.data();
      call.out_stride = width;
    }
    call.threads = num_threads();
    detail::backward(call);
    const detail::SerialEigenProducts serial;
    g.projection.weight.noalias() = dy.transpose() * concat;  // [emb, heads·head]
    // [emb] (no rows: zeros; Eigen's colwise() over 0 rows offsets a null pointer, UBSan says)
    if (rows > 0)
      g.projection.bias = dy.colwise().sum().transpose();
    else
      g.projection.bias.setZero(emb_size());
  }

  template <typename Derived>
  static constexpr void check_input() {
    static_assert(std::is_same<typename Derived::Scalar, Scalar>::value,
                  "MultiHeadAttention<Scalar>::forward needs an input of the same Scalar");
  }

  std::size_t checked_head(Index i) const {
    HEAD_ATTENTION_REQUIRE(i >= 0 && i < num_heads(), "MultiHeadAttention::head", "i",
                           "in [0, num_heads = " + std::to_string(num_heads()) + ")", std::to_string(i));
    return static_cast<std::size_t>(i);
  }

  /// Throws shape_error unless every weight has its shape, all heads share one rule, and an input of this
  /// width and length can be run.
  void check(Index width, Index length, const char* where, const char* width_name,
             const char* length_name) const {
    for (Index h = 0; h < num_heads(); ++h) {
      const Head& head = m_heads[static_cast<std::size_t>(h)];
      bool fits = true;
      for (const LinearType* l : {&head.query(), &head.key(), &head.value()})
        fits = fits && l->weight.rows() == head_size() && l->weight.cols() == emb_size() &&
               l->bias.size() == head_size();
      if (!fits) {  // the message built only now: the check runs on every call, decode steps included
        const std::string at = std::string(where) + " (head " + std::to_string(h) + ")";
        detail::check_projections(head, at.c_str());
      }
      HEAD_ATTENTION_REQUIRE(m_heads[static_cast<std::size_t>(h)].mask_rule() == mask_rule(), where,
                             "head " + std::to_string(h) + "'s mask rule", "head 0's, " + mask_rule().name(),
                             m_heads[static_cast<std::size_t>(h)].mask_rule().name());
    }
    detail::check_linear(m_projection, where, "projection()", num_heads() * head_size(), emb_size());
    HEAD_ATTENTION_REQUIRE(width == emb_size(), where, width_name, "emb_size = " + std::to_string(emb_size()),
                           std::to_string(width));
    HEAD_ATTENTION_REQUIRE(length <= max_seq_len(), where, length_name,
                           "<= max_seq_len = " + std::to_string(max_seq_len()), std::to_string(length));
  }

  template <typename Derived>
  void cached(const Eigen::MatrixBase<Derived>& x, Cache& cache, OutputRef out, const char* where,
              Workspace<Scalar>* workspace) const {
    check_input<Derived>();
    const Index batch = cache.batch();
    HEAD_ATTENTION_REQUIRE(batch > 0 ? x.rows() % batch == 0 : x.rows() == 0, where, "x.rows()",
                           "a multiple of the cache's batch = " + std::to_string(batch),
                           std::to_string(x.rows()));
    const Index t = batch > 0 ? x.rows() / batch : 0;
    check(x.cols(), t, where, "x.cols() (input width)", "x.rows() (t)");
    HEAD_ATTENTION_REQUIRE(out.rows() == x.rows() && out.cols() == emb_size(), where, "out shape",
                           detail::shape_string(x.rows(), emb_size()),
                           detail::shape_string(out.rows(), out.cols()));
    HEAD_ATTENTION_REQUIRE(static_cast<Index>(cache.m_caches.size()) == num_heads() * batch, where,
                           "cache heads", std::to_string(num_heads()),
                           std::to_string(batch > 0 ? cache.m_caches.size() / batch : 0));
    const MaskRule& rule = mask_rule();
    for (const KVCache<Scalar>& c : cache.m_caches)
      detail::CacheAccess::check_fits(c, emb_size(), head_size(), max_seq_len(), rule, t, where, "cache");
    if (t == 0) return;
    detail::CacheAccess::step(
        cache.m_caches.data(), static_cast<Index>(cache.m_caches.size()), t, rule,
        workspace != nullptr ? workspace->m_stores : detail::thread_list<detail::KVStore*>(),
        [&](detail::KVStore** stores) {
          detail::AttentionPlan<Scalar> plan;
          plan.caches = stores;
          plan.where = where;
          if (workspace != nullptr) plan.buffers = &workspace->m_buffers;
          run(x, batch, t, out.data(), out.outerStride(), plan, workspace);
        });
  }

  void check_reservation(Index batch, Index seq_len, const char* where) const {
    HEAD_ATTENTION_REQUIRE(batch >= 0, where, "batch", ">= 0", std::to_string(batch));
    HEAD_ATTENTION_REQUIRE(seq_len >= 0, where, "seq_len", ">= 0", std::to_string(seq_len));
    check(emb_size(), seq_len, where, "emb_size", "seq_len");
    detail::require_fits({batch, seq_len, emb_size()}, sizeof(Scalar), where, "batch · seq_len · emb_size");
  }

  /// Sizes the workspace's buffers through the forward pass itself (AttentionPlan::size_only).
  void size_workspace(Workspace<Scalar>& workspace, Index batch, Index seq_len,
                      detail::KVStore* const* caches, const char* where) const {
    detail::AttentionPlan<Scalar> plan;
    plan.where = where;
    plan.caches = caches;
    plan.buffers = &workspace.m_buffers;
    plan.size_only = true;
    const Eigen::Map<const Matrix> nothing(nullptr, batch * seq_len, emb_size());  // never read
    run(nothing, batch, seq_len, nullptr, emb_size(), plan, &workspace);
  }

  /// All heads and the output projection over `batch` sequences of `seq_len` rows: out [batch · seq_len,
  /// emb_size], leading dimension out_stride. Shapes must have been checked.
  template <typename Derived>
  void run(const Eigen::MatrixBase<Derived>& x, Index batch, Index seq_len, Scalar* out, Index out_stride,
           detail::AttentionPlan<Scalar> plan, Workspace<Scalar>* workspace = nullptr) const {
    const Index rows = batch * seq_len;
    if (rows == 0) return;
    std::vector<const LinearType*>& layers =
        workspace != nullptr ? workspace->m_layers : detail::thread_list<const LinearType*>();
    layers.clear();
    layers.reserve(static_cast<std::size_t>(3 * num_heads()));
    for (const Head& head : m_heads) {
      layers.push_back(&head.query());
      layers.push_back(&head.key());
      layers.push_back(&head.value());
    }
    plan.rule = mask_rule();
    plan.output = &m_projection;
    plan.projected = out;
    plan.projected_stride = out_stride;
    detail::forward_expression(x, batch, seq_len, layers.data(), num_heads(), static_cast<Scalar*>(nullptr),
                               0, m_threads, plan);
  }

  friend class PackedMultiHeadAttention<Scalar>;  // checks the weights with check(), copies the thread
                                                  // setting

  std::vector<Head> m_heads;  // num_heads × HeadAttention(emb_size, head_size, max_seq_len)
  LinearType m_projection;    // weight [emb_size, num_heads · head_size], bias [emb_size]
  int m_threads = 0;
  double m_dropout = 0.1;  // simple_llm's default; applied by the training-mode calls only
};

}  // namespace head_attention

// head-attention: PackedHeadAttention and PackedMultiHeadAttention, immutable inference forms of the layers
// whose weights are prepared once.
#pragma once

#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "attention.hpp"
#include "batched.hpp"
#include "detail/flash.hpp"
#include "detail/parallel.hpp"
#include "errors.hpp"
#include "fwd.hpp"
#include "kv_cache.hpp"
#include "mask.hpp"
#include "multi_head_attention.hpp"
#include "precision.hpp"
#include "tensor_forms.hpp"
#include "workspace.hpp"

namespace head_attention {

namespace detail {

/// Throws shape_error unless a layer over Scalar can be packed with weights in `weights`: its own precision,
/// or float16 / bfloat16 for a float layer.
template <typename Scalar>
void check_packed_precision(Precision weights, const char* where) {
  const bool narrowed =
      std::is_same<Scalar, float>::value && (weights == Precision::float16 || weights == Precision::bfloat16);
  HEAD_ATTENTION_REQUIRE(weights == precision_of<Scalar>() || narrowed, where, "weights precision",
                         std::string(precision_name(precision_of<Scalar>())) +
                             (std::is_same<Scalar, float>::value ? ", float16 or bfloat16" : ""),
                         precision_name(weights));
}

/// Throws shape_error unless an input of this width and length fits a packed layer of these sizes.
inline void check_packed_call(Eigen::Index width, Eigen::Index length, Eigen::Index emb_size,
                              Eigen::Index max_seq_len, const char* where, const char* width_name,
                              const char* length_name) {
  HEAD_ATTENTION_REQUIRE(width == emb_size, where, width_name, "emb_size = " + std::to_string(emb_size),
                         std::to_string(width));
  HEAD_ATTENTION_REQUIRE(length <= max_seq_len, where, length_name,
                         "<= max_seq_len = " + std::to_string(max_seq_len), std::to_string(length));
}

/// The checks and plan of a packed form's call over `batch` sequences back to back, x [batch · T, emb_size]
/// into out [batch · T, out_width], with right padding when lengths is not null: throws shape_error, before
/// anything is written, on any bad shape; returns T.
template <typename Scalar, typename Derived, typename Out>
Eigen::Index packed_batch_plan(const Eigen::MatrixBase<Derived>& x, Eigen::Index batch, const Out& out,
                               Eigen::Index emb_size, Eigen::Index max_seq_len, Eigen::Index out_width,
                               const std::vector<Eigen::Index>* lengths, AttentionPlan<Scalar>& plan,
                               const char* where) {
  const Eigen::Index seq_len = sequence_length(x.rows(), batch, where);
  check_packed_call(x.cols(), seq_len, emb_size, max_seq_len, where, "x.cols() (input width)",
                    batch == 1 ? "x.rows() (T)" : "x.rows() / batch (T)");
  HEAD_ATTENTION_REQUIRE(out.rows() == x.rows() && out.cols() == out_width, where, "out shape",
                         shape_string(x.rows(), out_width), shape_string(out.rows(), out.cols()));
  if (lengths != nullptr) {
    check_lengths(*lengths, batch, seq_len, where);
    plan.lengths = lengths->data();
  }
  return seq_len;
}

/// The same for the rows of a [batch, seq_len, width] tensor.
template <typename Scalar>
void packed_tensor_plan(Eigen::Index batch, Eigen::Index seq_len, Eigen::Index width, Eigen::Index emb_size,
                        Eigen::Index max_seq_len, const std::vector<Eigen::Index>* lengths,
                        AttentionPlan<Scalar>& plan, const char* where) {
  check_packed_call(width, seq_len, emb_size, max_seq_len, where, "x.dimension(2) (input width)",
                    "x.dimension(1) (T)");
  if (lengths != nullptr) {
    check_lengths(*lengths, batch, seq_len, where);
    plan.lengths = lengths->data();
  }
}

/// The checks of a packed form's decode step: x holds `sequences` chunks of t rows back to back ([sequences ·
/// t, emb_size]) into out [sequences · t, out_width], and caches[0, count) must all fit a layer of these
/// sizes and rule with room for t more positions. Throws shape_error, before anything changes, otherwise;
/// returns t.
template <typename Scalar, typename Derived, typename Out>
Eigen::Index packed_decode_checks(const Eigen::MatrixBase<Derived>& x, Eigen::Index sequences, const Out& out,
                                  const KVCache<Scalar>* caches, Eigen::Index count, Eigen::Index emb_size,
                                  Eigen::Index head_size, Eigen::Index max_seq_len, Eigen::Index out_width,
                                  const MaskRule& rule, const char* where) {
  HEAD_ATTENTION_REQUIRE(sequences > 0 ? x.rows() % sequences == 0 : x.rows() == 0, where, "x.rows()",
                         "a multiple of the number of sequences = " + std::to_string(sequences),
                         std::to_string(x.rows()));
  const Eigen::Index t = sequences > 0 ? x.rows() / sequences : 0;
  check_packed_call(x.cols(), t, emb_size, max_seq_len, where, "x.cols() (input width)", "x.rows() (t)");
  HEAD_ATTENTION_REQUIRE(out.rows() == x.rows() && out.cols() == out_width, where, "out shape",
                         shape_string(x.rows(), out_width), shape_string(out.rows(), out.cols()));
  for (Eigen::Index b = 0; b < count; ++b)
    CacheAccess::check_fits(caches[b], emb_size, head_size, max_seq_len, rule, t, where,
                            count == 1 ? "cache" : "caches[" + std::to_string(b) + "]");
  return t;
}

/// Throws shape_error, nothing changed, unless a packed form's workspace can be sized for `batch` sequences
/// of `seq_len` rows: batch >= 0, 0 <= seq_len <= max_seq_len, and their byte count fits Index.
inline void check_packed_reservation(Eigen::Index batch, Eigen::Index seq_len, Eigen::Index emb_size,
                                     Eigen::Index max_seq_len, std::size_t scalar_bytes, const char* where) {
  HEAD_ATTENTION_REQUIRE(batch >= 0, where, "batch", ">= 0", std::to_string(batch));
  HEAD_ATTENTION_REQUIRE(seq_len >= 0 && seq_len <= max_seq_len, where, "seq_len",
                         "in [0, max_seq_len = " + std::to_string(max_seq_len) + "]",
                         std::to_string(seq_len));
  require_fits({batch, seq_len, emb_size}, scalar_bytes, where, "batch · seq_len · emb_size");
}

/// The checks of a packed form's reserve_workspace for decode steps of t rows per sequence over `sequences`
/// sequences, whose caches are caches[0, count); then their storage, to be read for its sizes only, into
/// `stores`. Throws shape_error, nothing changed, unless 1 <= t <= max_seq_len and every cache fits.
template <typename Scalar>
void packed_cache_reservation(std::vector<KVStore*>& stores, const KVCache<Scalar>* caches,
                              Eigen::Index count, Eigen::Index sequences, Eigen::Index t,
                              Eigen::Index emb_size, Eigen::Index head_size, Eigen::Index max_seq_len,
                              const MaskRule& rule, const char* where) {
  HEAD_ATTENTION_REQUIRE(t >= 1, where, "t", ">= 1", std::to_string(t));
  check_packed_reservation(sequences, t, emb_size, max_seq_len, sizeof(Scalar), where);
  for (Eigen::Index b = 0; b < count; ++b)
    CacheAccess::check_fits(caches[b], emb_size, head_size, max_seq_len, rule, 0, where,
                            count == 1 ? "cache" : "caches[" + std::to_string(b) + "]");
  stores.resize(static_cast<std::size_t>(count));
  for (Eigen::Index b = 0; b < count; ++b)
    stores[static_cast<std::size_t>(b)] = CacheAccess::sizing_store(caches[b]);
}

}  // namespace detail

namespace detail {

/// What PackedHeadAttention and PackedMultiHeadAttention share: the prepared weights of `heads` heads (and,
/// for the multi-head form, its output projection), the sizes, rule and thread setting, and every call behind
/// the two public APIs, which forward here with their own names for the error messages. Results are the
/// layers' bit for bit: the same forward pass, on weights prepared the same way.
template <typename Scalar>
class PackedForm {
 protected:
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using OutputRef = Eigen::Ref<Matrix, 0, Eigen::OuterStride<>>;
  using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;

  PackedForm(Index heads, Index emb_size, Index head_size, Index max_seq_len, const MaskRule& rule,
             int threads, PackedWeights<compute_t<Scalar>> weights)
      : m_heads(heads),
        m_emb_size(emb_size),
        m_head_size(head_size),
        m_max_seq_len(max_seq_len),
        m_rule(rule),
        m_threads(threads),
        m_weights(std::move(weights)) {}

  /// The check of an input of this width and length (the hook of AttentionBase).
  void check_call(Index width, Index length, const char* where, const char* width_name,
                  const char* length_name) const {
    check_packed_call(width, length, m_emb_size, m_max_seq_len, where, width_name, length_name);
  }

  /// Output features: the multi-head form's projection writes emb_size, a single head head_size.
  Index out_width() const { return projected() ? m_emb_size : m_head_size; }
  bool projected() const { return m_weights.out_width > 0; }

  void set_threads(int n, const char* where) {
    HEAD_ATTENTION_REQUIRE(n >= 0, where, "the thread count", ">= 0", std::to_string(n));
    m_threads = n;
  }
  int threads() const {
    if (!has_openmp || in_parallel_region()) return 1;
    return m_threads > 0 ? m_threads : default_thread_count();
  }

  template <typename Derived>
  static constexpr void check_input() {
    static_assert(std::is_same<typename Derived::Scalar, Scalar>::value,
                  "a packed layer's forward needs an input of its own Scalar");
  }

  AttentionPlan<Scalar> plan() const {
    AttentionPlan<Scalar> plan;
    plan.rule = m_rule;
    plan.packed = &m_weights;
    return plan;
  }

  /// `batch` sequences back to back, x [batch · T, emb_size] into out [batch · T, out_width].
  template <typename Derived>
  void batch_into(const Eigen::MatrixBase<Derived>& x, Index batch, OutputRef& out,
                  const std::vector<Index>* lengths, Workspace<Scalar>* workspace, const char* where) const {
    check_input<Derived>();
    AttentionPlan<Scalar> p = plan();
    const Index seq_len =
        packed_batch_plan(x, batch, out, m_emb_size, m_max_seq_len, out_width(), lengths, p, where);
    p.where = where;
    if (workspace != nullptr) p.buffers = &workspace->m_buffers;
    run(x, batch, seq_len, out.data(), out.outerStride(), p);
  }

  /// An empty KV cache of one head and sequence.
  KVCache<Scalar> make_store(Precision storage) const {
    return CacheAccess::make<Scalar>(m_emb_size, m_head_size, m_max_seq_len, m_rule, storage);
  }

  /// The decode step of `sequences` chunks of t rows stored back to back in x, into out [sequences · t,
  /// out_width]; caches[0, count) are every head's caches of those sequences (head h's of sequence b at
  /// h · sequences + b).
  template <typename Derived>
  void decode(const Eigen::MatrixBase<Derived>& x, KVCache<Scalar>* caches, Index count, Index sequences,
              OutputRef& out, Workspace<Scalar>* workspace, const char* where) const {
    check_input<Derived>();
    const Index t = packed_decode_checks(x, sequences, out, caches, count, m_emb_size, m_head_size,
                                         m_max_seq_len, out_width(), m_rule, where);
    if (t == 0) return;
    CacheAccess::step(caches, count, t, m_rule,
                      workspace != nullptr ? workspace->m_stores : thread_list<KVStore*>(),
                      [&](KVStore** stores) {
                        AttentionPlan<Scalar> p = plan();
                        p.caches = stores;
                        p.where = where;
                        if (workspace != nullptr) p.buffers = &workspace->m_buffers;
                        run(x, sequences, t, out.data(), out.outerStride(), p);
                      });
  }

  /// Throws shape_error, nothing changed, unless caches[0, count) hold every head's cache of `sequences`.
  void check_heads(Index count, Index sequences, const char* where) const {
    HEAD_ATTENTION_REQUIRE(count == m_heads * sequences, where, "cache heads", std::to_string(m_heads),
                           std::to_string(sequences > 0 ? count / sequences : 0));
  }

  /// reserve_workspace for forward_into calls of `batch` sequences of `seq_len` rows.
  void reserve_rows(Workspace<Scalar>& workspace, Index batch, Index seq_len, const char* where) const {
    check_packed_reservation(batch, seq_len, m_emb_size, m_max_seq_len, sizeof(Scalar), where);
    size_workspace(workspace, batch, seq_len, nullptr, where);
  }

  /// reserve_workspace for decode steps of t rows per sequence extending caches[0, count) (as decode).
  void reserve_decode(Workspace<Scalar>& workspace, const KVCache<Scalar>* caches, Index count,
                      Index sequences, Index t, const char* where) const {
    packed_cache_reservation(workspace.m_stores, caches, count, sequences, t, m_emb_size, m_head_size,
                             m_max_seq_len, m_rule, where);
    size_workspace(workspace, sequences, t, workspace.m_stores.data(), where);
  }

  std::size_t bytes_for(Index batch, Index seq_len, const char* where) const {
    Workspace<Scalar> workspace;
    reserve_rows(workspace, batch, seq_len, where);
    return workspace.bytes();
  }

  Index m_heads;
  Index m_emb_size;
  Index m_head_size;
  Index m_max_seq_len;
  MaskRule m_rule;
  int m_threads = 0;
  // [3 · heads, emb, head] each head's Wqᵀ·s, Wkᵀ, Wvᵀ in column panels, [heads, 3·head] biases; the
  // multi-head form's [heads · head, emb] Woᵀ and [emb] bo
  PackedWeights<compute_t<Scalar>> m_weights;

 private:
  /// Sizes the workspace's buffers through the forward pass itself (AttentionPlan::size_only).
  void size_workspace(Workspace<Scalar>& workspace, Index batch, Index seq_len, KVStore* const* caches,
                      const char* where) const {
    if (batch == 0 || seq_len == 0) return;
    AttentionPlan<Scalar> p = plan();
    p.where = where;
    p.caches = caches;
    p.buffers = &workspace.m_buffers;
    p.size_only = true;
    const Eigen::Map<const Matrix> nothing(nullptr, batch * seq_len, m_emb_size);  // never read
    run(nothing, batch, seq_len, nullptr, out_width(), p);
  }

  /// The forward pass: out [batch · seq_len, out_width], leading dimension out_stride (the multi-head form's
  /// output projection writes it, each head's output going to an intermediate buffer).
  template <typename Derived>
  void run(const Eigen::MatrixBase<Derived>& x, Index batch, Index seq_len, Scalar* out, Index out_stride,
           AttentionPlan<Scalar> plan) const {
    const Linear<Scalar>* const* no_layers = nullptr;  // the weights come packed
    if (projected()) {
      plan.projected = out;
      plan.projected_stride = out_stride;
      forward_expression(x, batch, seq_len, no_layers, m_heads, static_cast<Scalar*>(nullptr), 0, m_threads,
                         plan);
    } else {
      forward_expression(x, batch, seq_len, no_layers, m_heads, out, out_stride, m_threads, plan);
    }
  }
};

}  // namespace detail

/// HeadAttention frozen for inference, like an ONNX Runtime session or PyTorch's frozen modules: made from a
/// layer, it keeps its own copy of the weights prepared for the projections' GEMMs (each transposed into an
/// [emb_size, head_size] operand, the query's 1/sqrt(head_size) folded into Wq and bq, 16-bit weights
/// widened to float). HeadAttention::forward prepares them anew on every call, since callers may change its
/// weights through query()/key()/value() at any time; this form skips that (the whole preparation at small T,
/// e.g. 17% of a call at B = 2, T = 10, emb 512, head 64). Decode steps (calls extending caches by at most
/// detail::Tuning::rowdot_rows rows) read the weights as stored in either form; this one keeps a copy of the
/// layer's [out, in] rows for them, so that its results stay the layer's bit for bit.
///
/// Immutable: the weights, sizes and mask rule are fixed when it is made, and later changes to the layer it
/// was made from do not reach it (pack again to take them). Results are bit-identical to the layer's forward
/// (same kernels, same weights layout) at any thread count. const, and safe to call from many threads at
/// once.
template <typename Scalar>
class PackedHeadAttention : public TensorAttentionBase<PackedHeadAttention<Scalar>, Scalar>,
                            private detail::PackedForm<Scalar> {
  static_assert(detail::is_layer_scalar<Scalar>,
                "PackedHeadAttention<Scalar> needs float, double, Eigen::half or Eigen::bfloat16");
  using Base = detail::PackedForm<Scalar>;

 public:
  /// Eigen's signed index type, for every size and position.
  using Index = Eigen::Index;
  /// The layer it is made from.
  using Layer = HeadAttention<Scalar>;
  /// Row-major [rows, features], as the layer's.
  using Matrix = typename Layer::Matrix;
  /// The type products and softmax run in (float for the 16-bit layers).
  using Compute = typename Layer::Compute;
  /// Where forward_into writes, as the layer's: row-major [rows, head_size] storage with contiguous rows.
  using OutputRef = typename Layer::OutputRef;
  /// [B, T, features] tensors of the seed's calling convention.
  using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;

  /// Packs `layer`: copies its sizes, mask rule and thread setting and prepares its weights (O(emb_size ·
  /// head_size) time and memory, once). Throws shape_error, before anything is kept, unless every projection
  /// is [head_size, emb_size] + [head_size].
  explicit PackedHeadAttention(const Layer& layer)
      : Base(1, layer.emb_size(), layer.head_size(), layer.max_seq_len(), layer.mask_rule(), layer.m_threads,
             pack(layer, precision_of<Scalar>())) {}

  /// Packs `layer` with its weights kept in `weights`: the layer's own precision (as the constructor above),
  /// or for a float layer Precision::float16 or Precision::bfloat16. Then every weight and bias is rounded to
  /// that precision once, and the packed form computes as a layer holding the rounded values would (in float,
  /// as a 16-bit layer does): its decode steps (calls of few rows) read half the weight bytes, in place.
  /// Throws shape_error, before anything is kept, for another precision or a bad projection shape.
  PackedHeadAttention(const Layer& layer, Precision weights)
      : Base(1, layer.emb_size(), layer.head_size(), layer.max_seq_len(), layer.mask_rule(), layer.m_threads,
             pack(layer, weights)) {}

  /// The packed layer's sizes: input features, output features, longest sequence.
  ///@{
  Index emb_size() const { return this->m_emb_size; }
  Index head_size() const { return this->m_head_size; }
  Index max_seq_len() const { return this->m_max_seq_len; }
  ///@}
  /// The mask rule of the layer when it was packed.
  const MaskRule& mask_rule() const { return this->m_rule; }

  /// The thread cap of a forward call, as HeadAttention::set_num_threads (copied from the layer; 0: Eigen's
  /// default, which runs decode steps on one thread; an explicit n is honoured for them). Results do not
  /// depend on it. Throws shape_error if n < 0.
  void set_num_threads(int n) { this->set_threads(n, "PackedHeadAttention::set_num_threads"); }
  /// The thread count a large call made now, from this thread, would run on (1 inside a parallel region or
  /// without OpenMP).
  int num_threads() const { return this->threads(); }

  /// An empty KV cache for decoding with this packed layer, as HeadAttention::make_cache. A cache fits the
  /// layer and its packed forms alike (same sizes and rule), so decoding may switch between them.
  KVCache<Scalar> make_cache(Precision storage = precision_of<Scalar>()) const {
    return this->make_store(storage);
  }

  /// The caches of `batch` sequences decoded together, one KVCache each, as HeadAttention::make_cache(batch,
  /// storage). Throws shape_error if batch < 0.
  std::vector<KVCache<Scalar>> make_cache(Index batch, Precision storage = precision_of<Scalar>()) const {
    HEAD_ATTENTION_REQUIRE(batch >= 0, "PackedHeadAttention::make_cache", "batch", ">= 0",
                           std::to_string(batch));
    return std::vector<KVCache<Scalar>>(static_cast<std::size_t>(batch), make_cache(storage));
  }

 private:
  friend class AttentionBase<PackedHeadAttention, Scalar>;  // the entry points call the hooks below
  friend class TensorAttentionBase<PackedHeadAttention, Scalar>;
  using OutputRefType = typename Layer::OutputRef;

  // The hooks of the bases.
  static constexpr detail::FormNames names() {
    return {"PackedHeadAttention::forward",           "PackedHeadAttention::forward_into",
            "PackedHeadAttention::forward_cached",    "PackedHeadAttention::forward_cached_into",
            "PackedHeadAttention::reserve_workspace", "PackedHeadAttention::reserve_cached_workspace"};
  }
  Index out_features() const { return this->m_head_size; }
  using Base::check_call;
  using Base::reserve_rows;
  template <typename C>
  static constexpr bool takes_cache = Layer::template takes_cache<C>;
  template <typename C>
  static Index cache_sequences(const C& cache) {
    return Layer::cache_sequences(cache);
  }
  template <typename Derived>
  void rows_into(const Eigen::MatrixBase<Derived>& x, OutputRefType& out, const Batch& batch,
                 Workspace<Scalar>* workspace, const char* where) const {
    this->batch_into(x, batch.sequences(), out, batch.lengths(), workspace, where);
  }
  template <typename Derived>
  void decode_into(const Eigen::MatrixBase<Derived>& x, KVCache<Scalar>& cache, OutputRefType& out,
                   Workspace<Scalar>* workspace, const char* where) const {
    this->decode(x, &cache, 1, 1, out, workspace, where);
  }
  template <typename Derived>
  void decode_into(const Eigen::MatrixBase<Derived>& x, std::vector<KVCache<Scalar>>& caches,
                   OutputRefType& out, Workspace<Scalar>* workspace, const char* where) const {
    const Index count = static_cast<Index>(caches.size());
    this->decode(x, caches.data(), count, count, out, workspace, where);
  }
  void reserve_decode(Workspace<Scalar>& workspace, const KVCache<Scalar>& cache, Index t,
                      const char* where) const {
    Base::reserve_decode(workspace, &cache, 1, 1, t, where);
  }
  void reserve_decode(Workspace<Scalar>& workspace, const std::vector<KVCache<Scalar>>& caches, Index t,
                      const char* where) const {
    const Index count = static_cast<Index>(caches.size());
    Base::reserve_decode(workspace, caches.data(), count, count, t, where);
  }

  static detail::PackedWeights<Compute> pack(const Layer& layer, Precision weights) {
    detail::check_packed_precision<Scalar>(weights, "PackedHeadAttention");
    detail::check_projections(layer, "PackedHeadAttention");
    const Linear<Scalar>* const layers[3] = {&layer.query(), &layer.key(), &layer.value()};
    return detail::pack_weights(layers, 1, static_cast<const Linear<Scalar>*>(nullptr), weights);
  }
};

/// MultiHeadAttention frozen for inference (what a simple_llm model runs): every head's weights and the
/// output projection prepared once, as PackedHeadAttention does for one head (MultiHeadAttention::forward
/// prepares them on every call but decode steps: for 8 heads of 64 at emb 512, 1 MB of transposes; it also
/// keeps the layer's [out, in] rows for its decode steps, as PackedHeadAttention). Immutable: later changes
/// to the layer it was made from do not reach it. Results are bit-identical to the layer's forward at any
/// thread count. const, and safe to call from many threads at once.
template <typename Scalar>
class PackedMultiHeadAttention : public TensorAttentionBase<PackedMultiHeadAttention<Scalar>, Scalar>,
                                 private detail::PackedForm<Scalar> {
  static_assert(detail::is_layer_scalar<Scalar>,
                "PackedMultiHeadAttention<Scalar> needs float, double, Eigen::half or Eigen::bfloat16");
  using Base = detail::PackedForm<Scalar>;

 public:
  /// Eigen's signed index type, for every size and position.
  using Index = Eigen::Index;
  /// The layer it is made from.
  using Layer = MultiHeadAttention<Scalar>;
  /// Row-major [rows, features], as the layer's.
  using Matrix = typename Layer::Matrix;
  /// Where forward_into writes, as the layer's: row-major [rows, emb_size] storage with contiguous rows.
  using OutputRef = typename Layer::OutputRef;
  /// [B, T, emb_size] tensors of the seed's calling convention.
  using Tensor3 = typename Layer::Tensor3;
  /// The KV caches of a batch of sequences, the layer's (make_cache).
  using Cache = typename Layer::Cache;

  /// Packs `layer`: copies its sizes, mask rule and thread setting and prepares every weight (O(num_heads ·
  /// head_size · emb_size) time and memory, once). Throws shape_error, before anything is kept, unless every
  /// weight has its shape and all heads share one mask rule.
  explicit PackedMultiHeadAttention(const Layer& layer)
      : Base(layer.num_heads(), layer.emb_size(), layer.head_size(), layer.max_seq_len(), layer.mask_rule(),
             layer.m_threads, pack(layer, precision_of<Scalar>())) {}

  /// Packs `layer` with its weights kept in `weights`, as PackedHeadAttention(layer, weights): the layer's
  /// own precision, or for a float layer Precision::float16 or Precision::bfloat16 (every weight and bias
  /// rounded once; decode steps then read half the weight bytes). Throws shape_error, before anything is
  /// kept, for another precision or as the constructor above.
  PackedMultiHeadAttention(const Layer& layer, Precision weights)
      : Base(layer.num_heads(), layer.emb_size(), layer.head_size(), layer.max_seq_len(), layer.mask_rule(),
             layer.m_threads, pack(layer, weights)) {}

  /// The packed layer's sizes: heads, input (and output) features, features per head, longest sequence.
  ///@{
  Index num_heads() const { return this->m_heads; }
  Index emb_size() const { return this->m_emb_size; }
  Index head_size() const { return this->m_head_size; }
  Index max_seq_len() const { return this->m_max_seq_len; }
  ///@}
  /// Every head's mask rule when the layer was packed.
  const MaskRule& mask_rule() const { return this->m_rule; }

  /// The thread cap of a forward call, as MultiHeadAttention::set_num_threads (copied from the layer; 0:
  /// Eigen's default, which runs decode steps on one thread; an explicit n is honoured for them). Results do
  /// not depend on it. Throws shape_error if n < 0.
  void set_num_threads(int n) { this->set_threads(n, "PackedMultiHeadAttention::set_num_threads"); }
  /// The thread count a large call made now, from this thread, would run on (1 inside a parallel region or
  /// without OpenMP).
  int num_threads() const { return this->threads(); }

  /// An empty cache for `batch` sequences decoded together, as MultiHeadAttention::make_cache (it fits the
  /// layer and its packed forms alike). Throws shape_error if batch < 0.
  Cache make_cache(Index batch, Precision storage = precision_of<Scalar>()) const {
    HEAD_ATTENTION_REQUIRE(batch >= 0, "PackedMultiHeadAttention::make_cache", "batch", ">= 0",
                           std::to_string(batch));
    Cache cache;
    cache.m_batch = batch;
    cache.m_caches.reserve(static_cast<std::size_t>(this->m_heads * batch));
    for (Index i = 0; i < this->m_heads * batch; ++i)
      cache.m_caches.push_back(this->make_store(storage));
    return cache;
  }

  /// An empty cache for one sequence, as make_cache(1, storage).
  Cache make_cache(Precision storage = precision_of<Scalar>()) const { return make_cache(1, storage); }

 private:
  friend class AttentionBase<PackedMultiHeadAttention, Scalar>;  // the entry points call the hooks below
  friend class TensorAttentionBase<PackedMultiHeadAttention, Scalar>;

  // The hooks of the bases.
  static constexpr detail::FormNames names() {
    return {
        "PackedMultiHeadAttention::forward",           "PackedMultiHeadAttention::forward_into",
        "PackedMultiHeadAttention::forward_cached",    "PackedMultiHeadAttention::forward_cached_into",
        "PackedMultiHeadAttention::reserve_workspace", "PackedMultiHeadAttention::reserve_cached_workspace"};
  }
  Index out_features() const { return this->m_emb_size; }
  using Base::check_call;
  using Base::reserve_rows;
  template <typename C>
  static constexpr bool takes_cache = std::is_same<C, Cache>::value;
  static Index cache_sequences(const Cache& cache) { return cache.batch(); }
  template <typename Derived>
  void rows_into(const Eigen::MatrixBase<Derived>& x, OutputRef& out, const Batch& batch,
                 Workspace<Scalar>* workspace, const char* where) const {
    this->batch_into(x, batch.sequences(), out, batch.lengths(), workspace, where);
  }
  template <typename Derived>
  void decode_into(const Eigen::MatrixBase<Derived>& x, Cache& cache, OutputRef& out,
                   Workspace<Scalar>* workspace, const char* where) const {
    const Index count = static_cast<Index>(cache.m_caches.size());
    this->check_heads(count, cache.batch(), where);
    this->decode(x, cache.m_caches.data(), count, cache.batch(), out, workspace, where);
  }
  void reserve_decode(Workspace<Scalar>& workspace, const Cache& cache, Index t, const char* where) const {
    const Index count = static_cast<Index>(cache.m_caches.size());
    this->check_heads(count, cache.batch(), where);
    Base::reserve_decode(workspace, cache.m_caches.data(), count, cache.batch(), t, where);
  }

  static detail::PackedWeights<detail::compute_t<Scalar>> pack(const Layer& layer, Precision weights) {
    detail::check_packed_precision<Scalar>(weights, "PackedMultiHeadAttention");
    layer.check(layer.emb_size(), 0, "PackedMultiHeadAttention", "emb_size", "T");
    std::vector<const Linear<Scalar>*> layers;  // [3 · heads] head h's Q, K, V at 3h, 3h + 1, 3h + 2
    layers.reserve(static_cast<std::size_t>(3 * layer.num_heads()));
    for (Index h = 0; h < layer.num_heads(); ++h)
      for (const Linear<Scalar>* l : {&layer.head(h).query(), &layer.head(h).key(), &layer.head(h).value()})
        layers.push_back(l);
    return detail::pack_weights(layers.data(), layer.num_heads(), &layer.projection(), weights);
  }
};

}  // namespace head_attention

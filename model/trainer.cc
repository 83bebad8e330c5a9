#include "model/trainer.h"

#include <algorithm>
#include <memory>
#include <type_traits>

#include "common/rng.h"
#include "kernels/thread_pool.h"
#include "kernels/train_ops.h"

namespace fedtune::model {

int64_t Batch::n_scored() const {
  return std::count_if(targets.begin(), targets.end(), [](int32_t t) { return t >= 0; });
}

namespace {
// An activation array: for float a buffer of the trainer's backend (it lives where the backend
// computes: on the GPU for CUDA, so activations stay there between ops), host memory for
// double. Grow-only (Resize never shrinks the allocation); contents undefined after Resize.
template <typename T>
class Buf {
 public:
  explicit Buf(kernels::Backend* be) : be_(be) {}
  ~Buf() { Release(); }
  Buf(Buf&& o) noexcept : be_(o.be_), p_(std::exchange(o.p_, nullptr)), cap_(std::exchange(o.cap_, 0)) {}
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) {
      Release();
      be_ = o.be_;
      p_ = std::exchange(o.p_, nullptr);
      cap_ = std::exchange(o.cap_, 0);
    }
    return *this;
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;

  void Resize(int64_t n) {
    if (n > cap_) {
      Release();
      if constexpr (std::is_same_v<T, float>) {
        p_ = be_->AllocBuffer(n);
      } else {
        p_ = new T[static_cast<size_t>(n)];
      }
      cap_ = n;
    }
  }
  void Release() {
    if (p_ != nullptr) {
      if constexpr (std::is_same_v<T, float>) {
        be_->FreeBuffer(p_);
      } else {
        delete[] p_;
      }
    }
    p_ = nullptr;
    cap_ = 0;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }

 private:
  kernels::Backend* be_;
  T* p_ = nullptr;
  int64_t cap_ = 0;
};
}  // namespace

// Everything LayerBackward needs from LayerForward of one layer.
template <typename T>
struct Trainer<T>::LayerCache {
  explicit LayerCache(kernels::Backend* be)
      : x_in(be), rstd1(be), q(be), k(be), v(be), att(be), x_mid(be), rstd2(be), gate(be), up(be), q_pre(be), k_pre(be), rstd_q(be), rstd_k(be), o_pre(be), down_pre(be), rstd_o(be), rstd_down(be) {
    for (int i = 0; i < kNumModules; ++i) z.emplace_back(be);
  }
  // Not kept: the normed inputs h1 = norm(x_in), h2 = norm(x_mid) and the MLP's act =
  // swiglu(gate, up). They cost one element-wise pass each to derive again, so they live in one
  // set of Work buffers (Work::h1, h2, act) instead of every layer's cache: a third less memory
  // per kept token (SmolLM2: 23.0 instead of 33.8 KiB per token and layer).
  Buf<T> x_in, rstd1, q, k, v, att, x_mid, rstd2, gate, up;
  Buf<T> q_pre, k_pre, rstd_q, rstd_k;  // qk_norm: q and k before their per-head norms
  Buf<T> o_pre, down_pre, rstd_o, rstd_down;  // gemma: attention and MLP outputs before their norms
  std::vector<Buf<T>> z;  // per module: LoRA's A x
};

// One adapter's tensors as the kernels get them (null: absent or not trained).
template <typename T>
struct AdapterTensors {
  const T* a = nullptr;
  const T* b = nullptr;
  const T* d = nullptr;
  T* ga = nullptr;
  T* gb = nullptr;
  T* gd = nullptr;
};

// The trainer's working memory, kept across calls and steps (grow-only): a device backend
// would otherwise allocate and free device memory for every temporary of every layer.
template <typename T>
struct Trainer<T>::Work {
  explicit Work(kernels::Backend* be)
      : scratch(be), x(be), next(be), h(be), rstd(be), dh(be), xd(be), o(be), dxd(be), dx_mid(be), dact(be), dgate(be), dup(be),
        dh2(be), dh1(be), dnorm(be), mask(be), corr_z(be), corr_y(be), h1(be), h2(be), act(be), rstd_again(be), params(be), grads(be),
        be_(be) {}
  LayerCache scratch;                               // the layer being computed or recomputed
  std::vector<std::unique_ptr<LayerCache>> caches;  // per layer: kept activations (no recomputation)
  std::vector<Buf<T>> inputs;                       // per layer: kept inputs (recomputation)
  Buf<T> x, next, h, rstd, dh;                      // Slice
  Buf<T> xd, o, dxd, dx_mid, dact, dgate, dup, dh2, dh1, dnorm;  // LayerForward / LayerBackward
  Buf<T> mask;                                            // an adapter's dropout multipliers
  Buf<T> corr_z, corr_y;  // a projection's quantization-error correction (LlamaLayer::corr)
  // The derived inputs of the layer last run forward (LayerCache's note): derived_of/derived_layer
  // say whose they are; LayerBackward derives them again for any other layer (rstd_again takes
  // the norm's recomputed rstd, the same values as the cache's).
  Buf<T> h1, h2, act, rstd_again;
  const LayerCache* derived_of = nullptr;
  int64_t derived_layer = -1;
  // The adapters' tensors for this step, per layer and module. On a device backend they point
  // into two backend buffers, so that the adapter ops run without per-op copies or waits:
  // every parameter, uploaded at the start of a step, and gradient accumulators, zeroed then
  // and added to the adapters' host gradients at its end (one copy each way). Elsewhere
  // (host-memory buffers, double) they point at the adapters' own vectors.
  std::vector<std::array<AdapterTensors<T>, kNumModules>> adapter;
  bool mirrored = false;
  Buf<T> params, grads;
  std::vector<T> staging;  // host side of the two copies
  kernels::Backend* be_;
  void Size(int64_t n_layer, bool keep_caches) {
    while (static_cast<int64_t>(inputs.size()) < n_layer) inputs.emplace_back(be_);
    caches.resize(static_cast<size_t>(n_layer));
    // Only one kind of kept state at a time.
    if (keep_caches) {
      for (auto& b : inputs) b.Release();
    } else {
      for (auto& c : caches) c.reset();
    }
  }
};

template <typename T>
Trainer<T>::Trainer(const LlamaModel& model, AdapterSet<T>* adapters, const TrainerOptions& options)
    : m_(model), adapters_(adapters), opt_(options) {
  FT_CHECK(adapters_ != nullptr);
  FT_CHECK(opt_.micro_batch >= 0);
  FT_CHECK(opt_.adapter_dropout >= 0.0f && opt_.adapter_dropout < 1.0f);
  if constexpr (std::is_same_v<T, float>) backend_ = opt_.backend != nullptr ? opt_.backend : &kernels::CpuFastBackend();
  work_ = std::make_unique<Work>(backend_);
  FT_CHECK(static_cast<int64_t>(adapters_->layers.size()) == model.config().n_layer);
}

template <typename T>
Trainer<T>::~Trainer() = default;

template <typename T>
absl::Status Trainer<T>::Check(const Batch& b) const {
  const auto& c = m_.config();
  if (b.n_seq <= 0 || b.len <= 0) return absl::InvalidArgumentError("empty batch");
  const size_t n = static_cast<size_t>(b.n_seq * b.len);
  if (b.tokens.size() != n || b.targets.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("batch of ", b.n_seq, " x ", b.len, " has ", b.tokens.size(), " tokens and ",
                                                   b.targets.size(), " targets"));
  }
  if (b.len > c.n_ctx_train) return absl::OutOfRangeError(absl::StrCat("sequence length ", b.len, " exceeds the model context ", c.n_ctx_train));
  for (size_t i = 0; i < n; ++i) {
    if (b.tokens[i] < 0 || b.tokens[i] >= c.n_vocab || b.targets[i] >= c.n_vocab) {
      return absl::InvalidArgumentError(absl::StrCat("token id out of range at batch position ", i));
    }
  }
  if (!b.pos.empty()) {
    if (b.pos.size() != n) return absl::InvalidArgumentError(absl::StrCat("batch has ", b.pos.size(), " positions for ", n, " tokens"));
    for (size_t i = 0; i < n; ++i) {
      const int64_t col = static_cast<int64_t>(i) % b.len;
      // A packed row: each position starts a new example at 0 or continues the previous one.
      const bool ok = b.pos[i] == 0 || (col > 0 && b.pos[i] == b.pos[i - 1] + 1);
      if (!ok) return absl::InvalidArgumentError(absl::StrCat("batch position ", i, ": packed position ", b.pos[i], " does not follow its row"));
    }
  }
  return absl::OkStatus();
}

namespace {

// The kernels a trainer calls: the chosen backend on float, the reference templates on double.
template <typename T>
struct Kern {
  static constexpr bool kF = std::is_same_v<T, float>;
  kernels::Backend* be;
  void QLinearForward(const kernels::QMatrix& w, const T* x, T* y, int64_t m) const {
    if constexpr (kF) be->QLinearForward(w, x, y, m); else kernels::QLinearForward<T>(w, x, y, m);
  }
  void QLinearBackward(const kernels::QMatrix& w, const T* dy, T* dx, int64_t m) const {
    if constexpr (kF) be->QLinearBackward(w, dy, dx, m); else kernels::QLinearBackward<T>(w, dy, dx, m);
  }
  void RmsNormForward(const T* x, const float* g, T* y, T* rstd, int64_t rows, int64_t n, float eps) const {
    if constexpr (kF) be->RmsNormForward(x, g, y, rstd, rows, n, eps); else kernels::RmsNormForward<T>(x, g, y, rstd, rows, n, eps);
  }
  void RmsNormBackward(const T* x, const float* g, const T* rstd, const T* dy, T* dx, int64_t rows, int64_t n) const {
    if constexpr (kF) be->RmsNormBackward(x, g, rstd, dy, dx, rows, n); else kernels::RmsNormBackward<T>(x, g, rstd, dy, dx, rows, n);
  }
  void Rope(bool forward, T* x, const int32_t* pos, int64_t rows, int64_t heads, const LlamaConfig& c, int64_t l, int64_t n_positions) const {
    if constexpr (kF) {
      if (forward) be->RopeForward(x, pos, rows, heads, c.head_dim, c.rope_dim, c.RopeBase(l), c.FreqFactors(l, n_positions));
      else be->RopeBackward(x, pos, rows, heads, c.head_dim, c.rope_dim, c.RopeBase(l), c.FreqFactors(l, n_positions));
    } else {
      if (forward) kernels::RopeForward<T>(x, pos, rows, heads, c.head_dim, c.rope_dim, c.RopeBase(l), c.FreqFactors(l, n_positions));
      else kernels::RopeBackward<T>(x, pos, rows, heads, c.head_dim, c.rope_dim, c.RopeBase(l), c.FreqFactors(l, n_positions));
    }
  }
  // Layer l's attention: the model's soft-cap and the layer's sliding window (LlamaConfig::Window).
  void AttentionForward(const T* q, const T* k, const T* v, T* out, int64_t n_seq, int64_t len, const LlamaConfig& c,
                        const int32_t* seg, int64_t l) const {
    const int64_t w = c.Window(l);
    if constexpr (kF) be->AttentionForward(q, k, v, out, n_seq, len, c.n_head, c.n_head_kv, c.head_dim, seg, c.attn_softcap, w);
    else kernels::AttentionForward<T>(q, k, v, out, n_seq, len, c.n_head, c.n_head_kv, c.head_dim, seg, false, c.attn_softcap, w);
  }
  void AttentionBackward(const T* q, const T* k, const T* v, const T* dout, T* dq, T* dk, T* dv, int64_t n_seq, int64_t len,
                         const LlamaConfig& c, const int32_t* seg, int64_t l) const {
    const int64_t w = c.Window(l);
    if constexpr (kF) be->AttentionBackward(q, k, v, dout, dq, dk, dv, n_seq, len, c.n_head, c.n_head_kv, c.head_dim, seg, c.attn_softcap, w);
    else kernels::AttentionBackward<T>(q, k, v, dout, dq, dk, dv, n_seq, len, c.n_head, c.n_head_kv, c.head_dim, seg, false, c.attn_softcap, w);
  }
  void GegluForward(const T* gate, const T* up, T* out, int64_t n) const {
    if constexpr (kF) be->GegluForward(gate, up, out, n); else kernels::GegluForward<T>(gate, up, out, n);
  }
  void GegluBackward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n) const {
    if constexpr (kF) be->GegluBackward(gate, up, dout, dgate, dup, n); else kernels::GegluBackward<T>(gate, up, dout, dgate, dup, n);
  }
  void Scale(T* x, float s, int64_t n) const {
    if constexpr (kF) be->Scale(x, s, n); else for (int64_t i = 0; i < n; ++i) x[i] *= static_cast<T>(s);
  }
  void SwiGluForward(const T* gate, const T* up, T* out, int64_t n) const {
    if constexpr (kF) be->SwiGluForward(gate, up, out, n); else kernels::SwiGluForward<T>(gate, up, out, n);
  }
  void SwiGluBackward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n) const {
    if constexpr (kF) be->SwiGluBackward(gate, up, dout, dgate, dup, n); else kernels::SwiGluBackward<T>(gate, up, dout, dgate, dup, n);
  }
  void Add(const T* a, const T* b, T* out, int64_t n) const {
    if constexpr (kF) be->Add(a, b, out, n); else for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  }
  void Mul(const T* a, const T* b, T* out, int64_t n) const {
    if constexpr (kF) be->Mul(a, b, out, n); else for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
  }
  // y[r, :] += bias (a host vector of n) for r < rows.
  void AddBias(T* y, const std::vector<float>& bias, int64_t rows) const {
    const int64_t n = static_cast<int64_t>(bias.size());
    if constexpr (kF) {
      be->AddRowVector(y, bias.data(), rows, n);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < n; ++i) y[r * n + i] += static_cast<T>(bias[static_cast<size_t>(i)]);
    }
  }
  void Copy(const T* src, T* dst, int64_t n) const {
    if constexpr (kF) be->Copy(src, dst, n); else std::copy(src, src + n, dst);
  }
  // b = n zeros.
  void Zeros(Buf<T>& b, int64_t n) const {
    b.Resize(n);
    if constexpr (kF) be->Fill(b.data(), 0.0f, n); else std::fill(b.data(), b.data() + n, T(0));
  }
  void LoraForward(const T* x, const T* a, const T* b, T* z, T* y, int64_t m, int64_t in, int64_t r, int64_t out, T s) const {
    if constexpr (kF) be->LoraForward(x, a, b, z, y, m, in, r, out, s); else kernels::LoraForward<T>(x, a, b, z, y, m, in, r, out, s);
  }
  void LoraBackward(const T* x, const T* a, const T* b, const T* z, const T* dy, T* da, T* db, T* dx, int64_t m, int64_t in,
                    int64_t r, int64_t out, T s) const {
    if constexpr (kF) be->LoraBackward(x, a, b, z, dy, da, db, dx, m, in, r, out, s);
    else kernels::LoraBackward<T>(x, a, b, z, dy, da, db, dx, m, in, r, out, s);
  }
  void DiabloForward(const T* x, const T* d, T* y, int64_t m, int64_t in, int64_t out, int64_t blocks) const {
    if constexpr (kF) be->DiabloForward(x, d, y, m, in, out, blocks); else kernels::DiabloForward<T>(x, d, y, m, in, out, blocks);
  }
  void DiabloBackward(const T* x, const T* d, const T* dy, T* dd, T* dx, int64_t m, int64_t in, int64_t out, int64_t blocks) const {
    if constexpr (kF) be->DiabloBackward(x, d, dy, dd, dx, m, in, out, blocks);
    else kernels::DiabloBackward<T>(x, d, dy, dd, dx, m, in, out, blocks);
  }
  void EmbedRows(const kernels::QMatrix& table, const int32_t* ids, int64_t n, T* out) const {
    if constexpr (kF) be->EmbedRows(table, ids, n, out); else kernels::EmbedRows<T>(table, ids, n, out);
  }
  void DropoutScale(uint64_t key, int64_t row0, int64_t rows, int64_t cols, float p, T* out) const {
    if constexpr (kF) be->DropoutScale(key, row0, rows, cols, p, out); else kernels::DropoutScale<T>(key, row0, rows, cols, p, out);
  }
  double CrossEntropy(const kernels::QMatrix& w, const T* h, const int32_t* target, int64_t rows, T* dh, T scale, float softcap) const {
    if constexpr (kF) return be->CrossEntropy(w, h, target, rows, dh, scale, softcap);
    else return kernels::CrossEntropyChunked<T>(w, h, target, rows, dh, scale, 256, false, softcap);
  }
};

// The MLP's act = swiglu(gate, up) (geglu for Gemma) into `act`: the forward's, and backward's
// derived copy (LayerCache's note).
template <typename T>
void MlpActivation(const Kern<T>& K, bool gemma, const T* gate, const T* up, Buf<T>& act, int64_t n) {
  act.Resize(n);
  if (gemma) {
    K.GegluForward(gate, up, act.data(), n);
  } else {
    K.SwiGluForward(gate, up, act.data(), n);
  }
}
}  // namespace

template <typename T>
void Trainer<T>::DropoutScale(int64_t l, Module mod, int64_t in, T* scale) const {
  const uint64_t key = Mix64(dropout_seed_ ^ Mix64((static_cast<uint64_t>(l) << 8) | static_cast<uint64_t>(mod)));
  const Kern<T> K{backend_};
  K.DropoutScale(key, tok0_, n_seq_ * len_, in, opt_.adapter_dropout, scale);
}

template <typename T>
void Trainer<T>::LayerForward(int64_t l, const T* x_in, LayerCache& c, T* x_out) {
  const auto& cfg = m_.config();
  const LlamaLayer& L = m_.layer(l);
  auto& ad = adapters_->layers[static_cast<size_t>(l)];
  const int64_t M = n_seq_ * len_, E = cfg.n_embd, kvd = cfg.n_head_kv * cfg.head_dim, F = cfg.n_ff, Dq = cfg.q_dim();
  const Kern<T> K{backend_};
  Buf<T>& ms = work_->mask;
  Buf<T>& xd = work_->xd;
  auto linear = [&](Module mod, const kernels::QMatrix& w, const T* x, Buf<T>& y, int64_t out, const std::vector<float>& bias = {}) {
    y.Resize(M * out);
    auto& a = ad[static_cast<int>(mod)];
    // A LoRA adapter on the layer's own input: one call with the frozen product (the backend may
    // fold them into one pass, kernels::Backend::QLinearLoraForward).
    const bool fused = std::is_same_v<T, float> && a && a->spec.kind != AdapterKind::kDiaBlo && !(training_ && opt_.adapter_dropout > 0) &&
                       a->in == w.cols && a->out == w.rows;
    if (fused) {
      if constexpr (std::is_same_v<T, float>) {
        Buf<T>& z = c.z[static_cast<size_t>(mod)];
        z.Resize(M * a->spec.rank);
        const AdapterTensors<T>& t = work_->adapter[static_cast<size_t>(l)][static_cast<size_t>(mod)];
        backend_->QLinearLoraForward(w, x, t.a, t.b, z.data(), y.data(), M, a->spec.rank, static_cast<float>(a->spec.Scale()));
      }
    } else {
      K.QLinearForward(w, x, y.data(), M);
    }
    if (!bias.empty()) K.AddBias(y.data(), bias, M);
    if (const LowRankCorrection& cr = L.corr[static_cast<size_t>(mod)]; cr.present()) {  // part of the frozen base
      work_->corr_z.Resize(M * cr.v.rows);
      K.QLinearForward(cr.v, x, work_->corr_z.data(), M);
      work_->corr_y.Resize(M * out);
      K.QLinearForward(cr.u, work_->corr_z.data(), work_->corr_y.data(), M);
      K.Add(y.data(), work_->corr_y.data(), y.data(), M * out);
    }
    if (!a || fused) return;
    if (training_ && opt_.adapter_dropout > 0) {
      ms.Resize(M * w.cols);
      DropoutScale(l, mod, w.cols, ms.data());
      xd.Resize(M * w.cols);
      K.Mul(ms.data(), x, xd.data(), M * w.cols);
      x = xd.data();
    }
    Buf<T>& z = c.z[static_cast<size_t>(mod)];
    if (a->spec.kind != AdapterKind::kDiaBlo) z.Resize(M * a->spec.rank);
    AdapterForward(l, mod, x, y.data(), z.data());
  };
  c.x_in.Resize(M * E);
  K.Copy(x_in, c.x_in.data(), M * E);
  Buf<T>& h1 = work_->h1;
  Buf<T>& h2 = work_->h2;
  Buf<T>& act = work_->act;
  work_->derived_of = nullptr;  // overwritten below
  h1.Resize(M * E);
  c.rstd1.Resize(M);
  K.RmsNormForward(x_in, L.attn_norm.data(), h1.data(), c.rstd1.data(), M, E, cfg.rms_eps);
  if (cfg.qk_norm) {  // projections into q_pre/k_pre, normalised per head into q/k
    linear(Module::kQ, L.wq, h1.data(), c.q_pre, Dq, L.bq);
    linear(Module::kK, L.wk, h1.data(), c.k_pre, kvd, L.bk);
    c.q.Resize(M * Dq);
    c.k.Resize(M * kvd);
    c.rstd_q.Resize(M * cfg.n_head);
    c.rstd_k.Resize(M * cfg.n_head_kv);
    K.RmsNormForward(c.q_pre.data(), L.q_norm.data(), c.q.data(), c.rstd_q.data(), M * cfg.n_head, cfg.head_dim, cfg.rms_eps);
    K.RmsNormForward(c.k_pre.data(), L.k_norm.data(), c.k.data(), c.rstd_k.data(), M * cfg.n_head_kv, cfg.head_dim, cfg.rms_eps);
  } else {
    linear(Module::kQ, L.wq, h1.data(), c.q, Dq, L.bq);
    linear(Module::kK, L.wk, h1.data(), c.k, kvd, L.bk);
  }
  linear(Module::kV, L.wv, h1.data(), c.v, kvd, L.bv);
  K.Rope(true, c.q.data(), pos_.data(), M, cfg.n_head, cfg, l, n_positions_);
  K.Rope(true, c.k.data(), pos_.data(), M, cfg.n_head_kv, cfg, l, n_positions_);
  if (cfg.query_scale != 1.0f) K.Scale(c.q.data(), cfg.query_scale, M * Dq);
  c.att.Resize(M * Dq);
  K.AttentionForward(c.q.data(), c.k.data(), c.v.data(), c.att.data(), n_seq_, len_, cfg, seg_pos_, l);
  Buf<T>& o = work_->o;
  c.x_mid.Resize(M * E);
  if (cfg.gemma) {  // o_pre = o(att), normalised into o before the residual add
    linear(Module::kO, L.wo, c.att.data(), c.o_pre, E, L.bo);
    o.Resize(M * E);
    c.rstd_o.Resize(M);
    K.RmsNormForward(c.o_pre.data(), L.post_attn_norm.data(), o.data(), c.rstd_o.data(), M, E, cfg.rms_eps);
  } else {
    linear(Module::kO, L.wo, c.att.data(), o, E, L.bo);
  }
  K.Add(x_in, o.data(), c.x_mid.data(), M * E);
  h2.Resize(M * E);
  c.rstd2.Resize(M);
  K.RmsNormForward(c.x_mid.data(), L.ffn_norm.data(), h2.data(), c.rstd2.data(), M, E, cfg.rms_eps);
  linear(Module::kGate, L.w_gate, h2.data(), c.gate, F);
  linear(Module::kUp, L.w_up, h2.data(), c.up, F);
  MlpActivation(K, cfg.gemma, c.gate.data(), c.up.data(), act, M * F);
  Buf<T>& down = o;  // o is no longer needed
  if (cfg.gemma) {
    linear(Module::kDown, L.w_down, act.data(), c.down_pre, E);
    c.rstd_down.Resize(M);
    K.RmsNormForward(c.down_pre.data(), L.post_ffn_norm.data(), down.data(), c.rstd_down.data(), M, E, cfg.rms_eps);
  } else {
    linear(Module::kDown, L.w_down, act.data(), down, E);
  }
  K.Add(c.x_mid.data(), down.data(), x_out, M * E);
  work_->derived_of = &c;
  work_->derived_layer = l;
}

template <typename T>
int64_t Trainer<T>::FirstTrainedLayer() const {
  for (size_t l = 0; l < adapters_->layers.size(); ++l) {
    for (const auto& a : adapters_->layers[l]) {
      if (a) return static_cast<int64_t>(l);
    }
  }
  return m_.config().n_layer;
}

template <typename T>
void Trainer<T>::LayerBackward(int64_t l, LayerCache& c, const T* dx_out, T* dx_in) {
  const auto& cfg = m_.config();
  const LlamaLayer& L = m_.layer(l);
  auto& ad = adapters_->layers[static_cast<size_t>(l)];
  const int64_t M = n_seq_ * len_, E = cfg.n_embd, kvd = cfg.n_head_kv * cfg.head_dim, F = cfg.n_ff, Dq = cfg.q_dim();
  // dx += d(linear)/dx for the base and its adapter; gradients into the adapter.
  const Kern<T> K{backend_};
  Buf<T>& ms = work_->mask;
  Buf<T>& xd = work_->xd;
  Buf<T>& dxd = work_->dxd;
  // dx_in == null (the lowest trained layer): nothing below needs a gradient, so the base's
  // products into h1 are skipped, and the backward stops after the last adapter that needs one
  // (down only: stop after it; no attention-side adapter: stop after the MLP).
  auto adapted = [&](std::initializer_list<Module> mods) {
    for (Module m : mods) {
      if (ad[static_cast<int>(m)]) return true;
    }
    return false;
  };
  const bool need_h1 = dx_in != nullptr || adapted({Module::kQ, Module::kK, Module::kV});
  const bool need_att = need_h1 || adapted({Module::kO});
  auto linear_back = [&](Module mod, const kernels::QMatrix& w, const T* x, const T* dy, T* dx, bool base = true) {
    auto& a = ad[static_cast<int>(mod)];
    // As in LayerForward: the frozen product and a LoRA adapter on the same input in one call
    // (not per example: DP-SGD's gradients go to each example's slot).
    const bool fused = std::is_same_v<T, float> && base && a && a->spec.kind != AdapterKind::kDiaBlo && opt_.adapter_dropout <= 0 &&
                       !per_example_step_ && a->in == w.cols && a->out == w.rows;
    if (fused) {
      if constexpr (std::is_same_v<T, float>) {
        const AdapterTensors<T>& t = work_->adapter[static_cast<size_t>(l)][static_cast<size_t>(mod)];
        backend_->QLinearLoraBackward(w, x, t.a, t.b, c.z[static_cast<size_t>(mod)].data(), dy, t.ga, t.gb, dx, M, a->spec.rank,
                                      static_cast<float>(a->spec.Scale()));
      }
    } else if (base) {
      K.QLinearBackward(w, dy, dx, M);
    }
    if (base) {
      if (const LowRankCorrection& cr = L.corr[static_cast<size_t>(mod)]; cr.present()) {
        K.Zeros(work_->corr_z, M * cr.u.cols);
        K.QLinearBackward(cr.u, dy, work_->corr_z.data(), M);
        K.QLinearBackward(cr.v, work_->corr_z.data(), dx, M);
      }
    }
    if (!a || fused) return;
    const T* z = c.z[static_cast<size_t>(mod)].data();
    if (opt_.adapter_dropout <= 0) return AdapterBackward(l, mod, x, z, dy, dx);
    // Through the dropped input x * mask * s: dx += mask * s * (the adapter's gradient w.r.t.
    // its input), the mask regenerated from the same (layer, module, token, feature) keys.
    const int64_t n = M * w.cols;
    ms.Resize(n);
    DropoutScale(l, mod, w.cols, ms.data());
    xd.Resize(n);
    K.Mul(x, ms.data(), xd.data(), n);
    K.Zeros(dxd, n);
    AdapterBackward(l, mod, xd.data(), z, dy, dxd.data());
    K.Mul(dxd.data(), ms.data(), dxd.data(), n);
    K.Add(dx, dxd.data(), dx, n);
  };
  // The derived inputs (LayerCache's note), where an adapter reads them: as the forward left
  // them when it ran this layer last, else derived again from the cache.
  const bool derived = work_->derived_of == &c && work_->derived_layer == l;
  work_->derived_of = nullptr;  // partly overwritten below
  auto derive_norm = [&](const T* x, const std::vector<float>& w, Buf<T>& h) {
    if (derived) return;
    h.Resize(M * E);
    work_->rstd_again.Resize(M);
    K.RmsNormForward(x, w.data(), h.data(), work_->rstd_again.data(), M, E, cfg.rms_eps);
  };
  Buf<T>& act = work_->act;
  if (ad[static_cast<int>(Module::kDown)] && !derived) MlpActivation(K, cfg.gemma, c.gate.data(), c.up.data(), act, M * F);
  // x_out = x_mid + down(act); act = swiglu(gate(h2), up(h2)); h2 = norm(x_mid)
  Buf<T>& dx_mid = work_->dx_mid;
  Buf<T>& dact = work_->dact;
  dx_mid.Resize(M * E);
  K.Copy(dx_out, dx_mid.data(), M * E);
  K.Zeros(dact, M * F);
  const bool need_gate_up = need_att || adapted({Module::kGate, Module::kUp});
  const T* d_down = dx_out;
  Buf<T>& dnorm = work_->dnorm;
  if (cfg.gemma) {  // through the post-MLP norm
    K.Zeros(dnorm, M * E);
    K.RmsNormBackward(c.down_pre.data(), L.post_ffn_norm.data(), c.rstd_down.data(), dx_out, dnorm.data(), M, E);
    d_down = dnorm.data();
  }
  linear_back(Module::kDown, L.w_down, act.data(), d_down, dact.data(), need_gate_up);
  if (!need_gate_up) return;
  Buf<T>& dgate = work_->dgate;
  Buf<T>& dup = work_->dup;
  K.Zeros(dgate, M * F);
  K.Zeros(dup, M * F);
  if (cfg.gemma) {
    K.GegluBackward(c.gate.data(), c.up.data(), dact.data(), dgate.data(), dup.data(), M * F);
  } else {
    K.SwiGluBackward(c.gate.data(), c.up.data(), dact.data(), dgate.data(), dup.data(), M * F);
  }
  Buf<T>& dh2 = work_->dh2;
  K.Zeros(dh2, M * E);
  Buf<T>& h2 = work_->h2;
  if (adapted({Module::kGate, Module::kUp})) derive_norm(c.x_mid.data(), L.ffn_norm, h2);
  linear_back(Module::kGate, L.w_gate, h2.data(), dgate.data(), dh2.data(), need_att);
  linear_back(Module::kUp, L.w_up, h2.data(), dup.data(), dh2.data(), need_att);
  if (!need_att) return;
  K.RmsNormBackward(c.x_mid.data(), L.ffn_norm.data(), c.rstd2.data(), dh2.data(), dx_mid.data(), M, E);
  // x_mid = x_in + o(att); att = attention(rope(q), rope(k), v); q, k, v from h1 = norm(x_in)
  Buf<T>& datt = dh2;  // dh2 is no longer needed
  K.Zeros(datt, M * Dq);
  const T* d_o = dx_mid.data();
  if (cfg.gemma) {  // through the post-attention norm
    K.Zeros(dnorm, M * E);
    K.RmsNormBackward(c.o_pre.data(), L.post_attn_norm.data(), c.rstd_o.data(), dx_mid.data(), dnorm.data(), M, E);
    d_o = dnorm.data();
  }
  linear_back(Module::kO, L.wo, c.att.data(), d_o, datt.data(), need_h1);
  if (!need_h1) return;
  Buf<T>& dq = dgate;  // dgate, dup and dact are no longer needed
  Buf<T>& dk = dup;
  Buf<T>& dv = dact;
  K.Zeros(dq, M * Dq);
  K.Zeros(dk, M * kvd);
  K.Zeros(dv, M * kvd);
  K.AttentionBackward(c.q.data(), c.k.data(), c.v.data(), datt.data(), dq.data(), dk.data(), dv.data(), n_seq_, len_, cfg, seg_pos_, l);
  if (cfg.query_scale != 1.0f) K.Scale(dq.data(), cfg.query_scale, M * Dq);
  K.Rope(false, dq.data(), pos_.data(), M, cfg.n_head, cfg, l, n_positions_);
  K.Rope(false, dk.data(), pos_.data(), M, cfg.n_head_kv, cfg, l, n_positions_);
  Buf<T>& dh1 = work_->dh1;
  const T* dq_pre = dq.data();
  const T* dk_pre = dk.data();
  if (cfg.qk_norm) {  // through the per-head norms: dh1 and dxd serve as dq_pre and dk_pre first
    K.Zeros(dh1, M * Dq);
    K.Zeros(dxd, M * kvd);
    K.RmsNormBackward(c.q_pre.data(), L.q_norm.data(), c.rstd_q.data(), dq.data(), dh1.data(), M * cfg.n_head, cfg.head_dim);
    K.RmsNormBackward(c.k_pre.data(), L.k_norm.data(), c.rstd_k.data(), dk.data(), dxd.data(), M * cfg.n_head_kv, cfg.head_dim);
    K.Copy(dh1.data(), dq.data(), M * Dq);
    K.Copy(dxd.data(), dk.data(), M * kvd);
  }
  K.Zeros(dh1, M * E);
  const bool base = dx_in != nullptr;
  Buf<T>& h1 = work_->h1;
  if (adapted({Module::kQ, Module::kK, Module::kV})) derive_norm(c.x_in.data(), L.attn_norm, h1);
  linear_back(Module::kQ, L.wq, h1.data(), dq_pre, dh1.data(), base);
  linear_back(Module::kK, L.wk, h1.data(), dk_pre, dh1.data(), base);
  linear_back(Module::kV, L.wv, h1.data(), dv.data(), dh1.data(), base);
  if (!base) return;
  K.Copy(dx_mid.data(), dx_in, M * E);
  K.RmsNormBackward(c.x_in.data(), L.attn_norm.data(), c.rstd1.data(), dh1.data(), dx_in, M, E);
}

template <typename T>
absl::StatusOr<double> Trainer<T>::Step(const Batch& b, T grad_scale, bool backward) {
  FT_RETURN_IF_ERROR(Check(b));
  const PassPlan plan = backward ? PlanFor(b.n_seq, b.len) : PassPlan{true, 0};  // forward-only keeps nothing
  const int64_t mb = plan.micro_batch > 0 ? std::min(plan.micro_batch, b.n_seq) : b.n_seq;
  per_example_step_ = backward && per_example_;
  ex_valid_ = false;
  if (per_example_step_ && !PerExampleSupported())
    return absl::FailedPreconditionError("per-example gradients need kernels with host-memory buffers");
  BindAdapters(backward, b.n_seq);
  double nll = 0.0;
  for (int64_t s0 = 0; s0 < b.n_seq; s0 += mb) nll += Slice(b, s0, std::min(mb, b.n_seq - s0), grad_scale, backward, plan.recompute);
  if (backward && !per_example_step_) CollectGradients();
  ex_valid_ = per_example_step_;
  return nll;
}

template <typename T>
bool Trainer<T>::PerExampleSupported() const {
  if constexpr (std::is_same_v<T, float>) return backend_->HostMemoryBuffers();
  return true;
}

template <typename T>
void Trainer<T>::LoadExampleGradient(int64_t k, T scale) {
  FT_CHECK(ex_valid_ && k >= 0 && static_cast<size_t>((k + 1) * ex_stride_) <= ex_grads_.size());
  const T* g = ex_grads_.data() + k * ex_stride_;
  for (auto& layer : adapters_->layers) {
    for (auto& a : layer) {
      if (!a) continue;
      for (std::vector<T>* v : {&a->ga, &a->gb, &a->gd}) {
        for (T& x : *v) x = scale * *g++;
      }
    }
  }
}

template <typename T>
void Trainer<T>::BindAdapters(bool backward, int64_t n_seq) {
  Work& w = *work_;
  const auto& layers = adapters_->layers;
  w.mirrored = false;
  if constexpr (std::is_same_v<T, float>) w.mirrored = !backend_->HostMemoryBuffers();
  // Per-example gradients: slot k of ex_grads_ holds sequence k's, laid out as the adapters'
  // ga, gb, gd in order (LoadExampleGradient reads them back the same way); slot 0 is bound
  // here, AdapterBackward offsets each sequence's rows to its slot.
  if (per_example_step_) {
    ex_stride_ = adapters_->GradientValues();
    ex_grads_.assign(static_cast<size_t>(n_seq * ex_stride_), T(0));
    T* next = ex_grads_.data();
    auto slot = [&](std::vector<T>& v) -> T* {
      if (v.empty()) return nullptr;
      T* p = next;
      next += v.size();
      return p;
    };
    w.adapter.assign(layers.size(), {});
    for (size_t l = 0; l < layers.size(); ++l) {
      for (size_t mod = 0; mod < kNumModules; ++mod) {
        auto& a = adapters_->layers[l][mod];
        if (!a) continue;
        AdapterTensors<T>& t = w.adapter[l][mod];
        t = {a->a.empty() ? nullptr : a->a.data(), a->b.empty() ? nullptr : a->b.data(), a->d.empty() ? nullptr : a->d.data()};
        t.ga = slot(a->ga);
        t.gb = slot(a->gb);
        t.gd = slot(a->gd);
      }
    }
    return;
  }
  // Mirrored: every parameter laid out in staging (then one upload), gradient accumulators
  // after one another in w.grads, in the order CollectGradients reads them back.
  int64_t np = 0, ng = 0;
  if (w.mirrored) {
    for (const auto& layer : layers) {
      for (const auto& a : layer) {
        if (!a) continue;
        np += static_cast<int64_t>(a->a.size() + a->b.size() + a->d.size());
        if (backward) ng += static_cast<int64_t>(a->ga.size() + a->gb.size() + a->gd.size());
      }
    }
    w.params.Resize(np);
    w.grads.Resize(ng);
    w.staging.clear();
    w.staging.reserve(static_cast<size_t>(np));
  }
  int64_t g_used = 0;
  auto param = [&](const std::vector<T>& v) -> const T* {
    if (v.empty()) return nullptr;
    if (!w.mirrored) return v.data();
    const T* p = w.params.data() + w.staging.size();
    w.staging.insert(w.staging.end(), v.begin(), v.end());
    return p;
  };
  auto grad = [&](std::vector<T>& v) -> T* {
    if (v.empty()) return nullptr;
    if (!w.mirrored) return v.data();
    if (!backward) return nullptr;
    T* p = w.grads.data() + g_used;
    g_used += static_cast<int64_t>(v.size());
    return p;
  };
  w.adapter.assign(layers.size(), {});
  for (size_t l = 0; l < layers.size(); ++l) {
    for (size_t mod = 0; mod < kNumModules; ++mod) {
      auto& a = adapters_->layers[l][mod];
      // Braced initialisation runs left to right: a, b, d, then ga, gb, gd.
      if (a) w.adapter[l][mod] = {param(a->a), param(a->b), param(a->d), grad(a->ga), grad(a->gb), grad(a->gd)};
    }
  }
  if (!w.mirrored) return;
  const Kern<T> K{backend_};
  if (np > 0) K.Copy(w.staging.data(), w.params.data(), np);
  if (ng > 0) K.Zeros(w.grads, ng);
}

template <typename T>
void Trainer<T>::CollectGradients() {
  Work& w = *work_;
  if (!w.mirrored) return;
  const int64_t ng = adapters_->GradientValues();
  if (ng == 0) return;
  w.staging.resize(static_cast<size_t>(ng));
  const Kern<T> K{backend_};
  K.Copy(w.grads.data(), w.staging.data(), ng);  // waits for the step's work
  const T* g = w.staging.data();
  for (auto& layer : adapters_->layers) {
    for (auto& a : layer) {
      if (!a) continue;
      for (std::vector<T>* v : {&a->ga, &a->gb, &a->gd}) {
        for (T& x : *v) x += *g++;
      }
    }
  }
}

template <typename T>
void Trainer<T>::AdapterForward(int64_t l, Module mod, const T* x, T* y, T* z) {
  const auto& a = *adapters_->layers[static_cast<size_t>(l)][static_cast<size_t>(mod)];
  const AdapterTensors<T>& t = work_->adapter[static_cast<size_t>(l)][static_cast<size_t>(mod)];
  const Kern<T> K{backend_};
  const int64_t M = n_seq_ * len_;
  if (a.spec.kind == AdapterKind::kDiaBlo) return K.DiabloForward(x, t.d, y, M, a.in, a.out, a.spec.blocks);
  K.LoraForward(x, t.a, t.b, z, y, M, a.in, a.spec.rank, a.out, static_cast<T>(a.spec.Scale()));
}

template <typename T>
void Trainer<T>::AdapterBackward(int64_t l, Module mod, const T* x, const T* z, const T* dy, T* dx) {
  const auto& a = *adapters_->layers[static_cast<size_t>(l)][static_cast<size_t>(mod)];
  const AdapterTensors<T>& t = work_->adapter[static_cast<size_t>(l)][static_cast<size_t>(mod)];
  const Kern<T> K{backend_};
  const int64_t M = n_seq_ * len_;
  if (per_example_step_) {
    // Each sequence's rows by themselves, into its own slot (rows are independent in these
    // products, so dx is the batch's).
    const int64_t first_seq = tok0_ / len_, r = a.spec.kind == AdapterKind::kDiaBlo ? 0 : a.spec.rank;
    for (int64_t i = 0; i < n_seq_; ++i) {
      const int64_t rows = i * len_, slot = (first_seq + i) * ex_stride_;
      auto at = [&](T* g) { return g == nullptr ? nullptr : g + slot; };
      if (a.spec.kind == AdapterKind::kDiaBlo) {
        K.DiabloBackward(x + rows * a.in, t.d, dy + rows * a.out, at(t.gd), dx + rows * a.in, len_, a.in, a.out, a.spec.blocks);
      } else {
        K.LoraBackward(x + rows * a.in, t.a, t.b, z + rows * r, dy + rows * a.out, at(t.ga), at(t.gb), dx + rows * a.in, len_, a.in, r, a.out,
                       static_cast<T>(a.spec.Scale()));
      }
    }
    return;
  }
  if (a.spec.kind == AdapterKind::kDiaBlo) return K.DiabloBackward(x, t.d, dy, t.gd, dx, M, a.in, a.out, a.spec.blocks);
  K.LoraBackward(x, t.a, t.b, z, dy, t.ga, t.gb, dx, M, a.in, a.spec.rank, a.out, static_cast<T>(a.spec.Scale()));
}

template <typename T>
int64_t Trainer<T>::KeptBytesPerSequence(int64_t len) const {
  const auto& c = m_.config();
  const int64_t kvd = c.n_head_kv * c.head_dim;
  int64_t rank_sum = 0;  // LoRA's z per adapted module
  for (const auto& layer : adapters_->layers) {
    for (const auto& a : layer) {
      if (a && a->spec.kind != AdapterKind::kDiaBlo) rank_sum += a->spec.rank;
    }
  }
  // LayerCache: x_in, x_mid (E each), q, att (q_dim), k, v (kvd), gate, up (F), 2 rstd; with
  // qk_norm also q_pre, k_pre and a rstd per head. Once per pass: the derived h1, h2 (E) and act
  // (F) of Work.
  int64_t per_token_layer = 2 * c.n_embd + 2 * c.q_dim() + 2 * kvd + 2 * c.n_ff + 2;
  if (c.qk_norm) per_token_layer += c.q_dim() + kvd + c.n_head + c.n_head_kv;
  if (c.gemma) per_token_layer += 2 * c.n_embd + 2;  // o_pre, down_pre and their rstd
  // Layers below the first trained one keep nothing (backward stops there).
  return static_cast<int64_t>(sizeof(T)) * len * (per_token_layer * (c.n_layer - FirstTrainedLayer()) + rank_sum + 2 * c.n_embd + c.n_ff);
}

template <typename T>
PassPlan Trainer<T>::PlanFor(int64_t n_seq, int64_t len) const {
  if (opt_.activation_budget_bytes <= 0) return {opt_.recompute, opt_.micro_batch};
  const int64_t per_seq = KeptBytesPerSequence(len);
  const int64_t fit = per_seq > 0 ? opt_.activation_budget_bytes / per_seq : n_seq;
  if (fit >= n_seq) return {false, 0};
  if (fit >= 1) return {false, fit};
  return {true, 0};
}

// Forward (and backward) of rows [s0, s0 + n_seq) of a checked batch.
template <typename T>
double Trainer<T>::Slice(const Batch& b, int64_t s0, int64_t n_seq, T grad_scale, bool backward, bool recompute) {
  const auto& cfg = m_.config();
  const Kern<T> K{backend_};
  n_seq_ = n_seq;
  len_ = b.len;
  const int64_t M = n_seq_ * len_, E = cfg.n_embd, n_layer = cfg.n_layer, t0 = s0 * len_;
  pos_.resize(static_cast<size_t>(M));
  for (int64_t i = 0; i < M; ++i) pos_[static_cast<size_t>(i)] = b.pos.empty() ? static_cast<int32_t>(i % len_) : b.pos[static_cast<size_t>(t0 + i)];
  seg_pos_ = b.pos.empty() ? nullptr : pos_.data();
  // The whole batch's positions (every slice of a batch rotates alike): LongRoPE's choice.
  n_positions_ = b.len;
  if (!b.pos.empty()) n_positions_ = *std::max_element(b.pos.begin(), b.pos.end()) + int64_t{1};
  training_ = backward || training_forward_;
  tok0_ = t0;
  const int32_t* targets = b.targets.data() + t0;

  Work& w = *work_;
  Buf<T>& x = w.x;
  Buf<T>& next = w.next;
  x.Resize(M * E);
  next.Resize(M * E);
  K.EmbedRows(m_.token_embd(), b.tokens.data() + t0, M, x.data());  // x_0: the (frozen) token embeddings
  if (cfg.embed_scale != 1.0f) K.Scale(x.data(), cfg.embed_scale, M * E);
  // With recomputation only the layer inputs are kept, without it the full layer caches.
  if (backward) w.Size(n_layer, !recompute);
  std::vector<Buf<T>>& inputs = w.inputs;
  std::vector<std::unique_ptr<LayerCache>>& caches = w.caches;
  LayerCache& scratch = w.scratch;
  // Backward stops at the first layer with adapters: nothing below is kept.
  const int64_t first = FirstTrainedLayer();
  for (int64_t l = 0; l < n_layer; ++l) {
    const bool keep = backward && l >= first;
    if (keep && recompute) {  // a kept cache has x_in
      inputs[static_cast<size_t>(l)].Resize(M * E);
      K.Copy(x.data(), inputs[static_cast<size_t>(l)].data(), M * E);
    }
    LayerCache* c = &scratch;
    if (keep && !recompute) {
      auto& kept = caches[static_cast<size_t>(l)];
      if (!kept) kept = std::make_unique<LayerCache>(backend_);
      c = kept.get();
    }
    LayerForward(l, x.data(), *c, next.data());
    std::swap(x, next);
  }
  Buf<T>& h = w.h;
  Buf<T>& rstd = w.rstd;
  Buf<T>& dh = w.dh;
  h.Resize(M * E);
  rstd.Resize(M);
  K.RmsNormForward(x.data(), m_.output_norm().data(), h.data(), rstd.data(), M, E, cfg.rms_eps);
  if (backward) K.Zeros(dh, M * E);
  const double nll = K.CrossEntropy(m_.output(), h.data(), targets, M, backward ? dh.data() : nullptr, grad_scale, cfg.final_softcap);
  if (!backward) return nll;

  Buf<T>& dx = h;  // h is no longer needed
  Buf<T>& dprev = next;
  K.Zeros(dx, M * E);
  K.RmsNormBackward(x.data(), m_.output_norm().data(), rstd.data(), dh.data(), dx.data(), M, E);
  for (int64_t l = n_layer - 1; l >= first; --l) {
    LayerCache* c = recompute ? nullptr : caches[static_cast<size_t>(l)].get();
    if (c == nullptr) {  // recompute this layer's activations from its saved input
      LayerForward(l, inputs[static_cast<size_t>(l)].data(), scratch, next.data());
      c = &scratch;
    }
    LayerBackward(l, *c, dx.data(), l > first ? dprev.data() : nullptr);
    std::swap(dx, dprev);
  }
  return nll;
}

template class Trainer<float>;
template class Trainer<double>;

}  // namespace fedtune::model

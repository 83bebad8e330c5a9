#include "planner/planner.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "model/finetune.h"
#include "model/llama.h"
#include "privacy/rdp_accountant.h"

namespace fedtune::planner {
namespace {

struct Dims {
  int64_t in, out;
};

Dims ModuleDims(const ModelShape& s, model::Module m) {
  switch (m) {
    case model::Module::kK:
    case model::Module::kV: return {s.n_embd, s.n_kv};
    case model::Module::kGate:
    case model::Module::kUp: return {s.n_embd, s.n_ff};
    case model::Module::kDown: return {s.n_ff, s.n_embd};
    default: return {s.n_embd, s.n_embd};
  }
}

// Values per layer of one module's adapter: (trainable-kind values, frozen-by-construction values).
std::pair<double, double> AdapterValues(const ModelShape& s, const model::AdapterSpec& spec, model::Module m) {
  const Dims d = ModuleDims(s, m);
  switch (spec.kind) {
    case model::AdapterKind::kDiaBlo: {
      const double n = static_cast<double>(spec.blocks);
      const double bi = std::ceil(static_cast<double>(d.in) / n), bo = std::ceil(static_cast<double>(d.out) / n);
      return {n * bi * bo, 0};
    }
    case model::AdapterKind::kFfaLora:
      return {static_cast<double>(d.out * spec.rank), static_cast<double>(d.in * spec.rank)};
    default:
      return {static_cast<double>((d.in + d.out) * spec.rank), 0};
  }
}

bool Contains(const std::vector<model::Module>& v, model::Module m) { return std::find(v.begin(), v.end(), m) != v.end(); }

// Calls f(layer, module, values, rank) for every (layer, module of `modules`) the adapter has: every layer
// at the spec's rank without a layout, else the layer's own modules and rank.
template <typename F>
void ForEachLayerModule(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& modules,
                        const std::vector<std::optional<model::LayerSetting>>* layout, F f) {
  if (layout == nullptr || layout->empty()) {
    for (auto m : modules) {
      const auto v = AdapterValues(s, spec, m);
      for (int64_t l = 0; l < s.n_layer; ++l) f(l, m, v, spec.rank);
    }
    return;
  }
  for (size_t l = 0; l < layout->size(); ++l) {
    const auto& setting = (*layout)[l];
    if (!setting) continue;
    model::AdapterSpec at = spec;
    if (setting->rank > 0 && spec.kind != model::AdapterKind::kDiaBlo) at.rank = setting->rank;
    for (auto m : modules)
      if (Contains(setting->modules, m)) f(static_cast<int64_t>(l), m, AdapterValues(s, at, m), at.rank);
  }
}

std::string ModuleList(const std::vector<model::Module>& v) {
  std::vector<std::string> n;
  for (auto m : v) n.push_back(model::ModuleName(m));
  return absl::StrJoin(n, ",");
}

std::string TypeName(kernels::GgmlType t) { return kernels::TypeTraits(t).name; }

}  // namespace

ModelShape ModelShape::Of(const model::LlamaModel& m) {
  ModelShape s;
  const auto& c = m.config();
  s.n_layer = c.n_layer;
  s.n_embd = c.n_embd;
  s.n_kv = c.n_head_kv * c.head_dim;
  s.n_ff = c.n_ff;
  s.n_vocab = c.n_vocab;
  s.n_q = c.q_dim();
  s.n_head = c.n_head;
  s.n_head_kv = c.n_head_kv;
  s.qk_norm = c.qk_norm;
  s.post_norms = c.gemma;
  s.attn_softcap = c.attn_softcap > 0.0f;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const auto& L = m.layer(l);
    for (const auto* w : L.Projections())
    {
      s.projection_params += static_cast<double>(w->rows) * static_cast<double>(w->cols);
      s.projections.emplace_back(w->rows, w->cols);
    }
    s.other_bytes += static_cast<double>(L.attn_norm.size() + L.ffn_norm.size()) * 4;
  }
  s.stored = c.n_layer > 0 ? m.layer(0).wq.type : kernels::GgmlType::kF32;
  s.heads_known = true;
  s.embd_type = m.token_embd().type;
  s.output_type = m.output().type;
  s.tied_output = m.output().data == m.token_embd().data;
  s.other_bytes += static_cast<double>(m.token_embd().rows) * static_cast<double>(m.token_embd().row_bytes);
  if (m.output().data != m.token_embd().data) s.other_bytes += static_cast<double>(m.output().rows) * static_cast<double>(m.output().row_bytes);
  s.other_bytes += static_cast<double>(m.output_norm().size()) * 4;
  s.other_bytes += static_cast<double>(m.CorrectionBytes());  // a compensated base's corrections, as held
  return s;
}

double BitsPerWeight(kernels::GgmlType t) {
  const auto tr = kernels::TypeTraits(t);
  return static_cast<double>(tr.type_size) * 8.0 / static_cast<double>(tr.block_size);
}

double ModelShape::LayerCacheBytesPerToken() const {
  const double e = static_cast<double>(n_embd), q = static_cast<double>(n_q > 0 ? n_q : n_embd), kv = static_cast<double>(n_kv),
               f = static_cast<double>(n_ff);
  // x_in, x_mid (E); q, att (q); k, v (kv); gate, up (F); two rstd (h1, h2 and act are derived
  // again in backward: DerivedBytesPerToken, once per pass).
  double floats = 2 * e + 2 * q + 2 * kv + 2 * f + 2;
  if (qk_norm) floats += q + kv + static_cast<double>(n_head + n_head_kv);
  if (post_norms) floats += 2 * e + 2;
  return 4 * floats;
}

double ModelShape::DerivedBytesPerToken() const {
  return 4 * (2 * static_cast<double>(n_embd) + static_cast<double>(n_ff));  // h1, h2 (E), act (F)
}

double ModelShape::BackwardTempBytesPerToken() const {
  return RecomputeBytesPerToken() - 4 * static_cast<double>(n_embd) * static_cast<double>(n_layer) - LayerCacheBytesPerToken();
}

double ModelShape::RecomputeBytesPerToken() const {
  const double e = static_cast<double>(n_embd), q = static_cast<double>(n_q > 0 ? n_q : n_embd), f = static_cast<double>(n_ff);
  // Kept layer inputs (E per layer), the layer being recomputed, and the backward's temporaries:
  // x, next, h, dh, o, dx_mid (E); dh1, dh2 (max(E, q)); dact, dgate, dup (F); with q/k norms
  // dxd holds k's gradient (kv), with post norms dnorm one more E.
  double temp = 6 * e + 2 * std::max(e, q) + 3 * f;
  if (qk_norm) temp += static_cast<double>(n_kv);
  if (post_norms) temp += e;
  return 4 * e * static_cast<double>(n_layer) + LayerCacheBytesPerToken() + DerivedBytesPerToken() + 4 * temp;
}

MemoryModel MemoryModel::Fitted() {
  MemoryModel m;
  // bench_memory_fit --bf16 on bench/memory_model.sh's 12 fitting runs (2026-12-05, SmolLM2-135M
  // Q4_1, 2 threads, default kernels = cpu-bf16 on that AVX-512-BF16 machine; the bf16 output
  // layer is the known Bf16OutputMiB term; worst error 1.0% over 18 runs). On cpu-fast
  // (FEDTUNE_CPU_ISA=avx2, same grid) they under-predict by at most 1.8%. Before (2026-11-23,
  // fp32): 35.9, 124.8, 36.2, 0.90.
  // 2026-12-06: the per-token constants re-expressed per byte of the shape's allocation
  // (137.8 KiB = 1.0095 x RecomputeBytesPerToken and 34.45 KiB = 1.0437 x
  // LayerCacheBytesPerToken on SmolLM2: the same predictions there), checked on a second shape
  // (docs/guide.md "Memory model").
  // 2026-12-07 (night): refitted after the derived h1/h2/act left the kept layer caches, the bf16
  // logit chunk became 128 rows with its gradients converted in place, and the bf16 attention /
  // fused LoRA copies (per token, so in recompute_factor) arrived: bench/memory_model.sh's 12
  // runs on cpu-bf16 (AVX-512-BF16 EPYC, 2 threads), bench_memory_fit --bf16.
  m.fixed_mib = 48.13;
  m.recompute_factor = 1.0615;
  m.kept_factor = 1.0702;
  m.logit_factor = 0.877;
  return m;
}

double MemoryModel::BaseMiB(const ModelShape& s, kernels::GgmlType b) const {
  if (s.projections.empty()) return (s.projection_params * BitsPerWeight(b) / 8.0 + s.other_bytes) / (1 << 20);
  double bytes = s.other_bytes;
  for (const auto& [rows, cols] : s.projections) {
    const kernels::GgmlType t = kernels::RowCompatibleType(b, cols);
    const auto rb = kernels::RowBytes(t, cols);
    bytes += static_cast<double>(rows) * (rb.ok() ? static_cast<double>(*rb) : static_cast<double>(cols) * BitsPerWeight(t) / 8.0);
    if (b != s.stored && compensation_rank > 0) bytes += static_cast<double>(compensation_rank * (rows + cols) * 2);
  }
  return bytes / (1 << 20);
}

double MemoryModel::AdapterStateMiB(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& adapted,
                                    const std::vector<model::Module>& trained) const {
  double bytes = 0;
  ForEachLayerModule(s, spec, adapted, &layout, [&](int64_t, model::Module m, std::pair<double, double> v, int64_t) {
    bytes += v.second * 4 + v.first * (Contains(trained, m) ? 20 : 4);
  });
  return bytes / (1 << 20);
}

double MemoryModel::KeptMiBPerSequence(const ModelShape& s, int seq) const {
  return static_cast<double>(seq) * kept_factor * (s.LayerCacheBytesPerToken() * static_cast<double>(s.n_layer) + s.DerivedBytesPerToken()) /
         (1 << 20);
}

double MemoryModel::Bf16OutputMiB(const ModelShape& s, double tokens_per_pass) {
  // The backend switches at 64 scored rows (every token but the last of each sequence, on text):
  // more than 64 tokens. With fewer scored rows (answers only) this over-predicts: the safe side.
  // The matrix in bf16; the logit gradients go to bf16 in place (no second chunk).
  if (tokens_per_pass <= 64) return 0;
  return static_cast<double>(s.n_vocab) * static_cast<double>(s.n_embd) * 2 / (1 << 20);
}

ActivationChoice MemoryModel::Choose(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& adapted,
                                     const Candidate& c, int seq, double limit_mib, bool bf16_kernels) const {
  // Sequences in one forward/backward pass: the batch, or DP-SGD's examples per pass (each with
  // its own gradient where several share one).
  const double trained_bytes = per_example ? AdapterBytes(s, SpecAt(spec, c), c.modules, &layout) : 0.0;
  const int per_pass = per_example ? model::DpExamplesPerPass(static_cast<int64_t>(trained_bytes / 4), c.batch) : c.batch;
  const double tokens = static_cast<double>(per_pass) * seq;
  // The f32 logit chunk: kernels::kLogitChunkRows rows, kBf16LogitChunkRows on cpu-bf16 from 64.
  const double chunk = static_cast<double>(bf16_kernels && tokens > 64 ? kernels::kBf16LogitChunkRows : kernels::kLogitChunkRows);
  const double logits_mib = logit_factor * std::min(tokens, chunk) * static_cast<double>(s.n_vocab) * 4 / (1 << 20);
  const double rest = fixed_mib + BaseMiB(s, c.base) + AdapterStateMiB(s, SpecAt(spec, c), adapted, c.modules) + logits_mib +
                      adapter_copies * AdapterBytes(s, spec, adapted, &layout) / (1 << 20) +
                      (per_example ? (2 + (per_pass > 1 ? per_pass : 0)) * trained_bytes / (1 << 20) : 0.0) +
                      (bf16_kernels ? Bf16OutputMiB(s, tokens) : 0.0);
  const double per_seq = KeptMiBPerSequence(s, seq);
  ActivationChoice a;
  if (per_example) a.dp_examples_per_pass = per_pass;
  if (keep_within_limit ? limit_mib > 0 && per_seq > 0 : !recompute) {
    // Memory not known (>= kUnknownMemoryMiB): the client keeps up to the trainer's default budget
    // per pass instead (worker::ClientEnv), whatever the rest needs.
    const double room = limit_mib >= kUnknownMemoryMiB ? kDefaultKeptMiB : limit_mib - rest;
    const int fit = keep_within_limit ? static_cast<int>(std::min<double>(per_pass, std::floor(room / per_seq + 1e-9))) : per_pass;
    if (fit >= 1) {
      a.recompute = false;
      a.seqs_per_pass = fit;
      a.activation_mib = fit * per_seq;
    }
  }
  if (a.recompute) a.activation_mib = tokens * recompute_factor * s.RecomputeBytesPerToken() / (1 << 20);
  a.total_mib = rest + a.activation_mib;
  return a;
}

double MemoryModel::DeviceWeightMiB(const ModelShape& s, kernels::GgmlType b) const {
  // Cached frozen weights: as stored where the device dequantizes the type, else f32.
  auto matrix = [](kernels::GgmlType t, double rows, double cols) {
    if (!kernels::CudaDequantizes(t)) return rows * cols * 4;
    const auto rb = kernels::RowBytes(t, static_cast<int64_t>(cols));
    return rows * (rb.ok() ? static_cast<double>(*rb) : cols * BitsPerWeight(t) / 8.0);
  };
  double bytes = 0;
  if (s.heads_known) {
    const double v = static_cast<double>(s.n_vocab), e = static_cast<double>(s.n_embd);
    bytes += matrix(s.embd_type, v, e) + (s.tied_output ? 0.0 : matrix(s.output_type, v, e));
  } else {
    bytes += s.other_bytes;
  }
  if (s.projections.empty()) return (bytes + s.projection_params * (kernels::CudaDequantizes(b) ? BitsPerWeight(b) / 8.0 : 4.0)) / (1 << 20);
  for (const auto& [rows, cols] : s.projections) {
    bytes += matrix(kernels::RowCompatibleType(b, cols), static_cast<double>(rows), static_cast<double>(cols));
    if (b != s.stored && compensation_rank > 0) bytes += static_cast<double>(compensation_rank * (rows + cols) * 2);
  }
  return bytes / (1 << 20);
}

ActivationChoice MemoryModel::ChooseOnDevice(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& adapted,
                                             const Candidate& c, int seq, double device_limit_mib) const {
  const model::AdapterSpec at = SpecAt(spec, c);
  const int per_pass = per_example ? 1 : c.batch;  // DP-SGD on a device: one example at a time (model/finetune.cc)
  const double tokens = static_cast<double>(per_pass) * seq;
  const double e = static_cast<double>(s.n_embd), v = static_cast<double>(s.n_vocab);
  // Scratch buffers grow to 1.25x a request (CudaBackendImpl::Scratch).
  constexpr double kGrowth = 1.25;
  const double g = device_bf16_gemm ? 2 : 4;  // bytes of a dequantized weight value
  double largest = 0, widest_in = e;          // the largest projection; the widest projection input
  for (const auto& [rows, cols] : s.projections) {
    largest = std::max(largest, static_cast<double>(rows) * static_cast<double>(cols));
    widest_in = std::max(widest_in, static_cast<double>(cols));
  }
  if (s.projections.empty()) largest = e * std::max<double>(static_cast<double>(s.n_ff), e);
  // Dequantized copies: a projection (slot 2) and the output head (slot 5).
  const double dequant = kGrowth * g * (largest + v * e);
  // Per token: the cross-entropy's gathered rows and their gradients (f32; the same two slots
  // hold one head's attention probabilities and their gradients in backward, seq per token),
  // the forward's probabilities (seq) and, with bf16 products, the rows' bf16 copies and a
  // projection input's bf16 copy; with attention soft-capping, the cap's derivatives (seq).
  const double l = static_cast<double>(seq);
  const double per_token = kGrowth * (8 * std::max(e, l) + 4 * l + (device_bf16_gemm ? 2 * e : 0.0) + (s.attn_softcap ? 4 * l : 0.0));
  // One scratch slot holds a chunk of f32 logits and, at other times, a GEMM input's bf16 copy;
  // another the chunk's bf16 logit gradients.
  auto logits = [&](double pass_tokens) {
    const double chunk = std::clamp(std::floor(device_logits_chunk_bytes / (4 * v)), 1.0, std::max(pass_tokens, 1.0));
    return kGrowth * (std::max(4 * chunk * v, device_bf16_gemm ? 2 * pass_tokens * widest_in : 0.0) + (device_bf16_gemm ? 2 * chunk * v : 0.0));
  };
  // The adapters' parameters (frozen ones included) and the trainable ones' gradients, mirrored
  // in two buffers.
  double adapter_bytes = 0, z_per_token = 0;  // z: LoRA's A x per adapted module, all layers
  std::map<int64_t, double> z_of_layer;
  ForEachLayerModule(s, at, adapted, &layout, [&](int64_t layer, model::Module, std::pair<double, double> values, int64_t rank) {
    adapter_bytes += 4 * (2 * values.first + values.second);
    if (at.kind != model::AdapterKind::kDiaBlo) {
      z_per_token += 4 * static_cast<double>(rank);
      z_of_layer[layer] += 4 * static_cast<double>(rank);
    }
  });
  double z_layer_max = 0;  // recomputing, one layer's cache holds z at a time
  for (const auto& [layer, z] : z_of_layer) z_layer_max = std::max(z_layer_max, z);
  // What does not depend on the activation mode, and the per-pass scratch at `pass_tokens`.
  const double fixed = DeviceWeightMiB(s, c.base) + (dequant + adapter_bytes) / (1 << 20);
  auto pass_scratch = [&](double pass_tokens) { return (pass_tokens * per_token + logits(pass_tokens)) / (1 << 20); };
  const double rest = fixed + pass_scratch(tokens);  // the whole batch in one pass: an upper bound
  // Activations (Trainer::Work): recomputing, the layer inputs, one layer's cache and the
  // backward temporaries; kept, every layer's cache (with LoRA's z per module) and the
  // temporaries.
  const double layers = static_cast<double>(s.n_layer);
  const double kept_per_seq = static_cast<double>(seq) * (layers * s.LayerCacheBytesPerToken() + z_per_token + s.BackwardTempBytesPerToken()) / (1 << 20);
  ActivationChoice a;
  if (per_example) a.dp_examples_per_pass = 1;
  if (keep_within_limit ? device_limit_mib > 0 && kept_per_seq > 0 : !recompute) {
    const double room = device_limit_mib >= kUnknownMemoryMiB ? kDefaultKeptMiB : device_limit_mib - rest;
    const int fit = keep_within_limit ? static_cast<int>(std::min<double>(per_pass, std::floor(room / kept_per_seq + 1e-9))) : per_pass;
    if (fit >= 1) {
      a.recompute = false;
      a.seqs_per_pass = fit;
      a.activation_mib = fit * kept_per_seq;
    }
  }
  if (a.recompute) a.activation_mib = tokens * (s.RecomputeBytesPerToken() + z_layer_max) / (1 << 20);
  // Kept in slices of seqs_per_pass sequences: the scratch of one slice.
  a.device_mib = (a.recompute ? rest : fixed + pass_scratch(static_cast<double>(a.seqs_per_pass) * seq)) + a.activation_mib;
  // Host: everything but the activations and logits (Choose's terms without them).
  a.total_mib = fixed_mib + BaseMiB(s, c.base) + AdapterStateMiB(s, at, adapted, c.modules) +
                adapter_copies * AdapterBytes(s, spec, adapted, &layout) / (1 << 20) +
                (per_example ? 2 * AdapterBytes(s, at, c.modules, &layout) / (1 << 20) : 0.0);
  return a;
}

double AdapterBytes(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& modules,
                    const std::vector<std::optional<model::LayerSetting>>* layout) {
  double v = 0;  // what travels: the trainable tensors
  ForEachLayerModule(s, spec, modules, layout, [&](int64_t, model::Module, std::pair<double, double> values, int64_t) { v += values.first; });
  return v * 4;
}

std::map<model::Module, double> NormaliseImportance(const std::map<model::Module, double>& raw) {
  double total = 0;
  for (const auto& [m, v] : raw) total += std::max(0.0, v);
  std::map<model::Module, double> out;
  for (const auto& [m, v] : raw) out[m] = total > 0 ? std::max(0.0, v) / total : 1.0 / static_cast<double>(raw.size());
  return out;
}

std::map<model::Module, double> UpdateEnergy(const std::map<std::string, std::vector<float>>& before,
                                             const std::map<std::string, std::vector<float>>& after, const std::vector<model::Module>& modules) {
  std::map<model::Module, std::pair<double, double>> energy;  // sum of squares, values
  for (const auto& [name, v] : after) {
    const auto b = before.find(name);
    if (b == before.end() || b->second.size() != v.size()) continue;
    for (model::Module m : modules)
      if (name.find(std::string(".") + model::GgufModuleName(m) + ".") != std::string::npos) {
        for (size_t i = 0; i < v.size(); ++i) energy[m].first += static_cast<double>(v[i] - b->second[i]) * (v[i] - b->second[i]);
        energy[m].second += static_cast<double>(v.size());
      }
  }
  std::map<model::Module, double> moved;  // modules nobody trained (no movement) are absent
  for (const auto& [m, e] : energy)
    if (e.first > 0 && e.second > 0) moved[m] = e.first / e.second;
  return NormaliseImportance(moved);
}

void BlendImportance(std::map<model::Module, double>& importance, const std::map<model::Module, double>& moved) {
  // Only modules someone trained this round carry information; they share the importance mass
  // they had (untrained modules keep theirs, so a module left out once is not starved forever).
  double mass = 0;
  for (const auto& [m, v] : moved) mass += importance.count(m) ? importance.at(m) : 0.0;
  for (auto& [m, v] : importance)
    if (auto it = moved.find(m); it != moved.end()) v = 0.5 * v + 0.5 * it->second * mass;
}

model::AdapterSpec SpecAt(const model::AdapterSpec& spec, const Candidate& c) {
  model::AdapterSpec s = spec;
  if (c.rank > 0 && spec.kind != model::AdapterKind::kDiaBlo) s.rank = c.rank;
  return s;
}

double Utility(const std::map<model::Module, double>& importance, const Candidate& c, int64_t shared_rank) {
  double cover = 0;
  for (auto m : c.modules)
    if (auto it = importance.find(m); it != importance.end()) cover += it->second;
  const double share = shared_rank > 0 && c.rank > 0 ? std::min(1.0, static_cast<double>(c.rank) / static_cast<double>(shared_rank)) : 1.0;
  return static_cast<double>(c.local_steps) * c.batch * cover * share;
}

double WorkerProfile::BaseSpeed(kernels::GgmlType t) const {
  const auto it = base_speed.find(t);
  return it == base_speed.end() || !std::isfinite(it->second) ? 1.0 : std::clamp(it->second, 0.05, 20.0);
}

std::map<kernels::GgmlType, double> RelativeBaseSpeeds(const std::map<kernels::GgmlType, double>& tokens_per_second, kernels::GgmlType stored_type) {
  std::map<kernels::GgmlType, double> rel;
  const auto s = tokens_per_second.find(stored_type);
  if (s == tokens_per_second.end() || !(s->second > 0)) return rel;
  for (const auto& [t, v] : tokens_per_second)
    if (t != stored_type && v > 0 && std::isfinite(v)) rel[t] = v / s->second;
  return rel;
}

double WorkerProfile::BatchSpeed(int batch) const {
  const double s = std::isfinite(batch4_speedup) && batch4_speedup > 0 ? std::clamp(batch4_speedup, 0.25, 4.0) : 1.0;  // <= 0: not measured
  return std::pow(s, std::clamp(std::log2(std::max(batch, 1)) / 2.0, 0.0, 1.0));
}

double TrainSeconds(const WorkerProfile& w, const PlannerOptions& o, const Candidate& c, bool kept, int seqs_per_pass) {
  const double per_example = o.tokens_per_example > 0 ? o.tokens_per_example : o.seq;
  // The batch speed-up comes from the sequences that share one pass (DP-SGD: one example).
  const int pass = seqs_per_pass > 0 ? seqs_per_pass : o.memory.per_example ? 1 : c.batch;
  const double tps = w.tokens_per_second * w.BaseSpeed(c.base) * w.BatchSpeed(pass) * (kept ? std::clamp(w.keep_speedup, 1.0, 4.0) : 1.0);
  return static_cast<double>(c.local_steps) * c.batch * per_example / std::max(tps, 1e-9);
}

double PredictSeconds(const ModelShape& shape, const WorkerProfile& w, const PlannerOptions& o, const Candidate& c, bool kept, int seqs_per_pass) {
  const double compute = TrainSeconds(w, o, c, kept, seqs_per_pass);
  // A DiaBlo worker on k of N blocks uploads those k (its memory is counted at all N: the
  // blocks it does not train still act, and their gradients are computed; the safe side).
  const double up_share = o.spec.kind == model::AdapterKind::kDiaBlo && c.rank > 0 ? static_cast<double>(c.rank) / static_cast<double>(o.spec.blocks) : 1.0;
  const double down = AdapterBytes(shape, o.spec, o.adapted, &o.memory.layout),
               up = up_share * AdapterBytes(shape, SpecAt(o.spec, c), c.modules, &o.memory.layout) * (o.upload_ratio + (o.send_fisher ? 1 : 0));
  return compute + 2 * w.latency_ms / 1000 + (down + up) * 8 / (std::max(w.link_mbps, 1e-9) * 1e6);
}

absl::Status CheckLayout(const std::vector<std::optional<model::LayerSetting>>& layout, const std::vector<model::Module>& adapted) {
  for (size_t l = 0; l < layout.size(); ++l)
    if (layout[l])
      for (auto m : layout[l]->modules)
        if (!Contains(adapted, m))
          return absl::InvalidArgumentError(absl::StrCat("adapter.layers: layer ", l, " adapts ", model::ModuleName(m),
                                                         ", which is not in adapter.target_modules (the planner plans over those)"));
  return absl::OkStatus();
}

absl::StatusOr<Plan> MakePlan(const ModelShape& shape, const std::map<model::Module, double>& importance_raw,
                              const std::vector<WorkerProfile>& workers, const PlannerOptions& o) {
  if (o.adapted.empty()) return absl::InvalidArgumentError("planner: the adapter has no modules");
  if (o.batches.empty() || o.max_local_steps < 1 || o.seq < 1) return absl::InvalidArgumentError("planner: empty candidate grid");
  if (!o.memory.layout.empty()) {
    FT_RETURN_IF_ERROR(CheckLayout(o.memory.layout, o.adapted));
    // A module no layer has is neither a candidate nor credited (it would cost nothing and train
    // nothing): plan over the modules the layout has.
    std::vector<model::Module> present;
    for (auto m : o.adapted)
      for (const auto& setting : o.memory.layout)
        if (setting && Contains(setting->modules, m)) {
          present.push_back(m);
          break;
        }
    if (present.empty()) return absl::InvalidArgumentError("planner: no layer of adapter.layers has any of the adapter's modules");
    if (present.size() < o.adapted.size()) {
      PlannerOptions po = o;
      po.adapted = present;
      std::vector<model::Module> uniform;
      for (auto m : o.uniform.modules)
        if (Contains(present, m)) uniform.push_back(m);
      po.uniform.modules = uniform.empty() ? present : uniform;
      std::map<model::Module, double> importance;
      for (const auto& [m, v] : importance_raw)
        if (Contains(present, m)) importance[m] = v;
      return MakePlan(shape, importance, workers, po);
    }
  }
  const auto importance = NormaliseImportance(importance_raw);
  // Local DP-SGD: the order at which the uniform run gives a worker its epsilon.
  auto local_dp_order = [&](const WorkerProfile& w) {
    if (o.local_dp_sigma <= 0 || !(w.examples > 0)) return 2.0;
    const std::vector<double> orders = privacy::DefaultOrders();
    std::vector<double> run = privacy::SampledGaussianRdp(std::min(1.0, o.uniform.batch / w.examples), o.local_dp_sigma, orders);
    for (double& v : run) v *= static_cast<double>(o.uniform.local_steps) * std::max(1, o.local_dp_rounds);
    const auto e = privacy::EpsilonFromRdp(orders, run, o.local_dp_delta);
    return e.ok() && e->order > 1 ? e->order : 2.0;
  };
  std::vector<kernels::GgmlType> bases = o.base_types.empty() ? std::vector<kernels::GgmlType>{shape.stored} : o.base_types;
  // Higher precision first: among equal utility and time the earlier candidate wins.
  std::stable_sort(bases.begin(), bases.end(), [](auto a, auto b) { return BitsPerWeight(a) > BitsPerWeight(b); });
  // Ranks (DiaBlo: block counts), highest first (0: the shared rank).
  const int64_t full = o.spec.FullShare();
  std::vector<int64_t> ranks;
  for (int64_t r : o.ranks) {
    if (r < 1 || r > full) return absl::InvalidArgumentError(absl::StrCat("planner: rank (DiaBlo: block count) ", r, " outside [1, ", full, "]"));
    ranks.push_back(r == full ? 0 : r);
  }
  if (ranks.empty()) ranks.push_back(0);
  std::sort(ranks.begin(), ranks.end(), [&](int64_t a, int64_t b) { return (a == 0 ? full : a) > (b == 0 ? full : b); });
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  const int64_t shared_rank = o.ranks.empty() ? 0 : full;  // utility shares only when ranks vary

  // Module sets: every non-empty subset when small, else importance-ordered prefixes.
  std::vector<std::vector<model::Module>> sets;
  const size_t n = o.adapted.size();
  if (o.whole_adapter) {
    sets.push_back(o.adapted);
  } else if (n <= 10) {
    for (uint32_t mask = 1; mask < (1u << n); ++mask) {
      std::vector<model::Module> s;
      for (size_t i = 0; i < n; ++i)
        if (mask & (1u << i)) s.push_back(o.adapted[i]);
      sets.push_back(std::move(s));
    }
  } else {
    std::vector<model::Module> order = o.adapted;
    std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return importance.at(a) > importance.at(b); });
    for (size_t k = 1; k <= n; ++k) sets.emplace_back(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k));
  }

  struct Scored {
    Candidate c;
    double t, u, mib;
    ActivationChoice a;
  };
  Plan plan;
  std::vector<std::vector<Scored>> feasible(workers.size());
  plan.workers.resize(workers.size());
  for (size_t k = 0; k < workers.size(); ++k) {
    const WorkerProfile& w = workers[k];
    WorkerPlan& wp = plan.workers[k];
    wp.worker = w.name;
    const double usable = o.memory_margin * w.memory_mib;
    // A device worker: activations and the weights' working copies on the device, bounded by its
    // memory there too (MemoryModel::ChooseOnDevice).
    const bool on_device = w.device_memory_mib > 0;
    const double usable_device = o.memory_margin * w.device_memory_mib;
    MemoryModel device_model = o.memory;
    device_model.device_bf16_gemm = w.device_bf16_gemm;
    auto choose = [&](const Candidate& c) {
      return on_device ? device_model.ChooseOnDevice(shape, o.spec, o.adapted, c, o.seq, usable_device)
                       : o.memory.Choose(shape, o.spec, o.adapted, c, o.seq, usable, w.bf16_kernels);
    };
    // How far over its limits a choice is (<= 1: fits).
    auto over = [&](const ActivationChoice& a) { return std::max(a.total_mib / usable, on_device ? a.device_mib / usable_device : 0.0); };
    double smallest = std::numeric_limits<double>::infinity();
    bool sized = false;  // some candidate passed the privacy constraint and was sized
    ActivationChoice smallest_a;
    Candidate smallest_c;
    std::vector<int> batches = o.batches;  // larger first: on ties the larger batch wins
    std::sort(batches.rbegin(), batches.rend());
    // Local DP-SGD: one step's RDP at the uniform run's optimal order, (batch, steps) against
    // the uniform configuration's.
    const std::vector<double> order = {local_dp_order(w)};
    std::map<int, double> rdp;  // per batch
    auto step_rdp = [&](int batch) {
      auto it = rdp.find(batch);
      if (it == rdp.end()) it = rdp.emplace(batch, privacy::SampledGaussianRdp(std::min(1.0, batch / w.examples), o.local_dp_sigma, order)[0]).first;
      return it->second;
    };
    auto private_enough = [&](int batch, int steps) {
      if (o.local_dp_sigma <= 0) return true;
      if (!(w.examples > 0)) return batch <= o.uniform.batch && steps <= o.uniform.local_steps;
      return steps * step_rdp(batch) <= o.uniform.local_steps * step_rdp(o.uniform.batch) * (1 + 1e-12);
    };
    int private_refused = 0;
    for (const auto& s : sets)
      for (int64_t rank : ranks)
      for (auto b : bases)
        for (int batch : batches)
          for (int steps = 1; steps <= o.max_local_steps; ++steps) {
            if (!private_enough(batch, steps)) {
              ++private_refused;
              continue;
            }
            Candidate c{s, b, batch, steps, rank};
            const ActivationChoice a = choose(c);
            const double mib = a.total_mib;
            if (!sized || over(a) < smallest) {
              sized = true;
              smallest = over(a);
              smallest_a = a;
              smallest_c = c;
            }
            if (over(a) > 1 + 1e-12) continue;  // Choose's kept result may touch the limit
            feasible[k].push_back({c, PredictSeconds(shape, w, o, c, !a.recompute, a.PassSequences()), Utility(importance, c, shared_rank), mib, a});
          }
    const ActivationChoice ua = choose(o.uniform);
    wp.uniform_seconds = over(ua) <= 1 + 1e-12 ? PredictSeconds(shape, w, o, o.uniform, !ua.recompute, ua.PassSequences()) : -1;
    if (wp.uniform_seconds < 0) {
      plan.uniform_fits_everyone = false;
    } else {
      plan.uniform_round_seconds = std::max(plan.uniform_round_seconds, wp.uniform_seconds);
      plan.uniform_utility += Utility(importance, o.uniform, shared_rank);
    }
    if (feasible[k].empty() && !sized) {
      wp.excluded = true;
      wp.reason = absl::StrFormat("left out: none of the %d candidates stays within the uniform configuration's local DP-SGD privacy cost",
                                  private_refused);
      continue;
    }
    if (feasible[k].empty()) {
      wp.excluded = true;
      wp.reason = absl::StrFormat(
          "left out: the smallest configuration (module %s, batch %d, base %s) needs %.0f MiB, more than the %.0f MiB it may use (%.0f%% of %.0f MiB)",
          ModuleList(smallest_c.modules), smallest_c.batch, TypeName(smallest_c.base), smallest_a.total_mib, usable, 100 * o.memory_margin, w.memory_mib);
      if (on_device && smallest_a.device_mib > usable_device)
        wp.reason = absl::StrFormat(
            "left out: the smallest configuration (module %s, batch %d, base %s) needs %.0f MiB of device memory, more than the %.0f MiB it "
            "may use there (%.0f%% of %.0f MiB)",
            ModuleList(smallest_c.modules), smallest_c.batch, TypeName(smallest_c.base), smallest_a.device_mib, usable_device,
            100 * o.memory_margin, w.device_memory_mib);
      continue;
    }
    // By time, then utility descending, so that a prefix maximum picks the fastest of the best.
    std::stable_sort(feasible[k].begin(), feasible[k].end(), [](const Scored& a, const Scored& b) { return a.t != b.t ? a.t < b.t : a.u > b.u; });
  }
  // Best candidate of worker k within time T: the highest utility among those with t <= T
  // (first such in time order on ties), of rank at most `cap`.
  auto rank_of = [&](const Candidate& c) { return c.rank > 0 ? c.rank : full; };
  auto best = [&](size_t k, double T, int64_t cap = std::numeric_limits<int64_t>::max()) -> const Scored* {
    const Scored* b = nullptr;
    for (const Scored& s : feasible[k]) {
      if (s.t > T) break;
      if (rank_of(s.c) > cap) continue;
      if (!b || s.u > b->u + 1e-12) b = &s;
    }
    return b;
  };
  // The best candidate within T among those of the lowest rank there.
  auto lowest = [&](size_t k, double T) -> const Scored* {
    int64_t low = std::numeric_limits<int64_t>::max();
    for (const Scored& s : feasible[k]) {
      if (s.t > T) break;
      low = std::min(low, rank_of(s.c));
    }
    return best(k, T, low);
  };
  // Secure aggregation (secure_threshold t): a rank component fewer than t workers train is never
  // unmasked, so nobody is planned above the t-th highest planned rank; a worker capped there
  // spends the time it frees on what else raises its utility (batch, local steps). Re-picking
  // can lower ranks further, so the cap is lowered until the t-th highest rank is the cap (a
  // fixed point: the cap only falls). Ranks are nested (LoRA, FFA-LoRA); DiaBlo's blocks and
  // modules (whole adapters under secure aggregation) are left to the round engine. With the cap
  // the utility total is no longer monotone in T (a worker's own choice at a longer T can lower
  // the cap for all), so the bisection below finds a round time that reaches the target, not
  // always the smallest one; every plan it gives meets the threshold.
  // TODO(issue 22): a joint choice of cap and T (max over caps of the capped totals).
  const bool cap_ranks = o.secure_threshold > 0 && !o.ranks.empty() && o.spec.kind != model::AdapterKind::kDiaBlo;
  auto assign = [&](double T, int64_t* cap_out) {
    std::vector<const Scored*> picks(workers.size(), nullptr);
    int64_t cap = std::numeric_limits<int64_t>::max();
    for (;;) {
      std::vector<int64_t> planned;
      for (size_t k = 0; k < workers.size(); ++k) {
        if (feasible[k].empty()) continue;
        picks[k] = best(k, T, cap);
        if (!picks[k]) picks[k] = lowest(k, T);  // nothing within the cap in time: its lowest rank (the round engine narrows)
        if (picks[k]) planned.push_back(rank_of(picks[k]->c));
      }
      if (!cap_ranks || static_cast<int>(planned.size()) < o.secure_threshold) break;
      std::sort(planned.rbegin(), planned.rend());
      const int64_t tth = planned[static_cast<size_t>(o.secure_threshold - 1)];
      if (tth >= planned.front() || tth >= cap) break;  // every planned component has t trainers
      cap = tth;
    }
    if (cap_out) *cap_out = cap;
    return picks;
  };
  double t_min = 0;
  std::vector<double> times;
  for (size_t k = 0; k < workers.size(); ++k) {
    if (feasible[k].empty()) continue;
    t_min = std::max(t_min, feasible[k].front().t);  // everyone who fits takes part
    for (const Scored& s : feasible[k]) times.push_back(s.t);
  }
  if (times.empty()) return absl::FailedPreconditionError("planner: no worker can train any configuration within its memory");
  std::sort(times.begin(), times.end());
  times.erase(std::unique(times.begin(), times.end()), times.end());
  auto total = [&](double T) {
    double u = 0;
    for (const Scored* s : assign(T, nullptr))
      if (s) u += s->u;
    return u;
  };
  // Smallest T >= t_min whose best total utility reaches the uniform configuration's.
  auto lo = std::lower_bound(times.begin(), times.end(), t_min);
  auto hi = times.end() - 1;
  const double target = o.work_factor * plan.uniform_utility;
  if (total(*hi) < target) {
    lo = hi;  // cannot match the uniform work: take the most the fleet can do
  } else {
    while (lo < hi) {
      auto mid = lo + (hi - lo) / 2;
      if (total(*mid) >= target) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
  }
  const double T = *lo;
  int64_t cap = 0;
  const std::vector<const Scored*> picks = assign(T, &cap);
  for (size_t k = 0; k < workers.size(); ++k) {
    WorkerPlan& wp = plan.workers[k];
    if (wp.excluded) continue;
    const Scored* s = picks[k];
    const Scored* unconstrained = best(k, T);
    const bool capped = cap_ranks && unconstrained && rank_of(unconstrained->c) > cap && rank_of(s->c) <= cap;
    wp.c = s->c;
    wp.predicted_mib = s->mib;
    wp.predicted_device_mib = s->a.device_mib;
    wp.activations = s->a;
    wp.predicted_seconds = s->t;
    wp.predicted_train_seconds = TrainSeconds(workers[k], o, s->c, !s->a.recompute, s->a.PassSequences());
    wp.utility = s->u;
    plan.utility += s->u;
    plan.round_seconds = std::max(plan.round_seconds, s->t);
    // Why not more: a candidate with more utility that was too slow, or that did not fit.
    bool time_bound = false;
    for (const Scored& f : feasible[k])
      if (f.u > s->u + 1e-12 && f.t > T) time_bound = true;
    double cover = 0;
    for (auto m : s->c.modules) cover += importance.count(m) ? importance.at(m) : 0;
    wp.explanation = absl::StrFormat(
        "trains %s (%.0f%% of module importance)%s, batch %d x %d local steps, base %s, activations %s: predicted %.0f MiB of %.0f MiB "
        "usable%s, %.1f s (uniform configuration: %s); %s",
        ModuleList(s->c.modules), 100 * cover,
        o.ranks.empty() ? std::string()
        : o.spec.kind == model::AdapterKind::kDiaBlo
            ? absl::StrFormat(" on %d of %d DiaBlo blocks", s->c.rank > 0 ? s->c.rank : o.spec.blocks, o.spec.blocks)
            : absl::StrFormat(" at rank %d of %d", SpecAt(o.spec, s->c).rank, o.spec.rank),
        s->c.batch,
        s->c.local_steps,
        TypeName(s->c.base) + (workers[k].base_speed.count(s->c.base) ? absl::StrFormat(" (x%.2f the stored type's measured speed)", workers[k].BaseSpeed(s->c.base))
                                                                     : std::string()),
        s->a.recompute ? std::string("recomputed") : absl::StrFormat("kept, %d sequence(s) per pass", s->a.seqs_per_pass), s->mib,
        o.memory_margin * workers[k].memory_mib,
        workers[k].device_memory_mib > 0
            ? absl::StrFormat(" and %.0f MiB of device memory of %.0f MiB usable", s->a.device_mib, o.memory_margin * workers[k].device_memory_mib)
            : std::string(),
        s->t, wp.uniform_seconds < 0 ? std::string("does not fit") : absl::StrFormat("%.1f s", wp.uniform_seconds),
        time_bound ? absl::StrFormat("more work would pass the round's time of %.1f s", T)
                   : "its best configuration within memory and the candidate grid");
    if (capped)
      absl::StrAppendFormat(&wp.explanation,
                            "; rank capped at %d (it could train rank %d): secure aggregation unmasks only the rank components at least %d "
                            "workers train",
                            cap, rank_of(unconstrained->c), o.secure_threshold);
  }
  plan.summary = absl::StrFormat("planned round %.1f s vs uniform %.1f s (%s); training work %.1f vs %.1f example-equivalents", plan.round_seconds,
                                 plan.uniform_round_seconds, plan.uniform_fits_everyone ? "fits every worker" : "does not fit every worker",
                                 plan.utility, plan.uniform_utility);
  return plan;
}

}  // namespace fedtune::planner

#include "model/export.h"

#include <filesystem>
#include <fstream>

#include "absl/strings/str_join.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace fedtune::model {
namespace {

using kernels::GgmlType;


bool IsRope(Module m) { return m == Module::kQ || m == Module::kK; }

const char* PeftPrefix(Module m) { return (m == Module::kGate || m == Module::kUp || m == Module::kDown) ? "mlp" : "self_attn"; }

// The first adapter's spec; all adapters of a set share one kind (checked).
absl::StatusOr<AdapterSpec> CommonSpec(const AdapterSet<float>& s) {
  std::optional<AdapterSpec> spec;
  for (const auto& l : s.layers)
    for (const auto& a : l) {
      if (!a) continue;
      // Per-layer ranks are fine (PEFT's rank_pattern; llama.cpp takes each tensor's rank), with
      // one alpha: both scale by alpha / (the module's rank).
      if (spec && (spec->kind != a->spec.kind || spec->alpha != a->spec.alpha || spec->rslora != a->spec.rslora)) {
        return absl::UnimplementedError("exporting adapters of mixed kinds, alphas or scalings in one file is not supported");
      }
      if (!spec) spec = a->spec;
    }
  if (!spec) return absl::InvalidArgumentError("no adapters to export");
  return *spec;
}

// What an export writes per layer: one tensor of the base per target, made of one or more of
// fedtune's modules stacked by rows (Phi-3's fused qkv_proj / attn_qkv and gate_up_proj /
// ffn_up; every other family: one module per target).
struct Part {
  Module mod;
  int64_t row0;  // first row of the module in the target tensor
};
struct Target {
  const char* peft;    // PEFT module name
  const char* prefix;  // self_attn or mlp
  const char* gguf;    // GGUF tensor stem
  int64_t out;         // rows of the target tensor
  std::vector<Part> parts;
};

std::vector<Target> Targets(const LlamaConfig& c) {
  const int64_t q = c.q_dim(), kv = c.n_head_kv * c.head_dim, f = c.n_ff, e = c.n_embd;
  if (c.fused) {
    return {{"qkv_proj", "self_attn", "attn_qkv", q + 2 * kv, {{Module::kQ, 0}, {Module::kK, q}, {Module::kV, q + kv}}},
            {"o_proj", "self_attn", "attn_output", e, {{Module::kO, 0}}},
            {"gate_up_proj", "mlp", "ffn_up", 2 * f, {{Module::kGate, 0}, {Module::kUp, f}}},
            {"down_proj", "mlp", "ffn_down", e, {{Module::kDown, 0}}}};
  }
  std::vector<Target> t;
  for (int mi = 0; mi < kNumModules; ++mi) {
    const Module m = static_cast<Module>(mi);
    const int64_t out = m == Module::kQ ? q : (m == Module::kK || m == Module::kV) ? kv : (m == Module::kGate || m == Module::kUp) ? f : e;
    t.push_back({PeftModuleName(m), PeftPrefix(m), GgufModuleName(m), out, {{m, 0}}});
  }
  return t;
}

// Whether llama.cpp's GGUF of this architecture keeps q/k rows in rotate_half order (it runs
// qwen2/qwen3/gemma3/phi3 with NeoX RoPE; its llama arch has adjacent pairs). Decided by the
// target's architecture, not by the file the model came from (a Hugging Face llama folder is
// rotate_half, its GGUF is not).
bool GgufNeox(const LlamaConfig& c) { return c.arch != "llama"; }

std::string PeftTensorName(int64_t layer, const Target& t, const char* ab) {
  return absl::StrCat("base_model.model.model.layers.", layer, ".", t.prefix, ".", t.peft, ".lora_", ab, ".weight");
}

// Row `row` of module `mod` (fedtune's order) in a file that stores q/k rows in rotate_half
// order when `neox`.
int64_t FileRow(Module mod, int64_t row, int64_t head_dim, bool neox) { return neox && IsRope(mod) ? RotateHalfRow(row, head_dim) : row; }

// One target of one layer as a LoRA pair: A stacks the parts' A (rank = the sum of their ranks),
// B is block-diagonal, each block scaled so that scale(rank) * B A equals the parts' deltas,
// where scale(r) is the target format's scale for a tensor of rank r.
struct Stacked {
  int64_t rank = 0;
  std::vector<float> a, b;  // [rank x in], [out x rank]
};
template <typename ScaleOf>
Stacked Stack(const AdapterSet<float>& s, size_t l, const Target& t, const LlamaConfig& c, bool neox, ScaleOf scale_of) {
  Stacked st;
  int64_t in = 0;
  for (const Part& p : t.parts) {
    const auto& a = s.layers[l][static_cast<size_t>(p.mod)];
    if (!a) continue;
    st.rank += a->spec.rank;
    in = a->in;
  }
  if (st.rank == 0) return st;
  st.a.reserve(static_cast<size_t>(st.rank * in));
  st.b.assign(static_cast<size_t>(t.out * st.rank), 0.0f);
  const float target_scale = scale_of(st.rank);
  int64_t col = 0;
  for (const Part& p : t.parts) {
    const auto& a = s.layers[l][static_cast<size_t>(p.mod)];
    if (!a) continue;
    const int64_t r = a->spec.rank;
    st.a.insert(st.a.end(), a->a.begin(), a->a.end());
    const float f = a->spec.Scale() / target_scale;
    for (int64_t row = 0; row < a->out; ++row) {
      const int64_t dst = p.row0 + FileRow(p.mod, row, c.head_dim, neox);
      for (int64_t k = 0; k < r; ++k) st.b[static_cast<size_t>(dst * st.rank + col + k)] = f * a->b[static_cast<size_t>(row * r + k)];
    }
    col += r;
  }
  return st;
}

}  // namespace

std::vector<float> DenseDelta(const ModuleAdapter<float>& a) {
  std::vector<float> w(static_cast<size_t>(a.out * a.in), 0.0f);
  if (a.spec.kind == AdapterKind::kDiaBlo) {
    for (int64_t i = 0; i < a.spec.blocks; ++i)
      for (int64_t j = 0; j < a.b_in && i * a.b_in + j < a.in; ++j)
        for (int64_t c = 0; c < a.b_out && i * a.b_out + c < a.out; ++c)
          w[static_cast<size_t>((i * a.b_out + c) * a.in + i * a.b_in + j)] = a.d[static_cast<size_t>((i * a.b_in + j) * a.b_out + c)];
    return w;
  }
  const int64_t r = a.spec.rank;
  const float s = a.spec.Scale();
  for (int64_t o = 0; o < a.out; ++o)
    for (int64_t k = 0; k < r; ++k) {
      const float bk = s * a.b[static_cast<size_t>(o * r + k)];
      if (bk == 0.0f) continue;
      for (int64_t i = 0; i < a.in; ++i) w[static_cast<size_t>(o * a.in + i)] += bk * a.a[static_cast<size_t>(k * a.in + i)];
    }
  return w;
}

absl::Status ExportPeft(const std::string& dir, const LlamaModel& model, const AdapterSet<float>& adapters,
                        const std::string& base_model_name) {
  FT_ASSIGN_OR_RETURN(AdapterSpec spec, CommonSpec(adapters));
  if (spec.kind == AdapterKind::kDiaBlo) {
    return absl::UnimplementedError("PEFT has no DiaBlo type: export DiaBlo as a merged model or as GGUF-LoRA");
  }
  const LlamaConfig& c = model.config();
  // PEFT's scale for a module of rank r: alpha / r (rsLoRA: alpha / sqrt(r)).
  auto peft_scale = [&](int64_t r) {
    return spec.rslora ? spec.alpha / std::sqrt(static_cast<float>(r)) : spec.alpha / static_cast<float>(r);
  };
  SafetensorsWriter w;
  std::vector<std::string> targets;
  nlohmann::ordered_json rank_pattern = nlohmann::ordered_json::object();  // modules whose rank is not `r`
  int64_t file_rank = 0;
  for (size_t l = 0; l < adapters.layers.size(); ++l) {
    for (const Target& t : Targets(c)) {
      // Hugging Face stores q/k rows in rotate_half order: always permuted back here.
      const Stacked st = Stack(adapters, l, t, c, /*neox=*/true, peft_scale);
      if (st.rank == 0) continue;
      if (std::find(targets.begin(), targets.end(), t.peft) == targets.end()) targets.push_back(t.peft);
      if (file_rank == 0) file_rank = st.rank;
      if (st.rank != file_rank) rank_pattern[absl::StrCat("model.layers.", l, ".", t.prefix, ".", t.peft)] = st.rank;
      const int64_t in = static_cast<int64_t>(st.a.size()) / st.rank;
      FT_RETURN_IF_ERROR(w.AddF32(PeftTensorName(static_cast<int64_t>(l), t, "A"), {st.rank, in}, st.a));
      FT_RETURN_IF_ERROR(w.AddF32(PeftTensorName(static_cast<int64_t>(l), t, "B"), {t.out, st.rank}, st.b));
    }
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  w.SetMetadata("format", "pt");
  FT_RETURN_IF_ERROR(w.WriteFile(dir + "/adapter_model.safetensors"));
  nlohmann::ordered_json cfg = {
      {"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"base_model_name_or_path", base_model_name},
      {"r", file_rank}, {"lora_alpha", spec.alpha}, {"use_rslora", spec.rslora}, {"target_modules", targets},
      {"lora_dropout", 0.0}, {"fan_in_fan_out", false}, {"bias", "none"}, {"inference_mode", true},
      {"init_lora_weights", true}, {"modules_to_save", nullptr}, {"rank_pattern", rank_pattern},
      {"fedtune", {{"adapter", AdapterKindName(spec.kind)}, {"note", spec.kind == AdapterKind::kFfaLora ? "FFA-LoRA: lora_A is the frozen shared init" : ""}}}};
  const std::string text = cfg.dump(2) + "\n";
  return WriteFileAtomic(dir + "/adapter_config.json", {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

absl::StatusOr<AdapterSet<float>> ImportPeft(const std::string& dir, const LlamaModel& model) {
  FT_ASSIGN_OR_RETURN(std::string cfg_text, ReadFileToString(dir + "/adapter_config.json"));
  const auto cfg = nlohmann::json::parse(cfg_text, nullptr, false);
  if (cfg.is_discarded() || !cfg.is_object()) return absl::InvalidArgumentError(dir + "/adapter_config.json is not a JSON object");
  if (cfg.value("peft_type", "") != "LORA") return absl::UnimplementedError(dir + ": only PEFT LoRA adapters can be imported");
  if (!cfg.contains("r") || !cfg["r"].is_number_integer() || !cfg.contains("lora_alpha") || !cfg["lora_alpha"].is_number()) {
    return absl::InvalidArgumentError(dir + "/adapter_config.json: needs integer 'r' and numeric 'lora_alpha'");
  }
  if (cfg.value("fan_in_fan_out", false)) return absl::UnimplementedError("fan_in_fan_out adapters are not supported");
  // rank_pattern: "model.layers.L.<prefix>.<module>" (as exported) or a suffix of that name.
  std::vector<std::pair<std::string, int64_t>> pattern;
  if (cfg.contains("rank_pattern") && cfg["rank_pattern"].is_object()) {
    for (const auto& [k, v] : cfg["rank_pattern"].items()) {
      if (!v.is_number_integer() || v.get<int64_t>() <= 0) return absl::InvalidArgumentError(absl::StrCat(dir, ": rank_pattern '", k, "' is not a positive integer"));
      pattern.emplace_back(k, v.get<int64_t>());
    }
  }
  AdapterSpec spec{AdapterKind::kLora, cfg["r"].get<int64_t>(), cfg["lora_alpha"].get<float>(), cfg.value("use_rslora", false), 1};
  const LlamaConfig& c = model.config();
  const auto all = Targets(c);
  std::vector<const Target*> chosen;
  std::vector<Module> modules;
  if (!cfg.contains("target_modules") || !cfg["target_modules"].is_array()) return absl::InvalidArgumentError("target_modules must be a list");
  for (const auto& tm : cfg["target_modules"]) {
    const auto it = std::find_if(all.begin(), all.end(), [&](const Target& t) { return tm.is_string() && tm.get<std::string>() == t.peft; });
    if (it == all.end()) return absl::UnimplementedError(absl::StrCat("target module ", tm.dump(), " is not a projection of this ", c.arch, " model"));
    chosen.push_back(&*it);
    for (const Part& p : it->parts) modules.push_back(p.mod);
  }
  FT_ASSIGN_OR_RETURN(auto set, MakeAdapters<float>(model.adapter_dims(), spec, modules, 0));
  FT_ASSIGN_OR_RETURN(auto st, SafetensorsFile::Open(dir + "/adapter_model.safetensors"));
  for (size_t l = 0; l < set.layers.size(); ++l) {
    for (const Target* t : chosen) {
      const std::string full = absl::StrCat("model.layers.", l, ".", t->prefix, ".", t->peft);
      int64_t r = spec.rank;
      for (const auto& [k, v] : pattern) {
        if (full == k || (full.size() > k.size() && full.compare(full.size() - k.size(), k.size(), k) == 0 && full[full.size() - k.size() - 1] == '.')) r = v;
      }
      if (r != spec.rank) {  // this module's rank: rebuilt with it (its values are read below)
        for (const Part& p : t->parts) {
          auto& slot = set.layers[l][static_cast<size_t>(p.mod)];
          AdapterSpec sr = spec;
          sr.rank = r;
          FT_ASSIGN_OR_RETURN(auto a, ModuleAdapter<float>::Create(sr, slot->in, slot->out, 0));
          slot = std::move(a);
        }
      }
      std::vector<float> av, bv;
      for (const char* ab : {"A", "B"}) {
        const std::string name = PeftTensorName(static_cast<int64_t>(l), *t, ab);
        const SafeTensor* tensor = st->Find(name);
        if (tensor == nullptr) return absl::NotFoundError(absl::StrCat(dir, ": missing tensor ", name));
        const int64_t in = set.layers[l][static_cast<size_t>(t->parts[0].mod)]->in;
        const std::vector<int64_t> want = ab[0] == 'A' ? std::vector<int64_t>{r, in} : std::vector<int64_t>{t->out, r};
        if (tensor->shape != want) return absl::InvalidArgumentError(absl::StrCat(name, " has shape ", ShapeString(tensor->shape), ", expected ", ShapeString(want)));
        FT_ASSIGN_OR_RETURN(Tensor v, st->ToF32(name));
        (ab[0] == 'A' ? av : bv).assign(v.data<float>(), v.data<float>() + v.size());
      }
      // A fused target's shared A goes to each part; B's rows are split between them.
      for (const Part& p : t->parts) {
        auto& a = *set.layers[l][static_cast<size_t>(p.mod)];
        a.a = av;
        for (int64_t row = 0; row < a.out; ++row) {
          std::copy_n(bv.begin() + (p.row0 + FileRow(p.mod, row, c.head_dim, true)) * r, r, a.b.begin() + row * r);
        }
      }
    }
  }
  return set;
}

absl::Status ExportGgufLora(const std::string& path, const LlamaModel& model, const AdapterSet<float>& adapters) {
  FT_ASSIGN_OR_RETURN(AdapterSpec spec, CommonSpec(adapters));
  const LlamaConfig& c = model.config();
  GgufWriter w;
  w.SetString("general.architecture", c.arch);
  w.SetString("general.type", "adapter");
  w.SetString("general.name", absl::StrCat("fedtune ", AdapterKindName(spec.kind), " adapter"));
  w.SetString("adapter.type", "lora");
  // llama.cpp scales by alpha / rank(tensor): choose alpha so that equals fedtune's scale.
  // DiaBlo: alpha = 1 and, per tensor, r = min(in, out) with one factor the identity scaled
  // by r, so (1/r) B A = delta exactly.
  float alpha = spec.alpha;
  if (spec.kind == AdapterKind::kDiaBlo) {
    if (c.fused) return absl::UnimplementedError("GGUF-LoRA of DiaBlo on fused projections (phi3) is not supported: export merged");
    alpha = 1.0f;
  } else if (spec.rslora) {
    alpha = spec.alpha * std::sqrt(static_cast<float>(spec.rank));
    for (const auto& l : adapters.layers)
      for (const auto& a : l)
        if (a && a->spec.rank != spec.rank)
          return absl::UnimplementedError("GGUF-LoRA has one alpha per file: rsLoRA with per-layer ranks cannot be expressed (export PEFT instead)");
  }
  for (size_t l = 0; l < adapters.layers.size(); ++l) {
    for (const Target& t : Targets(c)) {
      const std::string base = absl::StrCat("blk.", l, ".", t.gguf, ".weight");
      const auto& single = adapters.layers[l][static_cast<size_t>(t.parts[0].mod)];
      if (spec.kind == AdapterKind::kDiaBlo) {
        if (!single) continue;
        const auto& a = single;
        const int64_t r = std::min(a->in, a->out);
        std::vector<float> delta = DenseDelta(*a), eye(static_cast<size_t>(r * r), 0.0f);
        if (GgufNeox(c) && IsRope(t.parts[0].mod)) {  // the delta's rows in the base file's order
          std::vector<float> file(delta.size());
          for (int64_t row = 0; row < a->out; ++row)
            std::copy_n(delta.begin() + row * a->in, a->in, file.begin() + RotateHalfRow(row, c.head_dim) * a->in);
          delta = std::move(file);
        }
        for (int64_t i = 0; i < r; ++i) eye[static_cast<size_t>(i * r + i)] = static_cast<float>(r);
        if (r == a->out) {  // A = delta [out x in], B = r I
          FT_RETURN_IF_ERROR(w.AddTensorF32(base + ".lora_a", {a->in, r}, GgmlType::kF32, delta));
          FT_RETURN_IF_ERROR(w.AddTensorF32(base + ".lora_b", {r, a->out}, GgmlType::kF32, eye));
        } else {  // A = I [in x in] (scaled into B), B = r delta
          for (auto& x : delta) x *= static_cast<float>(r);
          for (int64_t i = 0; i < r; ++i) eye[static_cast<size_t>(i * r + i)] = 1.0f;
          FT_RETURN_IF_ERROR(w.AddTensorF32(base + ".lora_a", {a->in, r}, GgmlType::kF32, eye));
          FT_RETURN_IF_ERROR(w.AddTensorF32(base + ".lora_b", {r, a->out}, GgmlType::kF32, delta));
        }
        continue;
      }
      // The base file's q/k row order: llama's GGUF is adjacent pairs like fedtune's;
      // qwen2/qwen3/gemma3/phi3 files keep rotate_half order (llama.cpp runs them with NeoX RoPE).
      const Stacked st = Stack(adapters, l, t, c, GgufNeox(c), [&](int64_t r) { return alpha / static_cast<float>(r); });
      if (st.rank == 0) continue;
      const int64_t in = static_cast<int64_t>(st.a.size()) / st.rank;
      FT_RETURN_IF_ERROR(w.AddTensorF32(base + ".lora_a", {in, st.rank}, GgmlType::kF32, st.a));
      FT_RETURN_IF_ERROR(w.AddTensorF32(base + ".lora_b", {st.rank, t.out}, GgmlType::kF32, st.b));
    }
  }
  w.SetF32("adapter.lora.alpha", alpha);
  return w.WriteFile(path);
}

absl::Status ExportMergedGguf(const std::string& path, const LlamaModel& model, const AdapterSet<float>& adapters,
                              GgmlType merged_type) {
  const GgufFile* g = model.gguf();
  if (g == nullptr) return absl::FailedPreconditionError("merged export needs a GGUF base model");
  GgufWriter w;
  for (const auto& k : g->key_order()) {
    if (k == "general.file_type") continue;  // now mixed
    w.SetValue(k, g->metadata().at(k));
  }
  const auto targets = Targets(model.config());
  const LlamaConfig& cfg = model.config();
  for (const auto& t : g->tensors()) {
    // The target this tensor is, in some layer: rewritten when a part is adapted, or when the
    // model holds it re-quantized (train --base-type): then the weight is the model's own,
    // dequantized, plus its compensation (W ~ Q + C), so the export is the model that trained.
    const Target* target = nullptr;
    size_t layer = 0;
    for (size_t l = 0; l < static_cast<size_t>(cfg.n_layer) && target == nullptr; ++l)
      for (const Target& tg : targets)
        if (t.name == absl::StrCat("blk.", l, ".", tg.gguf, ".weight")) {
          target = &tg;
          layer = l;
        }
    const auto adapted = [&](const Part& p) { return layer < adapters.layers.size() && adapters.layers[layer][static_cast<size_t>(p.mod)].has_value(); };
    // The model's re-quantized copy: another type than the file's, or a correction (a copy of
    // the same type, e.g. q/k rows permuted at load, is the file's weight: written as stored).
    const kernels::QMatrix* held = nullptr;
    if (target != nullptr) {
      const LlamaLayer& L = model.layer(static_cast<int64_t>(layer));
      for (const Part& p : target->parts) {
        const kernels::QMatrix& m = L.Projection(p.mod);
        if (m.type == t.type && !L.corr[static_cast<size_t>(p.mod)].present()) continue;
        if (target->parts.size() > 1)
          return absl::UnimplementedError(absl::StrCat(t.name, ": merged export of a re-quantized fused projection is not implemented"));
        held = &m;
      }
    }
    if (target == nullptr || (held == nullptr && !std::any_of(target->parts.begin(), target->parts.end(), adapted))) {
      FT_RETURN_IF_ERROR(w.AddTensor(t.name, t.ne, t.type, {t.data, t.nbytes}));
      continue;
    }
    std::vector<float> wv(static_cast<size_t>(t.n_elements()));
    if (held != nullptr) {
      const Module mod = target->parts[0].mod;
      if (held->rows * held->cols != t.n_elements()) return absl::InternalError(absl::StrCat(t.name, ": the model's copy does not match its shape"));
      const LowRankCorrection& corr = model.layer(static_cast<int64_t>(layer)).corr[static_cast<size_t>(mod)];
      const std::vector<float> u = corr.present() ? kernels::DequantizeMatrix(corr.u) : std::vector<float>{};
      const std::vector<float> v = corr.present() ? kernels::DequantizeMatrix(corr.v) : std::vector<float>{};
      for (int64_t row = 0; row < held->rows; ++row) {
        float* dst = wv.data() + FileRow(mod, row, cfg.head_dim, GgufNeox(cfg)) * held->cols;
        kernels::DequantizeRow(held->type, held->row(row), dst, held->cols);
        for (int64_t k = 0; k < corr.u.cols && corr.present(); ++k) {
          const float uk = u[static_cast<size_t>(row * corr.u.cols + k)];
          for (int64_t i = 0; i < held->cols; ++i) dst[i] += uk * v[static_cast<size_t>(k * held->cols + i)];
        }
      }
    } else {
      kernels::DequantizeRow(t.type, t.data, wv.data(), t.n_elements());
    }
    for (const Part& p : target->parts) {
      if (!adapted(p)) continue;
      const auto& a = adapters.layers[layer][static_cast<size_t>(p.mod)];
      const auto delta = DenseDelta(*a);
      if ((p.row0 + a->out) * a->in > static_cast<int64_t>(wv.size())) return absl::InternalError(absl::StrCat("adapter for ", t.name, " does not match its shape"));
      for (int64_t row = 0; row < a->out; ++row) {
        const int64_t file_row = p.row0 + FileRow(p.mod, row, model.config().head_dim, GgufNeox(model.config()));
        for (int64_t i = 0; i < a->in; ++i) wv[static_cast<size_t>(file_row * a->in + i)] += delta[static_cast<size_t>(row * a->in + i)];
      }
    }
    FT_RETURN_IF_ERROR(w.AddTensorF32(t.name, t.ne, merged_type, wv));
  }
  return w.WriteFile(path);
}

}  // namespace fedtune::model

#include "model/export.h"

#include <filesystem>
#include <fstream>

#include "absl/strings/str_join.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace fedtune::model {
namespace {

using kernels::GgmlType;

// Row r of a q/k output in GGUF order sits at this HF row.
int64_t HfRow(int64_t r, int64_t head_dim) {
  const int64_t h = r / head_dim, w = r % head_dim;
  return h * head_dim + (w % 2) * (head_dim / 2) + w / 2;
}

bool IsRope(Module m) { return m == Module::kQ || m == Module::kK; }

const char* PeftPrefix(Module m) { return (m == Module::kGate || m == Module::kUp || m == Module::kDown) ? "mlp" : "self_attn"; }

std::string PeftName(int64_t layer, Module m, const char* ab) {
  return absl::StrCat("base_model.model.model.layers.", layer, ".", PeftPrefix(m), ".", PeftModuleName(m), ".lora_", ab, ".weight");
}

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
  const int64_t hd = model.config().head_dim;
  SafetensorsWriter w;
  std::vector<std::string> targets;
  nlohmann::ordered_json rank_pattern = nlohmann::ordered_json::object();  // modules whose rank is not `r`
  for (size_t l = 0; l < adapters.layers.size(); ++l) {
    for (int mi = 0; mi < kNumModules; ++mi) {
      const auto& a = adapters.layers[l][static_cast<size_t>(mi)];
      if (!a) continue;
      const Module mod = static_cast<Module>(mi);
      if (std::find(targets.begin(), targets.end(), PeftModuleName(mod)) == targets.end()) targets.push_back(PeftModuleName(mod));
      const int64_t r = a->spec.rank;
      if (r != spec.rank) rank_pattern[absl::StrCat("model.layers.", l, ".", PeftPrefix(mod), ".", PeftModuleName(mod))] = r;
      std::vector<float> b = a->b;
      if (IsRope(mod)) {
        for (int64_t row = 0; row < a->out; ++row) std::copy_n(a->b.begin() + row * r, r, b.begin() + HfRow(row, hd) * r);
      }
      FT_RETURN_IF_ERROR(w.AddF32(PeftName(static_cast<int64_t>(l), mod, "A"), {r, a->in}, a->a));
      FT_RETURN_IF_ERROR(w.AddF32(PeftName(static_cast<int64_t>(l), mod, "B"), {a->out, r}, b));
    }
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  w.SetMetadata("format", "pt");
  FT_RETURN_IF_ERROR(w.WriteFile(dir + "/adapter_model.safetensors"));
  nlohmann::ordered_json cfg = {
      {"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"base_model_name_or_path", base_model_name},
      {"r", spec.rank}, {"lora_alpha", spec.alpha}, {"use_rslora", spec.rslora}, {"target_modules", targets},
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
  AdapterSpec spec{AdapterKind::kLora, cfg["r"].get<int64_t>(), cfg["lora_alpha"].get<float>(), cfg.value("use_rslora", false), 1};
  std::vector<Module> modules;
  if (!cfg.contains("target_modules") || !cfg["target_modules"].is_array()) return absl::InvalidArgumentError("target_modules must be a list");
  for (const auto& t : cfg["target_modules"]) {
    const auto m = t.is_string() ? ParseModule(t.get<std::string>()) : std::nullopt;
    if (!m) return absl::UnimplementedError(absl::StrCat("target module ", t.dump(), " is not a llama projection"));
    modules.push_back(*m);
  }
  const auto& c = model.config();
  FT_ASSIGN_OR_RETURN(auto set, MakeAdapters<float>(model.adapter_dims(), spec, modules, 0));
  FT_ASSIGN_OR_RETURN(auto st, SafetensorsFile::Open(dir + "/adapter_model.safetensors"));
  for (size_t l = 0; l < set.layers.size(); ++l) {
    for (Module mod : modules) {
      auto& a = *set.layers[l][static_cast<size_t>(mod)];
      const int64_t r = spec.rank;
      for (const char* ab : {"A", "B"}) {
        const std::string name = PeftName(static_cast<int64_t>(l), mod, ab);
        const SafeTensor* t = st->Find(name);
        if (t == nullptr) return absl::NotFoundError(absl::StrCat(dir, ": missing tensor ", name));
        const std::vector<int64_t> want = ab[0] == 'A' ? std::vector<int64_t>{r, a.in} : std::vector<int64_t>{a.out, r};
        if (t->shape != want) return absl::InvalidArgumentError(absl::StrCat(name, " has shape ", ShapeString(t->shape), ", expected ", ShapeString(want)));
        FT_ASSIGN_OR_RETURN(Tensor v, st->ToF32(name));
        const float* p = v.data<float>();
        if (ab[0] == 'A') {
          std::copy(p, p + v.size(), a.a.begin());
        } else if (IsRope(mod)) {
          for (int64_t row = 0; row < a.out; ++row) std::copy_n(p + HfRow(row, c.head_dim) * r, r, a.b.begin() + row * r);
        } else {
          std::copy(p, p + v.size(), a.b.begin());
        }
      }
    }
  }
  return set;
}

absl::Status ExportGgufLora(const std::string& path, const LlamaModel& model, const AdapterSet<float>& adapters) {
  FT_ASSIGN_OR_RETURN(AdapterSpec spec, CommonSpec(adapters));
  GgufWriter w;
  w.SetString("general.architecture", model.config().arch);
  w.SetString("general.type", "adapter");
  w.SetString("general.name", absl::StrCat("fedtune ", AdapterKindName(spec.kind), " adapter"));
  w.SetString("adapter.type", "lora");
  // llama.cpp scales by alpha / rank(tensor): choose alpha so that equals fedtune's scale.
  // DiaBlo: alpha = 1 and, per tensor, r = min(in, out) with one factor the identity scaled
  // by r, so (1/r) B A = delta exactly.
  float alpha = spec.alpha;
  if (spec.kind == AdapterKind::kDiaBlo) {
    alpha = 1.0f;
  } else if (spec.rslora) {
    alpha = spec.alpha * std::sqrt(static_cast<float>(spec.rank));
    for (const auto& l : adapters.layers)
      for (const auto& a : l)
        if (a && a->spec.rank != spec.rank)
          return absl::UnimplementedError("GGUF-LoRA has one alpha per file: rsLoRA with per-layer ranks cannot be expressed (export PEFT instead)");
  }
  for (size_t l = 0; l < adapters.layers.size(); ++l) {
    for (int mi = 0; mi < kNumModules; ++mi) {
      const auto& a = adapters.layers[l][static_cast<size_t>(mi)];
      if (!a) continue;
      const std::string base = absl::StrCat("blk.", l, ".", GgufModuleName(static_cast<Module>(mi)), ".weight");
      if (a->spec.kind == AdapterKind::kDiaBlo) {
        const int64_t r = std::min(a->in, a->out);
        std::vector<float> delta = DenseDelta(*a), eye(static_cast<size_t>(r * r), 0.0f);
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
      } else {
        // The base file's q/k row order: llama's GGUF is adjacent pairs like fedtune's; qwen2/qwen3
        // files keep rotate_half order (llama.cpp runs them with NeoX RoPE).
        std::vector<float> b = a->b;
        const int64_t r = a->spec.rank;
        if (model.config().neox_file_layout && IsRope(static_cast<Module>(mi))) {
          for (int64_t row = 0; row < a->out; ++row) std::copy_n(a->b.begin() + row * r, r, b.begin() + HfRow(row, model.config().head_dim) * r);
        }
        FT_RETURN_IF_ERROR(w.AddTensorF32(base + ".lora_a", {a->in, r}, GgmlType::kF32, a->a));
        FT_RETURN_IF_ERROR(w.AddTensorF32(base + ".lora_b", {r, a->out}, GgmlType::kF32, b));
      }
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
  for (const auto& t : g->tensors()) {
    const ModuleAdapter<float>* a = nullptr;
    Module a_mod = Module::kQ;
    for (size_t l = 0; l < adapters.layers.size() && a == nullptr; ++l)
      for (int mi = 0; mi < kNumModules; ++mi)
        if (adapters.layers[l][static_cast<size_t>(mi)] && t.name == absl::StrCat("blk.", l, ".", GgufModuleName(static_cast<Module>(mi)), ".weight")) {
          a = &*adapters.layers[l][static_cast<size_t>(mi)];
          a_mod = static_cast<Module>(mi);
        }
    if (a == nullptr) {
      FT_RETURN_IF_ERROR(w.AddTensor(t.name, t.ne, t.type, {t.data, t.nbytes}));
      continue;
    }
    std::vector<float> wv(static_cast<size_t>(t.n_elements()));
    kernels::DequantizeRow(t.type, t.data, wv.data(), t.n_elements());
    const auto delta = DenseDelta(*a);
    if (delta.size() != wv.size()) return absl::InternalError(absl::StrCat("adapter for ", t.name, " does not match its shape"));
    const bool permuted = model.config().neox_file_layout && IsRope(a_mod);
    for (int64_t row = 0; row < a->out; ++row) {
      const int64_t file_row = permuted ? HfRow(row, model.config().head_dim) : row;
      for (int64_t i = 0; i < a->in; ++i) wv[static_cast<size_t>(file_row * a->in + i)] += delta[static_cast<size_t>(row * a->in + i)];
    }
    FT_RETURN_IF_ERROR(w.AddTensorF32(t.name, t.ne, merged_type, wv));
  }
  return w.WriteFile(path);
}

}  // namespace fedtune::model

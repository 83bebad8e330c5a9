#include "model/adapter.h"

#include <algorithm>
#include <type_traits>
#include <cctype>
#include <cmath>

#include "common/rng.h"
#include "kernels/train_ops.h"

namespace fedtune::model {

namespace {
constexpr const char* kModuleNames[] = {"q", "k", "v", "o", "gate", "up", "down"};
constexpr const char* kPeftNames[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
constexpr const char* kGgufNames[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
}  // namespace

const char* AdapterKindName(AdapterKind k) {
  switch (k) {
    case AdapterKind::kLora: return "lora";
    case AdapterKind::kFfaLora: return "ffa_lora";
    case AdapterKind::kDiaBlo: return "diablo";
  }
  return "?";
}

std::optional<AdapterKind> ParseAdapterKind(std::string_view s) {
  if (s == "lora" || s == "LORA") return AdapterKind::kLora;
  if (s == "ffa_lora" || s == "FFA_LORA" || s == "ffa-lora") return AdapterKind::kFfaLora;
  if (s == "diablo" || s == "DIABLO") return AdapterKind::kDiaBlo;
  return std::nullopt;
}

const char* ModuleName(Module m) { return kModuleNames[static_cast<int>(m)]; }
const char* PeftModuleName(Module m) { return kPeftNames[static_cast<int>(m)]; }
const char* GgufModuleName(Module m) { return kGgufNames[static_cast<int>(m)]; }

std::optional<Module> ParseModule(std::string_view s) {
  for (int i = 0; i < kNumModules; ++i) {
    if (s == kModuleNames[i] || s == kPeftNames[i] || s == kGgufNames[i]) return static_cast<Module>(i);
  }
  return std::nullopt;
}

float AdapterSpec::Scale() const {
  if (kind == AdapterKind::kDiaBlo) return 1.0f;
  return rslora ? alpha / std::sqrt(static_cast<float>(rank)) : alpha / static_cast<float>(rank);
}

template <typename T>
absl::StatusOr<ModuleAdapter<T>> ModuleAdapter<T>::Create(const AdapterSpec& spec, int64_t in, int64_t out, uint64_t seed) {
  ModuleAdapter<T> m;
  m.spec = spec;
  m.in = in;
  m.out = out;
  if (spec.kind == AdapterKind::kDiaBlo) {
    if (spec.blocks < 1 || spec.blocks > std::min(in, out)) {
      return absl::InvalidArgumentError(absl::StrCat("DiaBlo blocks ", spec.blocks, " must be in [1, ", std::min(in, out), "]"));
    }
    m.b_in = (in + spec.blocks - 1) / spec.blocks;
    m.b_out = (out + spec.blocks - 1) / spec.blocks;
    m.d.assign(static_cast<size_t>(spec.blocks * m.b_in * m.b_out), T(0));  // zero init: starts at the base model
    m.gd.assign(m.d.size(), T(0));
    return m;
  }
  if (spec.rank < 1 || spec.rank > std::min(in, out)) {
    return absl::InvalidArgumentError(absl::StrCat("LoRA rank ", spec.rank, " must be in [1, ", std::min(in, out), "]"));
  }
  // PEFT's default: A ~ Kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0.
  // FFA-LoRA: the same A from the coordinator's seed on every client, frozen.
  Rng rng(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  m.a.resize(static_cast<size_t>(spec.rank * in));
  for (auto& x : m.a) x = static_cast<T>((2.0 * rng.Uniform() - 1.0) * bound);
  m.b.assign(static_cast<size_t>(out * spec.rank), T(0));
  m.gb.assign(m.b.size(), T(0));
  if (m.trains_a()) m.ga.assign(m.a.size(), T(0));
  return m;
}

template <typename T>
void ModuleAdapter<T>::Forward(const T* x, T* y, int64_t m, std::vector<T>* z, kernels::Backend* backend) const {
  if (spec.kind == AdapterKind::kDiaBlo) {
    if constexpr (std::is_same_v<T, float>) {
      if (backend != nullptr) return backend->DiabloForward(x, d.data(), y, m, in, out, spec.blocks);
    }
    return kernels::DiabloForward<T>(x, d.data(), y, m, in, out, spec.blocks);
  }
  const int64_t r = spec.rank;
  z->resize(static_cast<size_t>(m * r));
  if constexpr (std::is_same_v<T, float>) {
    if (backend != nullptr) return backend->LoraForward(x, a.data(), b.data(), z->data(), y, m, in, r, out, static_cast<float>(spec.Scale()));
  }
  kernels::LoraForward<T>(x, a.data(), b.data(), z->data(), y, m, in, r, out, static_cast<T>(spec.Scale()));
}

template <typename T>
void ModuleAdapter<T>::Backward(const T* x, const std::vector<T>& z, const T* dy, T* dx, int64_t m, kernels::Backend* backend) {
  if (spec.kind == AdapterKind::kDiaBlo) {
    T* dd = gd.empty() ? nullptr : gd.data();
    if constexpr (std::is_same_v<T, float>) {
      if (backend != nullptr) return backend->DiabloBackward(x, d.data(), dy, dd, dx, m, in, out, spec.blocks);
    }
    return kernels::DiabloBackward<T>(x, d.data(), dy, dd, dx, m, in, out, spec.blocks);
  }
  T* da = ga.empty() ? nullptr : ga.data();
  T* db = gb.empty() ? nullptr : gb.data();
  if constexpr (std::is_same_v<T, float>) {
    if (backend != nullptr) {
      return backend->LoraBackward(x, a.data(), b.data(), z.data(), dy, da, db, dx, m, in, spec.rank, out, static_cast<float>(spec.Scale()));
    }
  }
  kernels::LoraBackward<T>(x, a.data(), b.data(), z.data(), dy, da, db, dx, m, in, spec.rank, out, static_cast<T>(spec.Scale()));
}

template <typename T>
void ModuleAdapter<T>::ZeroGrad() {
  std::fill(ga.begin(), ga.end(), T(0));
  std::fill(gb.begin(), gb.end(), T(0));
  std::fill(gd.begin(), gd.end(), T(0));
}

template <typename T>
int64_t ModuleAdapter<T>::NumTrainable() const {
  return static_cast<int64_t>(ga.size() + gb.size() + (gd.empty() ? 0 : TrainedDiabloValues()));
}

template <typename T>
size_t ModuleAdapter<T>::TrainedDiabloValues() const {
  if (trained_blocks <= 0 || trained_blocks >= spec.blocks) return d.size();
  return static_cast<size_t>(trained_blocks * b_in * b_out);
}

template <typename T>
size_t ModuleAdapter<T>::TrainedDiabloOffset() const {
  if (trained_blocks <= 0 || trained_blocks >= spec.blocks) return 0;
  return static_cast<size_t>(trained_first * b_in * b_out);
}

template <typename T>
void ModuleAdapter<T>::SetTrainable(bool trainable) {
  if (!trainable) {
    ga = {};
    gb = {};
    gd = {};
    return;
  }
  if (spec.kind == AdapterKind::kDiaBlo) {
    gd.assign(d.size(), T(0));
  } else {
    gb.assign(b.size(), T(0));
    if (trains_a()) ga.assign(a.size(), T(0));
  }
}

template <typename T>
void AdapterSet<T>::SetTrainableModules(const std::vector<Module>& modules) {
  for (auto& l : layers)
    for (size_t m = 0; m < l.size(); ++m)
      if (l[m]) l[m]->SetTrainable(std::find(modules.begin(), modules.end(), static_cast<Module>(m)) != modules.end());
}

template <typename T>
absl::Status AdapterSet<T>::TrainBlocks(int64_t first, int64_t blocks) {
  for (auto& l : layers)
    for (auto& m : l) {
      if (!m) continue;
      if (m->spec.kind != AdapterKind::kDiaBlo) return absl::InvalidArgumentError("trained blocks are a DiaBlo setting (this adapter is LoRA)");
      if (blocks < 0 || blocks > m->spec.blocks || first < 0 || (blocks > 0 && first + blocks > m->spec.blocks))
        return absl::InvalidArgumentError(absl::StrCat("trained blocks ", first, "..", first + blocks - 1, " outside [0, ", m->spec.blocks, ")"));
    }
  for (auto& l : layers)
    for (auto& m : l)
      if (m) {
        const bool all = blocks == 0 || blocks == m->spec.blocks;
        m->trained_blocks = all ? 0 : blocks;
        m->trained_first = all ? 0 : first;
      }
  return absl::OkStatus();
}

template <typename T>
void AdapterSet<T>::ZeroGrad() {
  for (auto& l : layers)
    for (auto& m : l)
      if (m) m->ZeroGrad();
}

template <typename T>
int64_t AdapterSet<T>::GradientValues() const {
  int64_t n = 0;
  for (const auto& l : layers)
    for (const auto& m : l)
      if (m) n += static_cast<int64_t>(m->ga.size() + m->gb.size() + m->gd.size());
  return n;
}

template <typename T>
int64_t AdapterSet<T>::NumTrainable() const {
  int64_t n = 0;
  for (const auto& l : layers)
    for (const auto& m : l)
      if (m) n += m->NumTrainable();
  return n;
}

template <typename T>
absl::StatusOr<AdapterSet<T>> MakeAdapters(const ModelDims& dims, const AdapterSpec& spec, const std::vector<Module>& modules,
                                           uint64_t seed) {
  return MakeAdaptersWithLayout<T>(dims, spec, modules, "", seed);
}

absl::StatusOr<std::vector<std::optional<LayerSetting>>> ParseLayerLayout(std::string_view layout, int64_t n_layer,
                                                                          const std::vector<Module>& default_modules) {
  std::vector<std::optional<LayerSetting>> out(static_cast<size_t>(n_layer));
  if (layout.empty()) {
    for (auto& o : out) o = LayerSetting{default_modules, 0};
    return out;
  }
  size_t start = 0;
  while (start <= layout.size()) {
    const size_t semi = layout.find(';', start);
    const std::string_view entry = layout.substr(start, semi == std::string_view::npos ? std::string_view::npos : semi - start);
    auto bad = [&](const std::string& why) {
      return absl::InvalidArgumentError(absl::StrCat("layer layout entry '", std::string(entry), "': ", why));
    };
    std::vector<std::string_view> parts;
    for (size_t p = 0; p <= entry.size();) {
      const size_t colon = entry.find(':', p);
      parts.push_back(entry.substr(p, colon == std::string_view::npos ? std::string_view::npos : colon - p));
      if (colon == std::string_view::npos) break;
      p = colon + 1;
    }
    if (parts.empty() || parts[0].empty()) return bad("expected LAYERS[:MODULES][:rRANK]");
    LayerSetting setting{default_modules, 0};
    for (size_t i = 1; i < parts.size(); ++i) {
      if (!parts[i].empty() && parts[i][0] == 'r' && parts[i].size() > 1 && std::isdigit(static_cast<unsigned char>(parts[i][1]))) {
        int64_t r = 0;
        for (char ch : parts[i].substr(1)) {
          if (!std::isdigit(static_cast<unsigned char>(ch))) return bad("rank must be rNUMBER");
          r = r * 10 + (ch - '0');
          if (r > 65536) return bad("rank too large");
        }
        if (r < 1) return bad("rank must be >= 1");
        setting.rank = r;
      } else {
        auto m = ParseModules(parts[i]);
        if (!m.ok()) return bad(std::string(m.status().message()));
        setting.modules = *m;
      }
    }
    std::vector<bool> chosen(static_cast<size_t>(n_layer), false);
    if (parts[0] == "*") {
      std::fill(chosen.begin(), chosen.end(), true);
    } else {
      for (size_t p = 0; p <= parts[0].size();) {
        const size_t comma = parts[0].find(',', p);
        const std::string_view item = parts[0].substr(p, comma == std::string_view::npos ? std::string_view::npos : comma - p);
        const size_t dash = item.find('-');
        auto num = [&](std::string_view t, int64_t* v) {
          if (t.empty()) return false;
          *v = 0;
          for (char ch : t) {
            if (!std::isdigit(static_cast<unsigned char>(ch))) return false;
            *v = *v * 10 + (ch - '0');
            if (*v > 1000000) return false;
          }
          return true;
        };
        int64_t a = 0, b = 0;
        if (!num(dash == std::string_view::npos ? item : item.substr(0, dash), &a) || (dash != std::string_view::npos && !num(item.substr(dash + 1), &b)))
          return bad(absl::StrCat("'", std::string(item), "' is not a layer or a range A-B"));
        if (dash == std::string_view::npos) b = a;
        if (a > b || b >= n_layer) return bad(absl::StrCat("layers ", a, "-", b, " outside 0-", n_layer - 1));
        for (int64_t l = a; l <= b; ++l) chosen[static_cast<size_t>(l)] = true;
        if (comma == std::string_view::npos) break;
        p = comma + 1;
      }
    }
    for (int64_t l = 0; l < n_layer; ++l)
      if (chosen[static_cast<size_t>(l)]) out[static_cast<size_t>(l)] = setting;
    if (semi == std::string_view::npos) break;
    start = semi + 1;
  }
  return out;
}

template <typename T>
absl::StatusOr<AdapterSet<T>> MakeAdaptersWithLayout(const ModelDims& dims, const AdapterSpec& spec, const std::vector<Module>& modules,
                                                     std::string_view layout, uint64_t seed) {
  FT_ASSIGN_OR_RETURN(auto per_layer, ParseLayerLayout(layout, dims.n_layer, modules));
  AdapterSet<T> set;
  set.layers.resize(static_cast<size_t>(dims.n_layer));
  for (int64_t l = 0; l < dims.n_layer; ++l) {
    const auto& setting = per_layer[static_cast<size_t>(l)];
    if (!setting) continue;
    AdapterSpec layer_spec = spec;
    if (setting->rank > 0) layer_spec.rank = setting->rank;
    for (Module mod : setting->modules) {
      int64_t in = dims.n_embd, out = dims.n_embd;
      const int64_t n_q = dims.n_q > 0 ? dims.n_q : dims.n_embd;
      switch (mod) {
        case Module::kQ: out = n_q; break;
        case Module::kO: in = n_q; break;
        case Module::kK: case Module::kV: out = dims.n_kv; break;
        case Module::kGate: case Module::kUp: out = dims.n_ff; break;
        case Module::kDown: in = dims.n_ff; break;
        default: break;
      }
      // One seed per (layer, module) derived from the run seed: splitmix-style mixing.
      const uint64_t s = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(l) * 131 + static_cast<uint64_t>(mod) + 1;
      auto a = ModuleAdapter<T>::Create(layer_spec, in, out, s);
      if (!a.ok()) return absl::Status(a.status().code(), absl::StrCat("layer ", l, " ", ModuleName(mod), ": ", a.status().message()));
      set.layers[static_cast<size_t>(l)][static_cast<size_t>(mod)] = std::move(*a);
    }
  }
  return set;
}

absl::StatusOr<std::vector<Module>> ParseModules(std::string_view list) {
  if (list == "all") return kAllModules;
  if (list == "attn") return std::vector<Module>{Module::kQ, Module::kK, Module::kV, Module::kO};
  if (list == "mlp") return std::vector<Module>{Module::kGate, Module::kUp, Module::kDown};
  std::vector<Module> out;
  size_t start = 0;
  while (start <= list.size()) {
    const size_t comma = list.find(',', start);
    const std::string_view item = list.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start);
    const auto m = ParseModule(item);
    if (!m) return absl::InvalidArgumentError(absl::StrCat("unknown module '", std::string(item), "' (q, k, v, o, gate, up, down, all, attn, mlp)"));
    if (std::find(out.begin(), out.end(), *m) == out.end()) out.push_back(*m);
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return out;
}

template absl::StatusOr<AdapterSet<float>> MakeAdapters<float>(const ModelDims&, const AdapterSpec&, const std::vector<Module>&, uint64_t);
template absl::StatusOr<AdapterSet<float>> MakeAdaptersWithLayout<float>(const ModelDims&, const AdapterSpec&, const std::vector<Module>&,
                                                                       std::string_view, uint64_t);
template absl::StatusOr<AdapterSet<double>> MakeAdaptersWithLayout<double>(const ModelDims&, const AdapterSpec&, const std::vector<Module>&,
                                                                         std::string_view, uint64_t);
template absl::StatusOr<AdapterSet<double>> MakeAdapters<double>(const ModelDims&, const AdapterSpec&, const std::vector<Module>&, uint64_t);

template struct ModuleAdapter<float>;
template struct ModuleAdapter<double>;
template struct AdapterSet<float>;
template struct AdapterSet<double>;

}  // namespace fedtune::model

// Trainable adapters on the frozen base: LoRA, FFA-LoRA and DiaBlo, per module and layer.
// Formulas and initialisation: ALGORITHMS.md (Adapters). Orientation follows PyTorch/PEFT:
// a base weight is out x in, LoRA A is r x in, B is out x r; DiaBlo blocks are [N, b_in, b_out].
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "kernels/backend.h"

namespace fedtune::model {

enum class AdapterKind { kLora, kFfaLora, kDiaBlo };
enum class Module { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
constexpr int kNumModules = 7;
inline const std::vector<Module> kAllModules = {Module::kQ, Module::kK, Module::kV, Module::kO, Module::kGate, Module::kUp, Module::kDown};

const char* AdapterKindName(AdapterKind k);
std::optional<AdapterKind> ParseAdapterKind(std::string_view s);  // lora, ffa_lora, diablo
const char* ModuleName(Module m);                                  // q, k, v, o, gate, up, down
std::optional<Module> ParseModule(std::string_view s);             // also q_proj, gate_proj, ...
const char* PeftModuleName(Module m);                              // q_proj, ..., down_proj
const char* GgufModuleName(Module m);                              // attn_q, ..., ffn_down

struct AdapterSpec {
  AdapterKind kind = AdapterKind::kLora;
  int64_t rank = 8;      // LoRA / FFA-LoRA
  float alpha = 16.0f;   // scale alpha/r (rsLoRA: alpha/sqrt(r))
  bool rslora = false;
  int64_t blocks = 16;   // DiaBlo N
  float Scale() const;
  // What a worker's share of the adapter is out of (issue 22): the LoRA rank (a rank-r worker
  // trains the first r components), or DiaBlo's block count (it trains a window of k blocks).
  int64_t FullShare() const { return kind == AdapterKind::kDiaBlo ? blocks : rank; }
};

// One adapted linear map (in -> out) with its parameters and gradients, in T (float for
// training, double for gradient checks).
template <typename T>
struct ModuleAdapter {
  AdapterSpec spec;
  int64_t in = 0, out = 0, b_in = 0, b_out = 0;
  std::vector<T> a, b, d;     // LoRA A [r, in], B [out, r]; DiaBlo D [N, b_in, b_out]
  std::vector<T> ga, gb, gd;  // gradients (accumulated)
  // DiaBlo trained on `trained_blocks` consecutive blocks from `trained_first` only (a worker's
  // share of the shared adapter, issue 22; 0: all N). The other blocks act in forward and
  // backward with their values but are not trainable: ForEachTrainable hands out those
  // trained_blocks x b_in x b_out values of d and gd, so optimizer state, DP-SGD noise and the
  // update cover those only.
  int64_t trained_blocks = 0, trained_first = 0;

  static absl::StatusOr<ModuleAdapter> Create(const AdapterSpec& spec, int64_t in, int64_t out, uint64_t seed);
  bool trains_a() const { return spec.kind == AdapterKind::kLora; }
  // y[m, out] += adapter(x[m, in]); z (LoRA only, m x r) receives A x for backward. With a
  // kernel backend (float only) the products run there, else on the reference kernels.
  void Forward(const T* x, T* y, int64_t m, std::vector<T>* z, kernels::Backend* backend = nullptr) const;
  // Accumulates parameter gradients and dx[m, in] += d/dx (z from Forward).
  void Backward(const T* x, const std::vector<T>& z, const T* dy, T* dx, int64_t m, kernels::Backend* backend = nullptr);
  void ZeroGrad();
  int64_t NumTrainable() const;
  // Values of d (and gd) that train: all, or trained_blocks blocks from the one at this offset.
  size_t TrainedDiabloValues() const;
  size_t TrainedDiabloOffset() const;
  // A frozen adapter still acts in forward and passes gradients to its input, but has no
  // parameter gradients (not trained, not enumerated by ForEachTrainable).
  void SetTrainable(bool trainable);
};

// Adapters for a whole model: adapters[layer][module] (absent = not adapted).
template <typename T>
struct AdapterSet {
  std::vector<std::array<std::optional<ModuleAdapter<T>>, kNumModules>> layers;
  void ZeroGrad();
  int64_t NumTrainable() const;
  // Values of every gradient buffer (ga, gb, gd of each module; a DiaBlo module's untrained blocks
  // too): one gradient's size as the trainer lays it out.
  int64_t GradientValues() const;
  // Trains the adapters on `modules` only (every layer); the others stay in the model, frozen.
  // Per-worker plans use this: a worker trains part of the shared adapter on top of all of it.
  void SetTrainableModules(const std::vector<Module>& modules);
  // DiaBlo: every adapted module trains `blocks` diagonal blocks from block `first` only (blocks
  // 0 or N: all). InvalidArgument outside [0, N] (first + blocks <= N) or for LoRA adapters.
  absl::Status TrainBlocks(int64_t first, int64_t blocks);
  // Calls fn(name, params, grads) (std::span<T>) for every trainable tensor, in a fixed order.
  // Names follow the GGUF base tensor they adapt: "blk.3.attn_q.lora_b", "blk.0.ffn_down.diablo".
  // A DiaBlo module trained on some of its blocks (TrainBlocks) hands out those values only.
  template <typename F>
  void ForEachTrainable(F&& fn) {
    ForEachTrainableAt([&](const std::string& name, std::span<T> p, std::span<T> g, size_t) { fn(name, p, g); });
  }
  // The same with the position of the spans in the whole tensor (non-zero for a DiaBlo module
  // trained on blocks after its first), for code that pairs them with whole tensors.
  template <typename F>
  void ForEachTrainableAt(F&& fn) {
    for (size_t l = 0; l < layers.size(); ++l) {
      for (int mod = 0; mod < kNumModules; ++mod) {
        auto& a = layers[l][static_cast<size_t>(mod)];
        if (!a) continue;
        const std::string base = "blk." + std::to_string(l) + "." + GgufModuleName(static_cast<Module>(mod)) + ".";
        if (!a->ga.empty()) fn(base + "lora_a", std::span<T>(a->a), std::span<T>(a->ga), size_t{0});
        if (!a->gb.empty()) fn(base + "lora_b", std::span<T>(a->b), std::span<T>(a->gb), size_t{0});
        if (!a->gd.empty()) {
          const size_t n = a->TrainedDiabloValues(), at = a->TrainedDiabloOffset();
          fn(base + "diablo", std::span<T>(a->d).subspan(at, n), std::span<T>(a->gd).subspan(at, n), at);
        }
      }
    }
  }
};

struct AdapterPlan;
// Builds adapters for every layer of a model on the given modules (FFA-LoRA's frozen A comes
// from `seed`, identical for everyone who uses the same seed).
struct ModelDims {
  int64_t n_layer, n_embd, n_kv, n_ff;
  int64_t n_q = 0;  // q output and o input width (heads x head size; 0: n_embd)
};
template <typename T>
absl::StatusOr<AdapterSet<T>> MakeAdapters(const ModelDims& dims, const AdapterSpec& spec, const std::vector<Module>& modules,
                                           uint64_t seed);
// Parses "q,k,v,o,gate,up,down" or "all" / "attn" / "mlp".
absl::StatusOr<std::vector<Module>> ParseModules(std::string_view list);

// Per-layer settings: entries "LAYERS[:MODULES][:rRANK]" separated by ';', e.g.
// "0-14:q,v:r4;15-29:all:r16" or "20-29" (only the top ten layers, default modules and rank).
// LAYERS is "*" or a comma list of indices and ranges. Later entries override earlier ones for
// the layers they name; layers no entry names get no adapters. Errors name the entry.
struct LayerSetting {
  std::vector<Module> modules;
  int64_t rank = 0;  // 0: the spec's
};
absl::StatusOr<std::vector<std::optional<LayerSetting>>> ParseLayerLayout(std::string_view layout, int64_t n_layer,
                                                                          const std::vector<Module>& default_modules);
// MakeAdapters with per-layer settings (an empty layout: every layer, `modules`, the spec's rank).
// Same seeds per (layer, module) as MakeAdapters, so FFA-LoRA's frozen A agrees.
template <typename T>
absl::StatusOr<AdapterSet<T>> MakeAdaptersWithLayout(const ModelDims& dims, const AdapterSpec& spec, const std::vector<Module>& modules,
                                                     std::string_view layout, uint64_t seed);

}  // namespace fedtune::model

#include "model/adapter_io.h"

#include <algorithm>

#include <set>

#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "model/safetensors.h"

namespace fedtune::model {

absl::Status SaveAdapters(const std::string& path, AdapterSet<float>& adapters) {
  SafetensorsWriter w;
  std::optional<AdapterSpec> spec;
  std::vector<std::string> modules;
  std::vector<std::string> layout;  // explicit per-layer layout (ParseLayerLayout syntax)
  for (size_t l = 0; l < adapters.layers.size(); ++l) {
    std::vector<std::string> layer_modules;
    int64_t layer_rank = 0;
    for (int mod = 0; mod < kNumModules; ++mod) {
      auto& a = adapters.layers[l][static_cast<size_t>(mod)];
      if (!a) continue;
      if (!spec) spec = a->spec;
      layer_modules.push_back(ModuleName(static_cast<Module>(mod)));
      layer_rank = a->spec.rank;
      if (std::find(modules.begin(), modules.end(), ModuleName(static_cast<Module>(mod))) == modules.end())
        modules.push_back(ModuleName(static_cast<Module>(mod)));
      const std::string base = "blk." + std::to_string(l) + "." + GgufModuleName(static_cast<Module>(mod)) + ".";
      if (a->spec.kind == AdapterKind::kDiaBlo) {
        FT_RETURN_IF_ERROR(w.AddF32(base + "diablo", {a->spec.blocks, a->b_in, a->b_out}, a->d));
      } else {
        FT_RETURN_IF_ERROR(w.AddF32(base + "lora_a", {a->spec.rank, a->in}, a->a));
        FT_RETURN_IF_ERROR(w.AddF32(base + "lora_b", {a->out, a->spec.rank}, a->b));
      }
    }
    if (!layer_modules.empty()) layout.push_back(absl::StrCat(l, ":", absl::StrJoin(layer_modules, ","), ":r", layer_rank));
  }
  if (!spec) return absl::InvalidArgumentError("no adapters to save");
  w.SetMetadata("fedtune.layout", absl::StrJoin(layout, ";"));
  w.SetMetadata("fedtune.adapter", AdapterKindName(spec->kind));
  w.SetMetadata("fedtune.rank", std::to_string(spec->rank));
  w.SetMetadata("fedtune.alpha", std::to_string(spec->alpha));
  w.SetMetadata("fedtune.rslora", spec->rslora ? "true" : "false");
  w.SetMetadata("fedtune.blocks", std::to_string(spec->blocks));
  w.SetMetadata("fedtune.modules", absl::StrJoin(modules, ","));
  w.SetMetadata("fedtune.n_layer", std::to_string(adapters.layers.size()));
  return w.WriteFile(path);
}

absl::StatusOr<AdapterSet<float>> LoadAdapters(const std::string& path, const ModelDims& dims) {
  FT_ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(path));
  const auto& md = f->metadata();
  auto get = [&](const char* k) -> absl::StatusOr<std::string> {
    auto it = md.find(k);
    if (it == md.end()) return absl::DataLossError(absl::StrCat(path, ": metadata '", k, "' missing (not a fedtune adapter file?)"));
    return it->second;
  };
  AdapterSpec spec;
  FT_ASSIGN_OR_RETURN(std::string kind, get("fedtune.adapter"));
  const auto k = ParseAdapterKind(kind);
  if (!k) return absl::DataLossError(absl::StrCat(path, ": unknown adapter kind '", kind, "'"));
  spec.kind = *k;
  FT_ASSIGN_OR_RETURN(std::string rank, get("fedtune.rank"));
  FT_ASSIGN_OR_RETURN(std::string alpha, get("fedtune.alpha"));
  FT_ASSIGN_OR_RETURN(std::string blocks, get("fedtune.blocks"));
  FT_ASSIGN_OR_RETURN(std::string mods, get("fedtune.modules"));
  FT_ASSIGN_OR_RETURN(std::string rslora, get("fedtune.rslora"));
  if (!absl::SimpleAtoi(rank, &spec.rank) || !absl::SimpleAtof(alpha, &spec.alpha) || !absl::SimpleAtoi(blocks, &spec.blocks)) {
    return absl::DataLossError(absl::StrCat(path, ": bad adapter metadata"));
  }
  spec.rslora = rslora == "true";
  FT_ASSIGN_OR_RETURN(auto modules, ParseModules(mods));
  const auto layout = md.find("fedtune.layout");  // files before per-layer settings have none
  FT_ASSIGN_OR_RETURN(auto set, MakeAdaptersWithLayout<float>(dims, spec, modules, layout == md.end() ? "" : layout->second, 0));
  for (size_t l = 0; l < set.layers.size(); ++l) {
    for (Module mod : kAllModules) {
      if (!set.layers[l][static_cast<size_t>(mod)]) continue;
      auto& a = *set.layers[l][static_cast<size_t>(mod)];
      const std::string base = "blk." + std::to_string(l) + "." + GgufModuleName(mod) + ".";
      auto load = [&](const std::string& name, std::vector<float>& dst) -> absl::Status {
        FT_ASSIGN_OR_RETURN(Tensor t, f->ToF32(name));
        if (static_cast<size_t>(t.size()) != dst.size()) {
          return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' has ", t.size(), " values, the model needs ", dst.size()));
        }
        std::copy(t.data<float>(), t.data<float>() + t.size(), dst.begin());
        return absl::OkStatus();
      };
      if (spec.kind == AdapterKind::kDiaBlo) {
        FT_RETURN_IF_ERROR(load(base + "diablo", a.d));
      } else {
        FT_RETURN_IF_ERROR(load(base + "lora_a", a.a));
        FT_RETURN_IF_ERROR(load(base + "lora_b", a.b));
      }
    }
  }
  return set;
}

}  // namespace fedtune::model

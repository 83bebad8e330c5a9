#include "worker/local_trainer.h"

#include "absl/strings/str_cat.h"
#include "privacy/noise.h"

namespace fedtune::worker {

absl::StatusOr<LocalResult> TrainLocal(const model::LlamaModel& model, const std::vector<model::Example>& data,
                                       const aggregation::TensorMap& global, const std::map<std::string, double>& config,
                                       const std::string& client, const LocalTrainOptions& o, model::AdapterSet<float>* adapters) {
  adapters->SetTrainableModules(model::kAllModules);
  FT_RETURN_IF_ERROR(SetAdapterTensors(global, adapters));
  // Leave the set whole for its next user, also when training (or setting it up) fails.
  struct Restore {
    model::AdapterSet<float>* a;
    bool modules, blocks;
    ~Restore() {
      if (modules) a->SetTrainableModules(model::kAllModules);
      if (blocks) (void)a->TrainBlocks(0, 0);
    }
  } restore{adapters, !o.train_modules.empty(), o.train_blocks > 0};
  if (!o.train_modules.empty()) adapters->SetTrainableModules(o.train_modules);
  if (o.train_blocks > 0) FT_RETURN_IF_ERROR(adapters->TrainBlocks(o.train_first_block, o.train_blocks));
  model::FinetuneOptions ft = o.finetune;
  if (auto it = config.find("proximal_mu"); it != config.end()) {
    ft.proximal_mu = it->second;
    ft.proximal_center = &global;
  }
  std::unique_ptr<privacy::NoiseSource> noise;
  if (ft.dp_clip > 0) {
    FT_ASSIGN_OR_RETURN(noise, privacy::NoiseSource::Create());
    ft.dp_normal = [&noise] { return noise->Normal(); };
    ft.dp_uniform = [&noise] { return noise->Uniform(); };
  }
  model::AdamW opt(o.optimizer);  // local optimizer state starts fresh every round
  LocalResult r;
  FT_ASSIGN_OR_RETURN(r.report, model::Finetune(model, data, ft, adapters, &opt, o.on_step));
  r.update.client = client;
  r.update.num_examples = static_cast<int64_t>(data.size());
  adapters->ForEachTrainableAt([&](const std::string& name, std::span<float> p, std::span<float>, size_t at) {
    auto git = global.find(name);
    if (git == global.end()) return;  // not part of this round's global tensors
    const std::vector<float>& g = git->second;
    std::vector<float>& d = r.update.delta[name];
    d.resize(p.size());
    for (size_t i = 0; i < p.size(); ++i) d[i] = p[i] - g[at + i];
    if (o.send_fisher) {
      if (auto f = opt.fisher().find(name); f != opt.fisher().end()) r.update.fisher[name] = f->second;
    }
  });
  r.update.metrics["train_loss"] = r.report.final_loss;
  r.update.metrics["train_seconds"] = r.report.seconds;
  r.update.metrics["train_tokens"] = static_cast<double>(r.report.tokens);
  return r;
}

LocalResult StandInUpdate(const aggregation::TensorMap& global, const std::string& client, int64_t num_examples, bool fisher, uint64_t seed) {
  LocalResult r;
  r.update.client = client;
  r.update.num_examples = num_examples;
  uint64_t state = seed;
  for (const auto& [name, g] : global) {
    std::vector<float>& d = r.update.delta[name];
    d.resize(g.size());
    for (float& x : d) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;  // cheap LCG
      x = static_cast<float>(static_cast<int32_t>(state >> 32)) * 1e-12f;
    }
    if (fisher) r.update.fisher[name].assign(g.size(), 1e-4f);
  }
  r.update.metrics["train_loss"] = 0;
  r.update.metrics["train_seconds"] = 0;
  return r;
}

}  // namespace fedtune::worker

#include "sim/planning.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "model/finetune.h"
#include "model/optimizer.h"
#include "worker/client.h"

namespace fedtune::sim {

absl::StatusOr<Calibration> Calibrate(const model::LlamaModel& model, kernels::Backend* backend, const std::vector<model::Example>& data,
                                      const model::AdapterSpec& spec,
                                      const std::vector<model::Module>& modules, int batch, int steps, uint64_t seed,
                                      const std::vector<kernels::GgmlType>& base_types, const std::string& model_path) {
  if (data.empty()) return absl::FailedPreconditionError("planner calibration: no training examples");
  FT_ASSIGN_OR_RETURN(model::AdapterSet<float> probe, model::MakeAdapters<float>(model.adapter_dims(), spec, modules, seed));
  model::FinetuneOptions ft;
  ft.steps = std::max(1, steps);
  ft.batch = std::max(1, batch);
  ft.log_every = 0;
  ft.seed = seed;
  ft.backend = backend;
  model::OptimizerConfig oc;
  oc.total_steps = ft.steps;
  model::AdamW opt(oc);
  FT_ASSIGN_OR_RETURN(model::TrainReport rep, model::Finetune(model, data, ft, &probe, &opt));
  Calibration cal;
  cal.bf16_kernels = kernels::IsCpuBf16(backend);
  cal.seconds = rep.seconds;
  cal.tokens_per_second = rep.seconds > 0 ? static_cast<double>(rep.tokens) / rep.seconds : 0;
  cal.tokens_per_example = static_cast<double>(rep.tokens) / (static_cast<double>(ft.steps) * ft.batch);
  {  // The same steps keeping activations (within fedtune train's default budget), on a copy.
    FT_ASSIGN_OR_RETURN(model::AdapterSet<float> copy, model::MakeAdapters<float>(model.adapter_dims(), spec, modules, seed));
    model::AdamW opt2(oc);
    model::FinetuneOptions kept = ft;
    kept.activation_budget_mib = static_cast<int>(planner::MemoryModel::kDefaultKeptMiB);
    FT_ASSIGN_OR_RETURN(model::TrainReport rk, model::Finetune(model, data, kept, &copy, &opt2));
    cal.seconds += rk.seconds;
    if (rk.seconds > 0 && cal.tokens_per_second > 0)
      cal.keep_speedup = std::clamp(static_cast<double>(rk.tokens) / rk.seconds / cal.tokens_per_second, 1.0, 4.0);
  }
  if (!base_types.empty()) {
    worker::SpeedProbe sp;
    sp.spec = spec;
    sp.modules = modules;
    sp.batch = ft.batch;
    sp.steps = ft.steps;
    sp.seed = seed;
    sp.backend = backend;
    const auto t0 = std::chrono::steady_clock::now();
    FT_ASSIGN_OR_RETURN(auto tps, worker::MeasureBaseSpeeds(model, model_path, base_types, data, sp));
    cal.base_speed = planner::RelativeBaseSpeeds(tps, model.layer(0).wq.type);
    cal.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  // Mean Fisher per value, per module kind (all layers): a module's gradient signal per parameter.
  std::map<model::Module, std::pair<double, double>> acc;  // sum, count
  for (const auto& [name, f] : opt.fisher()) {
    for (model::Module m : modules) {
      if (name.find(std::string(".") + model::GgufModuleName(m) + ".") == std::string::npos) continue;
      for (float v : f) acc[m].first += v;
      acc[m].second += static_cast<double>(f.size());
    }
  }
  std::map<model::Module, double> raw;
  for (model::Module m : modules) raw[m] = acc[m].second > 0 ? acc[m].first / acc[m].second : 0.0;
  cal.importance = planner::NormaliseImportance(raw);
  return cal;
}

int LongestExample(const std::vector<std::vector<model::Example>>& per_client) {
  size_t n = 1;
  for (const auto& v : per_client)
    for (const auto& e : v) n = std::max(n, e.tokens.size());
  return static_cast<int>(n);
}

std::vector<planner::WorkerProfile> ProfilesForPlan(const std::vector<ClientForPlan>& clients, const Calibration& cal) {
  std::vector<planner::WorkerProfile> w;
  for (const auto& c : clients)
    w.push_back({c.name, c.memory_mib > 0 ? c.memory_mib : 1e12, cal.tokens_per_second * c.speed, c.bandwidth_mbps, c.latency_ms, cal.keep_speedup,
                 cal.bf16_kernels, cal.base_speed, c.examples});
  return w;
}

}  // namespace fedtune::sim

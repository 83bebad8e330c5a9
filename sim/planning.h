// The planner in the simulation (issue 8): a calibration pass measures module importance (diagonal
// Fisher of a probe adapter) and this machine's training speed, then planner::MakePlan gives every
// virtual client its modules, batch, local steps and base precision from its profile (speed,
// link, memory_mib).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "model/adapter.h"
#include "model/dataset.h"
#include "model/llama.h"
#include "planner/planner.h"
#include "proto/config.pb.h"

namespace fedtune::sim {

struct ClientForPlan {
  std::string name;
  double speed = 1, bandwidth_mbps = 100, latency_ms = 20, memory_mib = 0;
  double examples = 0;  // training examples (local DP-SGD's sampling rate)
};

struct Calibration {
  std::map<model::Module, double> importance;  // normalised, sums to 1
  double tokens_per_second = 0;                // this machine, the uniform batch, recomputing
  double keep_speedup = 1;                     // keeping activations instead (measured likewise)
  bool bf16_kernels = false;                   // the kernels are cpu-bf16 (memory model)
  double tokens_per_example = 0;               // mean, as trained (padding included)
  double seconds = 0;
  // Speed on each planner base type relative to the stored one (worker::MeasureBaseSpeeds with
  // the probe adapter, the uniform batch and the calibration's steps); types absent: not measured.
  std::map<kernels::GgmlType, double> base_speed;
};

// Trains a probe adapter (the run's adapter kind on all its modules) for `steps` steps on `data`
// and reads the per-module mean Fisher; then as many steps keeping activations on a copy, for the
// speedup; then the speed on each of `base_types` (re-quantized from `model_path`) against the
// stored type's. Deterministic in `seed` (but for the timings).
absl::StatusOr<Calibration> Calibrate(const model::LlamaModel& model, kernels::Backend* backend, const std::vector<model::Example>& data,
                                      const model::AdapterSpec& spec,
                                      const std::vector<model::Module>& modules, int batch, int steps, uint64_t seed,
                                      const std::vector<kernels::GgmlType>& base_types = {}, const std::string& model_path = "");

// Longest example in tokens (what the memory model needs for the activations).
int LongestExample(const std::vector<std::vector<model::Example>>& per_client);

std::vector<planner::WorkerProfile> ProfilesForPlan(const std::vector<ClientForPlan>& clients, const Calibration& cal);

}  // namespace fedtune::sim

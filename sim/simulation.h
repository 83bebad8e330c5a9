// `fedtune simulate CONFIG`: N virtual workers in one process sharing one read-only copy of the
// base model, driven round by round through the same strategy (aggregation/) and client
// (worker/local_trainer.h) code as a deployment; only the transport (function calls) and the
// clock (simulated from profiles: speed factor, bandwidth, latency, dropout) differ.
//
// Clients train one after another, each with every core (the kernels are multithreaded), which
// bounds concurrency by the cores and keeps one copy of activations in memory. Per-client state
// between rounds is only its data: clients start every round from the global adapter.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "aggregation/fed_strategy.h"
#include "common/status.h"
#include "model/adapter.h"
#include "proto/config.pb.h"

namespace fedtune::sim {

struct RoundRecord {
  int round = 0;
  bool evaluated = false;
  std::map<std::string, double> metrics;  // see README "Simulation outputs"
};

struct SimulationResult {
  std::string run_dir;
  std::vector<RoundRecord> rounds;
  double accuracy_before = 0, accuracy_after = 0;
  double centralized_accuracy = -1;  // -1: no baseline run
  double wall_seconds = 0;
  double peak_rss_mib = 0;
  bool stopped_early = false;  // the privacy budget refused a round
};

struct SimOptions {
  bool progress = true;           // progress lines on stderr
  std::string config_text;        // copied into the run directory
  std::string default_run_name = "run";
};

// Checks everything that can be checked before loading the model: counts, names, files, privacy
// settings. InvalidArgument naming the key (e.g. "strategy.merge").
absl::Status ValidateConfig(const proto::SimulationConfig& c);

// The adapter a config asks for (defaults for zeros); InvalidArgument naming the key.
struct AdapterChoice {
  model::AdapterSpec spec;
  std::vector<model::Module> modules;
  std::string layout;  // per-layer settings (model::ParseLayerLayout syntax), empty: uniform
};
absl::StatusOr<AdapterChoice> AdapterFromConfig(const proto::AdapterConfig& a);

// The strategy settings of a config (defaults for zeros); InvalidArgument naming the key.
absl::StatusOr<aggregation::StrategyOptions> StrategyFromConfig(const proto::StrategyConfig& st);

absl::StatusOr<SimulationResult> RunSimulation(const proto::SimulationConfig& c, const SimOptions& o);

}  // namespace fedtune::sim

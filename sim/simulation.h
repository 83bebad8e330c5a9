// `fedtune simulate CONFIG`: N virtual clients in one process sharing one read-only copy of the
// base model. The rounds are federation::RoundEngine's, the same engine the deployed coordinator
// runs; this module is only its in-process transport (SimTransport: clients train one after
// another with worker::RunTrainTask, the clock is simulated from profiles: speed factor,
// bandwidth, latency, dropout), the data partition, server-side evaluation on held-out examples
// per task, and the outputs (metrics, report, exports).
//
// Clients train one after another, each with every core (the kernels are multithreaded), which
// bounds concurrency by the cores and keeps one copy of activations in memory. Per-client state
// between rounds is its data and its local privacy ledger: clients start every round from the
// global adapter.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "common/status.h"
#include "federation/round_engine.h"
#include "model/dataset.h"
#include "proto/config.pb.h"

namespace fedtune::sim {

using RoundRecord = federation::RoundRecord;

struct SimulationResult {
  std::string run_dir;
  std::vector<RoundRecord> rounds;
  double accuracy_before = 0, accuracy_after = 0;
  double centralized_accuracy = -1;  // -1: no baseline run
  double wall_seconds = 0;
  double peak_rss_mib = 0;
  bool stopped_early = false;  // the privacy budget refused a round
  aggregation::TensorMap global;  // the final global adapter
};

struct SimOptions {
  bool progress = true;           // progress lines on stderr
  std::string config_text;        // copied into the run directory
  std::string default_run_name = "run";
};

// Checks everything that can be checked before loading the model: counts, names, files, privacy
// settings. InvalidArgument naming the key (e.g. "strategy.merge").
absl::Status ValidateConfig(const proto::SimulationConfig& c);

absl::StatusOr<SimulationResult> RunSimulation(const proto::SimulationConfig& c, const SimOptions& o);

// A simulation across machines (`fedtune simulate --serve` / `--client K`): the same config runs
// its virtual clients as worker processes against a coordinator.
// The name of simulated client k (its worker name and credentials): client-000, client-001, ...
std::string ClientName(int k);
// Client k's training examples, split exactly as RunSimulation splits them.
absl::StatusOr<std::vector<model::Example>> ClientTrainingData(const proto::SimulationConfig& c, int k, const model::Tokenizer& tok);
// The held-out examples the simulation scores the global adapter on (every task's share, as
// RunSimulation evaluates them), for the coordinator of `simulate --serve`.
absl::StatusOr<std::vector<model::Example>> HeldOutData(const proto::SimulationConfig& c, const model::Tokenizer& tok);
// The coordinator's configuration for the config's round (model, adapter, rounds, training,
// strategy, privacy, evaluation, secure aggregation, planner; every client in every round);
// the caller adds the transport keys (listen, tls, tokens, state_dir).
absl::StatusOr<proto::CoordinatorConfig> CoordinatorConfigFor(const proto::SimulationConfig& c);

}  // namespace fedtune::sim

// One client's part of a round, shared by the worker daemon and the simulation: start from the
// global adapter tensors, fine-tune locally on private data, and package the update (delta from
// the global tensors, example count, diagonal Fisher, metrics) for the server. This is the one
// place that translates between the model's AdapterSet and the server's plain tensors.
#pragma once

#include <functional>
#include <string>

#include "aggregation/tensors.h"
#include "protocol/adapter_tensors.h"
#include "model/finetune.h"

namespace fedtune::worker {

using protocol::AdapterTensors;
using protocol::SetAdapterTensors;
using protocol::TensorBytes;

struct LocalTrainOptions {
  model::FinetuneOptions finetune;
  model::OptimizerConfig optimizer;
  bool send_fisher = true;
  std::function<void(const model::StepLog&)> on_step;  // progress (the daemon's heartbeats)
  // Modules to train (a per-worker plan); the adapter's other modules act frozen with their
  // global values, and the update holds the trained modules only. Empty: all.
  std::vector<model::Module> train_modules;
  // DiaBlo: train train_blocks blocks of every module from block train_first_block only (0:
  // all); the update holds those blocks (aggregation/hetero_rank.h, protocol::FirstBlock).
  int64_t train_blocks = 0, train_first_block = 0;
};

struct LocalResult {
  aggregation::ClientUpdate update;
  model::TrainReport report;
  // Undoes what training this round changed in the worker's own state (the error-feedback
  // residual of a compressed upload) for an update that never counts: refused by the
  // coordinator, or not sent because the round closed. Empty: nothing to undo.
  std::function<void()> discard;
};

// `adapters` supplies the structure (and frozen parts such as FFA-LoRA's A); its trainable
// tensors are overwritten with `global` first. `config` is the strategy's per-client config
// ("proximal_mu").
absl::StatusOr<LocalResult> TrainLocal(const model::LlamaModel& model, const std::vector<model::Example>& data,
                                       const aggregation::TensorMap& global, const std::map<std::string, double>& config,
                                       const std::string& client, const LocalTrainOptions& o, model::AdapterSet<float>* adapters);

// A random small update of `global`'s shape (stand-in trainer for coordinator-overhead
// benchmarks and load tests: the point is the server's cost, not learning). Deterministic in
// `seed`.
LocalResult StandInUpdate(const aggregation::TensorMap& global, const std::string& client, int64_t num_examples, bool fisher, uint64_t seed);

}  // namespace fedtune::worker

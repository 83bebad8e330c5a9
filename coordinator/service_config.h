// `fedtune coordinator --config`: the coordinator's YAML (proto::CoordinatorConfig) turned into
// ServerOptions. The round's keys resolve in federation/settings exactly as the simulation's;
// keys the deployed runner cannot honour are refused here, naming the key.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "coordinator/server.h"
#include "model/dataset.h"
#include "model/llama.h"
#include "proto/config.pb.h"

namespace fedtune::coordinator {

struct Service {
  ServerOptions options;
  // Server-side evaluation (eval.data): the base model and the held-out examples it scores.
  std::unique_ptr<model::LlamaModel> eval_model;
  std::vector<model::Example> eval_data;
};

// held_out, when given: makes the examples to score the global adapter on instead of eval.data,
// with the tokenizer of the model the service loaded (`fedtune simulate --serve`: the
// simulation's held-out split); an empty set means no server-side evaluation.
using HeldOutFn = std::function<absl::StatusOr<std::vector<model::Example>>(const model::Tokenizer&)>;
absl::StatusOr<std::unique_ptr<Service>> ServiceFromConfig(const proto::CoordinatorConfig& c, const HeldOutFn& held_out = nullptr);

}  // namespace fedtune::coordinator

// `fedtune coordinator --config`: the coordinator's YAML (proto::CoordinatorConfig) turned into
// ServerOptions. The round's keys resolve in federation/settings exactly as the simulation's;
// keys the deployed runner cannot honour are refused here, naming the key.
#pragma once

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

// held_out: examples to score the global adapter on instead of eval.data (`fedtune simulate
// --serve` passes the simulation's held-out split); empty: eval.data, if set.
absl::StatusOr<std::unique_ptr<Service>> ServiceFromConfig(const proto::CoordinatorConfig& c,
                                                           std::vector<model::Example> held_out = {});

}  // namespace fedtune::coordinator

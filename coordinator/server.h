// The coordinator service (gRPC over mutual TLS, proto/service.proto). One background thread
// runs the rounds (select -> dispatch -> collect -> aggregate -> commit); RPC handlers only
// validate, convert and hand over (they never aggregate). State survives restarts: the ledger
// (SQLite) records committed rounds and `state_dir/global.safetensors` holds the adapter of the
// last committed round, written atomically before the ledger commit, so a restarted coordinator
// resumes from the last committed round and never counts one twice.
#pragma once

#include <memory>
#include <string>

#include <optional>

#include "aggregation/strategy.h"
#include "planner/planner.h"
#include "proto/service.pb.h"

namespace fedtune::coordinator {

struct ServerOptions {
  std::string address = "127.0.0.1:0";   // port 0: any free port (see port())
  std::string ca_pem, cert_pem, key_pem;  // file paths (from `fedtune provision`)
  std::string tokens_path;                // tokens.sha256
  std::string state_dir;                  // ledger.sqlite, global.safetensors
  aggregation::TensorMap initial_global;
  rpc::v1::AdapterPlan plan;              // what every worker trains (the planner refines this)
  int rounds = 1;
  int min_workers = 1;                    // online workers before a round starts
  int deadline_ms = 600000;               // per round; late updates are refused
  // Over-selection: with target_updates > 0 the round closes as soon as that many updates are
  // in (select more workers than that; the rest are told to abandon the round). 0: wait for
  // every selected worker or the deadline.
  int target_updates = 0;
  // Fewer accepted updates than this at the deadline: the round is not committed and starts
  // again with a new selection.
  int quorum = 1;
  int heartbeat_ms = 2000;                // told to workers on join
  int offline_after_ms = 30000;           // no request for this long: offline, not selected
  // Memory bound: at most this many uploads are read and decoded at once, and at most as many
  // decoded updates wait for the aggregator; adapter downloads share one buffer.
  int max_concurrent_uploads = 4;
  int max_concurrent_downloads = 16;
  int transport_memory_mib = 64;          // gRPC resource quota (buffers of all connections)
  int local_steps = 4, batch = 8;
  double learning_rate = 5e-3;
  bool send_fisher = false;
  size_t max_update_bytes = 256u << 20;
  uint64_t seed = 1;
  // Heterogeneity-aware planning (issue 8): per-worker modules, batch, local steps and base type
  // each round from the joined workers' profiles. `uniform` inside is the configured training.
  struct Planning {
    planner::ModelShape shape;
    planner::PlannerOptions options;
  };
  std::optional<Planning> planning;
  std::string http_address;               // "127.0.0.1:9090": /metrics, / (dashboard), /status.json; empty: off
};

class CoordinatorServer {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(ServerOptions o, std::unique_ptr<aggregation::Strategy> strategy);
  ~CoordinatorServer();
  int port() const;
  // Blocks until every round is committed (or Shutdown); returns the round thread's status.
  absl::Status Wait();
  void Shutdown();
  aggregation::TensorMap global() const;
  int last_committed_round() const;
  int http_port() const;  // 0 when the HTTP status server is off

 private:
  CoordinatorServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fedtune::coordinator

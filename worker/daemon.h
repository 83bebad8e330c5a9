// The worker daemon's loop against a coordinator (gRPC, mutual TLS): join with the join token,
// long-poll for tasks, download the round's global adapter (checked against its SHA-256), train
// with the local engine (worker/local_trainer.h), upload the update in chunks. Reconnects with
// exponential backoff while the coordinator is unreachable; returns when told to shut down or
// when `stop` becomes true.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "model/dataset.h"
#include "model/llama.h"

namespace fedtune::worker {

struct DaemonOptions {
  std::string address;                    // host:port of the coordinator
  std::string ca_pem, cert_pem, key_pem;  // file paths
  std::string token;                      // join token (hex)
  int max_backoff_ms = 30000;
  int poll_ms = 2000;
};

struct DaemonReport {
  int rounds_trained = 0;
};

// Local training seed of a worker in a round (example order): reproducible runs.
uint64_t TrainingSeed(const std::string& worker, int round);

absl::StatusOr<DaemonReport> RunDaemon(const DaemonOptions& o, const model::LlamaModel& model, const std::vector<model::Example>& data,
                                       const std::atomic<bool>& stop);

}  // namespace fedtune::worker

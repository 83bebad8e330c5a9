// The coordinator service (gRPC over mutual TLS, proto/service.proto): the deployed transport of
// federation::RoundEngine. One background thread runs the engine's rounds; RPC handlers only
// validate, convert and hand over (they never aggregate). The engine owns the round (sampling,
// planning, DP, aggregation, evaluation, commit) and its durable state (the ledger and
// `state_dir/state-<round>.safetensors`: adapter, server-optimizer moments, privacy ledger), so a
// restarted coordinator resumes after the last committed round and never counts one twice.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "federation/round_engine.h"
#include "proto/service.pb.h"

namespace fedtune::coordinator {

struct ServerOptions {
  std::string address = "127.0.0.1:0";   // port 0: any free port (see port())
  std::string ca_pem, cert_pem, key_pem;  // file paths (from `fedtune provision`)
  std::string tokens_path;                // tokens.sha256
  // The rounds: settings, state_dir (ledger.sqlite, state-<round>.safetensors), quorum,
  // target_updates (over-selection: the round closes as soon as that many updates are in; the
  // rest are told to abandon it), min_available (online workers before a round starts),
  // planning.
  federation::EngineOptions engine;
  aggregation::TensorMap initial_global;
  int deadline_ms = 600000;               // per round; late updates are refused
  int heartbeat_ms = 2000;                // told to workers on join
  int offline_after_ms = 30000;           // no request for this long: offline, not selected
  // Memory bound: at most this many uploads are read and decoded at once, and at most as many
  // decoded updates wait for the aggregator; adapter downloads share one buffer.
  int max_concurrent_uploads = 4;
  int max_concurrent_downloads = 16;
  int transport_memory_mib = 64;          // gRPC resource quota (buffers of all connections)
  size_t max_update_bytes = 256u << 20;
  int secure_stage_ms = 60000;            // secure aggregation: key, share and unmask stages each
  int max_threads = 1024;                 // gRPC server threads (RPCs beyond: RESOURCE_EXHAUSTED)
  // Server-side evaluation of the global adapter (eval.data); empty: none.
  std::function<absl::Status(const aggregation::TensorMap&, std::map<std::string, double>&)> evaluate;
  std::string http_address;               // "127.0.0.1:9090": /metrics, / (dashboard), /status.json; empty: off
  std::string http_token;                 // non-empty: bearer token required by the status server
  bool http_allow_remote = false;         // a non-loopback http_address without a token
};

class CoordinatorServer {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(ServerOptions o);
  ~CoordinatorServer();
  int port() const;
  // Blocks until every round is committed (or Shutdown); returns the round thread's status.
  absl::Status Wait();
  void Shutdown();
  // After the run: keeps serving until every online worker has been told the run is over (its
  // next GetTask answers SHUTDOWN) or max_wait passed, so a worker between requests when the last
  // round committed exits instead of retrying a coordinator that is gone. Returns how many
  // online workers were not told.
  int TellWorkersTheRunIsOver(std::chrono::milliseconds max_wait);
  aggregation::TensorMap global() const;
  int last_committed_round() const;
  int http_port() const;  // 0 when the HTTP status server is off

 private:
  CoordinatorServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fedtune::coordinator

// The run ledger: rounds, per-client outcomes, metrics and privacy spent, in SQLite (WAL mode,
// one transaction per committed round, so a crash leaves either the whole round or none of it).
// Used by the coordinator service and by the simulation.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "common/status.h"

struct sqlite3;

namespace fedtune::federation {

struct ClientRoundRecord {
  std::string client;
  std::string status;  // "ok", "dropped", "rejected: ..."
  int64_t num_examples = 0;  // < 0: withheld (under DP; stored as NULL)
  double train_loss = 0;     // < 0: withheld
  double train_seconds = 0;
  int64_t bytes_up = 0;
};

class RunLedger {
 public:
  static absl::StatusOr<std::unique_ptr<RunLedger>> Open(const std::string& path);
  ~RunLedger();
  RunLedger(const RunLedger&) = delete;
  RunLedger& operator=(const RunLedger&) = delete;

  absl::Status SetRunInfo(const std::string& key, const std::string& value);
  // Everything about one round in one transaction.
  absl::Status CommitRound(int round, const std::map<std::string, double>& metrics, const std::vector<ClientRoundRecord>& clients);
  // Highest committed round (0 when none).
  absl::StatusOr<int> LastRound() const;
  absl::StatusOr<double> Metric(int round, const std::string& name) const;
  // Every committed round's metrics, by round (dashboards after a restart).
  absl::StatusOr<std::map<int, std::map<std::string, double>>> AllMetrics() const;

 private:
  explicit RunLedger(sqlite3* db) : db_(db) {}
  absl::Status Exec(const std::string& sql);
  sqlite3* db_;
};

}  // namespace fedtune::federation

// The round engine: the one place a federated round is written, for the simulation and for the
// deployed coordinator alike. It talks to clients only through a `Transport`:
//   sim/          in-process virtual clients (simulated clock, profiles, dropouts)
//   coordinator/  the gRPC service that worker daemons connect to
// A round reads like this (RoundEngine::Run):
//   clients = transport.Available()          who can take part (and their profiles)
//   plan (planner/), sample (Strategy::ConfigureTrain), configure one TrainTask per client
//   transport.Train(tasks, collector)        updates streamed into the strategy's accumulator
//                                            (or, with secure aggregation, into a SecAgg+ sum)
//   Strategy::Commit                         merge rule, server optimizer, central DP + accounting
//   transport.Evaluate (every eval.every)    held-out loss / accuracy of the new global adapter
//   commit                                   state-<r>.safetensors (adapter + strategy state:
//                                            optimizer moments, privacy ledger), then the ledger
//                                            row; a restart resumes exactly after the last row
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aggregation/strategy.h"
#include "federation/run_ledger.h"
#include "federation/secure_server.h"
#include "federation/settings.h"
#include "planner/planner.h"
#include "protocol/task.h"

namespace fedtune::federation {

struct ClientInfo {
  std::string name;
  int64_t num_examples = 0;                       // 0: unknown (deployment)
  std::optional<planner::WorkerProfile> profile;  // for the planner (memory, speed, link)
  // A fixed LoRA rank for this client (simulation profiles[].rank), or with DiaBlo its number of
  // trained blocks (profiles[].blocks); 0: the whole adapter (or the plan's).
  int64_t rank = 0;
  // The modules this client trains (simulation profiles[].modules; the others frozen); empty: all
  // (or the plan's).
  std::vector<model::Module> train_modules = {};
};

struct RoundRecord {
  int round = 0;
  bool evaluated = false;
  std::map<std::string, double> metrics;  // see README "Round metrics"
};

// One round's collection; transports call it on the engine's thread.
class Collector {
 public:
  virtual ~Collector() = default;
  // Validates and folds in one update; a refusal (with its reason) is recorded for the client.
  virtual absl::Status Add(aggregation::ClientUpdate u) = 0;
  // A selected client that sent nothing; `outcome` is the ledger's word ("dropped", ...).
  virtual void Fail(const std::string& client, const absl::Status& why, const std::string& outcome) = 0;
  // A selected client that declined its task because its predicted peak (`needed_mib`) exceeds
  // the memory it may use (`budget_mib`): a failure of the round, and with the planner the
  // client is re-planned within that budget before the next round (or the round's retry).
  // device: the figures are of the client's device (GPU) memory.
  virtual void Decline(const std::string& client, const std::string& reason, double needed_mib, double budget_mib, bool device) = 0;
  virtual int accepted() const = 0;
  // The round has what it needs (target_updates reached): stop collecting.
  virtual bool enough() const = 0;
  // Secure-aggregation rounds (tasks with secure_aggregation): the server side whose stages the
  // transport relays (keys, shares, unmasking); null in other rounds.
  virtual SecureServer* secure() = 0;
  // A client's masked input in a secure round (plain updates are refused there);
  // `num_examples` and `metrics` travel in the clear as with plain updates.
  virtual absl::Status AddMasked(const std::string& client, std::vector<uint32_t> y, int64_t num_examples,
                                 const std::map<std::string, double>& metrics) = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  // Clients that may take part in `round`; blocks until at least `min` are (Cancelled on
  // shutdown). `attempt` > 0: the round is being retried after too few updates.
  virtual absl::StatusOr<std::vector<ClientInfo>> Available(int round, int min, int attempt) = 0;
  // Hands out the tasks with `global` and feeds every answer into `c` as it arrives; returns when
  // each task has answered, c.enough(), or the round's time is up. Figures of its own (traffic,
  // simulated time) go into `metrics`.
  virtual absl::Status Train(int round, const aggregation::TensorMap& global, const std::vector<protocol::TrainTask>& tasks, Collector& c,
                             std::map<std::string, double>& metrics) = 0;
  // Scores `global` into `metrics` (eval_loss, accuracy, ...); writes nothing when it has no
  // held-out data.
  virtual absl::Status Evaluate(int round, const aggregation::TensorMap& global, std::map<std::string, double>& metrics) = 0;
  // Federated evaluation (optional): the clients that can score the global adapter on held-out
  // data of their own, and the round trip of their EVALUATE tasks (the reports that came back).
  virtual std::vector<std::string> EvaluationClients(int /*round*/) { return {}; }
  virtual absl::StatusOr<std::vector<aggregation::EvalReport>> EvaluateOn(int /*round*/, const aggregation::TensorMap& /*global*/,
                                                                          const std::vector<protocol::TrainTask>& /*tasks*/) {
    return std::vector<aggregation::EvalReport>{};
  }
  // Notices, all optional.
  virtual void Phase(int /*round*/, const std::string& /*phase*/) {}
  virtual absl::Status Planned(int /*round*/, const planner::Plan& /*plan*/) { return absl::OkStatus(); }
  virtual absl::Status Committed(const RoundRecord& /*r*/, const aggregation::TensorMap& /*global*/) { return absl::OkStatus(); }
};

struct EngineOptions {
  RunSettings settings;
  std::string run_id;
  std::string state_dir;       // ledger.sqlite and state-<round>.safetensors
  // Fewer accepted updates than this: the round is not committed and starts again with a new
  // selection (deployment). 0: commit whatever came (the strategy's min_clients keeps the global
  // adapter when too few came).
  int quorum = 0;
  int min_available = 1;       // clients online before a round starts
  int target_updates = 0;      // > 0: close the round after this many accepted updates
  bool evaluate_start = true;  // score the starting adapter as round 0 (fresh runs only)
  struct Planning {
    planner::ModelShape shape;
    planner::PlannerOptions options;
    std::map<model::Module, double> importance;  // starting module importance
    bool every_round = false;                    // re-plan before every round (else once)
  };
  std::optional<Planning> planning;
  std::function<void(const std::string&)> say;  // progress lines (may be empty)
};

struct RunSummary {
  std::vector<RoundRecord> rounds;  // round 0 (when scored) and every round committed by this run
  bool stopped_early = false;       // the privacy budget refused a round
  std::optional<planner::Plan> plan;
};

class RoundEngine {
 public:
  // Opens (or resumes) the run in o.state_dir: after a restart the global adapter, the strategy's
  // state and the round counter come from the last committed round.
  static absl::StatusOr<std::unique_ptr<RoundEngine>> Open(EngineOptions o, aggregation::TensorMap initial_global);
  ~RoundEngine();
  absl::StatusOr<RunSummary> Run(Transport& t);

  int last_committed() const { return committed_; }
  const aggregation::TensorMap& global() const { return global_; }
  const aggregation::Strategy& strategy() const { return *strategy_; }
  RunLedger& ledger() { return *ledger_; }
  const std::string& strategy_summary() const { return strategy_summary_; }

 private:
  RoundEngine() = default;
  absl::Status Plan(int round, const std::vector<ClientInfo>& clients, Transport& t);
  absl::Status CommitState(int round, const RoundRecord& rec, const std::vector<ClientRoundRecord>& clients);
  // Server-side (transport) and federated evaluation of the global adapter into `m`.
  absl::Status EvaluateRound(int round, Transport& t, std::map<std::string, double>& m);

  EngineOptions o_;
  std::unique_ptr<aggregation::Strategy> strategy_;
  std::string strategy_summary_;
  std::unique_ptr<RunLedger> ledger_;
  aggregation::TensorMap global_;
  int committed_ = 0;
  std::map<model::Module, double> importance_;
  std::optional<planner::Plan> plan_;
  std::map<std::string, planner::WorkerPlan> plans_;
  // Clients that declined a planned task or peaked above its prediction: the memory the planner
  // gives them from then on (their budget or reported memory, corrected by the prediction error).
  std::map<std::string, double> memory_override_;
  std::map<std::string, double> device_override_;  // the same for a GPU worker's device memory
  bool replan_ = false;  // a client declined: plan again before the next round
  double local_epsilon_ = 0;
};

// The state file of a committed round: the global adapter ("global.<tensor>"), the strategy's
// tensors ("server.<tensor>") and text, and the round.
std::string StatePath(const std::string& state_dir, int round);
absl::Status LoadCommittedAdapter(const std::string& state_dir, int round, aggregation::TensorMap* global);

}  // namespace fedtune::federation

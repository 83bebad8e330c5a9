// The aggregation strategy interface (after Flower's Strategy: configure train, aggregate
// train, configure evaluate, aggregate evaluate), split so that aggregation can stream and so
// that wrappers (differential privacy) can act between merging and the server update:
//
//   tasks = ConfigureTrain(round, available)        who trains, with which settings
//   agg = BeginAggregate(round, global)             one round's accumulator
//   agg->Add(update) ...                            streamed: memory does not grow with the
//                                                   number of updates for linear merges
//   merged = agg->Merge()                           the pseudo-gradient (merged delta)
//   result = Commit(round, global, merged, failed)  server optimizer -> new global, or keep
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aggregation/tensors.h"
#include "common/rng.h"

namespace fedtune::aggregation {

struct ClientTask {
  std::string client;
  std::map<std::string, double> config;  // e.g. "proximal_mu" (FedProx)
};

// A merged round: per tensor the combined delta and the number of clients that contributed to
// it (tensors nobody trained are absent).
struct Merged {
  TensorMap delta;
  std::map<std::string, int> contributors;
  int accepted = 0;          // updates merged
  int64_t num_examples = 0;  // over accepted updates
  std::map<std::string, double> metrics;
};

struct RoundResult {
  std::optional<TensorMap> global;  // nullopt: keep the current global adapter
  std::map<std::string, double> metrics;
};

struct EvalReport {
  std::string client;
  int64_t num_examples = 0;
  std::map<std::string, double> metrics;
};

// What a strategy carries from round to round (server-optimizer moments, the privacy ledger,
// an adaptive clipping norm), so a restarted coordinator continues exactly: tensors plus a text
// (JSON) for scalars that must survive bit for bit.
struct StrategyState {
  TensorMap tensors;
  std::string text;
};

class Aggregation {
 public:
  virtual ~Aggregation() = default;
  // Validates and folds in one update (the strategy's validation, then its merge rule). A
  // rejected update leaves the accumulator unchanged.
  virtual absl::Status Add(ClientUpdate u) = 0;
  // A sum from secure aggregation: sum_k w_k delta_k over `count` clients whose weights add up to
  // `total_weight`, every client contributing every tensor of `weighted_sum`. Only linear
  // merges accept it (others: FailedPrecondition); uncertainty-aware merging falls back to the
  // weighted mean (the server never sees a client's Fisher). value_weight (per-worker shares):
  // per value, the weight of the clients that trained it (a tensor absent from it: total_weight).
  virtual absl::Status AddSecureSum(const TensorMap& weighted_sum, double total_weight, int count, int64_t num_examples,
                                    const TensorMap* value_weight = nullptr);
  // Uncertainty-aware merging under secure aggregation: `num` = sum_k w_k (F_k + lambda) delta_k
  // and `den` = sum_k w_k (F_k + lambda), per coordinate (any common positive scale), over
  // `count` clients; the merge is num / den. Only the uncertainty rule accepts it.
  virtual absl::Status AddSecureFisherSums(const TensorMap& num, const TensorMap& den, int count, int64_t num_examples);
  virtual absl::StatusOr<Merged> Merge() = 0;
};

class Strategy {
 public:
  virtual ~Strategy() = default;
  virtual std::string Name() const = 0;
  // Chooses the clients of a round from those available (deterministic given rng).
  virtual std::vector<ClientTask> ConfigureTrain(int round, const std::vector<std::string>& available, Rng& rng) = 0;
  // The tasks of clients already selected (by a wrapper that samples on its own): the settings
  // ConfigureTrain would give them.
  virtual std::vector<ClientTask> TasksFor(int /*round*/, std::vector<std::string> selected) {
    std::vector<ClientTask> t;
    for (std::string& c : selected) t.push_back({std::move(c), {}});
    return t;
  }
  // True when the selection is a secret random draw the privacy accounting relies on (Poisson
  // sampling under DP): the round engine then commits each round with the clients that drew and
  // answered, and never re-draws because too few did (a re-draw conditioned on the outcome would
  // change the sampling distribution the accountant assumes).
  virtual bool private_selection() const { return false; }
  // `global` must outlive the returned accumulator.
  virtual std::unique_ptr<Aggregation> BeginAggregate(int round, const TensorMap& global) = 0;
  virtual absl::StatusOr<RoundResult> Commit(int round, const TensorMap& global, Merged merged,
                                             const std::vector<ClientFailure>& failures) = 0;
  virtual std::vector<ClientTask> ConfigureEvaluate(int round, const std::vector<std::string>& available, Rng& rng) = 0;
  // Example-weighted mean of every metric the clients report.
  virtual std::map<std::string, double> AggregateEvaluate(int round, const std::vector<EvalReport>& reports);
  // Whether the merge is a (weighted) mean of deltas, the form differential privacy and secure
  // aggregation need.
  virtual bool linear() const = 0;
  // The L2 bound each plain update is clipped to this round (0: none), for accumulators that
  // wrap the strategy's (per-worker ranks, aggregation/hetero_rank.h).
  virtual double UpdateNormBound() const { return 0; }
  // State across rounds (default: none). LoadState takes what SaveState gave, after a restart.
  virtual StrategyState SaveState() const { return {}; }
  virtual absl::Status LoadState(const StrategyState&) { return absl::OkStatus(); }
};

// Convenience for callers holding all updates at once (tests, small simulations). Invalid
// updates are moved to the failures with their status.
absl::StatusOr<RoundResult> AggregateTrain(Strategy& s, int round, const TensorMap& global, std::vector<ClientUpdate> updates,
                                           std::vector<ClientFailure> failures = {});

}  // namespace fedtune::aggregation

// The standard strategy, composed from a merge rule and a server optimizer:
//   merge rules: example-weighted (or uniform) mean = FedAvg's; uncertainty-aware
//   (per-coordinate precision weighting by each client's diagonal Fisher, ALGORITHMS.md);
//   robust ones (coordinate-wise median, trimmed mean, multi-Krum), optionally after norm
//   bounding of every update.
//   server optimizers on the merged delta (Reddi et al. 2021, arXiv 2003.00295): FedAvg
//   (theta += lr * delta), FedAvgM, FedAdam, FedYogi, FedAdagrad.
// FedProx is client-side: the strategy hands "proximal_mu" to every client it configures.
// Exactness (documented, tested): FFA-LoRA's B and DiaBlo's blocks enter the model linearly, so
// their mean is exactly the mean of the clients' dense updates; plain LoRA's A and B averaged
// separately give mean(B) mean(A) != mean(B A) (use aggregation/hetero_rank.h for the exact
// FLoRA stacking or FlexLoRA SVD).
#pragma once

#include "aggregation/strategy.h"

namespace fedtune::aggregation {

enum class MergeRule { kMean, kUncertainty, kMedian, kTrimmedMean, kKrum };
enum class ServerOptimizer { kFedAvg, kFedAvgM, kFedAdam, kFedYogi, kFedAdagrad };

const char* MergeRuleName(MergeRule r);
absl::StatusOr<MergeRule> ParseMergeRule(const std::string& s);  // mean, uncertainty, median, trimmed_mean, krum
const char* ServerOptimizerName(ServerOptimizer o);
absl::StatusOr<ServerOptimizer> ParseServerOptimizer(const std::string& s);  // fedavg, fedavgm, fedadam, fedyogi, fedadagrad

struct StrategyOptions {
  MergeRule merge = MergeRule::kMean;
  bool weight_by_examples = true;    // mean / uncertainty: weights n_k (else 1)
  // A client's self-reported example count weighs at most this much (one peer must not set the
  // global adapter by claiming 2^40 examples). 0: no cap.
  int64_t max_client_examples = 1000000;
  double uncertainty_lambda = 1e-6;  // F + lambda
  // Public bound on the diagonal Fisher (0: none): values above are clipped before weighting, so
  // secure aggregation can carry the weights in fixed point (ALGORITHMS.md). Measured on
  // SmolLM2-135M FFA-LoRA r=8 (4 steps of the record task): median 1.6e-7, 99.9% below 1.6e-4.
  double fisher_clip = 0;
  double trim_fraction = 0.1;        // trimmed mean: fraction cut from each side
  int krum_byzantine = 0;            // f: assumed Byzantine clients
  int krum_select = 1;               // m: updates averaged by multi-Krum (1 = Krum)
  double norm_bound = 0;             // > 0: clip each delta to this L2 norm first
  // > 0 (and norm_bound 0): clip each delta to this x the median norm of the previous round's
  // accepted deltas (a robust bound one peer cannot move; the first round has none).
  double auto_norm_factor = 0;
  ServerOptimizer server = ServerOptimizer::kFedAvg;
  double server_lr = 1.0;
  double momentum = 0.9;             // FedAvgM
  double beta1 = 0.9, beta2 = 0.99;  // FedAdam / FedYogi
  double tau = 1e-3;                 // adaptivity; v starts at tau^2
  int clients_per_round = 0;         // 0: every available client
  int min_clients = 1;               // fewer accepted updates: keep the global adapter
  int eval_clients = 0;              // 0: every available client
  double proximal_mu = 0;            // FedProx mu handed to clients
};

class FedStrategy : public Strategy {
 public:
  static absl::StatusOr<std::unique_ptr<FedStrategy>> Create(const StrategyOptions& o);
  std::string Name() const override;
  std::vector<ClientTask> ConfigureTrain(int round, const std::vector<std::string>& available, Rng& rng) override;
  std::vector<ClientTask> TasksFor(int round, std::vector<std::string> selected) override;
  std::unique_ptr<Aggregation> BeginAggregate(int round, const TensorMap& global) override;
  absl::StatusOr<RoundResult> Commit(int round, const TensorMap& global, Merged merged,
                                     const std::vector<ClientFailure>& failures) override;
  std::vector<ClientTask> ConfigureEvaluate(int round, const std::vector<std::string>& available, Rng& rng) override;
  bool linear() const override { return o_.merge == MergeRule::kMean || o_.merge == MergeRule::kUncertainty; }
  double UpdateNormBound() const override { return norm_bound(); }
  const StrategyOptions& options() const { return o_; }
  // The L2 bound each delta is clipped to this round (0: none).
  double norm_bound() const;
  // Server optimizer moments: tensors "m/<tensor>", "v/<tensor>"; the last median norm as text.
  StrategyState SaveState() const override;
  absl::Status LoadState(const StrategyState& state) override;

 private:
  explicit FedStrategy(const StrategyOptions& o) : o_(o) {}
  StrategyOptions o_;
  TensorMap m_, v_;
  std::vector<double> round_norms_;  // this round's accepted delta norms, before clipping
  double last_median_norm_ = 0;      // the previous round's median (0: none yet)
};

// Chooses min(k, n) of `available` uniformly without replacement (k <= 0: all), in a
// deterministic order given rng.
std::vector<std::string> SampleClients(const std::vector<std::string>& available, int k, Rng& rng);

}  // namespace fedtune::aggregation

// One resolution of a run's settings for both runners: `fedtune simulate` (SimulationConfig) and
// `fedtune coordinator` (CoordinatorConfig) share the keys that shape a round (adapter, train,
// strategy, dp, eval, secure_aggregation, planner, rounds, seeds), and their defaults are defined
// here and nowhere else. Every error names the key at fault.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "aggregation/compression.h"
#include "aggregation/fed_strategy.h"
#include "aggregation/hetero_rank.h"
#include "common/status.h"
#include "model/adapter.h"
#include "planner/planner.h"
#include "proto/config.pb.h"
#include "protocol/task.h"

namespace fedtune::federation {

// The adapter a config asks for (defaults for zeros).
struct AdapterChoice {
  model::AdapterSpec spec;
  std::vector<model::Module> modules;
  std::string layout;  // per-layer settings (model::ParseLayerLayout syntax), empty: uniform
};
absl::StatusOr<AdapterChoice> AdapterFromConfig(const proto::AdapterConfig& a);

// The strategy settings of a config (defaults for zeros).
absl::StatusOr<aggregation::StrategyOptions> StrategyFromConfig(const proto::StrategyConfig& st);

struct RunSettings {
  int rounds = 1;
  int population = 1;        // clients that can be sampled (simulation: clients; deployment: provisioned workers)
  int expected_clients = 1;  // per round: strategy.clients_per_round, or the population
  uint64_t seed = 1, adapter_seed = 1;
  AdapterChoice adapter;
  aggregation::StrategyOptions strategy;
  // Client training (train.*).
  int local_steps = 4, batch = 8, warmup_steps = 0;
  double learning_rate = 5e-3, weight_decay = 0, grad_clip_norm = 1.0;
  std::string base_type;  // re-quantize the base on the clients (empty: as stored)
  std::string compensation;  // of a re-quantized base: "" (none), svd, loftq, cloq, gptq, gptq-cloq
  int compensation_rank = 16;
  double compensation_damping = 0.01;
  bool send_fisher = false;
  // Upload compression (strategy.compression, topk_fraction, no_error_feedback).
  aggregation::Compression compression = aggregation::Compression::kNone;
  double topk_fraction = 0.05;
  bool error_feedback = true;
  // Evaluation (eval.*).
  int eval_every = 1, max_new_tokens = 32, generate_examples = 0;  // 0: every held-out example
  // Differential privacy (dp.*): central (the server noises) or local (DP-SGD on clients).
  struct Dp {
    bool central = false, local = false, adaptive_clipping = false, private_fisher = false;
    bool poisson = true;  // dp.sampling: Poisson client selection (else fixed-size, accounted at q = 1)
    double noise_multiplier = 0, clip_norm = 0, delta = 1e-5, target_epsilon = 0, target_quantile = 0.5;
  } dp;
  // SecAgg+ (secure_aggregation.*).
  struct Secure {
    bool enabled = false;
    double value_range = 0;
    int degree = 0, threshold = 0;
  } secure;
  uint64_t test_noise_seed = 0;
  // Per-worker ranks (planner.ranks, profiles[].rank): how their updates merge.
  aggregation::HeteroRankRule hetero_rank = aggregation::HeteroRankRule::kNested;
};

// Whether a run may give workers ranks below adapter.rank, or DiaBlo blocks below adapter.blocks
// (`key`: the config key that asks): no per-layer layouts, a linear merge, neither DP nor secure
// aggregation (a component averaged over fewer clients changes one client's influence; masks
// would have to cover each worker's slice), flexlora only for LoRA with server fedavg at
// server_lr 1.
absl::Status CheckHeteroRanks(const RunSettings& s, const std::string& key);

// The round-shaping keys of either config; `population` as above.
template <class Config>
absl::StatusOr<RunSettings> ResolveRun(const Config& c, int population);

// The strategy stack: FedStrategy, wrapped in DpStrategy for central DP (noise calibrated to
// dp.target_epsilon over the rounds when set). `summary` (optional) receives one line.
absl::StatusOr<std::unique_ptr<aggregation::Strategy>> MakeStrategy(const RunSettings& s, std::string* summary = nullptr);

// The task every client gets before the planner's share, the round's learning rate and the
// client's seed: adapter plan, local steps, batch, optimizer, Fisher, local DP.
protocol::TrainTask TaskTemplate(const RunSettings& s);

// Client learning rate in round `round` of `rounds`: cosine decay from `lr` to 10%. Every round
// restarts the local AdamW, whose first steps move every coordinate by ~lr whatever its gradient,
// so a constant rate keeps perturbing a converged adapter (measured: accuracy fell in the last
// round of the quickstart).
double RoundLearningRate(double lr, int round, int rounds);

// Planner options from the config (defaults documented in config.proto); `uniform` is the
// run's `train` settings on every module at the stored precision.
absl::StatusOr<planner::PlannerOptions> PlannerOptionsFrom(const proto::PlannerConfig& pc, const model::AdapterSpec& spec,
                                                           const std::vector<model::Module>& modules, const planner::Candidate& uniform,
                                                           int seq, bool send_fisher, bool recompute);

// Internal: the non-template resolver ResolveRun calls.
absl::StatusOr<RunSettings> ResolveRunParts(int rounds, uint64_t seed, uint64_t adapter_seed, const proto::AdapterConfig& adapter,
                                            const proto::LocalTrainConfig& train, const proto::StrategyConfig& strategy,
                                            const proto::DpConfig& dp, const proto::EvalConfig& eval,
                                            const proto::SecureAggregationConfig& secure, const proto::PlannerConfig& planner,
                                            uint64_t test_noise_seed, int population);

template <class Config>
absl::StatusOr<RunSettings> ResolveRun(const Config& c, int population) {
  return ResolveRunParts(c.rounds(), c.seed(), c.adapter_seed(), c.adapter(), c.train(), c.strategy(), c.dp(), c.eval(),
                         c.secure_aggregation(), c.planner(), c.test_noise_seed(), population);
}

}  // namespace fedtune::federation

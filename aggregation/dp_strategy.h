// Central differential privacy as a wrapper around any linear strategy (DP-FedAvg, McMahan et
// al. 2018, arXiv 1710.06963; adaptive clipping, Andrew et al. 2021, arXiv 1905.03871):
//   each client delta is clipped to L2 norm S and weighted equally (Fisher dropped: it is
//   data-dependent and unprivatised), the merged deltas are summed, N(0, (z S)^2) is added
//   to every coordinate of the sum, and the sum is divided by the EXPECTED number of clients m
//   (fixed denominator), then the wrapped strategy's server optimizer runs on that.
// With adaptive clipping, S follows the target quantile of update norms from a privatised
// count of unclipped updates, and the update noise is raised to z_d so the pair costs one
// release at z. Clients are Poisson-sampled from a CSPRNG (DpOptions::sampling). Each round is
// recorded in a PrivacyLedger (q = m / population, or 1 without Poisson sampling) BEFORE the
// noisy result is released; a round past the epsilon budget is refused (ResourceExhausted).
#pragma once

#include <map>
#include <optional>
#include <vector>

#include "aggregation/strategy.h"
#include "privacy/ledger.h"
#include "privacy/noise.h"

namespace fedtune::aggregation {

struct DpOptions {
  double noise_multiplier = 1.0;  // z
  double clip_norm = 1.0;         // S (initial value when adaptive)
  bool adaptive_clipping = false;
  double target_quantile = 0.5;   // gamma
  double clip_lr = 0.2;           // eta
  double count_noise = 0;         // sigma_b; <= 0: m / 20
  int expected_clients = 0;       // m (required)
  int population = 0;             // clients sampled from; <= 0: q = 1 (no amplification)
  // How a round's clients are chosen when population > expected_clients:
  //   kPoisson: every available client independently with probability q = expected_clients /
  //     population, drawn from a CSPRNG (privacy::NoiseSource; the test seed's stream when `seed`
  //     is set); the round is accounted at q (amplification by subsampling, which needs exactly
  //     this: independent draws nobody can predict). The number of clients varies per round.
  //   kFixed: the wrapped strategy's fixed-size draw from a seeded, predictable generator; no
  //     amplification is claimed: accounted at q = 1.
  enum class Sampling { kPoisson, kFixed };
  Sampling sampling = Sampling::kPoisson;
  double epsilon_budget = 0;      // <= 0: unlimited (still accounted)
  // Distributed DP under secure aggregation: clients clip to S and add N(0, (z S)^2 / k) each
  // (k = noise_share_clients) before masking, so the server adds nothing; with m' < k clients
  // in the sum it holds less noise and the round is accounted at z sqrt(m'/k).
  bool noise_added_by_clients = false;
  int noise_share_clients = 0;  // each client adds 1/this of the noise variance; 0: expected_clients
  double delta = 1e-5;
  // Uncertainty-aware merging with a privatised Fisher (> 0: on; the public Fisher bound). Per
  // tensor t each client's weight a_kt = mean_i min(F_i, clip) / clip + lambda / clip; the sums
  // sum_k a_kt clip_S(delta_k)_t and sum_k a_kt are both noised (the second scaled to the first's
  // sensitivity, so the pair is one Gaussian release at z) and divided, the denominator floored
  // at m lambda / clip. Costs sqrt(2) (1 + lambda/clip) more noise on the update than the mean
  // at the same epsilon, and the denominator's noise (z sqrt(2 T) for T tensors) must be small
  // next to m x the mean weight: it pays with many clients per round (ALGORITHMS.md).
  double private_fisher_clip = 0;
  double fisher_lambda = 1e-6;
  // Tests only: reproducible noise. Each round draws from its own stream (the seed with the
  // round number in its last 4 bytes), so a restarted run adds the same noise.
  std::optional<privacy::NoiseSource::Seed> seed;
};

class DpStrategy : public Strategy {
 public:
  static absl::StatusOr<std::unique_ptr<DpStrategy>> Create(std::unique_ptr<Strategy> inner, const DpOptions& o);
  std::string Name() const override { return "dp(" + inner_->Name() + ")"; }
  std::vector<ClientTask> ConfigureTrain(int round, const std::vector<std::string>& available, Rng& rng) override;
  std::vector<ClientTask> TasksFor(int round, std::vector<std::string> selected) override { return inner_->TasksFor(round, std::move(selected)); }
  bool private_selection() const override { return o_.sampling == DpOptions::Sampling::kPoisson && sampling_rate() < 1; }
  // Poisson: expected_clients / population; 1 without a population or with fixed-size selection.
  double accounted_rate() const { return private_selection() ? sampling_rate() : 1.0; }
  std::unique_ptr<Aggregation> BeginAggregate(int round, const TensorMap& global) override;
  absl::StatusOr<RoundResult> Commit(int round, const TensorMap& global, Merged merged,
                                     const std::vector<ClientFailure>& failures) override;
  std::vector<ClientTask> ConfigureEvaluate(int round, const std::vector<std::string>& available, Rng& rng) override {
    return inner_->ConfigureEvaluate(round, available, rng);
  }
  bool linear() const override { return true; }
  // The wrapped strategy's state, the privacy ledger (every release, doubles printed exactly)
  // and the clipping norm.
  StrategyState SaveState() const override;
  absl::Status LoadState(const StrategyState& state) override;
  const privacy::PrivacyLedger& ledger() const { return ledger_; }
  // Private-Fisher sums of a round (see DpOptions::private_fisher_clip), kept until Commit.
  struct FisherSums {
    std::map<std::string, std::vector<double>> num;
    std::map<std::string, double> den;
    int count = 0;
    int64_t examples = 0;
  };
  double clip_norm() const { return clip_; }
  double update_noise_multiplier() const { return z_update_; }

 private:
  DpStrategy(std::unique_ptr<Strategy> inner, const DpOptions& o, std::unique_ptr<privacy::NoiseSource> noise, double z_update);
  double sampling_rate() const { return o_.population > 0 ? static_cast<double>(o_.expected_clients) / o_.population : 1.0; }
  std::unique_ptr<privacy::NoiseSource> sampler_;  // Poisson client selection
  int draws_ = 0;                                  // selections made (test seeds: one stream each)
  std::unique_ptr<Strategy> inner_;
  DpOptions o_;
  std::unique_ptr<privacy::NoiseSource> noise_;
  privacy::PrivacyLedger ledger_;
  double clip_, z_update_;
  int unclipped_ = 0;  // this round
  FisherSums fisher_;
};

}  // namespace fedtune::aggregation

#include "aggregation/dp_strategy.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace fedtune::aggregation {
namespace {

class DpAggregation : public Aggregation {
 public:
  DpAggregation(std::unique_ptr<Aggregation> inner, const TensorMap& global, double clip, int* unclipped)
      : inner_(std::move(inner)), global_(global), clip_(clip), unclipped_(unclipped) {}
  absl::Status Add(ClientUpdate u) override {
    FT_RETURN_IF_ERROR(ValidateUpdate(u, global_));
    const double norm = ClipToNorm(u.delta, clip_);
    u.num_examples = 1;  // equal weights: the sensitivity of the sum is S
    u.fisher.clear();
    FT_RETURN_IF_ERROR(inner_->Add(std::move(u)));
    if (norm <= clip_) ++*unclipped_;
    return absl::OkStatus();
  }
  // The clients clipped (and, for distributed DP, noised) before masking; equal weights.
  absl::Status AddSecureSum(const TensorMap& weighted_sum, double total_weight, int count, int64_t num_examples) override {
    if (std::fabs(total_weight - count) > 1e-9) return absl::InvalidArgumentError("dp: secure sums must use equal client weights");
    return inner_->AddSecureSum(weighted_sum, total_weight, count, num_examples);
  }
  absl::StatusOr<Merged> Merge() override { return inner_->Merge(); }

 private:
  std::unique_ptr<Aggregation> inner_;
  const TensorMap& global_;
  double clip_;
  int* unclipped_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DpStrategy>> DpStrategy::Create(std::unique_ptr<Strategy> inner, const DpOptions& o) {
  if (!inner->linear()) return absl::InvalidArgumentError(absl::StrCat("dp: strategy ", inner->Name(), " is not a mean of updates; DP needs one"));
  if (o.expected_clients < 1) return absl::InvalidArgumentError("dp: expected_clients must be >= 1");
  if (o.population > 0 && o.population < o.expected_clients) return absl::InvalidArgumentError("dp: population must be >= expected_clients");
  if (!(o.noise_multiplier >= 0) || !(o.clip_norm > 0)) return absl::InvalidArgumentError("dp: need noise_multiplier >= 0 and clip_norm > 0");
  if (!(o.delta > 0 && o.delta < 1)) return absl::InvalidArgumentError("dp: delta must be in (0, 1)");
  double z_update = o.noise_multiplier;
  DpOptions opt = o;
  if (o.adaptive_clipping && o.noise_added_by_clients)
    return absl::InvalidArgumentError("dp: adaptive clipping needs the server to see update norms; not with distributed noise");
  if (o.adaptive_clipping) {
    if (opt.count_noise <= 0) opt.count_noise = o.expected_clients / 20.0;
    if (!(o.target_quantile > 0 && o.target_quantile < 1)) return absl::InvalidArgumentError("dp: target_quantile must be in (0, 1)");
    FT_ASSIGN_OR_RETURN(z_update, privacy::AdaptiveClippingUpdateNoise(o.noise_multiplier, opt.count_noise));
  }
  std::unique_ptr<privacy::NoiseSource> noise;
  if (o.seed) {
    FT_ASSIGN_OR_RETURN(noise, privacy::NoiseSource::FromSeed(*o.seed));
  } else {
    FT_ASSIGN_OR_RETURN(noise, privacy::NoiseSource::Create());
  }
  return std::unique_ptr<DpStrategy>(new DpStrategy(std::move(inner), opt, std::move(noise), z_update));
}

DpStrategy::DpStrategy(std::unique_ptr<Strategy> inner, const DpOptions& o, std::unique_ptr<privacy::NoiseSource> noise, double z_update)
    : inner_(std::move(inner)), o_(o), noise_(std::move(noise)), ledger_(o.epsilon_budget, o.delta), clip_(o.clip_norm), z_update_(z_update) {}

std::unique_ptr<Aggregation> DpStrategy::BeginAggregate(int round, const TensorMap& global) {
  unclipped_ = 0;
  return std::make_unique<DpAggregation>(inner_->BeginAggregate(round, global), global, clip_, &unclipped_);
}

absl::StatusOr<RoundResult> DpStrategy::Commit(int round, const TensorMap& global, Merged merged, const std::vector<ClientFailure>& failures) {
  const double m = o_.expected_clients;
  const double q = o_.population > 0 ? m / o_.population : 1.0;
  // Account first: a refused release publishes nothing.
  const int accepted = merged.accepted;
  // Distributed noise: only the clients that made it into the sum contributed their share.
  const double share = o_.noise_share_clients > 0 ? o_.noise_share_clients : m;
  const double z_round = o_.noise_added_by_clients ? o_.noise_multiplier * std::sqrt(std::min(1.0, accepted / share)) : o_.noise_multiplier;
  FT_RETURN_IF_ERROR(ledger_.Record({absl::StrCat("round ", round), q, z_round, 1}));
  if (o_.seed) {
    privacy::NoiseSource::Seed s = *o_.seed;
    for (int i = 0; i < 4; ++i) s[28 + i] ^= static_cast<uint8_t>(static_cast<uint32_t>(round) >> (8 * i));
    FT_ASSIGN_OR_RETURN(noise_, privacy::NoiseSource::FromSeed(s));
  }
  // Sum = mean * contributors, plus noise on every coordinate of every tensor (absent tensors
  // have a zero sum: whether anyone trained them must not show either).
  const double stddev = z_update_ * clip_;
  for (const auto& [name, g] : global) {
    std::vector<float>& d = merged.delta[name];
    const int c = merged.contributors.count(name) ? merged.contributors[name] : 0;
    if (d.empty()) d.assign(g.size(), 0.0f);
    for (float& x : d) x *= static_cast<float>(c);
    if (!o_.noise_added_by_clients) noise_->AddGaussian(d, stddev);
    for (float& x : d) x = static_cast<float>(x / m);
    merged.contributors[name] = std::max(c, 1);
  }
  merged.accepted = std::max(accepted, 1);  // the noisy release happens even with no update
  FT_ASSIGN_OR_RETURN(RoundResult r, inner_->Commit(round, global, std::move(merged), failures));
  FT_ASSIGN_OR_RETURN(privacy::Epsilon spent, ledger_.Spent());
  r.metrics["accepted"] = accepted;
  r.metrics["epsilon"] = spent.epsilon;
  r.metrics["dp_clip_norm"] = clip_;
  r.metrics["dp_noise_stddev"] = stddev;
  r.metrics["dp_unclipped_fraction"] = accepted ? static_cast<double>(unclipped_) / accepted : 0.0;
  if (o_.adaptive_clipping) {
    const double b = (unclipped_ + o_.count_noise * noise_->Normal()) / m;
    clip_ *= std::exp(-o_.clip_lr * (b - o_.target_quantile));
  }
  return r;
}

StrategyState DpStrategy::SaveState() const {
  StrategyState s = inner_->SaveState();
  nlohmann::json j;
  j["inner"] = s.text;
  j["clip"] = absl::StrFormat("%.17g", clip_);
  j["releases"] = nlohmann::json::array();
  for (const privacy::Release& r : ledger_.releases())
    j["releases"].push_back({{"label", r.label}, {"q", absl::StrFormat("%.17g", r.q)}, {"sigma", absl::StrFormat("%.17g", r.sigma)}, {"steps", r.steps}});
  s.text = j.dump();
  return s;
}

absl::Status DpStrategy::LoadState(const StrategyState& state) try {
  const nlohmann::json j = nlohmann::json::parse(state.text);
  FT_RETURN_IF_ERROR(inner_->LoadState({state.tensors, j.at("inner").get<std::string>()}));
  clip_ = std::stod(j.at("clip").get<std::string>());
  ledger_ = privacy::PrivacyLedger(o_.epsilon_budget, o_.delta);
  for (const auto& r : j.at("releases"))
    FT_RETURN_IF_ERROR(ledger_.Record({r.at("label").get<std::string>(), std::stod(r.at("q").get<std::string>()),
                                       std::stod(r.at("sigma").get<std::string>()), r.at("steps").get<int64_t>()}));
  return absl::OkStatus();
} catch (const std::exception& e) {
  return absl::DataLossError(absl::StrCat("dp strategy state: ", e.what()));
}

}  // namespace fedtune::aggregation

#include "aggregation/dp_strategy.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace fedtune::aggregation {
namespace {

class DpAggregation : public Aggregation {
 public:
  using FisherSums = DpStrategy::FisherSums;
  DpAggregation(std::unique_ptr<Aggregation> inner, const TensorMap& global, double clip, int* unclipped, const DpOptions& o, FisherSums* fisher)
      : inner_(std::move(inner)), global_(global), clip_(clip), unclipped_(unclipped), o_(o), fisher_(fisher) {}
  absl::Status Add(ClientUpdate u) override {
    FT_RETURN_IF_ERROR(ValidateUpdate(u, global_));
    const double norm = ClipToNorm(u.delta, clip_);
    if (o_.private_fisher_clip > 0) return AddWithFisher(std::move(u), norm);
    u.num_examples = 1;  // equal weights: the sensitivity of the sum is S
    u.fisher.clear();
    FT_RETURN_IF_ERROR(inner_->Add(std::move(u)));
    if (norm <= clip_) ++*unclipped_;
    return absl::OkStatus();
  }
  // The clients clipped (and, for distributed DP, noised) before masking; equal weights.
  absl::Status AddSecureSum(const TensorMap& weighted_sum, double total_weight, int count, int64_t num_examples,
                            const TensorMap* value_weight) override {
    if (std::fabs(total_weight - count) > 1e-9) return absl::InvalidArgumentError("dp: secure sums must use equal client weights");
    // (Commit's noisy sum assumes every contributor trained every value of a tensor.)
    if (value_weight != nullptr) return absl::FailedPreconditionError("dp: not with per-worker shares under secure aggregation");
    return inner_->AddSecureSum(weighted_sum, total_weight, count, num_examples);
  }
  absl::StatusOr<Merged> Merge() override {
    if (o_.private_fisher_clip <= 0) return inner_->Merge();
    Merged m;  // the sums stay in the strategy until Commit noises them
    m.accepted = fisher_->count;
    m.num_examples = fisher_->examples;
    return m;
  }

 private:
  // Per tensor: a = mean(min(F, clip)) / clip + lambda / clip in [lambda', 1 + lambda'].
  absl::Status AddWithFisher(ClientUpdate u, double norm) {
    const double fclip = o_.private_fisher_clip, lam = o_.fisher_lambda / fclip;
    for (const auto& [name, d] : u.delta)
      if (!u.fisher.count(name)) return absl::InvalidArgumentError(absl::StrCat("dp with private Fisher: no Fisher for ", name));
    for (const auto& [name, d] : u.delta) {
      const std::vector<float>& f = u.fisher.at(name);
      double mean = 0;
      for (float x : f) mean += std::min<double>(x, fclip);
      const double a = mean / static_cast<double>(std::max<size_t>(f.size(), 1)) / fclip + lam;
      std::vector<double>& num = fisher_->num[name];
      if (num.empty()) num.assign(d.size(), 0.0);
      for (size_t i = 0; i < d.size(); ++i) num[i] += a * d[i];
      fisher_->den[name] += a;
    }
    ++fisher_->count;
    fisher_->examples += u.num_examples;
    if (norm <= clip_) ++*unclipped_;
    return absl::OkStatus();
  }
  std::unique_ptr<Aggregation> inner_;
  const TensorMap& global_;
  double clip_;
  int* unclipped_;
  const DpOptions& o_;
  FisherSums* fisher_;
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
  if (o.private_fisher_clip > 0 && (o.adaptive_clipping || o.noise_added_by_clients))
    return absl::InvalidArgumentError("dp: the private Fisher is not combined with adaptive clipping or secure aggregation");
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
  auto dp = std::unique_ptr<DpStrategy>(new DpStrategy(std::move(inner), opt, std::move(noise), z_update));
  if (!o.seed) {
    FT_ASSIGN_OR_RETURN(dp->sampler_, privacy::NoiseSource::Create());
  }
  return dp;
}

std::vector<ClientTask> DpStrategy::ConfigureTrain(int round, const std::vector<std::string>& available, Rng& rng) {
  if (!private_selection()) return inner_->ConfigureTrain(round, available, rng);
  if (o_.seed) {  // tests: a reproducible stream per selection, apart from the noise's
    privacy::NoiseSource::Seed s = *o_.seed;
    s[27] ^= 0x5a;
    for (int i = 0; i < 4; ++i) s[20 + i] ^= static_cast<uint8_t>(static_cast<uint32_t>(draws_) >> (8 * i));
    auto src = privacy::NoiseSource::FromSeed(s);
    if (src.ok()) sampler_ = std::move(*src);
  }
  ++draws_;
  if (!sampler_) return {};
  const double q = sampling_rate();
  std::vector<std::string> chosen;
  for (const std::string& c : available)
    if (sampler_->Uniform() < q) chosen.push_back(c);
  return inner_->TasksFor(round, std::move(chosen));
}

DpStrategy::DpStrategy(std::unique_ptr<Strategy> inner, const DpOptions& o, std::unique_ptr<privacy::NoiseSource> noise, double z_update)
    : inner_(std::move(inner)), o_(o), noise_(std::move(noise)), ledger_(o.epsilon_budget, o.delta), clip_(o.clip_norm), z_update_(z_update) {}

std::unique_ptr<Aggregation> DpStrategy::BeginAggregate(int round, const TensorMap& global) {
  unclipped_ = 0;
  fisher_ = FisherSums();
  return std::make_unique<DpAggregation>(inner_->BeginAggregate(round, global), global, clip_, &unclipped_, o_, &fisher_);
}

absl::StatusOr<RoundResult> DpStrategy::Commit(int round, const TensorMap& global, Merged merged, const std::vector<ClientFailure>& failures) {
  const double m = o_.expected_clients;
  const double q = accounted_rate();
  // Account first: a refused release publishes nothing.
  const int accepted = merged.accepted;
  // Distributed noise: only the clients that made it into the sum contributed their share.
  const double share = o_.noise_share_clients > 0 ? o_.noise_share_clients : m;
  const double z_round = o_.noise_added_by_clients ? o_.noise_multiplier * std::sqrt(std::min(1.0, accepted / share)) : o_.noise_multiplier;
  // Distributed noise and nobody in the sum: nothing that depends on data is released (the
  // adapter moves only by the server optimizer's state), so there is nothing to account.
  if (!(o_.noise_added_by_clients && accepted == 0)) FT_RETURN_IF_ERROR(ledger_.Record({absl::StrCat("round ", round), q, z_round, 1}));
  if (o_.seed) {
    privacy::NoiseSource::Seed s = *o_.seed;
    for (int i = 0; i < 4; ++i) s[28 + i] ^= static_cast<uint8_t>(static_cast<uint32_t>(round) >> (8 * i));
    FT_ASSIGN_OR_RETURN(noise_, privacy::NoiseSource::FromSeed(s));
  }
  const double stddev = z_update_ * clip_;
  if (o_.private_fisher_clip > 0) {
    // Private Fisher: noise both sums (the denominator's sensitivity scaled to the numerator's,
    // so the pair is one Gaussian release at z), then divide; absent tensors have zero sums.
    const double lam = o_.fisher_lambda / o_.private_fisher_clip;
    const double t = static_cast<double>(global.size());
    const double s_num = std::sqrt(2.0) * (1 + lam) * clip_, s_den = std::sqrt(2.0) * (1 + lam) * std::sqrt(t);
    merged.delta.clear();
    double den_min = 1e300;
    int floored = 0;
    for (const auto& [name, g] : global) {
      std::vector<double>& num = fisher_.num[name];
      if (num.empty()) num.assign(g.size(), 0.0);
      std::vector<float> d(g.size());
      for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<float>(num[i]);
      noise_->AddGaussian(d, z_update_ * s_num);
      double den = fisher_.den[name] + z_update_ * s_den * noise_->Normal();
      den_min = std::min(den_min, den);
      if (den < m * lam) {
        den = m * lam;
        ++floored;
      }
      for (float& x : d) x = static_cast<float>(x / den);
      merged.delta[name] = std::move(d);
      merged.contributors[name] = std::max(accepted, 1);
    }
    merged.accepted = std::max(accepted, 1);
    merged.metrics["dp_fisher_den_min"] = den_min;
    merged.metrics["dp_fisher_floored_tensors"] = floored;
    FT_ASSIGN_OR_RETURN(RoundResult r, inner_->Commit(round, global, std::move(merged), failures));
    FT_ASSIGN_OR_RETURN(privacy::Epsilon spent, ledger_.Spent());
    r.metrics["accepted"] = accepted;
    r.metrics["epsilon"] = spent.epsilon;
    r.metrics["dp_clip_norm"] = clip_;
    r.metrics["dp_noise_stddev"] = z_update_ * s_num;
    r.metrics.erase("num_examples");  // the clients' own counts: not released under DP
    return r;
  }
  // Sum = mean * contributors, plus noise on every coordinate of every tensor (absent tensors
  // have a zero sum: whether anyone trained them must not show either).
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
  r.metrics.erase("num_examples");  // the clients' own counts: not released under DP
  // The fraction of unclipped updates depends on the clients' data: published only in its
  // privatised form (adaptive clipping's noisy count, which the accounting covers).
  if (o_.adaptive_clipping) {
    const double b = (unclipped_ + o_.count_noise * noise_->Normal()) / m;
    r.metrics["dp_unclipped_fraction"] = std::clamp(b, 0.0, 1.0);
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

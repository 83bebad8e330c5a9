#include "worker/secure_client.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "aggregation/hetero_rank.h"
#include "protocol/secagg_wire.h"

namespace fedtune::worker {

absl::StatusOr<std::unique_ptr<SecureClient>> SecureClient::Create(const protocol::TrainTask& task, const aggregation::TensorMap& layout) {
  std::unique_ptr<SecureClient> c(new SecureClient());
  size_t n = 0;
  for (const auto& [name, v] : layout) n += v.size();
  FT_ASSIGN_OR_RETURN(privacy::secagg::Config cfg, protocol::SecAggConfig(task.secagg, protocol::SecAggVectorLength(task.secagg, n)));
  c->scale_ = protocol::SecAggScale(cfg, task.secagg.value_range);
  c->clip_ = cfg.clip_range;
  c->threshold_ = privacy::secagg::EffectiveThreshold(cfg);
  FT_ASSIGN_OR_RETURN(c->client_, privacy::secagg::Client::Create(cfg, task.secagg.id));
  if (task.test_noise_seed != 0) {  // tests only: reproducible streams per (seed, round, id, purpose)
    auto seeded = [&](uint8_t purpose) {
      privacy::NoiseSource::Seed s{};
      for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<uint8_t>(task.test_noise_seed >> (8 * i));
      for (int i = 0; i < 4; ++i) s[static_cast<size_t>(8 + i)] = static_cast<uint8_t>(static_cast<uint32_t>(task.round) >> (8 * i));
      for (int i = 0; i < 4; ++i) s[static_cast<size_t>(12 + i)] = static_cast<uint8_t>(static_cast<uint32_t>(task.secagg.id) >> (8 * i));
      s[16] = purpose;
      return privacy::NoiseSource::FromSeed(s);
    };
    FT_ASSIGN_OR_RETURN(c->rounding_, seeded(1));
    FT_ASSIGN_OR_RETURN(c->noise_, seeded(2));
  } else {
    FT_ASSIGN_OR_RETURN(c->rounding_, privacy::NoiseSource::Create());
    FT_ASSIGN_OR_RETURN(c->noise_, privacy::NoiseSource::Create());
  }
  c->task_ = task;
  for (const auto& [name, v] : layout) c->layout_[name].resize(v.size());
  return c;
}

absl::StatusOr<privacy::secagg::UnmaskReply> SecureClient::Unmask(const std::vector<int>& dropped, const std::vector<int>& survivors) {
  if (!task_.secagg.shares.empty())
    FT_RETURN_IF_ERROR(protocol::CheckShareCounts(task_.secagg.shares, survivors, layout_, protocol::FullShare(task_.plan), threshold_));
  return client_->Unmask(dropped, survivors);
}

float SecureClient::Scaled(double x) {
  const float y = static_cast<float>(x * scale_);
  if (std::fabs(y) > clip_) ++clamped_;
  return y;
}

absl::StatusOr<std::vector<uint32_t>> SecureClient::Mask(const aggregation::ClientUpdate& update,
                                                          const std::vector<privacy::secagg::EncryptedShare>& received) {
  aggregation::ClientUpdate u = update;
  // Per-worker shares: the update is padded to the whole adapter (one layout for every masked
  // vector) and holds nothing outside this worker's share, whose values the server divides by
  // the weight of the survivors that train them (a value sent outside it would be scaled up).
  aggregation::TensorMap coverage;
  if (!task_.secagg.shares.empty()) {
    const protocol::SecureShare mine = protocol::ShareOf(task_.plan, task_.round);
    const size_t id = static_cast<size_t>(task_.secagg.id);
    if (id >= task_.secagg.shares.size() || !(task_.secagg.shares[id] == mine))
      return absl::FailedPreconditionError("secure aggregation: the round's list of shares does not hold this worker's plan");
    const int full = protocol::FullShare(task_.plan);
    if (protocol::TrainsPart(task_.plan))
      FT_RETURN_IF_ERROR(aggregation::ExpandRank(&u, layout_, full, task_.plan.train_rank, /*coverage=*/false, mine.first));
    FT_ASSIGN_OR_RETURN(coverage, protocol::ShareCoverage(mine, layout_, full));
    for (auto& [name, d] : u.delta) {
      const auto c = coverage.find(name);
      if (c == coverage.end() || c->second.size() != d.size()) continue;  // ValidateUpdate names it
      for (size_t i = 0; i < d.size(); ++i) d[i] *= c->second[i];
    }
  }
  FT_RETURN_IF_ERROR(aggregation::ValidateUpdate(u, layout_));
  double w = task_.secagg.weight_divisor > 0 ? static_cast<double>(u.num_examples) / task_.secagg.weight_divisor : 1.0;
  if (task_.dp_clip_norm > 0) {  // distributed DP: equal weights, clip, this client's share of the noise
    w = 1.0;
    aggregation::ClipToNorm(u.delta, task_.dp_clip_norm);
    for (auto& [name, d] : u.delta) noise_->AddGaussian(d, task_.dp_noise_stddev);
  }
  std::vector<float> flat;
  const double fclip = task_.secagg.fisher_clip;
  if (fclip <= 0) {
    for (const auto& [name, v] : layout_) {
      auto d = u.delta.find(name);
      for (size_t i = 0; i < v.size(); ++i) flat.push_back(Scaled(d == u.delta.end() ? 0.0 : d->second[i] * w));
    }
  } else {
    // Uncertainty-aware merging: per value a = w (min(F, clip) + lambda) / clip, sent as
    // [a x delta ..., a x value_range / vmax ...]; the server divides the two sums.
    const double vmax = protocol::SecAggFisherMax(task_.secagg), lambda = task_.secagg.fisher_lambda;
    std::vector<float> weights;
    for (const auto& [name, v] : layout_) {
      auto d = u.delta.find(name);
      auto f = u.fisher.find(name);
      if (d != u.delta.end() && f == u.fisher.end())
        return absl::FailedPreconditionError(absl::StrCat("secure uncertainty-aware merging: no Fisher for ", name));
      const auto cov = coverage.find(name);
      for (size_t i = 0; i < v.size(); ++i) {
        const bool mine = d != u.delta.end() && (cov == coverage.end() || cov->second[i] > 0);
        const double a = !mine ? 0.0 : w * (std::min<double>(f->second[i], fclip) + lambda) / fclip;
        flat.push_back(Scaled(!mine ? 0.0 : a * d->second[i]));
        weights.push_back(Scaled(a * task_.secagg.value_range / vmax));
      }
    }
    flat.insert(flat.end(), weights.begin(), weights.end());
  }
  return client_->MaskedInput(flat, received, *rounding_);
}

}  // namespace fedtune::worker

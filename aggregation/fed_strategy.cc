#include "aggregation/fed_strategy.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace fedtune::aggregation {
namespace {

// Streaming weighted mean and uncertainty-aware (precision-weighted) mean, accumulated in
// double. Memory: a constant number of tensors per global tensor, whatever the number of
// updates. Uncertainty-aware fallback: a tensor for which some accepted update carried no
// Fisher is merged by the plain weighted mean (recorded in metrics as "fisher_fallback").
class LinearAggregation : public Aggregation {
 public:
  LinearAggregation(const StrategyOptions& o, const TensorMap& global, double bound, std::vector<double>* norms)
      : o_(o), global_(global), bound_(bound), norms_(norms) {}

  absl::Status Add(ClientUpdate u) override {
    FT_RETURN_IF_ERROR(ValidateUpdate(u, global_));
    if (!seen_.insert(u.client).second) return absl::AlreadyExistsError(absl::StrCat("second update from '", u.client, "' in this round"));
    norms_->push_back(bound_ > 0 ? ClipToNorm(u.delta, bound_) : L2Norm(u.delta));
    const int64_t examples = o_.max_client_examples > 0 ? std::min(u.num_examples, o_.max_client_examples) : u.num_examples;
    const double n = o_.weight_by_examples ? static_cast<double>(examples) : 1.0;
    const bool ua = o_.merge == MergeRule::kUncertainty;
    for (auto& [name, d] : u.delta) {
      Acc& a = acc_[name];
      if (a.sum.empty()) a.sum.assign(d.size(), 0.0);
      // Per-worker ranks (nested rule): a value is averaged over the clients that trained it.
      const auto cov_it = u.coverage.find(name);
      const std::vector<float>* cov = cov_it == u.coverage.end() ? nullptr : &cov_it->second;
      if (cov && cov->size() != d.size()) return absl::InvalidArgumentError(absl::StrCat("coverage of ", name, " does not match its delta"));
      if (cov && a.value_weight.empty()) a.value_weight.assign(d.size(), a.weight);
      for (size_t i = 0; i < d.size(); ++i) a.sum[i] += n * d[i];
      if (!a.value_weight.empty())
        for (size_t i = 0; i < d.size(); ++i) a.value_weight[i] += cov ? n * (*cov)[i] : n;
      a.weight += n;
      ++a.count;
      if (!ua) continue;
      auto f = u.fisher.find(name);
      if (f == u.fisher.end()) {
        a.missing_fisher = true;
        continue;
      }
      if (a.num.empty()) {
        a.num.assign(d.size(), 0.0);
        a.den.assign(d.size(), 0.0);
      }
      for (size_t i = 0; i < d.size(); ++i) {
        const double fi = o_.fisher_clip > 0 ? std::min<double>(f->second[i], o_.fisher_clip) : f->second[i];
        const double w = n * (cov ? (*cov)[i] : 1.0) * (fi + o_.uncertainty_lambda);
        a.num[i] += w * d[i];
        a.den[i] += w;
      }
    }
    ++merged_.accepted;
    merged_.num_examples += u.num_examples;
    return absl::OkStatus();
  }

  absl::Status AddSecureSum(const TensorMap& weighted_sum, double total_weight, int count, int64_t num_examples,
                            const TensorMap* value_weight) override {
    if (!(total_weight > 0) || count < 1) return absl::InvalidArgumentError("secure sum: total_weight and count must be > 0");
    for (const auto& [name, v] : weighted_sum) {
      auto it = global_.find(name);
      if (it == global_.end() || it->second.size() != v.size()) return absl::InvalidArgumentError(absl::StrCat("secure sum: bad tensor ", name));
      for (float x : v)
        if (!std::isfinite(x)) return absl::InvalidArgumentError(absl::StrCat("secure sum: non-finite value in ", name));
      if (value_weight == nullptr) continue;
      if (auto w = value_weight->find(name); w != value_weight->end()) {
        if (w->second.size() != v.size()) return absl::InvalidArgumentError(absl::StrCat("secure sum: value weights of ", name, " do not match it"));
        for (float x : w->second)
          if (!(x >= 0) || !std::isfinite(x)) return absl::InvalidArgumentError(absl::StrCat("secure sum: bad value weight in ", name));
      }
    }
    for (const auto& [name, v] : weighted_sum) {
      const auto w = value_weight == nullptr ? nullptr : (value_weight->count(name) ? &value_weight->at(name) : nullptr);
      // A tensor nobody in the sum trained (a module outside every survivor's share) is left out,
      // as the plain path leaves out tensors no update holds (server momentum does not move it).
      if (w != nullptr && std::all_of(w->begin(), w->end(), [](float x) { return x == 0.0f; })) continue;
      Acc& a = acc_[name];
      if (a.sum.empty()) a.sum.assign(v.size(), 0.0);
      for (size_t i = 0; i < v.size(); ++i) a.sum[i] += v[i];
      if (w != nullptr && a.value_weight.empty()) a.value_weight.assign(v.size(), a.weight);
      if (!a.value_weight.empty())
        for (size_t i = 0; i < v.size(); ++i) a.value_weight[i] += w != nullptr ? (*w)[i] : total_weight;
      a.weight += total_weight;
      a.count += count;
      a.missing_fisher = true;
    }
    merged_.accepted += count;
    merged_.num_examples += num_examples;
    return absl::OkStatus();
  }

  absl::Status AddSecureFisherSums(const TensorMap& num, const TensorMap& den, int count, int64_t num_examples) override {
    if (o_.merge != MergeRule::kUncertainty) return Aggregation::AddSecureFisherSums(num, den, count, num_examples);
    if (count < 1) return absl::InvalidArgumentError("secure Fisher sums: count must be > 0");
    for (const auto& [name, v] : num) {
      auto it = global_.find(name);
      auto d = den.find(name);
      if (it == global_.end() || it->second.size() != v.size() || d == den.end() || d->second.size() != v.size())
        return absl::InvalidArgumentError(absl::StrCat("secure Fisher sums: bad tensor ", name));
      for (size_t i = 0; i < v.size(); ++i)
        // (A zero weight: nobody trained the value, per-worker shares; its sum is zero too.)
        if (!std::isfinite(v[i]) || !(d->second[i] >= 0) || !std::isfinite(d->second[i]) || (d->second[i] == 0 && v[i] != 0))
          return absl::InvalidArgumentError(absl::StrCat("secure Fisher sums: bad value in ", name));
    }
    for (const auto& [name, v] : num) {
      const std::vector<float>& dv = den.at(name);
      Acc& a = acc_[name];
      if (a.num.empty()) {
        a.num.assign(v.size(), 0.0);
        a.den.assign(v.size(), 0.0);
        a.sum.assign(v.size(), 0.0);
      }
      for (size_t i = 0; i < v.size(); ++i) {
        a.num[i] += v[i];
        a.den[i] += dv[i];
        a.sum[i] += v[i];  // (the mean fallback is unused: every client contributed both sums)
      }
      a.weight += count;
      a.count += count;
    }
    merged_.accepted += count;
    merged_.num_examples += num_examples;
    return absl::OkStatus();
  }

  absl::StatusOr<Merged> Merge() override {
    int fallback = 0;
    for (auto& [name, a] : acc_) {
      std::vector<float>& out = merged_.delta[name];
      out.resize(a.sum.size());
      const bool precision = o_.merge == MergeRule::kUncertainty && !a.missing_fisher && !a.num.empty();
      if (o_.merge == MergeRule::kUncertainty && !precision) ++fallback;
      for (size_t i = 0; i < out.size(); ++i) {
        const double w = a.value_weight.empty() ? a.weight : a.value_weight[i];  // (0: nobody trained the value)
        out[i] = static_cast<float>(precision ? (a.den[i] > 0 ? a.num[i] / a.den[i] : 0.0) : (w > 0 ? a.sum[i] / w : 0.0));
      }
      merged_.contributors[name] = a.count;
    }
    if (o_.merge == MergeRule::kUncertainty) merged_.metrics["fisher_fallback_tensors"] = fallback;
    acc_.clear();
    return std::move(merged_);
  }

 private:
  struct Acc {
    std::vector<double> sum, num, den;
    std::vector<double> value_weight;  // per value, once an update with coverage came (nested ranks)
    double weight = 0;
    int count = 0;
    bool missing_fisher = false;
  };
  const StrategyOptions o_;
  const TensorMap& global_;  // owned by the caller for the round
  const double bound_;           // this round's norm bound (0: none)
  std::vector<double>* norms_;  // the strategy's record of accepted norms
  std::map<std::string, Acc> acc_;
  std::set<std::string> seen_;
  Merged merged_;
};

// Robust rules need every update at once: they are buffered.
class RobustAggregation : public Aggregation {
 public:
  RobustAggregation(const StrategyOptions& o, const TensorMap& global, double bound, std::vector<double>* norms)
      : o_(o), global_(global), bound_(bound), norms_(norms) {}

  absl::Status Add(ClientUpdate u) override {
    FT_RETURN_IF_ERROR(ValidateUpdate(u, global_));
    for (const ClientUpdate& p : updates_)
      if (p.client == u.client) return absl::AlreadyExistsError(absl::StrCat("second update from '", u.client, "' in this round"));
    norms_->push_back(bound_ > 0 ? ClipToNorm(u.delta, bound_) : L2Norm(u.delta));
    u.fisher.clear();
    updates_.push_back(std::move(u));
    return absl::OkStatus();
  }

  absl::StatusOr<Merged> Merge() override {
    Merged m;
    m.accepted = static_cast<int>(updates_.size());
    for (const ClientUpdate& u : updates_) m.num_examples += u.num_examples;
    if (updates_.empty()) return m;
    if (o_.merge == MergeRule::kKrum) return Krum(std::move(m));
    std::set<std::string> names;
    for (const ClientUpdate& u : updates_)
      for (const auto& [name, d] : u.delta) names.insert(name);
    std::vector<float> col;
    for (const std::string& name : names) {
      std::vector<const std::vector<float>*> vs;
      for (const ClientUpdate& u : updates_)
        if (auto it = u.delta.find(name); it != u.delta.end()) vs.push_back(&it->second);
      const size_t k = vs.size(), len = vs[0]->size();
      const size_t trim = o_.merge == MergeRule::kTrimmedMean ? std::min((k - 1) / 2, static_cast<size_t>(std::floor(o_.trim_fraction * static_cast<double>(k)))) : 0;
      std::vector<float>& out = m.delta[name];
      out.resize(len);
      col.resize(k);
      for (size_t i = 0; i < len; ++i) {
        for (size_t c = 0; c < k; ++c) col[c] = (*vs[c])[i];
        std::sort(col.begin(), col.end());
        if (o_.merge == MergeRule::kMedian) {
          out[i] = k % 2 ? col[k / 2] : 0.5f * (col[k / 2 - 1] + col[k / 2]);
        } else {
          double s = 0;
          for (size_t c = trim; c < k - trim; ++c) s += col[c];
          out[i] = static_cast<float>(s / static_cast<double>(k - 2 * trim));
        }
      }
      m.contributors[name] = static_cast<int>(k);
    }
    return m;
  }

 private:
  // Multi-Krum (Blanchard et al. 2017): score each update by the summed squared distance to its
  // k - f - 2 nearest others (missing tensors count as zero deltas), average the m best.
  absl::StatusOr<Merged> Krum(Merged m) {
    const size_t k = updates_.size();
    const int f = o_.krum_byzantine;
    const int nearest = static_cast<int>(k) - f - 2;
    if (nearest < 1)
      return absl::FailedPreconditionError(absl::StrCat("Krum with f=", f, " needs more than ", f + 2, " updates, got ", k));
    std::vector<std::vector<double>> dist(k, std::vector<double>(k, 0.0));
    for (size_t a = 0; a < k; ++a)
      for (size_t b = a + 1; b < k; ++b) {
        double s = 0;
        for (const auto& [name, g] : global_) {
          auto ia = updates_[a].delta.find(name), ib = updates_[b].delta.find(name);
          const std::vector<float>* va = ia == updates_[a].delta.end() ? nullptr : &ia->second;
          const std::vector<float>* vb = ib == updates_[b].delta.end() ? nullptr : &ib->second;
          if (!va && !vb) continue;
          for (size_t i = 0; i < g.size(); ++i) {
            const double d = (va ? (*va)[i] : 0.0f) - (vb ? (*vb)[i] : 0.0f);
            s += d * d;
          }
        }
        dist[a][b] = dist[b][a] = s;
      }
    std::vector<std::pair<double, size_t>> score;
    for (size_t a = 0; a < k; ++a) {
      std::vector<double> d;
      for (size_t b = 0; b < k; ++b)
        if (b != a) d.push_back(dist[a][b]);
      std::sort(d.begin(), d.end());
      double s = 0;
      for (int i = 0; i < nearest; ++i) s += d[static_cast<size_t>(i)];
      score.push_back({s, a});
    }
    std::sort(score.begin(), score.end());
    const size_t sel = std::clamp<size_t>(static_cast<size_t>(std::max(1, o_.krum_select)), 1, k);
    std::map<std::string, std::vector<double>> sum;
    std::map<std::string, double> weight;
    std::map<std::string, int> count;
    for (size_t s = 0; s < sel; ++s) {
      const ClientUpdate& u = updates_[score[s].second];
      const double n = o_.weight_by_examples ? static_cast<double>(u.num_examples) : 1.0;
      for (const auto& [name, d] : u.delta) {
        auto& acc = sum[name];
        acc.resize(d.size(), 0.0);
        for (size_t i = 0; i < d.size(); ++i) acc[i] += n * d[i];
        weight[name] += n;
        ++count[name];
      }
    }
    for (auto& [name, acc] : sum) {
      std::vector<float>& out = m.delta[name];
      out.resize(acc.size());
      for (size_t i = 0; i < acc.size(); ++i) out[i] = static_cast<float>(acc[i] / weight[name]);
      m.contributors[name] = count[name];
    }
    m.metrics["krum_selected"] = static_cast<double>(sel);
    return m;
  }

  const StrategyOptions o_;
  const TensorMap& global_;  // owned by the caller for the round
  const double bound_;           // this round's norm bound (0: none)
  std::vector<double>* norms_;  // the strategy's record of accepted norms
  std::vector<ClientUpdate> updates_;
};

}  // namespace

const char* MergeRuleName(MergeRule r) {
  switch (r) {
    case MergeRule::kMean: return "mean";
    case MergeRule::kUncertainty: return "uncertainty";
    case MergeRule::kMedian: return "median";
    case MergeRule::kTrimmedMean: return "trimmed_mean";
    case MergeRule::kKrum: return "krum";
  }
  return "?";
}

absl::StatusOr<MergeRule> ParseMergeRule(const std::string& s) {
  for (MergeRule r : {MergeRule::kMean, MergeRule::kUncertainty, MergeRule::kMedian, MergeRule::kTrimmedMean, MergeRule::kKrum})
    if (s == MergeRuleName(r)) return r;
  return absl::InvalidArgumentError(absl::StrCat("unknown merge rule '", s, "' (mean, uncertainty, median, trimmed_mean, krum)"));
}

const char* ServerOptimizerName(ServerOptimizer o) {
  switch (o) {
    case ServerOptimizer::kFedAvg: return "fedavg";
    case ServerOptimizer::kFedAvgM: return "fedavgm";
    case ServerOptimizer::kFedAdam: return "fedadam";
    case ServerOptimizer::kFedYogi: return "fedyogi";
    case ServerOptimizer::kFedAdagrad: return "fedadagrad";
  }
  return "?";
}

absl::StatusOr<ServerOptimizer> ParseServerOptimizer(const std::string& s) {
  for (ServerOptimizer o : {ServerOptimizer::kFedAvg, ServerOptimizer::kFedAvgM, ServerOptimizer::kFedAdam, ServerOptimizer::kFedYogi,
                            ServerOptimizer::kFedAdagrad})
    if (s == ServerOptimizerName(o)) return o;
  return absl::InvalidArgumentError(absl::StrCat("unknown server optimizer '", s, "' (fedavg, fedavgm, fedadam, fedyogi, fedadagrad)"));
}

std::vector<std::string> SampleClients(const std::vector<std::string>& available, int k, Rng& rng) {
  std::vector<std::string> v = available;
  const size_t n = k <= 0 ? v.size() : std::min(v.size(), static_cast<size_t>(k));
  for (size_t i = 0; i < n; ++i) std::swap(v[i], v[i + rng.Below(v.size() - i)]);
  v.resize(n);
  return v;
}

absl::StatusOr<std::unique_ptr<FedStrategy>> FedStrategy::Create(const StrategyOptions& o) {
  if (!(o.server_lr > 0)) return absl::InvalidArgumentError("strategy: server_lr must be > 0");
  if (!(o.trim_fraction >= 0 && o.trim_fraction < 0.5)) return absl::InvalidArgumentError("strategy: trim_fraction must be in [0, 0.5)");
  if (o.krum_byzantine < 0) return absl::InvalidArgumentError("strategy: krum_byzantine must be >= 0");
  if (!(o.uncertainty_lambda > 0)) return absl::InvalidArgumentError("strategy: uncertainty_lambda must be > 0");
  if (o.min_clients < 0 || o.clients_per_round < 0) return absl::InvalidArgumentError("strategy: client counts must be >= 0");
  if (!(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1 && o.momentum >= 0 && o.momentum < 1 && o.tau > 0))
    return absl::InvalidArgumentError("strategy: need 0 <= beta1, beta2, momentum < 1 and tau > 0");
  return std::unique_ptr<FedStrategy>(new FedStrategy(o));
}

std::string FedStrategy::Name() const {
  std::string n = absl::StrCat(ServerOptimizerName(o_.server), "+", MergeRuleName(o_.merge));
  if (o_.norm_bound > 0) absl::StrAppend(&n, "+normbound");
  if (o_.norm_bound <= 0 && o_.auto_norm_factor > 0) absl::StrAppend(&n, absl::StrFormat("+normbound(%gx median)", o_.auto_norm_factor));
  if (o_.proximal_mu > 0) absl::StrAppend(&n, "+prox");
  return n;
}

std::vector<ClientTask> FedStrategy::ConfigureTrain(int round, const std::vector<std::string>& available, Rng& rng) {
  return TasksFor(round, SampleClients(available, o_.clients_per_round, rng));
}

std::vector<ClientTask> FedStrategy::TasksFor(int, std::vector<std::string> selected) {
  std::vector<ClientTask> tasks;
  for (std::string& c : selected) {
    ClientTask t{std::move(c), {}};
    if (o_.proximal_mu > 0) t.config["proximal_mu"] = o_.proximal_mu;
    tasks.push_back(std::move(t));
  }
  return tasks;
}

std::vector<ClientTask> FedStrategy::ConfigureEvaluate(int, const std::vector<std::string>& available, Rng& rng) {
  std::vector<ClientTask> tasks;
  for (std::string& c : SampleClients(available, o_.eval_clients, rng)) tasks.push_back({std::move(c), {}});
  return tasks;
}

double FedStrategy::norm_bound() const {
  if (o_.norm_bound > 0) return o_.norm_bound;
  return o_.auto_norm_factor > 0 ? o_.auto_norm_factor * last_median_norm_ : 0.0;
}

std::unique_ptr<Aggregation> FedStrategy::BeginAggregate(int, const TensorMap& global) {
  round_norms_.clear();
  if (linear()) return std::make_unique<LinearAggregation>(o_, global, norm_bound(), &round_norms_);
  return std::make_unique<RobustAggregation>(o_, global, norm_bound(), &round_norms_);
}

absl::StatusOr<RoundResult> FedStrategy::Commit(int, const TensorMap& global, Merged merged, const std::vector<ClientFailure>& failures) {
  RoundResult r;
  r.metrics = merged.metrics;
  r.metrics["accepted"] = merged.accepted;
  r.metrics["failures"] = static_cast<double>(failures.size());
  r.metrics["num_examples"] = static_cast<double>(merged.num_examples);
  if (const double b = norm_bound(); b > 0) r.metrics["norm_bound"] = b;
  if (o_.auto_norm_factor > 0 && !round_norms_.empty()) {  // plain updates this round: the next round's automatic bound
    std::vector<double> n = round_norms_;
    std::nth_element(n.begin(), n.begin() + static_cast<std::ptrdiff_t>(n.size() / 2), n.end());
    last_median_norm_ = n[n.size() / 2];
  }
  round_norms_.clear();
  if (merged.accepted < std::max(1, o_.min_clients)) {
    r.metrics["kept_global"] = 1;
    return r;  // keep the global adapter
  }
  TensorMap next = global;
  r.metrics["update_norm"] = L2Norm(merged.delta);
  const double lr = o_.server_lr;
  for (auto& [name, d] : merged.delta) {
    std::vector<float>& g = next.at(name);
    if (o_.server == ServerOptimizer::kFedAvg) {
      for (size_t i = 0; i < g.size(); ++i) g[i] = static_cast<float>(g[i] + lr * d[i]);
      continue;
    }
    std::vector<float>& v = v_[name];
    if (o_.server == ServerOptimizer::kFedAvgM) {
      v.resize(g.size(), 0.0f);
      for (size_t i = 0; i < g.size(); ++i) {
        v[i] = static_cast<float>(o_.momentum * v[i] + d[i]);
        g[i] = static_cast<float>(g[i] + lr * v[i]);
      }
      continue;
    }
    std::vector<float>& m = m_[name];
    m.resize(g.size(), 0.0f);
    v.resize(g.size(), static_cast<float>(o_.tau * o_.tau));
    for (size_t i = 0; i < g.size(); ++i) {
      const double di = d[i], d2 = di * di;
      m[i] = static_cast<float>(o_.beta1 * m[i] + (1 - o_.beta1) * di);
      if (o_.server == ServerOptimizer::kFedAdam) {
        v[i] = static_cast<float>(o_.beta2 * v[i] + (1 - o_.beta2) * d2);
      } else if (o_.server == ServerOptimizer::kFedYogi) {
        const double sgn = (v[i] - d2) > 0 ? 1.0 : ((v[i] - d2) < 0 ? -1.0 : 0.0);
        v[i] = static_cast<float>(v[i] - (1 - o_.beta2) * d2 * sgn);
      } else {  // FedAdagrad
        v[i] = static_cast<float>(v[i] + d2);
      }
      g[i] = static_cast<float>(g[i] + lr * m[i] / (std::sqrt(static_cast<double>(v[i])) + o_.tau));
    }
  }
  r.global = std::move(next);
  return r;
}

StrategyState FedStrategy::SaveState() const {
  StrategyState s;
  for (const auto& [k, x] : m_) s.tensors["m/" + k] = x;
  for (const auto& [k, x] : v_) s.tensors["v/" + k] = x;
  if (last_median_norm_ > 0) s.text = absl::StrFormat("{\"median_norm\": \"%.17g\"}", last_median_norm_);
  return s;
}

absl::Status FedStrategy::LoadState(const StrategyState& state) {
  m_.clear();
  v_.clear();
  last_median_norm_ = 0;
  if (!state.text.empty()) {
    try {
      last_median_norm_ = std::stod(nlohmann::json::parse(state.text).at("median_norm").get<std::string>());
    } catch (const std::exception& e) {
      return absl::DataLossError(absl::StrCat("strategy state: ", e.what()));
    }
  }
  for (const auto& [k, x] : state.tensors) {
    if (k.rfind("m/", 0) == 0) {
      m_[k.substr(2)] = x;
    } else if (k.rfind("v/", 0) == 0) {
      v_[k.substr(2)] = x;
    } else {
      return absl::DataLossError(absl::StrCat("strategy state: unexpected tensor ", k));
    }
  }
  return absl::OkStatus();
}

}  // namespace fedtune::aggregation

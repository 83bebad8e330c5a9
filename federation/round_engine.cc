#include "federation/round_engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "aggregation/hetero_rank.h"
#include "common/fault.h"
#include "common/mapped_file.h"
#include "common/rng.h"
#include "kernels/quant.h"
#include "model/safetensors.h"
#include "privacy/noise.h"
#include "protocol/adapter_tensors.h"
#include "privacy/secagg.h"
#include "protocol/secagg_wire.h"

namespace fedtune::federation {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using aggregation::TensorMap;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

constexpr int kMaxAttempts = 20;  // consecutive failed secure attempts of one round before giving up

class RoundCollector : public Collector {
 public:
  RoundCollector(aggregation::Aggregation& agg, int target, SecureServer* sec, double weight_divisor, bool equal_weights, int64_t max_examples,
                 bool withhold)
      : agg_(agg), target_(target), sec_(sec), weight_divisor_(weight_divisor), equal_weights_(equal_weights), max_examples_(max_examples),
        withhold_(withhold) {}

  absl::Status Add(aggregation::ClientUpdate u) override {
    auto metric = [&u](const char* k) { return u.metrics.count(k) ? u.metrics.at(k) : 0.0; };
    ClientRoundRecord rec{u.client, "ok", u.num_examples, metric("train_loss"), metric("train_seconds"), protocol::UpdateBytes(u)};
    const double eps = metric("local_epsilon");
    // Memory figures the client reports (its prediction and measured peak), for the fleet check
    // and re-planning: from accepted updates only, never under DP.
    std::map<std::string, double> memory;
    if (!withhold_)
      for (const char* k : {"predicted_peak_mib", "peak_rss_mib", "rss_start_mib", "predicted_device_mib", "peak_device_mib"})
        if (const double v = metric(k); v > 0 && std::isfinite(v)) memory[absl::StrCat(k, "/", u.client)] = v;
    const absl::Status st = sec_ ? absl::FailedPreconditionError("this round takes masked inputs only (secure aggregation)") : agg_.Add(std::move(u));
    if (st.ok()) memory_.insert(memory.begin(), memory.end());
    return Record(rec, st, eps);
  }
  absl::Status AddMasked(const std::string& client, std::vector<uint32_t> y, int64_t num_examples,
                         const std::map<std::string, double>& metrics) override {
    auto metric = [&metrics](const char* k) { return metrics.count(k) ? metrics.at(k) : 0.0; };
    ClientRoundRecord rec{client, "ok", num_examples, metric("train_loss"), metric("train_seconds"), static_cast<int64_t>(y.size() * 4)};
    absl::Status st;
    if (!sec_) {
      st = absl::FailedPreconditionError("not a secure-aggregation round");
    } else if (num_examples < 1 || (max_examples_ > 0 && num_examples > max_examples_)) {
      st = absl::InvalidArgumentError(absl::StrCat("num_examples ", num_examples, " outside [1, ", max_examples_, "]"));
    } else {
      // The weight the client applied, from its (public) example count, as the task told it.
      const double w = equal_weights_ || weight_divisor_ <= 0 ? 1.0 : static_cast<double>(num_examples) / weight_divisor_;
      st = sec_->Masked(client, std::move(y), w, num_examples);
    }
    return Record(rec, st, metric("local_epsilon"));
  }
  void Fail(const std::string& client, const absl::Status& why, const std::string& outcome) override {
    failures_.push_back({client, why});
    records_.push_back({client, outcome, 0, 0, 0, 0});
  }
  void Decline(const std::string& client, const std::string& reason, double needed_mib, double budget_mib, bool device) override {
    failures_.push_back({client, absl::ResourceExhaustedError(reason)});
    // Under DP the figures (from the client's longest example) stay out of the ledger.
    const std::string outcome = withhold_ ? "declined" : reason.rfind("declined", 0) == 0 ? reason : "declined: " + reason;
    records_.push_back({client, outcome, withhold_ ? -1 : 0, withhold_ ? -1.0 : 0.0, 0, 0});
    declines_.push_back({client, needed_mib, budget_mib, device});
  }
  int accepted() const override { return accepted_; }
  bool enough() const override { return target_ > 0 && accepted_ >= target_; }
  SecureServer* secure() override { return sec_; }

  std::vector<aggregation::ClientFailure> failures_;
  std::vector<ClientRoundRecord> records_;
  struct Declined {
    std::string client;
    double needed_mib, budget_mib;
    bool device;
  };
  std::vector<Declined> declines_;
  std::map<std::string, double> memory_;  // "<figure>/<client>" from accepted updates
  double loss_sum_ = 0, train_max_ = 0, local_epsilon_ = 0;

 private:
  absl::Status Record(ClientRoundRecord rec, const absl::Status& st, double eps) {
    if (withhold_) {  // under DP: no per-client figure that depends on a client's data is kept
      rec.num_examples = -1;
      rec.train_loss = -1;
    }
    if (!st.ok()) {
      rec.status = absl::StrCat("rejected: ", st.message());
      failures_.push_back({rec.client, st});
    } else {
      ++accepted_;
      loss_sum_ += rec.train_loss;
      train_max_ = std::max(train_max_, rec.train_seconds);
      local_epsilon_ = std::max(local_epsilon_, eps);
    }
    records_.push_back(rec);
    return st;
  }
  aggregation::Aggregation& agg_;
  const int target_;
  SecureServer* sec_;
  const double weight_divisor_;
  const bool equal_weights_;
  const int64_t max_examples_;
  const bool withhold_;
  int accepted_ = 0;
};

}  // namespace

std::string StatePath(const std::string& state_dir, int round) { return absl::StrCat(state_dir, "/state-", round, ".safetensors"); }

namespace {

absl::Status LoadState(const std::string& state_dir, int round, TensorMap* global, aggregation::StrategyState* strategy) {
  const std::string path = StatePath(state_dir, round);
  FT_ASSIGN_OR_RETURN(auto file, model::SafetensorsFile::Open(path));
  const auto& md = file->metadata();
  int r = 0;
  auto it = md.find("fedtune.round");
  if (it == md.end() || !absl::SimpleAtoi(it->second, &r) || r != round)
    return absl::DataLossError(absl::StrCat(path, ": holds no state of round ", round));
  global->clear();
  for (const model::SafeTensor& st : file->tensors()) {
    FT_ASSIGN_OR_RETURN(Tensor x, file->ToF32(st.name));
    std::vector<float> v(x.data<float>(), x.data<float>() + x.size());
    if (st.name.rfind("global.", 0) == 0) {
      (*global)[st.name.substr(7)] = std::move(v);
    } else if (st.name.rfind("server.", 0) == 0) {
      if (strategy) strategy->tensors[st.name.substr(7)] = std::move(v);
    } else {
      return absl::DataLossError(absl::StrCat(path, ": unexpected tensor ", st.name));
    }
  }
  if (strategy) {
    auto t = md.find("fedtune.strategy");
    strategy->text = t == md.end() ? "" : t->second;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LoadCommittedAdapter(const std::string& state_dir, int round, TensorMap* global) {
  return LoadState(state_dir, round, global, nullptr);
}

RoundEngine::~RoundEngine() = default;

absl::StatusOr<std::unique_ptr<RoundEngine>> RoundEngine::Open(EngineOptions o, TensorMap initial_global) {
  std::unique_ptr<RoundEngine> e(new RoundEngine());
  if (o.state_dir.empty()) return absl::InvalidArgumentError("state_dir is required");
  // Under secure aggregation with central DP every worker trains the whole adapter (settings.cc
  // says why), whoever set up the planning.
  if (o.planning && o.settings.secure.enabled && o.settings.dp.central) o.planning->options.whole_adapter = true;
  std::error_code ec;
  fs::create_directories(o.state_dir, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot create ", o.state_dir, ": ", ec.message()));
  FT_ASSIGN_OR_RETURN(e->strategy_, MakeStrategy(o.settings, &e->strategy_summary_));
  // Closing a round after the first K updates would sum "the K fastest of the sample", not the
  // Poisson sample the accountant assumes (one client's presence could push another out).
  if (e->strategy_->private_selection() && o.target_updates > 0)
    return absl::InvalidArgumentError("target_updates (over-selection) cannot be combined with Poisson client sampling under DP (dp.sampling: fixed can)");
  FT_ASSIGN_OR_RETURN(e->ledger_, RunLedger::Open(o.state_dir + "/ledger.sqlite"));
  FT_ASSIGN_OR_RETURN(e->committed_, e->ledger_->LastRound());
  e->global_ = std::move(initial_global);
  if (e->committed_ > 0) {  // resume exactly after the last committed round
    if (!fs::exists(StatePath(o.state_dir, e->committed_)) && fs::exists(absl::StrCat(o.state_dir, "/global-", e->committed_, ".safetensors")))
      return absl::FailedPreconditionError(absl::StrCat(o.state_dir, " holds a run of an older fedtune (global-<round>.safetensors, no server state): "
                                                        "finish it with that version or start a new state_dir"));
    aggregation::StrategyState st;
    TensorMap global;
    FT_RETURN_IF_ERROR(LoadState(o.state_dir, e->committed_, &global, &st));
    if (global.size() != e->global_.size()) return absl::DataLossError(absl::StrCat(StatePath(o.state_dir, e->committed_), ": adapter layout differs from the config's"));
    for (const auto& [name, v] : global) {
      auto g = e->global_.find(name);
      if (g == e->global_.end() || g->second.size() != v.size())
        return absl::DataLossError(absl::StrCat(StatePath(o.state_dir, e->committed_), ": tensor ", name, " does not match the config's adapter"));
    }
    e->global_ = std::move(global);
    FT_RETURN_IF_ERROR(e->strategy_->LoadState(st));
  } else {
    FT_RETURN_IF_ERROR(e->ledger_->SetRunInfo("strategy", e->strategy_summary_));
  }
  if (o.planning) e->importance_ = o.planning->importance;
  e->o_ = std::move(o);
  return e;
}

absl::Status RoundEngine::Plan(int round, const std::vector<ClientInfo>& clients, Transport& t) {
  std::vector<planner::WorkerProfile> profiles;
  for (const ClientInfo& c : clients)
    if (c.profile) {
      profiles.push_back(*c.profile);
      if (auto m = memory_override_.find(c.name); m != memory_override_.end() && m->second < profiles.back().memory_mib)
        profiles.back().memory_mib = m->second;
      if (auto m = device_override_.find(c.name); m != device_override_.end() && m->second < profiles.back().device_memory_mib)
        profiles.back().device_memory_mib = m->second;
    }
  replan_ = false;
  planner::PlannerOptions options = o_.planning->options;
  if (o_.settings.secure.enabled) {
    // No planned rank component may have fewer trainers than SecAgg+'s threshold
    // (PlannerOptions::secure_threshold), the threshold of a round of the clients planned now (at
    // most expected_clients of them per round): fewer clients, a lower threshold.
    protocol::TrainTask::Secure q;
    q.clients = std::min(static_cast<int>(profiles.size()), o_.settings.expected_clients);
    q.degree = o_.settings.secure.degree;
    q.threshold = o_.settings.secure.threshold;
    q.value_range = 1;
    if (auto cfg = protocol::SecAggConfig(q, 1); cfg.ok()) options.secure_threshold = privacy::secagg::EffectiveThreshold(*cfg);
  }
  auto made = planner::MakePlan(o_.planning->shape, importance_, profiles, options);
  if (!made.ok()) {  // everyone gets the configured training
    if (o_.say) o_.say(absl::StrCat("planner: round ", round, ": ", made.status().message(), "; every client gets the configured training"));
    plans_.clear();
    return absl::OkStatus();
  }
  int changed = 0;
  for (const planner::WorkerPlan& wp : made->workers) {
    auto old = plans_.find(wp.worker);
    if (old == plans_.end() || wp.excluded != old->second.excluded || wp.c.modules != old->second.c.modules || wp.c.batch != old->second.c.batch ||
        wp.c.local_steps != old->second.c.local_steps || wp.c.base != old->second.c.base || wp.c.rank != old->second.c.rank) {
      ++changed;
      if (o_.say) o_.say(absl::StrCat("planner: round ", round, ": ", wp.worker, " ", wp.excluded ? wp.reason : wp.explanation));
    }
  }
  plans_.clear();
  for (const planner::WorkerPlan& wp : made->workers) plans_[wp.worker] = wp;
  FT_RETURN_IF_ERROR(ledger_->SetRunInfo(absl::StrCat("plan/round-", round), made->summary));
  if (o_.say) o_.say(absl::StrFormat("planner: round %d (%d clients changed): %s", round, changed, made->summary));
  plan_ = std::move(*made);
  return t.Planned(round, *plan_);
}

absl::Status RoundEngine::CommitState(int round, const RoundRecord& rec, const std::vector<ClientRoundRecord>& clients) {
  // The state file first (atomic), then the ledger row: a crash between the two leaves round r
  // uncommitted and its file unused on restart (the round is run again; its release was never
  // published, so it is not accounted either).
  model::SafetensorsWriter w;
  for (const auto& [name, v] : global_) FT_RETURN_IF_ERROR(w.AddF32("global." + name, {static_cast<int64_t>(v.size())}, v));
  const aggregation::StrategyState st = strategy_->SaveState();
  for (const auto& [name, v] : st.tensors) FT_RETURN_IF_ERROR(w.AddF32("server." + name, {static_cast<int64_t>(v.size())}, v));
  w.SetMetadata("fedtune.round", std::to_string(round));
  w.SetMetadata("fedtune.strategy", st.text);
  FT_RETURN_IF_ERROR(WriteFileAtomic(StatePath(o_.state_dir, round), w.Serialize()));
  MaybeCrash("before-ledger-commit", round);
  FT_RETURN_IF_ERROR(ledger_->CommitRound(round, rec.metrics, clients));
  committed_ = round;
  std::error_code ec;
  fs::remove(StatePath(o_.state_dir, round - 2), ec);
  return absl::OkStatus();
}

absl::Status RoundEngine::EvaluateRound(int round, Transport& t, std::map<std::string, double>& m) {
  FT_RETURN_IF_ERROR(t.Evaluate(round, global_, m));
  const std::vector<std::string> candidates = t.EvaluationClients(round);
  if (candidates.empty()) return absl::OkStatus();
  // Federated evaluation: the strategy picks who scores, the clients score on their own
  // held-out data, the strategy merges the reports (example-weighted mean): "fed_<metric>";
  // without server-side figures they are also the round's eval_loss / accuracy.
  Rng rng(o_.settings.seed * 1000003 + static_cast<uint64_t>(round) + 0xe7a1ull);
  std::vector<protocol::TrainTask> tasks;
  for (const aggregation::ClientTask& ct : strategy_->ConfigureEvaluate(round, candidates, rng)) {
    protocol::TrainTask task = TaskTemplate(o_.settings);
    task.evaluate = true;
    task.run_id = o_.run_id;
    task.round = round;
    task.client = ct.client;
    task.max_new_tokens = o_.settings.max_new_tokens;
    task.generate_examples = o_.settings.generate_examples;
    tasks.push_back(std::move(task));
  }
  FT_ASSIGN_OR_RETURN(std::vector<aggregation::EvalReport> reports, t.EvaluateOn(round, global_, tasks));
  m["fed_eval_clients"] = static_cast<double>(reports.size());
  if (reports.empty()) return absl::OkStatus();
  const bool server_side = m.count("eval_loss") > 0;
  int64_t examples = 0;
  for (const auto& r : reports) examples += r.num_examples;
  m["fed_eval_examples"] = static_cast<double>(examples);
  for (const auto& [k, v] : strategy_->AggregateEvaluate(round, reports)) {
    m["fed_" + k] = v;
    if (!server_side) m[k] = v;
  }
  return absl::OkStatus();
}

absl::StatusOr<RunSummary> RoundEngine::Run(Transport& t) {
  const RunSettings& s = o_.settings;
  auto say = [this](const std::string& line) {
    if (o_.say) o_.say(line);
  };
  RunSummary sum;
  if (committed_ == 0 && o_.evaluate_start) {
    RoundRecord r0;
    const auto t0 = Clock::now();
    t.Phase(0, "evaluate");
    FT_RETURN_IF_ERROR(EvaluateRound(0, t, r0.metrics));
    if (!r0.metrics.empty()) {
      r0.evaluated = true;
      r0.metrics["wall_seconds"] = Seconds(t0, Clock::now());
      say(absl::StrFormat("round 0: accuracy %.1f%%, eval loss %.4f", 100 * r0.metrics["accuracy"], r0.metrics["eval_loss"]));
      FT_RETURN_IF_ERROR(t.Committed(r0, global_));
      sum.rounds.push_back(r0);
    }
  }
  int attempt = 0;  // of the current round (quorum retries)
  for (int r = committed_ + 1; r <= s.rounds;) {
    const auto t_round = Clock::now();
    RoundRecord rec;
    rec.round = r;
    t.Phase(r, "waiting for clients");
    FT_ASSIGN_OR_RETURN(std::vector<ClientInfo> clients, t.Available(r, o_.min_available, attempt));
    if (o_.planning && (!plan_ || o_.planning->every_round || replan_)) {
      t.Phase(r, "plan");
      FT_RETURN_IF_ERROR(Plan(r, clients, t));
    }
    std::vector<std::string> names;
    std::map<std::string, int64_t> examples, fixed_ranks;
    std::map<std::string, std::vector<model::Module>> fixed_modules;
    for (const ClientInfo& c : clients) {
      auto p = plans_.find(c.name);
      if (p != plans_.end() && p->second.excluded) continue;
      names.push_back(c.name);
      examples[c.name] = c.num_examples;
      if (c.rank > 0) fixed_ranks[c.name] = c.rank;
      if (!c.train_modules.empty()) fixed_modules[c.name] = c.train_modules;
    }
    if (names.empty()) return absl::FailedPreconditionError("planner: every client was left out (see the plan above)");

    // Sample and configure: one task per selected client (a retry selects anew).
    Rng rng(s.seed * 1000003 + static_cast<uint64_t>(r) + 7919 * static_cast<uint64_t>(attempt));
    const std::vector<aggregation::ClientTask> selected = strategy_->ConfigureTrain(r, names, rng);
    // A private (Poisson) selection is never re-drawn: each round commits with the clients that
    // drew and answered, however few (DpStrategy: the noise is released all the same).
    const bool private_selection = strategy_->private_selection();
    const double lr = RoundLearningRate(s.learning_rate, r, s.rounds);
    rec.metrics["client_lr"] = lr;
    std::vector<protocol::TrainTask> tasks;
    std::map<std::string, int64_t> ranks, firsts;  // clients training below the shared rank (DiaBlo: their first block)
    std::map<int64_t, int> with_blocks;             // DiaBlo: clients of this round per block count so far (their window offsets)
    const int64_t shared_rank = s.adapter.spec.FullShare();  // LoRA's rank or DiaBlo's blocks
    for (const aggregation::ClientTask& ct : selected) {
      protocol::TrainTask task = TaskTemplate(s);
      task.run_id = o_.run_id;
      task.round = r;
      task.client = ct.client;
      task.learning_rate = lr;
      task.seed = protocol::TrainingSeed(ct.client, r);
      task.config = ct.config;
      if (auto p = plans_.find(ct.client); p != plans_.end()) {
        const planner::Candidate& pc = p->second.c;
        task.plan.train_modules.clear();
        for (auto m : pc.modules) task.plan.train_modules.push_back(model::ModuleName(m));
        task.plan.base_type = kernels::TypeTraits(pc.base).name;
        task.plan.explanation = p->second.explanation;
        // Planned for less memory than it reported: it keeps its activations within that.
        if (auto m = memory_override_.find(ct.client); m != memory_override_.end()) task.plan.plan_memory_mib = m->second;
        if (auto m = device_override_.find(ct.client); m != device_override_.end()) task.plan.plan_device_memory_mib = m->second;
        task.batch = pc.batch;
        task.local_steps = pc.local_steps;
      } else if (auto f = fixed_modules.find(ct.client); f != fixed_modules.end()) {
        task.plan.train_modules.clear();
        for (auto m : f->second) task.plan.train_modules.push_back(model::ModuleName(m));
      }
      int64_t rank = 0;
      if (auto p = plans_.find(ct.client); p != plans_.end()) rank = p->second.c.rank;
      if (auto f = fixed_ranks.find(ct.client); rank == 0 && f != fixed_ranks.end()) rank = f->second;
      if (rank > 0 && rank < shared_rank) {
        task.plan.train_rank = static_cast<int>(rank);
        if (task.plan.kind == "diablo") task.plan.block_offset = with_blocks[rank]++;
        ranks[ct.client] = rank;
        if (const int64_t first = protocol::FirstBlock(task.plan, r); first > 0) firsts[ct.client] = first;
      }
      tasks.push_back(std::move(task));
    }

    std::unique_ptr<aggregation::Aggregation> agg = strategy_->BeginAggregate(r, global_);
    // Per-worker ranks: updates padded to the shared rank and merged by s.hetero_rank (flexlora in
    // every round of a run that has them, also when this round's clients all train the full rank).
    const bool ranked_run = !fixed_ranks.empty() || (o_.planning && !o_.planning->options.ranks.empty());
    if (!ranks.empty() || (ranked_run && s.hetero_rank == aggregation::HeteroRankRule::kFlexLora)) {
      aggregation::HeteroRankOptions ho;
      ho.rule = s.hetero_rank;
      ho.rank = shared_rank;
      ho.scale = s.adapter.spec.Scale();
      ho.max_client_examples = s.strategy.max_client_examples;
      ho.weight_by_examples = s.strategy.weight_by_examples;
      ho.norm_bound = strategy_->UpdateNormBound();
      agg = aggregation::MakeHeteroRankAggregation(ho, ranks, global_, std::move(agg), firsts);
      rec.metrics["hetero_rank_clients"] = static_cast<double>(ranks.size());
    }
    std::unique_ptr<SecureServer> sec;
    double weight_divisor = 0;
    int unmasked_unused = 0;  // survivors of a secure sum that was unmasked but could not be used
    if (s.secure.enabled) {
      // Secure aggregation: ids in selection order; clients weight by examples over the round's
      // total (public metadata), or equally under DP, where they also clip and add their share of
      // the noise (distributed DP: the noise is split over min_clients when set, so a round with
      // that many survivors still carries all of it).
      protocol::TrainTask::Secure p;
      p.clients = static_cast<int>(tasks.size());
      p.degree = s.secure.degree;
      p.threshold = s.secure.threshold;
      p.graph_seed = s.seed * 7919 + static_cast<uint64_t>(r);
      p.value_range = s.secure.value_range;
      if (s.send_fisher) {  // uncertainty-aware merging in its secure-aggregation form
        p.fisher_clip = s.strategy.fisher_clip;
        p.fisher_lambda = s.strategy.uncertainty_lambda;
      }
      // Per-worker shares (ranks, DiaBlo windows, modules): public like the plan; each client
      // pads its update to the whole adapter before masking. Shares whose values fewer selected
      // clients train than the threshold could never be unmasked: the clients with partial
      // shares then sit this round out (their plans were made for their share, not the whole
      // adapter), unless the rest could not run the round, when everyone trains the whole adapter.
      auto shares_fit = [&](std::vector<protocol::SecureShare>* shares) -> absl::Status {
        shares->clear();
        for (const auto& task : tasks) shares->push_back(protocol::ShareOf(task.plan, r));
        if (std::all_of(shares->begin(), shares->end(), protocol::IsWhole)) shares->clear();
        if (shares->empty()) return absl::OkStatus();
        std::vector<int> all(tasks.size());
        for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
        protocol::TrainTask::Secure q = p;
        q.clients = static_cast<int>(tasks.size());
        FT_ASSIGN_OR_RETURN(const privacy::secagg::Config cfg, protocol::SecAggConfig(q, 1));
        return protocol::CheckShareCounts(*shares, all, global_, static_cast<int>(shared_rank), privacy::secagg::EffectiveThreshold(cfg));
      };
      if (const absl::Status fits = shares_fit(&p.shares); !fits.ok()) {
        auto partial = [&](const protocol::TrainTask& task) { return !protocol::IsWhole(protocol::ShareOf(task.plan, r)); };
        const int n_partial = static_cast<int>(std::count_if(tasks.begin(), tasks.end(), partial));
        const int left = static_cast<int>(tasks.size()) - n_partial;
        // A round runs where the clients in it can still reach SecAgg+'s threshold, the quorum
        // and min_clients (a round that can never reach them would retry forever).
        auto can_run = [&](int n_clients) {
          protocol::TrainTask::Secure q = p;
          q.clients = n_clients;
          return n_clients >= std::max({3, o_.quorum, s.strategy.min_clients}) && protocol::SecAggConfig(q, 1).ok();
        };
        const bool can_sit_out = can_run(left);
        // The other remedy: narrow the shares (planned ranks from the top, modules) to what at
        // least the threshold of this round's clients train (protocol::NarrowShares; not DiaBlo
        // windows). Each option is scored by the (client, adapter piece) pairs it trains: narrowing
        // wins ties (more clients' data in the round) and is taken over whole adapters whenever
        // it can run (it keeps every plan within what was planned for its worker's memory).
        std::vector<protocol::SecureShare> narrowed;
        std::vector<bool> idle;
        for (const auto& task : tasks) narrowed.push_back(protocol::ShareOf(task.plan, r));
        absl::StatusOr<int64_t> narrowed_pairs = absl::UnknownError("not tried");
        {
          protocol::TrainTask::Secure q = p;
          q.clients = static_cast<int>(tasks.size());
          if (auto cfg = protocol::SecAggConfig(q, 1); cfg.ok() && !tasks.empty())
            narrowed_pairs = protocol::NarrowShares(&narrowed, &idle, tasks.front().plan.modules, global_, static_cast<int>(shared_rank),
                                                    privacy::secagg::EffectiveThreshold(*cfg));
        }
        const int n_idle = static_cast<int>(std::count(idle.begin(), idle.end(), true));
        bool narrow = narrowed_pairs.ok() && can_run(static_cast<int>(tasks.size()) - n_idle);
        // The plans the narrowed shares become must give those shares back (ShareOf recomputes
        // them from train_rank / train_modules; a DiaBlo window depends on both): else another
        // remedy. (The threshold was the one for all clients; with idle ones gone it can only be
        // lower, so the narrowed shares still meet it.)
        std::vector<protocol::TrainTask> rewritten = tasks;
        for (size_t i = 0; narrow && i < rewritten.size(); ++i) {
          if (idle[i] || narrowed[i] == protocol::ShareOf(rewritten[i].plan, r)) continue;
          rewritten[i].plan.train_rank = narrowed[i].rank;
          rewritten[i].plan.train_modules = narrowed[i].modules;
          narrow = protocol::ShareOf(rewritten[i].plan, r) == narrowed[i];
        }
        if (narrow && can_sit_out) {
          std::vector<protocol::SecureShare> kept;
          for (const auto& task : tasks)
            if (!partial(task)) kept.push_back(protocol::ShareOf(task.plan, r));
          const absl::StatusOr<int64_t> sat_out_pairs = protocol::CoveredPieces(kept, global_, static_cast<int>(shared_rank));
          narrow = !sat_out_pairs.ok() || *narrowed_pairs >= *sat_out_pairs;
        }
        if (narrow) {
          std::string who, idle_who;
          int n_narrowed = 0;
          std::vector<protocol::TrainTask> kept;
          for (size_t i = 0; i < tasks.size(); ++i) {
            if (idle[i]) {
              absl::StrAppend(&idle_who, idle_who.empty() ? "" : ", ", tasks[i].client);
              continue;
            }
            if (!(narrowed[i] == protocol::ShareOf(tasks[i].plan, r))) {
              ++n_narrowed;
              absl::StrAppend(&who, who.empty() ? "" : ", ", tasks[i].client);
            }
            kept.push_back(std::move(rewritten[i]));
          }
          say(absl::StrFormat("round %d: %s with all %d clients; narrowed the shares of %d (%s) to what at least the threshold train%s", r,
                              fits.message(), static_cast<int>(tasks.size()), n_narrowed, who,
                              n_idle > 0 ? absl::StrCat("; ", n_idle, " left with nothing to train sit this round out (", idle_who, ")") : ""));
          rec.metrics["secagg_narrowed"] = n_narrowed;
          if (n_idle > 0) rec.metrics["secagg_sat_out"] = n_idle;
          tasks = std::move(kept);
          const auto below = std::count_if(tasks.begin(), tasks.end(), [](const protocol::TrainTask& task) { return protocol::TrainsPart(task.plan); });
          if (below > 0) {
            rec.metrics["hetero_rank_clients"] = static_cast<double>(below);
          } else {
            rec.metrics.erase("hetero_rank_clients");
          }
        } else if (can_sit_out) {
          std::string who;
          for (const auto& task : tasks)
            if (partial(task)) absl::StrAppend(&who, who.empty() ? "" : ", ", task.client);
          say(absl::StrFormat("round %d: %s with all %d clients; the %d with partial shares (%s) sit this round out", r, fits.message(),
                              static_cast<int>(tasks.size()), n_partial, who));
          rec.metrics["secagg_sat_out"] = n_partial;
          std::erase_if(tasks, partial);
        } else {
          say(absl::StrFormat("round %d: %s with all %d clients; every client trains the whole adapter this round", r, fits.message(),
                              static_cast<int>(tasks.size())));
          rec.metrics["secagg_whole_shares"] = 1;
          for (auto& task : tasks) {
            task.plan.train_rank = 0;
            task.plan.train_modules.clear();
            task.plan.plan_memory_mib = task.plan.plan_device_memory_mib = 0;  // (sized for the share: its own budget decides)
          }
        }
        if (!narrow) rec.metrics.erase("hetero_rank_clients");  // (nobody trains a partial share now)
        FT_RETURN_IF_ERROR(shares_fit(&p.shares));
        p.clients = static_cast<int>(tasks.size());
      }
      std::vector<std::string> ids;
      bool all_known = true;
      for (const auto& task : tasks) {
        ids.push_back(task.client);
        weight_divisor += static_cast<double>(examples[task.client]);
        all_known = all_known && examples[task.client] > 0;
      }
      // Local DP: workers send weight 1 (their counts are private), so no divisor.
      p.weight_divisor = all_known && !s.dp.local ? weight_divisor : 0;
      weight_divisor = p.weight_divisor;
      absl::StatusOr<std::unique_ptr<SecureServer>> begun =
          private_selection && ids.size() < 3 ? absl::FailedPreconditionError("fewer than 3 clients")
                                              : SecureServer::Begin(ids, global_, p, static_cast<int>(shared_rank), s.hetero_rank != aggregation::HeteroRankRule::kZeroPad);
      if (!begun.ok() && private_selection) {  // too few drawn for SecAgg+: a round without updates
        say(absl::StrFormat("round %d: %d clients drawn, too few for secure aggregation (%s); the round has no update", r,
                            static_cast<int>(tasks.size()), begun.status().message()));
        rec.metrics["secagg_not_started"] = 1;
        tasks.clear();
      } else if (!begun.ok()) {  // e.g. too few clients online for the threshold: try again, nothing happened yet
        if (++attempt > kMaxAttempts) return absl::FailedPreconditionError(absl::StrCat("round ", r, ": secure aggregation cannot start: ", begun.status().message()));
        say(absl::StrFormat("round %d: secure aggregation cannot start (%s); the round starts again (attempt %d)", r, begun.status().message(),
                            attempt + 1));
        continue;
      }
      if (begun.ok()) sec = std::move(*begun);
      const int share = s.strategy.min_clients > 1 ? s.strategy.min_clients : s.expected_clients;
      for (size_t i = 0; i < tasks.size(); ++i) {
        tasks[i].secure_aggregation = true;
        tasks[i].secagg = p;
        tasks[i].secagg.id = static_cast<int>(i);
        tasks[i].test_noise_seed = s.test_noise_seed;
        if (s.dp.central) {
          tasks[i].dp_clip_norm = s.dp.clip_norm;
          tasks[i].dp_noise_stddev = s.dp.noise_multiplier * s.dp.clip_norm / std::sqrt(static_cast<double>(share));
        }
      }
    }
    const bool withhold = s.dp.central || s.dp.local;
    RoundCollector col(*agg, o_.target_updates, sec.get(), weight_divisor, s.dp.central, s.strategy.max_client_examples, withhold);
    std::map<std::string, double> transport_metrics;
    t.Phase(r, "train");
    const auto t_collect = Clock::now();
    FT_RETURN_IF_ERROR(t.Train(r, global_, tasks, col, transport_metrics));
    const double collect_secs = Seconds(t_collect, Clock::now());
    std::map<std::string, const planner::WorkerProfile*> profile_of;  // what each client reported
    for (const ClientInfo& c : clients)
      if (c.profile) profile_of[c.name] = &*c.profile;
    auto reported = [&](const std::string& client) -> const planner::WorkerProfile* {
      auto it = profile_of.find(client);
      return it == profile_of.end() ? nullptr : it->second;
    };
    // Memory the plan of `client` was made for: its reported memory, or what a decline or a
    // measured peak set since (0: unknown).
    auto planned_for = [&](const std::string& client) {
      double m = reported(client) ? reported(client)->memory_mib : 0.0;
      if (auto o = memory_override_.find(client); o != memory_override_.end()) m = m > 0 ? std::min(m, o->second) : o->second;
      return m;
    };
    auto shrink = [&](const std::string& client, double memory) {
      auto [it, fresh] = memory_override_.emplace(client, memory);
      if (!fresh) it->second = std::min(it->second, memory);
      replan_ = true;
      return it->second;
    };
    // The same for a GPU worker's device memory.
    auto device_planned_for = [&](const std::string& client) {
      double m = reported(client) ? reported(client)->device_memory_mib : 0.0;
      if (auto o = device_override_.find(client); o != device_override_.end()) m = m > 0 ? std::min(m, o->second) : o->second;
      return m;
    };
    auto shrink_device = [&](const std::string& client, double memory) {
      auto [it, fresh] = device_override_.emplace(client, memory);
      if (!fresh) it->second = std::min(it->second, memory);
      replan_ = true;
      return it->second;
    };
    for (const auto& d : col.declines_) {
      // (Device figures from a worker that reported no device: re-planned as a host decline, so
      // that its plan changes.)
      if (d.device && reported(d.client) && reported(d.client)->device_memory_mib > 0) {
        // Over its device memory: the same, with the device model.
        auto p = plans_.find(d.client);
        if (!o_.planning || p == plans_.end() || !(d.needed_mib > 0) || !(d.budget_mib > 0)) continue;
        const planner::PlannerOptions& po = o_.planning->options;
        planner::MemoryModel mm = po.memory;
        mm.device_bf16_gemm = !reported(d.client) || reported(d.client)->device_bf16_gemm;
        const double ours =
            mm.ChooseOnDevice(o_.planning->shape, po.spec, po.adapted, p->second.c, po.seq, planner::MemoryModel::kClientMargin * d.budget_mib).device_mib;
        double memory = d.budget_mib * std::min(1.0, ours / d.needed_mib) * planner::MemoryModel::kClientMargin / po.memory_margin;
        if (const double before = device_planned_for(d.client); before > 0 && memory >= before) memory = 0.95 * before;
        say(absl::StrFormat("round %d: %s declined its task (it predicts %.1f MiB of device memory, the planner %.1f MiB, at its device's %.0f "
                            "MiB): re-planned as a device of %.0f MiB",
                            r, d.client, d.needed_mib, ours, d.budget_mib, shrink_device(d.client, memory)));
        continue;
      }
      // Re-plan a client that declined: the planner takes the budget the client reported, scaled
      // by how far the two predictions of this task at that budget disagreed (e.g. the
      // coordinator's planner.seq shorter than the client's data).
      auto p = plans_.find(d.client);
      if (!o_.planning || p == plans_.end() || !(d.needed_mib > 0) || !(d.budget_mib > 0)) continue;
      const planner::PlannerOptions& po = o_.planning->options;
      const bool bf16 = reported(d.client) && reported(d.client)->bf16_kernels;
      // The client plans within planner::MemoryModel::kClientMargin of its budget; the planner
      // within memory_margin of what it is given.
      const double ours =
          po.memory.Choose(o_.planning->shape, po.spec, po.adapted, p->second.c, po.seq, planner::MemoryModel::kClientMargin * d.budget_mib, bf16).total_mib;
      double memory = d.budget_mib * std::min(1.0, ours / d.needed_mib) * planner::MemoryModel::kClientMargin / po.memory_margin;
      // Never the memory the declined plan was made for again: the re-plan must differ.
      if (const double before = planned_for(d.client); before > 0 && memory >= before) memory = 0.95 * before;
      say(absl::StrFormat("round %d: %s declined its task (it predicts %.1f MiB, the planner %.1f MiB, at its budget of %.0f MiB): re-planned as a "
                          "worker of %.0f MiB", r, d.client, d.needed_mib, ours, d.budget_mib, shrink(d.client, memory)));
    }
    if (o_.planning) {
      // Measured peaks above the client's own prediction of the same run (a worker daemon's
      // "peak_rss_mib" and "predicted_peak_mib": same configuration, data and activation choice,
      // so their ratio is the memory model's error for this client): the next plans give it its
      // reported memory scaled by that ratio (from the reported memory each time, so the factor
      // does not compound; never grown back).
      for (const auto& [key, measured] : col.memory_) {
        if (key.rfind("peak_rss_mib/", 0) != 0) continue;
        const std::string client = key.substr(13);
        auto p = plans_.find(client);
        auto own = col.memory_.find("predicted_peak_mib/" + client);
        if (p == plans_.end() || p->second.excluded || own == col.memory_.end() || measured <= own->second) continue;
        const double predicted = own->second;
        const double memory = reported(client) ? reported(client)->memory_mib : 0.0;
        if (!(memory > 0) || memory >= planner::MemoryModel::kUnknownMemoryMiB) continue;
        say(absl::StrFormat("round %d: %s peaked at %.0f MiB, %.0f MiB predicted: planned as a worker of %.0f MiB from now on", r, client, measured,
                            predicted, shrink(client, memory * predicted / measured)));
      }
      // The same for a GPU worker's device peak ("peak_device_mib" vs "predicted_device_mib").
      for (const auto& [key, measured] : col.memory_) {
        if (key.rfind("peak_device_mib/", 0) != 0) continue;
        const std::string client = key.substr(16);
        auto p = plans_.find(client);
        auto own = col.memory_.find("predicted_device_mib/" + client);
        if (p == plans_.end() || p->second.excluded || own == col.memory_.end() || measured <= own->second) continue;
        const double predicted = own->second;
        const double memory = reported(client) ? reported(client)->device_memory_mib : 0.0;
        if (!(memory > 0)) continue;
        say(absl::StrFormat("round %d: %s's device peaked at %.1f MiB, %.1f MiB predicted: planned as a device of %.0f MiB from now on", r,
                            client, measured, predicted, shrink_device(client, memory * predicted / measured)));
      }
    }
    rec.metrics["declined"] = static_cast<double>(col.declines_.size());
    for (const auto& [k, v] : col.memory_) rec.metrics[k] = v;
    if (!withhold)  // (a re-plan after a decline depends on the client's data)
      for (const auto& task : tasks)
        if (auto p = plans_.find(task.client); p != plans_.end() && !p->second.excluded) {
          rec.metrics["planned_mib/" + task.client] = p->second.predicted_mib;
          if (p->second.predicted_device_mib > 0) rec.metrics["planned_device_mib/" + task.client] = p->second.predicted_device_mib;
          rec.metrics["planned_train_seconds/" + task.client] = p->second.predicted_train_seconds;  // vs client_rounds.train_seconds
        }
    if (!private_selection && o_.quorum > 0 && col.accepted() < o_.quorum) {
      ++attempt;
      say(absl::StrFormat("round %d: %d updates accepted, quorum is %d; the round starts again (attempt %d)", r, col.accepted(), o_.quorum,
                          attempt + 1));
      continue;
    }
    attempt = 0;
    t.Phase(r, "aggregate");
    const auto t_server = Clock::now();
    if (sec) {
      // A secure round that cannot be unmasked or merged (too few unmask replies, a hostile input
      // making the weights zero) fails as a round: nothing was released or accounted; try again.
      absl::StatusOr<SecureServer::Sum> finished = sec->Finish();
      absl::Status added = finished.status();
      if (added.ok() && !finished->survivors.empty()) {
        const SecureServer::Sum& ssum = *finished;
        added = !ssum.fisher_sum.empty()
                    ? agg->AddSecureFisherSums(ssum.sum, ssum.fisher_sum, static_cast<int>(ssum.survivors.size()), ssum.num_examples)
                    : agg->AddSecureSum(ssum.sum, ssum.total_weight, static_cast<int>(ssum.survivors.size()), ssum.num_examples,
                                        ssum.value_weight.empty() ? nullptr : &ssum.value_weight);
      }
      if (!added.ok() && private_selection) {  // not re-drawn either: the round has no update
        say(absl::StrFormat("round %d: secure aggregation failed (%s); the round has no update", r, added.message()));
        rec.metrics["secagg_failed"] = 1;
        // The sum was unmasked (the server saw it) but not used: still a release to account.
        if (finished.ok()) unmasked_unused = static_cast<int>(finished->survivors.size());
      } else if (!added.ok()) {
        if (++attempt > kMaxAttempts) return absl::FailedPreconditionError(absl::StrCat("round ", r, ": secure aggregation failed: ", added.message()));
        say(absl::StrFormat("round %d: secure aggregation failed (%s); the round starts again (attempt %d)", r, added.message(), attempt + 1));
        continue;
      }
      if (finished.ok()) {
        rec.metrics["secagg_survivors"] = static_cast<double>(finished->survivors.size());
        rec.metrics["secagg_tampered_shares"] = static_cast<double>(finished->tampered.size());
        for (const auto& tampered : finished->tampered) say("secure aggregation: " + tampered);
      }
    }
    FT_ASSIGN_OR_RETURN(aggregation::Merged merged, agg->Merge());
    if (unmasked_unused > 0) merged.accepted = unmasked_unused;  // accounted as the release it was
    absl::StatusOr<aggregation::RoundResult> result = strategy_->Commit(r, global_, std::move(merged), col.failures_);
    if (result.status().code() == absl::StatusCode::kResourceExhausted) {
      // The privacy budget refuses this round: nothing is released; the run ends here.
      say(absl::StrCat("stopping before round ", r, ": ", result.status().message()));
      FT_RETURN_IF_ERROR(ledger_->SetRunInfo("stopped", std::string(result.status().message())));
      sum.stopped_early = true;
      break;
    }
    FT_RETURN_IF_ERROR(result.status());
    aggregation::RoundResult rr = std::move(*result);
    TensorMap next = rr.global ? std::move(*rr.global) : global_;
    for (const auto& [name, v] : next)
      for (float x : v)
        if (!std::isfinite(x)) return absl::InternalError(absl::StrCat("round ", r, ": the merged adapter is not finite (", name, "); not committed"));
    if (o_.planning) {  // module importance: blended with where this round's merged update moved
      planner::BlendImportance(importance_, planner::UpdateEnergy(global_, next, s.adapter.modules));
      rec.metrics["planned_round_seconds"] = plan_ ? plan_->round_seconds : 0.0;
    }
    global_ = std::move(next);
    const double server_secs = Seconds(t_server, Clock::now());
    for (const auto& [k, v] : rr.metrics) rec.metrics[k] = v;
    for (const auto& [k, v] : transport_metrics) rec.metrics[k] = v;
    rec.metrics.emplace("accepted", col.accepted());
    rec.metrics.emplace("failures", static_cast<double>(col.failures_.size()));
    if (!withhold) rec.metrics["train_loss"] = col.accepted() ? col.loss_sum_ / col.accepted() : 0.0;
    rec.metrics["train_seconds_max"] = col.train_max_;
    rec.metrics["collect_seconds"] = collect_secs;
    rec.metrics["server_merge_seconds"] = server_secs;
    if (s.dp.local) {
      local_epsilon_ = std::max(local_epsilon_, col.local_epsilon_);
      rec.metrics["local_epsilon"] = local_epsilon_;
    }
    double eval_secs = 0;
    if (r % s.eval_every == 0 || r == s.rounds) {
      t.Phase(r, "evaluate");
      const auto t_eval = Clock::now();
      FT_RETURN_IF_ERROR(EvaluateRound(r, t, rec.metrics));
      rec.evaluated = rec.metrics.count("eval_loss") > 0;
      eval_secs = Seconds(t_eval, Clock::now());
    }
    t.Phase(r, "commit");
    rec.metrics["wall_seconds"] = Seconds(t_round, Clock::now());
    // Everything that is neither waiting for clients nor evaluation: sampling, planning,
    // validation, merging, the server update (the commit follows and is not included).
    rec.metrics["overhead_seconds"] = rec.metrics["wall_seconds"] - collect_secs - eval_secs;
    const auto t_commit = Clock::now();
    FT_RETURN_IF_ERROR(CommitState(r, rec, col.records_));
    rec.metrics["commit_seconds"] = Seconds(t_commit, Clock::now());
    FT_RETURN_IF_ERROR(t.Committed(rec, global_));
    std::string line = absl::StrFormat("round %d/%d committed in %.1f s: %d updates, %d failed", r, s.rounds, rec.metrics["wall_seconds"],
                                       col.accepted(), static_cast<int>(col.failures_.size()));
    if (rec.metrics.count("train_loss")) absl::StrAppend(&line, absl::StrFormat(", train loss %.4f", rec.metrics["train_loss"]));
    if (rec.evaluated) absl::StrAppend(&line, absl::StrFormat(", eval loss %.4f, accuracy %.1f%%", rec.metrics["eval_loss"], 100 * rec.metrics["accuracy"]));
    if (rec.metrics.count("epsilon")) absl::StrAppend(&line, absl::StrFormat(", epsilon %.3f", rec.metrics["epsilon"]));
    if (rec.metrics.count("local_epsilon")) absl::StrAppend(&line, absl::StrFormat(", local epsilon %.3f", rec.metrics["local_epsilon"]));
    say(line);
    sum.rounds.push_back(std::move(rec));
    ++r;
  }
  if (sum.stopped_early && !sum.rounds.empty() && !sum.rounds.back().evaluated) {  // score the final adapter
    RoundRecord& last = sum.rounds.back();
    FT_RETURN_IF_ERROR(EvaluateRound(last.round, t, last.metrics));
    last.evaluated = last.metrics.count("eval_loss") > 0;
  }
  sum.plan = plan_;
  return sum;
}

}  // namespace fedtune::federation

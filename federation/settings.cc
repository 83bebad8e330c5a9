#include "federation/settings.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "aggregation/dp_strategy.h"
#include "common/config_loader.h"
#include "kernels/quant.h"
#include "model/compensation.h"
#include "privacy/rdp_accountant.h"
#include "protocol/secagg_wire.h"

namespace fedtune::federation {
namespace {

absl::Status Bad(const std::string& key, const std::string& what) { return absl::InvalidArgumentError(absl::StrCat(key, ": ", what)); }

}  // namespace

absl::StatusOr<aggregation::StrategyOptions> StrategyFromConfig(const proto::StrategyConfig& st) {
  aggregation::StrategyOptions o;
  if (!st.merge().empty()) {
    auto m = aggregation::ParseMergeRule(st.merge());
    if (!m.ok()) return Bad("strategy.merge", std::string(m.status().message()));
    o.merge = *m;
  }
  if (!st.server().empty()) {
    auto so = aggregation::ParseServerOptimizer(st.server());
    if (!so.ok()) return Bad("strategy.server", std::string(so.status().message()));
    o.server = *so;
  }
  o.server_lr = OrDefault(st.server_lr(), 1.0);
  o.clients_per_round = st.clients_per_round();
  o.min_clients = OrDefault(st.min_clients(), 1);
  o.proximal_mu = st.proximal_mu();
  if (st.norm_bound() < 0 && st.norm_bound() != -1) return Bad("strategy.norm_bound", "must be > 0, or -1 for off");
  o.norm_bound = std::max(0.0, st.norm_bound());
  if (st.norm_bound_factor() < 0) return Bad("strategy.norm_bound_factor", "must be > 0 (unset: 5)");
  if (st.norm_bound_factor() > 0 && st.norm_bound() != 0) return Bad("strategy.norm_bound_factor", "only with the automatic norm bound (norm_bound unset)");
  o.auto_norm_factor = st.norm_bound() == 0 ? OrDefault(st.norm_bound_factor(), 5.0) : 0.0;
  o.trim_fraction = OrDefault(st.trim_fraction(), 0.1);
  o.krum_byzantine = st.krum_byzantine();
  o.krum_select = OrDefault(st.krum_select(), 1);
  o.momentum = OrDefault(st.momentum(), 0.9);
  o.tau = OrDefault(st.tau(), 1e-3);
  o.weight_by_examples = !st.uniform_weights();
  if (st.fisher_clip() < 0) return Bad("strategy.fisher_clip", "must be >= 0");
  o.fisher_clip = st.fisher_clip();
  if (st.max_client_examples() < -1) return Bad("strategy.max_client_examples", "must be >= 1, or -1 for no cap");
  o.max_client_examples = st.max_client_examples() == -1 ? 0 : OrDefault<int64_t>(st.max_client_examples(), 1000000);
  if (auto f = aggregation::FedStrategy::Create(o); !f.ok()) return Bad("strategy", std::string(f.status().message()));
  return o;
}

absl::StatusOr<AdapterChoice> AdapterFromConfig(const proto::AdapterConfig& a) {
  AdapterChoice r;
  switch (a.kind()) {
    case proto::AdapterConfig::LORA: r.spec.kind = model::AdapterKind::kLora; break;
    case proto::AdapterConfig::FFA_LORA: r.spec.kind = model::AdapterKind::kFfaLora; break;
    case proto::AdapterConfig::DIABLO: r.spec.kind = model::AdapterKind::kDiaBlo; break;
    default: return Bad("adapter.kind", "unknown");
  }
  r.spec.rank = OrDefault(a.rank(), 8);
  r.spec.alpha = OrDefault(a.alpha(), 16.0f);
  r.spec.blocks = OrDefault(a.blocks(), 16);
  r.spec.rslora = a.rslora();
  if (r.spec.rank < 1 || r.spec.blocks < 1) return Bad("adapter", "rank and blocks must be >= 1");
  auto modules = model::ParseModules(a.target_modules().empty() ? "all" : absl::StrJoin(a.target_modules(), ","));
  if (!modules.ok()) return Bad("adapter.target_modules", std::string(modules.status().message()));
  r.modules = *modules;
  r.layout = a.layers();
  return r;
}

absl::StatusOr<RunSettings> ResolveRunParts(int rounds, uint64_t seed, uint64_t adapter_seed, const proto::AdapterConfig& adapter,
                                            const proto::LocalTrainConfig& train, const proto::StrategyConfig& strategy,
                                            const proto::DpConfig& dp, const proto::EvalConfig& eval,
                                            const proto::SecureAggregationConfig& secure, const proto::PlannerConfig& planner,
                                            uint64_t test_noise_seed, int population) {
  RunSettings s;
  s.rounds = rounds;
  if (s.rounds < 1) return Bad("rounds", "must be >= 1");
  s.population = population;
  s.seed = OrDefault<uint64_t>(seed, 1);
  s.adapter_seed = OrDefault<uint64_t>(adapter_seed, s.seed);
  s.test_noise_seed = test_noise_seed;
  FT_ASSIGN_OR_RETURN(s.adapter, AdapterFromConfig(adapter));
  FT_ASSIGN_OR_RETURN(s.strategy, StrategyFromConfig(strategy));
  if (s.strategy.clients_per_round > population) return Bad("strategy.clients_per_round", absl::StrCat("exceeds clients (", population, ")"));
  if (s.strategy.min_clients > population) return Bad("strategy.min_clients", absl::StrCat("exceeds clients (", population, ")"));
  s.expected_clients = s.strategy.clients_per_round > 0 ? s.strategy.clients_per_round : population;
  // Client training.
  s.local_steps = OrDefault(train.local_steps(), 4);
  s.batch = OrDefault(train.batch(), 8);
  s.learning_rate = OrDefault(train.learning_rate(), 5e-3);
  s.warmup_steps = train.warmup_steps();
  s.weight_decay = train.weight_decay();
  s.grad_clip_norm = OrDefault(train.clip_norm(), 1.0);
  if (s.local_steps < 1 || s.batch < 1) return Bad("train", "local_steps and batch must be >= 1");
  if (!(s.learning_rate > 0)) return Bad("train.learning_rate", "must be > 0");
  if (s.warmup_steps < 0 || s.weight_decay < 0 || s.grad_clip_norm < 0) return Bad("train", "warmup_steps, weight_decay and clip_norm must be >= 0");
  if (const auto bt = kernels::GgmlTypeFromName(train.base_type()); !train.base_type().empty() && (!bt || !kernels::CanQuantize(*bt)))
    return Bad("train.base_type", "must be q8_0, q4_0, q4_1, nf4, nf4_dq, q3_k, nf3, q2_k, nf2, f16 or f32");
  s.base_type = train.base_type();
  const auto method = model::ParseCompensationMethod(train.compensation());
  if (!method) return Bad("train.compensation", "must be none, svd, loftq, cloq, gptq or gptq-cloq");
  s.compensation = train.compensation() == "none" ? "" : train.compensation();
  s.compensation_rank = OrDefault(train.compensation_rank(), 16);
  if (s.compensation_rank < 1) return Bad("train.compensation_rank", "must be >= 1");
  if (!model::HasCorrection(*method)) s.compensation_rank = 0;  // gptq: rounding only, no low-rank term to count or keep
  s.compensation_damping = OrDefault(train.compensation_damping(), 0.01);
  if (!(s.compensation_damping > 0 && s.compensation_damping <= 1e3)) return Bad("train.compensation_damping", "must be in (0, 1000]");
  // Evaluation.
  s.eval_every = OrDefault(eval.every(), 1);
  s.max_new_tokens = OrDefault(eval.max_new_tokens(), 32);
  if (s.eval_every < 1 || s.max_new_tokens < 1) return Bad("eval", "every and max_new_tokens must be >= 1");
  s.generate_examples = eval.generate_examples();
  if (s.generate_examples < 0) return Bad("eval.generate_examples", "must be >= 0 (0: all)");
  // Secure aggregation.
  const bool linear = s.strategy.merge == aggregation::MergeRule::kMean || s.strategy.merge == aggregation::MergeRule::kUncertainty;
  if (secure.enabled()) {
    if (!linear) return Bad("secure_aggregation.enabled", "needs strategy.merge mean or uncertainty (the server only sees a sum)");
    if (s.expected_clients < 3 || s.expected_clients > 1000) return Bad("secure_aggregation.enabled", "needs 3 to 1000 clients per round");
    if (dp.enabled() && dp.adaptive_clipping()) return Bad("dp.adaptive_clipping", "not available under secure aggregation");
    if (secure.value_range() < 0) return Bad("secure_aggregation.value_range", "must be > 0");
    s.secure.enabled = true;
    s.secure.degree = secure.degree();
    s.secure.threshold = secure.threshold();
    protocol::TrainTask::Secure p;  // the graph and threshold a full round would use
    p.clients = s.expected_clients;
    p.degree = s.secure.degree;
    p.threshold = s.secure.threshold;
    p.value_range = 1;
    if (auto c = protocol::SecAggConfig(p, 1); !c.ok()) return Bad("secure_aggregation", std::string(c.status().message()));
  }
  // Differential privacy.
  if (dp.private_fisher() && !dp.enabled()) return Bad("dp.private_fisher", "needs dp.enabled (central)");
  if (!dp.sampling().empty() && !dp.enabled()) return Bad("dp.sampling", "needs dp.enabled (central)");
  if (dp.enabled()) {
    if (dp.private_fisher() && dp.local()) return Bad("dp.private_fisher", "central DP only");
    if (dp.noise_multiplier() <= 0 && dp.target_epsilon() <= 0) return Bad("dp", "set noise_multiplier or target_epsilon");
    s.dp.delta = OrDefault(dp.delta(), 1e-5);
    if (!(s.dp.delta > 0 && s.dp.delta < 1)) return Bad("dp.delta", "must be in (0, 1)");
    if (dp.clip_norm() < 0) return Bad("dp.clip_norm", "must be > 0");
    s.dp.noise_multiplier = dp.noise_multiplier();
    s.dp.target_epsilon = dp.target_epsilon();
    s.dp.adaptive_clipping = dp.adaptive_clipping();
    s.dp.target_quantile = OrDefault(dp.target_quantile(), 0.5);
    if (!(s.dp.target_quantile > 0 && s.dp.target_quantile < 1)) return Bad("dp.target_quantile", "must be in (0, 1)");
    if (dp.local()) {
      if (dp.adaptive_clipping()) return Bad("dp.adaptive_clipping", "only for central DP");
      if (!dp.sampling().empty()) return Bad("dp.sampling", "central DP only (local DP-SGD always draws Poisson batches)");
      s.dp.local = true;
      s.dp.clip_norm = OrDefault(dp.clip_norm(), 1.0);
    } else {
      if (!linear) return Bad("dp.enabled", "central differential privacy needs strategy.merge mean or uncertainty");
      s.dp.central = true;
      if (dp.private_fisher()) {
        if (s.strategy.merge != aggregation::MergeRule::kUncertainty) return Bad("dp.private_fisher", "needs strategy.merge: uncertainty");
        if (dp.adaptive_clipping() || secure.enabled()) return Bad("dp.private_fisher", "not with adaptive clipping or secure aggregation");
        s.dp.private_fisher = true;
      }
      s.dp.clip_norm = OrDefault(dp.clip_norm(), 0.1);
      if (dp.sampling() == "fixed") {
        s.dp.poisson = false;
      } else if (!dp.sampling().empty() && dp.sampling() != "poisson") {
        return Bad("dp.sampling", "must be poisson or fixed");
      }
      if (s.dp.target_epsilon > 0) {
        const double q = s.dp.poisson ? static_cast<double>(s.expected_clients) / population : 1.0;
        auto z = privacy::NoiseMultiplierFor(s.dp.target_epsilon, s.dp.delta, q, s.rounds);
        if (!z.ok()) return Bad("dp.target_epsilon", std::string(z.status().message()));
        s.dp.noise_multiplier = *z;
      }
    }
  }
  if (s.secure.enabled && s.dp.central && s.dp.poisson && s.expected_clients < population && s.secure.threshold > 0)
    return Bad("secure_aggregation.threshold", "not with Poisson client sampling (round sizes vary; the default threshold follows each round's size)");
  if (planner.enabled()) {
    // Under secure aggregation the planner's per-worker shares (modules, ranks) are public in the
    // round's task; a module or component trained by fewer survivors than the threshold is not
    // unmasked (the server and every client check; a round whose shares cannot meet it with all
    // its clients trains whole adapters), and a worker zeroes what lies outside its share before
    // masking (a value sent there would be scaled up by the small weight of its trainers; a
    // hostile worker can do that, as it can send any values in its share: the server sees no
    // individual update under secure aggregation). With central DP every worker trains the whole
    // adapter (PlannerOptions::whole_adapter): the noisy sum assumes every client trains every value.
  }
  s.secure.value_range = OrDefault(secure.value_range(), s.dp.central ? 4 * s.dp.clip_norm : 0.05);
  // Uncertainty-aware merging needs each client's Fisher: in the clear, or under secure
  // aggregation as masked Fisher-weighted sums (with a public bound on the Fisher, default 1e-4).
  // Under central DP it is data-dependent: privatised with dp.private_fisher, else the merge falls
  // back to the mean (ALGORITHMS.md says why a privatised Fisher needs many clients per round).
  s.send_fisher = s.strategy.merge == aggregation::MergeRule::kUncertainty && !s.dp.local && (!s.dp.central || s.dp.private_fisher);
  {
    auto comp = aggregation::CompressionFromName(strategy.compression());
    if (!comp.ok()) return Bad("strategy.compression", std::string(comp.status().message()));
    s.compression = *comp;
    if (strategy.topk_fraction() < 0 || strategy.topk_fraction() > 1) return Bad("strategy.topk_fraction", "must be in (0, 1]");
    if (strategy.topk_fraction() > 0) s.topk_fraction = strategy.topk_fraction();
    s.error_feedback = !strategy.no_error_feedback();
    if (s.compression != aggregation::Compression::kNone && s.secure.enabled)
      return Bad("strategy.compression", "not with secure aggregation (masked uploads are dense field elements: nothing to save)");
  }
  if (s.send_fisher && (s.secure.enabled || s.dp.private_fisher) && s.strategy.fisher_clip == 0) s.strategy.fisher_clip = 1e-4;
  {
    auto rule = aggregation::ParseHeteroRankRule(strategy.hetero_rank());
    if (!rule.ok()) return Bad("strategy.hetero_rank", std::string(rule.status().message()));
    s.hetero_rank = *rule;
    // DiaBlo: block counts (each <= adapter.blocks), the same way.
    const bool diablo = s.adapter.spec.kind == model::AdapterKind::kDiaBlo;
    const int64_t full = s.adapter.spec.FullShare();
    const std::string full_key = diablo ? "adapter.blocks" : "adapter.rank";
    for (int r : planner.ranks())
      if (r < 1 || r > full) return Bad("planner.ranks", absl::StrCat("every ", diablo ? "block count" : "rank", " must be in [1, ", full_key, " = ", full, "]"));
    if (planner.enabled() && planner.ranks_size() > 0) {
      FT_RETURN_IF_ERROR(CheckHeteroRanks(s, "planner.ranks"));
      if (*std::max_element(planner.ranks().begin(), planner.ranks().end()) != full)
        return Bad("planner.ranks", absl::StrCat("must include ", full_key, " (", full, "): ", diablo ? "blocks" : "components", " above the largest would never train"));
    }
  }
  // The automatic norm bound reads the updates' norms: not under central DP (an unprivatised
  // statistic; the DP clip bounds each update) nor secure aggregation (no norms to read).
  if (s.dp.central || s.secure.enabled) s.strategy.auto_norm_factor = 0;
  return s;
}

absl::Status CheckHeteroRanks(const RunSettings& s, const std::string& key) {
  if (!s.adapter.layout.empty()) return Bad(key, "not with per-layer adapter settings (adapter.layers)");
  if (s.strategy.merge != aggregation::MergeRule::kMean && s.strategy.merge != aggregation::MergeRule::kUncertainty)
    return Bad(key, "per-worker ranks need strategy.merge mean or uncertainty");
  // Local DP-SGD: each worker clips and noises the gradients of what it trains (its rank's slice
  // or its blocks), and its record-level privacy does not depend on how many values those are;
  // the merge is post-processing. Central DP would need a sensitivity per component: a component
  // fewer workers trained is averaged over fewer updates (not done).
  if (s.dp.central) return Bad(key, "not combined with central differential privacy (a component few workers train has a larger sensitivity); local DP-SGD works");
  // Secure aggregation: each worker pads its update to the whole adapter before masking, the
  // round's shares are public, and a value is unmasked only in a sum over at least the threshold
  // of survivors that trained it (protocol::CheckShareCounts). flexlora needs each client's factors.
  if (s.secure.enabled && s.hetero_rank == aggregation::HeteroRankRule::kFlexLora)
    return Bad("strategy.hetero_rank", "flexlora needs each client's factors; secure aggregation gives only their sum (nested or zero_pad)");
  if (s.hetero_rank == aggregation::HeteroRankRule::kFlexLora) {
    if (s.adapter.spec.kind != model::AdapterKind::kLora) return Bad("strategy.hetero_rank", "flexlora needs adapter.kind lora (nested is exact for FFA-LoRA)");
    if (s.strategy.server != aggregation::ServerOptimizer::kFedAvg || s.strategy.server_lr != 1.0)
      return Bad("strategy.hetero_rank", "flexlora replaces the global factors: needs strategy.server fedavg with server_lr 1");
    if (s.strategy.merge != aggregation::MergeRule::kMean) return Bad("strategy.hetero_rank", "flexlora is its own merge: needs strategy.merge mean");
    if (s.compression != aggregation::Compression::kNone) return Bad("strategy.hetero_rank", "flexlora is not combined with compressed uploads");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<aggregation::Strategy>> MakeStrategy(const RunSettings& s, std::string* summary) {
  FT_ASSIGN_OR_RETURN(std::unique_ptr<aggregation::FedStrategy> fed, aggregation::FedStrategy::Create(s.strategy));
  std::unique_ptr<aggregation::Strategy> strategy = std::move(fed);
  if (summary) *summary = strategy->Name();
  if (!s.dp.central) return strategy;
  aggregation::DpOptions d;
  d.noise_added_by_clients = s.secure.enabled;
  // Distributed noise is split over min_clients when set (so a round with that many survivors
  // still carries the full noise), else over the expected clients.
  d.noise_share_clients = s.strategy.min_clients > 1 ? s.strategy.min_clients : s.expected_clients;
  d.delta = s.dp.delta;
  d.expected_clients = s.expected_clients;
  d.population = s.population;
  d.sampling = s.dp.poisson ? aggregation::DpOptions::Sampling::kPoisson : aggregation::DpOptions::Sampling::kFixed;
  d.clip_norm = s.dp.clip_norm;
  d.adaptive_clipping = s.dp.adaptive_clipping;
  d.target_quantile = s.dp.target_quantile;
  d.noise_multiplier = s.dp.noise_multiplier;
  if (s.dp.target_epsilon > 0) d.epsilon_budget = s.dp.target_epsilon * (1 + 1e-9);
  if (s.dp.private_fisher) {
    d.private_fisher_clip = s.strategy.fisher_clip;
    d.fisher_lambda = s.strategy.uncertainty_lambda;
  }
  if (s.test_noise_seed != 0) {
    privacy::NoiseSource::Seed seed{};
    for (int i = 0; i < 8; ++i) seed[static_cast<size_t>(i)] = static_cast<uint8_t>(s.test_noise_seed >> (8 * i));
    d.seed = seed;
  }
  FT_ASSIGN_OR_RETURN(auto dp, aggregation::DpStrategy::Create(std::move(strategy), d));
  if (summary)
    *summary = absl::StrFormat(
        "%s; differential privacy: z=%.4f, clip %.3g%s, q=%.3f (%s), delta %.1e%s", dp->Name(), d.noise_multiplier, d.clip_norm,
        d.adaptive_clipping ? " (adaptive)" : "", dp->accounted_rate(),
        dp->private_selection() ? "Poisson sampling from a CSPRNG"
                                : (s.expected_clients < s.population ? "fixed-size selection: no amplification claimed" : "every client"),
        d.delta, s.test_noise_seed ? " (TEST noise seed: not private)" : "");
  return std::unique_ptr<aggregation::Strategy>(std::move(dp));
}

absl::StatusOr<planner::PlannerOptions> PlannerOptionsFrom(const proto::PlannerConfig& pc, const model::AdapterSpec& spec,
                                                           const std::vector<model::Module>& modules, const planner::Candidate& uniform,
                                                           int seq, bool send_fisher, bool recompute) {
  planner::PlannerOptions o;
  o.spec = spec;
  o.adapted = modules;
  o.seq = seq;
  o.uniform = uniform;
  o.send_fisher = send_fisher;
  o.memory.recompute = recompute;
  o.max_local_steps = pc.max_local_steps() > 0 ? pc.max_local_steps() : 2 * uniform.local_steps;
  if (pc.batches_size() > 0) o.batches.assign(pc.batches().begin(), pc.batches().end());
  for (int b : o.batches)
    if (b < 1) return absl::InvalidArgumentError("planner.batches: every batch must be >= 1");
  for (const std::string& t : pc.base_types()) {
    const auto ty = kernels::GgmlTypeFromName(t);
    if (!ty || !kernels::CanQuantize(*ty)) return absl::InvalidArgumentError(absl::StrCat("planner.base_types: unknown type '", t, "' (q8_0, q4_0, q4_1, nf4, nf4_dq, q3_k, nf3, q2_k, nf2)"));
    o.base_types.push_back(*ty);
  }
  if (pc.memory_margin() < 0 || pc.memory_margin() > 1) return absl::InvalidArgumentError("planner.memory_margin must be in (0, 1]");
  if (pc.memory_margin() > 0) o.memory_margin = pc.memory_margin();
  if (pc.work_factor() < 0) return absl::InvalidArgumentError("planner.work_factor must be > 0");
  if (pc.work_factor() > 0) o.work_factor = pc.work_factor();
  for (int r : pc.ranks()) {
    if (r < 1 || r > spec.FullShare())
      return absl::InvalidArgumentError(absl::StrCat("planner.ranks: every rank (DiaBlo: block count) must be in [1, ", spec.FullShare(), "]"));
    o.ranks.push_back(r);
  }
  return o;
}

protocol::TrainTask TaskTemplate(const RunSettings& s) {
  protocol::TrainTask t;
  t.plan.kind = model::AdapterKindName(s.adapter.spec.kind);
  t.plan.rank = s.adapter.spec.rank;
  t.plan.alpha = s.adapter.spec.alpha;
  t.plan.blocks = s.adapter.spec.blocks;
  t.plan.rslora = s.adapter.spec.rslora;
  for (auto m : s.adapter.modules) t.plan.modules.push_back(model::ModuleName(m));
  t.plan.adapter_seed = s.adapter_seed;
  t.plan.layers = s.adapter.layout;
  t.plan.base_type = s.base_type;
  t.plan.compensation = s.compensation;
  t.plan.compensation_rank = s.compensation_rank;
  t.plan.compensation_damping = s.compensation_damping;
  t.local_steps = s.local_steps;
  t.batch = s.batch;
  t.learning_rate = s.learning_rate;
  t.warmup_steps = s.warmup_steps;
  t.weight_decay = s.weight_decay;
  t.grad_clip_norm = s.grad_clip_norm;
  t.send_fisher = s.send_fisher;
  if (s.compression != aggregation::Compression::kNone) t.compression = aggregation::CompressionName(s.compression);
  t.topk_fraction = s.topk_fraction;
  t.error_feedback = s.error_feedback;
  if (s.dp.local) {
    t.local_dp_clip = s.dp.clip_norm;
    t.local_dp_noise = s.dp.noise_multiplier;
    t.local_dp_delta = s.dp.delta;
  }
  return t;
}

double RoundLearningRate(double lr, int round, int rounds) {
  const double progress = rounds > 1 ? static_cast<double>(round - 1) / (rounds - 1) : 0.0;
  return lr * (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * progress)));
}

}  // namespace fedtune::federation

#include "sim/simulation.h"


#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "aggregation/dp_strategy.h"
#include "aggregation/fed_strategy.h"
#include "common/config_loader.h"
#include "common/mapped_file.h"
#include "common/progress.h"
#include "coordinator/run_ledger.h"
#include "kernels/quant.h"
#include "model/adapter_io.h"
#include "model/export.h"
#include "model/tasks.h"
#include "nlohmann/json.hpp"
#include "privacy/ledger.h"
#include "privacy/rdp_accountant.h"
#include "sim/partition.h"
#include "sim/planning.h"
#include "sim/report.h"
#include "sim/secure_round.h"
#include "worker/local_trainer.h"

namespace fedtune::sim {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using aggregation::TensorMap;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

std::string ResolveTextDomain(const std::string& name) {
  return name.find('/') == std::string::npos ? "/usr/share/common-licenses/" + name : name;
}

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
  o.norm_bound = st.norm_bound();
  o.trim_fraction = OrDefault(st.trim_fraction(), 0.1);
  o.krum_byzantine = st.krum_byzantine();
  o.krum_select = OrDefault(st.krum_select(), 1);
  o.momentum = OrDefault(st.momentum(), 0.9);
  o.tau = OrDefault(st.tau(), 1e-3);
  o.weight_by_examples = !st.uniform_weights();
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

namespace {

// Effective settings (proto3 zeros replaced by defaults) in one place.
struct Settings {
  int clients, rounds, local_steps, batch, eval_every, max_new_tokens, examples_per_task, eval_examples, max_len;
  double lr, alpha_dir, skew;
  uint64_t seed, adapter_seed;
  aggregation::StrategyOptions strategy;
  model::AdapterSpec spec;
  std::vector<model::Module> modules;
  std::string layout;
};

absl::StatusOr<Settings> Resolve(const proto::SimulationConfig& c) {
  Settings s;
  s.clients = c.clients();
  s.rounds = c.rounds();
  if (s.clients < 1 || s.clients > 100000) return Bad("clients", "must be in [1, 100000]");
  if (s.rounds < 1) return Bad("rounds", "must be >= 1");
  s.local_steps = OrDefault(c.train().local_steps(), 4);
  s.batch = OrDefault(c.train().batch(), 8);
  s.lr = OrDefault(c.train().learning_rate(), 5e-3);
  if (s.local_steps < 1 || s.batch < 1) return Bad("train", "local_steps and batch must be >= 1");
  if (!(s.lr > 0)) return Bad("train.learning_rate", "must be > 0");
  s.eval_every = OrDefault(c.eval().every(), 1);
  s.max_new_tokens = OrDefault(c.eval().max_new_tokens(), 32);
  s.examples_per_task = OrDefault(c.data().examples_per_task(), 400);
  s.eval_examples = OrDefault(c.data().eval_examples(), 40);
  s.max_len = OrDefault(c.data().max_len(), 128);
  s.alpha_dir = OrDefault(c.data().dirichlet_alpha(), 0.5);
  s.skew = OrDefault(c.data().size_skew(), 1.0);
  s.seed = OrDefault<uint64_t>(c.seed(), 1);
  s.adapter_seed = OrDefault<uint64_t>(c.adapter_seed(), s.seed);
  if (s.eval_every < 1 || s.max_new_tokens < 1 || s.examples_per_task < 1 || s.eval_examples < 1 || s.max_len < 8)
    return Bad("eval/data", "every, max_new_tokens, examples_per_task, eval_examples must be >= 1 and max_len >= 8");
  // Adapter.
  FT_ASSIGN_OR_RETURN(AdapterChoice adapter, AdapterFromConfig(c.adapter()));
  s.spec = adapter.spec;
  s.modules = adapter.modules;
  s.layout = adapter.layout;
  if (!s.layout.empty() && c.planner().enabled()) return Bad("planner", "not supported with per-layer adapter settings (adapter.layers) yet");
  if (c.train().activation_budget_mib() < 0) return Bad("train.activation_budget_mib", "must be >= 0");
  if (c.train().activation_budget_mib() > 0 && c.train().no_recompute())
    return Bad("train.activation_budget_mib", "choose one: no_recompute keeps every activation, the budget decides per batch");
  if (c.train().activation_budget_mib() > 0 && c.planner().enabled())
    return Bad("train.activation_budget_mib", "the planner's memory model assumes recomputation; not combined with the planner yet");
  // Strategy.
  FT_ASSIGN_OR_RETURN(s.strategy, StrategyFromConfig(c.strategy()));
  if (s.strategy.clients_per_round > s.clients) return Bad("strategy.clients_per_round", absl::StrCat("exceeds clients (", s.clients, ")"));
  if (s.strategy.min_clients > s.clients) return Bad("strategy.min_clients", absl::StrCat("exceeds clients (", s.clients, ")"));
  return s;
}

struct ClientState {
  std::string name, profile;
  double speed = 1, bandwidth_mbps = 100, latency_ms = 20, dropout = 0, memory_mib = 0;
  std::vector<model::Example> train;
  std::vector<double> task_share;  // fraction of its examples per task
  int trained = 0, dropped = 0;
};

std::string CsvEscape(const std::string& s) { return s.find_first_of(",\"") == std::string::npos ? s : "\"" + s + "\""; }

}  // namespace

absl::Status ValidateConfig(const proto::SimulationConfig& c) {
  FT_ASSIGN_OR_RETURN(Settings s, Resolve(c));
  if (!fs::exists(c.model().path())) return Bad("model.path", absl::StrCat("no such file: ", c.model().path()));
  if (c.data().tasks().empty() && c.data().files().empty() && c.data().text_domains().empty())
    return Bad("data", "name at least one of data.tasks, data.files or data.text_domains");
  for (const std::string& t : c.data().text_domains())
    if (!fs::exists(ResolveTextDomain(t))) return Bad("data.text_domains", absl::StrCat("no such text: ", ResolveTextDomain(t)));
  for (const std::string& t : c.data().tasks()) {
    const auto& names = model::TaskNames();
    if (std::find(names.begin(), names.end(), t) == names.end())
      return Bad("data.tasks", absl::StrCat("unknown task '", t, "' (", absl::StrJoin(names, ", "), ")"));
  }
  for (const std::string& f : c.data().files())
    if (!fs::exists(f)) return Bad("data.files", absl::StrCat("no such file: ", f));
  const int num_tasks = c.data().tasks_size() + c.data().files_size() + c.data().text_domains_size();
  if (c.data().partition() == proto::DataConfig::BY_TASK && s.clients < num_tasks)
    return Bad("data.partition", absl::StrCat("by_task needs clients >= tasks (", num_tasks, ")"));
  if (static_cast<int64_t>(s.examples_per_task) * c.data().tasks_size() > 0 &&
      static_cast<int64_t>(s.examples_per_task) * num_tasks < s.clients)
    return Bad("data.examples_per_task", absl::StrCat("too few examples for ", s.clients, " clients"));
  if (c.profiles_size() > 0) {
    int total = 0;
    for (int i = 0; i < c.profiles_size(); ++i) {
      const auto& p = c.profiles(i);
      const std::string key = absl::StrCat("profiles[", i, "]");
      if (p.count() < 1) return Bad(key + ".count", "must be >= 1");
      if (p.speed() < 0 || p.bandwidth_mbps() < 0 || p.latency_ms() < 0) return Bad(key, "speed, bandwidth_mbps, latency_ms must be >= 0");
      if (p.dropout() < 0 || p.dropout() >= 1) return Bad(key + ".dropout", "must be in [0, 1)");
      total += p.count();
    }
    if (total != s.clients) return Bad("profiles", absl::StrCat("counts add up to ", total, ", but clients is ", s.clients));
  }
  if (!c.train().base_type().empty() && !kernels::GgmlTypeFromName(c.train().base_type()))
    return Bad("train.base_type", "must be q8_0, q4_0, q4_1, nf4, nf4_dq, f16 or f32");
  if (c.secure_aggregation().enabled()) {
    if (s.strategy.merge != aggregation::MergeRule::kMean && s.strategy.merge != aggregation::MergeRule::kUncertainty)
      return Bad("secure_aggregation.enabled", "needs strategy.merge mean or uncertainty (the server only sees a sum)");
    const int m = s.strategy.clients_per_round > 0 ? s.strategy.clients_per_round : s.clients;
    if (m < 3 || m > 1000) return Bad("secure_aggregation.enabled", "needs 3 to 1000 clients per round");
    if (c.dp().enabled() && c.dp().adaptive_clipping()) return Bad("dp.adaptive_clipping", "not available under secure aggregation");
    if (c.secure_aggregation().value_range() < 0) return Bad("secure_aggregation.value_range", "must be > 0");
  }
  if (c.dp().enabled()) {
    if (c.dp().noise_multiplier() <= 0 && c.dp().target_epsilon() <= 0) return Bad("dp", "set noise_multiplier or target_epsilon");
    const double delta = OrDefault(c.dp().delta(), 1e-5);
    if (!(delta > 0 && delta < 1)) return Bad("dp.delta", "must be in (0, 1)");
    if (c.dp().target_epsilon() > 0 && !c.dp().local()) {
      const int m = s.strategy.clients_per_round > 0 ? s.strategy.clients_per_round : s.clients;
      auto z = privacy::NoiseMultiplierFor(c.dp().target_epsilon(), delta, static_cast<double>(m) / s.clients, s.rounds);
      if (!z.ok()) return Bad("dp.target_epsilon", std::string(z.status().message()));
    }
    if (!c.dp().local() && s.strategy.merge != aggregation::MergeRule::kMean && s.strategy.merge != aggregation::MergeRule::kUncertainty)
      return Bad("dp.enabled", "central differential privacy needs strategy.merge mean or uncertainty");
    if (c.dp().local() && c.dp().adaptive_clipping()) return Bad("dp.adaptive_clipping", "only for central DP");
  }
  if (c.planner().enabled()) {
    if (c.dp().enabled() && c.dp().local())
      return Bad("planner", "not combined with local DP (per-client accounting assumes the uniform batch and steps)");
    if (c.secure_aggregation().enabled()) return Bad("planner", "not combined with secure aggregation (partial adapters are not masked per module)");
    if (c.train().stand_in()) return Bad("planner", "needs real training (train.stand_in is set)");
  }
  for (int p = 0; p < c.profiles_size(); ++p)
    if (c.profiles(p).memory_mib() < 0) return Bad(absl::StrCat("profiles[", p, "].memory_mib"), "must be >= 0");
  return absl::OkStatus();
}

absl::StatusOr<SimulationResult> RunSimulation(const proto::SimulationConfig& c, const SimOptions& o) {
  FT_RETURN_IF_ERROR(ValidateConfig(c));
  FT_ASSIGN_OR_RETURN(Settings s, Resolve(c));
  const auto t_start = Clock::now();
  auto say = [&](const std::string& line) {
    if (o.progress) std::fprintf(stderr, "[simulate] %s\n", line.c_str());
  };
  SimulationResult result;
  // A run directory holds one run. The default one gets a fresh suffix when taken; an explicit
  // one that already holds a run is an error before any work (results are never overwritten).
  result.run_dir = c.output_dir().empty() ? "runs/" + o.default_run_name : c.output_dir();
  if (fs::exists(result.run_dir + "/ledger.sqlite")) {
    if (!c.output_dir().empty())
      return absl::AlreadyExistsError(absl::StrCat(result.run_dir, " already holds a run (ledger.sqlite); remove it or choose another output_dir"));
    const std::string base = result.run_dir;
    for (int k = 2; fs::exists(result.run_dir + "/ledger.sqlite"); ++k) result.run_dir = absl::StrCat(base, "-", k);
  }
  std::error_code ec;
  fs::create_directories(result.run_dir, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot create ", result.run_dir, ": ", ec.message()));
  if (!o.config_text.empty()) FT_RETURN_IF_ERROR(WriteFileAtomic(result.run_dir + "/config.yaml", o.config_text));

  // Model: one read-only copy shared by every virtual client.
  FT_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> model, model::LlamaModel::Load(c.model().path()));
  if (!c.train().base_type().empty()) {
    FT_ASSIGN_OR_RETURN(size_t bytes, model->Requantize(*kernels::GgmlTypeFromName(c.train().base_type())));
    say(absl::StrFormat("base re-quantized to %s: %.1f MiB of projections", c.train().base_type(), bytes / 1048576.0));
  }
  if (model->tokenizer() == nullptr) return absl::FailedPreconditionError("the model has no tokenizer");
  const model::Tokenizer& tok = *model->tokenizer();

  // Data: every task (or file) split into train and held-out; the global evaluation set takes
  // an equal share of every task's held-out examples.
  std::vector<std::string> task_names;
  std::vector<model::Dataset> per_task;
  model::DatasetOptions dopt;
  dopt.max_len = s.max_len;
  dopt.seed = s.seed;
  dopt.holdout = 0.15;
  dopt.max_holdout = 1000;
  for (int t = 0; t < c.data().tasks_size(); ++t) {
    FT_ASSIGN_OR_RETURN(auto lines, model::GenerateTask(c.data().tasks(t), s.examples_per_task, s.seed * 1000 + static_cast<uint64_t>(t)));
    FT_ASSIGN_OR_RETURN(model::Dataset d, model::DatasetFromJsonl(lines, c.data().tasks(t), tok, dopt));
    per_task.push_back(std::move(d));
    task_names.push_back(c.data().tasks(t));
  }
  for (const std::string& f : c.data().files()) {
    FT_ASSIGN_OR_RETURN(model::Dataset d, model::LoadDataset(f, tok, dopt));
    per_task.push_back(std::move(d));
    task_names.push_back(fs::path(f).stem().string());
  }
  for (const std::string& t : c.data().text_domains()) {
    FT_ASSIGN_OR_RETURN(model::Dataset d, model::LoadDataset(ResolveTextDomain(t), tok, dopt));
    per_task.push_back(std::move(d));
    task_names.push_back(fs::path(t).filename().string());
  }
  const int num_tasks = static_cast<int>(per_task.size());
  std::vector<std::vector<model::Example>> eval_by_task(static_cast<size_t>(num_tasks));
  const int eval_per_task = std::max(1, s.eval_examples / num_tasks);
  for (int t = 0; t < num_tasks; ++t) {
    const auto& ev = per_task[static_cast<size_t>(t)].eval;
    eval_by_task[static_cast<size_t>(t)].assign(ev.begin(), ev.begin() + std::min<std::ptrdiff_t>(eval_per_task, static_cast<std::ptrdiff_t>(ev.size())));
  }
  std::vector<model::Example> pool;
  std::vector<int> labels;
  for (int t = 0; t < num_tasks; ++t)
    for (auto& e : per_task[static_cast<size_t>(t)].train) {
      pool.push_back(std::move(e));
      labels.push_back(t);
    }
  per_task.clear();

  Rng rng(s.seed);
  const auto kind = static_cast<PartitionKind>(static_cast<int>(c.data().partition()));
  FT_ASSIGN_OR_RETURN(auto parts, Partition(labels, num_tasks, s.clients, kind, s.alpha_dir, s.skew, rng));
  std::vector<ClientState> clients(static_cast<size_t>(s.clients));
  {
    int k = 0;
    for (int p = 0; p < std::max(1, c.profiles_size()); ++p) {
      const proto::ClientProfile prof = c.profiles_size() ? c.profiles(p) : proto::ClientProfile();
      const int count = c.profiles_size() ? prof.count() : s.clients;
      for (int i = 0; i < count; ++i, ++k) {
        ClientState& cl = clients[static_cast<size_t>(k)];
        cl.name = absl::StrFormat("client-%03d", k);
        cl.profile = prof.name().empty() ? "default" : prof.name();
        cl.speed = OrDefault(prof.speed(), 1.0);
        cl.bandwidth_mbps = OrDefault(prof.bandwidth_mbps(), 100.0);
        cl.latency_ms = OrDefault(prof.latency_ms(), 20.0);
        cl.dropout = prof.dropout();
        cl.memory_mib = prof.memory_mib();
      }
    }
    for (size_t k2 = 0; k2 < clients.size(); ++k2) {
      clients[k2].task_share.assign(static_cast<size_t>(num_tasks), 0.0);
      for (size_t i : parts[k2]) {
        clients[k2].train.push_back(pool[i]);
        clients[k2].task_share[static_cast<size_t>(labels[i])] += 1.0 / static_cast<double>(parts[k2].size());
      }
    }
  }
  const size_t pooled_examples = pool.size();
  pool.clear();
  pool.shrink_to_fit();
  say(absl::StrFormat("%d clients, %d tasks (%s), %zu training examples, partition %s; %d held-out examples for evaluation",
                      s.clients, num_tasks, absl::StrJoin(task_names, ", "), pooled_examples,
                      proto::DataConfig::Partition_Name(c.data().partition()), eval_per_task * num_tasks));

  // Global adapter.
  FT_ASSIGN_OR_RETURN(model::AdapterSet<float> adapters, model::MakeAdaptersWithLayout<float>(model->adapter_dims(), s.spec, s.modules, s.layout, s.adapter_seed));
  TensorMap global = worker::AdapterTensors(adapters);
  const int64_t global_bytes = worker::TensorBytes(global);
  say(absl::StrFormat("adapter %s: %lld trainable parameters (%.2f MiB per transfer)", model::AdapterKindName(s.spec.kind),
                      static_cast<long long>(adapters.NumTrainable()), global_bytes / 1048576.0));

  // Strategy (+ differential privacy).
  FT_ASSIGN_OR_RETURN(std::unique_ptr<aggregation::FedStrategy> fed, aggregation::FedStrategy::Create(s.strategy));
  std::unique_ptr<aggregation::Strategy> strategy = std::move(fed);
  const int expected = s.strategy.clients_per_round > 0 ? s.strategy.clients_per_round : s.clients;
  const bool secure = c.secure_aggregation().enabled();
  double central_clip = 0, central_z = 0;
  int noise_share = 1;  // central DP settings (clients need them under secure aggregation)
  if (c.dp().enabled() && !c.dp().local()) {
    aggregation::DpOptions d;
    d.noise_added_by_clients = secure;
    // Distributed noise is split over min_clients when set (so a round with that many survivors
    // still carries the full noise), else over the expected clients.
    d.noise_share_clients = s.strategy.min_clients > 1 ? s.strategy.min_clients : expected;
    noise_share = d.noise_share_clients;
    d.delta = OrDefault(c.dp().delta(), 1e-5);
    d.expected_clients = expected;
    d.population = s.clients;
    d.clip_norm = OrDefault(c.dp().clip_norm(), 0.1);
    d.adaptive_clipping = c.dp().adaptive_clipping();
    d.target_quantile = OrDefault(c.dp().target_quantile(), 0.5);
    d.noise_multiplier = c.dp().noise_multiplier();
    if (c.dp().target_epsilon() > 0) {
      FT_ASSIGN_OR_RETURN(d.noise_multiplier, privacy::NoiseMultiplierFor(c.dp().target_epsilon(), d.delta, static_cast<double>(expected) / s.clients, s.rounds));
      d.epsilon_budget = c.dp().target_epsilon() * (1 + 1e-9);
    }
    say(absl::StrFormat("differential privacy: z=%.4f, clip %.3g%s, q=%.3f, delta %.1e", d.noise_multiplier, d.clip_norm,
                        d.adaptive_clipping ? " (adaptive)" : "", static_cast<double>(expected) / s.clients, d.delta));
    central_clip = d.clip_norm;
    central_z = d.noise_multiplier;
    FT_ASSIGN_OR_RETURN(auto dp, aggregation::DpStrategy::Create(std::move(strategy), d));
    strategy = std::move(dp);
  }
  const double secure_range = OrDefault(c.secure_aggregation().value_range(), central_clip > 0 ? 4 * central_clip : 0.05);
  if (secure)
    say(absl::StrFormat("secure aggregation (SecAgg+): values within +-%.3g encoded exactly%s", secure_range,
                        central_clip > 0 ? "; DP noise added by the clients before masking" : ""));

  FT_ASSIGN_OR_RETURN(auto ledger, coordinator::RunLedger::Open(result.run_dir + "/ledger.sqlite"));
  FT_RETURN_IF_ERROR(ledger->SetRunInfo("strategy", strategy->Name()));
  FT_RETURN_IF_ERROR(ledger->SetRunInfo("config", o.config_text));

  worker::LocalTrainOptions lt;
  lt.finetune.steps = s.local_steps;
  lt.finetune.batch = s.batch;
  lt.finetune.recompute = !c.train().no_recompute();
  lt.finetune.activation_budget_mib = c.train().activation_budget_mib();
  lt.finetune.log_every = 0;
  lt.optimizer.lr = static_cast<float>(s.lr);
  lt.optimizer.warmup_steps = c.train().warmup_steps();
  lt.optimizer.total_steps = s.local_steps;
  lt.optimizer.min_lr_ratio = 1.0f;  // constant local rate: the schedule lives across rounds
  lt.optimizer.weight_decay = static_cast<float>(c.train().weight_decay());
  lt.optimizer.clip_norm = static_cast<float>(OrDefault(c.train().clip_norm(), 1.0));
  lt.send_fisher = s.strategy.merge == aggregation::MergeRule::kUncertainty && !secure;  // under secure aggregation nobody sees a Fisher
  const double dp_delta = OrDefault(c.dp().delta(), 1e-5);
  if (c.dp().enabled() && c.dp().local()) {
    lt.finetune.dp_clip = OrDefault(c.dp().clip_norm(), 1.0);
    lt.finetune.dp_noise_multiplier = c.dp().noise_multiplier();
    size_t smallest = SIZE_MAX;
    for (const ClientState& cl : clients) smallest = std::min(smallest, cl.train.size());
    const double q = std::min(1.0, static_cast<double>(s.batch) / static_cast<double>(smallest));
    if (c.dp().target_epsilon() > 0) {
      FT_ASSIGN_OR_RETURN(lt.finetune.dp_noise_multiplier,
                          privacy::NoiseMultiplierFor(c.dp().target_epsilon(), dp_delta, q, static_cast<int64_t>(s.rounds) * s.local_steps));
    }
    lt.send_fisher = false;  // data-dependent and not privatised
    say(absl::StrFormat("local DP-SGD in every client: sigma=%.4f, per-example clip %.3g, q=%.4f for the smallest client, delta %.1e",
                        lt.finetune.dp_noise_multiplier, lt.finetune.dp_clip, q, dp_delta));
  }
  std::vector<privacy::PrivacyLedger> client_ledgers(clients.size(), privacy::PrivacyLedger(0, dp_delta));

  // Evaluation of the current global adapter: per task, then the mean.
  std::vector<double> last_task_acc(static_cast<size_t>(num_tasks), 0.0);
  auto evaluate = [&](std::map<std::string, double>& m) -> absl::Status {
    FT_RETURN_IF_ERROR(worker::SetAdapterTensors(global, &adapters));
    double loss_sum = 0, acc_sum = 0;
    int64_t tokens = 0;
    int scored_tasks = 0;
    for (int t = 0; t < num_tasks; ++t) {
      FT_ASSIGN_OR_RETURN(model::EvalResult r, model::Evaluate(*model, &adapters, eval_by_task[static_cast<size_t>(t)], 0, s.max_new_tokens));
      const std::string& name = task_names[static_cast<size_t>(t)];
      loss_sum += r.loss * static_cast<double>(r.n_tokens);
      tokens += r.n_tokens;
      if (r.n_generated == 0) {  // a text domain: perplexity only
        m["ppl_" + name] = r.perplexity();
        last_task_acc[static_cast<size_t>(t)] = 0;
        continue;
      }
      m["acc_" + name] = r.accuracy();
      last_task_acc[static_cast<size_t>(t)] = r.accuracy();
      acc_sum += r.accuracy();
      ++scored_tasks;
    }
    m["eval_loss"] = tokens ? loss_sum / static_cast<double>(tokens) : 0.0;
    m["eval_ppl"] = std::exp(m["eval_loss"]);
    m["accuracy"] = scored_tasks ? acc_sum / scored_tasks : 0.0;
    return absl::OkStatus();
  };

  // Outputs written as the run goes.
  std::ofstream jsonl(result.run_dir + "/metrics.jsonl", std::ios::trunc);
  std::ofstream csv(result.run_dir + "/metrics.csv", std::ios::trunc);
  std::vector<std::string> csv_cols = {"round", "wall_seconds", "sim_round_seconds", "train_loss", "eval_loss", "eval_ppl", "accuracy",
                                       "accepted", "failures", "dropped", "epsilon", "local_epsilon", "bytes_up", "bytes_down", "update_norm", "client_lr", "client_seconds", "server_merge_seconds", "server_overhead_seconds"};
  bool header_written = false;
  auto emit = [&](const RoundRecord& r) {
    if (!header_written) {  // per-task columns (acc_* / ppl_*) from the first, evaluated record
      for (const auto& [k, v] : r.metrics)
        if (k.rfind("acc_", 0) == 0 || k.rfind("ppl_", 0) == 0) csv_cols.push_back(k);
      std::vector<std::string> esc;
      for (const auto& col : csv_cols) esc.push_back(CsvEscape(col));
      csv << absl::StrJoin(esc, ",") << "\n";
      header_written = true;
    }
    nlohmann::json j;
    j["round"] = r.round;
    j["evaluated"] = r.evaluated;
    for (const auto& [k, v] : r.metrics) j[k] = v;
    jsonl << j.dump() << "\n" << std::flush;
    std::vector<std::string> row;
    for (const auto& col : csv_cols) {
      if (col == "round") {
        row.push_back(std::to_string(r.round));
        continue;
      }
      auto it = r.metrics.find(col);
      row.push_back(it == r.metrics.end() ? "" : absl::StrFormat("%.6g", it->second));
    }
    csv << absl::StrJoin(row, ",") << "\n" << std::flush;
  };

  {
    RoundRecord r0;
    r0.round = 0;
    r0.evaluated = true;
    const auto t0 = Clock::now();
    say("evaluating the starting adapter (round 0)");
    FT_RETURN_IF_ERROR(evaluate(r0.metrics));
    r0.metrics["wall_seconds"] = Seconds(t0, Clock::now());
    result.accuracy_before = r0.metrics["accuracy"];
    say(absl::StrFormat("round 0: accuracy %.1f%%, eval loss %.4f", 100 * result.accuracy_before, r0.metrics["eval_loss"]));
    emit(r0);
    result.rounds.push_back(r0);
  }

  const int total_tasks = s.rounds * expected;
  int done_tasks = 0;
  double train_wall = 0;
  Rng sched_rng(s.seed ^ 0x5eedull);
  // Planning (issue 8): per-client modules, batch, local steps and base precision.
  std::map<std::string, planner::WorkerPlan> plans;
  std::map<kernels::GgmlType, std::unique_ptr<model::LlamaModel>> rebased;  // bases re-quantized for plans
  std::optional<planner::Plan> plan;
  const kernels::GgmlType stored_type = model->layer(0).wq.type;
  const planner::ModelShape shape = planner::ModelShape::Of(*model);
  planner::PlannerOptions po;
  std::map<model::Module, double> importance;
  std::vector<planner::WorkerProfile> wprof;  // refreshed from measured training speed each round
  // Loads a re-quantized copy of the base the first time a plan asks for one.
  auto ensure_base = [&](kernels::GgmlType t) -> absl::Status {
    if (t == stored_type || rebased.count(t)) return absl::OkStatus();
    FT_ASSIGN_OR_RETURN(auto m2, model::LlamaModel::Load(c.model().path()));
    FT_RETURN_IF_ERROR(m2->Requantize(t).status());
    rebased[t] = std::move(m2);
    return absl::OkStatus();
  };
  {
    std::vector<std::vector<model::Example>> all;
    std::vector<ClientForPlan> cp;
    for (const ClientState& cl : clients) {
      all.push_back(cl.train);
      cp.push_back({cl.name, cl.speed, cl.bandwidth_mbps, cl.latency_ms, cl.memory_mib});
    }
    const planner::Candidate uniform{s.modules, stored_type, s.batch, s.local_steps};
    FT_ASSIGN_OR_RETURN(po, PlannerOptionsFrom(c.planner(), s.spec, s.modules, uniform, LongestExample(all), lt.send_fisher, lt.finetune.recompute));
    if (c.planner().enabled()) {
      say("planner: calibration pass (probe adapter, module importance and training speed)");
      FT_ASSIGN_OR_RETURN(Calibration cal, Calibrate(*model, clients[0].train, s.spec, s.modules, s.batch,
                                                     OrDefault(c.planner().calibration_steps(), 4), s.seed));
      po.tokens_per_example = cal.tokens_per_example;
      std::vector<std::string> imp;
      for (const auto& [m, v] : cal.importance) imp.push_back(absl::StrFormat("%s %.0f%%", model::ModuleName(m), 100 * v));
      say(absl::StrFormat("planner: module importance %s; %.0f training tokens/s here (%.1f s)", absl::StrJoin(imp, ", "), cal.tokens_per_second,
                          cal.seconds));
      importance = cal.importance;
      wprof = ProfilesForPlan(cp, cal);
      FT_ASSIGN_OR_RETURN(plan, planner::MakePlan(shape, importance, wprof, po));
      FT_RETURN_IF_ERROR(ledger->SetRunInfo("plan", plan->summary));
      FT_RETURN_IF_ERROR(ledger->SetRunInfo("importance", absl::StrJoin(imp, ", ")));
      for (const planner::WorkerPlan& wp : plan->workers) {
        plans[wp.worker] = wp;
        say(absl::StrCat("planner: ", wp.worker, " ", wp.excluded ? wp.reason : wp.explanation));
        FT_RETURN_IF_ERROR(ledger->SetRunInfo("plan/" + wp.worker, wp.excluded ? wp.reason : wp.explanation));
        if (!wp.excluded) FT_RETURN_IF_ERROR(ensure_base(wp.c.base));
      }
      say("planner: " + plan->summary);
      // plan.json: what bench/run_plan.sh checks against measured peaks (fedtune train per plan).
      nlohmann::json pj;
      pj["summary"] = plan->summary;
      pj["seq"] = po.seq;
      pj["round_seconds"] = plan->round_seconds;
      pj["uniform_round_seconds"] = plan->uniform_round_seconds;
      for (const auto& [m, v] : cal.importance) pj["importance"][model::ModuleName(m)] = v;
      for (const planner::WorkerPlan& wp : plan->workers) {
        nlohmann::json w = {{"worker", wp.worker}, {"excluded", wp.excluded}, {"why", wp.excluded ? wp.reason : wp.explanation}};
        if (!wp.excluded) {
          std::vector<std::string> mods;
          for (auto m : wp.c.modules) mods.push_back(model::ModuleName(m));
          w["modules"] = absl::StrJoin(mods, ",");
          w["base"] = kernels::TypeTraits(wp.c.base).name;
          w["batch"] = wp.c.batch;
          w["local_steps"] = wp.c.local_steps;
          w["predicted_mib"] = wp.predicted_mib;
          w["predicted_seconds"] = wp.predicted_seconds;
        }
        pj["workers"].push_back(w);
      }
      FT_RETURN_IF_ERROR(WriteFileAtomic(result.run_dir + "/plan.json", pj.dump(1)));
    } else {
      for (const ClientState& cl : clients) {
        if (cl.memory_mib <= 0) continue;
        const double need = po.memory.PredictMiB(shape, s.spec, s.modules, uniform, po.seq);
        if (need > cl.memory_mib)
          say(absl::StrFormat("warning: %s has %.0f MiB but the uniform configuration needs %.0f MiB (memory model); it is simulated anyway",
                              cl.name, cl.memory_mib, need));
      }
    }
  }
  std::vector<std::string> names;
  for (const auto& cl : clients)
    if (!plans.count(cl.name) || !plans[cl.name].excluded) names.push_back(cl.name);
  if (names.empty()) return absl::FailedPreconditionError("planner: every client was left out (see the plan above)");
  std::map<std::string, size_t> index;
  for (size_t k = 0; k < clients.size(); ++k) index[clients[k].name] = k;

  double local_eps = 0;  // worst client's record-level epsilon so far (local DP-SGD)
  for (int round = 1; round <= s.rounds; ++round) {
    const auto t_round = Clock::now();
    RoundRecord rec;
    rec.round = round;
    // Client learning rate: cosine decay over the rounds to 10%. Every round restarts the local
    // AdamW, whose first steps move every coordinate by ~lr whatever its gradient, so a constant
    // rate keeps perturbing a converged adapter (measured: accuracy fell in the last round).
    const double progress = s.rounds > 1 ? static_cast<double>(round - 1) / (s.rounds - 1) : 0.0;
    lt.optimizer.lr = static_cast<float>(s.lr * (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * progress))));
    rec.metrics["client_lr"] = lt.optimizer.lr;
    std::vector<aggregation::ClientTask> tasks = strategy->ConfigureTrain(round, names, sched_rng);
    std::unique_ptr<aggregation::Aggregation> agg = strategy->BeginAggregate(round, global);
    std::unique_ptr<SecureRound> sec;
    int64_t round_examples = 0;  // public metadata: examples held by this round's clients
    for (const auto& t : tasks) round_examples += static_cast<int64_t>(clients[index.at(t.client)].train.size());
    std::map<std::string, std::pair<double, int64_t>> sec_weight;  // client -> (weight, examples)
    std::unique_ptr<privacy::NoiseSource> client_noise;
    if (secure) {
      std::vector<std::string> ids;
      for (const auto& t : tasks) ids.push_back(t.client);
      FT_ASSIGN_OR_RETURN(sec, SecureRound::Begin(ids, global, secure_range, c.secure_aggregation().degree(), c.secure_aggregation().threshold(),
                                                  s.seed * 7919 + static_cast<uint64_t>(round)));
      FT_ASSIGN_OR_RETURN(client_noise, privacy::NoiseSource::Create());
    }
    std::vector<aggregation::ClientFailure> failures;
    std::vector<coordinator::ClientRoundRecord> client_recs;
    std::map<std::string, double> observed_tps;  // simulated training speed seen this round (re-planning)
    double sim_round = 0, loss_sum = 0;
    int64_t bytes_up = 0, bytes_down = 0;
    int dropped = 0, trained = 0;
    double client_secs = 0;
    for (const aggregation::ClientTask& task : tasks) {
      ClientState& cl = clients[index.at(task.client)];
      const double comm_down = cl.latency_ms / 1000.0 + static_cast<double>(global_bytes) * 8 / (cl.bandwidth_mbps * 1e6);
      bytes_down += global_bytes;
      if (cl.dropout > 0 && sched_rng.Uniform() < cl.dropout) {
        ++dropped;
        ++cl.dropped;
        failures.push_back({cl.name, absl::UnavailableError("dropped out (simulated)")});
        client_recs.push_back({cl.name, "dropped", 0, 0, 0, 0});
        ++done_tasks;
        continue;
      }
      const auto t0 = Clock::now();
      worker::LocalResult lr;
      if (c.train().stand_in()) {
        lr = worker::StandInUpdate(global, cl.name, static_cast<int64_t>(cl.train.size()), lt.send_fisher, sched_rng.NextU64());
      } else {
        worker::LocalTrainOptions lt_k = lt;
        const model::LlamaModel* base = model.get();
        if (auto pit = plans.find(cl.name); pit != plans.end()) {
          const planner::Candidate& pc = pit->second.c;
          lt_k.finetune.batch = pc.batch;
          lt_k.finetune.steps = pc.local_steps;
          lt_k.optimizer.total_steps = pc.local_steps;
          lt_k.train_modules = pc.modules;
          if (pc.base != stored_type) base = rebased.at(pc.base).get();
        }
        FT_ASSIGN_OR_RETURN(lr, worker::TrainLocal(*base, cl.train, global, task.config, cl.name, lt_k, &adapters));
      }
      const double secs = Seconds(t0, Clock::now());
      if (lt.finetune.dp_clip > 0) {
        privacy::PrivacyLedger& pl = client_ledgers[index.at(task.client)];
        FT_RETURN_IF_ERROR(pl.Record({absl::StrCat("round ", round), std::min(1.0, static_cast<double>(s.batch) / static_cast<double>(cl.train.size())),
                                      lt.finetune.dp_noise_multiplier, s.local_steps}));
        FT_ASSIGN_OR_RETURN(privacy::Epsilon e, pl.Spent());
        local_eps = std::max(local_eps, e.epsilon);
      }
      train_wall += secs;
      client_secs += secs;
      if (plan && secs > 0 && lr.report.tokens > 0) observed_tps[cl.name] = static_cast<double>(lr.report.tokens) / (secs / cl.speed);
      const int64_t up = worker::TensorBytes(lr.update.delta) + worker::TensorBytes(lr.update.fisher);
      const double comm_up = cl.latency_ms / 1000.0 + static_cast<double>(up) * 8 / (cl.bandwidth_mbps * 1e6);
      sim_round = std::max(sim_round, comm_down + secs / cl.speed + comm_up);
      bytes_up += up;
      loss_sum += lr.report.final_loss;
      coordinator::ClientRoundRecord cr{cl.name, "ok", lr.update.num_examples, lr.report.final_loss, secs, up};
      absl::Status st;
      if (sec) {
        // Client side of secure aggregation: weight (equal under DP, after clipping and the
        // client's share of the noise), then mask; the server only ever sees the sum.
        double w = static_cast<double>(lr.update.num_examples) / static_cast<double>(round_examples);
        if (central_clip > 0) {
          w = 1.0;
          aggregation::ClipToNorm(lr.update.delta, central_clip);
          for (auto& [name, d] : lr.update.delta) client_noise->AddGaussian(d, central_z * central_clip / std::sqrt(static_cast<double>(noise_share)));
        }
        if (w != 1.0) aggregation::Scale(lr.update.delta, static_cast<float>(w));
        st = sec->Submit(cl.name, lr.update.delta);
        if (st.ok()) sec_weight[cl.name] = {w, lr.update.num_examples};
      } else {
        st = agg->Add(std::move(lr.update));
      }
      if (!st.ok()) {
        cr.status = absl::StrCat("rejected: ", st.message());
        failures.push_back({cl.name, st});
      } else {
        ++trained;
        ++cl.trained;
      }
      client_recs.push_back(cr);
      ++done_tasks;
      const double eta = train_wall / done_tasks * (total_tasks - done_tasks);
      if (o.progress && (tasks.size() <= 50 || done_tasks % 100 == 0))
        std::fprintf(stderr, "[simulate] round %d/%d  %s (%s) loss %.4f  %.1f s  [%d/%d client-rounds, ETA %.0f s]\n", round, s.rounds,
                     cl.name.c_str(), cl.profile.c_str(), cr.train_loss, secs, done_tasks, total_tasks, eta);
    }
    const auto t_server = Clock::now();
    if (sec) {
      FT_ASSIGN_OR_RETURN(SecureRound::Sum ssum, sec->Finish());
      double wsum = 0;
      int64_t ex = 0;
      for (const std::string& name : ssum.survivors) {
        wsum += sec_weight.at(name).first;
        ex += sec_weight.at(name).second;
      }
      if (!ssum.survivors.empty()) FT_RETURN_IF_ERROR(agg->AddSecureSum(ssum.sum, wsum, static_cast<int>(ssum.survivors.size()), ex));
      rec.metrics["secagg_clamped_values"] = static_cast<double>(ssum.clamped);
      rec.metrics["secagg_tampered_shares"] = static_cast<double>(ssum.tampered.size());
      for (const auto& t : ssum.tampered) say("secure aggregation: " + t);
      bytes_up = sec->bytes_up_per_client() * static_cast<int64_t>(ssum.survivors.size());
    }
    FT_ASSIGN_OR_RETURN(aggregation::Merged merged, agg->Merge());
    absl::StatusOr<aggregation::RoundResult> committed = strategy->Commit(round, global, std::move(merged), failures);
    if (committed.status().code() == absl::StatusCode::kResourceExhausted) {
      // The privacy budget refuses this round: nothing is released; the run ends here.
      say(absl::StrCat("stopping before round ", round, ": ", committed.status().message()));
      FT_RETURN_IF_ERROR(ledger->SetRunInfo("stopped", std::string(committed.status().message())));
      result.stopped_early = true;
      break;
    }
    FT_RETURN_IF_ERROR(committed.status());
    aggregation::RoundResult rr = std::move(*committed);
    if (plan && c.planner().replan_every_round() && rr.global && round < s.rounds) {
      // Re-plan for the next round: training speed from what each client just took (the
      // profile, refreshed), module importance blended with where the merged update moved
      // (its energy per value and module).
      planner::BlendImportance(importance, planner::UpdateEnergy(global, *rr.global, s.modules));
      for (planner::WorkerProfile& w : wprof)
        if (auto it = observed_tps.find(w.name); it != observed_tps.end()) w.tokens_per_second = 0.5 * w.tokens_per_second + 0.5 * it->second;
      FT_ASSIGN_OR_RETURN(planner::Plan next, planner::MakePlan(shape, importance, wprof, po));
      int changed = 0;
      for (const planner::WorkerPlan& wp : next.workers) {
        const planner::WorkerPlan& old = plans[wp.worker];
        if (wp.excluded != old.excluded || wp.c.modules != old.c.modules || wp.c.batch != old.c.batch || wp.c.local_steps != old.c.local_steps ||
            wp.c.base != old.c.base) {
          ++changed;
          say(absl::StrCat("planner: round ", round + 1, ": ", wp.worker, " ", wp.excluded ? wp.reason : wp.explanation));
        }
        if (!wp.excluded) FT_RETURN_IF_ERROR(ensure_base(wp.c.base));
        plans[wp.worker] = wp;
      }
      FT_RETURN_IF_ERROR(ledger->SetRunInfo(absl::StrCat("plan/round-", round + 1), next.summary));
      say(absl::StrFormat("planner: re-planned for round %d (%d clients changed): %s", round + 1, changed, next.summary));
      rec.metrics["planned_round_seconds"] = plan->round_seconds;  // what this round was planned at
      plan = std::move(next);
    } else if (plan) {
      rec.metrics["planned_round_seconds"] = plan->round_seconds;
    }
    if (rr.global) global = std::move(*rr.global);
    for (const auto& [k, v] : rr.metrics) rec.metrics[k] = v;
    rec.metrics["train_loss"] = trained ? loss_sum / trained : 0.0;
    rec.metrics["dropped"] = dropped;
    rec.metrics["bytes_up"] = static_cast<double>(bytes_up);
    rec.metrics["bytes_down"] = static_cast<double>(bytes_down);
    rec.metrics["sim_round_seconds"] = sim_round;
    rec.metrics["server_merge_seconds"] = Seconds(t_server, Clock::now());
    rec.metrics["client_seconds"] = client_secs;
    if (lt.finetune.dp_clip > 0) rec.metrics["local_epsilon"] = local_eps;
    double eval_secs = 0;
    if (round % s.eval_every == 0 || round == s.rounds) {
      rec.evaluated = true;
      const auto t_eval = Clock::now();
      FT_RETURN_IF_ERROR(evaluate(rec.metrics));
      eval_secs = Seconds(t_eval, Clock::now());
    }
    const auto t_persist = Clock::now();
    FT_RETURN_IF_ERROR(worker::SetAdapterTensors(global, &adapters));
    FT_RETURN_IF_ERROR(model::SaveAdapters(result.run_dir + "/adapter.safetensors", adapters));
    rec.metrics["wall_seconds"] = Seconds(t_round, Clock::now());
    // Everything that is neither client training nor evaluation: sampling, validation, merging,
    // the server update, checkpointing (the ledger commit follows and is not included).
    rec.metrics["server_overhead_seconds"] = rec.metrics["wall_seconds"] - client_secs - eval_secs;
    rec.metrics["checkpoint_seconds"] = Seconds(t_persist, Clock::now());
    FT_RETURN_IF_ERROR(ledger->CommitRound(round, rec.metrics, client_recs));
    emit(rec);
    std::string line = absl::StrFormat("round %d/%d done in %.0f s: %d updates, %d dropped, train loss %.4f", round, s.rounds,
                                       rec.metrics["wall_seconds"], trained, dropped, rec.metrics["train_loss"]);
    if (rec.evaluated) absl::StrAppend(&line, absl::StrFormat(", eval loss %.4f, accuracy %.1f%%", rec.metrics["eval_loss"], 100 * rec.metrics["accuracy"]));
    if (rec.metrics.count("epsilon")) absl::StrAppend(&line, absl::StrFormat(", epsilon %.3f", rec.metrics["epsilon"]));
    say(line);
    result.rounds.push_back(std::move(rec));
  }
  if (!result.rounds.back().evaluated) {  // stopped early between evaluations: score the final adapter
    RoundRecord& last = result.rounds.back();
    FT_RETURN_IF_ERROR(evaluate(last.metrics));
    last.evaluated = true;
  }
  result.accuracy_after = result.rounds.back().metrics["accuracy"];

  // Exports of the final global adapter.
  FT_RETURN_IF_ERROR(worker::SetAdapterTensors(global, &adapters));
  if (s.spec.kind != model::AdapterKind::kDiaBlo) FT_RETURN_IF_ERROR(model::ExportPeft(result.run_dir + "/peft", *model, adapters, c.model().path()));
  FT_RETURN_IF_ERROR(model::ExportGgufLora(result.run_dir + "/adapter-lora.gguf", *model, adapters));

  // Centralized baseline with the same number of examples processed.
  if (c.centralized_baseline()) {
    say("centralized baseline on the pooled client data (same example budget)");
    std::vector<model::Example> all;
    for (const auto& cl : clients) all.insert(all.end(), cl.train.begin(), cl.train.end());
    FT_ASSIGN_OR_RETURN(model::AdapterSet<float> central, model::MakeAdaptersWithLayout<float>(model->adapter_dims(), s.spec, s.modules, s.layout, s.adapter_seed));
    model::FinetuneOptions ft = lt.finetune;
    ft.steps = s.rounds * s.local_steps * expected;
    model::OptimizerConfig oc = lt.optimizer;
    oc.total_steps = ft.steps;
    model::AdamW opt(oc);
    FT_ASSIGN_OR_RETURN(model::TrainReport rep, model::Finetune(*model, all, ft, &central, &opt));
    double acc = 0;
    int scored = 0;
    for (int t = 0; t < num_tasks; ++t) {
      FT_ASSIGN_OR_RETURN(model::EvalResult r, model::Evaluate(*model, &central, eval_by_task[static_cast<size_t>(t)], 0, s.max_new_tokens));
      if (r.n_generated == 0) continue;
      acc += r.accuracy();
      ++scored;
    }
    result.centralized_accuracy = scored ? acc / scored : 0.0;
    say(absl::StrFormat("centralized: %d steps in %.0f s, accuracy %.1f%%", rep.steps, rep.seconds, 100 * result.centralized_accuracy));
    FT_RETURN_IF_ERROR(ledger->SetRunInfo("centralized_accuracy", absl::StrCat(result.centralized_accuracy)));
  }

  result.wall_seconds = Seconds(t_start, Clock::now());
  result.peak_rss_mib = PeakRssMiB();

  // Report.
  ReportInput rin;
  rin.title = absl::StrCat("fedtune simulation: ", strategy->Name(), ", ", model::AdapterKindName(s.spec.kind));
  rin.config_text = o.config_text;
  rin.rounds = result.rounds;
  rin.summary_lines = {
      absl::StrFormat("Held-out exact-match accuracy: %.1f%% before, %.1f%% after %d rounds", 100 * result.accuracy_before,
                      100 * result.accuracy_after, s.rounds),
      absl::StrFormat("%d clients (%d per round), tasks: %s, partition %s", s.clients, expected, absl::StrJoin(task_names, ", "),
                      proto::DataConfig::Partition_Name(c.data().partition())),
      absl::StrFormat("Wall time %.0f s on this machine, peak RSS %.0f MiB", result.wall_seconds, result.peak_rss_mib)};
  if (result.centralized_accuracy >= 0)
    rin.summary_lines.push_back(absl::StrFormat("Centralized baseline, same example budget: %.1f%%", 100 * result.centralized_accuracy));
  for (const ClientState& cl : clients) {
    ClientSummary cs{cl.name, cl.profile, static_cast<int64_t>(cl.train.size()), "", cl.trained, cl.dropped, 0.0};
    std::vector<std::string> mix;
    for (int t = 0; t < num_tasks; ++t) {
      const double share = cl.task_share[static_cast<size_t>(t)];
      cs.accuracy_after += share * last_task_acc[static_cast<size_t>(t)];
      if (share > 0) mix.push_back(absl::StrFormat("%s %.0f%%", task_names[static_cast<size_t>(t)], 100 * share));
    }
    cs.task_mix = absl::StrJoin(mix, ", ");
    rin.clients.push_back(cs);
  }
  if (plan) {
    rin.plan_summary = plan->summary;
    for (const planner::WorkerPlan& wp : plan->workers) rin.plan.push_back({wp.worker, wp.excluded ? wp.reason : wp.explanation});
    rin.summary_lines.push_back("Planned: " + plan->summary);
  }
  FT_RETURN_IF_ERROR(WriteReport(result.run_dir + "/report.html", rin));
  return result;
}

}  // namespace fedtune::sim

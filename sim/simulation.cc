#include "sim/simulation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "aggregation/hetero_rank.h"
#include "common/config_loader.h"
#include "common/mapped_file.h"
#include "common/progress.h"
#include "common/rng.h"
#include "aggregation/compression.h"
#include "federation/settings.h"
#include "kernels/backend.h"
#include "kernels/quant.h"
#include "model/adapter_io.h"
#include "model/export.h"
#include "model/tasks.h"
#include "nlohmann/json.hpp"
#include "privacy/rdp_accountant.h"
#include "protocol/adapter_tensors.h"
#include "sim/partition.h"
#include "sim/planning.h"
#include "sim/report.h"
#include "worker/client.h"
#include "worker/local_trainer.h"
#include "worker/secure_client.h"

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

// The simulation's own keys (clients and data); the round's keys resolve in federation/settings.
struct Settings {
  int clients, examples_per_task, eval_examples, max_len;
  double alpha_dir, skew;
  uint64_t seed;
  federation::RunSettings run;
};

absl::StatusOr<Settings> Resolve(const proto::SimulationConfig& c) {
  Settings s;
  s.clients = c.clients();
  if (s.clients < 1 || s.clients > 100000) return Bad("clients", "must be in [1, 100000]");
  FT_ASSIGN_OR_RETURN(s.run, federation::ResolveRun(c, s.clients));
  s.seed = s.run.seed;
  s.examples_per_task = OrDefault(c.data().examples_per_task(), 400);
  s.eval_examples = OrDefault(c.data().eval_examples(), 40);
  s.max_len = OrDefault(c.data().max_len(), 128);
  s.alpha_dir = OrDefault(c.data().dirichlet_alpha(), 0.5);
  s.skew = OrDefault(c.data().size_skew(), 1.0);
  if (!(c.data().holdout() >= 0 && c.data().holdout() < 1)) return Bad("data.holdout", "must be in (0, 1) (0 or unset: 0.15)");
  if (s.examples_per_task < 1 || s.eval_examples < 1 || s.max_len < 8)
    return Bad("data", "examples_per_task and eval_examples must be >= 1 and max_len >= 8");
  if (c.train().activation_budget_mib() < -1) return Bad("train.activation_budget_mib", "must be -1 (recompute), 0 (as memory allows) or a budget in MiB");
  if (c.train().activation_budget_mib() != 0 && c.train().no_recompute())
    return Bad("train.activation_budget_mib", "choose one: no_recompute keeps every activation, the budget decides per batch");
  if (c.train().activation_budget_mib() > 0 && c.planner().enabled())
    return Bad("train.activation_budget_mib",
               "a fixed budget is not in the planner's memory model: leave it 0 (activations kept as each client's memory allows) or -1 (recompute)");
  if (!c.train().device().empty()) {
    if (auto b = kernels::SelectBackend(c.train().device()); !b.ok()) return Bad("train.device", std::string(b.status().message()));
  }
  if (c.planner().enabled() && c.train().stand_in()) return Bad("planner", "needs real training (train.stand_in is set)");
  if (!c.train().compensation_cache().empty() && c.train().compensation().empty())
    return Bad("train.compensation_cache", "keeps compensated bases: set train.compensation");
  if (!c.eval().data().empty() && c.data().client_files_size() == 0)
    return Bad("eval.data", "with data.client_files only (otherwise the simulation scores its own held-out split)");
  return s;
}

struct ClientState {
  std::string name, profile;
  double speed = 1, bandwidth_mbps = 100, latency_ms = 20, dropout = 0, memory_mib = 0;
  std::string base_type;  // its profile's base (empty: the run's)
  int64_t rank = 0;       // its profile's LoRA rank (0: adapter.rank)
  std::vector<model::Module> train_modules;  // its profile's modules (empty: all)
  std::vector<model::Example> train;
  std::vector<double> task_share;  // fraction of its examples per task
  int trained = 0, dropped = 0;
  int steps = 0;                   // local optimizer steps trained in the federation (all rounds)
  worker::LocalPrivacy privacy;    // its record-level epsilon under local DP-SGD
  aggregation::TensorMap residual;  // compressed uploads: what compression dropped (error feedback)
  std::optional<planner::WorkerProfile> plan_profile;  // refreshed from simulated training speed
};

std::string CsvEscape(const std::string& s) { return s.find_first_of(",\"") == std::string::npos ? s : "\"" + s + "\""; }

// The base a client trains a task on: its profile's base type, else the plan's, else the stored.
kernels::GgmlType TrainedBase(const protocol::TrainTask& task, const ClientState& cl, kernels::GgmlType stored) {
  const std::string& name = !cl.base_type.empty() ? cl.base_type : task.plan.base_type;
  const auto t = name.empty() ? std::nullopt : kernels::GgmlTypeFromName(name);
  return t ? *t : stored;
}

// The in-process transport: every selected client trains in turn (worker::RunTrainTask on the
// shared base), a simulated clock adds its links; the server-side evaluation scores the global
// adapter on each task's held-out examples; outputs are written as rounds commit.
class SimTransport : public federation::Transport {
 public:
  SimTransport(const proto::SimulationConfig& c, const Settings& s, std::vector<ClientState>& clients, model::LlamaModel& model,
               model::AdapterSet<float>& adapters, const std::vector<std::string>& task_names,
               const std::vector<std::vector<model::Example>>& eval_by_task, const std::string& run_dir, const SimOptions& o,
               kernels::Backend* backend)
      : c_(c), s_(s), clients_(clients), model_(model), bases_(model, c.model().path()), adapters_(adapters), task_names_(task_names),
        eval_by_task_(eval_by_task), run_dir_(run_dir), o_(o), sched_rng_(s.seed ^ 0x5eedull),
        last_task_acc_(task_names.size(), 0.0) {
    for (size_t k = 0; k < clients_.size(); ++k) index_[clients_[k].name] = k;
    bases_.SetCacheDir(c.train().compensation_cache());
    env_.recompute = !c.train().no_recompute();
    env_.activation_budget_mib = c.train().activation_budget_mib();
    env_.backend = backend;
    total_tasks_ = s.run.rounds * s.run.expected_clients;
    jsonl_.open(run_dir + "/metrics.jsonl", std::ios::trunc);
    csv_.open(run_dir + "/metrics.csv", std::ios::trunc);
  }

  absl::StatusOr<std::vector<federation::ClientInfo>> Available(int, int, int) override {
    std::vector<federation::ClientInfo> v;
    for (const ClientState& cl : clients_) v.push_back({cl.name, static_cast<int64_t>(cl.train.size()), cl.plan_profile, cl.rank, cl.train_modules});
    return v;
  }

  absl::Status Train(int round, const TensorMap& global, const std::vector<protocol::TrainTask>& tasks, federation::Collector& col,
                     std::map<std::string, double>& m) override {
    const int64_t global_bytes = worker::TensorBytes(global);
    double sim_round = 0, client_secs = 0;
    int64_t bytes_up = 0, bytes_down = 0;
    int dropped = 0;
    // Secure aggregation: every selected client agrees keys and shares before training (the
    // engine's SecureServer relays them); a client that drops out later is unmasked by the others.
    federation::SecureServer* sec = col.secure();
    std::map<std::string, std::unique_ptr<worker::SecureClient>> secure;
    if (sec) {
      for (const protocol::TrainTask& task : tasks) {
        FT_ASSIGN_OR_RETURN(secure[task.client], worker::SecureClient::Create(task, global));
        FT_RETURN_IF_ERROR(sec->Keys(task.client, secure[task.client]->Advertise()));
      }
      for (const protocol::TrainTask& task : tasks) {
        FT_ASSIGN_OR_RETURN(auto shares, secure[task.client]->ShareKeys(sec->KeysFor(task.client)));
        FT_RETURN_IF_ERROR(sec->Shares(task.client, shares));
      }
    }
    for (const protocol::TrainTask& task : tasks) {
      ClientState& cl = clients_[index_.at(task.client)];
      const double comm_down = cl.latency_ms / 1000.0 + static_cast<double>(global_bytes) * 8 / (cl.bandwidth_mbps * 1e6);
      bytes_down += global_bytes;
      ++done_tasks_;
      if (cl.dropout > 0 && sched_rng_.Uniform() < cl.dropout) {
        ++dropped;
        ++cl.dropped;
        col.Fail(cl.name, absl::UnavailableError("dropped out (simulated)"), "dropped");
        continue;
      }
      const auto t0 = Clock::now();
      worker::LocalResult lr;
      std::optional<aggregation::TensorMap> residual_in;
      if (c_.train().stand_in()) {
        aggregation::TensorMap own = global;  // a lower-rank task updates the global's first components (its blocks)
        if (protocol::TrainsPart(task.plan)) {
          FT_ASSIGN_OR_RETURN(own, aggregation::TruncateRank(global, protocol::FullShare(task.plan), task.plan.train_rank,
                                                          protocol::FirstBlock(task.plan, task.round)));
        }
        lr = worker::StandInUpdate(own, cl.name, static_cast<int64_t>(cl.train.size()), task.send_fisher, sched_rng_.NextU64());
      } else {
        worker::ClientEnv env = env_;
        env.memory_mib = cl.memory_mib;  // 0 (not simulated): the default activation budget
        env.error_feedback = &cl.residual;
        // The residual going in, restored if the update does not count (as a worker daemon rolls back).
        if (task.error_feedback && !task.compression.empty() && task.compression != "none") residual_in = cl.residual;
        // A cloq/gptq base is calibrated on the data of the first client that trains on it (one
        // shared base per type and compensation in the simulation; a worker daemon uses its own).
        bases_.SetCalibration(cl.train);
        protocol::TrainTask own = task;
        if (!cl.base_type.empty()) own.plan.base_type = cl.base_type;
        absl::StatusOr<worker::LocalResult> trained = worker::RunTrainTask(bases_, cl.train, own, global, env, &cl.privacy);
        if (const std::optional<worker::Decline> d = trained.ok() ? std::nullopt : worker::DeclineFrom(trained.status())) {
          // Over its memory budget: nothing trained; the engine records it and re-plans it.
          col.Decline(cl.name, d->reason, d->needed_mib, d->budget_mib, d->device);
          continue;
        }
        FT_RETURN_IF_ERROR(trained.status());
        lr = std::move(*trained);
      }
      const double secs = Seconds(t0, Clock::now());
      train_wall_ += secs;
      client_secs += secs;
      if (cl.plan_profile && lr.report.seconds > 0 && lr.report.tokens > 0) {
        // Re-planning: the speed this client showed, in the profile's terms (training only, not
        // building a new base; at the stored type, recomputing: base_speed and keep_speedup scale
        // it back per candidate).
        const auto kept = lr.update.metrics.find("activations_kept");
        const double factor = cl.plan_profile->BaseSpeed(TrainedBase(task, cl, model_.layer(0).wq.type)) * cl.plan_profile->BatchSpeed(task.batch) *
                              (kept != lr.update.metrics.end() && kept->second > 0 ? std::clamp(cl.plan_profile->keep_speedup, 1.0, 4.0) : 1.0);
        cl.plan_profile->tokens_per_second =
            0.5 * cl.plan_profile->tokens_per_second + 0.5 * static_cast<double>(lr.report.tokens) / (lr.report.seconds / cl.speed) / factor;
      }
      int64_t up = protocol::UpdateBytes(lr.update);
      const double loss = lr.report.final_loss;
      if (sec) {
        worker::SecureClient& sc = *secure[task.client];
        FT_ASSIGN_OR_RETURN(std::vector<uint32_t> y, sc.Mask(lr.update, sec->SharesFor(task.client)));
        up = static_cast<int64_t>(y.size() * sizeof(uint32_t));
        lr.update.metrics["secagg_clamped"] = static_cast<double>(sc.clamped());
        if (col.AddMasked(task.client, std::move(y), lr.update.num_examples, lr.update.metrics).ok()) ++cl.trained;
      } else if (col.Add(std::move(lr.update)).ok()) {
        ++cl.trained;
      } else if (residual_in) {
        cl.residual = std::move(*residual_in);
      }
      cl.steps += task.local_steps;
      const double comm_up = cl.latency_ms / 1000.0 + static_cast<double>(up) * 8 / (cl.bandwidth_mbps * 1e6);
      sim_round = std::max(sim_round, comm_down + secs / cl.speed + comm_up);
      bytes_up += up;
      const double eta = train_wall_ / done_tasks_ * std::max(0, total_tasks_ - done_tasks_);
      if (o_.progress && (tasks.size() <= 50 || done_tasks_ % 100 == 0))
        std::fprintf(stderr, "[simulate] round %d/%d  %s (%s) loss %.4f  %.1f s  [%d/%d client-rounds, ETA %.0f s]\n", round, s_.run.rounds,
                     cl.name.c_str(), cl.profile.c_str(), loss, secs, done_tasks_, total_tasks_, eta);
    }
    if (sec) {  // the survivors reveal what the server needs to unmask the sum
      const std::vector<int> gone = sec->Dropped(), alive = sec->Survivors();
      for (int id : alive) {
        const std::string& name = sec->clients()[static_cast<size_t>(id)];
        auto reply = secure[name]->Unmask(gone, alive);
        // A client that refuses (too few survivors, or too few of them training a value it
        // trains) sends nothing, as a worker daemon does; the server cannot unmask the round.
        if (!reply.ok() && (absl::IsFailedPrecondition(reply.status()) || absl::IsPermissionDenied(reply.status()))) continue;
        FT_RETURN_IF_ERROR(reply.status());
        FT_RETURN_IF_ERROR(sec->Unmask(name, *reply));
      }
      bytes_up = sec->bytes_up();
    }
    m["dropped"] = dropped;
    m["bytes_up"] = static_cast<double>(bytes_up);
    m["bytes_down"] = static_cast<double>(bytes_down);
    m["sim_round_seconds"] = sim_round;
    m["client_seconds"] = client_secs;
    return absl::OkStatus();
  }

  // Per task, then the mean.
  absl::Status Evaluate(int, const TensorMap& global, std::map<std::string, double>& m) override {
    if (task_names_.empty()) return absl::OkStatus();  // nothing held out (client_files without eval.data)
    FT_RETURN_IF_ERROR(worker::SetAdapterTensors(global, &adapters_));
    double loss_sum = 0, acc_sum = 0, rouge_sum = 0;
    int64_t tokens = 0;
    int scored_tasks = 0;
    for (size_t t = 0; t < task_names_.size(); ++t) {
      FT_ASSIGN_OR_RETURN(model::EvalResult r, model::Evaluate(model_, &adapters_, eval_by_task_[t], 0, s_.run.max_new_tokens, 8, s_.run.generate_examples));
      const std::string& name = task_names_[t];
      last_eval_[static_cast<int>(t)] = r;
      loss_sum += r.loss * static_cast<double>(r.n_tokens);
      tokens += r.n_tokens;
      if (r.n_generated == 0) {  // a text domain: perplexity only
        m["ppl_" + name] = r.perplexity();
        last_task_acc_[t] = 0;
        continue;
      }
      m["acc_" + name] = r.accuracy();
      m["rouge_" + name] = r.rouge_l();
      last_task_acc_[t] = r.accuracy();
      acc_sum += r.accuracy();
      rouge_sum += r.rouge_l();
      ++scored_tasks;
    }
    m["eval_loss"] = tokens ? loss_sum / static_cast<double>(tokens) : 0.0;
    m["eval_ppl"] = std::exp(m["eval_loss"]);
    m["accuracy"] = scored_tasks ? acc_sum / scored_tasks : 0.0;
    m["rouge_l"] = scored_tasks ? rouge_sum / scored_tasks : 0.0;
    return absl::OkStatus();
  }

  absl::Status Committed(const RoundRecord& r, const TensorMap& global) override {
    if (r.round > 0) {
      FT_RETURN_IF_ERROR(worker::SetAdapterTensors(global, &adapters_));
      FT_RETURN_IF_ERROR(model::SaveAdapters(run_dir_ + "/adapter.safetensors", adapters_));
    }
    Emit(r);
    return absl::OkStatus();
  }

  const std::vector<double>& last_task_acc() const { return last_task_acc_; }
  // Per task, the last evaluation's result (the final global adapter's after the run: the last
  // round is always evaluated).
  const std::map<int, model::EvalResult>& last_eval() const { return last_eval_; }

 private:
  void Emit(const RoundRecord& r) {
    if (!header_written_) {  // per-task columns (acc_* / rouge_* / ppl_*) from the first, evaluated record
      for (const auto& [k, v] : r.metrics)
        if (k.rfind("acc_", 0) == 0 || (k.rfind("rouge_", 0) == 0 && k != "rouge_l") || k.rfind("ppl_", 0) == 0) csv_cols_.push_back(k);
      std::vector<std::string> esc;
      for (const auto& col : csv_cols_) esc.push_back(CsvEscape(col));
      csv_ << absl::StrJoin(esc, ",") << "\n";
      header_written_ = true;
    }
    nlohmann::json j;
    j["round"] = r.round;
    j["evaluated"] = r.evaluated;
    for (const auto& [k, v] : r.metrics) j[k] = v;
    jsonl_ << j.dump() << "\n" << std::flush;
    std::vector<std::string> row;
    for (const auto& col : csv_cols_) {
      if (col == "round") {
        row.push_back(std::to_string(r.round));
        continue;
      }
      auto it = r.metrics.find(col);
      row.push_back(it == r.metrics.end() ? "" : absl::StrFormat("%.6g", it->second));
    }
    csv_ << absl::StrJoin(row, ",") << "\n" << std::flush;
  }

  const proto::SimulationConfig& c_;
  const Settings& s_;
  std::vector<ClientState>& clients_;
  model::LlamaModel& model_;
  worker::BaseModels bases_;
  model::AdapterSet<float>& adapters_;
  const std::vector<std::string>& task_names_;
  const std::vector<std::vector<model::Example>>& eval_by_task_;
  const std::string run_dir_;
  const SimOptions& o_;
  worker::ClientEnv env_;
  Rng sched_rng_;  // dropouts and stand-in updates
  std::map<std::string, size_t> index_;
  std::vector<double> last_task_acc_;
  std::map<int, model::EvalResult> last_eval_;
  int done_tasks_ = 0, total_tasks_ = 0;
  double train_wall_ = 0;
  std::ofstream jsonl_, csv_;
  std::vector<std::string> csv_cols_ = {"round", "wall_seconds", "sim_round_seconds", "train_loss", "eval_loss", "eval_ppl", "accuracy", "rouge_l",
                                        "accepted", "failures", "dropped", "epsilon", "local_epsilon", "bytes_up", "bytes_down", "update_norm",
                                        "client_lr", "client_seconds", "server_merge_seconds", "overhead_seconds"};
  bool header_written_ = false;
};

}  // namespace

absl::Status ValidateConfig(const proto::SimulationConfig& c) {
  FT_ASSIGN_OR_RETURN(Settings s, Resolve(c));
  if (!fs::exists(c.model().path())) return Bad("model.path", absl::StrCat("no such file: ", c.model().path()));
  if (c.profiles_size() > 0) {
    int total = 0;
    for (int i = 0; i < c.profiles_size(); ++i) {
      const auto& p = c.profiles(i);
      const std::string key = absl::StrCat("profiles[", i, "]");
      if (p.count() < 1) return Bad(key + ".count", "must be >= 1");
      if (p.speed() < 0 || p.bandwidth_mbps() < 0 || p.latency_ms() < 0) return Bad(key, "speed, bandwidth_mbps, latency_ms must be >= 0");
      if (p.dropout() < 0 || p.dropout() >= 1) return Bad(key + ".dropout", "must be in [0, 1)");
      if (p.memory_mib() < 0) return Bad(key + ".memory_mib", "must be >= 0");
      if (const auto bt = kernels::GgmlTypeFromName(p.base_type()); !p.base_type().empty() && (!bt || !kernels::CanQuantize(*bt)))
        return Bad(key + ".base_type", "not a type fedtune re-quantizes to (q8_0, q4_0, q4_1, nf4, nf4_dq, q3_k, nf3, q2_k, nf2)");
      if (!p.base_type().empty() && c.planner().enabled()) return Bad(key + ".base_type", "not with the planner (it chooses each client's base)");
      const bool diablo = s.run.adapter.spec.kind == model::AdapterKind::kDiaBlo;
      if (diablo && p.rank() != 0) return Bad(key + ".rank", "a DiaBlo adapter has blocks, not ranks (profiles[].blocks)");
      if (!diablo && p.blocks() != 0) return Bad(key + ".blocks", "only for adapter.kind DIABLO (LoRA: profiles[].rank)");
      const int share = diablo ? p.blocks() : p.rank();
      const std::string share_key = key + (diablo ? ".blocks" : ".rank");
      const int64_t full = s.run.adapter.spec.FullShare();
      if (share < 0 || share > full)
        return Bad(share_key, diablo ? absl::StrCat("must be in [1, adapter.blocks = ", full, "] (0 or unset: adapter.blocks)")
                                     : absl::StrCat("must be in [1, adapter.rank = ", full, "] (0 or unset: adapter.rank)"));
      if (share > 0 && share < full) {
        if (c.planner().enabled()) return Bad(share_key, "not with the planner (planner.ranks: it chooses each client's rank)");
        FT_RETURN_IF_ERROR(federation::CheckHeteroRanks(s.run, share_key));
      }
      if (!p.modules().empty()) {
        const auto mods = model::ParseModules(p.modules());
        if (!mods.ok()) return Bad(key + ".modules", std::string(mods.status().message()));
        for (model::Module m : *mods)
          if (std::find(s.run.adapter.modules.begin(), s.run.adapter.modules.end(), m) == s.run.adapter.modules.end())
            return Bad(key + ".modules", absl::StrCat(model::ModuleName(m), " is not one of adapter.modules"));
        if (c.planner().enabled()) return Bad(key + ".modules", "not with the planner (it chooses each client's modules)");
        if (!s.run.adapter.layout.empty()) return Bad(key + ".modules", "not with per-layer adapter settings (adapter.layers)");
        if (s.run.secure.enabled && s.run.dp.central) return Bad(key + ".modules", "not with secure aggregation under central DP (the noisy sum assumes every client trains every value)");
      }
      total += p.count();
    }
    if (total != s.clients) return Bad("profiles", absl::StrCat("counts add up to ", total, ", but clients is ", s.clients));
  }
  {
    bool requantized = !c.train().base_type().empty() || c.planner().base_types_size() > 0;
    for (const auto& p : c.profiles()) requantized = requantized || !p.base_type().empty();
    if (!s.run.compensation.empty() && !requantized)
      return Bad("train.compensation", "compensates a re-quantized base: set train.base_type, planner.base_types or profiles[].base_type");
    // The simulation's train.base_type re-quantizes the one shared model (server-side evaluation
    // and baselines included); compensated copies are per client (worker::BaseModels), so mixing
    // the two would evaluate on another base than the one trained on.
    if (!s.run.compensation.empty() && !c.train().base_type().empty())
      return Bad("train.compensation", "with train.base_type in the simulation: give the clients their base with profiles[].base_type");
  }
  if (c.data().client_files_size() > 0) {
    if (!c.data().tasks().empty() || !c.data().files().empty() || !c.data().text_domains().empty())
      return Bad("data.client_files", "instead of data.tasks, data.files and data.text_domains, not with them");
    if (c.data().client_files_size() != s.clients)
      return Bad("data.client_files", absl::StrCat(c.data().client_files_size(), " files for ", s.clients, " clients"));
    for (const std::string& f : c.data().client_files())
      if (!fs::exists(f)) return Bad("data.client_files", absl::StrCat("no such file: ", f));
    if (!c.eval().data().empty() && !fs::exists(c.eval().data())) return Bad("eval.data", absl::StrCat("no such file: ", c.eval().data()));
    return absl::OkStatus();
  }
  if (c.data().tasks().empty() && c.data().files().empty() && c.data().text_domains().empty())
    return Bad("data", "name at least one of data.tasks, data.files, data.text_domains or data.client_files");
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
  return absl::OkStatus();
}

namespace {
// The simulation's data: every task (or file) split into train and held-out, the training pool
// partitioned over the clients (deterministic in the config: a client process of a
// cross-machine simulation computes the same split and takes its own part).
struct SimData {
  std::vector<std::string> task_names;
  std::vector<std::vector<model::Example>> eval_by_task;
  std::vector<std::vector<model::Example>> client_train;
  std::vector<std::vector<double>> task_share;  // per client: fraction of its examples per task
  size_t pooled_examples = 0;
  int eval_per_task = 0;
};

absl::StatusOr<SimData> BuildSimData(const proto::SimulationConfig& c, const Settings& s, const model::Tokenizer& tok) {
  SimData out;
  std::vector<std::string>& task_names = out.task_names;
  // Data: every task (or file) split into train and held-out; the global evaluation set takes
  // an equal share of every task's held-out examples.
  std::vector<model::Dataset> per_task;
  const bool by_client_file = c.data().client_files_size() > 0;
  model::DatasetOptions dopt;
  dopt.max_len = s.max_len;
  dopt.seed = s.seed;
  dopt.holdout = c.data().holdout() > 0 ? c.data().holdout() : 0.15;
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
  if (by_client_file && !c.eval().data().empty()) {  // one held-out set: eval.data, as in deployment
    model::DatasetOptions eo;
    eo.holdout = 0;
    eo.max_len = 256;
    FT_ASSIGN_OR_RETURN(model::Dataset d, model::LoadDataset(c.eval().data(), tok, eo));
    d.eval = std::move(d.train);
    d.train.clear();
    per_task.push_back(std::move(d));
    task_names.push_back(fs::path(c.eval().data()).stem().string());
  }
  const int num_tasks = static_cast<int>(per_task.size());
  std::vector<std::vector<model::Example>> eval_by_task(static_cast<size_t>(num_tasks));
  const int eval_per_task = by_client_file ? 1 << 30 : std::max(1, s.eval_examples / std::max(1, num_tasks));
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
  std::vector<std::vector<size_t>> parts(static_cast<size_t>(s.clients));
  if (by_client_file) {  // client k: file k, loaded as `fedtune worker` loads its data
    for (int k = 0; k < s.clients; ++k) {
      model::DatasetOptions wo;
      wo.holdout = 0;
      wo.max_len = s.max_len;
      FT_ASSIGN_OR_RETURN(model::Dataset d, model::LoadDataset(c.data().client_files(k), tok, wo));
      for (auto& e : d.train) {
        parts[static_cast<size_t>(k)].push_back(pool.size());
        pool.push_back(std::move(e));
        labels.push_back(0);
      }
    }
  } else {
    FT_ASSIGN_OR_RETURN(parts, Partition(labels, num_tasks, s.clients, kind, s.alpha_dir, s.skew, rng));
  }
  out.client_train.resize(static_cast<size_t>(s.clients));
  out.task_share.resize(static_cast<size_t>(s.clients));
  for (size_t k2 = 0; k2 < out.client_train.size(); ++k2) {
    out.task_share[k2].assign(static_cast<size_t>(std::max(1, num_tasks)), 0.0);
    for (size_t i : parts[k2]) {
      out.client_train[k2].push_back(pool[i]);
      out.task_share[k2][static_cast<size_t>(labels[i])] += 1.0 / static_cast<double>(parts[k2].size());
    }
  }
  out.pooled_examples = pool.size();
  out.eval_by_task = std::move(eval_by_task);
  out.eval_per_task = eval_per_task;
  return out;
}

// A simulation config as one process of a cross-machine run reads it: without train.device
// (each process chose its kernels; the config's device need not exist on every machine), and
// with data.client_files, if any, matching the clients (each process reads at most its own).
absl::StatusOr<proto::SimulationConfig> ForOneProcess(const proto::SimulationConfig& config) {
  proto::SimulationConfig c = config;
  c.mutable_train()->clear_device();
  if (c.data().client_files_size() > 0 && c.data().client_files_size() != c.clients())
    return Bad("data.client_files", absl::StrCat(c.data().client_files_size(), " files for ", c.clients(), " clients"));
  return c;
}

}  // namespace

std::string ClientName(int k) { return absl::StrFormat("client-%03d", k); }

absl::StatusOr<std::vector<model::Example>> ClientTrainingData(const proto::SimulationConfig& config, int k, const model::Tokenizer& tok) {
  FT_ASSIGN_OR_RETURN(proto::SimulationConfig c, ForOneProcess(config));
  FT_ASSIGN_OR_RETURN(Settings s, Resolve(c));
  if (k < 0 || k >= s.clients) return absl::InvalidArgumentError(absl::StrCat("client ", k, ": the config has clients 0..", s.clients - 1));
  if (c.data().client_files_size() > 0) {
    // Client k's own file only (the other clients' files need not exist here), loaded as
    // BuildSimData loads it.
    model::DatasetOptions wo;
    wo.holdout = 0;
    wo.max_len = s.max_len;
    FT_ASSIGN_OR_RETURN(model::Dataset d, model::LoadDataset(c.data().client_files(k), tok, wo));
    return std::move(d.train);
  }
  FT_RETURN_IF_ERROR(ValidateConfig(c));
  FT_ASSIGN_OR_RETURN(SimData d, BuildSimData(c, s, tok));
  return std::move(d.client_train[static_cast<size_t>(k)]);
}

absl::StatusOr<std::vector<model::Example>> HeldOutData(const proto::SimulationConfig& config, const model::Tokenizer& tok) {
  FT_ASSIGN_OR_RETURN(proto::SimulationConfig c, ForOneProcess(config));
  if (c.data().client_files_size() > 0) return std::vector<model::Example>{};  // eval.data is the held-out set then
  FT_RETURN_IF_ERROR(ValidateConfig(c));
  FT_ASSIGN_OR_RETURN(Settings s, Resolve(c));
  FT_ASSIGN_OR_RETURN(SimData d, BuildSimData(c, s, tok));
  std::vector<model::Example> out;
  for (auto& task : d.eval_by_task) out.insert(out.end(), std::make_move_iterator(task.begin()), std::make_move_iterator(task.end()));
  return out;
}

absl::StatusOr<proto::CoordinatorConfig> CoordinatorConfigFor(const proto::SimulationConfig& config) {
  FT_ASSIGN_OR_RETURN(proto::SimulationConfig c, ForOneProcess(config));
  if (c.data().client_files_size() > 0) {  // they live on the clients' machines: not checked here
    FT_RETURN_IF_ERROR(Resolve(c).status());
    if (!fs::exists(c.model().path())) return Bad("model.path", absl::StrCat("no such file: ", c.model().path()));
  } else {
    FT_RETURN_IF_ERROR(ValidateConfig(c));
  }
  // Keys that only a simulation can honour: refused rather than silently dropped.
  if (c.train().stand_in()) return Bad("train.stand_in", "simulation only (real client processes train the real model)");
  if (c.centralized_baseline() || c.local_baseline())
    return Bad(c.centralized_baseline() ? "centralized_baseline" : "local_baseline", "run it with `fedtune simulate` on one machine");
  if (c.eval().per_client()) return Bad("eval.per_client", "simulation only");
  proto::CoordinatorConfig o;
  *o.mutable_model() = c.model();
  *o.mutable_adapter() = c.adapter();
  o.set_rounds(c.rounds());
  *o.mutable_train() = c.train();
  // Each client process chooses its activation memory (a worker setting).
  o.mutable_train()->clear_activation_budget_mib();
  o.mutable_train()->clear_no_recompute();
  *o.mutable_strategy() = c.strategy();
  o.set_seed(c.seed());
  o.set_adapter_seed(c.adapter_seed());
  *o.mutable_dp() = c.dp();
  *o.mutable_eval() = c.eval();
  *o.mutable_secure_aggregation() = c.secure_aggregation();
  *o.mutable_planner() = c.planner();
  o.set_test_noise_seed(c.test_noise_seed());
  // A round starts once every simulated client has joined (their selection then follows the
  // strategy, as in the simulation); the quorum stays the coordinator's default (1), so a client
  // process that dies only costs its update after the deadline.
  o.set_min_workers(c.clients());
  return o;
}

absl::StatusOr<SimulationResult> RunSimulation(const proto::SimulationConfig& c, const SimOptions& o) {
  FT_RETURN_IF_ERROR(ValidateConfig(c));
  FT_ASSIGN_OR_RETURN(Settings s, Resolve(c));
  const auto t_start = Clock::now();
  auto say = [&](const std::string& line) {
    if (o.progress) std::fprintf(stderr, "[simulate] %s\n", line.c_str());
  };
  auto selected = kernels::SelectBackend(c.train().device().empty() ? "cpu" : c.train().device());
  if (!selected.ok()) return absl::InvalidArgumentError(absl::StrCat("train.device: ", selected.status().message()));
  kernels::Backend* const o_backend = *selected;
  say(absl::StrCat("kernels: ", o_backend->Name()));
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

  FT_ASSIGN_OR_RETURN(SimData data, BuildSimData(c, s, tok));
  const std::vector<std::string>& task_names = data.task_names;
  const std::vector<std::vector<model::Example>>& eval_by_task = data.eval_by_task;
  const int num_tasks = static_cast<int>(task_names.size());
  const int eval_per_task = data.eval_per_task;
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
        cl.base_type = prof.base_type();
        cl.rank = s.run.adapter.spec.kind == model::AdapterKind::kDiaBlo ? prof.blocks() : prof.rank();  // LoRA rank or DiaBlo blocks
        if (!prof.modules().empty()) cl.train_modules = *model::ParseModules(prof.modules());  // checked above
      }
    }
    for (size_t k2 = 0; k2 < clients.size(); ++k2) {
      clients[k2].train = std::move(data.client_train[k2]);
      clients[k2].task_share = std::move(data.task_share[k2]);
    }
  }
  const size_t pooled_examples = data.pooled_examples;
  say(absl::StrFormat("%d clients, %d tasks (%s), %zu training examples, partition %s; %d held-out examples for evaluation",
                      s.clients, num_tasks, absl::StrJoin(task_names, ", "), pooled_examples,
                      proto::DataConfig::Partition_Name(c.data().partition()), eval_per_task * num_tasks));

  // Local DP-SGD: the noise multiplier for a target epsilon is calibrated for the smallest client
  // (the largest sampling rate), here where the data sizes are known.
  federation::RunSettings& rs = s.run;
  if (rs.dp.local) {
    size_t smallest = SIZE_MAX;
    for (const ClientState& cl : clients) smallest = std::min(smallest, cl.train.size());
    const double q = std::min(1.0, static_cast<double>(rs.batch) / static_cast<double>(smallest));
    if (rs.dp.target_epsilon > 0) {
      FT_ASSIGN_OR_RETURN(rs.dp.noise_multiplier, privacy::NoiseMultiplierFor(rs.dp.target_epsilon, rs.dp.delta, q, static_cast<int64_t>(rs.rounds) * rs.local_steps));
    }
    say(absl::StrFormat("local DP-SGD in every client: sigma=%.4f, per-example clip %.3g, q=%.4f for the smallest client, delta %.1e",
                        rs.dp.noise_multiplier, rs.dp.clip_norm, q, rs.dp.delta));
  }

  // Global adapter.
  FT_ASSIGN_OR_RETURN(model::AdapterSet<float> adapters, model::MakeAdaptersWithLayout<float>(model->adapter_dims(), rs.adapter.spec, rs.adapter.modules,
                                                                                                 rs.adapter.layout, rs.adapter_seed));
  const TensorMap initial = worker::AdapterTensors(adapters);
  say(absl::StrFormat("adapter %s: %lld trainable parameters (%.2f MiB per transfer)", model::AdapterKindName(rs.adapter.spec.kind),
                      static_cast<long long>(adapters.NumTrainable()), worker::TensorBytes(initial) / 1048576.0));
  if (rs.secure.enabled)
    say(absl::StrFormat("secure aggregation (SecAgg+): values within +-%.3g encoded exactly%s", rs.secure.value_range,
                        rs.dp.central ? "; DP noise added by the clients before masking" : ""));

  // The round engine, with planning (issue 8) when enabled: a calibration pass here gives module
  // importance and this machine's speed, scaled per client by its profile.
  federation::EngineOptions eo;
  eo.settings = rs;
  eo.run_id = fs::path(result.run_dir).filename().string();
  eo.state_dir = result.run_dir;
  eo.quorum = 0;
  eo.say = say;
  const kernels::GgmlType stored_type = model->layer(0).wq.type;
  const planner::ModelShape shape = planner::ModelShape::Of(*model);
  std::optional<Calibration> cal;
  {
    std::vector<std::vector<model::Example>> all;
    for (const ClientState& cl : clients) all.push_back(cl.train);
    const planner::Candidate uniform{rs.adapter.modules, stored_type, rs.batch, rs.local_steps};
    FT_ASSIGN_OR_RETURN(planner::PlannerOptions po, federation::PlannerOptionsFrom(c.planner(), rs.adapter.spec, rs.adapter.modules, uniform,
                                                                                   LongestExample(all), rs.send_fisher, !c.train().no_recompute()));
    // The clients' default (ClientEnv): activations kept as far as each one's memory allows.
    po.memory.keep_within_limit = !c.train().no_recompute() && c.train().activation_budget_mib() == 0;
    po.upload_ratio = aggregation::CompressedBytesPerFp32Byte(rs.compression, rs.topk_fraction);
    if (!rs.adapter.layout.empty()) {  // the modules and ranks each layer has
      FT_ASSIGN_OR_RETURN(po.memory.layout, model::ParseLayerLayout(rs.adapter.layout, model->config().n_layer, rs.adapter.modules));
      FT_RETURN_IF_ERROR(planner::CheckLayout(po.memory.layout, rs.adapter.modules));
    }
    if (!rs.compensation.empty()) po.memory.compensation_rank = rs.compensation_rank;
    po.whole_adapter = rs.secure.enabled;  // no per-module shares under secure aggregation (settings.cc)
    if (rs.dp.local) {  // the planner keeps every client within the uniform configuration's privacy cost
      po.local_dp_sigma = rs.dp.noise_multiplier;
      po.local_dp_delta = rs.dp.delta;
      po.local_dp_rounds = rs.rounds;
      po.memory.per_example = true;
    }
    if (c.planner().enabled()) {
      say("planner: calibration pass (probe adapter, module importance and training speed)");
      FT_ASSIGN_OR_RETURN(cal, Calibrate(*model, o_backend, clients[0].train, rs.adapter.spec, rs.adapter.modules, rs.batch,
                                         OrDefault(c.planner().calibration_steps(), 4), s.seed, po.base_types, c.model().path()));
      po.tokens_per_example = cal->tokens_per_example;
      std::vector<std::string> imp;
      for (const auto& [m, v] : cal->importance) imp.push_back(absl::StrFormat("%s %.0f%%", model::ModuleName(m), 100 * v));
      std::vector<std::string> speeds;
      for (const auto& [t, v] : cal->base_speed) speeds.push_back(absl::StrFormat("%s x%.2f", kernels::TypeTraits(t).name, v));
      say(absl::StrFormat("planner: module importance %s; %.0f training tokens/s here%s (%.1f s)", absl::StrJoin(imp, ", "), cal->tokens_per_second,
                          speeds.empty() ? std::string() : absl::StrCat("; per base type vs ", kernels::TypeTraits(stored_type).name, ": ", absl::StrJoin(speeds, ", ")),
                          cal->seconds));
      std::vector<ClientForPlan> cp;
      for (const ClientState& cl : clients)
        cp.push_back({cl.name, cl.speed, cl.bandwidth_mbps, cl.latency_ms, cl.memory_mib, static_cast<double>(cl.train.size())});
      const std::vector<planner::WorkerProfile> wprof = ProfilesForPlan(cp, *cal);
      for (size_t k = 0; k < clients.size(); ++k) clients[k].plan_profile = wprof[k];
      eo.planning = federation::EngineOptions::Planning{shape, po, cal->importance, c.planner().replan_every_round()};
    } else {
      for (const ClientState& cl : clients) {
        if (cl.memory_mib <= 0) continue;
        const double need = po.memory.PredictMiB(shape, rs.adapter.spec, rs.adapter.modules, uniform, po.seq, 0, kernels::IsCpuBf16(o_backend));
        if (need > cl.memory_mib)
          say(absl::StrFormat("warning: %s has %.0f MiB but the uniform configuration needs %.0f MiB (memory model); it is simulated anyway",
                              cl.name, cl.memory_mib, need));
      }
    }
  }
  FT_ASSIGN_OR_RETURN(auto engine, federation::RoundEngine::Open(eo, initial));
  say(engine->strategy_summary());
  FT_RETURN_IF_ERROR(engine->ledger().SetRunInfo("config", o.config_text));
  SimTransport transport(c, s, clients, *model, adapters, task_names, eval_by_task, result.run_dir, o, o_backend);
  FT_ASSIGN_OR_RETURN(federation::RunSummary run, engine->Run(transport));
  result.rounds = run.rounds;
  result.stopped_early = run.stopped_early;
  result.global = engine->global();
  if (result.rounds.empty()) return absl::InternalError("no round was run");
  result.accuracy_before = result.rounds.front().metrics["accuracy"];
  result.accuracy_after = result.rounds.back().metrics["accuracy"];
  if (run.plan) {  // plan.json: what bench/run_plan.sh checks against measured peaks (fedtune train per plan)
    nlohmann::json pj;
    pj["summary"] = run.plan->summary;
    pj["seq"] = eo.planning->options.seq;
    pj["round_seconds"] = run.plan->round_seconds;
    pj["uniform_round_seconds"] = run.plan->uniform_round_seconds;
    if (cal) {
      for (const auto& [m, v] : cal->importance) pj["importance"][model::ModuleName(m)] = v;
      for (const auto& [t, v] : cal->base_speed) pj["base_speed"][kernels::TypeTraits(t).name] = v;  // vs the stored type
    }
    for (const planner::WorkerPlan& wp : run.plan->workers) {
      nlohmann::json w = {{"worker", wp.worker}, {"excluded", wp.excluded}, {"why", wp.excluded ? wp.reason : wp.explanation}};
      if (!wp.excluded) {
        std::vector<std::string> mods;
        for (auto m : wp.c.modules) mods.push_back(model::ModuleName(m));
        w["modules"] = absl::StrJoin(mods, ",");
        w["base"] = kernels::TypeTraits(wp.c.base).name;
        w["batch"] = wp.c.batch;
        w["local_steps"] = wp.c.local_steps;
        w["rank"] = planner::SpecAt(rs.adapter.spec, wp.c).rank;
        w["predicted_mib"] = wp.predicted_mib;
        w["predicted_seconds"] = wp.predicted_seconds;
      }
      pj["workers"].push_back(w);
    }
    FT_RETURN_IF_ERROR(WriteFileAtomic(result.run_dir + "/plan.json", pj.dump(1)));
  }

  // Exports of the final global adapter.
  FT_RETURN_IF_ERROR(worker::SetAdapterTensors(result.global, &adapters));
  if (rs.adapter.spec.kind != model::AdapterKind::kDiaBlo) FT_RETURN_IF_ERROR(model::ExportPeft(result.run_dir + "/peft", *model, adapters, c.model().path()));
  FT_RETURN_IF_ERROR(model::ExportGgufLora(result.run_dir + "/adapter-lora.gguf", *model, adapters));

  // Baselines with the same compute: centralized (one adapter on the pooled client data, the
  // federation's total steps) and local-only (each client alone, its own steps in the federation).
  if (c.centralized_baseline() || c.local_baseline()) {
    auto train_alone = [&](const std::vector<model::Example>& examples, int steps) -> absl::StatusOr<model::AdapterSet<float>> {
      FT_ASSIGN_OR_RETURN(model::AdapterSet<float> a, model::MakeAdaptersWithLayout<float>(model->adapter_dims(), rs.adapter.spec, rs.adapter.modules,
                                                                                            rs.adapter.layout, rs.adapter_seed));
      model::FinetuneOptions ft;
      ft.steps = steps;
      ft.batch = rs.batch;
      ft.recompute = !c.train().no_recompute();
      // As a client without a memory figure (worker::ClientEnv): -1 recomputes, 0 keeps up to 1024 MiB.
      const int ab = c.train().activation_budget_mib();
      ft.activation_budget_mib = ab > 0 ? ab : (ab == 0 && ft.recompute ? worker::ClientEnv::kDefaultActivationBudgetMiB : 0);
      ft.backend = o_backend;
      ft.log_every = 0;
      model::OptimizerConfig oc;
      oc.lr = static_cast<float>(rs.learning_rate);
      oc.warmup_steps = rs.warmup_steps;
      oc.weight_decay = static_cast<float>(rs.weight_decay);
      oc.clip_norm = static_cast<float>(rs.grad_clip_norm);
      oc.min_lr_ratio = 0.1f;  // cosine to 10%, as the federated clients' rate over the rounds
      oc.total_steps = ft.steps;
      model::AdamW opt(oc);
      FT_RETURN_IF_ERROR(model::Finetune(*model, examples, ft, &a, &opt).status());
      return a;
    };
    // Per task scored by `weights` (a client's task shares; all 1 for the centralized adapter):
    // the weighted mean accuracy, ROUGE-L and loss, and the per-task figures.
    // `cache` (optional): per-task results already known for this adapter, and kept for the next call.
    auto score = [&](model::AdapterSet<float>& a, const std::vector<double>& weights,
                     std::map<int, model::EvalResult>* cache) -> absl::StatusOr<nlohmann::json> {
      nlohmann::json j = nlohmann::json::object();
      double acc = 0, rouge = 0, loss = 0, wsum = 0;
      for (int t = 0; t < num_tasks; ++t) {
        const double w = weights[static_cast<size_t>(t)];
        if (w <= 0) continue;
        model::EvalResult r;
        if (cache && cache->count(t)) {
          r = cache->at(t);
        } else {
          FT_ASSIGN_OR_RETURN(r, model::Evaluate(*model, &a, eval_by_task[static_cast<size_t>(t)], 0, rs.max_new_tokens, 8, rs.generate_examples));
          if (cache) (*cache)[t] = r;
        }
        if (r.n_generated == 0) continue;
        j["tasks"][task_names[static_cast<size_t>(t)]] = {{"accuracy", r.accuracy()}, {"rouge_l", r.rouge_l()}, {"loss", r.loss}};
        acc += w * r.accuracy(), rouge += w * r.rouge_l(), loss += w * r.loss, wsum += w;
      }
      if (wsum > 0) j.update({{"accuracy", acc / wsum}, {"rouge_l", rouge / wsum}, {"loss", loss / wsum}});
      return j;
    };
    nlohmann::json baselines = nlohmann::json::object();
    // The final global adapter's results per task: its last evaluation, not decoded again.
    std::map<int, model::EvalResult> federated = transport.last_eval();
    if (c.centralized_baseline()) {
      say("centralized baseline on the pooled client data (same example budget)");
      std::vector<model::Example> all;
      for (const auto& cl : clients) all.insert(all.end(), cl.train.begin(), cl.train.end());
      FT_ASSIGN_OR_RETURN(model::AdapterSet<float> central, train_alone(all, rs.rounds * rs.local_steps * rs.expected_clients));
      FT_ASSIGN_OR_RETURN(nlohmann::json j, score(central, std::vector<double>(static_cast<size_t>(num_tasks), 1.0), nullptr));
      result.centralized_accuracy = j.value("accuracy", 0.0);
      // The federated adapter weighted the same way (every task once), for the comparison.
      FT_ASSIGN_OR_RETURN(baselines["federated"], score(adapters, std::vector<double>(static_cast<size_t>(num_tasks), 1.0), &federated));
      say(absl::StrFormat("centralized: accuracy %.1f%%, ROUGE-L %.3f", 100 * result.centralized_accuracy, j.value("rouge_l", 0.0)));
      FT_RETURN_IF_ERROR(engine->ledger().SetRunInfo("centralized_accuracy", absl::StrCat(result.centralized_accuracy)));
      baselines["centralized"] = j;
    }
    if (c.local_baseline()) {
      say("local-only baseline: each client alone, the steps it trained in the federation");
      for (const ClientState& cl : clients) {
        if (cl.steps == 0) continue;  // never selected: nothing to compare
        FT_ASSIGN_OR_RETURN(model::AdapterSet<float> alone, train_alone(cl.train, cl.steps));
        FT_ASSIGN_OR_RETURN(nlohmann::json j, score(alone, cl.task_share, nullptr));
        // The federated global adapter on the same tasks and weights, for the per-client gain.
        FT_ASSIGN_OR_RETURN(nlohmann::json fed, score(adapters, cl.task_share, &federated));
        j["client"] = cl.name;
        j["steps"] = cl.steps;
        j["federated"] = fed;
        say(absl::StrFormat("  %s alone: accuracy %.1f%%, ROUGE-L %.3f (federated %.1f%%, %.3f)", cl.name, 100 * j.value("accuracy", 0.0),
                            j.value("rouge_l", 0.0), 100 * fed.value("accuracy", 0.0), fed.value("rouge_l", 0.0)));
        baselines["local"].push_back(j);
      }
    }
    FT_RETURN_IF_ERROR(WriteFileAtomic(result.run_dir + "/baselines.json", baselines.dump(1, ' ', false, nlohmann::json::error_handler_t::replace)));
  }

  result.wall_seconds = Seconds(t_start, Clock::now());
  result.peak_rss_mib = PeakRssMiB();

  // Report.
  ReportInput rin;
  rin.title = absl::StrCat("fedtune simulation: ", engine->strategy().Name(), ", ", model::AdapterKindName(rs.adapter.spec.kind));
  rin.config_text = o.config_text;
  rin.rounds = result.rounds;
  rin.summary_lines = {
      absl::StrFormat("Held-out exact-match accuracy: %.1f%% before, %.1f%% after %d rounds", 100 * result.accuracy_before,
                      100 * result.accuracy_after, rs.rounds),
      absl::StrFormat("%d clients (%d per round), tasks: %s, partition %s", s.clients, rs.expected_clients, absl::StrJoin(task_names, ", "),
                      proto::DataConfig::Partition_Name(c.data().partition())),
      absl::StrFormat("Wall time %.0f s on this machine, peak RSS %.0f MiB", result.wall_seconds, result.peak_rss_mib)};
  if (result.centralized_accuracy >= 0)
    rin.summary_lines.push_back(absl::StrFormat("Centralized baseline, same example budget: %.1f%%", 100 * result.centralized_accuracy));
  const std::vector<double>& last_task_acc = transport.last_task_acc();
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
  if (run.plan) {
    rin.plan_summary = run.plan->summary;
    for (const planner::WorkerPlan& wp : run.plan->workers) rin.plan.push_back({wp.worker, wp.excluded ? wp.reason : wp.explanation});
    rin.summary_lines.push_back("Planned: " + run.plan->summary);
  }
  FT_RETURN_IF_ERROR(WriteReport(result.run_dir + "/report.html", rin));
  return result;
}

}  // namespace fedtune::sim

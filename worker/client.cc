#include "worker/client.h"

#include <algorithm>
#include <map>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "aggregation/compression.h"
#include "aggregation/hetero_rank.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/progress.h"
#include "kernels/quant.h"
#include "model/finetune.h"
#include "model/optimizer.h"
#include "planner/planner.h"
#include "nlohmann/json.hpp"

namespace fedtune::worker {

void BaseModels::SetCalibration(const std::vector<model::Example>& data, size_t max_tokens) {
  std::lock_guard<std::mutex> l(mu_);
  calibration_.clear();
  for (const auto& e : data) {
    for (int32_t t : e.tokens) {
      if (calibration_.size() >= max_tokens) return;
      calibration_.push_back(t);
    }
  }
}

absl::StatusOr<const model::LlamaModel*> BaseModels::For(const protocol::AdapterPlan& plan, bool training) {
  const std::string& base_type = plan.base_type;
  const bool evict = keep_one_ && training;
  auto stored = [this, evict] {
    if (evict) {
      std::lock_guard<std::mutex> l(mu_);
      by_type_.clear();
    }
    return &stored_;
  };
  if (base_type.empty()) return stored();
  const auto t = kernels::GgmlTypeFromName(base_type);
  if (!t) return absl::InvalidArgumentError(absl::StrCat("task: unknown base type ", base_type));
  const auto& wq = stored_.layer(0).wq;
  if (kernels::RowCompatibleType(*t, wq.cols) == wq.type) return stored();
  const auto method = model::ParseCompensationMethod(plan.compensation);
  if (!method) return absl::InvalidArgumentError(absl::StrCat("task: unknown compensation ", plan.compensation));
  std::lock_guard<std::mutex> l(mu_);
  const int rank = model::HasCorrection(*method) ? plan.compensation_rank : 0;
  const double damping = model::NeedsCalibration(*method) ? plan.compensation_damping : 0.0;
  const auto key = std::make_tuple(*t, std::string(model::CompensationMethodName(*method)), rank, damping);
  if (evict) std::erase_if(by_type_, [&](const auto& e) { return e.first != key; });
  stored_.ReleaseMappedPages();  // not read while tasks train on the copy (nor while it is built)
  auto& slot = by_type_[key];
  if (!slot) {
    if (path_.empty()) return absl::FailedPreconditionError(absl::StrCat("task asks for base ", base_type, " but the model path is unknown"));
    FT_ASSIGN_OR_RETURN(auto m, model::LlamaModel::Load(path_));
    if (*method == model::CompensationMethod::kNone) {
      FT_ASSIGN_OR_RETURN(size_t bytes, m->Requantize(*t));
      FT_LOG_INFO("base re-quantized to {} for the plan: {:.1f} MiB of projections", base_type, static_cast<double>(bytes) / (1 << 20));
    } else {
      if (model::NeedsCalibration(*method) && calibration_.empty())
        return absl::FailedPreconditionError(absl::StrCat(plan.compensation, " needs calibration tokens from this client's training data"));
      model::CompensationOptions o;
      o.method = *method;
      o.rank = rank;
      if (damping > 0) o.damping = damping;
      FT_ASSIGN_OR_RETURN(auto rep, m->RequantizeCompensated(*t, o, model::NeedsCalibration(*method) ? calibration_ : std::vector<int32_t>{}, cache_dir_));
      FT_LOG_INFO("base re-quantized to {} with {} rank {} for the plan: {}", base_type, plan.compensation, rank, rep.Summary());
      last_report_ = std::move(rep);
    }
    slot = std::move(m);
  }
  return slot.get();
}

absl::StatusOr<double> TimedTokensPerSecond(const model::LlamaModel& model, const std::vector<model::Example>& data, const SpeedProbe& p) {
  if (data.empty()) return absl::FailedPreconditionError("speed probe: no training examples");
  FT_ASSIGN_OR_RETURN(model::AdapterSet<float> set, model::MakeAdapters<float>(model.adapter_dims(), p.spec, p.modules, p.seed));
  model::FinetuneOptions ft;
  ft.batch = std::max(1, p.batch);
  ft.log_every = 0;
  ft.seed = p.seed;
  ft.backend = p.backend;
  model::AdamW opt(model::OptimizerConfig{});
  // Finetune continues from the optimizer's step count up to ft.steps: 1 warm-up, then the timed ones.
  ft.steps = 1;
  FT_RETURN_IF_ERROR(model::Finetune(model, data, ft, &set, &opt).status());
  ft.steps = 1 + std::max(1, p.steps);
  FT_ASSIGN_OR_RETURN(model::TrainReport r, model::Finetune(model, data, ft, &set, &opt));
  if (r.seconds <= 0 || r.tokens <= 0) return absl::InternalError("speed probe: nothing was timed");
  return static_cast<double>(r.tokens) / r.seconds;
}

absl::StatusOr<std::map<kernels::GgmlType, double>> MeasureBaseSpeeds(const model::LlamaModel& stored, const std::string& path,
                                                                     const std::vector<kernels::GgmlType>& types,
                                                                     const std::vector<model::Example>& data, const SpeedProbe& p,
                                                                     double memory_mib, const std::atomic<bool>* stop) {
  const auto& wq = stored.layer(0).wq;
  const planner::ModelShape shape = planner::ModelShape::Of(stored);
  std::map<kernels::GgmlType, double> out;
  FT_ASSIGN_OR_RETURN(out[wq.type], TimedTokensPerSecond(stored, data, p));
  for (kernels::GgmlType t : types) {
    if (stop != nullptr && *stop) return absl::CancelledError("base speeds: stopped");
    if (out.count(t)) continue;
    if (kernels::RowCompatibleType(t, wq.cols) == wq.type) {  // what the stored rows already are
      out[t] = out[wq.type];
      continue;
    }
    // The copy: its re-quantized projections and the file's other tensors (BaseMiB).
    if (const double extra = planner::MemoryModel{}.BaseMiB(shape, t); memory_mib > 0 && CurrentRssMiB() + extra > ClientEnv::kMemoryMargin * memory_mib) {
      FT_LOG_WARN("base speed of {} not measured: its {:.0f} MiB copy of the base would pass {:.0f}% of this worker's {:.0f} MiB", kernels::TypeTraits(t).name,
                  extra, 100 * ClientEnv::kMemoryMargin, memory_mib);
      continue;
    }
    if (path.empty()) return absl::FailedPreconditionError("base speeds: the model path is unknown");
    FT_ASSIGN_OR_RETURN(auto m, model::LlamaModel::Load(path));
    FT_RETURN_IF_ERROR(m->Requantize(t).status());
    FT_ASSIGN_OR_RETURN(out[t], TimedTokensPerSecond(*m, data, p));
  }
  return out;
}

absl::Status LocalPrivacy::Open(double delta) {
  if (ledger_ || !open_status_.ok()) return open_status_;
  auto ledger = std::make_unique<privacy::PrivacyLedger>(0, delta);
  if (!path_.empty() && std::filesystem::exists(path_)) {
    std::ifstream in(path_);
    std::stringstream text;
    text << in.rdbuf();
    absl::Status st;
    try {
      const nlohmann::json j = nlohmann::json::parse(text.str());
      for (const auto& r : j.at("releases")) {
        st = ledger->Record({r.at("label").get<std::string>(), std::stod(r.at("q").get<std::string>()), std::stod(r.at("sigma").get<std::string>()),
                             r.at("steps").get<int64_t>()});
        if (!st.ok()) break;
      }
    } catch (const std::exception& e) {
      st = absl::InvalidArgumentError(e.what());
    }
    if (!st.ok()) {  // sticky: never train (or count) from zero over a ledger that exists
      open_status_ = absl::DataLossError(absl::StrCat(path_, ": unreadable local privacy ledger (", st.message(),
                                                      "); refusing to restart the count (repair or remove it deliberately)"));
      return open_status_;
    }
    FT_ASSIGN_OR_RETURN(privacy::Epsilon e, ledger->Spent());
    FT_LOG_INFO("local DP-SGD: {} earlier releases from {} (epsilon {:.3f} so far)", ledger->releases().size(), path_, e.epsilon);
  }
  ledger_ = std::move(ledger);
  return absl::OkStatus();
}

absl::StatusOr<double> LocalPrivacy::Record(const protocol::TrainTask& task, size_t examples) {
  FT_RETURN_IF_ERROR(Open(task.local_dp_delta > 0 ? task.local_dp_delta : 1e-5));
  const double q = examples ? std::min(1.0, static_cast<double>(task.batch) / static_cast<double>(examples)) : 1.0;
  FT_RETURN_IF_ERROR(ledger_->Record({absl::StrCat("round ", task.round), q, task.local_dp_noise, task.local_steps}));
  if (!path_.empty()) {
    nlohmann::json j;
    j["releases"] = nlohmann::json::array();
    for (const privacy::Release& r : ledger_->releases())
      j["releases"].push_back({{"label", r.label}, {"q", absl::StrFormat("%.17g", r.q)}, {"sigma", absl::StrFormat("%.17g", r.sigma)}, {"steps", r.steps}});
    FT_RETURN_IF_ERROR(WriteFileAtomic(path_, j.dump(1), 0600));
  }
  FT_ASSIGN_OR_RETURN(privacy::Epsilon e, ledger_->Spent());
  return e.epsilon;
}

namespace {

// A plan's train_rank below its rank: this client trains the first train_rank components, at
// the shared adapter's scale (aggregation/hetero_rank.h); DiaBlo: train_rank blocks of this
// round's window (protocol::FirstBlock).
// 0: the whole adapter.
absl::StatusOr<int64_t> TrainRank(const protocol::AdapterPlan& p) {
  const int full = protocol::FullShare(p);
  if (p.train_rank == 0 || p.train_rank == full) return 0;
  if (p.train_rank < 1 || p.train_rank > full)
    return absl::InvalidArgumentError(absl::StrCat("task: train_rank ", p.train_rank, " outside [1, ", full, p.kind == "diablo" ? "] (DiaBlo blocks)" : "]"));
  if (!p.layers.empty()) return absl::InvalidArgumentError("task: train_rank with a per-layer layout (adapter.layers)");
  return p.train_rank;
}

// The adapter this client trains: the plan's, at its train_rank when it has one.
absl::StatusOr<std::pair<model::AdapterSpec, std::vector<model::Module>>> SpecAndModules(const protocol::AdapterPlan& p) {
  const auto kind = model::ParseAdapterKind(p.kind);
  if (!kind) return absl::InvalidArgumentError(absl::StrCat("task: unknown adapter kind ", p.kind));
  FT_ASSIGN_OR_RETURN(auto modules, model::ParseModules(p.modules.empty() ? "all" : absl::StrJoin(p.modules, ",")));
  model::AdapterSpec spec{*kind, p.rank, p.alpha, p.rslora, p.blocks};
  FT_ASSIGN_OR_RETURN(const int64_t r, TrainRank(p));
  if (r > 0 && *kind != model::AdapterKind::kDiaBlo) {  // DiaBlo keeps all blocks (LocalTrainOptions::train_blocks)
    spec.alpha = aggregation::RankAlpha(p.alpha, p.rank, r, p.rslora);
    spec.rank = r;
  }
  return std::make_pair(spec, std::move(modules));
}

absl::StatusOr<model::AdapterSet<float>> TaskAdapters(const model::LlamaModel& base, const protocol::AdapterPlan& p) {
  FT_ASSIGN_OR_RETURN(auto sm, SpecAndModules(p));
  return model::MakeAdaptersWithLayout<float>(base.adapter_dims(), sm.first, sm.second, p.layers, p.adapter_seed);
}

}  // namespace

namespace {

// The memory model's activation choice and peak for `task` on this client, as the planner makes
// them (the stored model's shape, the plan's base type and compensation, modules and rank, the
// client's longest example, as many sequences kept per pass as fit its memory): nullopt where the
// memory is unknown or the activation policy is fixed (ClientEnv), so the model decides nothing.
struct Prediction {
  planner::ActivationChoice a;
  kernels::GgmlType base;
  int64_t rank;
};
absl::StatusOr<std::optional<Prediction>> Predict(const model::LlamaModel& stored, const std::vector<model::Example>& data,
                                                  const protocol::TrainTask& task, const ClientEnv& env) {
  if (!(env.memory_mib > 0) || env.activation_budget_mib != 0 || !env.recompute) return std::optional<Prediction>();
  const protocol::AdapterPlan& p = task.plan;
  FT_ASSIGN_OR_RETURN(const auto sm, SpecAndModules(p));
  const auto& [spec, adapted] = sm;
  std::vector<model::Module> trained = adapted;
  if (!p.train_modules.empty()) {
    FT_ASSIGN_OR_RETURN(trained, model::ParseModules(absl::StrJoin(p.train_modules, ",")));
  }
  const planner::ModelShape shape = planner::ModelShape::Of(stored);
  planner::Candidate c{trained, shape.stored, std::max(task.batch, 1), std::max(task.local_steps, 1)};
  planner::MemoryModel mm = planner::MemoryModel::Fitted();
  mm.keep_within_limit = true;
  if (!p.layers.empty()) {  // the modules and ranks each layer has
    FT_ASSIGN_OR_RETURN(mm.layout, model::ParseLayerLayout(p.layers, shape.n_layer, adapted));
  }
  mm.per_example = task.local_dp_clip > 0;  // DP-SGD: model::DpExamplesPerPass per pass, their own gradients, a float64 sum
  mm.adapter_copies = env.adapter_copies * static_cast<double>(p.rank) / static_cast<double>(spec.rank);  // copies at the shared rank
  if (!p.base_type.empty()) {
    const auto t = kernels::GgmlTypeFromName(p.base_type);
    if (!t) return absl::InvalidArgumentError(absl::StrCat("task: unknown base type ", p.base_type));
    c.base = *t;
    if (const auto cm = model::ParseCompensationMethod(p.compensation); c.base != shape.stored && cm && model::HasCorrection(*cm))
      mm.compensation_rank = p.compensation_rank;
  }
  size_t longest = 1;
  for (const auto& e : data) longest = std::max(longest, e.tokens.size());
  // Activations within the memory the plan was made for when the coordinator gave this client
  // less than its own (the decline check stays against its own budget).
  auto within = [](double own, double planned) { return planned > 0 ? std::min(own, planned) : own; };
  if (env.device_memory_mib > 0) {
    mm.device_bf16_gemm = env.backend == nullptr || env.backend->Describe().find("bf16 GEMM") != std::string::npos;
    if (env.backend != nullptr && env.backend->DeviceLogitsChunkBytes() > 0)
      mm.device_logits_chunk_bytes = static_cast<double>(env.backend->DeviceLogitsChunkBytes());
    return std::optional<Prediction>(
        Prediction{mm.ChooseOnDevice(shape, spec, adapted, c, static_cast<int>(longest),
                                     ClientEnv::kMemoryMargin * within(env.device_memory_mib, p.plan_device_memory_mib)),
                   c.base, spec.rank});
  }
  return std::optional<Prediction>(Prediction{
      mm.Choose(shape, spec, adapted, c, static_cast<int>(longest), ClientEnv::kMemoryMargin * within(env.memory_mib, p.plan_memory_mib),
                kernels::IsCpuBf16(env.backend)),
      c.base, spec.rank});
}

// The planner plans within the same fraction of a worker's memory (its margin for the memory
// model's error): a task it would not have planned for this budget is declined.
std::optional<Decline> DeclineIfOver(const Prediction& pr, const protocol::TrainTask& task, const ClientEnv& env) {
  const double usable = ClientEnv::kMemoryMargin * env.memory_mib;
  const std::string share = task.plan.kind == "diablo"
                                ? absl::StrFormat("%d of %d DiaBlo blocks", protocol::TrainsPart(task.plan) ? task.plan.train_rank : task.plan.blocks, task.plan.blocks)
                                : absl::StrFormat("rank %d", static_cast<int>(pr.rank));
  if (env.device_memory_mib > 0 && pr.a.device_mib > ClientEnv::kMemoryMargin * env.device_memory_mib * (1 + 1e-12)) {
    Decline d;
    d.device = true;
    d.needed_mib = pr.a.device_mib;
    d.budget_mib = env.device_memory_mib;
    d.reason = absl::StrFormat(
        "declined: the task (batch %d, base %s, %s) needs %.1f MiB of device memory (predicted peak), more than the %.1f MiB this worker "
        "may use there (%.0f%% of its device's %.0f MiB free)",
        task.batch, kernels::TypeTraits(pr.base).name, share, d.needed_mib, ClientEnv::kMemoryMargin * env.device_memory_mib,
        100 * ClientEnv::kMemoryMargin, d.budget_mib);
    return d;
  }
  if (pr.a.total_mib <= usable * (1 + 1e-12)) return std::nullopt;
  Decline d;
  d.needed_mib = pr.a.total_mib;
  d.budget_mib = env.memory_mib;
  d.reason = absl::StrFormat(
      "declined: the task (batch %d, base %s, %s) needs %.1f MiB (predicted peak), more than the %.1f MiB this worker may use (%.0f%% of "
      "its %.0f MiB budget)",
      task.batch, kernels::TypeTraits(pr.base).name, share, d.needed_mib, usable, 100 * ClientEnv::kMemoryMargin, d.budget_mib);
  return d;
}

}  // namespace

namespace {
constexpr char kDeclineUrl[] = "fedtune/decline";
}  // namespace

absl::Status DeclineStatus(const Decline& d) {
  absl::Status s = absl::ResourceExhaustedError(d.reason);
  s.SetPayload(kDeclineUrl, absl::Cord(absl::StrFormat("%.17g %.17g %d", d.needed_mib, d.budget_mib, d.device ? 1 : 0)));
  return s;
}

std::optional<Decline> DeclineFrom(const absl::Status& s) {
  if (!absl::IsResourceExhausted(s)) return std::nullopt;
  const auto payload = s.GetPayload(kDeclineUrl);  // absl::optional<absl::Cord>
  if (!payload) return std::nullopt;
  Decline d;
  d.reason = std::string(s.message());
  const std::string text(*payload);
  int device = 0;
  if (std::sscanf(text.c_str(), "%lg %lg %d", &d.needed_mib, &d.budget_mib, &device) < 2) return std::nullopt;
  d.device = device != 0;
  return d;
}

absl::StatusOr<aggregation::EvalReport> RunEvalTask(BaseModels& bases, const std::vector<model::Example>& eval, const protocol::TrainTask& task,
                                                    const aggregation::TensorMap& global, kernels::Backend* backend) {
  (void)backend;  // model::Evaluate runs on the CPU kernels
  if (eval.empty()) return absl::FailedPreconditionError("evaluation task, but this client holds no held-out data");
  FT_ASSIGN_OR_RETURN(const model::LlamaModel* base, bases.For(task.plan));
  FT_ASSIGN_OR_RETURN(model::AdapterSet<float> adapters, TaskAdapters(*base, task.plan));
  FT_RETURN_IF_ERROR(SetAdapterTensors(global, &adapters));
  FT_ASSIGN_OR_RETURN(model::EvalResult r, model::Evaluate(*base, &adapters, eval, 0, std::max(1, task.max_new_tokens), 8, task.generate_examples));
  aggregation::EvalReport rep;
  rep.client = task.client;
  rep.num_examples = static_cast<int64_t>(eval.size());
  rep.metrics["eval_loss"] = r.loss;
  rep.metrics["eval_ppl"] = r.perplexity();
  if (r.n_generated > 0) rep.metrics["accuracy"] = r.accuracy();
  return rep;
}

absl::StatusOr<LocalResult> RunTrainTask(BaseModels& bases, const std::vector<model::Example>& data, const protocol::TrainTask& task,
                                         const aggregation::TensorMap& global, const ClientEnv& env, LocalPrivacy* privacy) {
  const protocol::AdapterPlan& p = task.plan;
  // One prediction decides both whether the task fits and how the trainer keeps activations.
  FT_ASSIGN_OR_RETURN(const std::optional<Prediction> predicted, Predict(bases.stored(), data, task, env));
  if (predicted)
    if (const std::optional<Decline> d = DeclineIfOver(*predicted, task, env)) return DeclineStatus(*d);
  FT_ASSIGN_OR_RETURN(const model::LlamaModel* base, bases.For(p, /*training=*/true));
  FT_ASSIGN_OR_RETURN(model::AdapterSet<float> adapters, TaskAdapters(*base, p));
  FT_ASSIGN_OR_RETURN(const int64_t train_rank, TrainRank(p));
  const bool diablo = p.kind == "diablo";
  aggregation::TensorMap truncated;  // a lower-rank client starts from the global's first components
  if (train_rank > 0 && !diablo) {
    FT_ASSIGN_OR_RETURN(truncated, aggregation::TruncateRank(global, p.rank, train_rank));
  }
  // DiaBlo with fewer blocks: every block acts with the global's values, train_rank of them (from
  // this round's first, protocol::FirstBlock) train.
  const aggregation::TensorMap& start = train_rank > 0 && !diablo ? truncated : global;
  LocalTrainOptions lt;
  if (diablo) {
    lt.train_blocks = train_rank;
    lt.train_first_block = protocol::FirstBlock(p, task.round);
  }
  if (!p.train_modules.empty()) {
    FT_ASSIGN_OR_RETURN(lt.train_modules, model::ParseModules(absl::StrJoin(p.train_modules, ",")));
  }
  if (task.local_steps < 1 || task.batch < 1) return absl::InvalidArgumentError("task: local_steps and batch must be >= 1");
  lt.finetune.steps = task.local_steps;
  lt.finetune.batch = task.batch;
  lt.finetune.log_every = 0;
  lt.finetune.recompute = env.recompute;
  lt.finetune.activation_budget_mib = std::max(env.activation_budget_mib, 0);
  if (env.activation_budget_mib == 0 && env.recompute) {  // the default: decided from memory (client.h)
    if (predicted) {
      lt.finetune.recompute = predicted->a.recompute;
      lt.finetune.micro_batch = predicted->a.recompute ? 0 : predicted->a.seqs_per_pass;
    } else {
      lt.finetune.activation_budget_mib = ClientEnv::kDefaultActivationBudgetMiB;
    }
  }
  lt.finetune.backend = env.backend;
  lt.finetune.seed = task.seed;
  lt.finetune.dp_clip = task.local_dp_clip;
  lt.finetune.dp_noise_multiplier = task.local_dp_noise;
  lt.optimizer.lr = static_cast<float>(task.learning_rate);
  lt.optimizer.warmup_steps = task.warmup_steps;
  lt.optimizer.total_steps = task.local_steps;
  lt.optimizer.min_lr_ratio = 1.0f;  // constant local rate: the schedule lives across rounds
  lt.optimizer.weight_decay = static_cast<float>(task.weight_decay);
  lt.optimizer.clip_norm = static_cast<float>(task.grad_clip_norm);
  lt.send_fisher = task.send_fisher;
  const int steps = std::max(task.local_steps, 1);
  if (task.local_dp_clip > 0) {  // the privacy ledger must be readable before any training
    if (privacy == nullptr) return absl::FailedPreconditionError("task asks for local DP-SGD but this client keeps no privacy ledger");
    FT_RETURN_IF_ERROR(privacy->Open(task.local_dp_delta > 0 ? task.local_dp_delta : 1e-5));
  }
  if (env.progress) lt.on_step = [&env, steps](const model::StepLog& s) { env.progress(static_cast<double>(s.step) / steps); };
  FT_ASSIGN_OR_RETURN(LocalResult r, TrainLocal(*base, data, start, task.config, task.client, lt, &adapters));
  // A device worker's host side (the CUDA runtime's own host memory is not modelled) is checked
  // but not fed back: only its device prediction goes with the update.
  if (predicted && env.device_memory_mib <= 0) r.update.metrics["predicted_peak_mib"] = predicted->a.total_mib;
  if (predicted && env.device_memory_mib > 0) r.update.metrics["predicted_device_mib"] = predicted->a.device_mib;
  if (task.local_dp_clip <= 0) r.update.metrics["activations_kept"] = !lt.finetune.recompute || lt.finetune.activation_budget_mib > 0 ? 1 : 0;
  if (task.local_dp_clip > 0) {
    if (privacy == nullptr) return absl::FailedPreconditionError("task asks for local DP-SGD but this client keeps no privacy ledger");
    FT_ASSIGN_OR_RETURN(double eps, privacy->Record(task, data.size()));
    r.update.metrics["local_epsilon"] = eps;
    // The coordinator is not trusted under local DP: nothing that depends on the data but the
    // privatised update leaves (no loss, no token count; weight 1 instead of the example count).
    r.update.num_examples = 1;
    r.update.metrics.erase("train_loss");
    r.update.metrics.erase("train_tokens");
    r.update.metrics.erase("predicted_peak_mib");
    r.update.metrics.erase("predicted_device_mib");
  }
  if (!task.compression.empty()) {  // after local DP: compression is post-processing of its output
    FT_ASSIGN_OR_RETURN(const aggregation::Compression kind, aggregation::CompressionFromName(task.compression));
    if (task.topk_fraction <= 0 || task.topk_fraction > 1) return absl::InvalidArgumentError("task: topk_fraction must be in (0, 1]");
    aggregation::TensorMap* ef = task.error_feedback ? env.error_feedback : nullptr;
    if (ef == nullptr || !diablo || lt.train_blocks <= 0) {
      aggregation::CompressUpdate(&r.update, kind, task.topk_fraction, ef);
    } else {
      // A DiaBlo window moves from round to round (protocol::FirstBlock): the residual stays in
      // whole-tensor coordinates, so what compression left of block j goes out the next time
      // block j trains, not on whatever block takes its place in the window.
      aggregation::TensorMap window;
      std::map<std::string, size_t> offset;
      for (const auto& [name, d] : r.update.delta) {
        const auto g = global.find(name);
        const size_t n = g == global.end() ? d.size() : g->second.size();
        std::vector<float>& whole = (*ef)[name];
        if (whole.size() != n) whole.assign(n, 0.0f);
        const size_t at = d.size() < n ? n / static_cast<size_t>(protocol::FullShare(p)) * static_cast<size_t>(lt.train_first_block) : 0;
        if (at + d.size() > n) return absl::InternalError(absl::StrCat("error feedback: ", name, " window past the tensor"));
        offset[name] = at;
        window[name].assign(whole.begin() + static_cast<std::ptrdiff_t>(at), whole.begin() + static_cast<std::ptrdiff_t>(at + d.size()));
      }
      aggregation::CompressUpdate(&r.update, kind, task.topk_fraction, &window);
      for (const auto& [name, w] : window) std::copy(w.begin(), w.end(), (*ef)[name].begin() + static_cast<std::ptrdiff_t>(offset[name]));
    }
  }
  return r;
}

}  // namespace fedtune::worker

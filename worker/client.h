// A client's side of a round, written once for the worker daemon and the simulation's virtual
// clients: take a `protocol::TrainTask` and the round's global adapter, build the task's adapter
// layout on the right base (re-quantized when the plan says so), train locally with the task's
// optimizer settings and privacy parameters, and return the update. What the client machine
// decides itself (kernels, activation memory) comes in `ClientEnv`.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <tuple>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "model/llama.h"
#include "planner/planner.h"
#include "privacy/ledger.h"
#include "aggregation/strategy.h"
#include "protocol/task.h"
#include "worker/local_trainer.h"

namespace fedtune::worker {

// The frozen base at its stored precision plus re-quantized copies that plans ask for (loaded
// from `path` once per type and compensation; thread-safe, but with keep_one a pointer For
// returned lives only until the next training request for another base).
class BaseModels {
 public:
  // keep_one: a training task frees the copies of other bases (a worker daemon: a plan that moves
  // to another base frees the previous copy; evaluation tasks, on the run's base, free nothing);
  // the simulation keeps every type its clients use.
  BaseModels(const model::LlamaModel& stored, std::string path, bool keep_one = false)
      : stored_(stored), path_(std::move(path)), keep_one_(keep_one) {}
  // The plan's base: "" or the stored type (as the rows store it): the stored model; else a
  // copy re-quantized to it, with the plan's compensation (cloq, gptq: calibrated on the tokens
  // of SetCalibration, refused without them).
  absl::StatusOr<const model::LlamaModel*> For(const protocol::AdapterPlan& plan, bool training = false);
  // The client's own training inputs for cloq and gptq (the first tokens of its examples).
  void SetCalibration(const std::vector<model::Example>& data, size_t max_tokens = 2048);
  const model::LlamaModel& stored() const { return stored_; }
  // Keeps compensated copies on disk in `dir` (LlamaModel::RequantizeCompensated's cache): a
  // restarted worker reads them back instead of recomputing them ("": no cache).
  void SetCacheDir(std::string dir) {
    std::lock_guard<std::mutex> l(mu_);
    cache_dir_ = std::move(dir);
  }
  // The compensation report of the copy built last (none: no compensated copy yet).
  std::optional<model::LlamaModel::CompensationReport> last_report() {
    std::lock_guard<std::mutex> l(mu_);
    return last_report_;
  }
  // Re-quantized copies built so far.
  size_t copies() {
    std::lock_guard<std::mutex> l(mu_);
    return by_type_.size();
  }

 private:
  const model::LlamaModel& stored_;
  const std::string path_;
  const bool keep_one_;
  std::mutex mu_;
  std::vector<int32_t> calibration_;
  std::string cache_dir_;
  std::optional<model::LlamaModel::CompensationReport> last_report_;
  std::map<std::tuple<kernels::GgmlType, std::string, int, double>, std::unique_ptr<model::LlamaModel>> by_type_;
};

// A short timed training run that measures a base's speed: a fresh `spec` adapter on `modules`,
// `batch` examples of `data` per step, one untimed warm-up step (first touches of the weights),
// then `steps` timed steps recomputing activations. Returns tokens/s (padding included).
struct SpeedProbe {
  model::AdapterSpec spec{model::AdapterKind::kLora, 4, 8.0f, false, 1};
  std::vector<model::Module> modules{model::Module::kQ, model::Module::kV};
  int batch = 1, steps = 2;
  uint64_t seed = 1;
  kernels::Backend* backend = nullptr;  // null: cpu-fast
};
absl::StatusOr<double> TimedTokensPerSecond(const model::LlamaModel& model, const std::vector<model::Example>& data, const SpeedProbe& p);

// Training speed per base precision (issue 22): for each of `types`, the base re-quantized to it
// (loaded from `path`, measured, freed; a type the stored rows already have: `stored` itself),
// timed by TimedTokensPerSecond; and the stored type (`stored`), timed the same way in the same
// pass, under its own name. Tokens/s by type. planner::RelativeBaseSpeeds turns them into
// WorkerProfile::base_speed. Compensated bases are timed without their correction (its cost:
// one rank-r product per projection, small beside the base's). memory_mib > 0: a type whose
// re-quantized projections would take this process above kMemoryMargin of it is skipped (not
// measured: the planner then assumes the stored type's speed). `stop` (may be null): checked
// between types (Cancelled).
absl::StatusOr<std::map<kernels::GgmlType, double>> MeasureBaseSpeeds(const model::LlamaModel& stored, const std::string& path,
                                                                     const std::vector<kernels::GgmlType>& types,
                                                                     const std::vector<model::Example>& data, const SpeedProbe& p,
                                                                     double memory_mib = 0, const std::atomic<bool>* stop = nullptr);

// How the client runs its activations (the planner's memory model predicts the same):
//   activation_budget_mib > 0: the trainer keeps activations within that many MiB per pass;
//   activation_budget_mib < 0: full recomputation;
//   activation_budget_mib == 0 and recompute (the default): keep the activations of as many
//     sequences per pass as fit in memory_mib x kMemoryMargin after the base, adapter state and
//     logits (planner::MemoryModel::Choose at the client's longest example), recompute when none
//     fits; with memory_mib unknown (0), the trainer's budget of kDefaultActivationBudgetMiB;
//   recompute false: keep everything.
struct ClientEnv {
  static constexpr double kMemoryMargin = planner::MemoryModel::kClientMargin;  // = planner::PlannerOptions::memory_margin's default
  static constexpr int kDefaultActivationBudgetMiB = static_cast<int>(planner::MemoryModel::kDefaultKeptMiB);  // = fedtune train's default
  int activation_budget_mib = 0;
  bool recompute = true;
  double memory_mib = 0;              // what this client may use (0: unknown)
  // > 0: the backend is a device (GPU) with this much free memory: activations are kept within
  // kMemoryMargin of it (planner::MemoryModel::ChooseOnDevice) and a task predicted above it is
  // declined, as for memory_mib on the host.
  double device_memory_mib = 0;
  double adapter_copies = 0;          // planner::MemoryModel::adapter_copies (2 in a worker daemon)
  kernels::Backend* backend = nullptr;  // null: cpu-fast
  std::function<void(double)> progress;  // fraction of local steps done
  // Compressed uploads with error feedback: what compression dropped, carried to the next round
  // (the worker's or simulated client's own; null: no error feedback).
  aggregation::TensorMap* error_feedback = nullptr;
};

// The client's record-level privacy under local DP-SGD: every round's DP-SGD steps, composed.
// With a path, the ledger is kept in that file (JSON, written atomically and fsync'ed before the
// round's update can leave), so a restarted worker continues its count instead of restarting it.
class LocalPrivacy {
 public:
  LocalPrivacy() = default;
  explicit LocalPrivacy(std::string path) : path_(std::move(path)) {}
  // Loads the ledger (once; called before training): a file that cannot be read stays an error
  // for every later call, so a worker never restarts its count by accident.
  absl::Status Open(double delta);
  // Records the round's steps (q = batch / examples) and returns the epsilon spent so far.
  absl::StatusOr<double> Record(const protocol::TrainTask& task, size_t examples);

 private:
  std::string path_;
  std::unique_ptr<privacy::PrivacyLedger> ledger_;
  absl::Status open_status_;
};

// A task this client declines (RunTrainTask): its predicted peak (planner::MemoryModel at the
// client's longest example, the plan's base, modules and rank, the activation policy of
// ClientEnv) exceeds kMemoryMargin of the memory it may use, the share the planner plans within.
// Checked only where the memory is known and the activations follow it (the default policy); the
// coordinator re-plans the client from these figures (RoundEngine).
struct Decline {
  std::string reason;
  double needed_mib = 0, budget_mib = 0;
  bool device = false;  // the figures are of device memory (a GPU worker)
};
// The status RunTrainTask returns for a declined task (ResourceExhausted, with the figures), and
// the figures back from such a status (nullopt for any other). The task is declined before its
// base is built and before any training (the global adapter was downloaded).
absl::Status DeclineStatus(const Decline& d);
std::optional<Decline> DeclineFrom(const absl::Status& s);

// Trains `task` on `data`. `privacy` (may be null without local DP) accounts local DP-SGD; the
// update then carries "local_epsilon". A task over the client's memory budget is declined
// (DeclineStatus) before its base is built.
absl::StatusOr<LocalResult> RunTrainTask(BaseModels& bases, const std::vector<model::Example>& data, const protocol::TrainTask& task,
                                         const aggregation::TensorMap& global, const ClientEnv& env, LocalPrivacy* privacy);

// Scores `global` (the task's adapter layout) on `eval` with the task's max_new_tokens:
// eval_loss (per token), eval_ppl, accuracy (exact match, when the data has answers).
absl::StatusOr<aggregation::EvalReport> RunEvalTask(BaseModels& bases, const std::vector<model::Example>& eval, const protocol::TrainTask& task,
                                                    const aggregation::TensorMap& global, kernels::Backend* backend);

}  // namespace fedtune::worker

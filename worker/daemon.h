// The worker daemon's loop against a coordinator (gRPC, mutual TLS): join with the join token and
// a measured profile, long-poll for tasks, download the round's global adapter (resuming a broken
// download at its offset; checked against its SHA-256), train with a `TaskRunner` while heartbeats
// report progress, keep the encoded update in the state directory, upload it in chunks.
// Reconnects with exponential backoff while the coordinator is unreachable; returns when told to
// shut down or when `stop` becomes true.
//
// State directory: the last trained update (`last-update.bin` + `last-update.json`: run, round,
// the global adapter it was trained from) is written atomically before the upload and kept
// until the next round's update replaces it. A daemon restarted mid-upload, or a coordinator
// restarted before committing the round, gets the same task again: the daemon uploads the kept
// update instead of training again, so a restart neither redoes nor loses a round.
#pragma once

#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "model/dataset.h"
#include "model/llama.h"
#include "proto/service.pb.h"
#include "protocol/task.h"
#include "worker/client.h"
#include "worker/local_trainer.h"

namespace fedtune::worker {

struct DaemonOptions {
  std::string address;                    // host:port of the coordinator
  std::string ca_pem, cert_pem, key_pem;  // file paths
  std::string token;                      // join token (hex)
  std::string state_dir;                  // empty: no state kept across restarts
  rpc::v1::Profile profile;               // sent on join (see MeasureProfile)
  int max_backoff_ms = 30000;
  int poll_ms = 2000;
  bool quiet = false;                     // no per-round log lines (load tests run hundreds)
  // Fault drills and tests: in secure-aggregation rounds, upload the masked input and then
  // vanish for the rest of the round (the others must unmask without this worker).
  bool drop_after_masking = false;
  // Measures training tokens/s on the base types a planned run asks for (JoinResponse.base_types
  // of a preflight join) into Profile.base_tokens_per_second before the worker joins for tasks
  // (e.g. BaseSpeedMeasurer). Empty: no preflight; the planner assumes the stored type's speed.
  std::function<absl::StatusOr<std::map<std::string, double>>(const std::vector<std::string>& types)> measure_bases;
};

struct DaemonReport {
  int rounds_trained = 0;    // updates accepted by the coordinator
  int rounds_reused = 0;     // of those, uploaded from the state directory without training
  int rounds_abandoned = 0;  // the coordinator closed the round before our update
  int rounds_declined = 0;   // tasks over this worker's memory budget, declined (worker::Decline)
  int evaluations = 0;       // EVALUATE tasks answered
};

// Trains one task: `global` is the round's adapter, `progress(f)` may be called with the
// fraction of local steps done (it feeds the heartbeats).
using TaskRunner = std::function<absl::StatusOr<LocalResult>(const protocol::TrainTask& task, const aggregation::TensorMap& global,
                                                          const std::function<void(double)>& progress)>;

// The real trainer: worker::RunTrainTask on `model` (re-quantized copies loaded from
// `model_path` when a plan asks for another base type) and `data`, with local DP-SGD accounted
// across rounds. activation_budget_mib and memory_mib: how activations are kept (ClientEnv; 0 and
// the worker's memory: as many sequences per pass as fit). backend: kernels for training (null:
// cpu-fast). privacy_path: where the local DP-SGD ledger persists across restarts (empty: in
// memory only). report_peak: the update carries this process's peak RSS of the round
// ("peak_rss_mib", for the coordinator's memory feedback): only where the runner is alone in
// its process (`fedtune worker`), not for several daemons in one test process. shared_bases: the
// re-quantized bases, shared with the worker's evaluator (null: the runner's own).
// A device backend: plans and activations within device_memory_mib of its memory (0: its free
// memory at start, Backend::DeviceMemoryBytes; never more), and the update reports the round's
// device peak ("peak_device_mib"). residual_path: where the error-feedback residual of
// compressed uploads persists across restarts (empty: in memory only).
TaskRunner ModelTaskRunner(const model::LlamaModel& model, const std::vector<model::Example>& data, const std::string& model_path = "",
                     int activation_budget_mib = 0, kernels::Backend* backend = nullptr, const std::string& privacy_path = "",
                     double memory_mib = 0, bool report_peak = false, std::shared_ptr<BaseModels> shared_bases = nullptr,
                     double device_memory_mib = 0, const std::string& residual_path = "");
// Random updates of the global adapter's shape after `seconds` of pretend work.
TaskRunner StandInTaskRunner(int64_t num_examples, double seconds);

// Scores an EVALUATE task: the round's global adapter on the worker's held-out data.
using TaskEvaluator = std::function<absl::StatusOr<aggregation::EvalReport>(const protocol::TrainTask& task, const aggregation::TensorMap& global)>;
// worker::RunEvalTask on `model` and `eval` (re-quantized bases as ModelTaskRunner).
// `train`: the worker's training data, whose inputs calibrate a cloq/gptq-compensated base (the
// same base the runner trains on), never its held-out data. bases: shared with the runner (so a
// re-quantized, compensated base is built once per worker; null: the evaluator's own).
TaskEvaluator ModelTaskEvaluator(const model::LlamaModel& model, const std::vector<model::Example>& eval, const std::string& model_path = "",
                                 const std::vector<model::Example>* train = nullptr, std::shared_ptr<BaseModels> bases = nullptr);

// Cores, memory (MemAvailable, capped by `memory_budget_mib` when > 0), the GPU when `backend`
// is CUDA, the kernels, and, with a model, the measured training speed (a rank-4 LoRA at batch 1
// on `data`, on `backend`, null: cpu-fast; two steps recomputing activations, then two keeping
// them: train_tokens_per_second and keep_speedup; then two at batch 4 recomputing:
// batch4_speedup).
// A device backend: its free memory (capped by `device_memory_budget_mib` when > 0) and whether its
// products run in bf16 (Profile.device_memory_bytes, device_bf16_gemm).
rpc::v1::Profile MeasureProfile(const model::LlamaModel* model, const std::vector<model::Example>* data, int64_t memory_budget_mib,
                                kernels::Backend* backend = nullptr, int64_t device_memory_budget_mib = 0);

// DaemonOptions::measure_bases for a worker: worker::MeasureBaseSpeeds with the MeasureProfile
// probe (rank-4 LoRA on q, v, batch 1, two timed steps), cached in `cache_path` (JSON; empty: not
// cached) for this model file (path, size, modification time), kernels and core count, so a
// restarted worker does not measure again.
// memory_mib and stop: as MeasureBaseSpeeds (the worker's budget; its stop flag, which must
// outlive the measurer).
std::function<absl::StatusOr<std::map<std::string, double>>(const std::vector<std::string>&)> BaseSpeedMeasurer(
    const model::LlamaModel& model, const std::string& model_path, const std::vector<model::Example>& data, kernels::Backend* backend,
    const std::string& cache_path, double memory_mib = 0, const std::atomic<bool>* stop = nullptr);

// `evaluator` (may be empty): answers EVALUATE tasks; set it only with held-out data, and
// report their number in the profile (eval_examples) so the coordinator selects this worker.
absl::StatusOr<DaemonReport> RunDaemon(const DaemonOptions& o, const TaskRunner& trainer, const std::atomic<bool>& stop,
                                       const TaskEvaluator& evaluator = nullptr);

}  // namespace fedtune::worker

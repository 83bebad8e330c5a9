// Heterogeneity-aware planning (issue 8; ALGORITHMS.md "Heterogeneity-aware planning"): the
// coordinator gives each worker the part of the fine-tuning it can do well — which modules of the
// shared adapter it trains, its base precision, batch and local steps — so that weak workers are
// neither excluded nor the round's stragglers.
//
// Formulation (ours). Worker k and candidate c = (trained modules S, base type b, batch B, local
// steps n):
//   memory_k(c) = MemoryModel::PredictMiB(...)            must be <= memory_margin * M_k
//   time_k(c)   = n B L / tps_k  +  2 latency_k  +  (adapter down + update up) / link_k
//   utility(c)  = n B * sum_{m in S} I_m / sum_m I_m     (examples processed, weighted by the
//                                                         importance I of the modules trained)
// Minimise the round time T = max_k time_k(c_k) subject to every worker that fits anything
// taking part and sum_k utility(c_k) >= work_factor x the uniform configuration's utility (1: the
// same training work as everyone running the uniform configuration). Ties go to higher base
// precision, then to larger batches (fewer, less noisy steps). For a fixed T the problem separates: each
// worker takes its highest-utility candidate with time <= T, and the best sum is monotone in T,
// so scanning the sorted candidate times (binary search) finds the optimum exactly over the
// candidate grid. Module sets are enumerated exhaustively up to 10 adapted modules (1,023
// subsets); beyond that only importance-ordered prefixes are tried (the documented heuristic).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "kernels/quant.h"
#include "model/adapter.h"

namespace fedtune::model {
class LlamaModel;
}

namespace fedtune::planner {

// What the memory and time models need to know about the base model.
struct ModelShape {
  int64_t n_layer = 0, n_embd = 0, n_kv = 0, n_ff = 0, n_vocab = 0;
  int64_t n_q = 0;                  // q width (heads x head size; 0: n_embd)
  int64_t n_head = 0, n_head_kv = 0;
  bool qk_norm = false;             // qwen3: per-head q/k norms keep their inputs too
  bool post_norms = false;          // gemma2/3: norms on the attention and MLP outputs keep theirs
  bool attn_softcap = false;        // gemma2: the CUDA backward keeps the cap's derivatives too
  // Activation bytes per token the trainer allocates (model/trainer.cc), from the shape alone:
  // one layer's kept cache (Trainer::KeptBytesPerSequence without adapters), and with
  // recomputation every layer's input + one layer's cache + the backward temporaries.
  double LayerCacheBytesPerToken() const;
  // One layer's backward temporaries and the pass's x, next, h, dh (part of
  // RecomputeBytesPerToken; kept activations need them besides the layer caches).
  double BackwardTempBytesPerToken() const;
  // The derived h1, h2 and act the trainer holds once per pass, not per layer (Trainer::Work).
  double DerivedBytesPerToken() const;
  double RecomputeBytesPerToken() const;
  double projection_params = 0;  // q, k, v, o, gate, up, down weights over all layers
  // Their (rows, cols), for exact bytes per base type (K-quant rows fall back, kernels::
  // RowCompatibleType) and for the size of a low-rank correction; empty: from projection_params.
  std::vector<std::pair<int64_t, int64_t>> projections;
  double other_bytes = 0;        // embeddings, output head, norms, as stored
  kernels::GgmlType stored = kernels::GgmlType::kQ4_1;
  // The token embedding's and the output head's stored types (ModelShape::Of; a hand-made shape
  // leaves heads_known false and the device model then counts other_bytes as they are).
  bool heads_known = false;
  kernels::GgmlType embd_type = kernels::GgmlType::kF32, output_type = kernels::GgmlType::kF32;
  bool tied_output = true;
  static ModelShape Of(const model::LlamaModel& m);
};

double BitsPerWeight(kernels::GgmlType t);

struct Candidate {
  std::vector<model::Module> modules;  // trained by the worker (the others act frozen)
  kernels::GgmlType base = kernels::GgmlType::kQ4_1;
  int batch = 1;
  int local_steps = 1;
  // LoRA / FFA-LoRA rank the worker trains (the first `rank` components of the shared adapter,
  // aggregation/hetero_rank.h); 0: the shared rank. Memory and upload shrink with it. DiaBlo:
  // the number of diagonal blocks it trains (a rolling window of `rank`): the upload shrinks.
  int64_t rank = 0;
};

// How a client runs its activations for one candidate (see MemoryModel::Choose).
struct ActivationChoice {
  bool recompute = true;
  int seqs_per_pass = 0;      // kept: sequences per forward/backward pass (the batch when all fit)
  double activation_mib = 0;  // the activations' share of the predicted peak (on the device for a device worker)
  double total_mib = 0;       // the predicted peak (of host memory)
  double device_mib = 0;      // a worker training on a device (MemoryModel::ChooseOnDevice): its predicted device peak
  // Local DP-SGD (MemoryModel::per_example): drawn examples per forward/backward pass
  // (model::DpExamplesPerPass on host kernels, 1 on a device); 0 otherwise.
  int dp_examples_per_pass = 0;
  // Sequences in one forward/backward pass, for the time model (0: the batch).
  int PassSequences() const { return recompute ? dp_examples_per_pass : seqs_per_pass; }
};

// Peak resident memory of a worker training one candidate:
//   fixed + base(b) + adapter state + activations + min(tokens, chunk) * vocab * 4 B (logit chunk:
//   kernels::kLogitChunkRows rows, kBf16LogitChunkRows on cpu-bf16; there also the bf16 output matrix)
// where tokens = batch * seq (one micro-batch), adapter state = 4 B per frozen value + 20 B per
// trained value (weight, gradient, two AdamW moments, Fisher), activations = tokens * per_token
// (recomputation: saved layer inputs and one layer's temporaries) or seqs_per_pass * seq *
// per_token_layer * layers (kept). The constants were fitted by least squares to peaks measured
// with /usr/bin/time over a grid of fedtune train runs on SmolLM2-135M (bench/memory_model.sh;
// README "Planning").
//
// Activation modes: `recompute` true (full recomputation), false (every sequence's activations
// kept), or `keep_within_limit` (what workers and the simulation do by default): keep the
// activations of as many sequences per pass as fit in the memory left under the limit after
// everything else, recompute only when not even one sequence fits. Keeping is 1.2-1.4x faster
// (bench_train, 8 x 256, LoRA r=16: cpu-fast 200-203 -> 256-276 tokens/s, cpu-bf16 294-296 ->
// 343-357), the speedup each worker measures (WorkerProfile::keep_speedup).
struct MemoryModel {
  static constexpr double kUnknownMemoryMiB = 1e11;  // a limit this large: the memory is not known
  static constexpr double kDefaultKeptMiB = 1024;    // what a client then keeps per pass (= ClientEnv)
  // Clients keep their activations within, and decline tasks above, this share of their memory
  // (worker::ClientEnv::kMemoryMargin; = PlannerOptions::memory_margin's default).
  static constexpr double kClientMargin = 0.9;
  // Fitted constants are per byte of what the shape says the trainer allocates, so they carry
  // over to other shapes and families (refit: bench/memory_model.sh + bench_memory_fit).
  double fixed_mib = 0;
  double recompute_factor = 1;       // x RecomputeBytesPerToken per token (recomputation on)
  double kept_factor = 1;            // x LayerCacheBytesPerToken per token and layer (kept)
  double logit_factor = 1;           // logit-chunk buffers, in units of chunk * vocab * 4 B
  bool recompute = true;
  bool keep_within_limit = false;
  // A re-quantized base (not the stored type) carries a frozen correction of this rank per
  // projection in fp16 (train.compensation; 0: none): rank x (rows + cols) x 2 bytes each.
  int64_t compensation_rank = 0;
  // Float32 copies of the whole adapter a worker daemon holds during its round besides its
  // trainer's (the downloaded global adapter and the update it sends): 2 for deployed workers
  // (coordinator planning, worker::ClientEnv of the daemon), 0 for `fedtune train` and the
  // simulation's in-process clients. Measured: bench/run_fleet_memory.sh.
  double adapter_copies = 0;
  // Local DP-SGD (model/finetune.cc): the drawn examples run model::DpExamplesPerPass at a time
  // (one at a time on a device), each keeping its own gradient (4 B per trained value and example
  // where more than one share a pass), and the clipped gradients are summed in float64 (8 B per
  // trained value).
  bool per_example = false;
  // Per-layer adapter settings (adapter.layers, model::ParseLayerLayout; empty: every layer has
  // the spec's modules at its rank): the adapter's state and transfers count the modules and
  // ranks each layer has. The activations are still predicted as if every layer had adapters
  // (an over-prediction where the lowest layers have none: backward stops at the first adapted
  // layer).
  std::vector<std::optional<model::LayerSetting>> layout;
  static MemoryModel Fitted();
  double BaseMiB(const ModelShape& s, kernels::GgmlType b) const;
  double AdapterStateMiB(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& adapted,
                         const std::vector<model::Module>& trained) const;
  // Activations of one sequence of `seq` tokens when kept.
  double KeptMiBPerSequence(const ModelShape& s, int seq) const;
  // The activation mode and predicted peak for a client that may use `limit_mib` (<= 0: no limit
  // known; keep_within_limit then recomputes).
  // bf16_kernels: the client trains on cpu-bf16, whose output layer (>= 64 scored rows) keeps the
  // output matrix and the chunk's logit gradients in bf16 besides (BF16OutputMiB).
  ActivationChoice Choose(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& adapted, const Candidate& c,
                          int seq, double limit_mib, bool bf16_kernels = false) const;
  double PredictMiB(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& adapted, const Candidate& c,
                    int seq, double limit_mib = 0, bool bf16_kernels = false) const {
    return Choose(s, spec, adapted, c, seq, limit_mib, bf16_kernels).total_mib;
  }
  static double Bf16OutputMiB(const ModelShape& s, double tokens_per_pass);

  // Training on a device (the CUDA backend, kernels/cuda/cuda_backend.cu): the activations, the
  // frozen weights (cached as stored; f32 where the device has no dequantizer), their
  // dequantized copies, the cross-entropy's rows and logits chunk, and the adapters' parameters
  // and gradients live in device memory; the rest (model file, adapter and optimizer state,
  // copies) in host memory. Predicts the backend's own allocations (Backend::PeakDeviceBytes);
  // the CUDA context and cuBLAS's workspace are outside, as the budget they are compared with is
  // the device's free memory once the backend has started (Backend::DeviceMemoryBytes). Derived
  // from what the backend and the trainer allocate, per byte of the shape (no fitted constants);
  // checked against the emulated backend's count (tests/planner/device_memory_test.cc).
  double device_logits_chunk_bytes = 256.0 * (1 << 20);  // the backend's kCrossEntropyLogitsBytes
  bool device_bf16_gemm = true;  // bf16 products (sm_80 and newer): bf16 weight and input copies; else f32
  double DeviceWeightMiB(const ModelShape& s, kernels::GgmlType b) const;
  // The activation mode and both peaks for a device worker: total_mib is the host's, device_mib
  // the device's; activations are kept within device_limit_mib (keep_within_limit; <= 0: recompute).
  ActivationChoice ChooseOnDevice(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& adapted,
                                  const Candidate& c, int seq, double device_limit_mib) const;
};

// Bytes of the adapter tensors of `modules` (float32; what travels each way).
// With a layout (may be null or empty: uniform), the modules and ranks each layer has.
double AdapterBytes(const ModelShape& s, const model::AdapterSpec& spec, const std::vector<model::Module>& modules,
                    const std::vector<std::optional<model::LayerSetting>>* layout = nullptr);

struct WorkerProfile {
  std::string name;
  double memory_mib = 0;         // what the worker may use
  double tokens_per_second = 0;  // training throughput at the stored precision, recomputing
  double link_mbps = 100, latency_ms = 20;
  double keep_speedup = 1;       // throughput with activations kept / recomputed (measured)
  bool bf16_kernels = false;     // trains on cpu-bf16 (memory: MemoryModel::Choose)
  // Measured training speed on a re-quantized base relative to the stored precision (tokens/s
  // at that type / tokens/s at the stored type, both by the same short timed run: the worker's
  // profile, or the simulation's calibration). A type not listed runs at the stored speed.
  std::map<kernels::GgmlType, double> base_speed = {};
  double examples = 0;  // training examples it holds (local DP-SGD's sampling rate; 0: unknown)
  // Speed at batch 4 / at batch 1, both recomputing (a deployed worker's profile); 1: the same
  // for every batch (the simulation measures at the uniform batch instead). tokens_per_second is
  // then the batch-1 speed; other batches interpolate in log2(batch), flat beyond 4.
  double batch4_speedup = 1;
  // > 0: the worker trains on a device with this much free memory (MiB); its plans are bounded by
  // it (MemoryModel::ChooseOnDevice) besides memory_mib for the host side.
  double device_memory_mib = 0;
  bool device_bf16_gemm = true;  // its device's products run in bf16 (MemoryModel::device_bf16_gemm)
  double BatchSpeed(int batch) const;
  // The factor for `t` (1 when not measured), bounded to [0.05, 20].
  double BaseSpeed(kernels::GgmlType t) const;
};

struct PlannerOptions {
  model::AdapterSpec spec;
  std::vector<model::Module> adapted;     // the shared adapter's modules
  int seq = 256;                          // tokens per example, the longest (memory)
  double tokens_per_example = 0;          // mean tokens processed per example (time); 0: seq
  std::vector<int> batches = {1, 2, 4, 8};
  int max_local_steps = 8;
  std::vector<kernels::GgmlType> base_types;  // empty: the stored type only
  Candidate uniform;                      // the configuration the plan is measured against
  double work_factor = 1.0;               // training work to reach: this x the uniform configuration's
  double memory_margin = 0.9;             // plan within this fraction of a worker's memory
  // Per-worker ranks the planner may choose (each <= spec.rank; DiaBlo: block counts, each <=
  // spec.blocks); empty: the shared rank only.
  // A rank-r worker's utility counts r / spec.rank of its modules' importance (it updates that
  // share of the shared adapter's components); DiaBlo: k / spec.blocks.
  std::vector<int64_t> ranks;
  bool send_fisher = false;               // uploads carry a Fisher tensor per delta
  // Compressed uploads (strategy.compression): payload bytes of a delta per fp32 byte
  // (aggregation::CompressedBytesPerFp32Byte; 1: none). The Fisher travels uncompressed.
  double upload_ratio = 1.0;
  // Every worker trains all of `adapted` (secure aggregation: settings.cc says why); the planner
  // still chooses batch, local steps and base.
  bool whole_adapter = false;
  // Secure aggregation's threshold for a round of the planned workers (0: none): with per-worker
  // ranks (LoRA, FFA-LoRA), no worker is planned above the threshold-th highest planned rank (a
  // component fewer workers train is never unmasked); the capped workers re-plan batch and local
  // steps within the round's time. Rounds that sample fewer workers are narrowed further by the
  // round engine (protocol::NarrowShares).
  int secure_threshold = 0;
  // Local DP-SGD in the workers with this noise multiplier (0: off). A candidate is admissible
  // only where its per-round record-level RDP (sampling rate batch / the worker's examples, its
  // local steps) is at most the uniform configuration's on the same worker at the order a* where
  // the uniform run (local_dp_rounds rounds) attains its epsilon at local_dp_delta. Whatever plans
  // a worker gets round after round, its RDP at a* then stays within the uniform run's, and
  // epsilon = min over orders <= the value at a* = the uniform run's epsilon. A worker whose
  // example count is not known: batch and steps at most the uniform's (RDP grows with both).
  double local_dp_sigma = 0;
  double local_dp_delta = 1e-5;
  int local_dp_rounds = 1;
  MemoryModel memory = MemoryModel::Fitted();
};

struct WorkerPlan {
  std::string worker;
  bool excluded = false;
  std::string reason;  // why excluded
  Candidate c;
  double predicted_mib = 0, predicted_seconds = 0, utility = 0;
  double predicted_device_mib = 0;  // a device worker's predicted device peak
  double predicted_train_seconds = 0;  // of predicted_seconds: the local training (the rest: links)
  ActivationChoice activations;  // how it runs its activations (keep_within_limit)
  double uniform_seconds = 0;  // the uniform configuration's time on this worker (-1: does not fit)
  std::string explanation;
};

struct Plan {
  std::vector<WorkerPlan> workers;
  double round_seconds = 0, utility = 0;                   // planned
  double uniform_round_seconds = 0, uniform_utility = 0;   // everyone on `uniform`
  bool uniform_fits_everyone = true;
  std::string summary;
};

// Module importance normalised to sum 1 (missing modules: 0). From a calibration pass: the sum
// of the diagonal Fisher (mean squared gradient) of a probe adapter over the module's tensors,
// divided by its number of values so that large modules are not favoured for their size.
std::map<model::Module, double> NormaliseImportance(const std::map<model::Module, double>& raw);

// Where a round's merged update moved: mean squared change per value of each module's tensors
// (names "blk.<l>.<gguf module>.<part>"), normalised. Blended into the current importance
// half and half (`BlendImportance`), this is the importance refresh between rounds.
std::map<model::Module, double> UpdateEnergy(const std::map<std::string, std::vector<float>>& before,
                                             const std::map<std::string, std::vector<float>>& after, const std::vector<model::Module>& modules);
void BlendImportance(std::map<model::Module, double>& importance, const std::map<model::Module, double>& moved);

// A layout for the planner names only the adapter's modules (adapter.target_modules): an error
// naming the first layer and module that is not.
absl::Status CheckLayout(const std::vector<std::optional<model::LayerSetting>>& layout, const std::vector<model::Module>& adapted);

// With a layout (PlannerOptions::memory.layout), the modules no layer has are left out of the
// candidates, the uniform configuration and the importance.
absl::StatusOr<Plan> MakePlan(const ModelShape& shape, const std::map<model::Module, double>& importance,
                              const std::vector<WorkerProfile>& workers, const PlannerOptions& o);

// Measured tokens/s per base type (the stored type's included) -> each other type's speed
// relative to `stored_type`'s (WorkerProfile::base_speed; empty without the stored type's).
std::map<kernels::GgmlType, double> RelativeBaseSpeeds(const std::map<kernels::GgmlType, double>& tokens_per_second, kernels::GgmlType stored_type);

// The local training's share of PredictSeconds.
double TrainSeconds(const WorkerProfile& w, const PlannerOptions& o, const Candidate& c, bool kept = false, int seqs_per_pass = 0);
// kept: activations kept (the worker's keep_speedup applies); seqs_per_pass: sequences in one
// forward/backward pass (ActivationChoice::PassSequences; 0: the batch, under DP-SGD one), for BatchSpeed.
double PredictSeconds(const ModelShape& shape, const WorkerProfile& w, const PlannerOptions& o, const Candidate& c, bool kept = false,
                      int seqs_per_pass = 0);
// shared_rank > 0: a candidate of lower rank counts c.rank / shared_rank of it.
double Utility(const std::map<model::Module, double>& importance, const Candidate& c, int64_t shared_rank = 0);
// The adapter a candidate trains: `spec` at the candidate's rank.
model::AdapterSpec SpecAt(const model::AdapterSpec& spec, const Candidate& c);

}  // namespace fedtune::planner

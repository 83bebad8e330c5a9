// A client's task for one round, as the round engine (federation/) writes it and a client
// (worker/ daemon or a simulated client) reads it, plus its translation to and from the wire
// (rpc::v1::Task). This is the only place where a round's task meets protobuf: the engine and
// the clients work on `TrainTask`, the gRPC transport and the worker daemon convert.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "aggregation/tensors.h"
#include "common/status.h"
#include "proto/service.pb.h"

namespace fedtune::protocol {

// What to train: the adapter layout every client shares, and this client's share of it.
struct AdapterPlan {
  std::string kind;                        // lora, ffa_lora, diablo
  int rank = 8;
  float alpha = 16;
  int blocks = 16;
  bool rslora = false;
  std::vector<std::string> modules;        // the adapter's modules (every client has them)
  uint64_t adapter_seed = 1;               // FFA-LoRA's frozen A, LoRA's init
  std::string layers;                      // per-layer layout; empty: uniform
  // The planner's share for this client: modules it trains (empty: all), base precision
  // (empty: as stored), and why.
  std::vector<std::string> train_modules;
  std::string base_type;
  std::string explanation;
  // Quantization-error compensation of a re-quantized base (model/compensation.h).
  std::string compensation;
  int compensation_rank = 16;
  double compensation_damping = 0.01;  // cloq, gptq, gptq-cloq
  // This client's LoRA rank (0 or `rank`: the shared one): it trains the first train_rank
  // components of the global adapter (aggregation/hetero_rank.h). For DiaBlo the number of
  // diagonal blocks it trains (0 or `blocks`: all): a window of train_rank consecutive blocks
  // that rolls from round to round (FirstBlock), so every block is trained by workers with
  // fewer blocks too, not only by the ones that train all of them (the window depends on the
  // round only: a worker sampled every ceil(N/k)-th round, or whose k changes, may not see all).
  int train_rank = 0;
  // DiaBlo with fewer blocks: this worker's window is `block_offset` windows ahead of the round's
  // (the coordinator numbers the workers of one block count in a round 0, 1, ..., so that they
  // train different windows instead of the same one).
  int block_offset = 0;
  // The memory the plan was made for, when below what the client reported (0: its own): the
  // client keeps activations within it (worker::RunTrainTask). Host and device memory, MiB.
  double plan_memory_mib = 0, plan_device_memory_mib = 0;
};

// What a plan's train_rank is out of: the LoRA rank, or DiaBlo's block count.
inline int FullShare(const AdapterPlan& p) { return p.kind == "diablo" ? p.blocks : p.rank; }
// Whether the client trains part of the adapter (a lower rank, fewer DiaBlo blocks).
inline bool TrainsPart(const AdapterPlan& p) { return p.train_rank > 0 && p.train_rank < FullShare(p); }
// The first of the k consecutive DiaBlo blocks (of n) a worker trains in `round` (FedRolex-style
// rolling windows, Alam et al. 2022, without wrapping around): windows [0, k), [k, 2k), ... in
// turn, the last one ending at block n, so ceil(n / k) rounds cover every block; `offset`
// shifts a worker's turn (AdapterPlan::block_offset: workers of one round on different windows).
// 0 when k is 0 or n (all blocks) and for LoRA ranks (always the first components: nested ranks
// need them).
inline int64_t FirstBlock(int64_t n, int64_t k, int round, int64_t offset = 0) {
  if (k <= 0 || k >= n || round < 1) return 0;
  const int64_t windows = (n + k - 1) / k;
  const int64_t turn = (static_cast<int64_t>(round - 1) + std::max<int64_t>(offset, 0)) % windows;
  return std::min(turn * k, n - k);
}
inline int64_t FirstBlock(const AdapterPlan& p, int round) {
  return p.kind == "diablo" && TrainsPart(p) ? FirstBlock(p.blocks, p.train_rank, round, p.block_offset) : 0;
}

// Secure aggregation with per-worker shares (issue 22): what the client of one secure id trains,
// public like the rest of the plan: `rank` components (LoRA ranks / DiaBlo blocks) from
// `first` (rank 0: all of them) of `modules` (ModuleName; empty: all).
struct SecureShare {
  int rank = 0, first = 0;
  std::vector<std::string> modules;
  bool operator==(const SecureShare&) const = default;
};
SecureShare ShareOf(const AdapterPlan& p, int round);
inline bool IsWhole(const SecureShare& s) { return s.rank == 0 && s.modules.empty(); }

// A TRAIN task, or with `evaluate` set an EVALUATE task (score the global adapter on the
// client's held-out data; plan, adapter and max_new_tokens matter).
struct TrainTask {
  bool evaluate = false;
  int max_new_tokens = 32;
  int generate_examples = 0;  // of those, answered greedily for exact match / ROUGE-L (0: all)
  std::string run_id;
  int round = 0;
  std::string client;
  AdapterPlan plan;
  int local_steps = 4, batch = 8;
  double learning_rate = 5e-3;
  int warmup_steps = 0;
  double weight_decay = 0, grad_clip_norm = 1.0;
  uint64_t seed = 1;                       // example order
  std::map<std::string, double> config;    // the strategy's per-client settings (proximal_mu)
  bool send_fisher = false;
  // Upload compression (aggregation/compression.h): "" / none, int8, int4, topk.
  std::string compression;
  double topk_fraction = 0.05;
  bool error_feedback = true;
  // Local DP-SGD (record level, on the client): 0 = off.
  double local_dp_clip = 0, local_dp_noise = 0, local_dp_delta = 1e-5;
  // Distributed central DP under secure aggregation: the client clips its whole update to
  // dp_clip_norm and adds N(0, dp_noise_stddev^2) per coordinate before masking.
  bool secure_aggregation = false;
  double dp_clip_norm = 0, dp_noise_stddev = 0;
  struct Secure {
    int id = 0, clients = 0, degree = 0, threshold = 0;
    uint64_t graph_seed = 1;
    double value_range = 0.05;
    double weight_divisor = 0;  // weight = num_examples / divisor; 0: 1
    // Uncertainty-aware merging (> 0): the client sends sum-ready Fisher-weighted deltas and the
    // weights themselves, the Fisher clipped at fisher_clip (twice the values).
    double fisher_clip = 0, fisher_lambda = 1e-6;
    // Each id's share of the adapter (empty: every client trains all of it). A client pads
    // its update to the whole adapter with zeros before masking (the masked vector has one
    // layout), and nobody unmasks a sum in which a value some survivor trained was trained by
    // fewer survivors than the threshold (CheckShareCounts).
    std::vector<SecureShare> shares;
  } secagg;
  uint64_t test_noise_seed = 0;  // tests only: seeded client noise streams (see service.proto)
  // The global adapter to start from (deployment: what to download and check).
  std::string adapter_sha256;
  int64_t adapter_bytes = 0;
  int64_t deadline_unix_ms = 0;
};

// Per value of `layout` (the global adapter, full share `full`: LoRA rank or DiaBlo blocks): 1
// where a client of share `s` trains it, 0 elsewhere.
absl::StatusOr<aggregation::TensorMap> ShareCoverage(const SecureShare& s, const aggregation::TensorMap& layout, int full);
// FailedPrecondition (naming a module and component) when some value trained by a survivor is
// trained by fewer than `threshold` distinct survivors: its unmasked sum would show fewer updates
// than secure aggregation promises. Every worker checks every value, not only those it trains:
// SecAgg+ rebuilds a survivor's masks from any t of its neighbours' shares, so one honest worker
// refusing would not stop the others from unmasking its values. InvalidArgument for a share
// outside [0, full).
absl::Status CheckShareCounts(const std::vector<SecureShare>& shares, const std::vector<int>& survivors, const aggregation::TensorMap& layout,
                              int full, int threshold);

// Narrows per-worker shares (secure aggregation, issue 22) until every piece of `layout` (a
// module, or one of its LoRA rank components) that some share trains is trained by at least
// `threshold` of them: a piece below it is dropped from each share that covers it, as LoRA rank
// components from the top (a share of rank r covering component c > 0 becomes rank c: ranks are
// nested) or, for component 0 and unsplit tensors, as a module. A share left with no module
// trains nothing (`nothing` set). `modules` are the adapter's modules (ModuleName), which an
// all-module share (modules empty) is narrowed from; module lists come back sorted, as ShareOf
// gives them. Coverage only shrinks, so this ends; the
// result passes CheckShareCounts over the shares that train something. DiaBlo windows (first >
// 0, rolling with the round) are not narrowed: InvalidArgument. Returns how many (share, piece)
// pairs are trained afterwards (the round engine weighs narrowing against sitting out with it).
absl::StatusOr<int64_t> NarrowShares(std::vector<SecureShare>* shares, std::vector<bool>* nothing, const std::vector<std::string>& modules,
                                     const aggregation::TensorMap& layout, int full, int threshold);
// (share, piece) pairs the shares train (pieces as NarrowShares counts them).
absl::StatusOr<int64_t> CoveredPieces(const std::vector<SecureShare>& shares, const aggregation::TensorMap& layout, int full);

rpc::v1::Task ToProto(const TrainTask& t);
// The client name is not on the wire (it is the certificate's CN): `client` fills it in.
TrainTask FromProto(const rpc::v1::Task& t, const std::string& client);

// Example order of a client's local training in a round (FNV-1a of the name, xor the round):
// the same in simulation and deployment, so the two give the same updates.
uint64_t TrainingSeed(const std::string& client, int round);

}  // namespace fedtune::protocol

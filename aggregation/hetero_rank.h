// Merging LoRA factors of different ranks (ALGORITHMS.md, "Heterogeneous ranks"). Weights p_k
// are normalised to sum to one; `scale` is each adapter's alpha/r (or alpha/sqrt(r)), so the
// dense update of a client is scale * B A.
//   ZeroPadAverage (HetLoRA): pad A, B to the largest rank and average them separately;
//     inexact (mean(B) mean(A) != mean(B A)), kept as the cheap baseline.
//   FloraStack (FLoRA, arXiv 2409.05976): A = [p_1 s_1 A_1; ...; p_K s_K A_K],
//     B = [B_1 ... B_K], scale 1: exactly sum_k p_k s_k B_k A_k; the rank grows with K, so the
//     server merges it into a dense delta and clients restart their adapters.
//   FlexLoraRedistribute (FlexLoRA, arXiv 2402.11505): W = sum_k p_k s_k B_k A_k, SVD, and
//     client j gets the best rank-r_j approximation: B_j = U_r S_r / s_j, A_j = V_r^T.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "aggregation/strategy.h"
#include "common/status.h"

namespace fedtune::aggregation {

struct LoraFactors {
  int64_t rank = 0, in = 0, out = 0;
  std::vector<float> a;  // [rank, in]
  std::vector<float> b;  // [out, rank]
  double scale = 1.0;    // alpha / r
  double weight = 1.0;   // p_k (unnormalised)
};

// scale * B A, row-major [out, in].
std::vector<float> DenseDelta(const LoraFactors& f);
absl::StatusOr<LoraFactors> ZeroPadAverage(const std::vector<LoraFactors>& clients);
absl::StatusOr<LoraFactors> FloraStack(const std::vector<LoraFactors>& clients);
// One result per requested (rank, scale); rank <= min(in, out).
absl::StatusOr<std::vector<LoraFactors>> FlexLoraRedistribute(const std::vector<LoraFactors>& clients,
                                                              const std::vector<int64_t>& ranks, const std::vector<double>& scales);

// Per-worker ranks in a federated run (issue 22). The global adapter has the shared rank R
// (adapter.rank); a worker given rank r < R trains the first r components of every LoRA pair
// (rows of A, columns of B), starting from the global's: TruncateRank. Its forward has those r
// components only (HetLoRA / FlexLoRA truncation, so its memory and compute shrink with r), at
// the global's scale (the worker's alpha is adjusted, RankAlpha). Its update holds r-component
// deltas, which the server expands to R (ExpandRank) and merges by one of these rules
// (strategy.hetero_rank):
//   nested   (default) each component is averaged over the clients that trained it (weights
//            renormalised per component). Exact per component for FFA-LoRA: B enters linearly
//            with the shared frozen A, whose first r rows are a rank-r worker's A, so on every
//            component the merged update is the weighted mean of the dense updates of the
//            clients that trained it (over all clients, zero-padded: zero_pad). For LoRA as
//            exact as FedAvg of factors (mean(B) mean(A) != mean(BA)).
//   zero_pad updates zero-padded to R and averaged over all clients: a component moves by the
//            summed share of the clients that trained it (HetLoRA pads the clients' *factors*,
//            which also shrinks a component towards zero every round by the share of clients
//            that do not hold it; padding the updates keeps it).
//   flexlora (LoRA only) the exact weighted sum of the clients' products
//            W = sum_k p_k s B_k A_k (each client's r_k components after training), re-factored
//            by SVD into the best rank-R global (B = U S / s, A = V^T: components ordered by
//            singular value, so a rank-r worker's truncation is the best rank-r approximation
//            of the global, FlexLoRA's redistribution). Error: the discarded singular values
//            beyond R, reported per round as "hetero_truncation" (relative Frobenius norm, the
//            largest over modules; 0 while the clients' stacked rank fits in R).
// DiaBlo (its "rank" is the block count N, adapter.blocks): a worker given k < N blocks trains
// a window of k diagonal blocks of every module on top of all N (the others act frozen with the
// global's values; model::AdapterSet::TrainBlocks) and uploads those k blocks; the server
// pads them to N (ExpandRank: *.diablo tensors hold blocks first .. first + k - 1, the window
// protocol::FirstBlock rolls from round to round) and merges by
//   nested   each block averaged over the clients that trained it: exact, as FedAvg over those
//            clients (a block is a linear piece of the weight update, so the mean of the blocks
//            is the mean of the weight updates, which LoRA's factors do not have).
//   zero_pad averaged over all clients (a block moves by its trainers' share).
// flexlora needs LoRA factors (refused in settings).
enum class HeteroRankRule { kNested, kZeroPad, kFlexLora };
const char* HeteroRankRuleName(HeteroRankRule r);
absl::StatusOr<HeteroRankRule> ParseHeteroRankRule(const std::string& s);  // nested, zero_pad, flexlora

// The alpha that gives rank r the scale of rank R at `alpha` (alpha/r or alpha/sqrt(r)).
float RankAlpha(float alpha, int64_t rank, int64_t r, bool rslora);
// The first r components of every tensor "*.lora_a" ([R, in] -> [r, in]) and "*.lora_b"
// ([out, R] -> [out, r]), and r blocks from block `first` of every "*.diablo" ([N, b_in, b_out]
// with rank = N); other tensors are copied. InvalidArgument when r is not in [1, R], the blocks
// not in [0, N) or a tensor's size is not a multiple of R.
absl::StatusOr<TensorMap> TruncateRank(const TensorMap& t, int64_t rank, int64_t r, int64_t first = 0);
// The component (of `rank`: a LoRA rank index, a DiaBlo block) that value i of the adapter
// tensor `name` (n values) belongs to, as TruncateRank and ExpandRank cut them: "*.lora_a"
// [R, in] by row, "*.lora_b" [out, R] by column, "*.diablo" [N, ...] by block; -1 for other
// tensors (kept whole) and sizes that are not a multiple of rank.
int64_t ComponentOf(const std::string& name, size_t i, size_t n, int64_t rank);
// The inverse for an update: every delta (and Fisher) tensor of rank r is zero-padded to R, and
// with `coverage` the update's coverage marks the trained values (1) against the padding (0).
// The sizes must be exactly those of a rank-r truncation of `global` (InvalidArgument naming
// the tensor otherwise). Compressed wire forms are dropped (delta already holds their values).
absl::Status ExpandRank(ClientUpdate* u, const TensorMap& global, int64_t rank, int64_t r, bool coverage, int64_t first = 0);

// One round's accumulator for a run with per-worker ranks: expands each update by its client's
// rank (`ranks`; absent: the shared rank), then nested / zero_pad hand it to `inner` (the
// strategy's linear aggregation, which honours coverage), flexlora has `inner` validate it (and
// record its norm for the strategy's automatic bound), clips it to norm_bound, buffers the
// client's factors (memory: each client's r_k components) and merges them at Merge() into the
// delta from `global` to the re-factored global (applied as is by FedAvg with server_lr 1, which
// settings require).
// `global` must outlive the accumulator.
struct HeteroRankOptions {
  HeteroRankRule rule = HeteroRankRule::kNested;
  int64_t rank = 8;                 // the global adapter's (shared) rank R
  double scale = 2;                 // its alpha / R (or alpha / sqrt(R))
  int64_t max_client_examples = 0;  // flexlora weights: as StrategyOptions
  bool weight_by_examples = true;
  double norm_bound = 0;            // flexlora: clip each update to this L2 norm (the strategy's; 0: none)
};
// firsts: a DiaBlo client's first trained block (protocol::FirstBlock; absent: 0).
std::unique_ptr<Aggregation> MakeHeteroRankAggregation(const HeteroRankOptions& o, std::map<std::string, int64_t> ranks, const TensorMap& global,
                                                       std::unique_ptr<Aggregation> inner, std::map<std::string, int64_t> firsts = {});

}  // namespace fedtune::aggregation

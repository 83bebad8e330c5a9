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
#include <vector>

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

}  // namespace fedtune::aggregation

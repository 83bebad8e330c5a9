// Low-rank quantization-error compensation for low-bit bases (issue 23): a frozen rank-r term
// C = U V per linear module such that W ~ Q(W) + U V, computed on the worker from the weights
// it has and its own re-quantized copy. It describes the worker's base, not the task: it is
// never trained, never sent, and adds to the module's forward and input gradient like an adapter.
//   svd    LoftQ with one step: C = the best rank-r approximation of W - Q(W) (Eckart-Young).
//   loftq  LoftQ's alternation (Li et al. 2023): Q <- Q(W - C), C <- svd_r(W - Q), `iterations`
//          times, as PEFT's loftq_init (the quantizer sees W - C from the second step on).
//   cloq   CLoQ's closed form (Deng et al. 2025): Q = Q(W), C minimises ||X (W - Q - C)^T||_F for
//          calibration inputs X (H = X^T X + lambda I = L L^T: C = svd_r((W - Q) L) L^-1).
//   gptq   GPTQ's rounding (Frantar et al. 2023), no correction: columns quantized in order,
//          each one's rounding error spread over the columns not yet quantized so that
//          ||X (W - Q)^T|| stays small (H = X^T X + lambda I, through the upper Cholesky factor
//          of H^-1 as the paper's Algorithm 1). Block scales are chosen when a block's first
//          column comes up, from the updated weights (the paper's grouping); normal-float types
//          (NF4/NF3/NF2) then round column by column with that scale; the other block types
//          quantize a whole block at once (their quantizers choose sub-scales jointly) and spread
//          its error to the later columns with the exact block form W_r -= E U_bb^-1 U_br.
//   gptq-cloq  GPTQ's rounding, then CLoQ's correction of what is left.
// The factorizations run on Eigen in double (Gram matrices + symmetric eigensolver: exact top-r
// singular triplets, the split U = L sqrt(S), V = sqrt(S) R^T as PEFT's _low_rank_decomposition).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "kernels/quant.h"

namespace fedtune::model {

enum class CompensationMethod { kNone, kSvd, kLoftQ, kCloq, kGptq, kGptqCloq };
// none, svd, loftq, cloq, gptq, gptq-cloq
std::optional<CompensationMethod> ParseCompensationMethod(std::string_view s);
const char* CompensationMethodName(CompensationMethod m);
bool NeedsCalibration(CompensationMethod m);  // cloq, gptq, gptq-cloq
bool HasCorrection(CompensationMethod m);     // a low-rank term: svd, loftq, cloq, gptq-cloq

struct CompensationOptions {
  CompensationMethod method = CompensationMethod::kNone;
  int64_t rank = 16;
  int iterations = 5;      // loftq's alternations (svd and cloq: 1)
  double damping = 0.01;   // cloq: lambda = damping x mean(diag H)
};

// Row-major factors of C = u v: u is rows x rank, v is rank x cols.
struct LowRankFactors {
  int64_t rows = 0, cols = 0, rank = 0;
  std::vector<float> u, v;
};

struct CompensatedMatrix {
  kernels::GgmlType type = kernels::GgmlType::kF32;
  std::vector<uint8_t> bytes;  // rows x RowBytes(type, cols)
  LowRankFactors c;            // empty (rank 0) with kNone
  // Relative Frobenius errors ||W - Q|| / ||W|| and ||W - Q - C|| / ||W||; with a Gram matrix
  // also in the calibration norm ||X (W - Q)^T|| / ||X W^T|| (the error the outputs see).
  double rel_before = 0, rel_after = 0, act_before = -1, act_after = -1;
};

// Calibration inputs of one projection (shared by the projections that read the same input:
// q/k/v, gate/up): the rows X themselves (a few hundred tokens: smaller than X^T X for wide
// layers), H = X^T X formed when needed, and the lower Cholesky factor L of H + lambda I.
// ||X E^T||^2 = tr(E H E^T) = ||E L||^2, so cloq takes the best rank-r approximation of
// (W - Q) L and maps it back with L^-1 (a triangular solve).
struct CalibrationGram {
  int64_t cols = 0, rows = 0;
  std::vector<float> x;       // rows x cols
  std::vector<double> h;      // X^T X (empty until Gram())
  std::vector<double> chol;   // for `damping`
  std::vector<double> inv_upper;  // gptq: the upper Cholesky factor of (H + lambda I)^-1, for inv_damping
  double inv_damping = -1;
  double lambda = 0, damping = -1;
  void Accumulate(const float* in, int64_t n_rows, int64_t n_cols);
  const std::vector<double>& Gram();
  // Computes chol for this damping; FailedPrecondition when H + lambda I is not positive
  // definite (non-finite activations).
  absl::Status Prepare(double damping);
  // Prepares inv_upper for this damping (after Prepare).
  absl::Status PrepareInverse(double damping);
};

// Quantizes w (rows x cols, row-major) to `type` and computes its correction by o.method.
// gram: X^T X of calibration inputs of width cols; required by the methods NeedsCalibration
// names (prepared here if it is not), used for the act_* errors when given.
absl::StatusOr<CompensatedMatrix> QuantizeCompensated(const float* w, int64_t rows, int64_t cols, kernels::GgmlType type,
                                                      const CompensationOptions& o, CalibrationGram* gram);

}  // namespace fedtune::model

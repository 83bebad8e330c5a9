// Frozen-weight products in bf16 with fp32 accumulation (issue 18), through oneDNN's matmul
// (Debian libdnnl-dev): its brgemm kernels use AMX tiles or AVX-512-BF16 (vdpbf16ps) as the CPU
// allows. Chosen over our own kernels because oneDNN's measured 126-144 GFLOP/s per thread for
// the SmolLM2 projection shapes on an AMD Zen 4 (AVX-512-BF16), against 60-75 for OpenBLAS sgemm
// and 67-70 for oneDNN f32 on the same core (bench notes in docs/guide.md), and because the same
// call reaches AMX on Sapphire Rapids without a second kernel. Built only when CMake finds
// oneDNN; Bf16GemmBuilt() says so. Values are bf16 bit patterns (uint16_t).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedtune::kernels {

bool Bf16GemmBuilt();
// f32 -> bf16, round to nearest even (NaN kept NaN).
void ToBf16(const float* x, uint16_t* out, int64_t n);
// The same over the thread pool into `buf` (resized to n); returns buf's data.
const uint16_t* ToBf16Pooled(const float* x, int64_t n, std::vector<uint16_t>* buf);
// x[rows, cols] (f32) to bf16 in place: row i's values end up in the first half of its own
// bytes, so the result is a rows x cols bf16 matrix with leading dimension 2 cols, at x. The f32
// values are gone. (The bf16 output layer's logit gradients: no second n x V buffer.)
const uint16_t* ToBf16InPlaceRows(float* x, int64_t rows, int64_t cols);
inline float Bf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
// y[m, n] = x[m, k] w[n, k]^T (w row-major n x k, as a linear layer's weight).
void Bf16MatmulNT(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k);
// dx[m, k] += dy[m, n] w[n, k]; dy's rows ld_dy apart (0: n).
void Bf16MatmulNNAdd(const uint16_t* dy, const uint16_t* w, float* dx, int64_t m, int64_t n, int64_t k, int64_t ld_dy = 0);
// The general product on the calling thread (no pool; for kernels that split work themselves):
// C[m, n] = alpha op(A) op(B), or C += that when `add`; A is m x k (k x m stored when ta) with
// leading dimension lda, B k x n (n x k when tb) with ldb, C row-major with ldc. Primitives are
// cached per thread and shape (at most a few hundred; the cache is cleared beyond that).
void Bf16GemmOnThread(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                      int64_t ldb, bool add, float* c, int64_t ldc);
// Frees the calling thread's cached primitives and scratchpad (kernels::ReleaseThreadCaches).
void ReleaseBf16GemmThreadState();
// Primitives cached on the calling thread (tests).
size_t Bf16GemmCachedPrimitives();
// The same product by plain loops (fp32 sums): Bf16GemmOnThread's fallback for a shape oneDNN
// refuses, and the tests' reference.
void Bf16GemmLoops(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                   int64_t ldb, bool add, float* c, int64_t ldc);

}  // namespace fedtune::kernels

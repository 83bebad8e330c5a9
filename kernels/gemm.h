// Dense f32 GEMM, the core the quantized matmul and attention feed: C = A * op(B) (+ beta C),
// row-major. Backed by OpenBLAS (Debian's build dispatches to AVX2/AVX-512 kernels at run
// time) and always called single-threaded: fedtune parallelises over tiles itself.
#pragma once

#include <cstdint>

namespace fedtune::kernels {

// A: m x k (lda), B: k x n (ldb) or, with trans_b, n x k; C: m x n (ldc).
void Sgemm(bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Dot products of one f32 vector with quantized rows, fused with dequantization for the common
// formats (AVX2+FMA when the CPU has them): y[r] = dot(row r of w, x).
struct QMatrix;
void GemvQ(const QMatrix& w, int64_t r0, int64_t r1, const float* x, float* y);

// Rows of a weight to dequantize per tile before a GEMM: large enough that the GEMM amortises
// packing its other operand (~1 MiB of f32), small enough to stay in L2 and to give every
// thread at least one tile of an n-row weight.
int64_t WeightTileRows(int64_t n, int64_t k, int threads);

// Which CPU paths were selected at run time, e.g. "avx2+fma" or "generic".
const char* CpuPathName();

}  // namespace fedtune::kernels

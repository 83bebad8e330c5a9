// Fused dequantize-and-dot kernels for one quantized row against an f32 vector, selected at
// run time by CPU features (the translation unit vec_dot_avx2.cc is compiled with -mavx2
// -mfma and only called when the CPU reports both). No Eigen or other templates are shared
// with that unit, so the ISA flags cannot leak into generic code.
#pragma once

#include <cstdint>

#include "kernels/quant.h"

namespace fedtune::kernels {

using VecDotFn = float (*)(const uint8_t* row, const float* x, int64_t n);

bool HaveAvx2Fma();
// nullptr when there is no fused kernel for t on this CPU (callers dequantize instead).
VecDotFn GetVecDot(GgmlType t);
// Dequantizes a row using SIMD where available (same results as DequantizeRow up to FMA
// contraction, which the dequantizers avoid: bit-identical).
void DequantizeRowFast(GgmlType t, const void* src, float* dst, int64_t n);

// Decoding with activations in 8 bits (llama.cpp's Q8_1 idea, with f32 scales): a row of
// activations is cut into blocks of 32, x_i ~ d q_i with d = max|x| / 127, q_i = round(x_i / d)
// (nearest, ties to even), s = d * sum q_i. A weight row in Q4_0 / Q4_1 / Q8_0 is then dotted in
// integers per block (8-bit products, exact 32-bit sums) and scaled once per block: ~3x fewer
// instructions than dequantizing to f32, at an error of at most sum |w_i| d / 2 (the
// activations' rounding). A block whose largest value is below FLT_MIN is zero (d = 0); one with
// an Inf or NaN gets d = s = NaN (its products are NaN, as in f32). Used by MatMulQ when a
// caller asks for it (generation, kernels/ops.h), never in training.
struct Q8Block {
  float d = 0.0f;
  float s = 0.0f;
  int8_t q[32] = {};
};
// n a multiple of 32. Bit-identical on every path (one multiply and one rounding per value).
void QuantizeRowQ8(const float* x, Q8Block* y, int64_t n);
// y[i * y_stride] = row . (activation row i) for i < rows, the activation rows n / 32 blocks
// apart from x. A row's result is the same whatever `rows`.
using VecDotQ8Fn = void (*)(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t y_stride);
// The AVX2 integer dot for a weight type; nullptr for other types (K-quants, Q5, F16, F32) and on
// CPUs without AVX2 (there the portable loops below, one activation row at a time, would be
// slower than dequantizing for SGEMM: they serve as the tests' reference; NEON is not done).
VecDotQ8Fn GetVecDotQ8(GgmlType t);

namespace portable {  // the reference: exact integer sums per block, scaled in block order (any CPU)
void QuantizeRowQ8(const float* x, Q8Block* y, int64_t n);
void DotQ4_0Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t y_stride);
void DotQ4_1Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t y_stride);
void DotQ8_0Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t y_stride);
}  // namespace portable

namespace avx2 {
void QuantizeRowQ8(const float* x, Q8Block* y, int64_t n);
void DotQ4_0Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t y_stride);
void DotQ4_1Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t y_stride);
void DotQ8_0Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t y_stride);
float DotQ4_0(const uint8_t* row, const float* x, int64_t n);
float DotQ4_1(const uint8_t* row, const float* x, int64_t n);
float DotQ8_0(const uint8_t* row, const float* x, int64_t n);
float DotF32(const uint8_t* row, const float* x, int64_t n);
float DotF16(const uint8_t* row, const float* x, int64_t n);
void DequantQ4_1(const uint8_t* row, float* y, int64_t n);
void DequantQ8_0(const uint8_t* row, float* y, int64_t n);
void DequantQ4_0(const uint8_t* row, float* y, int64_t n);
}  // namespace avx2

}  // namespace fedtune::kernels

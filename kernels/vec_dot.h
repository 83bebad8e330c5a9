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

namespace avx2 {
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

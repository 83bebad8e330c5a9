// Building blocks of the cpu-fast backend: AVX2+FMA element-wise kernels (kernels/fast_avx2.cc,
// the only unit compiled with those flags; called after HaveAvx2Fma()) and their portable
// fallbacks. Each processes a contiguous range; the backend splits work over threads.
#pragma once

#include <cstdint>

namespace fedtune::kernels {

namespace avx2 {
// e^x in these kernels: relative error < 2e-7; 0 below -87.3, inf above 88.7, NaN kept.
float MaxOf(const float* x, int64_t n);
// sum_i e^(x[i] - shift), accumulated in double over float partial sums.
double SumExpShifted(const float* x, int64_t n, float shift);
// x[i] = e^(x[i] - shift) * scale
void ScaledExpShifted(float* x, int64_t n, float shift, float scale);
// x[i] = e^(x[i] - shift); returns their sum as SumExpShifted would (same partial sums), so
// that ExpShiftedInPlace then a multiply by 1/sum equals SumExpShifted then ScaledExpShifted
// bit for bit with one exponential per value instead of two.
double ExpShiftedInPlace(float* x, int64_t n, float shift);
// x[i] *= scale
void ScaleInPlace(float* x, int64_t n, float scale);
// f32 -> bf16 bit patterns, rounded to nearest even, NaN kept a quiet NaN: bit-identical with
// common/fp16.h's Fp32ToBf16 (subnormals included).
void ToBf16(const float* x, uint16_t* out, int64_t n);
// Soft-capping (Gemma 2): x[i] = cap tanh(x[i] / cap) and, with dcap not null, dcap[i] = the
// derivative 1 / cosh^2(x[i] / cap), both from one e^(-2|u|) per value (no cancellation where
// the cap saturates; absolute error of the capped value ~ cap x 2e-7).
void SoftCap(float* x, float* dcap, int64_t n, float cap);
void SwiGluForward(const float* gate, const float* up, float* out, int64_t n);
void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n);
void RmsNormRows(const float* x, const float* g, float* y, float* rstd, int64_t r0, int64_t r1, int64_t n, float eps);
void RmsNormBackwardRows(const float* x, const float* g, const float* rstd, const float* dy, float* dx, int64_t r0,
                         int64_t r1, int64_t n);
}  // namespace avx2

}  // namespace fedtune::kernels

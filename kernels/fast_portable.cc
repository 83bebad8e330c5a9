// The avx2:: entry points of kernels/fast_ops.h on CPUs other than x86-64 (ARM64 workers).
// HaveAvx2Fma() is false there, so the backends take their generic branches and never call
// these; they exist so that the call sites need no #if, and they compute the same results as
// the generic kernels (plain loops the compiler vectorizes for the target, e.g. NEON).
#if defined(__x86_64__)
#error "fast_portable.cc is for non-x86 builds; x86-64 builds compile fast_avx2.cc"
#endif

#include <algorithm>
#include <cmath>

#include "common/fp16.h"
#include "kernels/fast_ops.h"
#include "kernels/train_ops.h"

namespace fedtune::kernels::avx2 {

float MaxOf(const float* x, int64_t n) { return n > 0 ? *std::max_element(x, x + n) : -INFINITY; }

double SumExpShifted(const float* x, int64_t n, float shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(std::exp(x[i] - shift));
  return s;
}

void ScaledExpShifted(float* x, int64_t n, float shift, float scale) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - shift) * scale;
}

double ExpShiftedInPlace(float* x, int64_t n, float shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += static_cast<double>(x[i]);
  }
  return s;
}

void ScaleInPlace(float* x, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) x[i] *= scale;
}

void ToBf16(const float* x, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = Fp32ToBf16(x[i]);
}

void SoftCap(float* x, float* dcap, int64_t n, float cap) {
  for (int64_t i = 0; i < n; ++i) {
    const float u = x[i] / cap;
    x[i] = cap * std::tanh(u);
    if (dcap != nullptr) {
      const float ch = std::cosh(u);
      dcap[i] = 1.0f / (ch * ch);
    }
  }
}

void SwiGluForward(const float* gate, const float* up, float* out, int64_t n) {
  kernels::SwiGluForward<float>(gate, up, out, n);
}

void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) {
  kernels::SwiGluBackward<float>(gate, up, dout, dgate, dup, n);
}

void RmsNormRows(const float* x, const float* g, float* y, float* rstd, int64_t r0, int64_t r1, int64_t n, float eps) {
  kernels::RmsNormForward<float>(x + r0 * n, g, y + r0 * n, rstd + r0, r1 - r0, n, eps);
}

void RmsNormBackwardRows(const float* x, const float* g, const float* rstd, const float* dy, float* dx, int64_t r0,
                         int64_t r1, int64_t n) {
  kernels::RmsNormBackward<float>(x + r0 * n, g, rstd + r0, dy + r0 * n, dx + r0 * n, r1 - r0, n);
}

}  // namespace fedtune::kernels::avx2

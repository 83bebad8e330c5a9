#include "kernels/vec_dot.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/fp16.h"
#include "kernels/cpu_features.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace fedtune::kernels {

bool HaveAvx2Fma() {
#if defined(__x86_64__)
  static const bool have = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;  // not a clang-14 cpu_supports name
    // FEDTUNE_CPU_ISA=generic also caps the fp32 kernels (kernels/cpu_features.h).
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c && ProcessCpuIsa() >= CpuIsa::kAvx2;
  }();
  return have;
#else
  return false;
#endif
}

VecDotFn GetVecDot(GgmlType t) {
#if defined(__x86_64__)
  if (!HaveAvx2Fma()) return nullptr;
  switch (t) {
    case GgmlType::kQ4_0: return avx2::DotQ4_0;
    case GgmlType::kQ4_1: return avx2::DotQ4_1;
    case GgmlType::kQ8_0: return avx2::DotQ8_0;
    case GgmlType::kF32: return avx2::DotF32;
    case GgmlType::kF16: return avx2::DotF16;
    default: return nullptr;
  }
#else
  (void)t;
  return nullptr;
#endif
}

namespace portable {
namespace {
inline float Half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return Fp16ToFp32(h);
}
// sum over a block of w_i * q_i with w_i = nibble - offset (Q4) in exact integers.
inline int32_t NibbleDot(const uint8_t* qs, const int8_t* q, int offset) {
  int32_t s = 0;
  for (int j = 0; j < 16; ++j) {
    s += ((qs[j] & 0x0F) - offset) * q[j];
    s += ((qs[j] >> 4) - offset) * q[j + 16];
  }
  return s;
}
}  // namespace

void QuantizeRowQ8(const float* x, Q8Block* y, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, x += 32, ++y) {
    float amax = 0.0f, finite = 0.0f;  // finite: 0 unless a value is Inf or NaN (then NaN)
    for (int j = 0; j < 32; ++j) {
      amax = std::max(amax, std::fabs(x[j]));
      finite += x[j] * 0.0f;
    }
    *y = Q8Block{};
    if (finite != 0.0f) {
      y->d = y->s = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float d = amax / 127.0f;
    if (!(d >= std::numeric_limits<float>::min())) continue;  // (1 / d would overflow)
    const float id = 1.0f / d;
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) {
      const float r = std::clamp(std::nearbyint(x[j] * id), -127.0f, 127.0f);
      y->q[j] = static_cast<int8_t>(r);
      sum += y->q[j];
    }
    y->d = d;
    y->s = d * static_cast<float>(sum);
  }
}

namespace {
float DotQ4_0Q8One(const uint8_t* row, const Q8Block* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t b = 0; b < n / 32; ++b, row += 18, ++x)
    acc += Half(row) * x->d * static_cast<float>(NibbleDot(row + 2, x->q, 8));
  return acc;
}

float DotQ4_1Q8One(const uint8_t* row, const Q8Block* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t b = 0; b < n / 32; ++b, row += 20, ++x)
    acc += Half(row) * x->d * static_cast<float>(NibbleDot(row + 4, x->q, 0)) + Half(row + 2) * x->s;
  return acc;
}

float DotQ8_0Q8One(const uint8_t* row, const Q8Block* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t b = 0; b < n / 32; ++b, row += 34, ++x) {
    const auto* w = reinterpret_cast<const int8_t*>(row + 2);
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += w[j] * x->q[j];
    acc += Half(row) * x->d * static_cast<float>(s);
  }
  return acc;
}

template <float (*One)(const uint8_t*, const Q8Block*, int64_t)>
void Rows(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t ys) {
  for (int64_t i = 0; i < rows; ++i) y[i * ys] = One(row, x + i * (n / 32), n);
}
}  // namespace

void DotQ4_0Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t ys) { Rows<DotQ4_0Q8One>(row, x, n, rows, y, ys); }
void DotQ4_1Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t ys) { Rows<DotQ4_1Q8One>(row, x, n, rows, y, ys); }
void DotQ8_0Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t ys) { Rows<DotQ8_0Q8One>(row, x, n, rows, y, ys); }
}  // namespace portable

void QuantizeRowQ8(const float* x, Q8Block* y, int64_t n) {
#if defined(__x86_64__)
  if (HaveAvx2Fma()) return avx2::QuantizeRowQ8(x, y, n);
#endif
  portable::QuantizeRowQ8(x, y, n);
}

VecDotQ8Fn GetVecDotQ8(GgmlType t) {
#if defined(__x86_64__)
  if (HaveAvx2Fma()) {
    switch (t) {
      case GgmlType::kQ4_0: return avx2::DotQ4_0Q8;
      case GgmlType::kQ4_1: return avx2::DotQ4_1Q8;
      case GgmlType::kQ8_0: return avx2::DotQ8_0Q8;
      default: return nullptr;
    }
  }
#endif
  (void)t;
  return nullptr;
}

void DequantizeRowFast(GgmlType t, const void* src, float* dst, int64_t n) {
#if defined(__x86_64__)
  if (HaveAvx2Fma()) {
    const auto* s = static_cast<const uint8_t*>(src);
    switch (t) {
      case GgmlType::kQ4_1: avx2::DequantQ4_1(s, dst, n); return;
      case GgmlType::kQ8_0: avx2::DequantQ8_0(s, dst, n); return;
      case GgmlType::kQ4_0: avx2::DequantQ4_0(s, dst, n); return;
      default: break;
    }
  }
#endif
  DequantizeRow(t, src, dst, n);
}

}  // namespace fedtune::kernels

#include "kernels/vec_dot.h"

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

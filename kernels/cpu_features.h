// What the CPU and the operating system let the CPU kernels use, and which path that makes
// (issue 18). Detection (cpuid, xgetbv, the Linux AMX tile permission) is separate from the
// choice, which is a pure function of the features and an optional cap, so a test can drive the
// choice with any CPU it makes up.
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"

namespace fedtune::kernels {

struct CpuFeatures {
  bool avx2_fma = false;     // AVX2 + FMA + F16C (today's fp32 path)
  bool avx512 = false;       // AVX-512 F/BW/VL/DQ with the OS saving the ZMM and mask state
  bool avx512_bf16 = false;  // + AVX512_BF16 (vdpbf16ps): Intel Cooper Lake+, AMD Zen 4+
  bool amx_bf16 = false;     // AMX-TILE + AMX-BF16 with the OS permission for tile data granted
};

// Detected once per process (the AMX permission request is made then).
const CpuFeatures& DetectedCpuFeatures();
std::string DescribeCpuFeatures(const CpuFeatures& f);  // "avx2+fma avx512 avx512_bf16"

// Paths for the frozen-weight products, best last.
enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512Bf16 = 2, kAmxBf16 = 3 };
const char* CpuIsaName(CpuIsa isa);  // "generic", "avx2", "avx512-bf16", "amx-bf16"

// The best path `f` allows, capped at `cap` ("" = no cap; else a CpuIsaName). A cap names a
// path, not a wish: one above what the CPU has is simply not reached. Unknown names: error.
absl::StatusOr<CpuIsa> ChooseCpuIsa(const CpuFeatures& f, std::string_view cap);

// The path of this process: DetectedCpuFeatures() capped by FEDTUNE_CPU_ISA (an invalid value is
// reported once and ignored).
CpuIsa ProcessCpuIsa();

}  // namespace fedtune::kernels

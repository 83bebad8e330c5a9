#include "kernels/cpu_features.h"

#include <cstdint>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "common/log.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fedtune::kernels {
namespace {

#if defined(__x86_64__)
uint64_t Xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

CpuFeatures Detect() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c & bit_OSXSAVE) != 0, fma = (c & bit_FMA) != 0, f16c = (c & bit_F16C) != 0;
  if (!osxsave) return f;
  const uint64_t xcr0 = Xcr0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6, zmm_state = (xcr0 & 0xe6) == 0xe6;  // SSE+AVX; + opmask, ZMM hi
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b & (1u << 5)) != 0;
  const bool avx512f = (b & (1u << 16)) != 0, avx512dq = (b & (1u << 17)) != 0, avx512bw = (b & (1u << 30)) != 0,
             avx512vl = (b & (1u << 31)) != 0;
  const bool amx_bf16 = (d & (1u << 22)) != 0, amx_tile = (d & (1u << 24)) != 0;
  const unsigned max_subleaf = a;
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  if (max_subleaf >= 1) __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool avx512_bf16 = (a1 & (1u << 5)) != 0;
  f.avx2_fma = ymm_state && avx2 && fma && f16c;
  f.avx512 = f.avx2_fma && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
  f.avx512_bf16 = f.avx512 && avx512_bf16;
  // AMX: the CPU has it, the OS saves the tile state (XCR0 bits 17, 18), and Linux grants this
  // process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, feature 18; Linux >= 5.16).
  if (f.avx512 && amx_tile && amx_bf16 && (xcr0 & (3ull << 17)) == (3ull << 17)) {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    f.amx_bf16 = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }
  return f;
}
#else
CpuFeatures Detect() { return {}; }
#endif

}  // namespace

const CpuFeatures& DetectedCpuFeatures() {
  static const CpuFeatures f = Detect();
  return f;
}

std::string DescribeCpuFeatures(const CpuFeatures& f) {
  std::string s = f.avx2_fma ? "avx2+fma" : "no-avx2";
  if (f.avx512) absl::StrAppend(&s, " avx512");
  if (f.avx512_bf16) absl::StrAppend(&s, " avx512_bf16");
  if (f.amx_bf16) absl::StrAppend(&s, " amx_bf16");
  return s;
}

const char* CpuIsaName(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kGeneric: return "generic";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512Bf16: return "avx512-bf16";
    case CpuIsa::kAmxBf16: return "amx-bf16";
  }
  return "?";
}

absl::StatusOr<CpuIsa> ChooseCpuIsa(const CpuFeatures& f, std::string_view cap) {
  auto has = [&f](CpuIsa c) {
    switch (c) {
      case CpuIsa::kGeneric: return true;
      case CpuIsa::kAvx2: return f.avx2_fma;
      case CpuIsa::kAvx512Bf16: return f.avx512_bf16;
      case CpuIsa::kAmxBf16: return f.amx_bf16 && f.avx512_bf16;  // the AMX path runs AVX-512-BF16 code too
    }
    return false;
  };
  int top = static_cast<int>(CpuIsa::kAmxBf16);
  if (!cap.empty()) {
    top = -1;
    for (CpuIsa c : {CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512Bf16, CpuIsa::kAmxBf16})
      if (cap == CpuIsaName(c)) top = static_cast<int>(c);
  }
  if (top >= 0) {  // the best path at or under the cap whose features are present
    for (int c = top; c > 0; --c)
      if (has(static_cast<CpuIsa>(c))) return static_cast<CpuIsa>(c);
    return CpuIsa::kGeneric;
  }
  return absl::InvalidArgumentError(absl::StrCat("FEDTUNE_CPU_ISA: unknown path '", std::string(cap), "' (generic, avx2, avx512-bf16, amx-bf16)"));
}

CpuIsa ProcessCpuIsa() {
  static const CpuIsa isa = [] {
    const char* env = std::getenv("FEDTUNE_CPU_ISA");
    absl::StatusOr<CpuIsa> c = ChooseCpuIsa(DetectedCpuFeatures(), env ? env : "");
    if (c.ok()) return *c;
    // A cap is a safety setting: a misspelt one falls back to today's fp32 path, not to the top.
    FT_LOG_WARN("{}; using avx2 (the fp32 path) at most", std::string(c.status().message()));
    return *ChooseCpuIsa(DetectedCpuFeatures(), "avx2");
  }();
  return isa;
}

}  // namespace fedtune::kernels

// The CUDA kernel backend ("cuda", kernels/cuda/cuda_backend.cu). A plain C++ header: it names
// no CUDA type, so kernels/backend.cc includes it without the toolkit's headers.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "kernels/backend.h"

namespace fedtune::kernels {

// A backend on CUDA device 0, or nullptr with the reason in *why_not (when not null) if no
// device is usable: no driver, no device, no kernel image for the device's architecture, or
// cuBLAS failing to start. Never aborts for want of a GPU. The backend is thread-safe (a mutex
// serialises its ops).
//
// The precision of the products with the frozen weights (nearly all of a step's FLOPs; see
// cuda_backend.cu): bf16 tensor cores, TF32, or full f32; auto is bf16 on sm_80 and newer,
// f32 before. MakeCudaBackend(why_not) takes it from $FEDTUNE_CUDA_GEMM (auto|bf16|tf32|fp32;
// unset: auto; any other value: no backend, and why_not says so).
enum class CudaGemm { kAuto, kBf16, kTf32, kFp32 };

// Whether the CUDA backend dequantizes `t` on the device (then a frozen weight is cached there as
// stored; other types are dequantized on the host once and cached in f32). The planner's device
// memory model reads this; the backend checks it against its kernels.
inline bool CudaDequantizes(GgmlType t) {
  switch (t) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16:
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1:
    case GgmlType::kNF4:
    case GgmlType::kNF4DQ:
    case GgmlType::kNF3:
    case GgmlType::kNF2:
    case GgmlType::kQ3_K:
    case GgmlType::kQ2_K: return true;
    default: return false;
  }
}
const char* CudaGemmName(CudaGemm g);
std::optional<CudaGemm> ParseCudaGemm(std::string_view s);
std::unique_ptr<Backend> MakeCudaBackend(std::string* why_not, CudaGemm gemm);
std::unique_ptr<Backend> MakeCudaBackend(std::string* why_not);

}  // namespace fedtune::kernels

// The module's entry point (libfedtune_cuda.so, loaded by kernels/backend.cc with dlopen):
// MakeCudaBackend(why_not).release(). The caller owns the result.
extern "C" fedtune::kernels::Backend* fedtune_make_cuda_backend(std::string* why_not);

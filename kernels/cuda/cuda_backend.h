// The CUDA kernel backend ("cuda", kernels/cuda/cuda_backend.cu). A plain C++ header: it names
// no CUDA type, so kernels/backend.cc includes it without the toolkit's headers.
#pragma once

#include <memory>
#include <string>

#include "kernels/backend.h"

namespace fedtune::kernels {

// A backend on CUDA device 0, or nullptr with the reason in *why_not (when not null) if no
// device is usable: no driver, no device, no kernel image for the device's architecture, or
// cuBLAS failing to start. Never aborts for want of a GPU. The backend is thread-safe (a mutex
// serialises its ops).
std::unique_ptr<Backend> MakeCudaBackend(std::string* why_not);

}  // namespace fedtune::kernels

// The module's entry point (libfedtune_cuda.so, loaded by kernels/backend.cc with dlopen):
// MakeCudaBackend(why_not).release(). The caller owns the result.
extern "C" fedtune::kernels::Backend* fedtune_make_cuda_backend(std::string* why_not);

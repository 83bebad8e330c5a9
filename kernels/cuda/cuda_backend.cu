// CUDA implementation of the kernel backend (kernels/backend.h): op for op the semantics of the
// CPU reference (kernels/train_ops.cc, model/adapter.cc, model/optimizer.cc), up to float
// rounding and the GEMM precision below.
//
// Memory. Activations live in buffers from AllocBuffer (managed memory, registered in
// buffers_); the trainer keeps all of its activations there, so they stay on the GPU across ops.
// An op uses a buffer argument in place. Any other pointer is host memory: inputs are copied into
// grow-only device scratch buffers owned by the backend and reused across calls, results copied
// back, and accumulating outputs (dx += ...) uploaded first and added to on the device. Kernels
// and cuBLAS run on one stream. An op waits for the stream before it returns only when it writes
// host memory; one whose outputs are all buffers returns with its work queued, so a trainer
// whose activations are buffers waits once per loss (and for parameter gradients), not per op.
// Read a buffer on the host through Copy, which waits. Host inputs go through cudaMemcpyAsync
// from pageable memory, which stages them before returning on PCIe systems (the driver cannot
// know the memory stays valid), so callers may free or reuse them at once; on systems where the
// GPU reads pageable memory directly (HMM/ATS, Grace Hopper) this is not established, and a
// pinned staging buffer per op would be the safe change. A mutex serialises the ops, which share
// the scratch buffers.
//
// Frozen weights (QMatrix) are uploaded once, in their block format, and cached without bound
// (a quantized base model fits a GPU that trains it), keyed by (data pointer, type, rows, cols)
// and checked against a fingerprint of sampled bytes, so that a freed weight whose address is
// reused by another of the same shape is uploaded again. The cache is emptied when a device
// allocation runs out of memory. Each use dequantizes on the device into an f32 scratch buffer
// (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, NF4, NF4_DQ, NF3, NF2, Q3_K, Q2_K); the other
// formats fedtune reads (Q4_K, Q5_K, Q6_K) are dequantized once on the host with DequantizeRow
// and cached as F32.
//
// GEMM precision. Activations, adapters and results are f32 in memory. The products with the
// frozen weights (QLinear forward/backward, the cross-entropy logits and their gradient: nearly
// all of a step's FLOPs) run in the backend's weight precision (CudaGemm):
//   bf16 (default on sm_80 and newer): the weight is dequantized straight into bf16 and the
//     activation (or output gradient) converted to bf16 for the product; tensor cores multiply
//     with f32 accumulation into the f32 result (cublasGemmEx: A/B CUDA_R_16BF, C CUDA_R_32F,
//     CUBLAS_COMPUTE_32F), what PyTorch's bf16 autocast does for a Linear. An 8-bit significand: <= 4e-3
//     relative error per input, below the quantization error of a 4-bit weight;
//   tf32: f32 operands, CUBLAS_COMPUTE_32F_FAST_TF32 (10 mantissa bits);
//   fp32 (default before sm_80, which has neither bf16 nor TF32 tensor cores): CUBLAS_COMPUTE_32F.
// Attention and the adapter products (LoRA, DiaBlo), small and the source of the trained
// gradients, always use full f32.
//
// Row-major data, column-major cuBLAS. A row-major r x c matrix with row stride ld is, read by
// cuBLAS, the column-major c x r matrix (its transpose) with leading dimension ld. A row-major
// C = op(A) op(B) is therefore computed as the column-major C^T = op(B)^T op(A)^T: cuBLAS gets
// B before A, the dimensions (n, m, k) and the same transpose flags (see GemmBatched).
#include "kernels/cuda/cuda_backend.h"

#ifdef FEDTUNE_CUDA_EMULATION  // tests only: plain C++ against a host emulation (see there)
#include "kernels/cuda/host_emulation.h"
#else
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/rng.h"
#include "common/status.h"
#include "kernels/quant.h"

namespace fedtune::kernels {
namespace {

[[noreturn]] void CudaFail(const char* expr, const char* why, const char* file, int line) {
  std::fprintf(stderr, "%s:%d: CUDA backend: %s failed: %s\n", file, line, expr, why);
  std::abort();
}

#define FT_CUDA_CHECK(expr)                                                                \
  do {                                                                                     \
    const cudaError_t ft_cuda_err_ = (expr);                                               \
    if (ft_cuda_err_ != cudaSuccess) CudaFail(#expr, cudaGetErrorString(ft_cuda_err_), __FILE__, __LINE__); \
  } while (0)

#define FT_CUBLAS_CHECK(expr)                                                                      \
  do {                                                                                             \
    const cublasStatus_t ft_cublas_st_ = (expr);                                                   \
    if (ft_cublas_st_ != CUBLAS_STATUS_SUCCESS) CudaFail(#expr, cublasGetStatusString(ft_cublas_st_), __FILE__, __LINE__); \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Device helpers

// Per block, for every kernel (a multiple of 32; the kernels work for any). The host emulation
// runs each GPU thread as a fiber, so it uses two warps.
#ifdef FEDTUNE_CUDA_EMULATION
constexpr int kThreads = 64;
#else
constexpr int kThreads = 256;
#endif
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest

__device__ __forceinline__ int64_t GlobalThread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t GridThreads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a < b ? b : a; }
};

template <typename T, typename Op>
__device__ T WarpAllReduce(T v, Op op) {
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// op over the v of all threads of the block, returned to every thread. Call from all threads.
template <typename T, typename Op>
__device__ T BlockAllReduce(T v, T identity, Op op) {
  __shared__ T partial[32];
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = WarpAllReduce(v, op);
  __syncthreads();  // the threads of a previous call are done reading `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? partial[lane] : identity;
  return WarpAllReduce(v, op);
}

// ---------------------------------------------------------------------------------------------
// Dequantization: one thread per value, the formulas of kernels/quant.cc. Loads go byte by
// byte (block headers are not aligned). Where quant.cc computes d * q + m without a fused
// multiply-add (bit-exact with gguf-py), __fmul_rn/__fadd_rn keep nvcc from contracting.

__constant__ float kNf4Table[16];  // kNf4Codes, copied at start-up
__constant__ float kNf3Table[8];   // kNf3Codes
__constant__ float kNf2Table[4];   // kNf2Codes

__device__ __forceinline__ uint32_t LoadU32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
         static_cast<uint32_t>(p[3]) << 24;
}
__device__ __forceinline__ float LoadF32(const uint8_t* p) { return __uint_as_float(LoadU32(p)); }
__device__ __forceinline__ uint16_t LoadU16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | p[1] << 8);
}
__device__ __forceinline__ float LoadF16(const uint8_t* p) { return __half2float(__ushort_as_half(LoadU16(p))); }

// Value c of a row of `cols` values stored at `row` in format kType.
template <GgmlType kType>
__device__ float DequantValue(const uint8_t* row, int64_t c, int64_t cols) {
  if constexpr (kType == GgmlType::kF32) {
    return LoadF32(row + 4 * c);
  } else if constexpr (kType == GgmlType::kF16) {
    return LoadF16(row + 2 * c);
  } else if constexpr (kType == GgmlType::kBF16) {
    return __uint_as_float(static_cast<uint32_t>(LoadU16(row + 2 * c)) << 16);
  } else if constexpr (kType == GgmlType::kQ8_0) {  // [f16 d][32 x int8]
    const uint8_t* b = row + (c / 32) * 34;
    return static_cast<float>(static_cast<int8_t>(b[2 + c % 32])) * LoadF16(b);
  } else if constexpr (kType == GgmlType::kQ4_0 || kType == GgmlType::kQ4_1) {
    // [f16 d]([f16 m])[16 bytes: value j in the low nibble of byte j, value j+16 in the high one]
    constexpr bool kHasMin = kType == GgmlType::kQ4_1;
    const uint8_t* b = row + (c / 32) * (kHasMin ? 20 : 18);
    const uint8_t* qs = b + (kHasMin ? 4 : 2);
    const int j = static_cast<int>(c % 32);
    const int q = j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
    if constexpr (kHasMin) return __fadd_rn(__fmul_rn(LoadF16(b), static_cast<float>(q)), LoadF16(b + 2));
    return LoadF16(b) * static_cast<float>(q - 8);
  } else if constexpr (kType == GgmlType::kQ5_0 || kType == GgmlType::kQ5_1) {
    // [f16 d]([f16 m])[u32 high bits][16 bytes of low nibbles as in Q4]
    constexpr bool kHasMin = kType == GgmlType::kQ5_1;
    const uint8_t* b = row + (c / 32) * (kHasMin ? 24 : 22);
    const uint8_t* p = b + (kHasMin ? 4 : 2);
    const uint32_t qh = LoadU32(p);
    const uint8_t* qs = p + 4;
    const int j = static_cast<int>(c % 32);
    const int x = j < 16 ? static_cast<int>((qs[j] & 15) | (((qh >> j) << 4) & 16))
                         : static_cast<int>((qs[j - 16] >> 4) | ((qh >> (j - 4)) & 16));  // (j-16)+12
    if constexpr (kHasMin) return __fadd_rn(__fmul_rn(LoadF16(b), static_cast<float>(x)), LoadF16(b + 2));
    return LoadF16(b) * static_cast<float>(x - 16);
  } else if constexpr (kType == GgmlType::kNF4) {
    // [f32 absmax][32 bytes: value 2i in the high nibble of byte i, value 2i+1 in the low one]
    const uint8_t* b = row + (c / 64) * 36;
    const int j = static_cast<int>(c % 64);
    const uint8_t q = b[4 + j / 2];
    return kNf4Table[j % 2 == 0 ? q >> 4 : q & 15] * LoadF32(b);
  } else if constexpr (kType == GgmlType::kNF3) {
    // [f32 absmax][8 little-endian 24-bit words of eight 3-bit codes]
    const uint8_t* b = row + (c / 64) * 28;
    const int j = static_cast<int>(c % 64), k = j / 8;
    const uint32_t word = static_cast<uint32_t>(b[4 + 3 * k]) | static_cast<uint32_t>(b[5 + 3 * k]) << 8 |
                          static_cast<uint32_t>(b[6 + 3 * k]) << 16;
    return kNf3Table[(word >> (3 * (j % 8))) & 7] * LoadF32(b);
  } else if constexpr (kType == GgmlType::kNF2) {
    // [f32 absmax][16 bytes of four 2-bit codes, the first in the low bits]
    const uint8_t* b = row + (c / 64) * 20;
    const int j = static_cast<int>(c % 64);
    return kNf2Table[(b[4 + j / 4] >> (2 * (j % 4))) & 3] * LoadF32(b);
  } else if constexpr (kType == GgmlType::kQ2_K || kType == GgmlType::kQ3_K) {
    // 256-value super-blocks of 16 groups of 16 (kernels/quant.cc DequantQ2_K / DequantQ3_K):
    // value 128 h + 32 s + 16 half + l has its 2 low bits at bits 2s of qs[32 h + 16 half + l]
    // and belongs to group 8 h + 2 s + half.
    const int i = static_cast<int>(c % 256), h = i / 128, s = (i % 128) / 32, half = (i % 32) / 16, l = i % 16;
    const int g = 8 * h + 2 * s + half;
    if constexpr (kType == GgmlType::kQ2_K) {  // [16 scale/min bytes][64 bytes of codes][f16 d][f16 dmin]
      const uint8_t* b = row + (c / 256) * 84;
      const int q = (b[16 + 32 * h + 16 * half + l] >> (2 * s)) & 3;
      const float dl = __fmul_rn(LoadF16(b + 80), static_cast<float>(b[g] & 0xF));
      const float ml = __fmul_rn(LoadF16(b + 82), static_cast<float>(b[g] >> 4));
      return __fsub_rn(__fmul_rn(dl, static_cast<float>(q)), ml);
    } else {  // [32 bytes hmask][64 bytes of codes][12 bytes of 6-bit scales][f16 d]
      const uint8_t* b = row + (c / 256) * 110;
      const uint8_t* sc = b + 96;
      const int lo = g < 8 ? (sc[g] & 0xF) : (sc[g - 8] >> 4);
      const int hi = (sc[8 + (g % 4)] >> (2 * (g / 4))) & 3;
      const int bit = 4 * h + s;
      const int q = ((b[32 + 32 * h + 16 * half + l] >> (2 * s)) & 3) - (((b[16 * half + l] >> bit) & 1) ? 0 : 4);
      const float dl = __fmul_rn(LoadF16(b + 108), static_cast<float>((lo | (hi << 4)) - 32));
      return __fmul_rn(dl, static_cast<float>(q));
    }
  } else {
    static_assert(kType == GgmlType::kNF4DQ);
    // Row: [f32 scale][f32 mean][int8 absmax code per block][the blocks' nibbles as in NF4]
    const int64_t nb = cols / 64, blk = c / 64;
    const float absmax = __fadd_rn(LoadF32(row + 4), __fmul_rn(static_cast<float>(static_cast<int8_t>(row[8 + blk])), LoadF32(row)));
    const int j = static_cast<int>(c % 64);
    const uint8_t q = row[8 + nb + blk * 32 + j / 2];
    return kNf4Table[j % 2 == 0 ? q >> 4 : q & 15] * absmax;
  }
}

using Bf16 = __nv_bfloat16;
__device__ __forceinline__ void StoreAs(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreAs(Bf16* p, float v) { *p = __float2bfloat16(v); }

// out[rows x cols] (row-major, f32 or bf16) from rows of row_bytes bytes: output row r is
// stored row ids[r] (ids null: row r).
template <GgmlType kType, typename Out>
__global__ void DequantKernel(const uint8_t* data, size_t row_bytes, const int32_t* ids, int64_t rows, int64_t cols, Out* out) {
  for (int64_t idx = GlobalThread(); idx < rows * cols; idx += GridThreads()) {
    const int64_t r = idx / cols, c = idx % cols;
    const int64_t src = ids != nullptr ? ids[r] : r;
    StoreAs(out + idx, DequantValue<kType>(data + static_cast<size_t>(src) * row_bytes, c, cols));
  }
}

template <typename Out>
using DequantKernelFn = void (*)(const uint8_t*, size_t, const int32_t*, int64_t, int64_t, Out*);

// The device dequantizer of a format into Out, or nullptr when it has none.
template <typename Out>
DequantKernelFn<Out> DequantKernelFor(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return DequantKernel<GgmlType::kF32, Out>;
    case GgmlType::kF16: return DequantKernel<GgmlType::kF16, Out>;
    case GgmlType::kBF16: return DequantKernel<GgmlType::kBF16, Out>;
    case GgmlType::kQ8_0: return DequantKernel<GgmlType::kQ8_0, Out>;
    case GgmlType::kQ4_0: return DequantKernel<GgmlType::kQ4_0, Out>;
    case GgmlType::kQ4_1: return DequantKernel<GgmlType::kQ4_1, Out>;
    case GgmlType::kQ5_0: return DequantKernel<GgmlType::kQ5_0, Out>;
    case GgmlType::kQ5_1: return DequantKernel<GgmlType::kQ5_1, Out>;
    case GgmlType::kNF4: return DequantKernel<GgmlType::kNF4, Out>;
    case GgmlType::kNF4DQ: return DequantKernel<GgmlType::kNF4DQ, Out>;
    case GgmlType::kNF3: return DequantKernel<GgmlType::kNF3, Out>;
    case GgmlType::kNF2: return DequantKernel<GgmlType::kNF2, Out>;
    case GgmlType::kQ3_K: return DequantKernel<GgmlType::kQ3_K, Out>;
    case GgmlType::kQ2_K: return DequantKernel<GgmlType::kQ2_K, Out>;
    default: return nullptr;
  }
}

// y = bf16(x), element-wise (the activation side of a bf16 product).
__global__ void ToBf16Kernel(const float* x, Bf16* y, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) y[i] = __float2bfloat16(x[i]);
}

// ---------------------------------------------------------------------------------------------
// Row kernels: one block per row, sums in double like the CPU reference.

__global__ void RmsNormForwardKernel(const float* x, const float* g, float* y, float* rstd, int64_t n, float eps) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * n;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += static_cast<double>(xr[i]) * static_cast<double>(xr[i]);
  ss = BlockAllReduce(ss, 0.0, SumOp{});
  const float s = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(n) + static_cast<double>(eps)));
  if (threadIdx.x == 0) rstd[row] = s;
  float* yr = y + row * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * s * g[i];
}

__global__ void RmsNormBackwardKernel(const float* x, const float* g, const float* rstd, const float* dy, float* dx,
                                      int64_t n) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * n;
  const float* dyr = dy + row * n;
  const float s = rstd[row];
  double dot = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    dot += static_cast<double>(dyr[i]) * static_cast<double>(g[i]) * static_cast<double>(xr[i]);
  dot = BlockAllReduce(dot, 0.0, SumOp{});
  const double sd = static_cast<double>(s);
  const float c = static_cast<float>(dot * sd * sd * sd / static_cast<double>(n));
  float* dxr = dx + row * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dxr[i] += s * dyr[i] * g[i] - xr[i] * c;
}

// Row `blockIdx.x` of the stacked len x len score matrices of all sequences is query
// i = row % len of its sequence, token `row` overall. It sees keys j0..i: j0 = 0, or with
// packed rows (seg_pos not null) j0 = i - seg_pos[row], the start of its example; with a sliding
// window (window > 0) no earlier than i - window + 1.
__device__ __forceinline__ int64_t FirstKey(const int32_t* seg_pos, int64_t row, int64_t i, int64_t window) {
  const int64_t j0 = seg_pos != nullptr ? i - seg_pos[row] : 0;
  return window > 0 && i - window + 1 > j0 ? i - window + 1 : j0;
}

// 1 / cosh^2(x): the derivative of tanh, accurate where tanh saturates (unlike 1 - tanh^2).
__device__ __forceinline__ float SechSquared(float x) {
  const float c = coshf(x);
  return 1.0f / (c * c);
}

// Softmax over the visible keys of each row, zeros elsewhere. softcap > 0 (Gemma 2): the
// visible scores s become softcap * tanh(s / softcap) first, and `dcap` (may be null) receives
// the cap's derivative 1 / cosh^2(s / softcap).
__global__ void CausalSoftmaxKernel(float* s, int64_t len, const int32_t* seg_pos, float softcap, float* dcap, int64_t window) {
  const int64_t row = blockIdx.x, i = row % len, j0 = FirstKey(seg_pos, row, i, window);
  float* p = s + row * len;
  if (softcap > 0.0f) {
    for (int64_t j = j0 + threadIdx.x; j <= i; j += blockDim.x) {
      const float x = p[j] / softcap;
      p[j] = softcap * tanhf(x);
      if (dcap != nullptr) dcap[row * len + j] = SechSquared(x);
    }
    __syncthreads();
  }
  float mx = -INFINITY;
  for (int64_t j = j0 + threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, p[j]);
  mx = BlockAllReduce(mx, -INFINITY, MaxOp{});
  double sum = 0.0;
  for (int64_t j = j0 + threadIdx.x; j <= i; j += blockDim.x) {
    const float e = expf(p[j] - mx);
    p[j] = e;
    sum += static_cast<double>(e);
  }
  sum = BlockAllReduce(sum, 0.0, SumOp{});
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) p[j] = j >= j0 && j <= i ? p[j] * inv : 0.0f;
}

// dS = P o (dP - rowsum(dP o P)) over the visible keys, in place of dP; zeros elsewhere. With
// softcap > 0, times the cap's derivative dcap (CausalSoftmaxKernel).
__global__ void CausalSoftmaxBackwardKernel(const float* p, float* dp, int64_t len, const int32_t* seg_pos, float softcap,
                                            const float* dcap, int64_t window) {
  const int64_t row = blockIdx.x, i = row % len, j0 = FirstKey(seg_pos, row, i, window);
  const float* pr = p + row * len;
  float* dr = dp + row * len;
  double dot = 0.0;
  for (int64_t j = j0 + threadIdx.x; j <= i; j += blockDim.x)
    dot += static_cast<double>(pr[j]) * static_cast<double>(dr[j]);
  const float d = static_cast<float>(BlockAllReduce(dot, 0.0, SumOp{}));
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    float g = 0.0f;
    if (j >= j0 && j <= i) {
      g = pr[j] * (dr[j] - d);
      if (softcap > 0.0f) g *= dcap[row * len + j];
    }
    dr[j] = g;
  }
}

// One block per scored row of a chunk of logits: nll[row] = logsumexp - logit[target]; with
// `grad`, the row becomes grad_scale * (softmax - onehot(target)). softcap > 0 (Gemma 2): the
// logits are capped to softcap * tanh(z / softcap), computed from the raw row in each pass (the
// row is rewritten only by the last), and the gradient goes through the cap.
__global__ void CrossEntropyRowKernel(float* logits, const int32_t* target, double* nll, int64_t vocab, float grad_scale,
                                      bool grad, float softcap) {
  const int64_t row = blockIdx.x;
  float* z = logits + row * vocab;
  const int32_t t = target[row];
  auto capped = [&](int64_t j) { return softcap > 0.0f ? softcap * tanhf(z[j] / softcap) : z[j]; };
  const float zt = capped(t);  // read before any thread rewrites the row (the reductions are barriers)
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, capped(j));
  mx = BlockAllReduce(mx, -INFINITY, MaxOp{});
  double se = 0.0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) se += static_cast<double>(expf(capped(j) - mx));
  se = BlockAllReduce(se, 0.0, SumOp{});
  const double lse = log(se) + static_cast<double>(mx);
  if (threadIdx.x == 0) nll[row] = lse - static_cast<double>(zt);
  if (!grad) return;
  const float shift = static_cast<float>(lse);
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float v = expf(capped(j) - shift) * grad_scale;
    if (j == t) v -= grad_scale;
    if (softcap > 0.0f) v *= SechSquared(z[j] / softcap);
    z[j] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Element-wise kernels

// Thread per (row, pair i): rotates pair i of every head by sign * pos * base^(-2i/rot_dim).
__global__ void RopeKernel(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                           float base, const float* freq_factors, double sign) {
  const int64_t half = rot_dim / 2;
  for (int64_t idx = GlobalThread(); idx < rows * half; idx += GridThreads()) {
    const int64_t r = idx / half, i = idx % half;
    double theta = sign * static_cast<double>(pos[r]) *
                   pow(static_cast<double>(base), -2.0 * static_cast<double>(i) / static_cast<double>(rot_dim));
    if (freq_factors != nullptr) theta /= static_cast<double>(freq_factors[i]);
    double sn, cs;
    sincos(theta, &sn, &cs);
    const float c = static_cast<float>(cs), s = static_cast<float>(sn);
    float* p = x + r * heads * head_dim + 2 * i;
    for (int64_t h = 0; h < heads; ++h, p += head_dim) {
      const float a = p[0], b = p[1];
      p[0] = a * c - b * s;
      p[1] = a * s + b * c;
    }
  }
}

__global__ void SwiGluForwardKernel(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

__global__ void SwiGluBackwardKernel(const float* gate, const float* up, const float* dout, float* dgate, float* dup,
                                     int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) {
    const float g = gate[i];
    const float sig = 1.0f / (1.0f + expf(-g));
    const float silu = g * sig;
    dup[i] += dout[i] * silu;
    dgate[i] += dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
  }
}

__global__ void GegluForwardKernel(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) {
    const float g = gate[i];
    out[i] = 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * up[i];
  }
}

__global__ void GegluBackwardKernel(const float* gate, const float* up, const float* dout, float* dgate, float* dup,
                                    int64_t n) {
  const float k = 0.7978845608028654f;
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) {
    const float g = gate[i];
    const float t = tanhf(k * (g + 0.044715f * g * g * g));
    dup[i] += dout[i] * 0.5f * g * (1.0f + t);
    dgate[i] += dout[i] * up[i] * (0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * g * g));
  }
}

__global__ void ScaleKernel(float* x, float s, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) x[i] *= s;
}

// model/optimizer.cc's update; the gradient is zeroed on the host.
__global__ void AdamWKernel(float* p, const float* g, float* m, float* v, float* f, int64_t n, AdamWStep s) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) {
    const float gr = g[i];
    f[i] += (gr * gr - f[i]) * s.fisher_weight;
    const float gi = gr * s.clip;
    m[i] = s.beta1 * m[i] + (1.0f - s.beta1) * gi;
    v[i] = s.beta2 * v[i] + (1.0f - s.beta2) * gi * gi;
    const float mhat = m[i] / s.bc1, vhat = v[i] / s.bc2;
    p[i] -= s.lr * (mhat / (sqrtf(vhat) + s.eps) + s.weight_decay * p[i]);
  }
}

// kernels::DropoutScale: thread per element, the hash of common/rng.h.
__global__ void DropoutScaleKernel(uint64_t key, int64_t row0, int64_t rows, int64_t cols, uint64_t threshold, float keep,
                                   float* out) {
  for (int64_t idx = GlobalThread(); idx < rows * cols; idx += GridThreads()) {
    const int64_t i = idx / cols, j = idx % cols;
    const uint64_t row_key = DropoutRowKey(key, static_cast<uint64_t>(row0 + i));
    out[idx] = DropoutKeeps(row_key, static_cast<uint64_t>(j), threshold) ? keep : 0.0f;
  }
}

// Element-wise glue and row gathers (grid-stride).
__global__ void AddKernel(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) out[i] = a[i] + b[i];
}
__global__ void MulKernel(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) out[i] = a[i] * b[i];
}
__global__ void FillKernel(float* dst, float value, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) dst[i] = value;
}
__global__ void AddRowVectorKernel(float* y, const float* v, int64_t rows, int64_t n) {
  for (int64_t i = GlobalThread(); i < rows * n; i += GridThreads()) y[i] += v[i % n];
}
// dst row i = src row idx[i] (rows of `cols`), for i < n.
__global__ void GatherRowsKernel(const float* src, const int64_t* idx, float* dst, int64_t n, int64_t cols) {
  for (int64_t t = GlobalThread(); t < n * cols; t += GridThreads()) dst[t] = src[idx[t / cols] * cols + t % cols];
}
// dst row idx[i] = src row i.
__global__ void ScatterRowsKernel(const float* src, const int64_t* idx, float* dst, int64_t n, int64_t cols) {
  for (int64_t t = GlobalThread(); t < n * cols; t += GridThreads()) dst[idx[t / cols] * cols + t % cols] = src[t];
}

// ---------------------------------------------------------------------------------------------
// Host side

#ifdef FEDTUNE_CUDA_EMULATION
constexpr int64_t kCrossEntropyLogitsBytes = 800;  // a few rows per chunk: the tests' shapes chunk
#else
constexpr int64_t kCrossEntropyLogitsBytes = int64_t{256} << 20;  // logits chunk budget
#endif

int ToInt(int64_t v) {
  FT_CHECK(v >= 0 && v <= INT_MAX);
  return static_cast<int>(v);
}
size_t Count(int64_t n) {
  FT_CHECK(n >= 0);
  return static_cast<size_t>(n);
}
int64_t BlocksFor(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks); }

template <typename... Params, typename... Args>
void Launch(void (*kernel)(Params...), int64_t blocks, cudaStream_t stream, Args... args) {
  if (blocks == 0) return;
  FT_CHECK(blocks <= INT_MAX);
#ifdef FEDTUNE_CUDA_EMULATION
  (void)stream;
  EmuLaunch(blocks, kThreads, [=] { kernel(args...); });
#else
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args...);
#endif
  FT_CUDA_CHECK(cudaGetLastError());
}

// An owned device allocation. Errors from cudaFree are ignored: at process exit the runtime
// may already be gone.
// Bytes of device memory the backend holds, and the most it has held.
struct MemoryCounter {
  int64_t live = 0, peak = 0;
  void Add(size_t bytes) {
    live += static_cast<int64_t>(bytes);
    peak = std::max(peak, live);
  }
  void Remove(size_t bytes) { live -= static_cast<int64_t>(bytes); }
};

class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(void* ptr, size_t bytes, MemoryCounter* counter) : ptr_(ptr), bytes_(bytes), counter_(counter) {}
  DeviceMemory(DeviceMemory&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)), counter_(o.counter_) {}
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      counter_ = o.counter_;
    }
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() { Reset(); }

  void Reset() {
    if (ptr_ != nullptr) {
      (void)cudaFree(ptr_);
      if (counter_ != nullptr) counter_->Remove(bytes_);
    }
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  MemoryCounter* counter_ = nullptr;
};

// FNV-1a over 256 evenly spaced bytes of a weight and its last byte.
uint64_t Fingerprint(const QMatrix& w) {
  const size_t n = Count(w.rows) * w.row_bytes;
  uint64_t h = 14695981039346656037ull;
  if (n == 0) return h;
  auto mix = [&h](uint8_t b) { h = (h ^ b) * 1099511628211ull; };
  constexpr size_t kSamples = 256;
  for (size_t i = 0; i < kSamples; ++i) mix(w.data[i * n / kSamples]);
  mix(w.data[n - 1]);
  return h;
}

class CudaBackendImpl final : public Backend {
 public:
  explicit CudaBackendImpl(CudaGemm gemm) : gemm_(gemm) {}
  ~CudaBackendImpl() override {
    if (blas_ != nullptr) (void)cublasDestroy(blas_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }
  CudaBackendImpl(const CudaBackendImpl&) = delete;
  CudaBackendImpl& operator=(const CudaBackendImpl&) = delete;

  // Picks device 0 and starts the stream and cuBLAS: "" when ready, else why not.
  std::string Init() {
    int count = 0;
    if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess)
      return absl::StrCat("no CUDA device: ", cudaGetErrorString(e));
    if (count == 0) return "no CUDA device: none found";
    if (const cudaError_t e = cudaSetDevice(device_); e != cudaSuccess)
      return absl::StrCat("cannot use CUDA device ", device_, ": ", cudaGetErrorString(e));
    cudaDeviceProp prop{};
    if (const cudaError_t e = cudaGetDeviceProperties(&prop, device_); e != cudaSuccess)
      return absl::StrCat("cannot query CUDA device ", device_, ": ", cudaGetErrorString(e));
    // The binary holds kernels for CMAKE_CUDA_ARCHITECTURES only: check this device can run them.
    cudaFuncAttributes attr{};
    if (const cudaError_t e = cudaFuncGetAttributes(&attr, SwiGluForwardKernel); e != cudaSuccess)
      return absl::StrCat("CUDA device ", device_, " (", prop.name, ", sm_", prop.major, prop.minor,
                          ") cannot run fedtune's kernels: ", cudaGetErrorString(e));
    // bf16 and TF32 tensor cores came with sm_80: before, auto means f32 and bf16 is refused.
    const bool ampere = prop.major >= 8;
    if (gemm_ == CudaGemm::kAuto) gemm_ = ampere ? CudaGemm::kBf16 : CudaGemm::kFp32;
    if (gemm_ == CudaGemm::kBf16 && !ampere)
      return absl::StrCat("CUDA device ", device_, " (", prop.name, ", sm_", prop.major, prop.minor,
                          ") has no bf16 GEMM (needs sm_80 or newer): use FEDTUNE_CUDA_GEMM=tf32 or fp32");
    describe_ = absl::StrCat("cuda (", prop.name, ", sm_", prop.major, prop.minor, ", ", CudaGemmName(gemm_), " GEMM)");
    if (const cudaError_t e = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking); e != cudaSuccess)
      return absl::StrCat("cannot create a CUDA stream: ", cudaGetErrorString(e));
    if (const cublasStatus_t st = cublasCreate(&blas_); st != CUBLAS_STATUS_SUCCESS) {
      blas_ = nullptr;
      return absl::StrCat("cuBLAS does not start: ", cublasGetStatusString(st));
    }
    if (const cublasStatus_t st = cublasSetStream(blas_, stream_); st != CUBLAS_STATUS_SUCCESS)
      return absl::StrCat("cuBLAS does not take the stream: ", cublasGetStatusString(st));
    if (const cudaError_t e = cudaMemcpyToSymbol(kNf4Table, kNf4Codes, sizeof(kNf4Codes)); e != cudaSuccess)
      return absl::StrCat("cannot initialise CUDA constants: ", cudaGetErrorString(e));
    if (const cudaError_t e = cudaMemcpyToSymbol(kNf3Table, kNf3Codes, sizeof(kNf3Codes)); e != cudaSuccess)
      return absl::StrCat("cannot initialise CUDA constants: ", cudaGetErrorString(e));
    if (const cudaError_t e = cudaMemcpyToSymbol(kNf2Table, kNf2Codes, sizeof(kNf2Codes)); e != cudaSuccess)
      return absl::StrCat("cannot initialise CUDA constants: ", cudaGetErrorString(e));
    size_t free_bytes = 0, total_bytes = 0;
    if (const cudaError_t e = cudaMemGetInfo(&free_bytes, &total_bytes); e != cudaSuccess)
      return absl::StrCat("cannot query CUDA device ", device_, "'s memory: ", cudaGetErrorString(e));
    device_memory_ = static_cast<int64_t>(free_bytes);
    return "";
  }

  const char* Name() const override { return "cuda"; }
  std::string Describe() const override { return describe_; }
  bool HostMemoryBuffers() const override { return false; }
  void Wait() override {
    const auto lock = Enter();
    Sync();
  }
  int64_t PeakDeviceBytes() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return memory_.peak;
  }
  int64_t LiveDeviceBytes() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return memory_.live;
  }
  void ResetPeakDeviceBytes() override {
    std::lock_guard<std::mutex> lock(mu_);
    memory_.peak = memory_.live;
  }
  void ReleaseDeviceCaches() override {
    const auto lock = Enter();
    Sync();
    weights_.clear();
    for (DeviceMemory& s : scratch_) s.Reset();
  }
  int64_t DeviceMemoryBytes() const override { return device_memory_; }
  int64_t DeviceLogitsChunkBytes() const override { return kCrossEntropyLogitsBytes; }
  bool Supports(Op op) const override { return op < Op::kCount; }  // every op is implemented

  void QLinearForward(const QMatrix& w, const float* x, float* y, int64_t m) override {
    if (m == 0) return;
    const int64_t k = w.cols, n = w.rows;
    const auto lock = Enter();
    const float* x_d = ToDevice(0, x, m * k);
    float* y_d = Output(1, y, m * n);
    const void* x_g = WeightGemmInput(3, x_d, m * k);
    const void* w_d = DequantizedWeight(w, 2);
    Gemm(gemm_, false, true, m, n, k, 1.0f, x_g, k, w_d, k, 0.0f, y_d, n);  // y = x W^T
    ToHost(y, y_d, m * n);
    Finish();
  }

  void QLinearBackward(const QMatrix& w, const float* dy, float* dx, int64_t m) override {
    if (m == 0) return;
    const int64_t k = w.cols, n = w.rows;
    const auto lock = Enter();
    const float* dy_d = ToDevice(0, dy, m * n);
    float* dx_d = ToDevice(1, dx, m * k);
    const void* dy_g = WeightGemmInput(3, dy_d, m * n);
    const void* w_d = DequantizedWeight(w, 2);
    Gemm(gemm_, false, false, m, k, n, 1.0f, dy_g, n, w_d, k, 1.0f, dx_d, k);  // dx += dy W
    ToHost(dx, dx_d, m * k);
    Finish();
  }

  void RmsNormForward(const float* x, const float* g, float* y, float* rstd, int64_t rows, int64_t n,
                      float eps) override {
    if (rows == 0) return;
    const auto lock = Enter();
    const float* x_d = ToDevice(0, x, rows * n);
    const float* g_d = ToDevice(1, g, n);
    float* y_d = Output(2, y, rows * n);
    float* rstd_d = Output(3, rstd, rows);
    Launch(RmsNormForwardKernel, rows, stream_, x_d, g_d, y_d, rstd_d, n, eps);
    ToHost(y, y_d, rows * n);
    ToHost(rstd, rstd_d, rows);
    Finish();
  }

  void RmsNormBackward(const float* x, const float* g, const float* rstd, const float* dy, float* dx, int64_t rows,
                       int64_t n) override {
    if (rows == 0) return;
    const auto lock = Enter();
    const float* x_d = ToDevice(0, x, rows * n);
    const float* g_d = ToDevice(1, g, n);
    const float* rstd_d = ToDevice(2, rstd, rows);
    const float* dy_d = ToDevice(3, dy, rows * n);
    float* dx_d = ToDevice(4, dx, rows * n);
    Launch(RmsNormBackwardKernel, rows, stream_, x_d, g_d, rstd_d, dy_d, dx_d, n);
    ToHost(dx, dx_d, rows * n);
    Finish();
  }

  void RopeForward(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                   float base, const float* ff) override {
    Rope(x, pos, rows, heads, head_dim, rot_dim, base, ff, 1.0);
  }
  void RopeBackward(float* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                    float base, const float* ff) override {
    Rope(dx, pos, rows, heads, head_dim, rot_dim, base, ff, -1.0);  // rotations are orthogonal
  }

  void AttentionForward(const float* q, const float* k, const float* v, float* out, int64_t n_seq, int64_t len,
                        int64_t n_head, int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap,
                        int64_t window) override {
    FT_CHECK(n_head_kv > 0 && n_head % n_head_kv == 0);
    const int64_t E = n_head * head_dim, kvd = n_head_kv * head_dim, group = n_head / n_head_kv, rows = n_seq * len;
    if (rows == 0) return;
    CheckSegPos(seg_pos, rows, len);
    const auto lock = Enter();
    const float* q_d = ToDevice(0, q, rows * E);
    const float* k_d = ToDevice(1, k, rows * kvd);
    const float* v_d = ToDevice(2, v, rows * kvd);
    float* out_d = Output(3, out, rows * E);
    float* p_d = Scratch<float>(4, n_seq * len * len);
    const int32_t* seg_d = seg_pos != nullptr ? ToDevice(5, seg_pos, rows) : nullptr;
    for (int64_t h = 0; h < n_head; ++h) {
      const int64_t g = h / group;
      CausalProbs(q_d + h * head_dim, E, k_d + g * head_dim, kvd, seg_d, p_d, n_seq, len, head_dim, softcap, nullptr, window);
      // out_h = P V_g, per sequence
      GemmBatched(CudaGemm::kFp32, false, false, len, head_dim, len, 1.0f, p_d, len, len * len, v_d + g * head_dim, kvd,
                  len * kvd, 0.0f, out_d + h * head_dim, E, len * E, n_seq);
    }
    ToHost(out, out_d, rows * E);
    Finish();
  }

  void AttentionBackward(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk,
                         float* dv, int64_t n_seq, int64_t len, int64_t n_head, int64_t n_head_kv,
                         int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window) override {
    FT_CHECK(n_head_kv > 0 && n_head % n_head_kv == 0);
    const int64_t E = n_head * head_dim, kvd = n_head_kv * head_dim, group = n_head / n_head_kv, rows = n_seq * len;
    if (rows == 0) return;
    CheckSegPos(seg_pos, rows, len);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
    const int64_t ll = len * len;
    const auto lock = Enter();
    const float* q_d = ToDevice(0, q, rows * E);
    const float* k_d = ToDevice(1, k, rows * kvd);
    const float* v_d = ToDevice(2, v, rows * kvd);
    const float* dout_d = ToDevice(3, dout, rows * E);
    float* dq_d = ToDevice(4, dq, rows * E);
    float* dk_d = ToDevice(5, dk, rows * kvd);
    float* dv_d = ToDevice(6, dv, rows * kvd);
    float* p_d = Scratch<float>(7, n_seq * ll);
    float* dp_d = Scratch<float>(8, n_seq * ll);
    const int32_t* seg_d = seg_pos != nullptr ? ToDevice(9, seg_pos, rows) : nullptr;
    float* dcap_d = softcap > 0.0f ? Scratch<float>(11, n_seq * ll) : nullptr;  // a slot of its own (10: the bf16 logit gradients)
    // Per query head h (KV head g), batched over the sequences; the heads of a group add into
    // the same dk/dv one after the other on the stream.
    for (int64_t h = 0; h < n_head; ++h) {
      const int64_t g = h / group;
      const float* qh = q_d + h * head_dim;
      const float* doh = dout_d + h * head_dim;
      const float* kg = k_d + g * head_dim;
      const float* vg = v_d + g * head_dim;
      CausalProbs(qh, E, kg, kvd, seg_d, p_d, n_seq, len, head_dim, softcap, dcap_d, window);
      // dV += P^T dO ; dP = dO V^T ; dS = P o (dP - rowsum(dP o P)) ; dQ += s dS K ; dK += s dS^T Q
      GemmBatched(CudaGemm::kFp32, true, false, len, head_dim, len, 1.0f, p_d, len, ll, doh, E, len * E, 1.0f,
                  dv_d + g * head_dim, kvd, len * kvd, n_seq);
      GemmBatched(CudaGemm::kFp32, false, true, len, len, head_dim, 1.0f, doh, E, len * E, vg, kvd, len * kvd, 0.0f,
                  dp_d, len, ll, n_seq);
      Launch(CausalSoftmaxBackwardKernel, rows, stream_, static_cast<const float*>(p_d), dp_d, len, seg_d, softcap,
             static_cast<const float*>(dcap_d), window);
      GemmBatched(CudaGemm::kFp32, false, false, len, head_dim, len, scale, dp_d, len, ll, kg, kvd, len * kvd, 1.0f,
                  dq_d + h * head_dim, E, len * E, n_seq);
      GemmBatched(CudaGemm::kFp32, true, false, len, head_dim, len, scale, dp_d, len, ll, qh, E, len * E, 1.0f,
                  dk_d + g * head_dim, kvd, len * kvd, n_seq);
    }
    ToHost(dq, dq_d, rows * E);
    ToHost(dk, dk_d, rows * kvd);
    ToHost(dv, dv_d, rows * kvd);
    Finish();
  }

  void SwiGluForward(const float* gate, const float* up, float* out, int64_t n) override {
    Binary(SwiGluForwardKernel, gate, up, out, n);
  }
  void GegluForward(const float* gate, const float* up, float* out, int64_t n) override {
    Binary(GegluForwardKernel, gate, up, out, n);
  }
  void GegluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) override {
    GatedBackward(GegluBackwardKernel, gate, up, dout, dgate, dup, n);
  }

  void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup,
                      int64_t n) override {
    GatedBackward(SwiGluBackwardKernel, gate, up, dout, dgate, dup, n);
  }
  void GatedBackward(void (*kernel)(const float*, const float*, const float*, float*, float*, int64_t), const float* gate,
                     const float* up, const float* dout, float* dgate, float* dup, int64_t n) {
    if (n == 0) return;
    const auto lock = Enter();
    const float* gate_d = ToDevice(0, gate, n);
    const float* up_d = ToDevice(1, up, n);
    const float* dout_d = ToDevice(2, dout, n);
    float* dgate_d = ToDevice(3, dgate, n);
    float* dup_d = ToDevice(4, dup, n);
    Launch(kernel, BlocksFor(n), stream_, gate_d, up_d, dout_d, dgate_d, dup_d, n);
    ToHost(dgate, dgate_d, n);
    ToHost(dup, dup_d, n);
    Finish();
  }

  // The scored rows of h (and dh) are gathered on the device into contiguous arrays, processed
  // in chunks of rows whose logits fit kCrossEntropyLogitsBytes, and dh's rows scattered back.
  double CrossEntropy(const QMatrix& w_out, const float* h, const int32_t* target, int64_t rows, float* dh,
                      float grad_scale, float softcap) override {
    const int64_t E = w_out.cols, V = w_out.rows;
    std::vector<int64_t> scored;
    std::vector<int32_t> scored_target;
    for (int64_t r = 0; r < rows; ++r) {
      if (target[r] < 0) continue;
      FT_CHECK(target[r] < V);
      scored.push_back(r);
      scored_target.push_back(target[r]);
    }
    const int64_t ns = static_cast<int64_t>(scored.size());
    if (ns == 0) return 0.0;
    const bool grad = dh != nullptr;
    const int64_t chunk = std::clamp<int64_t>(kCrossEntropyLogitsBytes / (V * 4), 1, ns);
    std::vector<double> nll(Count(ns));
    {
      const auto lock = Enter();
      // The scored rows of h (and dh) gathered on the device into contiguous arrays; dh's rows
      // are scattered back after the chunks. bf16 products: bf16 copies of the h rows (all of
      // them) and of a chunk's logit gradients.
      const bool bf16 = gemm_ == CudaGemm::kBf16;
      const float* h_all = ToDevice(0, h, rows * E);
      const int64_t* scored_d = ToDevice(6, scored.data(), ns);
      float* hs_d = Scratch<float>(7, ns * E);
      float* dh_all = grad ? ToDevice(4, dh, rows * E) : nullptr;
      float* dhs_d = grad ? Scratch<float>(8, ns * E) : nullptr;
      const int32_t* target_d = ToDevice(1, scored_target.data(), ns);
      double* nll_d = Scratch<double>(2, ns);
      float* logits_d = Scratch<float>(3, chunk * V);
      Bf16* hs_g = bf16 ? Scratch<Bf16>(9, ns * E) : nullptr;
      Bf16* dlogits_g = bf16 && grad ? Scratch<Bf16>(10, chunk * V) : nullptr;
      const void* w_d = DequantizedWeight(w_out, 5);
      Launch(GatherRowsKernel, BlocksFor(ns * E), stream_, h_all, scored_d, hs_d, ns, E);
      if (grad) Launch(GatherRowsKernel, BlocksFor(ns * E), stream_, static_cast<const float*>(dh_all), scored_d, dhs_d, ns, E);
      if (bf16) Launch(ToBf16Kernel, BlocksFor(ns * E), stream_, static_cast<const float*>(hs_d), hs_g, ns * E);
      for (int64_t c0 = 0; c0 < ns; c0 += chunk) {
        const int64_t n = std::min(chunk, ns - c0);
        const void* h_g = bf16 ? static_cast<const void*>(hs_g + c0 * E) : hs_d + c0 * E;
        Gemm(gemm_, false, true, n, V, E, 1.0f, h_g, E, w_d, E, 0.0f, logits_d, V);  // logits = h W^T
        Launch(CrossEntropyRowKernel, n, stream_, logits_d, target_d + c0, nll_d + c0, V, grad_scale, grad, softcap);
        if (!grad) continue;
        const void* dl_g = logits_d;
        if (bf16) {
          Launch(ToBf16Kernel, BlocksFor(n * V), stream_, static_cast<const float*>(logits_d), dlogits_g, n * V);
          dl_g = dlogits_g;
        }
        Gemm(gemm_, false, false, n, E, V, 1.0f, dl_g, V, w_d, E, 1.0f, dhs_d + c0 * E, E);  // dh += dlogits W
      }
      ToHost(nll.data(), nll_d, ns);
      if (grad) {
        Launch(ScatterRowsKernel, BlocksFor(ns * E), stream_, static_cast<const float*>(dhs_d), scored_d, dh_all, ns, E);
        ToHost(dh, dh_all, rows * E);
      }
      Finish();
    }
    double sum = 0.0;
    for (int64_t i = 0; i < ns; ++i) sum += nll[Count(i)];
    return sum;
  }

  void AdamW(float* p, float* g, float* m, float* v, float* fisher, int64_t n, const AdamWStep& s) override {
    if (n == 0) return;
    bool g_buffer = false;
    {
      const auto lock = Enter();
      float* p_d = ToDevice(0, p, n);
      const float* g_d = ToDevice(1, g, n);
      float* m_d = ToDevice(2, m, n);
      float* v_d = ToDevice(3, v, n);
      float* f_d = ToDevice(4, fisher, n);
      Launch(AdamWKernel, BlocksFor(n), stream_, p_d, g_d, m_d, v_d, f_d, n, s);
      ToHost(p, p_d, n);
      ToHost(m, m_d, n);
      ToHost(v, v_d, n);
      ToHost(fisher, f_d, n);
      // g = 0: on the stream for a buffer (the kernel may not have read it yet); host memory
      // was copied before the kernel was queued.
      g_buffer = IsBuffer(g, Count(n) * sizeof(float));
      if (g_buffer) Launch(FillKernel, BlocksFor(n), stream_, g, 0.0f, n);
      Finish();
    }
    if (!g_buffer) std::fill_n(g, n, 0.0f);
  }

  // Buffers are managed memory: the ops use them in place (first touched by a kernel, their
  // pages live on the GPU; host reads migrate them back).
  float* AllocBuffer(int64_t n) override {
    const size_t bytes = std::max<size_t>(Count(n) * sizeof(float), 1);
    const auto lock = Enter();
    void* p = AllocateBytes(bytes, /*managed=*/true);
    buffers_[static_cast<const char*>(p)] = bytes;
    return static_cast<float*>(p);
  }
  void FreeBuffer(float* p) override {
    if (p == nullptr) return;
    const auto lock = Enter();
    auto it = buffers_.find(reinterpret_cast<const char*>(p));
    FT_CHECK(it != buffers_.end());
    memory_.Remove(it->second);
    buffers_.erase(it);
    (void)cudaFree(p);
  }
  void Add(const float* a, const float* b, float* out, int64_t n) override { Binary(AddKernel, a, b, out, n); }
  void Mul(const float* a, const float* b, float* out, int64_t n) override { Binary(MulKernel, a, b, out, n); }
  void Copy(const float* src, float* dst, int64_t n) override {
    if (n == 0 || src == dst) return;
    const auto lock = Enter();
    if (!IsBuffer(src, Count(n) * sizeof(float)) && !IsBuffer(dst, Count(n) * sizeof(float))) {
      std::copy_n(src, n, dst);
      return;
    }
    FT_CUDA_CHECK(cudaMemcpyAsync(dst, src, Count(n) * sizeof(float), cudaMemcpyDefault, stream_));
    host_pending_ = !IsBuffer(dst, Count(n) * sizeof(float));
    Finish();
  }
  void Fill(float* dst, float value, int64_t n) override {
    if (n == 0) return;
    const auto lock = Enter();
    if (!IsBuffer(dst, Count(n) * sizeof(float))) {
      std::fill_n(dst, n, value);
      return;
    }
    Launch(FillKernel, BlocksFor(n), stream_, dst, value, n);
    Finish();
  }
  void Scale(float* x, float s, int64_t n) override {
    if (n == 0) return;
    const auto lock = Enter();
    float* x_d = ToDevice(0, x, n);
    Launch(ScaleKernel, BlocksFor(n), stream_, x_d, s, n);
    ToHost(x, x_d, n);
    Finish();
  }
  void AddRowVector(float* y, const float* v, int64_t rows, int64_t n) override {
    if (rows * n == 0) return;
    const auto lock = Enter();
    float* y_d = ToDevice(0, y, rows * n);
    const float* v_d = ToDevice(1, v, n);
    Launch(AddRowVectorKernel, BlocksFor(rows * n), stream_, y_d, v_d, rows, n);
    ToHost(y, y_d, rows * n);
    Finish();
  }

  void LoraForward(const float* x, const float* a, const float* b, float* z, float* y, int64_t m, int64_t in, int64_t r,
                   int64_t out, float scale) override {
    if (m == 0) return;
    const auto lock = Enter();
    const float* x_d = ToDevice(0, x, m * in);
    const float* a_d = ToDevice(1, a, r * in);
    const float* b_d = ToDevice(2, b, out * r);
    float* y_d = ToDevice(3, y, m * out);
    float* z_d = Output(4, z, m * r);
    Gemm(CudaGemm::kFp32, false, true, m, r, in, 1.0f, x_d, in, a_d, in, 0.0f, z_d, r);       // z = x A^T
    Gemm(CudaGemm::kFp32, false, true, m, out, r, scale, z_d, r, b_d, r, 1.0f, y_d, out);  // y += s z B^T
    ToHost(z, z_d, m * r);
    ToHost(y, y_d, m * out);
    Finish();
  }

  void LoraBackward(const float* x, const float* a, const float* b, const float* z, const float* dy, float* da,
                    float* db, float* dx, int64_t m, int64_t in, int64_t r, int64_t out, float scale) override {
    if (m == 0) return;
    const auto lock = Enter();
    const float* dy_d = ToDevice(0, dy, m * out);
    const float* a_d = ToDevice(1, a, r * in);
    const float* b_d = ToDevice(2, b, out * r);
    float* dx_d = ToDevice(3, dx, m * in);
    float* dz_d = Scratch<float>(4, m * r);
    const float* z_d = db != nullptr ? ToDevice(5, z, m * r) : nullptr;
    float* db_d = db != nullptr ? ToDevice(6, db, out * r) : nullptr;
    const float* x_d = da != nullptr ? ToDevice(7, x, m * in) : nullptr;
    float* da_d = da != nullptr ? ToDevice(8, da, r * in) : nullptr;
    if (db != nullptr) Gemm(CudaGemm::kFp32, true, false, out, r, m, scale, dy_d, out, z_d, r, 1.0f, db_d, r);  // dB += s dy^T z
    Gemm(CudaGemm::kFp32, false, false, m, r, out, scale, dy_d, out, b_d, r, 0.0f, dz_d, r);              // dz = s dy B
    if (da != nullptr) Gemm(CudaGemm::kFp32, true, false, r, in, m, 1.0f, dz_d, r, x_d, in, 1.0f, da_d, in);  // dA += dz^T x
    Gemm(CudaGemm::kFp32, false, false, m, in, r, 1.0f, dz_d, r, a_d, in, 1.0f, dx_d, in);                // dx += dz A
    if (db != nullptr) ToHost(db, db_d, out * r);
    if (da != nullptr) ToHost(da, da_d, r * in);
    ToHost(dx, dx_d, m * in);
    Finish();
  }

  void DiabloForward(const float* x, const float* d, float* y, int64_t m, int64_t in, int64_t out,
                     int64_t blocks) override {
    FT_CHECK(blocks > 0);
    if (m == 0) return;
    const int64_t b_in = (in + blocks - 1) / blocks, b_out = (out + blocks - 1) / blocks, bsz = b_in * b_out;
    const auto lock = Enter();
    const float* x_d = ToDevice(0, x, m * in);
    const float* d_d = ToDevice(1, d, blocks * bsz);
    float* y_d = ToDevice(2, y, m * out);
    // y[:, i b_out : +c_out] += x[:, i b_in : +c_in] D_i[:c_in, :c_out]
    ForEachBlockRun(in, out, blocks, [&](int64_t i0, int64_t count, int64_t c_in, int64_t c_out) {
      GemmBatched(CudaGemm::kFp32, false, false, m, c_out, c_in, 1.0f, x_d + i0 * b_in, in, b_in, d_d + i0 * bsz, b_out,
                  bsz, 1.0f, y_d + i0 * b_out, out, b_out, count);
    });
    ToHost(y, y_d, m * out);
    Finish();
  }

  // From the cached device copy of the table (uploaded once, like a weight).
  void EmbedRows(const QMatrix& table, const int32_t* ids, int64_t n, float* out) override {
    if (n == 0) return;
    for (int64_t i = 0; i < n; ++i) FT_CHECK(ids[i] >= 0 && ids[i] < table.rows);
    const int64_t cols = table.cols;
    const auto lock = Enter();
    const int32_t* ids_d = ToDevice(0, ids, n);
    float* out_d = Output(1, out, n * cols);
    const CachedWeight& c = CachedDeviceWeight(table);  // last: an allocation may empty the cache
    Launch(DequantKernelFor<float>(c.type), BlocksFor(n * cols), stream_, static_cast<const uint8_t*>(c.bytes.get()),
           c.row_bytes, ids_d, n, cols, out_d);
    ToHost(out, out_d, n * cols);
    Finish();
  }

  void DropoutScale(uint64_t key, int64_t row0, int64_t rows, int64_t cols, float p, float* out) override {
    const int64_t n = rows * cols;
    if (n == 0) return;
    const auto lock = Enter();
    float* out_d = Output(0, out, n);
    const float keep = static_cast<float>(1.0 / (1.0 - static_cast<double>(p)));
    Launch(DropoutScaleKernel, BlocksFor(n), stream_, key, row0, rows, cols, DropoutThreshold(p), keep, out_d);
    ToHost(out, out_d, n);
    Finish();
  }

  void DiabloBackward(const float* x, const float* d, const float* dy, float* dd, float* dx, int64_t m, int64_t in,
                      int64_t out, int64_t blocks) override {
    FT_CHECK(blocks > 0);
    if (m == 0) return;
    const int64_t b_in = (in + blocks - 1) / blocks, b_out = (out + blocks - 1) / blocks, bsz = b_in * b_out;
    const auto lock = Enter();
    const float* d_d = ToDevice(0, d, blocks * bsz);
    const float* dy_d = ToDevice(1, dy, m * out);
    float* dx_d = ToDevice(2, dx, m * in);
    const float* x_d = dd != nullptr ? ToDevice(3, x, m * in) : nullptr;
    float* dd_d = dd != nullptr ? ToDevice(4, dd, blocks * bsz) : nullptr;
    // dD_i += x_i^T dy_i ; dx_i += dy_i D_i^T
    ForEachBlockRun(in, out, blocks, [&](int64_t i0, int64_t count, int64_t c_in, int64_t c_out) {
      if (dd != nullptr)
        GemmBatched(CudaGemm::kFp32, true, false, c_in, c_out, m, 1.0f, x_d + i0 * b_in, in, b_in, dy_d + i0 * b_out, out,
                    b_out, 1.0f, dd_d + i0 * bsz, b_out, bsz, count);
      GemmBatched(CudaGemm::kFp32, false, true, m, c_in, c_out, 1.0f, dy_d + i0 * b_out, out, b_out, d_d + i0 * bsz, b_out,
                  bsz, 1.0f, dx_d + i0 * b_in, in, b_in, count);
    });
    if (dd != nullptr) ToHost(dd, dd_d, blocks * bsz);
    ToHost(dx, dx_d, m * in);
    Finish();
  }

 private:
  static constexpr int kSlots = 12;  // scratch buffers: an op uses slots 0, 1, ... for its arrays

  // A weight as cached on the device: its block format (F32 after a host fallback) and bytes.
  struct CachedWeight {
    uint64_t fingerprint = 0;
    GgmlType type = GgmlType::kF32;
    size_t row_bytes = 0;
    DeviceMemory bytes;
  };
  using WeightKey = std::tuple<const uint8_t*, GgmlType, int64_t, int64_t>;  // data, type, rows, cols

  std::unique_lock<std::mutex> Enter() {
    std::unique_lock<std::mutex> lock(mu_);
    FT_CUDA_CHECK(cudaSetDevice(device_));
    return lock;
  }

  // cudaMalloc (managed: cudaMallocManaged); when the device is out of memory, empties the
  // weight cache and tries again. Call with the lock held.
  void* AllocateBytes(size_t bytes, bool managed) {
    auto alloc = [&](void** p) { return managed ? cudaMallocManaged(p, bytes, cudaMemAttachGlobal) : cudaMalloc(p, bytes); };
    void* p = nullptr;
    cudaError_t e = alloc(&p);
    if (e == cudaErrorMemoryAllocation && !weights_.empty()) {
      (void)cudaGetLastError();  // clear the error before retrying
      weights_.clear();
      e = alloc(&p);
    }
    FT_CUDA_CHECK(e);
    memory_.Add(bytes);
    return p;
  }
  DeviceMemory Allocate(size_t bytes) { return DeviceMemory(AllocateBytes(bytes, /*managed=*/false), bytes, &memory_); }

  // Scratch buffer `slot`, grown (contents lost) to hold count T. Ops take their buffers before
  // launching work that reads them, and DequantizedWeight last (an allocation may empty the
  // weight cache).
  template <typename T>
  T* Scratch(int slot, int64_t count) {
    DeviceMemory& s = scratch_[Count(slot)];
    const size_t bytes = std::max<size_t>(Count(count) * sizeof(T), 1);
#if defined(FEDTUNE_CUDA_EMULATION) && defined(FEDTUNE_EMU_ASAN)
    // Emulated under ASan: exactly the size asked for, every time, so that an access past
    // `count` is reported instead of landing in the slack of a larger earlier allocation. (Each
    // reallocation waits for the queued work, so the other builds keep the real growth policy,
    // under which a missing wait shows as a stale read.)
    if (s.bytes() != bytes) {
      s.Reset();
      s = Allocate(bytes);
    }
#else
    if (s.bytes() < bytes) {
      s.Reset();
      s = Allocate(bytes + bytes / 4);  // headroom against growing by a few rows at a time
    }
#endif
    return static_cast<T*>(s.get());
  }

  // out = kernel(a, b) element-wise over n values (out may be a or b).
  void Binary(void (*kernel)(const float*, const float*, float*, int64_t), const float* a, const float* b, float* out,
              int64_t n) {
    if (n == 0) return;
    const auto lock = Enter();
    const float* a_d = ToDevice(0, a, n);
    const float* b_d = ToDevice(1, b, n);
    float* out_d = Output(2, out, n);
    Launch(kernel, BlocksFor(n), stream_, a_d, b_d, out_d, n);
    ToHost(out, out_d, n);
    Finish();
  }

  // Whether [p, p + bytes) lies in one of this backend's buffers (AllocBuffer).
  bool IsBuffer(const void* p, size_t bytes) const {
    const auto* c = static_cast<const char*>(p);
    auto it = buffers_.upper_bound(c);
    if (it == buffers_.begin()) return false;
    --it;
    return c >= it->first && c + bytes <= it->first + it->second;
  }

  // An input (or an accumulated output): a buffer is used in place, host memory is copied into
  // scratch `slot`.
  template <typename T>
  T* ToDevice(int slot, const T* host, int64_t count) {
    if (IsBuffer(host, Count(count) * sizeof(T))) return const_cast<T*>(host);
    T* d = Scratch<T>(slot, count);
    if (count > 0) FT_CUDA_CHECK(cudaMemcpyAsync(d, host, Count(count) * sizeof(T), cudaMemcpyHostToDevice, stream_));
    return d;
  }

  // Where an op writes an output that `dst` receives: dst itself if it is a buffer, else scratch
  // `slot` (copied to dst by ToHost).
  template <typename T>
  T* Output(int slot, T* dst, int64_t count) {
    if (IsBuffer(dst, Count(count) * sizeof(T))) return dst;
    return Scratch<T>(slot, count);
  }

  template <typename T>
  void ToHost(T* host, const T* device, int64_t count) {
    if (host == device || count == 0) return;  // a buffer, written in place
    FT_CUDA_CHECK(cudaMemcpyAsync(host, device, Count(count) * sizeof(T), cudaMemcpyDeviceToHost, stream_));
    host_pending_ = true;
  }

  // The end of an op: waits for the stream if the op writes host memory (the caller reads it on
  // return). An op whose outputs are all buffers returns at once and its work stays queued;
  // host memory it reads was copied (staged) before the call returned.
  void Finish() {
    if (!host_pending_) return;
    Sync();
    host_pending_ = false;
  }
  void Sync() { FT_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  // The cached device copy of w, uploaded on first use (or when its fingerprint changed).
  const CachedWeight& CachedDeviceWeight(const QMatrix& w) {
    const WeightKey key{w.data, w.type, w.rows, w.cols};
    const uint64_t fingerprint = Fingerprint(w);
    auto it = weights_.find(key);
    if (it != weights_.end() && it->second.fingerprint != fingerprint) {
      weights_.erase(it);
      it = weights_.end();
    }
    if (it == weights_.end()) it = weights_.emplace(key, UploadWeight(w, fingerprint)).first;
    return it->second;
  }

  CachedWeight UploadWeight(const QMatrix& w, uint64_t fingerprint) {
    FT_CHECK(w.cols % TypeTraits(w.type).block_size == 0);
    CachedWeight c;
    c.fingerprint = fingerprint;
    FT_CHECK((DequantKernelFor<float>(w.type) != nullptr) == CudaDequantizes(w.type));  // the planner's device model reads CudaDequantizes
    if (CudaDequantizes(w.type)) {
      c.type = w.type;
      c.row_bytes = w.row_bytes;
      c.bytes = Allocate(std::max<size_t>(Count(w.rows) * w.row_bytes, 1));
      if (w.rows > 0)
        FT_CUDA_CHECK(cudaMemcpyAsync(c.bytes.get(), w.data, Count(w.rows) * w.row_bytes, cudaMemcpyHostToDevice, stream_));
      return c;
    }
    // No device dequantizer: dequantize on the host once and keep f32.
    std::vector<float> f(Count(w.rows * w.cols));
    for (int64_t r = 0; r < w.rows; ++r) DequantizeRow(w.type, w.row(r), f.data() + r * w.cols, w.cols);
    c.type = GgmlType::kF32;
    c.row_bytes = Count(w.cols) * sizeof(float);
    c.bytes = Allocate(std::max<size_t>(f.size() * sizeof(float), 1));
    if (!f.empty()) FT_CUDA_CHECK(cudaMemcpyAsync(c.bytes.get(), f.data(), f.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
    Sync();  // f is freed on return
    return c;
  }

  // w dequantized into scratch `slot`: w.rows x w.cols row-major, in the weight precision's
  // storage type (bf16, else f32).
  const void* DequantizedWeight(const QMatrix& w, int slot) {
    if (gemm_ == CudaGemm::kBf16) return Dequantize<Bf16>(w, slot);
    return Dequantize<float>(w, slot);
  }
  template <typename Out>
  const Out* Dequantize(const QMatrix& w, int slot) {
    Out* out = Scratch<Out>(slot, w.rows * w.cols);
    const CachedWeight& c = CachedDeviceWeight(w);
    Launch(DequantKernelFor<Out>(c.type), BlocksFor(w.rows * w.cols), stream_, static_cast<const uint8_t*>(c.bytes.get()),
           c.row_bytes, static_cast<const int32_t*>(nullptr), w.rows, w.cols, out);
    return out;
  }

  // The other operand (count values, device) of a product with a frozen weight, in the weight
  // precision: x itself, or its bf16 copy in scratch `slot`.
  const void* WeightGemmInput(int slot, const float* x, int64_t count) {
    if (gemm_ != CudaGemm::kBf16) return x;
    Bf16* out = Scratch<Bf16>(slot, count);
    Launch(ToBf16Kernel, BlocksFor(count), stream_, x, out, count);
    return out;
  }

  // Row-major C[m x n] = alpha op(A) op(B) + beta C (the arguments of kernels::Gemm), for
  // `batch` triples of matrices stride_a / stride_b / stride_c elements apart. A and B are bf16
  // for kBf16, else f32; C is f32. cuBLAS reads each row-major matrix as its
  // column-major transpose, so this asks it for C^T = op(B)^T op(A)^T: B first, dimensions
  // (n, m, k), each operand keeping its own transpose flag.
  void GemmBatched(CudaGemm precision, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                   const void* a, int64_t lda, int64_t stride_a, const void* b, int64_t ldb, int64_t stride_b,
                   float beta, float* c, int64_t ldc, int64_t stride_c, int64_t batch) {
    if (m == 0 || n == 0 || batch == 0) return;
    const cublasComputeType_t compute =
        precision == CudaGemm::kTf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const cudaDataType ab = precision == CudaGemm::kBf16 ? CUDA_R_16BF : CUDA_R_32F;
    FT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        blas_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, ToInt(n), ToInt(m), ToInt(k),
        &alpha, b, ab, ToInt(ldb), stride_b, a, ab, ToInt(lda), stride_a, &beta, c, CUDA_R_32F,
        ToInt(ldc), stride_c, ToInt(batch), compute, CUBLAS_GEMM_DEFAULT));
  }
  void Gemm(CudaGemm precision, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
            const void* a, int64_t lda, const void* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    GemmBatched(precision, trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
  }

  // P = masked softmax(scale Q_h K_g^T) into p (n_seq stacked len x len matrices) for one query
  // head: qh / kg point at the head's columns of q (row stride q_stride) / k (kv_stride); seg_pos
  // (device, may be null) as in AttentionForward.
  void CausalProbs(const float* qh, int64_t q_stride, const float* kg, int64_t kv_stride, const int32_t* seg_pos,
                   float* p, int64_t n_seq, int64_t len, int64_t head_dim, float softcap, float* dcap, int64_t window) {
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
    GemmBatched(CudaGemm::kFp32, false, true, len, len, head_dim, scale, qh, q_stride, len * q_stride, kg, kv_stride,
                len * kv_stride, 0.0f, p, len, len * len, n_seq);
    Launch(CausalSoftmaxKernel, n_seq * len, stream_, p, len, seg_pos, softcap, dcap, window);
  }

  // Packed rows: token t, query i = t % len of its row, sees keys i - seg_pos[t] .. i, which
  // must lie in the row (the reference FT_CHECKs the same).
  static void CheckSegPos(const int32_t* seg_pos, int64_t rows, int64_t len) {
    if (seg_pos == nullptr) return;
    for (int64_t t = 0; t < rows; ++t) FT_CHECK(seg_pos[t] >= 0 && seg_pos[t] <= t % len);
  }

  void Rope(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim, float base,
            const float* ff, double sign) {
    const int64_t work = rows * (rot_dim / 2);
    if (work == 0) return;
    const auto lock = Enter();
    float* x_d = ToDevice(0, x, rows * heads * head_dim);
    const int32_t* pos_d = ToDevice(1, pos, rows);
    const float* ff_d = ff != nullptr ? ToDevice(2, ff, rot_dim / 2) : nullptr;
    Launch(RopeKernel, BlocksFor(work), stream_, x_d, pos_d, rows, heads, head_dim, rot_dim, base, ff_d, sign);
    ToHost(x, x_d, rows * heads * head_dim);
    Finish();
  }

  // Calls f(i0, count, c_in, c_out) for runs of `count` DiaBlo blocks from i0 that share their
  // (cropped) sizes c_in x c_out: first all full blocks (a prefix), then each cropped block;
  // blocks wholly in the padding (c_in or c_out <= 0) are skipped, as in model/adapter.cc.
  template <typename F>
  static void ForEachBlockRun(int64_t in, int64_t out, int64_t blocks, F f) {
    const int64_t b_in = (in + blocks - 1) / blocks, b_out = (out + blocks - 1) / blocks;
    if (b_in == 0 || b_out == 0) return;  // no input or no output columns
    const int64_t full = std::min({blocks, in / b_in, out / b_out});
    if (full > 0) f(0, full, b_in, b_out);
    for (int64_t i = full; i < blocks; ++i) {
      const int64_t c_in = std::min(b_in, in - i * b_in), c_out = std::min(b_out, out - i * b_out);
      if (c_in > 0 && c_out > 0) f(i, 1, c_in, c_out);
    }
  }

  const int device_ = 0;
  int64_t device_memory_ = 0;  // free device memory after Init
  CudaGemm gemm_;  // of the products with the frozen weights: as asked, kAuto resolved by Init
  std::string describe_ = "cuda";
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  mutable std::mutex mu_;
  MemoryCounter memory_;       // declared before the memory it counts (destroyed after it)
  bool host_pending_ = false;  // a queued copy writes host memory (Finish waits for it)
  std::array<DeviceMemory, kSlots> scratch_;
  std::map<WeightKey, CachedWeight> weights_;
  std::map<const char*, size_t> buffers_;  // AllocBuffer's allocations: start -> bytes
};

}  // namespace

const char* CudaGemmName(CudaGemm g) {
  switch (g) {
    case CudaGemm::kAuto: return "auto";
    case CudaGemm::kBf16: return "bf16";
    case CudaGemm::kTf32: return "tf32";
    case CudaGemm::kFp32: return "fp32";
  }
  return "?";
}

std::optional<CudaGemm> ParseCudaGemm(std::string_view s) {
  for (CudaGemm g : {CudaGemm::kAuto, CudaGemm::kBf16, CudaGemm::kTf32, CudaGemm::kFp32}) {
    if (s == CudaGemmName(g)) return g;
  }
  return std::nullopt;
}

std::unique_ptr<Backend> MakeCudaBackend(std::string* why_not) {
  const char* env = std::getenv("FEDTUNE_CUDA_GEMM");
  const std::string_view name = env != nullptr && *env != '\0' ? env : "auto";
  const std::optional<CudaGemm> gemm = ParseCudaGemm(name);
  if (!gemm) {
    if (why_not != nullptr) *why_not = absl::StrCat("FEDTUNE_CUDA_GEMM=", std::string(name), ": expected auto, bf16, tf32 or fp32");
    return nullptr;
  }
  return MakeCudaBackend(why_not, *gemm);
}

std::unique_ptr<Backend> MakeCudaBackend(std::string* why_not, CudaGemm gemm) {
  auto backend = std::make_unique<CudaBackendImpl>(gemm);
  if (std::string why = backend->Init(); !why.empty()) {
    (void)cudaGetLastError();  // leave no error behind for other CUDA users
    if (why_not != nullptr) *why_not = std::move(why);
    return nullptr;
  }
  return backend;
}

}  // namespace fedtune::kernels

extern "C" fedtune::kernels::Backend* fedtune_make_cuda_backend(std::string* why_not) {
  return fedtune::kernels::MakeCudaBackend(why_not).release();
}

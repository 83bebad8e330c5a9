// Host emulation of the subset of the CUDA runtime and cuBLAS that kernels/cuda/cuda_backend.cu
// uses, for tests only: cuda_backend.cu compiled as plain C++ with FEDTUNE_CUDA_EMULATION
// includes this header instead of the toolkit's, and tests/kernels/backend_ops_test.cc runs the
// result like any backend (ctest: backend_ops_cuda_emulated_test). No GPU and no toolkit needed,
// so CI checks the CUDA backend's index arithmetic, reductions, block/grid-stride loops, chunking,
// scratch-buffer reuse and cuBLAS argument conventions (row-major via column-major, leading
// dimensions, strides, transposes) on every run.
//
// What it does not show: anything about real GPU execution (memory model beyond what the
// barrier gives, warp scheduling, occupancy, nvcc code generation, speed). The GEMM rounds TF32
// inputs as tensor cores read them (bf16 operands are bf16 in memory) but sums in double, so the
// tensor cores' accumulation order and rounding are not reproduced.
//
// Streams: work is queued, as on a GPU, and runs in order when the host waits for it
// (cudaStreamSynchronize, or cudaFree, which waits for the device): kernel launches, cuBLAS calls
// and copies from device memory run then; copies from host memory read their source at the call
// (the driver stages pageable memory before cudaMemcpyAsync returns). So a result read on the
// host before the backend synchronised is stale (or NaN), and a test shows a missing
// synchronisation as a mismatch. g_emu_syncs counts the synchronisations.
//
// Model: a launch runs its blocks one after another on the calling thread. A block's threads are
// fibers, each with its own stack; the block's __shared__ arrays are function statics.
// The scheduler resumes every fiber in turn until it reaches __syncthreads or returns, round
// after round, so no thread passes a barrier before all have reached it; a block in which some
// threads return while others wait at a barrier aborts (divergent __syncthreads: undefined on a
// GPU). __shfl_xor_sync goes through a block-wide exchange buffer between two barriers, so every
// thread of the block must call it (as BlockAllReduce does). cudaMalloc fills memory with 0xff
// (NaN) so that a kernel reading scratch it never wrote shows up as a mismatch. The GEMM is a
// column-major reference in double with cuBLAS's argument checks and type rules. Under AddressSanitizer the
// stack switches are announced to it (__sanitizer_start/finish_switch_fiber), so out-of-bounds
// accesses in the kernels are reported like any other.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <utility>
#include <vector>

#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include "common/fp16.h"

#define __global__
#define __device__
#define __forceinline__ inline
#define __constant__
#define __shared__ static

struct dim3 {
  unsigned x = 0, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fedtune_emu {

#if defined(__SANITIZE_ADDRESS__)
#define FEDTUNE_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FEDTUNE_EMU_ASAN 1
#endif
#endif

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = size_t{256} << 10;

// A suspended execution context. On x86-64 a stack pointer: SwitchStack (host_emulation.cc)
// pushes the callee-saved registers, stores the stack pointer, loads the other one and pops —
// no system call, unlike swapcontext's signal-mask save (which made the emulated attention test
// ten times slower). Elsewhere ucontext.
#if defined(__x86_64__)
#define FEDTUNE_EMU_ASM_SWITCH 1
struct Context {
  void* sp = nullptr;
};
extern "C" void fedtune_emu_switch_stack(void** save_sp, void* load_sp);
#else
struct Context {
  ucontext_t uc{};
};
#endif

struct Fiber {
  Context ctx;
  std::vector<char> stack;
  bool done = false;
  void* fake_stack = nullptr;  // ASan's fake stack of the suspended fiber
};

struct Scheduler {
  Context ctx;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  const void* sched_stack_bottom = nullptr;  // the scheduler's stack, as ASan saw it
  size_t sched_stack_size = 0;
  const std::function<void()>* kernel = nullptr;
};
inline Scheduler g_sched;
alignas(8) inline unsigned char g_exchange[2][kMaxThreads * 8];
inline unsigned g_shuffle_calls = 0;

// Saves the running context in *from and continues `to`. Out of line: with ucontext the call
// returns twice, and no caller's variable may live in a register across it.
[[gnu::noinline]] inline void Switch(Context* from, Context* to) {
#ifdef FEDTUNE_EMU_ASM_SWITCH
  fedtune_emu_switch_stack(&from->sp, to->sp);
#else
  if (swapcontext(&from->uc, &to->uc) != 0) std::abort();
#endif
}

inline void SwitchedIntoFiber() {
#ifdef FEDTUNE_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_sched.current->fake_stack, &g_sched.sched_stack_bottom, &g_sched.sched_stack_size);
#endif
}
inline void LeavingFiber(bool dying) {
#ifdef FEDTUNE_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &g_sched.current->fake_stack, g_sched.sched_stack_bottom,
                                 g_sched.sched_stack_size);
#else
  (void)dying;
#endif
}

[[noreturn]] inline void FiberEntry() {
  SwitchedIntoFiber();
  (*g_sched.kernel)();
  g_sched.current->done = true;
  LeavingFiber(/*dying=*/true);
  Context dead;
  Switch(&dead, &g_sched.ctx);
  std::abort();  // a finished fiber is never resumed
}

inline void Resume(Fiber& f, unsigned thread) {
  threadIdx.x = thread;
  g_sched.current = &f;
#ifdef FEDTUNE_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack.data(), f.stack.size());
#endif
  Switch(&g_sched.ctx, &f.ctx);
#ifdef FEDTUNE_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// A fresh context that runs FiberEntry on the fiber's stack.
[[gnu::noinline]] inline void Start(Fiber& f) {
  f.done = false;
  f.fake_stack = nullptr;  // the previous run's fake stack died with it
#ifdef FEDTUNE_EMU_ASAN
  // A finished fiber leaves its frames' redzones poisoned on its (reused) stack.
  __asan_unpoison_memory_region(f.stack.data(), f.stack.size());
#endif
#ifdef FEDTUNE_EMU_ASM_SWITCH
  // As if FiberEntry had been called (return address slot at top - 8, 16-byte aligned top) and
  // SwitchStack had pushed six registers: it pops them and returns into FiberEntry.
  auto top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<void**>(top);
  slot[-1] = nullptr;                                          // FiberEntry's return address (never used)
  slot[-2] = reinterpret_cast<void*>(&FiberEntry);             // SwitchStack's return address
  for (int i = 3; i <= 8; ++i) slot[-i] = nullptr;             // rbp, rbx, r12-r15
  f.ctx.sp = &slot[-8];
#else
  if (getcontext(&f.ctx.uc) != 0) std::abort();
  f.ctx.uc.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc.uc_stack.ss_size = f.stack.size();
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, reinterpret_cast<void (*)()>(&FiberEntry), 0);
#endif
}

// Runs one block: every fiber until its barrier or its end, round after round.
inline void RunBlock(int threads) {
  for (int t = 0; t < threads; ++t) Start(g_sched.fibers[static_cast<size_t>(t)]);
  for (;;) {
    int done = 0;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = g_sched.fibers[static_cast<size_t>(t)];
      if (!f.done) Resume(f, static_cast<unsigned>(t));
      done += f.done ? 1 : 0;
    }
    if (done == threads) return;
    if (done > 0) {
      std::fprintf(stderr, "CUDA emulation: block %u: %d of %d threads returned while the others wait at __syncthreads\n",
                   blockIdx.x, done, threads);
      std::abort();
    }
  }
}

}  // namespace fedtune_emu

inline void __syncthreads() {
  fedtune_emu::LeavingFiber(/*dying=*/false);
  fedtune_emu::Switch(&fedtune_emu::g_sched.current->ctx, &fedtune_emu::g_sched.ctx);
  fedtune_emu::SwitchedIntoFiber();
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  static_assert(sizeof(T) <= 8);
  // Two buffers used in turn: a thread writes one only after the barrier of the call that
  // used the other, by which time every thread has read this one (one barrier per call).
  // Every thread of the block makes the same calls, so calls / blockDim.x numbers them.
  unsigned& calls = fedtune_emu::g_shuffle_calls;
  T* buf = reinterpret_cast<T*>(fedtune_emu::g_exchange[(calls / blockDim.x) % 2]);
  ++calls;
  buf[threadIdx.x] = v;
  __syncthreads();
  const unsigned src = threadIdx.x ^ static_cast<unsigned>(offset);
  return src < blockDim.x ? buf[src] : v;
}
inline float __uint_as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fsub_rn(float a, float b) {
  volatile float r = a - b;
  return r;
}
inline uint16_t __ushort_as_half(uint16_t h) { return h; }
inline float __half2float(uint16_t h) { return fedtune::Fp16ToFp32(h); }

namespace fedtune_emu {
// The stream: queued work, run in order by Drain. One queue per process (the backend uses one
// stream); not thread-safe (a backend serialises its ops; two emulated backends must not run
// from two threads at once).
inline std::vector<std::function<void()>> g_stream;
inline uint64_t g_syncs = 0;
inline void Drain() {
  std::vector<std::function<void()>> work;
  work.swap(g_stream);
  for (auto& w : work) w();
}
// Device allocations (cudaMalloc, cudaMallocManaged): start -> bytes.
inline std::map<const char*, size_t> g_device;
inline bool IsDevice(const void* p) {
  const auto* c = static_cast<const char*>(p);
  auto it = g_device.upper_bound(c);
  if (it == g_device.begin()) return false;
  --it;
  return c < it->first + it->second;
}

// Runs a launch now: its blocks one after another.
inline void RunLaunch(int64_t blocks, int threads, const std::function<void()>& kernel) {
  auto& s = g_sched;
  s.kernel = &kernel;
  if (s.fibers.size() < static_cast<size_t>(threads)) {
    s.fibers.resize(static_cast<size_t>(threads));
    for (auto& fb : s.fibers) fb.stack.resize(kStackBytes);
  }
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = static_cast<unsigned>(threads);
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    g_shuffle_calls = 0;
    RunBlock(threads);
  }
  s.kernel = nullptr;
}
}  // namespace fedtune_emu

// kernel<<<blocks, threads>>>(args...) as EmuLaunch(blocks, threads, [=] { kernel(args...); }):
// queued on the stream (capture the arguments by value: the launch runs later).
template <class F>
void EmuLaunch(int64_t blocks, int threads, F&& f) {
  if (threads < 1 || threads > fedtune_emu::kMaxThreads) std::abort();
  fedtune_emu::g_stream.push_back([blocks, threads, kernel = std::function<void()>(std::forward<F>(f))] {
    fedtune_emu::RunLaunch(blocks, threads, kernel);
  });
}

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0, cudaErrorMemoryAllocation = 2;
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetLastError() { return 0; }
using cudaStream_t = void*;
constexpr unsigned cudaStreamNonBlocking = 1;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDefault };
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n > 0 ? n : 1);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, n);  // NaN garbage: reading unwritten scratch shows up
  fedtune_emu::g_device[static_cast<const char*>(*p)] = n > 0 ? n : 1;
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
  if (p == nullptr) return 0;
  fedtune_emu::Drain();  // cudaFree waits for the device
  if (fedtune_emu::g_device.erase(static_cast<const char*>(p)) != 1) std::abort();  // not a device allocation
  std::free(p);
  return 0;
}
constexpr unsigned cudaMemAttachGlobal = 1;
inline cudaError_t cudaMallocManaged(void** p, size_t n, unsigned) { return cudaMalloc(p, n); }
inline uint64_t g_emu_copied_bytes = 0;  // by cudaMemcpyAsync: what crossed host <-> device
inline const uint64_t& g_emu_syncs = fedtune_emu::g_syncs;  // cudaStreamSynchronize calls
// A host source is read now (staged), a device source when the copy runs; the kind must match
// where the pointers are (cudaMemcpyDefault: either).
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t) {
  const bool from_device = fedtune_emu::IsDevice(s), to_device = fedtune_emu::IsDevice(d);
  if ((kind == cudaMemcpyHostToDevice && (from_device || !to_device)) || (kind == cudaMemcpyDeviceToHost && (!from_device || to_device)))
    std::abort();  // the kind contradicts the pointers
  if (from_device != to_device) g_emu_copied_bytes += n;
  if (n == 0) return 0;
  if (from_device) {
    fedtune_emu::g_stream.push_back([d, s, n] { std::memcpy(d, s, n); });
  } else {
    std::vector<char> staged(static_cast<const char*>(s), static_cast<const char*>(s) + n);
    fedtune_emu::g_stream.push_back([d, staged = std::move(staged)] { std::memcpy(d, staged.data(), staged.size()); });
  }
  return 0;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  ++fedtune_emu::g_syncs;
  fedtune_emu::Drain();
  return 0;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = reinterpret_cast<void*>(1); return 0; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return 0; }
inline cudaError_t cudaSetDevice(int) { return 0; }
inline cudaError_t cudaGetDeviceCount(int* c) { *c = 1; return 0; }
struct cudaDeviceProp { char name[256] = "emu"; int major = 9, minor = 0; };
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp*, int) { return 0; }
// An 80 GiB device with nothing allocated, or $FEDTUNE_EMULATED_DEVICE_MIB MiB (tests of
// device-memory budgets).
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  const char* mib = std::getenv("FEDTUNE_EMULATED_DEVICE_MIB");
  *total_bytes = static_cast<size_t>((mib != nullptr ? std::strtod(mib, nullptr) : 80.0 * 1024) * (1 << 20));
  size_t used = 0;
  for (const auto& [p, n] : fedtune_emu::g_device) used += n;
  *free_bytes = *total_bytes > used ? *total_bytes - used : 0;
  return 0;
}
struct cudaFuncAttributes {};
template <class T> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes*, T*) { return 0; }
template <class T, size_t N> cudaError_t cudaMemcpyToSymbol(T (&sym)[N], const void* src, size_t n) {
  fedtune_emu::Drain();  // synchronous
  std::memcpy(sym, src, n);
  return 0;
}

using cublasHandle_t = void*;
using cublasStatus_t = int;
constexpr cublasStatus_t CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_NOT_SUPPORTED = 15;
inline const char* cublasGetStatusString(cublasStatus_t s) {
  return s == CUBLAS_STATUS_NOT_SUPPORTED ? "emulated cublas: type combination not supported"
                                          : "emulated cublas error (bad leading dimension?)";
}
inline cublasStatus_t cublasCreate(cublasHandle_t* h) { *h = reinterpret_cast<void*>(1); return 0; }
inline cublasStatus_t cublasDestroy(cublasHandle_t) { return 0; }
inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return 0; }
enum cublasOperation_t { CUBLAS_OP_N, CUBLAS_OP_T };
enum cudaDataType { CUDA_R_32F, CUDA_R_16BF };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT };

// cuda_bf16.h's type and conversions (round to nearest even, as __float2bfloat16).
struct __nv_bfloat16 {
  uint16_t x;
};
inline __nv_bfloat16 __float2bfloat16(float f) { return {fedtune::Fp32ToBf16(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return fedtune::Bf16ToFp32(b.x); }

namespace fedtune_emu {
// What a tensor core reads of an f32 operand under CUBLAS_COMPUTE_32F_FAST_TF32: 10 mantissa
// bits, rounded to nearest (ties away from zero, as cvt.rna.tf32.f32).
inline float RoundTf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t u = std::bit_cast<uint32_t>(v);
  u = (u + 0x1000u) & 0xffffe000u;
  return std::bit_cast<float>(u);
}
}  // namespace fedtune_emu

// Column-major reference with cuBLAS's argument checks; C is not read when beta == 0. A and B
// are f32 or bf16 (both the same), C f32; TF32 compute rounds f32 inputs to TF32 and takes no
// bf16 (cuBLAS lists no such combination). Products are summed in double.
inline cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                                 const void* alpha, const void* A, cudaDataType type_a, int lda, long long sA,
                                                 const void* B, cudaDataType type_b, int ldb, long long sB, const void* beta, void* C,
                                                 cudaDataType type_c, int ldc, long long sC, int batch, cublasComputeType_t compute,
                                                 cublasGemmAlgo_t) {
  auto mx1 = [](int v) { return v > 1 ? v : 1; };
  if (m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < mx1(ta == CUBLAS_OP_N ? m : k) || ldb < mx1(tb == CUBLAS_OP_N ? k : n) || ldc < mx1(m)) return CUBLAS_STATUS_INVALID_VALUE;
  if (type_a != type_b || type_c != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  const bool bf16 = type_a == CUDA_R_16BF, tf32 = compute == CUBLAS_COMPUTE_32F_FAST_TF32;
  if (bf16 && tf32) return CUBLAS_STATUS_NOT_SUPPORTED;
  auto load = [bf16, tf32](const void* base, long long i) -> double {
    if (bf16) return fedtune::Bf16ToFp32(static_cast<const uint16_t*>(base)[i]);
    const float v = static_cast<const float*>(base)[i];
    return tf32 ? fedtune_emu::RoundTf32(v) : v;
  };
  const size_t elem = bf16 ? 2 : 4;
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);  // host scalars: read now
  fedtune_emu::g_stream.push_back([=] {
    for (int bt = 0; bt < batch; ++bt) {
      const void* a = static_cast<const char*>(A) + static_cast<size_t>(bt * sA) * elem;
      const void* b = static_cast<const char*>(B) + static_cast<size_t>(bt * sB) * elem;
      float* c = static_cast<float*>(C) + bt * sC;
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
          double s = 0;
          for (int l = 0; l < k; ++l) {
            const double av = ta == CUBLAS_OP_N ? load(a, i + static_cast<long long>(l) * lda) : load(a, l + static_cast<long long>(i) * lda);
            const double bv = tb == CUBLAS_OP_N ? load(b, l + static_cast<long long>(j) * ldb) : load(b, j + static_cast<long long>(l) * ldb);
            s += av * bv;
          }
          float& cv = c[i + static_cast<long long>(j) * ldc];
          cv = be == 0.0f ? static_cast<float>(al * s) : static_cast<float>(al * s + be * cv);
        }
    }
  });
  return 0;
}

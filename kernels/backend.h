// Kernel backends: one interface over the training ops, implemented by
//   - "cpu-ref":  the reference (plain loops for element-wise ops, BLAS for products; the
//                 templates in kernels/train_ops.h, also instantiated on double for the
//                 finite-difference checks),
//   - "cpu-fast": multithreaded, SIMD (AVX2+FMA, chosen at run time) versions on float,
//   - "cuda":     CUDA kernels (compiled when nvcc is found; usable when a GPU is present).
// Every fast op is tested against cpu-ref by normalised mean squared error
// (tests/kernels/backend_ops_test.cc, the ggml test-backend-ops habit).
//
// All tensors are row-major float. A pointer is host memory or one of the backend's buffers
// (AllocBuffer): a device backend copies host memory in and out per call and uses its buffers in
// place.
//
// Backward ops ACCUMULATE (+=) into input gradients, like kernels/train_ops.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "kernels/ops.h"

namespace fedtune::kernels {

enum class Op : int {
  kQLinearForward,     // y[m,n] = x[m,k] W^T, W (n x k) in its block format
  kQLinearBackward,    // dx[m,k] += dy[m,n] W
  kRmsNormForward,     // y = x * rstd * g, rstd saved
  kRmsNormBackward,    // dx += ...
  kRopeForward,        // adjacent-pair rotary embedding, in place
  kRopeBackward,       // its transpose, in place
  kAttentionForward,   // causal GQA over n_seq sequences of len tokens
  kAttentionBackward,  // dq, dk, dv += ...
  kSwiGluForward,      // out = silu(gate) * up
  kSwiGluBackward,     // dgate, dup += ...
  kCrossEntropy,       // chunked softmax cross-entropy against a frozen output matrix
  kAdamW,              // one AdamW update of a parameter tensor (+ running Fisher)
  kLoraForward,        // z = x A^T ; y += s z B^T
  kLoraBackward,       // dB += s dy^T z ; dz = s dy B ; dA += dz^T x ; dx += dz A
  kDiabloForward,      // y += blockdiag(D) applied to x
  kDiabloBackward,     // dD += x_i^T dy_i ; dx_i += dy_i D_i^T
  kDropoutScale,       // inverted-dropout multipliers from a hash of their coordinates
  kEmbedRows,          // out[i] = row ids[i] of a (quantized) embedding table
  kGegluForward,       // out = gelu_tanh(gate) * up (Gemma)
  kGegluBackward,      // dgate, dup += ...
  kCount
};
const char* OpName(Op op);

// One AdamW update (decoupled weight decay), the formula of model/optimizer.cc:
//   f += (g^2 - f) * fisher_weight            (running mean of squared raw gradients)
//   g' = g * clip ; m = b1 m + (1-b1) g' ; v = b2 v + (1-b2) g'^2
//   p -= lr * ((m / bc1) / (sqrt(v / bc2) + eps) + wd * p) ; g = 0
struct AdamWStep {
  float lr = 0, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0;
  float clip = 1;           // multiplier applied to the gradient (global-norm clipping)
  float bc1 = 1, bc2 = 1;   // bias corrections 1 - beta^t
  float fisher_weight = 1;  // 1 / t
};

inline constexpr int64_t kLogitChunkRows = 256, kBf16LogitChunkRows = 128;

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* Name() const = 0;
  // What runs the ops, for logs and worker profiles: the name, and for a device backend the
  // device and the GEMM precision ("cuda (NVIDIA H100 ..., sm_90, bf16 GEMM)"). Inline: no key
  // function (see AllocBuffer).
  virtual std::string Describe() const { return Name(); }
  // Whether buffers are plain host memory (the CPU backends): callers may then skip staging
  // data into buffers and pass their own arrays.
  virtual bool HostMemoryBuffers() const { return true; }
  // Peak bytes of device memory the backend allocated itself (buffers, scratch, cached weights;
  // not its libraries' own workspaces); 0 for host-memory backends.
  virtual int64_t PeakDeviceBytes() const { return 0; }
  // Bytes of device memory the backend holds now (same accounting), and the peak reset to it
  // (a worker measures each round's peak).
  virtual int64_t LiveDeviceBytes() const { return 0; }
  virtual void ResetPeakDeviceBytes() {}
  // Frees what the backend keeps between ops on the device (cached weights, scratch buffers),
  // waiting for queued work first: a worker starts each round from its live buffers only, so
  // that what the profile, base-speed runs or an earlier plan left does not count in the round's
  // peak.
  virtual void ReleaseDeviceCaches() {}
  // Free memory of the device when the backend started (after its context, stream and cuBLAS
  // handle were created): what training may use there. 0 for host-memory backends.
  virtual int64_t DeviceMemoryBytes() const { return 0; }
  // Bytes of logits the device's cross-entropy computes at once (planner::MemoryModel::
  // device_logits_chunk_bytes); 0 for host-memory backends.
  virtual int64_t DeviceLogitsChunkBytes() const { return 0; }
  // Returns when all work the backend has queued is done (device backends queue an op whose
  // outputs are all buffers); a no-op for host backends.
  virtual void Wait() {}
  virtual bool Supports(Op op) const = 0;

  virtual void QLinearForward(const QMatrix& w, const float* x, float* y, int64_t m) = 0;
  virtual void QLinearBackward(const QMatrix& w, const float* dy, float* dx, int64_t m) = 0;
  virtual void RmsNormForward(const float* x, const float* g, float* y, float* rstd, int64_t rows, int64_t n,
                              float eps) = 0;
  virtual void RmsNormBackward(const float* x, const float* g, const float* rstd, const float* dy, float* dx,
                               int64_t rows, int64_t n) = 0;
  // freq_factors: rot_dim / 2 divisors of the angles (RopeAngle), host memory, or null.
  virtual void RopeForward(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim,
                           int64_t rot_dim, float base, const float* freq_factors) = 0;
  virtual void RopeBackward(float* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim,
                            int64_t rot_dim, float base, const float* freq_factors) = 0;
  // seg_pos (may be null): packed rows, token i attends to keys i - seg_pos[i] .. i of its row.
  // softcap > 0: scores capped to softcap * tanh(s / softcap) before the softmax (Gemma 2); 0: none.
  // window > 0: a sliding-window layer, token i sees keys i - window + 1 .. i only; 0: none.
  virtual void AttentionForward(const float* q, const float* k, const float* v, float* out, int64_t n_seq,
                                int64_t len, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                                const int32_t* seg_pos, float softcap, int64_t window) = 0;
  virtual void AttentionBackward(const float* q, const float* k, const float* v, const float* dout, float* dq,
                                 float* dk, float* dv, int64_t n_seq, int64_t len, int64_t n_head,
                                 int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap,
                                 int64_t window) = 0;
  virtual void SwiGluForward(const float* gate, const float* up, float* out, int64_t n) = 0;
  virtual void GegluForward(const float* gate, const float* up, float* out, int64_t n) = 0;
  virtual void GegluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) = 0;
  virtual void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup,
                              int64_t n) = 0;
  // Returns the summed NLL over rows with target >= 0; dh (may be null) += grad_scale * dNLL/dh.
  // softcap > 0: logits z capped to softcap * tanh(z / softcap) first (Gemma 2); 0: none.
  // The CPU backends score kLogitChunkRows rows at a time (kBf16LogitChunkRows on cpu-bf16 from
  // 64 scored rows), holding that many rows of f32 logits (the planner's memory model counts it).
  virtual double CrossEntropy(const QMatrix& w_out, const float* h, const int32_t* target, int64_t rows,
                              float* dh, float grad_scale, float softcap) = 0;
  virtual void AdamW(float* p, float* g, float* m, float* v, float* fisher, int64_t n, const AdamWStep& s) = 0;
  // A: r x in, B: out x r, z: m x r (written), y: m x out (added to).
  virtual void LoraForward(const float* x, const float* a, const float* b, float* z, float* y, int64_t m,
                           int64_t in, int64_t r, int64_t out, float scale) = 0;
  // da / db may be null (frozen); dx added to.
  virtual void LoraBackward(const float* x, const float* a, const float* b, const float* z, const float* dy,
                            float* da, float* db, float* dx, int64_t m, int64_t in, int64_t r, int64_t out,
                            float scale) = 0;
  // D: blocks x b_in x b_out with b_in = ceil(in / blocks), b_out = ceil(out / blocks); block i
  // maps input columns [i b_in, min(in, (i+1) b_in)) to output columns [i b_out, ...).
  virtual void DiabloForward(const float* x, const float* d, float* y, int64_t m, int64_t in, int64_t out,
                             int64_t blocks) = 0;
  virtual void DiabloBackward(const float* x, const float* d, const float* dy, float* dd, float* dx, int64_t m,
                              int64_t in, int64_t out, int64_t blocks) = 0;
  // kernels::DropoutScale (train_ops.h): made where the backend computes, so that a device
  // backend does not receive rows x cols host multipliers per adapter.
  virtual void DropoutScale(uint64_t key, int64_t row0, int64_t rows, int64_t cols, float p, float* out) = 0;
  // out[i, :] = row ids[i] of `table` dequantized (GetRow), for i < n: the token embeddings,
  // gathered where the backend computes, so a device backend receives token ids, not rows.
  virtual void EmbedRows(const QMatrix& table, const int32_t* ids, int64_t n, float* out) = 0;

  // Activation buffers and the element-wise glue between the ops (every backend has them; not
  // in Op). A buffer lives where the backend computes: host memory for the CPU backends; for
  // CUDA, managed memory that its ops use in place (no copy through host memory), so a trainer
  // whose activations are buffers keeps them on the GPU across ops. Every op also takes plain
  // host pointers (copied per call by a device backend). A device backend may return before
  // an op whose outputs are all buffers has run: read a buffer on the host through Copy into
  // host memory (which waits), never directly. Contents of a new buffer are undefined.
  //
  // Pure virtual on purpose: Backend must have no out-of-line virtual function (no key
  // function), so that its vtable and type info are emitted wherever it is used — the CUDA
  // module (dlopen'd, not linked with fedtune_kernels) needs them.
  virtual float* AllocBuffer(int64_t n) = 0;
  virtual void FreeBuffer(float* p) = 0;
  // out = a + b ; out = a * b ; dst = src ; dst = value. out may be a or b; any pointer may be
  // host memory or a buffer.
  virtual void Add(const float* a, const float* b, float* out, int64_t n) = 0;
  virtual void Mul(const float* a, const float* b, float* out, int64_t n) = 0;
  virtual void Copy(const float* src, float* dst, int64_t n) = 0;
  virtual void Fill(float* dst, float value, int64_t n) = 0;
  // y[r, :] += v for r < rows (a frozen bias of n values: Qwen2's q/k/v biases).
  virtual void AddRowVector(float* y, const float* v, int64_t rows, int64_t n) = 0;
  // x *= s (Gemma's embedding scale, a query scale).
  virtual void Scale(float* x, float s, int64_t n) = 0;

  // (Declared last: the CUDA module built before these existed keeps its vtable layout.)
  // A frozen linear layer and its LoRA adapter on the same input (no dropout between them):
  // y = x W^T + scale (x A^T) B^T with z = x A^T written, and its backward (dx += dy W +
  // scale (dy B) A; dA / dB as LoraBackward, either may be null). By default the two ops one
  // after the other; cpu-bf16 folds the adapter into the weight product (one pass over the
  // activations instead of three).
  virtual void QLinearLoraForward(const QMatrix& w, const float* x, const float* a, const float* b, float* z, float* y, int64_t m,
                                  int64_t r, float scale) {
    QLinearForward(w, x, y, m);
    LoraForward(x, a, b, z, y, m, w.cols, r, w.rows, scale);
  }
  virtual void QLinearLoraBackward(const QMatrix& w, const float* x, const float* a, const float* b, const float* z, const float* dy,
                                   float* da, float* db, float* dx, int64_t m, int64_t r, float scale) {
    QLinearBackward(w, dy, dx, m);
    LoraBackward(x, a, b, z, dy, da, db, dx, m, w.cols, r, w.rows, scale);
  }
};

// The process-wide instances. CudaBackend() is null when CUDA was not compiled in or no device
// is usable (the reason in CudaUnavailableReason()).
Backend& CpuReferenceBackend();
Backend& CpuFastBackend();
// cpu-fast with bf16 frozen-weight products (AVX-512-BF16 or AMX through oneDNN); null where the
// CPU (capped by FEDTUNE_CPU_ISA) has no bf16 unit or oneDNN was not built in (the reason in
// CpuBf16UnavailableReason()).
Backend* CpuBf16Backend();
// What "cpu" means: cpu-bf16 where the CPU has a bf16 unit (and oneDNN is built in), else
// cpu-fast. FEDTUNE_CPU_ISA=avx2 (or lower) forces the fp32 path.
Backend& BestCpuBackend();
// Whether `b` multiplies the frozen weights in bf16 on the CPU (cpu-bf16; memory: the planner).
bool IsCpuBf16(const Backend* b);
// The same from a backend's name (a worker's reported `kernels`).
bool IsCpuBf16Name(std::string_view name);
std::string CpuBf16UnavailableReason();
Backend* CudaBackend();
std::string CudaUnavailableReason();

// "cpu-ref", "cpu-fast" (fp32), "cpu-bf16", "cpu" (BestCpuBackend()), "cuda" or "auto" (cuda when
// usable, else BestCpuBackend()). The
// result dispatches each op to the chosen backend when it Supports(op), else to cpu-fast,
// logging the fallback once per op.
absl::StatusOr<Backend*> SelectBackend(std::string_view device);

// Frees what the CPU backends keep per thread between calls, on the calling thread and every
// thread of the kernels' pool: cpu-bf16's bf16 copies (the output matrix's among them) and
// oneDNN primitives with their scratchpads. The next call rebuilds them. A worker daemon calls it
// before each task: what earlier tasks of other shapes (the profile's, a base-speed run's) left
// behind is not part of the next round's peak. Not while another thread runs kernels.
void ReleaseThreadCaches();

}  // namespace fedtune::kernels

#include "kernels/backend.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <new>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/fp16.h"
#include "common/log.h"
#include "kernels/bf16_gemm.h"
#include "kernels/cpu_features.h"
#include "kernels/fast_ops.h"
#include "kernels/ops.h"
#include "kernels/gemm.h"
#include "kernels/thread_pool.h"
#include "kernels/train_ops.h"
#include "kernels/vec_dot.h"

#ifdef FEDTUNE_HAVE_CUDA
#include <dlfcn.h>

#include <cstdlib>

#include "kernels/cuda/cuda_backend.h"
#endif

namespace fedtune::kernels {

const char* OpName(Op op) {
  static constexpr std::array<const char*, static_cast<size_t>(Op::kCount)> kNames = {
      "qlinear_forward", "qlinear_backward", "rmsnorm_forward", "rmsnorm_backward", "rope_forward", "rope_backward",
      "attention_forward", "attention_backward", "swiglu_forward", "swiglu_backward", "cross_entropy", "adamw",
      "lora_forward", "lora_backward", "diablo_forward", "diablo_backward", "dropout_scale", "embed_rows",
      "geglu_forward", "geglu_backward"};
  const auto i = static_cast<size_t>(op);
  return i < kNames.size() ? kNames[i] : "?";
}

namespace {

template <typename F>
void Elementwise(int64_t n, F f) {
  if (n < (int64_t{1} << 16)) return f(int64_t{0}, n);
  DefaultPool().ParallelFor(n, int64_t{1} << 14, [&](int64_t i0, int64_t i1, int) { f(i0, i1); });
}

// The CPU backends' buffers and element-wise glue: 64-byte aligned host memory, loops over the
// thread pool.
class HostMemoryBackend : public Backend {
 public:
  float* AllocBuffer(int64_t n) override {
    FT_CHECK(n >= 0);
    return static_cast<float*>(::operator new[](static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float), std::align_val_t{64}));
  }
  void FreeBuffer(float* p) override {
    if (p != nullptr) ::operator delete[](p, std::align_val_t{64});
  }
  void Add(const float* a, const float* b, float* out, int64_t n) override {
    Elementwise(n, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) out[i] = a[i] + b[i];
    });
  }
  void Mul(const float* a, const float* b, float* out, int64_t n) override {
    Elementwise(n, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) out[i] = a[i] * b[i];
    });
  }
  void Copy(const float* src, float* dst, int64_t n) override {
    if (src == dst) return;
    Elementwise(n, [&](int64_t i0, int64_t i1) { std::copy(src + i0, src + i1, dst + i0); });
  }
  void Fill(float* dst, float value, int64_t n) override {
    Elementwise(n, [&](int64_t i0, int64_t i1) { std::fill(dst + i0, dst + i1, value); });
  }
  void AddRowVector(float* y, const float* v, int64_t rows, int64_t n) override {
    Elementwise(rows * n, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) y[i] += v[i % n];
    });
  }
  void Scale(float* x, float s, int64_t n) override {
    Elementwise(n, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) x[i] *= s;
    });
  }
  // GeGLU has no SIMD version: the reference loop over the pool (both CPU backends).
  void GegluForward(const float* gate, const float* up, float* out, int64_t n) override {
    Elementwise(n, [&](int64_t i0, int64_t i1) { kernels::GegluForward<float>(gate + i0, up + i0, out + i0, i1 - i0); });
  }
  void GegluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) override {
    Elementwise(n, [&](int64_t i0, int64_t i1) {
      kernels::GegluBackward<float>(gate + i0, up + i0, dout + i0, dgate + i0, dup + i0, i1 - i0);
    });
  }
};

// The reference update, element by element (model/optimizer.cc's formula).
void AdamWRange(float* p, float* g, float* m, float* v, float* f, int64_t i0, int64_t i1, const AdamWStep& s) {
  for (int64_t i = i0; i < i1; ++i) {
    f[i] += (g[i] * g[i] - f[i]) * s.fisher_weight;
    const float gi = g[i] * s.clip;
    m[i] = s.beta1 * m[i] + (1.0f - s.beta1) * gi;
    v[i] = s.beta2 * v[i] + (1.0f - s.beta2) * gi * gi;
    const float mhat = m[i] / s.bc1, vhat = v[i] / s.bc2;
    p[i] -= s.lr * (mhat / (std::sqrt(vhat) + s.eps) + s.weight_decay * p[i]);
    g[i] = 0.0f;
  }
}

class CpuReference final : public HostMemoryBackend {
 public:
  const char* Name() const override { return "cpu-ref"; }
  bool Supports(Op) const override { return true; }
  void QLinearForward(const QMatrix& w, const float* x, float* y, int64_t m) override {
    kernels::QLinearForward<float>(w, x, y, m);
  }
  void QLinearBackward(const QMatrix& w, const float* dy, float* dx, int64_t m) override {
    kernels::QLinearBackward<float>(w, dy, dx, m);
  }
  void RmsNormForward(const float* x, const float* g, float* y, float* rstd, int64_t rows, int64_t n, float eps) override {
    kernels::RmsNormForward<float>(x, g, y, rstd, rows, n, eps);
  }
  void RmsNormBackward(const float* x, const float* g, const float* rstd, const float* dy, float* dx, int64_t rows,
                       int64_t n) override {
    kernels::RmsNormBackward<float>(x, g, rstd, dy, dx, rows, n);
  }
  void RopeForward(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                   float base, const float* ff) override {
    kernels::RopeForward<float>(x, pos, rows, heads, head_dim, rot_dim, base, ff);
  }
  void RopeBackward(float* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                    float base, const float* ff) override {
    kernels::RopeBackward<float>(dx, pos, rows, heads, head_dim, rot_dim, base, ff);
  }
  void AttentionForward(const float* q, const float* k, const float* v, float* out, int64_t n_seq, int64_t len,
                        int64_t n_head, int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window) override {
    kernels::AttentionForward<float>(q, k, v, out, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, /*fast_exp=*/false, softcap, window);
  }
  void AttentionBackward(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk,
                         float* dv, int64_t n_seq, int64_t len, int64_t n_head, int64_t n_head_kv,
                         int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window) override {
    kernels::AttentionBackward<float>(q, k, v, dout, dq, dk, dv, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, /*fast_exp=*/false, softcap, window);
  }
  void SwiGluForward(const float* gate, const float* up, float* out, int64_t n) override {
    kernels::SwiGluForward<float>(gate, up, out, n);
  }
  void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup,
                      int64_t n) override {
    kernels::SwiGluBackward<float>(gate, up, dout, dgate, dup, n);
  }
  double CrossEntropy(const QMatrix& w_out, const float* h, const int32_t* target, int64_t rows, float* dh,
                      float grad_scale, float softcap) override {
    return kernels::CrossEntropyChunked<float>(w_out, h, target, rows, dh, grad_scale, kLogitChunkRows, /*fast=*/false, softcap);
  }
  void AdamW(float* p, float* g, float* m, float* v, float* fisher, int64_t n, const AdamWStep& s) override {
    AdamWRange(p, g, m, v, fisher, 0, n, s);
  }
  void LoraForward(const float* x, const float* a, const float* b, float* z, float* y, int64_t m, int64_t in,
                   int64_t r, int64_t out, float scale) override {
    kernels::LoraForward<float>(x, a, b, z, y, m, in, r, out, scale);
  }
  void LoraBackward(const float* x, const float* a, const float* b, const float* z, const float* dy, float* da,
                    float* db, float* dx, int64_t m, int64_t in, int64_t r, int64_t out, float scale) override {
    kernels::LoraBackward<float>(x, a, b, z, dy, da, db, dx, m, in, r, out, scale);
  }
  void DiabloForward(const float* x, const float* d, float* y, int64_t m, int64_t in, int64_t out,
                     int64_t blocks) override {
    kernels::DiabloForward<float>(x, d, y, m, in, out, blocks);
  }
  void DiabloBackward(const float* x, const float* d, const float* dy, float* dd, float* dx, int64_t m, int64_t in,
                      int64_t out, int64_t blocks) override {
    kernels::DiabloBackward<float>(x, d, dy, dd, dx, m, in, out, blocks);
  }
  void DropoutScale(uint64_t key, int64_t row0, int64_t rows, int64_t cols, float p, float* out) override {
    kernels::DropoutScale<float>(key, row0, rows, cols, p, out);
  }
  void EmbedRows(const QMatrix& table, const int32_t* ids, int64_t n, float* out) override {
    kernels::EmbedRows<float>(table, ids, n, out);
  }
};

// Multithreaded over DefaultPool(), AVX2+FMA element-wise kernels where the CPU has them:
// parallel element-wise ops, vectorised softmax exponentials, adapter products split over
// threads, and whole-weight GEMMs for the quantized linear layer (below).
class CpuFast : public HostMemoryBackend {
 public:
  const char* Name() const override { return HaveAvx2Fma() ? "cpu-fast (avx2+fma)" : "cpu-fast (generic)"; }
  bool Supports(Op) const override { return true; }
  // Batches of tokens against a weight of up to 16 MiB as f32 (every projection of a small
  // model; not the output matrix): the whole weight is dequantized once, in parallel, and each
  // thread multiplies its rows of tokens by all of it in one GEMM, so the GEMM packs each operand
  // once per thread instead of the activations once per weight tile. Otherwise the reference's
  // tiles.
  void QLinearForward(const QMatrix& w, const float* x, float* y, int64_t m) override {
    const int64_t n = w.rows, k = w.cols;
    if (m < kMinRowsWhole || n * k > kWholeWeightFloats) return kernels::QLinearForward<float>(w, x, y, m);
    const float* wf = WholeWeight(w);
    DefaultPool().ParallelFor(m, 16, [&](int64_t m0, int64_t m1, int) {
      Gemm<float>(false, true, m1 - m0, n, k, 1.0f, x + m0 * k, k, wf, k, 0.0f, y + m0 * n, n);
    });
  }
  void QLinearBackward(const QMatrix& w, const float* dy, float* dx, int64_t m) override {
    const int64_t n = w.rows, k = w.cols;
    if (m < kMinRowsWhole || n * k > kWholeWeightFloats) return kernels::QLinearBackward<float>(w, dy, dx, m);
    const float* wf = WholeWeight(w);
    DefaultPool().ParallelFor(m, 16, [&](int64_t m0, int64_t m1, int) {
      Gemm<float>(false, false, m1 - m0, k, n, 1.0f, dy + m0 * n, n, wf, k, 1.0f, dx + m0 * k, k);
    });
  }
  void RmsNormForward(const float* x, const float* g, float* y, float* rstd, int64_t rows, int64_t n, float eps) override {
    DefaultPool().ParallelFor(rows, 16, [&](int64_t r0, int64_t r1, int) {
      if (HaveAvx2Fma()) return avx2::RmsNormRows(x, g, y, rstd, r0, r1, n, eps);
      kernels::RmsNormForward<float>(x + r0 * n, g, y + r0 * n, rstd + r0, r1 - r0, n, eps);
    });
  }
  void RmsNormBackward(const float* x, const float* g, const float* rstd, const float* dy, float* dx, int64_t rows,
                       int64_t n) override {
    DefaultPool().ParallelFor(rows, 16, [&](int64_t r0, int64_t r1, int) {
      if (HaveAvx2Fma()) return avx2::RmsNormBackwardRows(x, g, rstd, dy, dx, r0, r1, n);
      kernels::RmsNormBackward<float>(x + r0 * n, g, rstd + r0, dy + r0 * n, dx + r0 * n, r1 - r0, n);
    });
  }
  void RopeForward(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                   float base, const float* ff) override {
    Rope(x, pos, rows, heads, head_dim, rot_dim, base, ff, 1.0);
  }
  void RopeBackward(float* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                    float base, const float* ff) override {
    Rope(dx, pos, rows, heads, head_dim, rot_dim, base, ff, -1.0);
  }
  void AttentionForward(const float* q, const float* k, const float* v, float* out, int64_t n_seq, int64_t len,
                        int64_t n_head, int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window) override {
    kernels::AttentionForward<float>(q, k, v, out, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, /*fast_exp=*/true, softcap, window);
  }
  void AttentionBackward(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk,
                         float* dv, int64_t n_seq, int64_t len, int64_t n_head, int64_t n_head_kv,
                         int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window) override {
    kernels::AttentionBackward<float>(q, k, v, dout, dq, dk, dv, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, /*fast_exp=*/true, softcap, window);
  }
  void SwiGluForward(const float* gate, const float* up, float* out, int64_t n) override {
    DefaultPool().ParallelFor(n, 4096, [&](int64_t i0, int64_t i1, int) {
      if (HaveAvx2Fma()) return avx2::SwiGluForward(gate + i0, up + i0, out + i0, i1 - i0);
      kernels::SwiGluForward<float>(gate + i0, up + i0, out + i0, i1 - i0);
    });
  }
  void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup,
                      int64_t n) override {
    DefaultPool().ParallelFor(n, 4096, [&](int64_t i0, int64_t i1, int) {
      if (HaveAvx2Fma()) return avx2::SwiGluBackward(gate + i0, up + i0, dout + i0, dgate + i0, dup + i0, i1 - i0);
      kernels::SwiGluBackward<float>(gate + i0, up + i0, dout + i0, dgate + i0, dup + i0, i1 - i0);
    });
  }
  double CrossEntropy(const QMatrix& w_out, const float* h, const int32_t* target, int64_t rows, float* dh,
                      float grad_scale, float softcap) override {
    return kernels::CrossEntropyChunked<float>(w_out, h, target, rows, dh, grad_scale, kLogitChunkRows, /*fast=*/true, softcap);
  }
  void AdamW(float* p, float* g, float* m, float* v, float* fisher, int64_t n, const AdamWStep& s) override {
    DefaultPool().ParallelFor(n, 8192, [&](int64_t i0, int64_t i1, int) { AdamWRange(p, g, m, v, fisher, i0, i1, s); });
  }
  // Products split so that no two threads write the same output: rows of z / y / dx, columns
  // of dA, rows of dB.
  void LoraForward(const float* x, const float* a, const float* b, float* z, float* y, int64_t m, int64_t in,
                   int64_t r, int64_t out, float scale) override {
    DefaultPool().ParallelFor(m, 32, [&](int64_t m0, int64_t m1, int) {
      kernels::LoraForward<float>(x + m0 * in, a, b, z + m0 * r, y + m0 * out, m1 - m0, in, r, out, scale);
    });
  }
  void LoraBackward(const float* x, const float* a, const float* b, const float* z, const float* dy, float* da,
                    float* db, float* dx, int64_t m, int64_t in, int64_t r, int64_t out, float scale) override {
    std::vector<float>& dz = Scratch(m * r);
    DefaultPool().ParallelFor(m, 32, [&](int64_t m0, int64_t m1, int) {  // dz = s dy B
      Gemm<float>(false, false, m1 - m0, r, out, scale, dy + m0 * out, out, b, r, 0.0f, dz.data() + m0 * r, r);
    });
    if (db != nullptr) {
      DefaultPool().ParallelFor(out, 16, [&](int64_t o0, int64_t o1, int) {  // dB += s dy^T z
        Gemm<float>(true, false, o1 - o0, r, m, scale, dy + o0, out, z, r, 1.0f, db + o0 * r, r);
      });
    }
    if (da != nullptr) {
      DefaultPool().ParallelFor(in, 16, [&](int64_t c0, int64_t c1, int) {  // dA += dz^T x
        Gemm<float>(true, false, r, c1 - c0, m, 1.0f, dz.data(), r, x + c0, in, 1.0f, da + c0, in);
      });
    }
    DefaultPool().ParallelFor(m, 32, [&](int64_t m0, int64_t m1, int) {  // dx += dz A
      Gemm<float>(false, false, m1 - m0, in, r, 1.0f, dz.data() + m0 * r, r, a, in, 1.0f, dx + m0 * in, in);
    });
  }
  void DiabloForward(const float* x, const float* d, float* y, int64_t m, int64_t in, int64_t out,
                     int64_t blocks) override {
    DefaultPool().ParallelFor(m, 32, [&](int64_t m0, int64_t m1, int) {
      kernels::DiabloForward<float>(x + m0 * in, d, y + m0 * out, m1 - m0, in, out, blocks);
    });
  }
  void DiabloBackward(const float* x, const float* d, const float* dy, float* dd, float* dx, int64_t m, int64_t in,
                      int64_t out, int64_t blocks) override {
    // Blocks own disjoint slices of dD and of dx's columns: one task per block.
    const int64_t b_in = (in + blocks - 1) / blocks, b_out = (out + blocks - 1) / blocks;
    DefaultPool().ParallelFor(blocks, 1, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c_in = std::min(b_in, in - i * b_in), c_out = std::min(b_out, out - i * b_out);
        if (c_in <= 0 || c_out <= 0) continue;
        if (dd != nullptr) {
          Gemm<float>(true, false, c_in, c_out, m, 1.0f, x + i * b_in, in, dy + i * b_out, out, 1.0f, dd + i * b_in * b_out, b_out);
        }
        Gemm<float>(false, true, m, c_in, c_out, 1.0f, dy + i * b_out, out, d + i * b_in * b_out, b_out, 1.0f, dx + i * b_in, in);
      }
    });
  }
  void EmbedRows(const QMatrix& table, const int32_t* ids, int64_t n, float* out) override {
    DefaultPool().ParallelFor(n, 16, [&](int64_t i0, int64_t i1, int) {
      kernels::EmbedRows<float>(table, ids + i0, i1 - i0, out + i0 * table.cols);
    });
  }
  void DropoutScale(uint64_t key, int64_t row0, int64_t rows, int64_t cols, float p, float* out) override {
    DefaultPool().ParallelFor(rows, 16, [&](int64_t r0, int64_t r1, int) {
      kernels::DropoutScale<float>(key, row0 + r0, r1 - r0, cols, p, out + r0 * cols);
    });
  }

 private:
  // Rotation angles pos * base^(-2i/rot_dim) in double, as the reference; cos/sin once per
  // (position, pair) for positions 0 .. the largest present (at most the context length),
  // then rows in parallel.
  static void Rope(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                   float base, const float* ff, double sign) {
    const int64_t half = rot_dim / 2;
    int32_t max_pos = 0;
    for (int64_t r = 0; r < rows; ++r) max_pos = std::max(max_pos, pos[r]);
    const int64_t n_pos = int64_t{max_pos} + 1;
    std::vector<float> cs(static_cast<size_t>(n_pos * half * 2));
    DefaultPool().ParallelFor(n_pos, 16, [&](int64_t p0, int64_t p1, int) {
      for (int64_t p = p0; p < p1; ++p) {
        for (int64_t i = 0; i < half; ++i) {
          const double theta = sign * RopeAngle(static_cast<double>(p), i, rot_dim, base, ff);
          cs[static_cast<size_t>((p * half + i) * 2)] = static_cast<float>(std::cos(theta));
          cs[static_cast<size_t>((p * half + i) * 2 + 1)] = static_cast<float>(std::sin(theta));
        }
      }
    });
    DefaultPool().ParallelFor(rows, 64, [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) {
        FT_CHECK(pos[r] >= 0);
        const float* t = cs.data() + static_cast<size_t>(pos[r]) * static_cast<size_t>(half) * 2;
        for (int64_t h = 0; h < heads; ++h) {
          float* p = x + (r * heads + h) * head_dim;
          for (int64_t i = 0; i < half; ++i) {
            const float c = t[2 * i], s = t[2 * i + 1], a = p[2 * i], b = p[2 * i + 1];
            p[2 * i] = a * c - b * s;
            p[2 * i + 1] = a * s + b * c;
          }
        }
      }
    });
  }

 protected:
  static constexpr int64_t kMinRowsWhole = 64, kWholeWeightFloats = int64_t{4} << 20;
  // The weight as f32: its own bytes when stored as F32, else dequantized (rows in parallel)
  // into a buffer of the calling thread (callers on several threads never share one).
  static const float* WholeWeight(const QMatrix& w) {
    if (w.type == GgmlType::kF32 && w.row_bytes == static_cast<size_t>(w.cols) * sizeof(float)) {
      return reinterpret_cast<const float*>(w.data);
    }
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(w.rows * w.cols));
    float* out = buf.data();
    DefaultPool().ParallelFor(w.rows, 32, [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) DequantizeRowFast(w.type, w.row(r), out + r * w.cols, w.cols);
    });
    return out;
  }
  std::vector<float>& Scratch(int64_t n) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(n));
    return buf;
  }
};

// The calling thread's bf16 copies, one set shared by every cpu-bf16 op (each op is done with
// them when it returns): a slot holds its largest request, not one buffer per op and call site.
// ReleaseThreadCaches frees them (a worker daemon between rounds).
struct Bf16Copies {
  std::vector<uint16_t> rows, rows2, weight, small, output;  // activation rows; weights; adapters; the output matrix
  std::vector<float> f;                                       // LoRA's dz
};
Bf16Copies& ThreadBf16Copies() {
  thread_local Bf16Copies c;
  return c;
}

// cpu-fast with the frozen-weight products in bf16 (issue 18): the whole weight dequantized
// straight to bf16 (per row through a small f32 row), the activations converted once per call,
// fp32 accumulation in oneDNN's AVX-512-BF16 / AMX kernels (kernels/bf16_gemm.h); the output layer
// likewise (CrossEntropy). Everything else, and products with too few rows for the conversion to
// pay, stay cpu-fast.
class CpuBf16 final : public CpuFast {
 public:
  explicit CpuBf16(CpuIsa isa) : name_(absl::StrCat("cpu-bf16 (", CpuIsaName(isa), ", oneDNN)")) {}
  const char* Name() const override { return name_.c_str(); }
  void QLinearForward(const QMatrix& w, const float* x, float* y, int64_t m) override {
    const int64_t n = w.rows, k = w.cols;
    if (m < kMinRowsWhole || n * k > kWholeWeightFloats) return CpuFast::QLinearForward(w, x, y, m);
    const uint16_t* wb = WeightBf16(w);
    Bf16MatmulNT(ActivationsBf16(x, m * k), wb, y, m, n, k);
  }
  void QLinearBackward(const QMatrix& w, const float* dy, float* dx, int64_t m) override {
    const int64_t n = w.rows, k = w.cols;
    if (m < kMinRowsWhole || n * k > kWholeWeightFloats) return CpuFast::QLinearBackward(w, dy, dx, m);
    const uint16_t* wb = WeightBf16(w);
    Bf16MatmulNNAdd(ActivationsBf16(dy, m * n), wb, dx, m, n, k);
  }
  // The output layer (V x E, 28M values for SmolLM2: ~19% of a step's FLOPs) in bf16 too: the
  // matrix is dequantized to bf16 once per call (56.6 MB for SmolLM2, kept by the calling thread
  // for the next call) and every 128-row chunk multiplies against it; fewer scored rows than
  // kMinRowsWhole do not pay for the conversion and stay cpu-fast.
  double CrossEntropy(const QMatrix& w_out, const float* h, const int32_t* target, int64_t rows, float* dh,
                      float grad_scale, float softcap) override {
    const int64_t V = w_out.rows, E = w_out.cols;
    int64_t scored = 0;
    for (int64_t r = 0; r < rows; ++r) scored += target[r] >= 0 ? 1 : 0;
    if (scored < kMinRowsWhole || V * E > kMaxOutputValues) return CpuFast::CrossEntropy(w_out, h, target, rows, dh, grad_scale, softcap);
    const uint16_t* wb = OutputBf16(w_out);
    // 128 rows of f32 logits (25 MB for SmolLM2) instead of cpu-fast's 256: the same speed
    // (farm-bench, kept mode, 8 x 256: 128 / 256 wall 1.004, median of 5 pairs; 64 rows: 1.08x
    // slower), 29 MiB less at the peak. The logit gradients go to bf16 in place, over the f32
    // chunk (ToBf16InPlaceRows), not into a second n x V buffer.
    return CrossEntropyChunkedWith(
        V, E, h, target, rows, dh, grad_scale, kBf16LogitChunkRows, softcap,
        [&](const float* x, float* y, int64_t n) { Bf16MatmulNT(ActivationsBf16(x, n * E), wb, y, n, V, E); },
        [&](float* dy, float* dx, int64_t n) { Bf16MatmulNNAdd(ToBf16InPlaceRows(dy, n, V), wb, dx, n, V, E, 2 * V); });
  }
  void AttentionForward(const float* q, const float* k, const float* v, float* out, int64_t n_seq, int64_t len, int64_t n_head,
                        int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window) override {
    if (n_seq * len < kMinRowsWhole) return CpuFast::AttentionForward(q, k, v, out, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, softcap, window);
    kernels::AttentionForwardBf16(q, k, v, out, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, softcap, window);
  }
  void AttentionBackward(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk, float* dv, int64_t n_seq,
                         int64_t len, int64_t n_head, int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap,
                         int64_t window) override {
    if (n_seq * len < kMinRowsWhole)
      return CpuFast::AttentionBackward(q, k, v, dout, dq, dk, dv, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, softcap, window);
    kernels::AttentionBackwardBf16(q, k, v, dout, dq, dk, dv, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, softcap, window);
  }
  // A LoRA adapter on its own stays fp32 (cpu-fast): at rank 16 its products are bound by the
  // activations' memory traffic. Measured with every LoRA product in bf16 through oneDNN
  // (bench_kernels BM_Op, 2048 x 576 -> 1536, r = 16, AVX-512-BF16 EPYC, 2 threads): forward
  // 1.62 ms vs 0.88 fp32, backward 2.94 vs 2.98. Folded into the weight product it pays:
  //   forward   y = [x | z] [W | s B]^T: z = x A^T (from the same bf16 x), its bf16 copy written
  //             beside x, the weight dequantized with s B beside it: one product with k + r;
  //   backward  dx += [dy | dz] [W ; A]: dz = s dy B from the bf16 dy, written beside it, A's rows
  //             appended to the dequantized weight: one product with n + r; dB += s dy^T z and
  //             dA += dz^T x from the same bf16 copies.
  // So the adapter costs no extra pass over y or dx and reads bf16 copies made anyway.
  void QLinearLoraForward(const QMatrix& w, const float* x, const float* a, const float* b, float* z, float* y, int64_t m, int64_t r,
                          float scale) override {
    const int64_t n = w.rows, k = w.cols, kr = k + r;
    if (m < kMinRowsWhole || n * k > kWholeWeightFloats) return Backend::QLinearLoraForward(w, x, a, b, z, y, m, r, scale);
    Bf16Copies& copies = ThreadBf16Copies();
    std::vector<uint16_t> &wbuf = copies.weight, &xbuf = copies.rows, &abuf = copies.small;
    wbuf.resize(static_cast<size_t>(n * kr));
    xbuf.resize(static_cast<size_t>(m * kr));
    abuf.resize(static_cast<size_t>(r * k));
    uint16_t *wb = wbuf.data(), *xb = xbuf.data(), *ab = abuf.data();
    ToBf16(a, ab, r * k);
    DefaultPool().ParallelFor(n, 32, [&](int64_t r0, int64_t r1, int) {  // [W | s B]
      std::vector<float> row(static_cast<size_t>(std::max(k, r)));
      for (int64_t i = r0; i < r1; ++i) {
        DequantizeRowFast(w.type, w.row(i), row.data(), k);
        ToBf16(row.data(), wb + i * kr, k);
        for (int64_t j = 0; j < r; ++j) row[static_cast<size_t>(j)] = scale * b[i * r + j];
        ToBf16(row.data(), wb + i * kr + k, r);
      }
    });
    SplitRows(m, [&](int64_t r0, int64_t r1) {  // [x | z], z = x A^T
      for (int64_t i = r0; i < r1; ++i) ToBf16(x + i * k, xb + i * kr, k);
      Bf16GemmOnThread(false, true, r1 - r0, r, k, 1.0f, xb + r0 * kr, kr, ab, k, false, z + r0 * r, r);
      for (int64_t i = r0; i < r1; ++i) ToBf16(z + i * r, xb + i * kr + k, r);
    });
    SplitRows(m, [&](int64_t r0, int64_t r1) {
      Bf16GemmOnThread(false, true, r1 - r0, n, kr, 1.0f, xb + r0 * kr, kr, wb, kr, false, y + r0 * n, n);
    });
  }
  void QLinearLoraBackward(const QMatrix& w, const float* x, const float* a, const float* b, const float* z, const float* dy, float* da,
                           float* db, float* dx, int64_t m, int64_t r, float scale) override {
    const int64_t n = w.rows, k = w.cols, nr = n + r;
    if (m < kMinRowsWhole || n * k > kWholeWeightFloats) return Backend::QLinearLoraBackward(w, x, a, b, z, dy, da, db, dx, m, r, scale);
    // bbuf is done with before zbuf is first needed: one slot; xbuf (dA's x) beside dybuf.
    Bf16Copies& copies = ThreadBf16Copies();
    std::vector<uint16_t> &wbuf = copies.weight, &dybuf = copies.rows, &bbuf = copies.small, &zbuf = copies.small, &xbuf = copies.rows2;
    std::vector<float>& dzbuf = copies.f;
    wbuf.resize(static_cast<size_t>(nr * k));
    dybuf.resize(static_cast<size_t>(m * nr));
    bbuf.resize(static_cast<size_t>(n * r));
    dzbuf.resize(static_cast<size_t>(m * r));
    uint16_t *wb = wbuf.data(), *dyb = dybuf.data(), *bb = bbuf.data();
    float* dz = dzbuf.data();
    ToBf16(b, bb, n * r);
    DefaultPool().ParallelFor(nr, 32, [&](int64_t r0, int64_t r1, int) {  // [W ; A]
      std::vector<float> row(static_cast<size_t>(k));
      for (int64_t i = r0; i < r1; ++i) {
        if (i < n) {
          DequantizeRowFast(w.type, w.row(i), row.data(), k);
          ToBf16(row.data(), wb + i * k, k);
        } else {
          ToBf16(a + (i - n) * k, wb + i * k, k);
        }
      }
    });
    SplitRows(m, [&](int64_t r0, int64_t r1) {  // [dy | dz], dz = s dy B
      for (int64_t i = r0; i < r1; ++i) ToBf16(dy + i * n, dyb + i * nr, n);
      Bf16GemmOnThread(false, false, r1 - r0, r, n, scale, dyb + r0 * nr, nr, bb, r, false, dz + r0 * r, r);
      for (int64_t i = r0; i < r1; ++i) ToBf16(dz + i * r, dyb + i * nr + n, r);
    });
    SplitRows(m, [&](int64_t r0, int64_t r1) {  // dx += [dy | dz] [W ; A]
      Bf16GemmOnThread(false, false, r1 - r0, k, nr, 1.0f, dyb + r0 * nr, nr, wb, k, true, dx + r0 * k, k);
    });
    // The weight gradients reduce over the m rows: z^T and dz^T (r x m, small) are copied out
    // transposed so that both products take plain row-major operands (oneDNN's brgemm; with a
    // transposed A it falls back to a slower gemm, which also refused some shapes).
    if (db != nullptr || da != nullptr) zbuf.resize(static_cast<size_t>(r * m));
    if (db != nullptr) {  // dB += s (z^T dy)^T
      uint16_t* zt = zbuf.data();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < r; ++j) zt[j * m + i] = Fp32ToBf16(z[i * r + j]);
      DefaultPool().ParallelFor(n, 64, [&](int64_t o0, int64_t o1, int) {
        thread_local std::vector<float> t;
        t.resize(static_cast<size_t>(r * (o1 - o0)));
        Bf16GemmOnThread(false, false, r, o1 - o0, m, scale, zt, m, dyb + o0, nr, false, t.data(), o1 - o0);
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t j = 0; j < r; ++j) db[o * r + j] += t[static_cast<size_t>(j * (o1 - o0) + (o - o0))];
      });
    }
    if (da != nullptr) {  // dA += dz^T x
      uint16_t* dzt = zbuf.data();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < r; ++j) dzt[j * m + i] = dyb[i * nr + n + j];
      const uint16_t* xb = ToBf16Pooled(x, m * k, &xbuf);
      DefaultPool().ParallelFor(k, 64, [&](int64_t c0, int64_t c1, int) {
        Bf16GemmOnThread(false, false, r, c1 - c0, m, 1.0f, dzt, m, xb + c0, k, true, da + c0, k);
      });
    }
  }

 private:
  static constexpr int64_t kMaxOutputValues = int64_t{256} << 20;  // 512 MB as bf16
  static const uint16_t* OutputBf16(const QMatrix& w) { return DequantizeBf16(w, &ThreadBf16Copies().output); }
  // Buffers of the calling thread (callers on several threads never share one).
  static const uint16_t* WeightBf16(const QMatrix& w) { return DequantizeBf16(w, &ThreadBf16Copies().weight); }
  static const uint16_t* DequantizeBf16(const QMatrix& w, std::vector<uint16_t>* buf) {
    buf->resize(static_cast<size_t>(w.rows * w.cols));
    uint16_t* out = buf->data();
    DefaultPool().ParallelFor(w.rows, 32, [&](int64_t r0, int64_t r1, int) {
      std::vector<float> row(static_cast<size_t>(w.cols));
      for (int64_t r = r0; r < r1; ++r) {
        DequantizeRowFast(w.type, w.row(r), row.data(), w.cols);
        ToBf16(row.data(), out + r * w.cols, w.cols);
      }
    });
    return out;
  }
  // Rows [0, m) in one slice per pool thread (as the weight products split them).
  template <typename F>
  static void SplitRows(int64_t m, const F& f) {
    ThreadPool& pool = DefaultPool();
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.size(), m / 16));
    pool.ParallelFor(parts, 1, [&](int64_t p0, int64_t p1, int) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t r0 = m * p / parts, r1 = m * (p + 1) / parts;
        if (r1 > r0) f(r0, r1);
      }
    });
  }
  static const uint16_t* ActivationsBf16(const float* x, int64_t n) { return ToBf16Pooled(x, n, &ThreadBf16Copies().rows); }
  std::string name_;
};

// Sends each op to `primary` when it supports it, else to `fallback`, saying so once per op.
class Dispatching final : public Backend {
 public:
  Dispatching(Backend* primary, Backend* fallback) : primary_(primary), fallback_(fallback) {
    name_ = primary_->Name();
  }
  const char* Name() const override { return name_.c_str(); }
  std::string Describe() const override { return primary_->Describe(); }
  bool HostMemoryBuffers() const override { return primary_->HostMemoryBuffers(); }
  int64_t PeakDeviceBytes() const override { return primary_->PeakDeviceBytes(); }
  int64_t LiveDeviceBytes() const override { return primary_->LiveDeviceBytes(); }
  void ResetPeakDeviceBytes() override { primary_->ResetPeakDeviceBytes(); }
  void ReleaseDeviceCaches() override { primary_->ReleaseDeviceCaches(); }
  int64_t DeviceMemoryBytes() const override { return primary_->DeviceMemoryBytes(); }
  int64_t DeviceLogitsChunkBytes() const override { return primary_->DeviceLogitsChunkBytes(); }
  void Wait() override { primary_->Wait(); }
  bool Supports(Op op) const override { return primary_->Supports(op) || fallback_->Supports(op); }
  void QLinearForward(const QMatrix& w, const float* x, float* y, int64_t m) override {
    Pick(Op::kQLinearForward).QLinearForward(w, x, y, m);
  }
  void QLinearBackward(const QMatrix& w, const float* dy, float* dx, int64_t m) override {
    Pick(Op::kQLinearBackward).QLinearBackward(w, dy, dx, m);
  }
  void RmsNormForward(const float* x, const float* g, float* y, float* rstd, int64_t rows, int64_t n, float eps) override {
    Pick(Op::kRmsNormForward).RmsNormForward(x, g, y, rstd, rows, n, eps);
  }
  void RmsNormBackward(const float* x, const float* g, const float* rstd, const float* dy, float* dx, int64_t rows,
                       int64_t n) override {
    Pick(Op::kRmsNormBackward).RmsNormBackward(x, g, rstd, dy, dx, rows, n);
  }
  void RopeForward(float* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                   float base, const float* ff) override {
    Pick(Op::kRopeForward).RopeForward(x, pos, rows, heads, head_dim, rot_dim, base, ff);
  }
  void RopeBackward(float* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim,
                    float base, const float* ff) override {
    Pick(Op::kRopeBackward).RopeBackward(dx, pos, rows, heads, head_dim, rot_dim, base, ff);
  }
  void AttentionForward(const float* q, const float* k, const float* v, float* out, int64_t n_seq, int64_t len,
                        int64_t n_head, int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window) override {
    Pick(Op::kAttentionForward).AttentionForward(q, k, v, out, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, softcap, window);
  }
  void AttentionBackward(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk,
                         float* dv, int64_t n_seq, int64_t len, int64_t n_head, int64_t n_head_kv,
                         int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window) override {
    Pick(Op::kAttentionBackward).AttentionBackward(q, k, v, dout, dq, dk, dv, n_seq, len, n_head, n_head_kv, head_dim, seg_pos, softcap, window);
  }
  void SwiGluForward(const float* gate, const float* up, float* out, int64_t n) override {
    Pick(Op::kSwiGluForward).SwiGluForward(gate, up, out, n);
  }
  void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup,
                      int64_t n) override {
    Pick(Op::kSwiGluBackward).SwiGluBackward(gate, up, dout, dgate, dup, n);
  }
  double CrossEntropy(const QMatrix& w_out, const float* h, const int32_t* target, int64_t rows, float* dh,
                      float grad_scale, float softcap) override {
    return Pick(Op::kCrossEntropy).CrossEntropy(w_out, h, target, rows, dh, grad_scale, softcap);
  }
  void AdamW(float* p, float* g, float* m, float* v, float* fisher, int64_t n, const AdamWStep& s) override {
    Pick(Op::kAdamW).AdamW(p, g, m, v, fisher, n, s);
  }
  void LoraForward(const float* x, const float* a, const float* b, float* z, float* y, int64_t m, int64_t in,
                   int64_t r, int64_t out, float scale) override {
    Pick(Op::kLoraForward).LoraForward(x, a, b, z, y, m, in, r, out, scale);
  }
  void LoraBackward(const float* x, const float* a, const float* b, const float* z, const float* dy, float* da,
                    float* db, float* dx, int64_t m, int64_t in, int64_t r, int64_t out, float scale) override {
    Pick(Op::kLoraBackward).LoraBackward(x, a, b, z, dy, da, db, dx, m, in, r, out, scale);
  }
  void QLinearLoraForward(const QMatrix& w, const float* x, const float* a, const float* b, float* z, float* y, int64_t m, int64_t r,
                          float scale) override {
    if (primary_->Supports(Op::kQLinearForward) && primary_->Supports(Op::kLoraForward)) return primary_->QLinearLoraForward(w, x, a, b, z, y, m, r, scale);
    Backend::QLinearLoraForward(w, x, a, b, z, y, m, r, scale);
  }
  void QLinearLoraBackward(const QMatrix& w, const float* x, const float* a, const float* b, const float* z, const float* dy, float* da,
                           float* db, float* dx, int64_t m, int64_t r, float scale) override {
    if (primary_->Supports(Op::kQLinearBackward) && primary_->Supports(Op::kLoraBackward))
      return primary_->QLinearLoraBackward(w, x, a, b, z, dy, da, db, dx, m, r, scale);
    Backend::QLinearLoraBackward(w, x, a, b, z, dy, da, db, dx, m, r, scale);
  }
  void DiabloForward(const float* x, const float* d, float* y, int64_t m, int64_t in, int64_t out,
                     int64_t blocks) override {
    Pick(Op::kDiabloForward).DiabloForward(x, d, y, m, in, out, blocks);
  }
  void DiabloBackward(const float* x, const float* d, const float* dy, float* dd, float* dx, int64_t m, int64_t in,
                      int64_t out, int64_t blocks) override {
    Pick(Op::kDiabloBackward).DiabloBackward(x, d, dy, dd, dx, m, in, out, blocks);
  }
  void DropoutScale(uint64_t key, int64_t row0, int64_t rows, int64_t cols, float p, float* out) override {
    Pick(Op::kDropoutScale).DropoutScale(key, row0, rows, cols, p, out);
  }
  void EmbedRows(const QMatrix& table, const int32_t* ids, int64_t n, float* out) override {
    Pick(Op::kEmbedRows).EmbedRows(table, ids, n, out);
  }

  float* AllocBuffer(int64_t n) override { return primary_->AllocBuffer(n); }
  void FreeBuffer(float* p) override { primary_->FreeBuffer(p); }
  void Add(const float* a, const float* b, float* out, int64_t n) override { primary_->Add(a, b, out, n); }
  void Mul(const float* a, const float* b, float* out, int64_t n) override { primary_->Mul(a, b, out, n); }
  void Copy(const float* src, float* dst, int64_t n) override { primary_->Copy(src, dst, n); }
  void Fill(float* dst, float value, int64_t n) override { primary_->Fill(dst, value, n); }
  void AddRowVector(float* y, const float* v, int64_t rows, int64_t n) override { primary_->AddRowVector(y, v, rows, n); }
  void Scale(float* x, float s, int64_t n) override { primary_->Scale(x, s, n); }
  void GegluForward(const float* gate, const float* up, float* out, int64_t n) override {
    Pick(Op::kGegluForward).GegluForward(gate, up, out, n);
  }
  void GegluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) override {
    Pick(Op::kGegluBackward).GegluBackward(gate, up, dout, dgate, dup, n);
  }

 private:
  Backend& Pick(Op op) {
    if (primary_->Supports(op)) return *primary_;
    auto& warned = warned_[static_cast<size_t>(op)];
    if (!warned.exchange(true)) {
      FT_LOG_WARN("kernel backend {} has no {}: using {}", primary_->Name(), OpName(op), fallback_->Name());
    }
    // The fallback reads and writes buffers on the host: the primary's queued work first.
    primary_->Wait();
    return *fallback_;
  }
  Backend* primary_;
  Backend* fallback_;
  std::string name_;
  std::array<std::atomic<bool>, static_cast<size_t>(Op::kCount)> warned_{};
};

// The CUDA backend is created once and never destroyed: the module is never unloaded, and
// destroying it at exit could run after cudart/cuBLAS have torn themselves down.
struct CudaState {
  std::once_flag once;
  Backend* backend = nullptr;
  std::string why_not;
};
CudaState& Cuda() {
  static CudaState s;
  std::call_once(s.once, [] {
#ifdef FEDTUNE_HAVE_CUDA
    // $FEDTUNE_CUDA_MODULE, else the module of the build tree that made this binary while that
    // exists, else the installed one (the fedtune-cuda package).
    const char* env = std::getenv("FEDTUNE_CUDA_MODULE");
    std::string path = env != nullptr && *env != '\0' ? env : FEDTUNE_CUDA_MODULE;
    std::error_code ec;  // (not throwing: the build tree may be unreadable to a service's user)
    if ((env == nullptr || *env == '\0') && !std::filesystem::exists(path, ec)) {
      // installed: <bindir>/../<libdir>/fedtune/ (packaging/CMakeLists.txt)
      const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
      if (!ec) path = (exe.parent_path() / FEDTUNE_CUDA_MODULE_INSTALLED).lexically_normal().string();
    }
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* err = dlerror();
      s.why_not = absl::StrCat("cannot load the CUDA module ", path, ": ", err != nullptr ? err : "unknown error");
      return;
    }
    using Make = Backend* (*)(std::string*);
    auto make = reinterpret_cast<Make>(dlsym(h, "fedtune_make_cuda_backend"));
    if (make == nullptr) {
      s.why_not = absl::StrCat(path, " has no fedtune_make_cuda_backend");
      return;
    }
    s.backend = make(&s.why_not);  // the module stays loaded for the process's life
#else
    s.backend = nullptr;
    s.why_not = "this build has no CUDA backend (nvcc was not found or FEDTUNE_CUDA=OFF)";
#endif
  });
  return s;
}

}  // namespace

void ReleaseThreadCaches() {
  ThreadPool& pool = DefaultPool();
  // One chunk per thread (ParallelFor gives chunk i to thread i).
  pool.ParallelFor(pool.size(), 1, [](int64_t, int64_t, int) {
    Bf16Copies released;
    std::swap(released, ThreadBf16Copies());
    ReleaseBf16GemmThreadState();
  });
}

Backend& CpuReferenceBackend() {
  static CpuReference b;
  return b;
}
Backend& CpuFastBackend() {
  static CpuFast b;
  return b;
}
Backend* CpuBf16Backend() {
  static CpuBf16* b = ProcessCpuIsa() >= CpuIsa::kAvx512Bf16 && Bf16GemmBuilt() ? new CpuBf16(ProcessCpuIsa()) : nullptr;
  return b;
}
bool IsCpuBf16Name(std::string_view name) { return name.rfind("cpu-bf16", 0) == 0; }
bool IsCpuBf16(const Backend* b) { return b != nullptr && IsCpuBf16Name(b->Name()); }
Backend& BestCpuBackend() {
  if (Backend* b = CpuBf16Backend()) return *b;
  return CpuFastBackend();
}
std::string CpuBf16UnavailableReason() {
  if (!Bf16GemmBuilt()) return "built without oneDNN (apt-get install libdnnl-dev, then reconfigure)";
  if (ProcessCpuIsa() < CpuIsa::kAvx512Bf16)
    return absl::StrCat("this CPU has no bf16 unit (", DescribeCpuFeatures(DetectedCpuFeatures()), "; path ", CpuIsaName(ProcessCpuIsa()),
                        ", FEDTUNE_CPU_ISA may cap it)");
  return "";
}
Backend* CudaBackend() { return Cuda().backend; }
std::string CudaUnavailableReason() { return Cuda().why_not; }

absl::StatusOr<Backend*> SelectBackend(std::string_view device) {
  if (device == "cpu") return &BestCpuBackend();
  if (device == "cpu-fast") return &CpuFastBackend();
  if (device == "cpu-ref") return &CpuReferenceBackend();
  if (device == "cpu-bf16") {
    if (Backend* b = CpuBf16Backend()) return b;
    return absl::FailedPreconditionError(absl::StrCat("--device cpu-bf16: ", CpuBf16UnavailableReason()));
  }
  if (device == "cuda" || device == "auto") {
    Backend* cuda = CudaBackend();
    if (cuda == nullptr) {
      if (device == "cuda") return absl::FailedPreconditionError(absl::StrCat("--device cuda: ", CudaUnavailableReason()));
      return &BestCpuBackend();
    }
    static Dispatching dispatching(cuda, &CpuFastBackend());
    return &dispatching;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown device '", std::string(device), "' (cpu, cpu-fast, cpu-bf16, cpu-ref, cuda or auto)"));
}

}  // namespace fedtune::kernels

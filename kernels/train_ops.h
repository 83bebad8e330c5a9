// Training ops: forward pieces that keep what backward needs, and their backward passes, on
// float (training) and double (finite-difference gradient checks). Reference implementations:
// plain loops for element-wise ops, BLAS GEMM for products. Invariant: backward functions
// ACCUMULATE (+=) into input gradients unless the name says Set, so branches that share an
// input (q/k/v from one norm, the residual stream) add up without temporaries.
#pragma once

#include <cstdint>
#include <functional>

#include "kernels/ops.h"

namespace fedtune::kernels {

// C = alpha * op(A) op(B) + beta * C, row-major, on float or double (OpenBLAS s/dgemm).
template <typename T>
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// y[m, n] = x[m, k] W^T with W frozen in its block format (dequantized tile by tile).
template <typename T>
void QLinearForward(const QMatrix& w, const T* x, T* y, int64_t m);
// dx[m, k] += dy[m, n] W.  Gradients never flow into W.
template <typename T>
void QLinearBackward(const QMatrix& w, const T* dy, T* dx, int64_t m);

// y = x * rstd * g per row; rstd[r] = 1/sqrt(mean(x^2)+eps) is saved for backward.
template <typename T>
void RmsNormForward(const T* x, const float* g, T* y, T* rstd, int64_t rows, int64_t n, float eps);
// dx += d/dx of the above (g frozen).
template <typename T>
void RmsNormBackward(const T* x, const float* g, const T* rstd, const T* dy, T* dx, int64_t rows, int64_t n);

// Adjacent-pair RoPE on rows of `heads * head_dim` at positions pos[row] (forward), and its
// transpose (rotation by -theta) applied in place to a gradient (backward).
template <typename T>
void RopeForward(T* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim, float base,
                 const float* freq_factors = nullptr);
template <typename T>
void RopeBackward(T* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim, float base,
                  const float* freq_factors = nullptr);

// Causal GQA attention over `n_seq` independent sequences of `len` tokens each (rows of q are
// n_head*head_dim wide, k/v n_head_kv*head_dim). Backward recomputes the probabilities from
// q and k (FlashAttention-style: nothing of size len^2 is kept between the passes) and adds
// into dq, dk, dv.
// seg_pos (packed rows; may be null): the position of each of the n_seq * len tokens within
// its example; token i then attends to keys i - seg_pos[i] .. i only.
// fast_exp (float only, AVX2 CPUs): softmax exponentials by the vectorised e^x of
// kernels/fast_ops.h instead of double std::exp (the cpu-fast backend).
// softcap > 0 (Gemma 2's attn_logit_softcapping): scores s = q.k / sqrt(head_dim) become
// softcap * tanh(s / softcap) before the softmax; the backward pass goes through the cap.
// window > 0 (sliding-window layers): token i attends to keys i - window + 1 .. i only (as
// transformers and llama.cpp: a key `window` or more positions back is masked).
template <typename T>
void AttentionForward(const T* q, const T* k, const T* v, T* out, int64_t n_seq, int64_t len, int64_t n_head,
                      int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos = nullptr, bool fast_exp = false,
                      float softcap = 0.0f, int64_t window = 0);
template <typename T>
void AttentionBackward(const T* q, const T* k, const T* v, const T* dout, T* dq, T* dk, T* dv, int64_t n_seq,
                       int64_t len, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                       const int32_t* seg_pos = nullptr, bool fast_exp = false, float softcap = 0.0f, int64_t window = 0);

// The same attention with its four products in bf16 with fp32 accumulation (cpu-bf16; needs
// kernels/bf16_gemm.h's oneDNN and an AVX2 CPU): q, k, v and dout converted once per call, the
// probabilities and dS per block of 64 query rows; the softmax and dS themselves in fp32, as
// the f32 fast path computes them.
void AttentionForwardBf16(const float* q, const float* k, const float* v, float* out, int64_t n_seq, int64_t len, int64_t n_head,
                          int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window);
void AttentionBackwardBf16(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk, float* dv, int64_t n_seq,
                           int64_t len, int64_t n_head, int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap,
                           int64_t window);

// out = silu(gate) * up;  backward adds into dgate, dup.
template <typename T>
void SwiGluForward(const T* gate, const T* up, T* out, int64_t n);
// GeGLU with the tanh approximation of GELU (Gemma's gelu_pytorch_tanh): out = gelu(gate) * up;
// the backward accumulates into dgate and dup.
template <typename T>
void GegluForward(const T* gate, const T* up, T* out, int64_t n);
template <typename T>
void GegluBackward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n);
template <typename T>
void SwiGluBackward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n);

// Causal-LM cross-entropy over the vocabulary without materialising all logits: rows of h
// (final hidden states, already normalised) are processed in chunks of `chunk` rows; row r is
// scored against target[r] when target[r] >= 0 (masked otherwise). Returns the summed NLL over
// scored rows; dh (if not null) receives d(sum NLL * grad_scale)/dh. The output projection is
// frozen.
// fast (float only): rows of a chunk in parallel, vectorised exponentials.
// softcap > 0 (Gemma 2's final_logit_softcapping): logits z become softcap * tanh(z / softcap).
template <typename T>
double CrossEntropyChunked(const QMatrix& w_out, const T* h, const int32_t* target, int64_t rows, T* dh,
                           T grad_scale, int64_t chunk = 256, bool fast = false, float softcap = 0.0f);
// The same (float, fast) with the two products against the V x E output matrix supplied by the
// caller (the bf16 backend): forward(x, y, n): y[n, V] = x[n, E] W^T; backward(dy, dx, n):
// dx[n, E] += dy[n, V] W, where dy is the chunk's scratch (the callee may overwrite it).
double CrossEntropyChunkedWith(int64_t V, int64_t E, const float* h, const int32_t* target, int64_t rows, float* dh, float grad_scale,
                               int64_t chunk, float softcap, const std::function<void(const float*, float*, int64_t)>& forward,
                               const std::function<void(float*, float*, int64_t)>& backward);

// LoRA on one module: z[m,r] = x A^T (A: r x in); y[m,out] += s z B^T (B: out x r).
template <typename T>
void LoraForward(const T* x, const T* a, const T* b, T* z, T* y, int64_t m, int64_t in, int64_t r, int64_t out, T s);
// dB += s dy^T z ; dz = s dy B ; dA += dz^T x ; dx += dz A  (da / db null: frozen)
template <typename T>
void LoraBackward(const T* x, const T* a, const T* b, const T* z, const T* dy, T* da, T* db, T* dx, int64_t m,
                  int64_t in, int64_t r, int64_t out, T s);
// DiaBlo: D holds `blocks` blocks of b_in x b_out (b_in = ceil(in/blocks), b_out = ceil(out/blocks));
// block i maps input columns [i b_in, ...) to output columns [i b_out, ...), cropped at the
// edges. y += x blockdiag(D); backward: dD_i += x_i^T dy_i (dd null: frozen), dx_i += dy_i D_i^T.
template <typename T>
void DiabloForward(const T* x, const T* d, T* y, int64_t m, int64_t in, int64_t out, int64_t blocks);
template <typename T>
void DiabloBackward(const T* x, const T* d, const T* dy, T* dd, T* dx, int64_t m, int64_t in, int64_t out,
                    int64_t blocks);

// Inverted-dropout multipliers: out[i, j] = 1/(1-p) where the mask keyed `key` keeps element
// (row0 + i, j) (common/rng.h DropoutKeeps), else 0; rows x cols.
template <typename T>
void DropoutScale(uint64_t key, int64_t row0, int64_t rows, int64_t cols, float p, T* out);

// out[i, :] = row ids[i] of `table` dequantized (GetRow), for i < n.
template <typename T>
void EmbedRows(const QMatrix& table, const int32_t* ids, int64_t n, T* out);

}  // namespace fedtune::kernels

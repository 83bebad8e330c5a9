// CPU ops for the decoder forward. Plain loops where the loop is the specification; the
// quantized matmul dequantizes tiles of weight rows into cache-sized buffers and hands them to
// the f32 GEMM (kernels/gemm.h), or, for a single token, fuses dequantization into the dot
// product. The fast-kernels work (SIMD, AMX, CUDA) is measured against these.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/quant.h"

namespace fedtune::kernels {

// A 2-D weight stored row-major in a ggml block format: `rows` output features, each row `cols`
// input values (GGUF ne = [cols, rows]). Not owning.
struct QMatrix {
  GgmlType type = GgmlType::kF32;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;
  const uint8_t* row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
};

// y[m, n] = sum_k x[m, k] * w[n, k]   (x: M x K row-major f32, y: M x N row-major f32), for
// inference. f32: fused dequantize-dot for one row, dequantized tiles + SGEMM for more (exact
// w.r.t. the dequantized weights). int8_activations (decoding for generation, asked for by
// LlamaContext::set_int8_activations): up to kInt8Rows rows with Q4_0 / Q4_1 / Q8_0 weights on
// an AVX2 CPU take the 8-bit-activation integer dots (vec_dot.h, as llama.cpp decodes), and each
// row's result is the same whatever m (a sequence decoded alone or beside others gets the same
// products); other types, more rows or other CPUs stay f32.
void MatMulQ(const QMatrix& w, const float* x, float* y, int64_t m, bool int8_activations = false);
inline constexpr int64_t kInt8Rows = 16;
// Whether generation decodes with 8-bit activations by default: yes unless the environment says
// FEDTUNE_DECODE_ACTIVATIONS=f32 (read once, at the first call).
bool Int8DecodingDefault();

// Dequantizes one row of w into out (w.cols floats), e.g. an embedding lookup.
void GetRow(const QMatrix& w, int64_t r, float* out);
// Every row of w, dequantized (rows x cols floats).
std::vector<float> DequantizeMatrix(const QMatrix& w);

// y = x / sqrt(mean(x^2) + eps) * weight, per row of n values; rows may alias (x == y).
void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t n, float eps);

// Rotary embedding on `heads` heads of size head_dim at absolute position pos, rotating
// adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/rot_dim): the GGUF/llama.cpp layout
// (llama.cpp's converter permuted Q/K rows so this equals HF's rotate_half on HF weights).
// Angle of pair i at position pos: pos * base^(-2i/rot_dim) / freq_factors[i] (in double).
inline double RopeAngle(double pos, int64_t i, int64_t rot_dim, float base, const float* freq_factors) {
  const double t = pos * std::pow(static_cast<double>(base), -2.0 * static_cast<double>(i) / static_cast<double>(rot_dim));
  return freq_factors != nullptr ? t / static_cast<double>(freq_factors[i]) : t;
}

// freq_factors (rot_dim / 2 values, may be null): pair i's angle is divided by freq_factors[i]
// (Llama 3 / linear RoPE scaling; llama.cpp's rope_freqs tensor).
void RopeAdjacent(float* x, int64_t heads, int64_t head_dim, int64_t rot_dim, int64_t pos,
                  float base, const float* freq_factors = nullptr);

// Causal grouped-query attention for n_tokens new queries at positions n_past.. over a cache
// holding n_past + n_tokens keys/values; query head h reads KV head h / (n_head / n_head_kv).
// Rows of q/out are n_head * head_dim apart by their strides; cache rows by kv_stride.
// softcap > 0 (Gemma 2): scores s become softcap * tanh(s / softcap) before the softmax.
// window > 0 (sliding-window layers): the query at position p sees keys p - window + 1 .. p.
void CausalAttention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                     int64_t kv_stride, float* out, int64_t out_stride, int64_t n_tokens, int64_t n_past,
                     int64_t n_head, int64_t n_head_kv, int64_t head_dim, float softcap = 0.0f, int64_t window = 0);

// x <- softcap * tanh(x / softcap) over n values (Gemma 2's final-logit soft-capping).
void SoftCap(float* x, int64_t n, float softcap);

// In-place softmax over n values.
void Softmax(float* x, int64_t n);

// out[i] = silu(gate[i]) * up[i]
void SwiGlu(const float* gate, const float* up, float* out, int64_t n);
// out = gelu_tanh(gate) * up (Gemma); out may alias gate.
void GeGlu(const float* gate, const float* up, float* out, int64_t n);

}  // namespace fedtune::kernels

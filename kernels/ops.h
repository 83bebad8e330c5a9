// CPU reference ops for the decoder forward. Plain loops where the loop is the specification;
// the quantized matmul dequantizes tiles of weight rows into cache-sized buffers and hands them
// to Eigen's GEMM. Fast SIMD and CUDA backends (kernels issue) must match these.
#pragma once

#include <cstdint>

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

// y[m, n] = sum_k x[m, k] * w[n, k]   (x: M x K row-major f32, y: M x N row-major f32)
void MatMulQ(const QMatrix& w, const float* x, float* y, int64_t m);

// Dequantizes one row of w into out (w.cols floats), e.g. an embedding lookup.
void GetRow(const QMatrix& w, int64_t r, float* out);

// y = x / sqrt(mean(x^2) + eps) * weight, per row of n values; rows may alias (x == y).
void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t n, float eps);

// Rotary embedding on `heads` heads of size head_dim at absolute position pos, rotating
// adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/rot_dim): the GGUF/llama.cpp layout
// (llama.cpp's converter permuted Q/K rows so this equals HF's rotate_half on HF weights).
void RopeAdjacent(float* x, int64_t heads, int64_t head_dim, int64_t rot_dim, int64_t pos,
                  float base);

// In-place softmax over n values.
void Softmax(float* x, int64_t n);

// out[i] = silu(gate[i]) * up[i]
void SwiGlu(const float* gate, const float* up, float* out, int64_t n);

}  // namespace fedtune::kernels

#include "kernels/ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/log.h"
#include "kernels/gemm.h"
#include "kernels/thread_pool.h"
#include "kernels/vec_dot.h"

namespace fedtune::kernels {

void GetRow(const QMatrix& w, int64_t r, float* out) {
  FT_CHECK(r >= 0 && r < w.rows);
  DequantizeRow(w.type, w.row(r), out, w.cols);
}

std::vector<float> DequantizeMatrix(const QMatrix& w) {
  std::vector<float> out(static_cast<size_t>(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r) GetRow(w, r, out.data() + r * w.cols);
  return out;
}

namespace {
// FEDTUNE_DECODE_ACTIVATIONS=f32 turns the 8-bit activations off for the process (e.g. to
// reproduce figures decoded before they existed); int8 or unset: on.
bool Int8DecodingFromEnv() {
  const char* env = std::getenv("FEDTUNE_DECODE_ACTIVATIONS");
  const std::string v = env != nullptr ? env : "";
  if (v.empty() || v == "int8") return true;
  if (v == "f32") return false;
  FT_LOG_WARN("FEDTUNE_DECODE_ACTIVATIONS: unknown value '{}' (int8, f32); decoding with int8 activations", v);
  return true;
}
}  // namespace

bool Int8DecodingDefault() {
  static const bool on = Int8DecodingFromEnv();  // (thread-safe initialisation, after logging is set up)
  return on;
}

void MatMulQ(const QMatrix& w, const float* x, float* y, int64_t m, bool int8_activations) {
  const int64_t k = w.cols, n = w.rows;
  if (int8_activations && m <= kInt8Rows && k % 32 == 0) {
    if (const VecDotQ8Fn dot = GetVecDotQ8(w.type)) {
      // Activations quantized once (the caller's buffer: no allocation per token once grown);
      // each weight row is dotted with every activation row while it sits in L1.
      thread_local std::vector<Q8Block> xq;
      const int64_t nb = k / 32;
      xq.resize(static_cast<size_t>(m * nb));
      for (int64_t i = 0; i < m; ++i) QuantizeRowQ8(x + i * k, xq.data() + i * nb, k);
      const Q8Block* xs = xq.data();
      DefaultPool().ParallelFor(n, std::max<int64_t>(8, 64 / m), [&](int64_t r0, int64_t r1, int) {
        for (int64_t r = r0; r < r1; ++r) dot(w.row(r), xs, k, m, y + r, n);
      });
      return;
    }
  }
  if (m == 1) {  // generation: fused dequantize-dot, parallel over output rows
    DefaultPool().ParallelFor(n, 64, [&](int64_t r0, int64_t r1, int) { GemvQ(w, r0, r1, x, y); });
    return;
  }
  // Tile of weight rows dequantized at once (WeightTileRows), then a GEMM
  // y[:, tile] = x * tile^T. The dequantization cost is amortised over the m tokens.
  const int64_t tile = WeightTileRows(n, k, DefaultPool().size());
  const int64_t n_tiles = (n + tile - 1) / tile;
  DefaultPool().ParallelFor(n_tiles, 1, [&](int64_t t0, int64_t t1, int) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(tile * k));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, nr = std::min(tile, n - r0);
      for (int64_t r = 0; r < nr; ++r) DequantizeRowFast(w.type, w.row(r0 + r), buf.data() + r * k, k);
      Sgemm(/*trans_b=*/true, m, nr, k, x, k, buf.data(), k, 0.0f, y + r0, n);
    }
  });
}

void CausalAttention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                     int64_t kv_stride, float* out, int64_t out_stride, int64_t n_tokens, int64_t n_past,
                     int64_t n_head, int64_t n_head_kv, int64_t head_dim, float softcap, int64_t window) {
  const int64_t group = n_head / n_head_kv, n_keys = n_past + n_tokens;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  DefaultPool().ParallelFor(n_head, 1, [&](int64_t h0, int64_t h1, int) {
    thread_local std::vector<float> s;
    s.resize(static_cast<size_t>(n_tokens * n_keys));
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t g = h / group;
      // S = Q_h K_g^T, then causal mask (token t sees keys 0 .. n_past + t) and row softmax.
      Sgemm(true, n_tokens, n_keys, head_dim, q + h * head_dim, q_stride, k_cache + g * head_dim, kv_stride, 0.0f, s.data(), n_keys);
      for (int64_t t = 0; t < n_tokens; ++t) {
        float* row = s.data() + t * n_keys;
        const int64_t visible = n_past + t + 1;
        const int64_t j0 = window > 0 ? std::max<int64_t>(0, visible - window) : 0;  // sliding window: the last `window` keys
        float* vis = row + j0;
        for (int64_t j = 0; j < visible - j0; ++j) vis[j] *= scale;
        if (softcap > 0.0f) SoftCap(vis, visible - j0, softcap);
        Softmax(vis, visible - j0);
        std::fill(row, vis, 0.0f);
        std::fill(row + visible, row + n_keys, 0.0f);
      }
      Sgemm(false, n_tokens, head_dim, n_keys, s.data(), n_keys, v_cache + g * head_dim, kv_stride, 0.0f, out + h * head_dim, out_stride);
    }
  });
}

void SoftCap(float* x, int64_t n, float softcap) {
  for (int64_t i = 0; i < n; ++i) x[i] = softcap * std::tanh(x[i] / softcap);
}

void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float scale = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * scale * weight[i];
  }
}

void RopeAdjacent(float* x, int64_t heads, int64_t head_dim, int64_t rot_dim, int64_t pos,
                  float base, const float* freq_factors) {
  for (int64_t i = 0; i < rot_dim / 2; ++i) {
    const double theta = RopeAngle(static_cast<double>(pos), i, rot_dim, base, freq_factors);
    const float c = static_cast<float>(std::cos(theta)), s = static_cast<float>(std::sin(theta));
    for (int64_t h = 0; h < heads; ++h) {
      float* p = x + h * head_dim + 2 * i;
      const float a = p[0], b = p[1];
      p[0] = a * c - b * s;
      p[1] = a * s + b * c;
    }
  }
}

void Softmax(float* x, int64_t n) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void GeGlu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g))) * up[i];
  }
}

void SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace fedtune::kernels

#include "kernels/ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <Eigen/Core>

#include "kernels/thread_pool.h"

namespace fedtune::kernels {

void GetRow(const QMatrix& w, int64_t r, float* out) {
  FT_CHECK(r >= 0 && r < w.rows);
  DequantizeRow(w.type, w.row(r), out, w.cols);
}

void MatMulQ(const QMatrix& w, const float* x, float* y, int64_t m) {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const int64_t k = w.cols, n = w.rows;
  // Tile of weight rows dequantized at once: ~64 KiB of f32 so it stays in L2.
  const int64_t tile = std::max<int64_t>(8, std::min<int64_t>(256, (16384 / std::max<int64_t>(k, 1)) / 8 * 8));
  const int64_t n_tiles = (n + tile - 1) / tile;
  DefaultPool().ParallelFor(n_tiles, 1, [&](int64_t t0, int64_t t1, int) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(tile * k));
    Eigen::Map<const RowMat> X(x, m, k);
    Eigen::Map<RowMat, 0, Eigen::OuterStride<>> Y(y, m, n, Eigen::OuterStride<>(n));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, nr = std::min(tile, n - r0);
      for (int64_t r = 0; r < nr; ++r) DequantizeRow(w.type, w.row(r0 + r), buf.data() + r * k, k);
      Eigen::Map<const RowMat> W(buf.data(), nr, k);
      if (m == 1) {
        for (int64_t r = 0; r < nr; ++r) {
          float acc = 0.0f;
          const float* wr = buf.data() + r * k;
          for (int64_t i = 0; i < k; ++i) acc += wr[i] * x[i];
          y[r0 + r] = acc;
        }
      } else {
        Y.middleCols(r0, nr).noalias() = X * W.transpose();
      }
    }
  });
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
                  float base) {
  for (int64_t i = 0; i < rot_dim / 2; ++i) {
    const double theta = static_cast<double>(pos) *
                         std::pow(static_cast<double>(base), -2.0 * static_cast<double>(i) / static_cast<double>(rot_dim));
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

void SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace fedtune::kernels

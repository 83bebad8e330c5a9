#include "kernels/train_ops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels/gemm.h"
#include "kernels/thread_pool.h"
#include "kernels/vec_dot.h"

namespace fedtune::kernels {
namespace {

// Dequantizes rows [r0, r0+nr) of w into buf (T).
template <typename T>
void DequantTile(const QMatrix& w, int64_t r0, int64_t nr, std::vector<T>& buf, std::vector<float>& tmp) {
  const int64_t k = w.cols;
  buf.resize(static_cast<size_t>(nr * k));
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t r = 0; r < nr; ++r) DequantizeRowFast(w.type, w.row(r0 + r), buf.data() + r * k, k);
  } else {
    tmp.resize(static_cast<size_t>(k));
    for (int64_t r = 0; r < nr; ++r) {
      DequantizeRow(w.type, w.row(r0 + r), tmp.data(), k);
      std::copy(tmp.begin(), tmp.end(), buf.begin() + r * k);
    }
  }
}



}  // namespace

template <typename T>
void QLinearForward(const QMatrix& w, const T* x, T* y, int64_t m) {
  const int64_t k = w.cols, n = w.rows, tile = WeightTileRows(n, k, DefaultPool().size()), n_tiles = (n + tile - 1) / tile;
  DefaultPool().ParallelFor(n_tiles, 1, [&](int64_t t0, int64_t t1, int) {
    thread_local std::vector<T> buf;
    thread_local std::vector<float> tmp;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, nr = std::min(tile, n - r0);
      DequantTile(w, r0, nr, buf, tmp);
      Gemm<T>(false, true, m, nr, k, T(1), x, k, buf.data(), k, T(0), y + r0, n);
    }
  });
}

template <typename T>
void QLinearBackward(const QMatrix& w, const T* dy, T* dx, int64_t m) {
  const int64_t k = w.cols, n = w.rows, tile = WeightTileRows(n, k, 1);
  // Split the rows of dy/dx across threads (each thread walks all weight tiles) so no two
  // threads add into the same dx row.
  DefaultPool().ParallelFor(m, 8, [&](int64_t m0, int64_t m1, int) {
    thread_local std::vector<T> buf;
    thread_local std::vector<float> tmp;
    for (int64_t r0 = 0; r0 < n; r0 += tile) {
      const int64_t nr = std::min(tile, n - r0);
      DequantTile(w, r0, nr, buf, tmp);
      Gemm<T>(false, false, m1 - m0, k, nr, T(1), dy + m0 * n + r0, n, buf.data(), k, T(1), dx + m0 * k, k);
    }
  });
}

template <typename T>
void RmsNormForward(const T* x, const float* g, T* y, T* rstd, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * static_cast<double>(xr[i]);
    const T s = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(n) + static_cast<double>(eps)));
    rstd[r] = s;
    for (int64_t i = 0; i < n; ++i) y[r * n + i] = xr[i] * s * static_cast<T>(g[i]);
  }
}

template <typename T>
void RmsNormBackward(const T* x, const float* g, const T* rstd, const T* dy, T* dx, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    const T* dyr = dy + r * n;
    const T s = rstd[r];
    double dot = 0.0;
    for (int64_t i = 0; i < n; ++i) dot += static_cast<double>(dyr[i]) * g[i] * static_cast<double>(xr[i]);
    const T c = static_cast<T>(dot * static_cast<double>(s) * static_cast<double>(s) * static_cast<double>(s) / static_cast<double>(n));
    for (int64_t i = 0; i < n; ++i) dx[r * n + i] += s * dyr[i] * static_cast<T>(g[i]) - xr[i] * c;
  }
}

namespace {
template <typename T>
void RopeRotate(T* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim, float base,
                double sign) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < rot_dim / 2; ++i) {
      const double theta = sign * static_cast<double>(pos[r]) *
                           std::pow(static_cast<double>(base), -2.0 * static_cast<double>(i) / static_cast<double>(rot_dim));
      const T c = static_cast<T>(std::cos(theta)), s = static_cast<T>(std::sin(theta));
      for (int64_t h = 0; h < heads; ++h) {
        T* p = x + r * heads * head_dim + h * head_dim + 2 * i;
        const T a = p[0], b = p[1];
        p[0] = a * c - b * s;
        p[1] = a * s + b * c;
      }
    }
  }
}
}  // namespace

template <typename T>
void RopeForward(T* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim, float base) {
  RopeRotate(x, pos, rows, heads, head_dim, rot_dim, base, 1.0);
}

template <typename T>
void RopeBackward(T* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim, float base) {
  RopeRotate(dx, pos, rows, heads, head_dim, rot_dim, base, -1.0);  // rotations are orthogonal
}

namespace {
// P = softmax(scale * Q_h K_g^T) with the causal mask, len x len, for one (sequence, head).
template <typename T>
void CausalProbs(const T* qh, int64_t q_stride, const T* kg, int64_t kv_stride, T* p, int64_t len, int64_t hd) {
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
  Gemm<T>(false, true, len, len, hd, scale, qh, q_stride, kg, kv_stride, T(0), p, len);
  for (int64_t i = 0; i < len; ++i) {
    T* row = p + i * len;
    T mx = row[0];
    for (int64_t j = 1; j <= i; ++j) mx = std::max(mx, row[j]);
    double sum = 0.0;
    for (int64_t j = 0; j <= i; ++j) {
      row[j] = static_cast<T>(std::exp(static_cast<double>(row[j] - mx)));
      sum += static_cast<double>(row[j]);
    }
    const T inv = static_cast<T>(1.0 / sum);
    for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
    for (int64_t j = i + 1; j < len; ++j) row[j] = T(0);
  }
}
}  // namespace

template <typename T>
void AttentionForward(const T* q, const T* k, const T* v, T* out, int64_t n_seq, int64_t len, int64_t n_head,
                      int64_t n_head_kv, int64_t head_dim) {
  const int64_t E = n_head * head_dim, kvd = n_head_kv * head_dim, group = n_head / n_head_kv;
  DefaultPool().ParallelFor(n_seq * n_head, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<T> p;
    p.resize(static_cast<size_t>(len * len));
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t s = idx / n_head, h = idx % n_head, g = h / group;
      const int64_t row0 = s * len;
      CausalProbs(q + row0 * E + h * head_dim, E, k + row0 * kvd + g * head_dim, kvd, p.data(), len, head_dim);
      Gemm<T>(false, false, len, head_dim, len, T(1), p.data(), len, v + row0 * kvd + g * head_dim, kvd, T(0),
              out + row0 * E + h * head_dim, E);
    }
  });
}

template <typename T>
void AttentionBackward(const T* q, const T* k, const T* v, const T* dout, T* dq, T* dk, T* dv, int64_t n_seq,
                       int64_t len, int64_t n_head, int64_t n_head_kv, int64_t head_dim) {
  const int64_t E = n_head * head_dim, kvd = n_head_kv * head_dim, group = n_head / n_head_kv;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  // One task per (sequence, KV head): the query heads of a group add into the same dk/dv.
  DefaultPool().ParallelFor(n_seq * n_head_kv, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<T> p, dp;
    p.resize(static_cast<size_t>(len * len));
    dp.resize(p.size());
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t s = idx / n_head_kv, g = idx % n_head_kv, row0 = s * len;
      const T* kg = k + row0 * kvd + g * head_dim;
      const T* vg = v + row0 * kvd + g * head_dim;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const T* qh = q + row0 * E + h * head_dim;
        const T* doh = dout + row0 * E + h * head_dim;
        CausalProbs(qh, E, kg, kvd, p.data(), len, head_dim);
        // dV += P^T dO ; dP = dO V^T ; dS = P o (dP - rowsum(dP o P)) ; dQ += s dS K ; dK += s dS^T Q
        Gemm<T>(true, false, len, head_dim, len, T(1), p.data(), len, doh, E, T(1), dv + row0 * kvd + g * head_dim, kvd);
        Gemm<T>(false, true, len, len, head_dim, T(1), doh, E, vg, kvd, T(0), dp.data(), len);
        for (int64_t i = 0; i < len; ++i) {
          T* pr = p.data() + i * len;
          T* dr = dp.data() + i * len;
          double dot = 0.0;
          for (int64_t j = 0; j <= i; ++j) dot += static_cast<double>(pr[j]) * static_cast<double>(dr[j]);
          for (int64_t j = 0; j <= i; ++j) dr[j] = pr[j] * (dr[j] - static_cast<T>(dot));
          for (int64_t j = i + 1; j < len; ++j) dr[j] = T(0);
        }
        Gemm<T>(false, false, len, head_dim, len, scale, dp.data(), len, kg, kvd, T(1), dq + row0 * E + h * head_dim, E);
        Gemm<T>(true, false, len, head_dim, len, scale, dp.data(), len, qh, E, T(1), dk + row0 * kvd + g * head_dim, kvd);
      }
    }
  });
}

template <typename T>
void SwiGluForward(const T* gate, const T* up, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i];
    out[i] = g / (T(1) + std::exp(-g)) * up[i];
  }
}

template <typename T>
void SwiGluBackward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i];
    const T sig = T(1) / (T(1) + std::exp(-g));
    const T silu = g * sig;
    dup[i] += dout[i] * silu;
    dgate[i] += dout[i] * up[i] * sig * (T(1) + g * (T(1) - sig));
  }
}

template <typename T>
double CrossEntropyChunked(const QMatrix& w_out, const T* h, const int32_t* target, int64_t rows, T* dh, T grad_scale,
                           int64_t chunk) {
  const int64_t E = w_out.cols, V = w_out.rows;
  std::vector<int64_t> scored;
  for (int64_t r = 0; r < rows; ++r) {
    if (target[r] >= 0) scored.push_back(r);
  }
  std::vector<T> hc, logits, dhc;
  double nll = 0.0;
  for (size_t c0 = 0; c0 < scored.size(); c0 += static_cast<size_t>(chunk)) {
    const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(scored.size() - c0));  // rows in this chunk
    hc.resize(static_cast<size_t>(n * E));
    for (int64_t i = 0; i < n; ++i) std::copy_n(h + scored[c0 + i] * E, E, hc.begin() + i * E);
    logits.resize(static_cast<size_t>(n * V));
    QLinearForward<T>(w_out, hc.data(), logits.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      T* row = logits.data() + i * V;
      const int32_t t = target[scored[c0 + i]];
      FT_CHECK(t < V);
      // Exponentials in T (float exp on the training path: these 2 x V calls per row are a
      // visible share of a step), sums in double.
      const T mx = *std::max_element(row, row + V);
      double se = 0.0;
      for (int64_t j = 0; j < V; ++j) se += static_cast<double>(std::exp(row[j] - mx));
      const double lse = std::log(se) + static_cast<double>(mx);
      nll += lse - static_cast<double>(row[t]);
      if (dh != nullptr) {  // d NLL / d logits = softmax - onehot
        const T shift = static_cast<T>(lse);
        for (int64_t j = 0; j < V; ++j) row[j] = std::exp(row[j] - shift) * grad_scale;
        row[t] -= grad_scale;
      }
    }
    if (dh != nullptr) {
      dhc.assign(static_cast<size_t>(n * E), T(0));
      QLinearBackward<T>(w_out, logits.data(), dhc.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        T* dst = dh + scored[c0 + i] * E;
        for (int64_t j = 0; j < E; ++j) dst[j] += dhc[static_cast<size_t>(i * E + j)];
      }
    }
  }
  return nll;
}

#define FT_INSTANTIATE(T)                                                                                   \
  template void QLinearForward<T>(const QMatrix&, const T*, T*, int64_t);                                   \
  template void QLinearBackward<T>(const QMatrix&, const T*, T*, int64_t);                                  \
  template void RmsNormForward<T>(const T*, const float*, T*, T*, int64_t, int64_t, float);                 \
  template void RmsNormBackward<T>(const T*, const float*, const T*, const T*, T*, int64_t, int64_t);       \
  template void RopeForward<T>(T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, float);              \
  template void RopeBackward<T>(T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, float);             \
  template void AttentionForward<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t,   \
                                    int64_t);                                                               \
  template void AttentionBackward<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t,  \
                                     int64_t, int64_t, int64_t);                                            \
  template void SwiGluForward<T>(const T*, const T*, T*, int64_t);                                          \
  template void SwiGluBackward<T>(const T*, const T*, const T*, T*, T*, int64_t);                           \
  template double CrossEntropyChunked<T>(const QMatrix&, const T*, const int32_t*, int64_t, T*, T, int64_t);

FT_INSTANTIATE(float)
FT_INSTANTIATE(double)
#undef FT_INSTANTIATE

}  // namespace fedtune::kernels

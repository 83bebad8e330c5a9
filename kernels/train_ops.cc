#include "kernels/train_ops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/rng.h"
#include "kernels/bf16_gemm.h"
#include "kernels/fast_ops.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
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
                const float* freq_factors, double sign) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < rot_dim / 2; ++i) {
      const double theta = sign * RopeAngle(static_cast<double>(pos[r]), i, rot_dim, base, freq_factors);
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
void RopeForward(T* x, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim, float base,
                 const float* freq_factors) {
  RopeRotate(x, pos, rows, heads, head_dim, rot_dim, base, freq_factors, 1.0);
}

template <typename T>
void RopeBackward(T* dx, const int32_t* pos, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot_dim, float base,
                  const float* freq_factors) {
  RopeRotate(dx, pos, rows, heads, head_dim, rot_dim, base, freq_factors, -1.0);  // rotations are orthogonal
}

namespace {
// First key visible from query i of a row: 0, or with packing the start of its example, and
// with a sliding window (window > 0) no earlier than i - window + 1.
inline int64_t FirstKey(const int32_t* seg_pos, int64_t i, int64_t window) {
  const int64_t j0 = seg_pos != nullptr ? i - seg_pos[i] : 0;
  return window > 0 ? std::max(j0, i - window + 1) : j0;
}

// Rows [i0, i1) of P = softmax(scale * Q_h K_g^T) with the causal (and, packed, per-example)
// mask, against keys [0, i1) only (the causal square's upper part is never computed): an
// (i1 - i0) x i1 block with leading dimension ldp. seg_pos: this sequence's positions or null.
// softcap > 0 (Gemma 2): the scores become softcap * tanh(scores / softcap) before the softmax,
// and `dcap` (same layout as p, may be null) receives the cap's derivative 1 / cosh^2(s / softcap)
// for the backward pass (from the raw score: 1 - tanh^2 loses digits where the cap saturates).
// The scores' part after the product: p holds the scaled scores of rows [i0, i1) against keys
// [0, i1); masked, capped and normalised in place.
template <typename T>
void MaskedSoftmax(T* p, int64_t ldp, int64_t i0, int64_t i1, const int32_t* seg_pos, bool fast_exp, T softcap, T* dcap, int64_t window) {
  for (int64_t i = i0; i < i1; ++i) {
    T* row = p + (i - i0) * ldp;
    const int64_t j0 = FirstKey(seg_pos, i, window);
    FT_CHECK(j0 >= 0 && j0 <= i);
    std::fill(row, row + j0, T(0));
    std::fill(row + i + 1, row + i1, T(0));
    T* vis = row + j0;
    const int64_t nv = i + 1 - j0;
    if (softcap > T(0)) {
      T* d = dcap != nullptr ? dcap + (i - i0) * ldp + j0 : nullptr;
      if constexpr (std::is_same_v<T, float>) {
        if (fast_exp) {
          avx2::SoftCap(vis, d, nv, softcap);
          const float mx = avx2::MaxOf(vis, nv);
          avx2::ScaleInPlace(vis, nv, static_cast<float>(1.0 / avx2::ExpShiftedInPlace(vis, nv, mx)));
          continue;
        }
      }
      for (int64_t j = 0; j < nv; ++j) {
        const T x = vis[j] / softcap;
        vis[j] = softcap * std::tanh(x);
        if (d != nullptr) {
          const T ch = std::cosh(x);
          d[j] = T(1) / (ch * ch);
        }
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      if (fast_exp) {
        const float mx = avx2::MaxOf(vis, nv);
        avx2::ScaleInPlace(vis, nv, static_cast<float>(1.0 / avx2::ExpShiftedInPlace(vis, nv, mx)));
        continue;
      }
    }
    T mx = vis[0];
    for (int64_t j = 1; j < nv; ++j) mx = std::max(mx, vis[j]);
    double sum = 0.0;
    for (int64_t j = 0; j < nv; ++j) {
      vis[j] = static_cast<T>(std::exp(static_cast<double>(vis[j] - mx)));
      sum += static_cast<double>(vis[j]);
    }
    const T inv = static_cast<T>(1.0 / sum);
    for (int64_t j = 0; j < nv; ++j) vis[j] *= inv;
  }
}

template <typename T>
void CausalProbs(const T* qh, int64_t q_stride, const T* kg, int64_t kv_stride, T* p, int64_t ldp, int64_t i0, int64_t i1,
                 int64_t hd, const int32_t* seg_pos, bool fast_exp, T softcap, T* dcap, int64_t window) {
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
  Gemm<T>(false, true, i1 - i0, i1, hd, scale, qh + i0 * q_stride, q_stride, kg, kv_stride, T(0), p, ldp);
  MaskedSoftmax(p, ldp, i0, i1, seg_pos, fast_exp, softcap, dcap, window);
}

// dS = P o (dP - rowsum(dP o P)) (through the cap when there is one) for rows [i0, i1), in dp;
// zero outside each row's visible keys.
template <typename T>
void SoftmaxBackward(const T* p, T* dp, int64_t ld, int64_t i0, int64_t i1, const int32_t* seg_pos, int64_t window, const T* dcap) {
  for (int64_t i = i0; i < i1; ++i) {
    const T* pr = p + (i - i0) * ld;
    T* dr = dp + (i - i0) * ld;
    const int64_t j0 = FirstKey(seg_pos, i, window);
    double dot = 0.0;
    for (int64_t j = j0; j <= i; ++j) dot += static_cast<double>(pr[j]) * static_cast<double>(dr[j]);
    for (int64_t j = j0; j <= i; ++j) dr[j] = pr[j] * (dr[j] - static_cast<T>(dot));
    if (dcap != nullptr) {  // through the cap: d(c tanh(s / c)) / ds = 1 / cosh^2(s / c)
      const T* cr = dcap + (i - i0) * ld;
      for (int64_t j = j0; j <= i; ++j) dr[j] *= cr[j];
    }
    std::fill(dr, dr + j0, T(0));
    std::fill(dr + i + 1, dr + i1, T(0));
  }
}

// Query rows per block: the reference takes the whole sequence at once (one square); cpu-fast
// (fast_exp) takes 64 rows against only the keys they can see, ~40% fewer FLOPs at 256 tokens.
inline int64_t AttentionRowBlock(int64_t len, bool fast_exp) { return fast_exp ? std::min<int64_t>(64, len) : len; }
}  // namespace

template <typename T>
void AttentionForward(const T* q, const T* k, const T* v, T* out, int64_t n_seq, int64_t len, int64_t n_head,
                      int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, bool fast_exp, float softcap, int64_t window) {
  fast_exp = fast_exp && HaveAvx2Fma();
  const int64_t E = n_head * head_dim, kvd = n_head_kv * head_dim, group = n_head / n_head_kv;
  const int64_t blk = AttentionRowBlock(len, fast_exp);
  DefaultPool().ParallelFor(n_seq * n_head, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<T> p;
    p.resize(static_cast<size_t>(blk * len));
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t s = idx / n_head, h = idx % n_head, g = h / group;
      const int64_t row0 = s * len;
      const T* qh = q + row0 * E + h * head_dim;
      const T* kg = k + row0 * kvd + g * head_dim;
      const T* vg = v + row0 * kvd + g * head_dim;
      for (int64_t i0 = 0; i0 < len; i0 += blk) {
        const int64_t i1 = std::min(len, i0 + blk);
        CausalProbs(qh, E, kg, kvd, p.data(), i1, i0, i1, head_dim, seg_pos ? seg_pos + row0 : nullptr, fast_exp, static_cast<T>(softcap),
                    static_cast<T*>(nullptr), window);
        Gemm<T>(false, false, i1 - i0, head_dim, i1, T(1), p.data(), i1, vg, kvd, T(0), out + (row0 + i0) * E + h * head_dim, E);
      }
    }
  });
}

template <typename T>
void AttentionBackward(const T* q, const T* k, const T* v, const T* dout, T* dq, T* dk, T* dv, int64_t n_seq,
                       int64_t len, int64_t n_head, int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos,
                       bool fast_exp, float softcap, int64_t window) {
  fast_exp = fast_exp && HaveAvx2Fma();
  const int64_t E = n_head * head_dim, kvd = n_head_kv * head_dim, group = n_head / n_head_kv;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t blk = AttentionRowBlock(len, fast_exp);
  // One task per (sequence, KV head): the query heads of a group add into the same dk/dv.
  DefaultPool().ParallelFor(n_seq * n_head_kv, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<T> p, dp, dcap;
    p.resize(static_cast<size_t>(blk * len));
    dp.resize(p.size());
    if (softcap > 0.0f) dcap.resize(p.size());
    const T cap = static_cast<T>(softcap);
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t s = idx / n_head_kv, g = idx % n_head_kv, row0 = s * len;
      const T* kg = k + row0 * kvd + g * head_dim;
      const T* vg = v + row0 * kvd + g * head_dim;
      T* dkg = dk + row0 * kvd + g * head_dim;
      T* dvg = dv + row0 * kvd + g * head_dim;
      const int32_t* sp = seg_pos ? seg_pos + row0 : nullptr;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const T* qh = q + row0 * E + h * head_dim;
        const T* doh = dout + row0 * E + h * head_dim;
        T* dqh = dq + row0 * E + h * head_dim;
        for (int64_t i0 = 0; i0 < len; i0 += blk) {
          const int64_t i1 = std::min(len, i0 + blk), nr = i1 - i0;
          CausalProbs(qh, E, kg, kvd, p.data(), i1, i0, i1, head_dim, sp, fast_exp, cap, softcap > 0.0f ? dcap.data() : nullptr, window);
          // Rows [i0, i1) against keys [0, i1):
          // dV += P^T dO ; dP = dO V^T ; dS = P o (dP - rowsum(dP o P)) ; dQ += s dS K ; dK += s dS^T Q
          Gemm<T>(true, false, i1, head_dim, nr, T(1), p.data(), i1, doh + i0 * E, E, T(1), dvg, kvd);
          Gemm<T>(false, true, nr, i1, head_dim, T(1), doh + i0 * E, E, vg, kvd, T(0), dp.data(), i1);
          SoftmaxBackward(p.data(), dp.data(), i1, i0, i1, sp, window, softcap > 0.0f ? dcap.data() : nullptr);
          Gemm<T>(false, false, nr, head_dim, i1, scale, dp.data(), i1, kg, kvd, T(1), dqh + i0 * E, E);
          Gemm<T>(true, false, i1, head_dim, nr, scale, dp.data(), i1, qh + i0 * E, E, T(1), dkg, kvd);
        }
      }
    }
  });
}

void AttentionForwardBf16(const float* q, const float* k, const float* v, float* out, int64_t n_seq, int64_t len, int64_t n_head,
                          int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap, int64_t window) {
  const int64_t E = n_head * head_dim, kvd = n_head_kv * head_dim, group = n_head / n_head_kv, M = n_seq * len;
  const int64_t blk = AttentionRowBlock(len, true);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  std::vector<uint16_t> qs, ks, vs;
  const uint16_t *qb = ToBf16Pooled(q, M * E, &qs), *kb = ToBf16Pooled(k, M * kvd, &ks), *vb = ToBf16Pooled(v, M * kvd, &vs);
  DefaultPool().ParallelFor(n_seq * n_head, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<float> p;
    thread_local std::vector<uint16_t> pb;
    p.resize(static_cast<size_t>(blk * len));
    pb.resize(p.size());
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t s = idx / n_head, h = idx % n_head, g = h / group, row0 = s * len;
      const int32_t* sp = seg_pos ? seg_pos + row0 : nullptr;
      for (int64_t i0 = 0; i0 < len; i0 += blk) {
        const int64_t i1 = std::min(len, i0 + blk), nr = i1 - i0;
        Bf16GemmOnThread(false, true, nr, i1, head_dim, scale, qb + (row0 + i0) * E + h * head_dim, E, kb + row0 * kvd + g * head_dim, kvd,
                         false, p.data(), i1);
        MaskedSoftmax(p.data(), i1, i0, i1, sp, true, softcap, static_cast<float*>(nullptr), window);
        ToBf16(p.data(), pb.data(), nr * i1);
        Bf16GemmOnThread(false, false, nr, head_dim, i1, 1.0f, pb.data(), i1, vb + row0 * kvd + g * head_dim, kvd, false,
                         out + (row0 + i0) * E + h * head_dim, E);
      }
    }
  });
}

void AttentionBackwardBf16(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk, float* dv, int64_t n_seq,
                           int64_t len, int64_t n_head, int64_t n_head_kv, int64_t head_dim, const int32_t* seg_pos, float softcap,
                           int64_t window) {
  const int64_t E = n_head * head_dim, kvd = n_head_kv * head_dim, group = n_head / n_head_kv, M = n_seq * len;
  const int64_t blk = AttentionRowBlock(len, true);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  std::vector<uint16_t> qs, ks, vs, dos;
  const uint16_t *qb = ToBf16Pooled(q, M * E, &qs), *kb = ToBf16Pooled(k, M * kvd, &ks), *vb = ToBf16Pooled(v, M * kvd, &vs),
                 *dob = ToBf16Pooled(dout, M * E, &dos);
  // One task per (sequence, KV head): the query heads of a group add into the same dk/dv.
  DefaultPool().ParallelFor(n_seq * n_head_kv, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<float> p, dp, dcap;
    thread_local std::vector<uint16_t> pb, dsb;
    p.resize(static_cast<size_t>(blk * len));
    dp.resize(p.size());
    pb.resize(p.size());
    dsb.resize(p.size());
    if (softcap > 0.0f) dcap.resize(p.size());
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t s = idx / n_head_kv, g = idx % n_head_kv, row0 = s * len;
      const uint16_t* kg = kb + row0 * kvd + g * head_dim;
      const uint16_t* vg = vb + row0 * kvd + g * head_dim;
      float* dkg = dk + row0 * kvd + g * head_dim;
      float* dvg = dv + row0 * kvd + g * head_dim;
      const int32_t* sp = seg_pos ? seg_pos + row0 : nullptr;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const uint16_t* qh = qb + row0 * E + h * head_dim;
        const uint16_t* doh = dob + row0 * E + h * head_dim;
        float* dqh = dq + row0 * E + h * head_dim;
        for (int64_t i0 = 0; i0 < len; i0 += blk) {
          const int64_t i1 = std::min(len, i0 + blk), nr = i1 - i0;
          Bf16GemmOnThread(false, true, nr, i1, head_dim, scale, qh + i0 * E, E, kg, kvd, false, p.data(), i1);
          MaskedSoftmax(p.data(), i1, i0, i1, sp, true, softcap, softcap > 0.0f ? dcap.data() : nullptr, window);
          ToBf16(p.data(), pb.data(), nr * i1);
          // Rows [i0, i1) against keys [0, i1), as the f32 path:
          Bf16GemmOnThread(true, false, i1, head_dim, nr, 1.0f, pb.data(), i1, doh + i0 * E, E, true, dvg, kvd);     // dV += P^T dO
          Bf16GemmOnThread(false, true, nr, i1, head_dim, 1.0f, doh + i0 * E, E, vg, kvd, false, dp.data(), i1);     // dP = dO V^T
          SoftmaxBackward(p.data(), dp.data(), i1, i0, i1, sp, window, softcap > 0.0f ? dcap.data() : nullptr);    // dS
          ToBf16(dp.data(), dsb.data(), nr * i1);
          Bf16GemmOnThread(false, false, nr, head_dim, i1, scale, dsb.data(), i1, kg, kvd, true, dqh + i0 * E, E);  // dQ += s dS K
          Bf16GemmOnThread(true, false, i1, head_dim, nr, scale, dsb.data(), i1, qh + i0 * E, E, true, dkg, kvd);   // dK += s dS^T Q
        }
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
void GegluForward(const T* gate, const T* up, T* out, int64_t n) {
  const T k = static_cast<T>(0.7978845608028654);  // sqrt(2 / pi)
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i];
    out[i] = T(0.5) * g * (T(1) + std::tanh(k * (g + T(0.044715) * g * g * g))) * up[i];
  }
}

template <typename T>
void GegluBackward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n) {
  const T k = static_cast<T>(0.7978845608028654);
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i];
    const T t = std::tanh(k * (g + T(0.044715) * g * g * g));
    const T gelu = T(0.5) * g * (T(1) + t);
    const T dgelu = T(0.5) * (T(1) + t) + T(0.5) * g * (T(1) - t * t) * k * (T(1) + T(3) * T(0.044715) * g * g);
    dup[i] += dout[i] * gelu;
    dgate[i] += dout[i] * up[i] * dgelu;
  }
}

namespace {
// Softmax cross-entropy of one logit row against target t: returns the NLL; with `grad`, the
// row becomes grad_scale * (softmax - onehot(t)).
template <typename T>
double CrossEntropyRow(T* row, int64_t V, int32_t t, bool grad, T grad_scale, bool fast, T softcap) {
  if (softcap > T(0)) {  // Gemma 2's final-logit soft-capping: z <- c tanh(z / c), in place
    // The cap's derivative 1 / cosh^2(z / c) from the raw logits (1 - tanh^2 would lose digits
    // where the cap saturates), then the softmax gradient through it.
    thread_local std::vector<T> dcap;
    if (grad) dcap.resize(static_cast<size_t>(V));
    if constexpr (std::is_same_v<T, float>) {
      if (fast) {  // vectorised: the cap, then the plain fast path, then the derivative
        avx2::SoftCap(row, grad ? dcap.data() : nullptr, V, softcap);
        const double nll = CrossEntropyRow<T>(row, V, t, grad, grad_scale, true, T(0));
        if (grad)
          for (int64_t j = 0; j < V; ++j) row[j] *= dcap[static_cast<size_t>(j)];
        return nll;
      }
    }
    for (int64_t j = 0; j < V; ++j) {
      const T x = row[j] / softcap;
      row[j] = softcap * std::tanh(x);
      if (grad) {
        const T ch = std::cosh(x);
        dcap[static_cast<size_t>(j)] = T(1) / (ch * ch);
      }
    }
    const T mx = *std::max_element(row, row + V);
    double se = 0.0;
    for (int64_t j = 0; j < V; ++j) se += static_cast<double>(std::exp(row[j] - mx));
    const double lse = std::log(se) + static_cast<double>(mx);
    const double nll = lse - static_cast<double>(row[t]);
    if (grad) {
      const T shift = static_cast<T>(lse);
      for (int64_t j = 0; j < V; ++j) row[j] = (std::exp(row[j] - shift) * grad_scale - (j == t ? grad_scale : T(0))) * dcap[static_cast<size_t>(j)];
    }
    return nll;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (fast) {
      const float mx = avx2::MaxOf(row, V);
      if (!grad) return std::log(avx2::SumExpShifted(row, V, mx)) + static_cast<double>(mx) - static_cast<double>(row[t]);
      // One exponential per logit: e^(z - max) kept, then scaled by grad_scale / sum (softmax).
      const float zt = row[t];
      const double sum = avx2::ExpShiftedInPlace(row, V, mx);
      avx2::ScaleInPlace(row, V, static_cast<float>(static_cast<double>(grad_scale) / sum));
      row[t] -= grad_scale;
      return std::log(sum) + static_cast<double>(mx) - static_cast<double>(zt);
    }
  }
  // Exponentials in T (float exp on the training path), sums in double.
  const T mx = *std::max_element(row, row + V);
  double se = 0.0;
  for (int64_t j = 0; j < V; ++j) se += static_cast<double>(std::exp(row[j] - mx));
  const double lse = std::log(se) + static_cast<double>(mx);
  const double nll = lse - static_cast<double>(row[t]);
  if (grad) {  // d NLL / d logits = softmax - onehot
    const T shift = static_cast<T>(lse);
    for (int64_t j = 0; j < V; ++j) row[j] = std::exp(row[j] - shift) * grad_scale;
    row[t] -= grad_scale;
  }
  return nll;
}
}  // namespace

namespace {
// The chunk loop of CrossEntropyChunked with the products as callables (V x E output matrix).
template <typename T, typename Fwd, typename Bwd>
double CrossEntropyChunks(int64_t V, int64_t E, const T* h, const int32_t* target, int64_t rows, T* dh, T grad_scale, int64_t chunk,
                          bool fast, T softcap, const Fwd& forward, const Bwd& backward) {
  std::vector<int64_t> scored;
  for (int64_t r = 0; r < rows; ++r) {
    if (target[r] >= 0) {
      FT_CHECK(target[r] < V);
      scored.push_back(r);
    }
  }
  std::vector<T> hc, logits, dhc;
  std::vector<double> row_nll;
  double nll = 0.0;
  for (size_t c0 = 0; c0 < scored.size(); c0 += static_cast<size_t>(chunk)) {
    const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(scored.size() - c0));  // rows in this chunk
    hc.resize(static_cast<size_t>(n * E));
    for (int64_t i = 0; i < n; ++i) std::copy_n(h + scored[c0 + i] * E, E, hc.begin() + i * E);
    logits.resize(static_cast<size_t>(n * V));
    forward(hc.data(), logits.data(), n);
    row_nll.assign(static_cast<size_t>(n), 0.0);
    auto rows_fn = [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; ++i) {
        row_nll[static_cast<size_t>(i)] =
            CrossEntropyRow(logits.data() + i * V, V, target[scored[c0 + static_cast<size_t>(i)]], dh != nullptr, grad_scale, fast, softcap);
      }
    };
    if (fast) {
      DefaultPool().ParallelFor(n, 1, rows_fn);
    } else {
      rows_fn(0, n, 0);
    }
    for (double x : row_nll) nll += x;  // fixed order: the sum does not depend on the threads
    if (dh != nullptr) {
      dhc.assign(static_cast<size_t>(n * E), T(0));
      backward(logits.data(), dhc.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        T* dst = dh + scored[c0 + i] * E;
        for (int64_t j = 0; j < E; ++j) dst[j] += dhc[static_cast<size_t>(i * E + j)];
      }
    }
  }
  return nll;
}
}  // namespace

template <typename T>
double CrossEntropyChunked(const QMatrix& w_out, const T* h, const int32_t* target, int64_t rows, T* dh, T grad_scale,
                           int64_t chunk, bool fast, float softcap) {
  fast = fast && std::is_same_v<T, float> && HaveAvx2Fma();
  return CrossEntropyChunks<T>(
      w_out.rows, w_out.cols, h, target, rows, dh, grad_scale, chunk, fast, static_cast<T>(softcap),
      [&](const T* x, T* y, int64_t n) { QLinearForward<T>(w_out, x, y, n); },
      [&](const T* dy, T* dx, int64_t n) { QLinearBackward<T>(w_out, dy, dx, n); });
}

double CrossEntropyChunkedWith(int64_t V, int64_t E, const float* h, const int32_t* target, int64_t rows, float* dh, float grad_scale,
                               int64_t chunk, float softcap, const std::function<void(const float*, float*, int64_t)>& forward,
                               const std::function<void(float*, float*, int64_t)>& backward) {
  return CrossEntropyChunks<float>(V, E, h, target, rows, dh, grad_scale, chunk, HaveAvx2Fma(), softcap, forward, backward);
}

template <typename T>
void LoraForward(const T* x, const T* a, const T* b, T* z, T* y, int64_t m, int64_t in, int64_t r, int64_t out, T s) {
  Gemm<T>(false, true, m, r, in, T(1), x, in, a, in, T(0), z, r);   // z = x A^T
  Gemm<T>(false, true, m, out, r, s, z, r, b, r, T(1), y, out);     // y += s z B^T
}

template <typename T>
void LoraBackward(const T* x, const T* a, const T* b, const T* z, const T* dy, T* da, T* db, T* dx, int64_t m,
                  int64_t in, int64_t r, int64_t out, T s) {
  std::vector<T> dz(static_cast<size_t>(m * r), T(0));
  if (db != nullptr) Gemm<T>(true, false, out, r, m, s, dy, out, z, r, T(1), db, r);  // dB += s dy^T z
  Gemm<T>(false, false, m, r, out, s, dy, out, b, r, T(0), dz.data(), r);              // dz = s dy B
  if (da != nullptr) Gemm<T>(true, false, r, in, m, T(1), dz.data(), r, x, in, T(1), da, in);  // dA += dz^T x
  Gemm<T>(false, false, m, in, r, T(1), dz.data(), r, a, in, T(1), dx, in);          // dx += dz A
}

namespace {
// Block i of a DiaBlo update: input columns [i b_in, i b_in + c_in), output [i b_out, + c_out);
// false for a block wholly in the padded region.
bool DiabloBlock(int64_t i, int64_t in, int64_t out, int64_t blocks, int64_t& b_in, int64_t& b_out, int64_t& c_in,
                 int64_t& c_out) {
  b_in = (in + blocks - 1) / blocks;
  b_out = (out + blocks - 1) / blocks;
  c_in = std::min(b_in, in - i * b_in);
  c_out = std::min(b_out, out - i * b_out);
  return c_in > 0 && c_out > 0;
}
}  // namespace

template <typename T>
void DiabloForward(const T* x, const T* d, T* y, int64_t m, int64_t in, int64_t out, int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i) {
    int64_t b_in, b_out, c_in, c_out;
    if (!DiabloBlock(i, in, out, blocks, b_in, b_out, c_in, c_out)) continue;
    Gemm<T>(false, false, m, c_out, c_in, T(1), x + i * b_in, in, d + i * b_in * b_out, b_out, T(1), y + i * b_out, out);
  }
}

template <typename T>
void DiabloBackward(const T* x, const T* d, const T* dy, T* dd, T* dx, int64_t m, int64_t in, int64_t out,
                    int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i) {
    int64_t b_in, b_out, c_in, c_out;
    if (!DiabloBlock(i, in, out, blocks, b_in, b_out, c_in, c_out)) continue;
    if (dd != nullptr) Gemm<T>(true, false, c_in, c_out, m, T(1), x + i * b_in, in, dy + i * b_out, out, T(1), dd + i * b_in * b_out, b_out);
    Gemm<T>(false, true, m, c_in, c_out, T(1), dy + i * b_out, out, d + i * b_in * b_out, b_out, T(1), dx + i * b_in, in);
  }
}

template <typename T>
void DropoutScale(uint64_t key, int64_t row0, int64_t rows, int64_t cols, float p, T* out) {
  const uint64_t threshold = DropoutThreshold(p);
  const T keep = static_cast<T>(1.0 / (1.0 - static_cast<double>(p)));
  for (int64_t i = 0; i < rows; ++i) {
    const uint64_t row_key = DropoutRowKey(key, static_cast<uint64_t>(row0 + i));
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = DropoutKeeps(row_key, static_cast<uint64_t>(j), threshold) ? keep : T(0);
  }
}

template <typename T>
void EmbedRows(const QMatrix& table, const int32_t* ids, int64_t n, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) GetRow(table, ids[i], out + i * table.cols);
  } else {
    std::vector<float> row(static_cast<size_t>(table.cols));
    for (int64_t i = 0; i < n; ++i) {
      GetRow(table, ids[i], row.data());
      std::copy(row.begin(), row.end(), out + i * table.cols);
    }
  }
}

#define FT_INSTANTIATE(T)                                                                                   \
  template void QLinearForward<T>(const QMatrix&, const T*, T*, int64_t);                                   \
  template void QLinearBackward<T>(const QMatrix&, const T*, T*, int64_t);                                  \
  template void RmsNormForward<T>(const T*, const float*, T*, T*, int64_t, int64_t, float);                 \
  template void RmsNormBackward<T>(const T*, const float*, const T*, const T*, T*, int64_t, int64_t);       \
  template void RopeForward<T>(T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, float, const float*);\
  template void RopeBackward<T>(T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, float, const float*);\
  template void AttentionForward<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t,   \
                                    int64_t, const int32_t*, bool, float, int64_t);                         \
  template void AttentionBackward<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t,  \
                                     int64_t, int64_t, int64_t, const int32_t*, bool, float, int64_t);      \
  template void SwiGluForward<T>(const T*, const T*, T*, int64_t);                                          \
  template void SwiGluBackward<T>(const T*, const T*, const T*, T*, T*, int64_t);                           \
  template void GegluForward<T>(const T*, const T*, T*, int64_t);                                           \
  template void GegluBackward<T>(const T*, const T*, const T*, T*, T*, int64_t);                            \
  template double CrossEntropyChunked<T>(const QMatrix&, const T*, const int32_t*, int64_t, T*, T, int64_t, bool, float); \
  template void LoraForward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, int64_t, T);    \
  template void LoraBackward<T>(const T*, const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t, \
                                int64_t, int64_t, T);                                                          \
  template void DiabloForward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t);                   \
  template void DiabloBackward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, int64_t); \
  template void DropoutScale<T>(uint64_t, int64_t, int64_t, int64_t, float, T*); \
  template void EmbedRows<T>(const QMatrix&, const int32_t*, int64_t, T*);

FT_INSTANTIATE(float)
FT_INSTANTIATE(double)
#undef FT_INSTANTIATE

}  // namespace fedtune::kernels

// AVX2 + FMA element-wise kernels of the cpu-fast backend; compiled with those flags and only
// reached through kernels/fast_ops.h after the run-time CPU check. Each function processes a
// contiguous range (the caller splits work over threads).
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels/avx2_util.h"
#include "kernels/fast_ops.h"

namespace fedtune::kernels::avx2 {
namespace {

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for exactness), e^r by a
// degree-6 polynomial (Taylor; relative error < 2e-7 on that interval), 2^n by building the
// exponent. Inputs below -87.34 give 0 (results between there and FLT_MIN may be denormal),
// above 88.72 give +inf; NaN stays NaN.
inline __m256 Exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.72283f), lo = _mm256_set1_ps(-87.33654f);
  const __m256 nan_mask = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n: n in [-126, 128]; split 2^n = 2^(n/2) 2^(n - n/2) so n = 128 does not overflow early.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_andnot_ps(under, y);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
  return _mm256_blendv_ps(y, x, nan_mask);
}

inline float Exp1(float x) {
  alignas(32) float v[8] = {x, 0, 0, 0, 0, 0, 0, 0};
  _mm256_store_ps(v, Exp8(_mm256_load_ps(v)));
  return v[0];
}

}  // namespace

float MaxOf(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  float r = HMax(m);
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

double SumExpShifted(const float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  double total = 0.0;
  int64_t i = 0;
  // Partial sums in float over 512 values at a time, then double: exact enough for softmax
  // denominators over vocabularies of 10^5 and no slower than a float sum.
  while (i + 8 <= n) {
    const int64_t end = (i + 512 <= n) ? i + 512 : n;
    for (; i + 8 <= end; i += 8) acc = _mm256_add_ps(acc, Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s)));
    total += static_cast<double>(HSum(acc));
    acc = _mm256_setzero_ps();
  }
  for (; i < n; ++i) total += static_cast<double>(Exp1(x[i] - shift));
  return total;
}

void ScaledExpShifted(float* x, int64_t n, float shift, float scale) {
  const __m256 s = _mm256_set1_ps(shift), c = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s)), c));
  for (; i < n; ++i) x[i] = Exp1(x[i] - shift) * scale;
}

double ExpShiftedInPlace(float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  double total = 0.0;
  int64_t i = 0;
  while (i + 8 <= n) {  // the partial sums of SumExpShifted, in the same order
    const int64_t end = (i + 512 <= n) ? i + 512 : n;
    for (; i + 8 <= end; i += 8) {
      const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
      _mm256_storeu_ps(x + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    total += static_cast<double>(HSum(acc));
    acc = _mm256_setzero_ps();
  }
  for (; i < n; ++i) {
    x[i] = Exp1(x[i] - shift);
    total += static_cast<double>(x[i]);
  }
  return total;
}

void ScaleInPlace(float* x, int64_t n, float scale) {
  const __m256 c = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), c));
  for (; i < n; ++i) x[i] *= scale;
}

void ToBf16(const float* x, uint16_t* out, int64_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i round = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h[2];
    for (int part = 0; part < 2; ++part) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8 * part));
      const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
      const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
      const __m256i nan_bits = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
      h[part] = _mm256_blendv_epi8(_mm256_srli_epi32(rounded, 16), nan_bits, is_nan);
    }
    // Values fit 16 bits: the unsigned-saturating pack is exact; it interleaves 128-bit lanes.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), packed);
  }
  for (; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      out[i] = static_cast<uint16_t>((u >> 16) | 0x40u);
      continue;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    out[i] = static_cast<uint16_t>(u >> 16);
  }
}

void SoftCap(float* x, float* dcap, int64_t n, float cap) {
  // tanh(u) = sign(u) (1 - e) / (1 + e) and 1 / cosh^2(u) = 4 e / (1 + e)^2 with e = e^(-2|u|).
  const __m256 inv = _mm256_set1_ps(1.0f / cap), c = _mm256_set1_ps(cap), one = _mm256_set1_ps(1.0f);
  const __m256 minus_two = _mm256_set1_ps(-2.0f), four = _mm256_set1_ps(4.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 u = _mm256_mul_ps(_mm256_loadu_ps(x + i), inv);
    const __m256 e = Exp8(_mm256_mul_ps(_mm256_andnot_ps(sign, u), minus_two));
    const __m256 den = _mm256_add_ps(one, e);
    const __m256 t = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), den), _mm256_and_ps(u, sign));
    _mm256_storeu_ps(x + i, _mm256_mul_ps(c, t));
    if (dcap != nullptr) _mm256_storeu_ps(dcap + i, _mm256_div_ps(_mm256_mul_ps(four, e), _mm256_mul_ps(den, den)));
  }
  for (; i < n; ++i) {
    const float u = x[i] * (1.0f / cap), e = Exp1(-2.0f * std::fabs(u)), den = 1.0f + e;
    x[i] = cap * std::copysign((1.0f - e) / den, u);
    if (dcap != nullptr) dcap[i] = 4.0f * e / (den * den);
  }
}

void SwiGluForward(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + Exp1(-gate[i])) * up[i];
}

void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i), u = _mm256_loadu_ps(up + i), d = _mm256_loadu_ps(dout + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, Exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    const __m256 silu = _mm256_mul_ps(g, sig);
    _mm256_storeu_ps(dup + i, _mm256_fmadd_ps(d, silu, _mm256_loadu_ps(dup + i)));
    // d silu/dg = sig (1 + g (1 - sig))
    const __m256 dsilu = _mm256_mul_ps(sig, _mm256_fmadd_ps(g, _mm256_sub_ps(one, sig), one));
    _mm256_storeu_ps(dgate + i, _mm256_fmadd_ps(_mm256_mul_ps(d, u), dsilu, _mm256_loadu_ps(dgate + i)));
  }
  for (; i < n; ++i) {
    const float g = gate[i], sig = 1.0f / (1.0f + Exp1(-g));
    dup[i] += dout[i] * g * sig;
    dgate[i] += dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
  }
}

void RmsNormRows(const float* x, const float* g, float* y, float* rstd, int64_t r0, int64_t r1, int64_t n, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    double ss = static_cast<double>(HSum(acc));
    for (; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float s = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + static_cast<double>(eps)));
    rstd[r] = s;
    const __m256 sv = _mm256_set1_ps(s);
    for (i = 0; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), sv), _mm256_loadu_ps(g + i)));
    }
    for (; i < n; ++i) yr[i] = xr[i] * s * g[i];
  }
}

void RmsNormBackwardRows(const float* x, const float* g, const float* rstd, const float* dy, float* dx, int64_t r0,
                         int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n;
    const float* dyr = dy + r * n;
    float* dxr = dx + r * n;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(dyr + i), _mm256_loadu_ps(g + i)), _mm256_loadu_ps(xr + i), acc);
    }
    double dot = static_cast<double>(HSum(acc));
    for (; i < n; ++i) dot += static_cast<double>(dyr[i]) * g[i] * xr[i];
    const float s = rstd[r];
    const float c = static_cast<float>(dot * s * s * s / static_cast<double>(n));
    const __m256 sv = _mm256_set1_ps(s), cv = _mm256_set1_ps(c);
    for (i = 0; i + 8 <= n; i += 8) {
      __m256 d = _mm256_loadu_ps(dxr + i);
      d = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_loadu_ps(dyr + i)), _mm256_loadu_ps(g + i), d);
      d = _mm256_fnmadd_ps(_mm256_loadu_ps(xr + i), cv, d);
      _mm256_storeu_ps(dxr + i, d);
    }
    for (; i < n; ++i) dxr[i] += s * dyr[i] * g[i] - xr[i] * c;
  }
}

}  // namespace fedtune::kernels::avx2

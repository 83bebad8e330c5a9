#include "kernels/quant.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstring>
#include <vector>
#include <string>

#include "common/fp16.h"

namespace fedtune::kernels {
namespace {

constexpr int64_t kQK = 32;    // values per block of the simple formats
constexpr int64_t kQKK = 256;  // values per K-quant super-block

inline float H(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return Fp16ToFp32(h);
}
inline void PutH(uint8_t* p, float f) {
  const uint16_t h = Fp32ToFp16(f);
  std::memcpy(p, &h, 2);
}

// Each dequantizer mirrors the operation order of gguf-py's numpy code (gguf/quants.py) so the
// results are bit-identical: e.g. Q4_1 is (d * q) + m without fused multiply-add.
void DequantQ4_0(const uint8_t* b, float* y) {
  const float d = H(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>((qs[j] & 15) - 8);
    y[j + 16] = d * static_cast<float>((qs[j] >> 4) - 8);
  }
}
void DequantQ4_1(const uint8_t* b, float* y) {
  const float d = H(b), m = H(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(qs[j] & 15) + m;
    y[j + 16] = d * static_cast<float>(qs[j] >> 4) + m;
  }
}
void DequantQ5(const uint8_t* b, float* y, bool has_min) {
  const float d = H(b);
  const float m = has_min ? H(b + 2) : 0.0f;
  const uint8_t* p = b + (has_min ? 4 : 2);
  uint32_t qh;
  std::memcpy(&qh, p, 4);
  const uint8_t* qs = p + 4;
  for (int j = 0; j < 16; ++j) {
    const int x0 = (qs[j] & 15) | (((qh >> j) << 4) & 16);
    const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 16);
    if (has_min) {
      y[j] = d * static_cast<float>(x0) + m;
      y[j + 16] = d * static_cast<float>(x1) + m;
    } else {
      y[j] = d * static_cast<float>(x0 - 16);
      y[j + 16] = d * static_cast<float>(x1 - 16);
    }
  }
}
void DequantQ8_0(const uint8_t* b, float* y) {
  const float d = H(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(q[j]) * d;
}
inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *mn = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}
void DequantQ4_K(const uint8_t* b, float* y) {
  const float d = H(b), dmin = H(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qs = b + 16;
  for (int c = 0; c < 4; ++c) {
    for (int s = 0; s < 2; ++s) {
      uint8_t sc, mn;
      ScaleMinK4(2 * c + s, scales, &sc, &mn);
      const float dl = d * static_cast<float>(sc);
      const float ml = dmin * static_cast<float>(mn);
      for (int l = 0; l < 32; ++l) {
        const int q = s == 0 ? (qs[c * 32 + l] & 0xF) : (qs[c * 32 + l] >> 4);
        y[c * 64 + s * 32 + l] = dl * static_cast<float>(q) - ml;
      }
    }
  }
}
// Q2_K: 16 groups of 16 values, 4-bit scale and 4-bit min per group, 2-bit codes packed four to
// a byte in two 32-byte halves (value 128 h + 32 s + l is bits 2s of byte 32 h + l). Loops by
// group so the inner loop is a plain 16-wide map (vectorised); same operations as gguf-py.
void DequantQ2_K(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* qs = b + 16;
  const float d = H(b + 80), dmin = H(b + 82);
  for (int h = 0; h < 2; ++h) {
    for (int s = 0; s < 4; ++s) {
      for (int half = 0; half < 2; ++half) {
        const int g = 8 * h + 2 * s + half;
        const float dl = d * static_cast<float>(scales[g] & 0xF);
        const float ml = dmin * static_cast<float>(scales[g] >> 4);
        const uint8_t* q = qs + h * 32 + half * 16;
        float* o = y + 128 * h + 32 * s + 16 * half;
        for (int l = 0; l < 16; ++l) o[l] = dl * static_cast<float>((q[l] >> (2 * s)) & 3) - ml;
      }
    }
  }
}
// Q3_K: 16 groups of 16 values with a signed 6-bit scale each (12 packed bytes), 2 low bits as
// in Q2_K plus a high bit in hmask (value 32 b + l is bit b of hmask[l]; a clear bit subtracts 4).
int Q3KScale(const uint8_t* sc, int i) {
  const int lo = i < 8 ? (sc[i] & 0xF) : (sc[i - 8] >> 4);
  const int hi = (sc[8 + (i % 4)] >> (2 * (i / 4))) & 3;
  return (lo | (hi << 4)) - 32;
}
void DequantQ3_K(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;
  const uint8_t* qs = b + 32;
  const uint8_t* sc = b + 96;
  const float d = H(b + 108);
  for (int h = 0; h < 2; ++h) {
    for (int s = 0; s < 4; ++s) {
      for (int half = 0; half < 2; ++half) {
        const int g = 8 * h + 2 * s + half, bit = 4 * h + s;
        const float dl = d * static_cast<float>(Q3KScale(sc, g));
        const uint8_t* q = qs + h * 32 + half * 16;
        const uint8_t* hm = hmask + half * 16;
        float* o = y + 128 * h + 32 * s + 16 * half;
        for (int l = 0; l < 16; ++l) o[l] = dl * static_cast<float>(((q[l] >> (2 * s)) & 3) - (((hm[l] >> bit) & 1) ? 0 : 4));
      }
    }
  }
}
// Q5_K: Q4_K's 8 sub-blocks of 32 with 6-bit scales and mins, a fifth bit per value in qh
// (sub-block j's bit is bit j of qh[l]).
void DequantQ5_K(const uint8_t* b, float* y) {
  const float d = H(b), dmin = H(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, mn;
    ScaleMinK4(j, scales, &sc, &mn);
    const float dl = d * static_cast<float>(sc);
    const float ml = dmin * static_cast<float>(mn);
    for (int l = 0; l < 32; ++l) {
      const int lo = (qs[(j / 2) * 32 + l] >> (4 * (j % 2))) & 0xF;
      const int hi = (qh[l] >> j) & 1;
      y[j * 32 + l] = dl * static_cast<float>(lo | (hi << 4)) - ml;
    }
  }
}
void DequantQ6_K(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = H(b + 208);
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 4; ++k) {
      for (int l = 0; l < 32; ++l) {
        const int pos = h * 128 + k * 32 + l;
        const int lo = (ql[h * 64 + (k & 1) * 32 + l] >> (4 * (k >> 1))) & 0xF;
        const int hi = (qh[h * 32 + l] >> (2 * k)) & 3;
        const float dl = d * static_cast<float>(sc[pos / 16]);
        y[pos] = dl * static_cast<float>((lo | (hi << 4)) - 32);
      }
    }
  }
}

// --- quantizers (ggml reference: quantize_row_*_ref) ---
void QuantQ8_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  PutH(b, d);
  for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::lround(x[j] * id)));
}
void QuantQ4_0(const float* x, uint8_t* b) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j) {
    if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); max = x[j]; }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  PutH(b, d);
  for (int j = 0; j < 16; ++j) {
    const int x0 = std::min(15, static_cast<int>(x[j] * id + 8.5f));
    const int x1 = std::min(15, static_cast<int>(x[j + 16] * id + 8.5f));
    b[2 + j] = static_cast<uint8_t>(x0 | (x1 << 4));
  }
}
void QuantQ4_1(const float* x, uint8_t* b) {
  float mn = x[0], mx = x[0];
  for (int j = 1; j < 32; ++j) { mn = std::min(mn, x[j]); mx = std::max(mx, x[j]); }
  const float d = (mx - mn) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  PutH(b, d);
  PutH(b + 2, mn);
  for (int j = 0; j < 16; ++j) {
    const int x0 = std::min(15, static_cast<int>((x[j] - mn) * id + 0.5f));
    const int x1 = std::min(15, static_cast<int>((x[j + 16] - mn) * id + 0.5f));
    b[4 + j] = static_cast<uint8_t>(x0 | (x1 << 4));
  }
}
void QuantQ5(const float* x, uint8_t* b, bool has_min) {
  float d, id, mn = 0.0f;
  if (has_min) {
    float mx = x[0];
    mn = x[0];
    for (int j = 1; j < 32; ++j) { mn = std::min(mn, x[j]); mx = std::max(mx, x[j]); }
    d = (mx - mn) / 31.0f;
    PutH(b, d);
    PutH(b + 2, mn);
  } else {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j) {
      if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); max = x[j]; }
    }
    d = max / -16.0f;
    PutH(b, d);
  }
  id = d != 0.0f ? 1.0f / d : 0.0f;
  uint8_t* p = b + (has_min ? 4 : 2);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    int x0, x1;
    if (has_min) {
      x0 = static_cast<int>((x[j] - mn) * id + 0.5f);
      x1 = static_cast<int>((x[j + 16] - mn) * id + 0.5f);
    } else {
      x0 = std::min(31, static_cast<int>(x[j] * id + 16.5f));
      x1 = std::min(31, static_cast<int>(x[j + 16] * id + 16.5f));
    }
    p[4 + j] = static_cast<uint8_t>((x0 & 15) | ((x1 & 15) << 4));
    qh |= static_cast<uint32_t>((x0 & 0x10) >> 4) << j;
    qh |= static_cast<uint32_t>((x1 & 0x10) >> 4) << (j + 16);
  }
  std::memcpy(p, &qh, 4);
}

constexpr int64_t kNf4Block = 64;

void DequantNf4(const uint8_t* b, float* y) {
  float absmax;
  std::memcpy(&absmax, b, 4);
  const uint8_t* q = b + 4;
  for (int j = 0; j < 32; ++j) {
    y[2 * j] = kNf4Codes[q[j] >> 4] * absmax;
    y[2 * j + 1] = kNf4Codes[q[j] & 15] * absmax;
  }
}

uint8_t NearestNf4(float v) {
  // Codes are sorted: pick the nearest by midpoints (ties go to the upper code).
  int best = 0;
  for (int c = 1; c < 16; ++c) {
    if (v >= 0.5f * (kNf4Codes[c - 1] + kNf4Codes[c])) best = c;
  }
  return static_cast<uint8_t>(best);
}

float Nf4Scale(const float* x) {
  float absmax = 0.0f;
  for (int j = 0; j < 64; ++j) absmax = std::max(absmax, std::fabs(x[j]));
  return absmax;
}

void QuantNf4WithScale(const float* x, float absmax, uint8_t* b) {
  std::memcpy(b, &absmax, 4);
  const float inv = absmax > 0 ? 1.0f / absmax : 0.0f;
  for (int j = 0; j < 32; ++j) b[4 + j] = static_cast<uint8_t>((NearestNf4(x[2 * j] * inv) << 4) | NearestNf4(x[2 * j + 1] * inv));
}

// NF3 / NF2: nearest code of x / scale (division, then the nearest code with ties to the lower
// one, as an argmin over the codes gives).
template <int kBits>
void DequantNfLow(const uint8_t* b, float* y) {
  const float* codes = kBits == 3 ? kNf3Codes : kNf2Codes;
  float absmax;
  std::memcpy(&absmax, b, 4);
  const uint8_t* q = b + 4;
  if constexpr (kBits == 3) {  // eight codes per little-endian 24-bit word
    for (int k = 0; k < 8; ++k) {
      const uint32_t word = static_cast<uint32_t>(q[3 * k]) | (static_cast<uint32_t>(q[3 * k + 1]) << 8) | (static_cast<uint32_t>(q[3 * k + 2]) << 16);
      for (int j = 0; j < 8; ++j) y[8 * k + j] = codes[(word >> (3 * j)) & 7] * absmax;
    }
  } else {  // four codes per byte
    for (int k = 0; k < 16; ++k)
      for (int j = 0; j < 4; ++j) y[4 * k + j] = codes[(q[k] >> (2 * j)) & 3] * absmax;
  }
}
// The block's scale is searched (as GPTQ/AWQ-style clipping does): absmax x f for f
// in 1.0, 0.95, ..., 0.55, keeping the one with the least squared error (values beyond the
// scale take the end codes). With 8 or 4 codes, clipping the rare large values pays: on
// Gaussian rows NF3's relative error 0.202 -> 0.184, NF2's 0.557 -> 0.383 (QuantTest prints them).
template <int kBits>
int NearestNfLow(float v) {
  constexpr int kCodes = 1 << kBits;
  const float* codes = kBits == 3 ? kNf3Codes : kNf2Codes;
  int best = 0;
  for (int c = 1; c < kCodes; ++c) {
    if (std::fabs(v - codes[c]) < std::fabs(v - codes[best])) best = c;
  }
  return best;
}
template <int kBits>
float NfLowScale(const float* x) {
  const float* codes = kBits == 3 ? kNf3Codes : kNf2Codes;
  float absmax = 0.0f;
  for (int j = 0; j < 64; ++j) absmax = std::max(absmax, std::fabs(x[j]));
  float scale = absmax;
  if (absmax > 0) {
    double best_err = -1;
    for (int step = 0; step <= 9; ++step) {
      const float cand = absmax * (1.0f - 0.05f * static_cast<float>(step));
      double err = 0;
      for (int j = 0; j < 64; ++j) {
        const double e = static_cast<double>(codes[NearestNfLow<kBits>(x[j] / cand)]) * cand - x[j];
        err += e * e;
      }
      if (best_err < 0 || err < best_err) { best_err = err; scale = cand; }
    }
  }
  return scale;
}

template <int kBits>
void QuantNfLowWithScale(const float* x, float scale, uint8_t* b) {
  std::memcpy(b, &scale, 4);
  uint8_t* q = b + 4;
  std::memset(q, 0, 64 * kBits / 8);
  for (int j = 0; j < 64; ++j) {
    const int best = scale > 0 ? NearestNfLow<kBits>(x[j] / scale) : NearestNfLow<kBits>(0.0f);
    const int bit = j * kBits;
    q[bit / 8] = static_cast<uint8_t>(q[bit / 8] | (best << (bit % 8)));
    if (bit % 8 + kBits > 8) q[bit / 8 + 1] = static_cast<uint8_t>(q[bit / 8 + 1] | (best >> (8 - bit % 8)));
  }
}

// --- K-quant quantizers (fedtune's own; ggml's reference uses a different, weighted search) ---
// Q2_K: per 16-value group a least-squares fit of x ~ s q - m (s >= 0, m >= 0, q in 0..3) over
// candidate scales, then the group scales and mins quantized to 4 bits against fp16 super-block
// factors, then the codes chosen again against the stored values.
void FitAsymGroup(const float* x, int n, int nmax, float* s_out, float* m_out) {
  float lo = 0.0f, hi = x[0];
  for (int j = 0; j < n; ++j) { lo = std::min(lo, x[j]); hi = std::max(hi, x[j]); }
  if (hi <= lo) { *s_out = 0.0f; *m_out = -lo; return; }
  double best_err = -1;
  for (int step = 0; step <= 20; ++step) {
    const float iscale = (static_cast<float>(nmax) - 1.0f + 0.1f * static_cast<float>(step)) / (hi - lo);
    double sq = 0, sq2 = 0, sx = 0, sxq = 0;
    int q[16];
    for (int j = 0; j < n; ++j) {
      q[j] = std::clamp(static_cast<int>(std::lround(iscale * (x[j] - lo))), 0, nmax);
      sq += q[j]; sq2 += q[j] * q[j]; sx += x[j]; sxq += static_cast<double>(x[j]) * q[j];
    }
    const double det = n * sq2 - sq * sq;
    double s, mn;
    if (det <= 0) { s = 0; mn = sx / n; }
    else { s = (n * sxq - sq * sx) / det; mn = (sq2 * sx - sq * sxq) / det; }
    if (mn > 0) { mn = 0; s = sq2 > 0 ? sxq / sq2 : 0; }
    if (s < 0) s = 0;
    double err = 0;
    for (int j = 0; j < n; ++j) {
      const double e = s * q[j] + mn - x[j];
      err += e * e;
    }
    if (best_err < 0 || err < best_err) { best_err = err; *s_out = static_cast<float>(s); *m_out = static_cast<float>(-mn); }
  }
}
void QuantQ2_K(const float* x, uint8_t* b) {
  float sg[16], mg[16], smax = 0.0f, mmax = 0.0f;
  for (int g = 0; g < 16; ++g) {
    FitAsymGroup(x + 16 * g, 16, 3, &sg[g], &mg[g]);
    smax = std::max(smax, sg[g]);
    mmax = std::max(mmax, mg[g]);
  }
  PutH(b + 80, smax / 15.0f);
  PutH(b + 82, mmax / 15.0f);
  const float d = H(b + 80), dmin = H(b + 82);
  std::memset(b, 0, 80);
  for (int g = 0; g < 16; ++g) {
    const int sc = d > 0 ? std::clamp(static_cast<int>(std::lround(sg[g] / d)), 0, 15) : 0;
    const int mc = dmin > 0 ? std::clamp(static_cast<int>(std::lround(mg[g] / dmin)), 0, 15) : 0;
    b[g] = static_cast<uint8_t>(sc | (mc << 4));
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mc);
    for (int l = 0; l < 16; ++l) {
      const int i = 16 * g + l;
      const int q = dl > 0 ? std::clamp(static_cast<int>(std::lround((x[i] + ml) / dl)), 0, 3) : 0;
      b[16 + (i / 128) * 32 + i % 32] = static_cast<uint8_t>(b[16 + (i / 128) * 32 + i % 32] | (q << (2 * ((i / 32) % 4))));
    }
  }
}
// Q3_K: per 16-value group a symmetric fit x ~ s q (q in -4..3) over candidate scales of both
// signs (the longer side of the code range goes to the larger-magnitude side), then signed 6-bit
// group scales against one fp16 factor, then the codes against the stored values.
void QuantQ3_K(const float* x, uint8_t* b) {
  float sg[16], smax = 0.0f;
  for (int g = 0; g < 16; ++g) {
    const float* xg = x + 16 * g;
    float vmax = 0.0f;
    for (int j = 0; j < 16; ++j) if (std::fabs(xg[j]) > std::fabs(vmax)) vmax = xg[j];
    sg[g] = 0.0f;
    if (vmax == 0.0f) continue;
    double best_err = -1;
    for (int sign = -1; sign <= 1; sign += 2) {
      for (int step = -6; step <= 6; ++step) {
        const float iscale = static_cast<float>(sign) * ((sign < 0 ? 4.0f : 3.0f) + 0.1f * static_cast<float>(step)) / vmax;
        double sxq = 0, sq2 = 0;
        int q[16];
        for (int j = 0; j < 16; ++j) {
          q[j] = std::clamp(static_cast<int>(std::lround(iscale * xg[j])), -4, 3);
          sxq += static_cast<double>(xg[j]) * q[j];
          sq2 += q[j] * q[j];
        }
        const double s = sq2 > 0 ? sxq / sq2 : 0;
        double err = 0;
        for (int j = 0; j < 16; ++j) {
          const double e = s * q[j] - xg[j];
          err += e * e;
        }
        if (best_err < 0 || err < best_err) { best_err = err; sg[g] = static_cast<float>(s); }
      }
    }
    if (std::fabs(sg[g]) > std::fabs(smax)) smax = sg[g];
  }
  PutH(b + 108, smax / -32.0f);
  const float d = H(b + 108);
  std::memset(b, 0, 108);
  uint8_t* sc = b + 96;
  for (int g = 0; g < 16; ++g) {
    const int c = d != 0 ? std::clamp(static_cast<int>(std::lround(sg[g] / d)), -32, 31) : 0;
    const int u = c + 32;
    if (g < 8) sc[g] = static_cast<uint8_t>(sc[g] | (u & 0xF));
    else sc[g - 8] = static_cast<uint8_t>(sc[g - 8] | ((u & 0xF) << 4));
    sc[8 + g % 4] = static_cast<uint8_t>(sc[8 + g % 4] | ((u >> 4) << (2 * (g / 4))));
    const float dl = d * static_cast<float>(c);
    for (int l = 0; l < 16; ++l) {
      const int i = 16 * g + l;
      const int q = dl != 0 ? std::clamp(static_cast<int>(std::lround(x[i] / dl)), -4, 3) + 4 : 4;
      b[32 + (i / 128) * 32 + i % 32] = static_cast<uint8_t>(b[32 + (i / 128) * 32 + i % 32] | ((q & 3) << (2 * ((i / 32) % 4))));
      b[i % 32] = static_cast<uint8_t>(b[i % 32] | ((q >> 2) << (i / 32)));
    }
  }
}

// NF4_DQ row: header (scale, mean), nb absmax codes, nb x 32 bytes of nibbles.
constexpr size_t kNf4DqHeader = 8;

void DequantNf4DqRow(const uint8_t* s, float* y, int64_t n) {
  const int64_t nb = n / kNf4Block;
  float scale, mean;
  std::memcpy(&scale, s, 4);
  std::memcpy(&mean, s + 4, 4);
  const auto* codes = reinterpret_cast<const int8_t*>(s + kNf4DqHeader);
  const uint8_t* q = s + kNf4DqHeader + nb;
  for (int64_t i = 0; i < nb; ++i) {
    const float absmax = mean + static_cast<float>(codes[i]) * scale;
    const uint8_t* qb = q + i * 32;
    float* yb = y + i * kNf4Block;
    for (int j = 0; j < 32; ++j) {
      yb[2 * j] = kNf4Codes[qb[j] >> 4] * absmax;
      yb[2 * j + 1] = kNf4Codes[qb[j] & 15] * absmax;
    }
  }
}

void QuantNf4DqRow(const float* x, uint8_t* d, int64_t n) {
  const int64_t nb = n / kNf4Block;
  std::vector<float> absmax(static_cast<size_t>(nb), 0.0f);
  double sum = 0;
  for (int64_t i = 0; i < nb; ++i) {
    for (int j = 0; j < kNf4Block; ++j) absmax[static_cast<size_t>(i)] = std::max(absmax[static_cast<size_t>(i)], std::fabs(x[i * kNf4Block + j]));
    sum += absmax[static_cast<size_t>(i)];
  }
  const float mean = nb ? static_cast<float>(sum / static_cast<double>(nb)) : 0.0f;
  float spread = 0.0f;
  for (float a : absmax) spread = std::max(spread, std::fabs(a - mean));
  const float scale = spread / 127.0f;
  std::memcpy(d, &scale, 4);
  std::memcpy(d + 4, &mean, 4);
  auto* codes = reinterpret_cast<int8_t*>(d + kNf4DqHeader);
  uint8_t* q = d + kNf4DqHeader + nb;
  for (int64_t i = 0; i < nb; ++i) {
    const float a = absmax[static_cast<size_t>(i)];
    const int c = scale > 0 ? static_cast<int>(std::lround((a - mean) / scale)) : 0;
    codes[i] = static_cast<int8_t>(std::clamp(c, -127, 127));
    // Codes are chosen against the absmax the reader will reconstruct.
    const float stored = mean + static_cast<float>(codes[i]) * scale;
    const float inv = stored > 0 ? 1.0f / stored : 0.0f;
    const float* xb = x + i * kNf4Block;
    for (int j = 0; j < 32; ++j) q[i * 32 + j] = static_cast<uint8_t>((NearestNf4(xb[2 * j] * inv) << 4) | NearestNf4(xb[2 * j + 1] * inv));
  }
}

}  // namespace

// kNf3Codes / kNf2Codes: QLoRA's normal-float construction with 2^b codes, as the NFQuantizer of
// PEFT <= 0.19 (peft/utils/loftq_utils.py, create_normal_map(offset=0.9677083, symmetric=False,
// num_bits=b)) built them: ppf of linspace(offset, 0.5, 2^(b-1) + 1) and of linspace(offset, 0.5,
// 2^(b-1)) mirrored, 0, sorted, divided by the largest; float32. With b = 4 it gives kNf4Codes.
const float kNf3Codes[8] = {-1.0f, -0.4786292016506195f, -0.217141792178154f, 0.0f, 0.16093020141124725f,
                            0.33791524171829224f, 0.5626170039176941f, 1.0f};
const float kNf2Codes[4] = {-1.0f, 0.0f, 0.33791524171829224f, 1.0f};

const float kNf4Codes[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
                             -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
                             0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                             0.7229568362236023f, 1.0f};

std::optional<GgmlTypeTraits> GetTypeTraits(uint32_t id) {
  switch (static_cast<GgmlType>(id)) {
    case GgmlType::kF32: return GgmlTypeTraits{"F32", 1, 4, true};
    case GgmlType::kF16: return GgmlTypeTraits{"F16", 1, 2, true};
    case GgmlType::kBF16: return GgmlTypeTraits{"BF16", 1, 2, true};
    case GgmlType::kNF4: return GgmlTypeTraits{"NF4", kNf4Block, 36, true};
    case GgmlType::kNF4DQ: return GgmlTypeTraits{"NF4_DQ", kNf4Block, 33, true};  // + 8 bytes per row (RowBytes)
    case GgmlType::kNF3: return GgmlTypeTraits{"NF3", kNf4Block, 28, true};
    case GgmlType::kNF2: return GgmlTypeTraits{"NF2", kNf4Block, 20, true};
    case GgmlType::kQ4_0: return GgmlTypeTraits{"Q4_0", kQK, 18, true};
    case GgmlType::kQ4_1: return GgmlTypeTraits{"Q4_1", kQK, 20, true};
    case GgmlType::kQ5_0: return GgmlTypeTraits{"Q5_0", kQK, 22, true};
    case GgmlType::kQ5_1: return GgmlTypeTraits{"Q5_1", kQK, 24, true};
    case GgmlType::kQ8_0: return GgmlTypeTraits{"Q8_0", kQK, 34, true};
    case GgmlType::kQ2_K: return GgmlTypeTraits{"Q2_K", kQKK, 84, true};
    case GgmlType::kQ3_K: return GgmlTypeTraits{"Q3_K", kQKK, 110, true};
    case GgmlType::kQ4_K: return GgmlTypeTraits{"Q4_K", kQKK, 144, true};
    case GgmlType::kQ5_K: return GgmlTypeTraits{"Q5_K", kQKK, 176, true};
    case GgmlType::kQ6_K: return GgmlTypeTraits{"Q6_K", kQKK, 210, true};
    case GgmlType::kQ8_K: return GgmlTypeTraits{"Q8_K", kQKK, 292, false};
  }
  return std::nullopt;
}

GgmlTypeTraits TypeTraits(GgmlType t) {
  auto tr = GetTypeTraits(static_cast<uint32_t>(t));
  FT_CHECK(tr.has_value());
  return *tr;
}

std::optional<GgmlType> GgmlTypeFromName(std::string_view name) {
  std::string up(name);
  for (char& c : up) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (uint32_t id = 0; id <= 30; ++id) {
    auto tr = GetTypeTraits(id);
    if (tr && up == tr->name) return static_cast<GgmlType>(id);
  }
  if (up == "NF4") return GgmlType::kNF4;
  if (up == "NF4_DQ") return GgmlType::kNF4DQ;
  if (up == "NF3") return GgmlType::kNF3;
  if (up == "NF2") return GgmlType::kNF2;
  return std::nullopt;
}

absl::StatusOr<size_t> RowBytes(GgmlType t, int64_t n) {
  const auto tr = TypeTraits(t);
  if (n < 0 || n % tr.block_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("row of ", n, " values is not a multiple of ",
                                                   tr.name, "'s block size ", tr.block_size));
  }
  return static_cast<size_t>(n / tr.block_size) * tr.type_size + (t == GgmlType::kNF4DQ ? kNf4DqHeader : 0);
}

bool CanQuantize(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: case GgmlType::kF16: case GgmlType::kBF16: case GgmlType::kQ8_0: case GgmlType::kQ4_0: case GgmlType::kQ4_1:
    case GgmlType::kQ5_0: case GgmlType::kQ5_1: case GgmlType::kNF4: case GgmlType::kNF4DQ: case GgmlType::kNF3: case GgmlType::kNF2:
    case GgmlType::kQ2_K: case GgmlType::kQ3_K:
      return true;
    default:
      return false;
  }
}

GgmlType RowCompatibleType(GgmlType t, int64_t n) {
  if (TypeTraits(t).block_size != kQKK || n % kQKK == 0) return t;
  switch (t) {
    case GgmlType::kQ2_K: return GgmlType::kNF2;
    case GgmlType::kQ3_K: return GgmlType::kNF3;
    case GgmlType::kQ6_K: case GgmlType::kQ8_K: return GgmlType::kQ8_0;
    default: return GgmlType::kNF4;
  }
}

void DequantizeRow(GgmlType t, const void* src, float* dst, int64_t n) {
  const auto tr = TypeTraits(t);
  FT_CHECK(tr.supported && n % tr.block_size == 0);
  const auto* s = static_cast<const uint8_t*>(src);
  const int64_t nb = n / tr.block_size;
  switch (t) {
    case GgmlType::kF32: std::memcpy(dst, src, static_cast<size_t>(n) * 4); return;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = H(s + 2 * i);
      return;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, s + 2 * i, 2);
        dst[i] = Bf16ToFp32(v);
      }
      return;
    case GgmlType::kNF4DQ: DequantNf4DqRow(s, dst, n); return;
    default: break;
  }
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = s + static_cast<size_t>(i) * tr.type_size;
    float* y = dst + i * tr.block_size;
    switch (t) {
      case GgmlType::kQ4_0: DequantQ4_0(b, y); break;
      case GgmlType::kQ4_1: DequantQ4_1(b, y); break;
      case GgmlType::kQ5_0: DequantQ5(b, y, false); break;
      case GgmlType::kQ5_1: DequantQ5(b, y, true); break;
      case GgmlType::kQ8_0: DequantQ8_0(b, y); break;
      case GgmlType::kQ2_K: DequantQ2_K(b, y); break;
      case GgmlType::kQ3_K: DequantQ3_K(b, y); break;
      case GgmlType::kQ4_K: DequantQ4_K(b, y); break;
      case GgmlType::kQ5_K: DequantQ5_K(b, y); break;
      case GgmlType::kQ6_K: DequantQ6_K(b, y); break;
      case GgmlType::kNF4: DequantNf4(b, y); break;
      case GgmlType::kNF3: DequantNfLow<3>(b, y); break;
      case GgmlType::kNF2: DequantNfLow<2>(b, y); break;
      default: FT_CHECK(false);
    }
  }
}

absl::Status QuantizeRow(GgmlType t, const float* src, void* dst, int64_t n) {
  FT_ASSIGN_OR_RETURN(size_t bytes, RowBytes(t, n));
  (void)bytes;
  auto* d = static_cast<uint8_t*>(dst);
  const auto tr = TypeTraits(t);
  switch (t) {
    case GgmlType::kF32: std::memcpy(dst, src, static_cast<size_t>(n) * 4); return absl::OkStatus();
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) PutH(d + 2 * i, src[i]);
      return absl::OkStatus();
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t v = Fp32ToBf16(src[i]);
        std::memcpy(d + 2 * i, &v, 2);
      }
      return absl::OkStatus();
    case GgmlType::kQ8_0: case GgmlType::kQ4_0: case GgmlType::kQ4_1:
    case GgmlType::kQ5_0: case GgmlType::kQ5_1:
      break;
    case GgmlType::kNF4:
      for (int64_t i = 0; i < n / kNf4Block; ++i) {
        const float* x = src + i * kNf4Block;
        QuantNf4WithScale(x, Nf4Scale(x), d + static_cast<size_t>(i) * tr.type_size);
      }
      return absl::OkStatus();
    case GgmlType::kNF4DQ:
      QuantNf4DqRow(src, d, n);
      return absl::OkStatus();
    case GgmlType::kNF3: case GgmlType::kNF2: case GgmlType::kQ2_K: case GgmlType::kQ3_K:
      for (int64_t i = 0; i < n / tr.block_size; ++i) {
        const float* x = src + i * tr.block_size;
        uint8_t* b = d + static_cast<size_t>(i) * tr.type_size;
        switch (t) {
          case GgmlType::kNF3: QuantNfLowWithScale<3>(x, NfLowScale<3>(x), b); break;
          case GgmlType::kNF2: QuantNfLowWithScale<2>(x, NfLowScale<2>(x), b); break;
          case GgmlType::kQ2_K: QuantQ2_K(x, b); break;
          default: QuantQ3_K(x, b); break;
        }
      }
      return absl::OkStatus();
    default:
      return absl::UnimplementedError(absl::StrCat("quantizing to ", tr.name, " is not supported"));
  }
  for (int64_t i = 0; i < n / kQK; ++i) {
    const float* x = src + i * kQK;
    uint8_t* b = d + static_cast<size_t>(i) * tr.type_size;
    switch (t) {
      case GgmlType::kQ8_0: QuantQ8_0(x, b); break;
      case GgmlType::kQ4_0: QuantQ4_0(x, b); break;
      case GgmlType::kQ4_1: QuantQ4_1(x, b); break;
      case GgmlType::kQ5_0: QuantQ5(x, b, false); break;
      default: QuantQ5(x, b, true); break;
    }
  }
  return absl::OkStatus();
}

bool IsNormalFloat(GgmlType t) { return t == GgmlType::kNF4 || t == GgmlType::kNF3 || t == GgmlType::kNF2; }

float NfBlockScale(GgmlType t, const float* x) {
  FT_CHECK(IsNormalFloat(t));
  return t == GgmlType::kNF4 ? Nf4Scale(x) : t == GgmlType::kNF3 ? NfLowScale<3>(x) : NfLowScale<2>(x);
}

float NfRound(GgmlType t, float v, float scale) {
  FT_CHECK(IsNormalFloat(t));
  if (t == GgmlType::kNF4) return kNf4Codes[NearestNf4(v * (scale > 0 ? 1.0f / scale : 0.0f))] * scale;
  const float q = scale > 0 ? v / scale : 0.0f;
  return t == GgmlType::kNF3 ? kNf3Codes[NearestNfLow<3>(q)] * scale : kNf2Codes[NearestNfLow<2>(q)] * scale;
}

absl::Status QuantizeNfRowWithScales(GgmlType t, const float* src, const float* scales, void* dst, int64_t n) {
  if (!IsNormalFloat(t)) return absl::InvalidArgumentError(absl::StrCat(TypeTraits(t).name, " is not a normal-float block type"));
  FT_ASSIGN_OR_RETURN(size_t bytes, RowBytes(t, n));
  (void)bytes;
  auto* d = static_cast<uint8_t*>(dst);
  const size_t ts = TypeTraits(t).type_size;
  for (int64_t i = 0; i < n / kNf4Block; ++i) {
    const float* x = src + i * kNf4Block;
    uint8_t* b = d + static_cast<size_t>(i) * ts;
    if (t == GgmlType::kNF4) QuantNf4WithScale(x, scales[i], b);
    else if (t == GgmlType::kNF3) QuantNfLowWithScale<3>(x, scales[i], b);
    else QuantNfLowWithScale<2>(x, scales[i], b);
  }
  return absl::OkStatus();
}

}  // namespace fedtune::kernels

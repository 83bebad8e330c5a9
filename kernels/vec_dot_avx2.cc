// AVX2 + FMA + F16C kernels; compiled with those flags and only reached through the run-time
// dispatch in vec_dot.cc. Dots use FMA freely; dequantizers keep the reference operation order
// (multiply, then add) so their output is bit-identical to DequantizeRow.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/avx2_util.h"
#include "kernels/vec_dot.h"

namespace fedtune::kernels::avx2 {
namespace {

inline float Half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256 U8ToF32(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 I8ToF32(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// The 32 nibble values of a Q4 block as four vectors of 8 floats (positions 0-7, 8-15, 16-23, 24-31).
inline void Nibbles(const uint8_t* qs, __m256 q[4]) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  q[0] = U8ToF32(lo);
  q[1] = U8ToF32(_mm_srli_si128(lo, 8));
  q[2] = U8ToF32(hi);
  q[3] = U8ToF32(_mm_srli_si128(hi, 8));
}

// The 32 nibbles of a Q4 block as 32 unsigned bytes in element order (0-15 low, 16-31 high).
inline __m256i NibbleBytes(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  return _mm256_set_m128i(hi, lo);
}

// u (unsigned bytes) . q (signed bytes) as 8 float partial sums: pairs in 16 bits (no saturation:
// |u| <= 128 for Q8_0's magnitudes, |q| <= 127, 2 * 128 * 127 < 2^15), then 32-bit sums.
inline __m256 DotBytes(__m256i u, __m256i q) {
  const __m256i p16 = _mm256_maddubs_epi16(u, q);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

inline __m256i LoadQ(const Q8Block* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->q)); }

}  // namespace

void QuantizeRowQ8(const float* x, Q8Block* y, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / 32; ++b, x += 32, ++y) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps(), finite = _mm256_setzero_ps();  // as the portable quantizer
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(x + 8 * k);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
      finite = _mm256_add_ps(finite, _mm256_mul_ps(v[k], zero));
    }
    *y = Q8Block{};
    if (HSum(finite) != 0.0f) {
      y->d = y->s = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float d = HMax(amax) / 127.0f;
    if (!(d >= std::numeric_limits<float>::min())) continue;
    const __m256 vid = _mm256_set1_ps(1.0f / d);
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256i i[4];  // round to nearest even (the default MXCSR mode), as std::nearbyint
    for (int k = 0; k < 4; ++k)
      i[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_mul_ps(v[k], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi));
    // Pack 32-bit -> 16 -> 8 bits; the packs interleave 128-bit lanes, the permute restores order.
    const __m256i p01 = _mm256_packs_epi32(i[0], i[1]), p23 = _mm256_packs_epi32(i[2], i[3]);
    const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y->q), p);
    const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    y->d = d;
    y->s = d * static_cast<float>(_mm_cvtsi128_si32(s));
  }
}

namespace {
enum class Q8Kind { kQ4_0, kQ4_1, kQ8_0 };

// One weight row against C activation rows (row c at x + c * nb), each weight block loaded and
// unpacked once. Every column's arithmetic is the same whatever C (explicit FMAs, no
// contraction left to the compiler), so a row's result does not depend on how many activation
// rows are dotted together.
template <Q8Kind K, int C>
void RowDots(const uint8_t* row, const Q8Block* x, int64_t nb, float* y, int64_t ys) {
  constexpr int64_t kBytes = K == Q8Kind::kQ4_0 ? 18 : K == Q8Kind::kQ4_1 ? 20 : 34;
  __m256 acc[C];
  float m[C];
  for (int c = 0; c < C; ++c) {
    acc[c] = _mm256_setzero_ps();
    m[c] = 0.0f;
  }
  for (int64_t b = 0; b < nb; ++b, row += kBytes) {
    const float dw = Half(row);
    __m256i u;
    float mw = 0.0f;  // Q4_1's block minimum (times sum a = s)
    if constexpr (K == Q8Kind::kQ8_0) {
      u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2));
    } else if constexpr (K == Q8Kind::kQ4_1) {
      u = NibbleBytes(row + 4);
      mw = Half(row + 2);
    } else {
      u = _mm256_sub_epi8(NibbleBytes(row + 2), _mm256_set1_epi8(8));  // signed weights -8..7
    }
    for (int c = 0; c < C; ++c) {
      const Q8Block& xb = x[c * nb + b];
      __m256 p;
      if constexpr (K != Q8Kind::kQ4_1) {
        p = DotBytes(_mm256_sign_epi8(u, u), _mm256_sign_epi8(LoadQ(&xb), u));  // |w| . (a with w's sign)
      } else {
        p = DotBytes(u, LoadQ(&xb));
        m[c] = std::fma(mw, xb.s, m[c]);
      }
      acc[c] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * xb.d), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) y[c * ys] = HSum(acc[c]) + m[c];
}

template <Q8Kind K>
void Dots(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t ys) {
  const int64_t nb = n / 32;
  int64_t c = 0;
  for (; c + 4 <= rows; c += 4) RowDots<K, 4>(row, x + c * nb, nb, y + c * ys, ys);
  switch (rows - c) {
    case 3: RowDots<K, 3>(row, x + c * nb, nb, y + c * ys, ys); break;
    case 2: RowDots<K, 2>(row, x + c * nb, nb, y + c * ys, ys); break;
    case 1: RowDots<K, 1>(row, x + c * nb, nb, y + c * ys, ys); break;
    default: break;
  }
}
}  // namespace

void DotQ4_0Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t ys) { Dots<Q8Kind::kQ4_0>(row, x, n, rows, y, ys); }
void DotQ4_1Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t ys) { Dots<Q8Kind::kQ4_1>(row, x, n, rows, y, ys); }
void DotQ8_0Q8(const uint8_t* row, const Q8Block* x, int64_t n, int64_t rows, float* y, int64_t ys) { Dots<Q8Kind::kQ8_0>(row, x, n, rows, y, ys); }

float DotQ4_1(const uint8_t* row, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / 32; ++b, row += 20, x += 32) {
    __m256 q[4];
    Nibbles(row + 4, q);
    const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8), x2 = _mm256_loadu_ps(x + 16), x3 = _mm256_loadu_ps(x + 24);
    __m256 qx = _mm256_mul_ps(q[0], x0);
    qx = _mm256_fmadd_ps(q[1], x1, qx);
    qx = _mm256_fmadd_ps(q[2], x2, qx);
    qx = _mm256_fmadd_ps(q[3], x3, qx);
    const __m256 xs = _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(Half(row)), qx, acc);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(Half(row + 2)), xs, acc);
  }
  return HSum(acc);
}

float DotQ4_0(const uint8_t* row, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int64_t b = 0; b < n / 32; ++b, row += 18, x += 32) {
    __m256 q[4];
    Nibbles(row + 2, q);
    __m256 qx = _mm256_mul_ps(_mm256_sub_ps(q[0], eight), _mm256_loadu_ps(x));
    qx = _mm256_fmadd_ps(_mm256_sub_ps(q[1], eight), _mm256_loadu_ps(x + 8), qx);
    qx = _mm256_fmadd_ps(_mm256_sub_ps(q[2], eight), _mm256_loadu_ps(x + 16), qx);
    qx = _mm256_fmadd_ps(_mm256_sub_ps(q[3], eight), _mm256_loadu_ps(x + 24), qx);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(Half(row)), qx, acc);
  }
  return HSum(acc);
}

float DotQ8_0(const uint8_t* row, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / 32; ++b, row += 34, x += 32) {
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 18));
    __m256 qx = _mm256_mul_ps(I8ToF32(q0), _mm256_loadu_ps(x));
    qx = _mm256_fmadd_ps(I8ToF32(_mm_srli_si128(q0, 8)), _mm256_loadu_ps(x + 8), qx);
    qx = _mm256_fmadd_ps(I8ToF32(q1), _mm256_loadu_ps(x + 16), qx);
    qx = _mm256_fmadd_ps(I8ToF32(_mm_srli_si128(q1, 8)), _mm256_loadu_ps(x + 24), qx);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(Half(row)), qx, acc);
  }
  return HSum(acc);
}

float DotF32(const uint8_t* row, const float* x, int64_t n) {
  const float* w = reinterpret_cast<const float*>(row);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc);
  float s = HSum(acc);
  for (; i < n; ++i) s += w[i] * x[i];
  return s;
}

float DotF16(const uint8_t* row, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i)));
    acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i), acc);
  }
  float s = HSum(acc);
  for (; i < n; ++i) s += Half(row + 2 * i) * x[i];
  return s;
}

void DequantQ4_1(const uint8_t* row, float* y, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, row += 20, y += 32) {
    __m256 q[4];
    Nibbles(row + 4, q);
    const __m256 d = _mm256_set1_ps(Half(row)), m = _mm256_set1_ps(Half(row + 2));
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(y + 8 * k, _mm256_add_ps(_mm256_mul_ps(d, q[k]), m));
  }
}

void DequantQ4_0(const uint8_t* row, float* y, int64_t n) {
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int64_t b = 0; b < n / 32; ++b, row += 18, y += 32) {
    __m256 q[4];
    Nibbles(row + 2, q);
    const __m256 d = _mm256_set1_ps(Half(row));
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(d, _mm256_sub_ps(q[k], eight)));
  }
}

void DequantQ8_0(const uint8_t* row, float* y, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, row += 34, y += 32) {
    const __m256 d = _mm256_set1_ps(Half(row));
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 18));
    _mm256_storeu_ps(y, _mm256_mul_ps(I8ToF32(q0), d));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(I8ToF32(_mm_srli_si128(q0, 8)), d));
    _mm256_storeu_ps(y + 16, _mm256_mul_ps(I8ToF32(q1), d));
    _mm256_storeu_ps(y + 24, _mm256_mul_ps(I8ToF32(_mm_srli_si128(q1, 8)), d));
  }
}

}  // namespace fedtune::kernels::avx2

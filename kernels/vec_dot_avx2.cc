// AVX2 + FMA + F16C kernels; compiled with those flags and only reached through the run-time
// dispatch in vec_dot.cc. Dots use FMA freely; dequantizers keep the reference operation order
// (multiply, then add) so their output is bit-identical to DequantizeRow.
#include <immintrin.h>

#include <cstring>

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

}  // namespace

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

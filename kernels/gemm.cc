#include "kernels/gemm.h"

#include <cblas.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "kernels/ops.h"
#include "kernels/train_ops.h"
#include "kernels/vec_dot.h"

extern "C" void openblas_set_num_threads(int);

namespace fedtune::kernels {

namespace {
void BlasSingleThreaded() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}
inline CBLAS_TRANSPOSE Tr(bool t) { return t ? CblasTrans : CblasNoTrans; }
}  // namespace

template <>
void Gemm<float>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  BlasSingleThreaded();
  cblas_sgemm(CblasRowMajor, Tr(trans_a), Tr(trans_b), static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

template <>
void Gemm<double>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                  const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  BlasSingleThreaded();
  cblas_dgemm(CblasRowMajor, Tr(trans_a), Tr(trans_b), static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

void Sgemm(bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  Gemm<float>(false, trans_b, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}

void GemvQ(const QMatrix& w, int64_t r0, int64_t r1, const float* x, float* y) {
  const VecDotFn dot = GetVecDot(w.type);
  if (dot != nullptr) {
    for (int64_t r = r0; r < r1; ++r) y[r] = dot(w.row(r), x, w.cols);
    return;
  }
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(w.cols));
  for (int64_t r = r0; r < r1; ++r) {
    DequantizeRow(w.type, w.row(r), buf.data(), w.cols);
    float acc = 0.0f;
    for (int64_t i = 0; i < w.cols; ++i) acc += buf[static_cast<size_t>(i)] * x[i];
    y[r] = acc;
  }
}

int64_t WeightTileRows(int64_t n, int64_t k, int threads) {
  const int64_t by_cache = std::max<int64_t>(16, (262144 / std::max<int64_t>(k, 1)) / 16 * 16);
  const int64_t per_thread = std::max<int64_t>(16, ((n + threads - 1) / std::max(threads, 1) + 15) / 16 * 16);
  return std::min<int64_t>({by_cache, per_thread, 1024});
}

const char* CpuPathName() { return HaveAvx2Fma() ? "avx2+fma" : "generic"; }

}  // namespace fedtune::kernels

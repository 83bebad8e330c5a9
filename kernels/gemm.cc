#include "kernels/gemm.h"

#include <cblas.h>

#include <mutex>
#include <vector>

#include "kernels/ops.h"
#include "kernels/vec_dot.h"

extern "C" void openblas_set_num_threads(int);

namespace fedtune::kernels {

void Sgemm(bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
  cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), 1.0f, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
              static_cast<int>(ldc));
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

const char* CpuPathName() { return HaveAvx2Fma() ? "avx2+fma" : "generic"; }

}  // namespace fedtune::kernels

#include "kernels/bf16_gemm.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "common/fp16.h"
#include "common/log.h"
#include "kernels/fast_ops.h"
#include "kernels/thread_pool.h"
#include "kernels/vec_dot.h"

#include "common/status.h"

#if defined(FEDTUNE_HAVE_DNNL)
#include <cstdio>
#include <cstdlib>

#include <oneapi/dnnl/dnnl.hpp>

#include "kernels/cpu_features.h"

// oneDNN's OpenMP runtime (libgomp, linked explicitly): declared here rather than through
// <omp.h>, which clang does not find without an OpenMP package of its own (the fuzz build).
extern "C" void omp_set_num_threads(int n);
#endif

namespace fedtune::kernels {

void ToBf16(const float* x, uint16_t* out, int64_t n) {
  if (HaveAvx2Fma()) return avx2::ToBf16(x, out, n);
  for (int64_t i = 0; i < n; ++i) out[i] = Fp32ToBf16(x[i]);
}

const uint16_t* ToBf16Pooled(const float* x, int64_t n, std::vector<uint16_t>* buf) {
  buf->resize(static_cast<size_t>(n));
  uint16_t* out = buf->data();
  DefaultPool().ParallelFor(n, 1 << 14, [&](int64_t i0, int64_t i1, int) { ToBf16(x + i0, out + i0, i1 - i0); });
  return out;
}

const uint16_t* ToBf16InPlaceRows(float* x, int64_t rows, int64_t cols) {
  // Row i's bf16 values go to bytes [0, 2 cols) of its own f32 row, so rows never overlap and
  // pool threads can take them in any order. Within a row, each block of floats is converted
  // into a stack buffer and copied down: the copy lands on floats [p/2, (p + len)/2) of a block
  // starting at float p, all already read (this block's included).
  DefaultPool().ParallelFor(rows, 1, [&](int64_t r0, int64_t r1, int) {
    constexpr int64_t kBlock = 1024;
    uint16_t tmp[kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      float* row = x + r * cols;
      auto* bytes = reinterpret_cast<unsigned char*>(row);
      for (int64_t p = 0; p < cols; p += kBlock) {
        const int64_t len = std::min(kBlock, cols - p);
        ToBf16(row + p, tmp, len);
        std::memcpy(bytes + 2 * p, tmp, static_cast<size_t>(2 * len));
      }
    }
  });
  return reinterpret_cast<const uint16_t*>(x);
}

void Bf16GemmLoops(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                   int64_t ldb, bool add, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t p = 0; p < k; ++p)
        sum += Bf16ToFloat(ta ? a[p * lda + i] : a[i * lda + p]) * Bf16ToFloat(tb ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = alpha * sum + (add ? c[i * ldc + j] : 0.0f);
    }
  }
}

#if defined(FEDTUNE_HAVE_DNNL)

bool Bf16GemmBuilt() { return true; }

namespace {

using dt = dnnl::memory::data_type;

// Threads: Debian's oneDNN runs on OpenMP, whose idle team threads spin; beside our own pool
// (kernels/thread_pool.h), which runs every other op, that cost ~30% of a training step
// (measured: 208 vs 293 tokens/s). So oneDNN runs single-threaded inside our pool, each thread on
// its share of the rows, with its own primitives (no OpenMP team is ever formed).
struct Dnnl {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
};

Dnnl& Get() {
  static Dnnl* d = [] {
    // The path of this process (FEDTUNE_CPU_ISA caps it) is oneDNN's ceiling too: capped at
    // avx512-bf16 it must not pick AMX. Only effective before oneDNN's first use: done here.
    (void)dnnl::set_max_cpu_isa(ProcessCpuIsa() >= CpuIsa::kAmxBf16 ? dnnl::cpu_isa::avx512_core_amx : dnnl::cpu_isa::avx512_core_bf16);
    return new Dnnl();  // process lifetime
  }();
  return *d;
}

// Primitives by shape, per thread: creating one costs far more than a small product, and a
// thread never shares its primitives (no locking, no concurrent execution).
// Scratchpads are the caller's (one growing buffer per thread): with oneDNN's own, every cached
// primitive kept its packing buffer, and varying batch lengths (the simulation's packed
// batches) grew the process by ~250 MiB.
struct Entry {
  dnnl::matmul mm;
  dnnl::memory::desc a, b, c, scratch;
};
using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, bool>;
struct ThreadPrimitives {
  std::map<Key, Entry> cache;
  std::vector<uint8_t> scratch;
};
ThreadPrimitives& Primitives() {
  thread_local ThreadPrimitives p;
  return p;
}

// C[m, n] = alpha op(A) op(B) (+ C when `add`), A and B bf16 with leading dimensions lda / ldb
// (op = transpose when ta / tb), C f32 with ldc; on the calling thread.
void GemmOrThrow(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                 int64_t ldb, bool add, float* c, int64_t ldc) {
  Dnnl& d = Get();
  std::map<Key, Entry>& cache = Primitives().cache;
  std::vector<uint8_t>& scratch = Primitives().scratch;
  const Key key{ta, tb, m, n, k, lda, ldb, ldc, alpha, add};
  auto it = cache.find(key);
  if (it == cache.end()) {
    using dims = dnnl::memory::dims;
    const dnnl::memory::desc ad({m, k}, dt::bf16, ta ? dims{1, lda} : dims{lda, 1}), bd({k, n}, dt::bf16, tb ? dims{1, ldb} : dims{ldb, 1}),
        cd({m, n}, dt::f32, dims{ldc, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
    if (add) {
      dnnl::post_ops po;
      po.append_sum(1.0f);
      attr.set_post_ops(po);
    }
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(ad, bd, cd), attr, d.engine);
    // Shapes churn (varying batch lengths, attention blocks): stay bounded.
    if (cache.size() >= 384) cache.clear();
    it = cache.emplace(key, Entry{dnnl::matmul(pd), ad, bd, cd, pd.scratchpad_desc()}).first;
    FT_LOG_DEBUG("bf16 matmul {}x{}x{}{}{}{}: {}", m, n, k, ta ? " A^T" : "", tb ? " B^T" : "", add ? " (accumulate)" : "", pd.impl_info_str());
    if (std::string(pd.impl_info_str()).rfind("ref", 0) == 0)
      FT_LOG_WARN("bf16 matmul {}x{}x{}: oneDNN has only its reference implementation here (slow)", m, n, k);
  }
  const Entry& e = it->second;
  // Never a null handle (an empty vector's data()): oneDNN refuses to execute with one even when
  // the primitive needs no scratchpad ("could not execute a primitive").
  if (scratch.size() < std::max<size_t>(e.scratch.get_size(), 64)) scratch.resize(std::max<size_t>(e.scratch.get_size(), 64));
  dnnl::memory A(e.a, d.engine, const_cast<uint16_t*>(a)), B(e.b, d.engine, const_cast<uint16_t*>(b)), C(e.c, d.engine, c),
      S(e.scratch, d.engine, scratch.data());
  dnnl::stream s(d.engine);
  e.mm.execute(s, {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}, {DNNL_ARG_SCRATCHPAD, S}});
  s.wait();
}

// Rows split evenly over the pool's threads (at most two distinct slice heights: few primitives).
// w is n x k row-major; NT: y[m, n] = x[m, k] w^T; otherwise dx[m, k] += dy[m, n] w.
void Split(const uint16_t* src, int64_t ld_src, const uint16_t* w, float* dst, int64_t m, int64_t n, int64_t k, bool nt) {
  ThreadPool& pool = DefaultPool();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.size(), m / 16));
  pool.ParallelFor(parts, 1, [&](int64_t p0, int64_t p1, int) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = m * p / parts, r1 = m * (p + 1) / parts;
      if (r1 <= r0) continue;
      if (nt) {
        Bf16GemmOnThread(false, true, r1 - r0, n, k, 1.0f, src + r0 * ld_src, ld_src, w, k, false, dst + r0 * n, n);
      } else {
        Bf16GemmOnThread(false, false, r1 - r0, k, n, 1.0f, src + r0 * ld_src, ld_src, w, k, true, dst + r0 * k, k);
      }
    }
  });
}

}  // namespace

void Bf16GemmOnThread(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                      int64_t ldb, bool add, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // an empty sum: C = 0 (or unchanged)
    if (!add)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  omp_set_num_threads(1);
  // A shape oneDNN refuses (seen once in development: a transposed-A product with one output
  // column, "could not execute a primitive", on a pool thread only) is computed by plain loops
  // from the same bf16 operands (fp32 sums), said once per shape and thread, never retried.
  using RefusedKey = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  thread_local std::set<RefusedKey> refused;
  const RefusedKey key{ta, tb, m, n, k, lda, ldb, ldc};
  if (!refused.contains(key)) {
    try {
      GemmOrThrow(ta, tb, m, n, k, alpha, a, lda, b, ldb, add, c, ldc);
      return;
    } catch (const dnnl::error& e) {
      refused.insert(key);
      FT_LOG_WARN("oneDNN bf16 matmul {}x{}x{}{}{} (lda {}, ldb {}, ldc {}) refused ({}): computed by plain loops", m, n, k, ta ? " A^T" : "",
                  tb ? " B^T" : "", lda, ldb, ldc, e.what());
    }
  }
  Bf16GemmLoops(ta, tb, m, n, k, alpha, a, lda, b, ldb, add, c, ldc);
}

size_t Bf16GemmCachedPrimitives() { return Primitives().cache.size(); }

void ReleaseBf16GemmThreadState() {
  ThreadPrimitives& p = Primitives();
  p.cache.clear();
  std::vector<uint8_t>().swap(p.scratch);
}

void Bf16MatmulNT(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k) { Split(x, k, w, y, m, n, k, true); }

void Bf16MatmulNNAdd(const uint16_t* dy, const uint16_t* w, float* dx, int64_t m, int64_t n, int64_t k, int64_t ld_dy) {
  Split(dy, ld_dy > 0 ? ld_dy : n, w, dx, m, n, k, false);
}

#else

bool Bf16GemmBuilt() { return false; }
void ReleaseBf16GemmThreadState() {}
size_t Bf16GemmCachedPrimitives() { return 0; }
void Bf16GemmOnThread(bool, bool, int64_t, int64_t, int64_t, float, const uint16_t*, int64_t, const uint16_t*, int64_t, bool, float*, int64_t) {
  FT_CHECK(false && "built without oneDNN");
}
void Bf16MatmulNT(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t) { FT_CHECK(false && "built without oneDNN"); }
void Bf16MatmulNNAdd(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t) { FT_CHECK(false && "built without oneDNN"); }

#endif

}  // namespace fedtune::kernels

#include "kernels/bf16_gemm.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "common/log.h"

#include "common/status.h"

#if defined(FEDTUNE_HAVE_DNNL)
#include <cstdio>
#include <cstdlib>

#include <oneapi/dnnl/dnnl.hpp>

#include "kernels/cpu_features.h"
#include "kernels/thread_pool.h"

// oneDNN's OpenMP runtime (libgomp, linked explicitly): declared here rather than through
// <omp.h>, which clang does not find without an OpenMP package of its own (the fuzz build).
extern "C" void omp_set_num_threads(int n);
#endif

namespace fedtune::kernels {

void ToBf16(const float* x, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
      out[i] = static_cast<uint16_t>((u >> 16) | 0x40);
      continue;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    out[i] = static_cast<uint16_t>(u >> 16);
  }
}

#if defined(FEDTUNE_HAVE_DNNL)

bool Bf16GemmBuilt() { return true; }

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

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

// src[m, kk] (bf16) x weights[kk, nn] (bf16, `wtag`) -> dst[m, nn] (f32), dst += when `add`; on
// the calling thread.
void RunOrThrow(const uint16_t* src, const uint16_t* wei, float* dst, int64_t m, int64_t nn, int64_t kk, tag wtag, bool add) {
  Dnnl& d = Get();
  const dnnl::memory::desc a({m, kk}, dt::bf16, tag::ab), b({kk, nn}, dt::bf16, wtag), c({m, nn}, dt::f32, tag::ab);
  struct Entry {
    dnnl::matmul mm;
    dnnl::memory::desc scratch;
  };
  // Primitives by (m, n, k, accumulate), per thread: creating one costs far more than a small
  // product, and a thread never shares its primitives (no locking, no concurrent execution).
  // Scratchpads are the caller's (one growing buffer per thread): with oneDNN's own, every cached
  // primitive kept its packing buffer, and varying batch lengths (the simulation's packed
  // batches) grew the process by ~250 MiB.
  thread_local std::map<std::tuple<int64_t, int64_t, int64_t, bool, int>, Entry> cache;
  thread_local std::vector<uint8_t> scratch;
  auto key = std::make_tuple(m, nn, kk, add, static_cast<int>(wtag));
  auto it = cache.find(key);
  if (it == cache.end()) {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (add) {
      dnnl::post_ops po;
      po.append_sum(1.0f);
      attr.set_post_ops(po);
    }
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, d.engine);
    if (cache.size() >= 128) cache.clear();  // shapes churn (varying batch lengths): stay bounded
    it = cache.emplace(key, Entry{dnnl::matmul(pd), pd.scratchpad_desc()}).first;
    FT_LOG_DEBUG("bf16 matmul {}x{}x{}{}: {}", m, nn, kk, add ? " (accumulate)" : "", pd.impl_info_str());
    if (std::string(pd.impl_info_str()).rfind("ref", 0) == 0)
      FT_LOG_WARN("bf16 matmul {}x{}x{}: oneDNN has only its reference implementation here (slow)", m, nn, kk);
  }
  const Entry& e = it->second;
  if (scratch.size() < e.scratch.get_size()) scratch.resize(e.scratch.get_size());
  dnnl::memory A(a, d.engine, const_cast<uint16_t*>(src)), B(b, d.engine, const_cast<uint16_t*>(wei)), C(c, d.engine, dst),
      S(e.scratch, d.engine, scratch.data());
  dnnl::stream s(d.engine);
  e.mm.execute(s, {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}, {DNNL_ARG_SCRATCHPAD, S}});
  s.wait();
}

// On a pool thread an exception would end the process without a word: say what failed.
void Run(const uint16_t* src, const uint16_t* wei, float* dst, int64_t m, int64_t nn, int64_t kk, tag wtag, bool add) {
  try {
    RunOrThrow(src, wei, dst, m, nn, kk, wtag, add);
  } catch (const dnnl::error& e) {
    std::fprintf(stderr, "fedtune: oneDNN bf16 matmul %lldx%lldx%lld failed: %s\n", static_cast<long long>(m), static_cast<long long>(nn),
                 static_cast<long long>(kk), e.what());
    std::abort();
  }
}

// Rows split evenly over the pool's threads (at most two distinct slice heights: few primitives).
void Split(const uint16_t* src, const uint16_t* wei, float* dst, int64_t m, int64_t nn, int64_t kk, tag wtag, bool add) {
  ThreadPool& pool = DefaultPool();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.size(), m / 16));
  pool.ParallelFor(parts, 1, [&](int64_t p0, int64_t p1, int) {
    omp_set_num_threads(1);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = m * p / parts, r1 = m * (p + 1) / parts;
      if (r1 > r0) Run(src + r0 * kk, wei, dst + r0 * nn, r1 - r0, nn, kk, wtag, add);
    }
  });
}

}  // namespace

void Bf16MatmulNT(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k) {
  // w is n x k row-major = the k x n weights matrix in column-major ("ba") order.
  Split(x, w, y, m, n, k, tag::ba, false);
}

void Bf16MatmulNNAdd(const uint16_t* dy, const uint16_t* w, float* dx, int64_t m, int64_t n, int64_t k) {
  Split(dy, w, dx, m, k, n, tag::ab, true);
}

#else

bool Bf16GemmBuilt() { return false; }
void Bf16MatmulNT(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t) { FT_CHECK(false && "built without oneDNN"); }
void Bf16MatmulNNAdd(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t) { FT_CHECK(false && "built without oneDNN"); }

#endif

}  // namespace fedtune::kernels

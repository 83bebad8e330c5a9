// The GEMM core, measured across the Debian libraries that could provide it (ARCHITECTURE.md /
// issue 4: "measure Eigen, OpenBLAS and oneDNN ... keep the fastest that is worth its weight"):
// C[m,n] = A[m,k] B[n,k]^T in fp32 on SmolLM2-135M's shapes at 2048 tokens, 2 threads.
//   OpenBLAS, split over fedtune's pool (what the kernels do: one single-threaded call per half
//     of the rows);
//   OpenBLAS with its own threads;
//   Eigen 3.4 (header-only), split over fedtune's pool the same way;
//   oneDNN's dnnl_sgemm (its own threads), when built with libdnnl-dev (optional: not a
//     dependency of the product).
// Counter: GFLOP/s = 2 m n k / time.
//   build/bench/bench_gemm [--benchmark_filter=...]
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <Eigen/Core>
#include <random>
#include <vector>

#include "kernels/thread_pool.h"

#ifdef FEDTUNE_HAVE_DNNL
#include <dnnl.h>
#endif

extern "C" void openblas_set_num_threads(int);

namespace {

struct Operands {
  int64_t m, n, k;
  std::vector<float> a, b, c;
  Operands(int64_t m_, int64_t n_, int64_t k_) : m(m_), n(n_), k(k_) {
    std::mt19937 rng(3);
    std::normal_distribution<float> d(0.0f, 1.0f);
    a.resize(static_cast<size_t>(m * k));
    b.resize(static_cast<size_t>(n * k));
    c.resize(static_cast<size_t>(m * n));
    for (auto& x : a) x = d(rng);
    for (auto& x : b) x = d(rng);
  }
};

void Report(benchmark::State& state, const Operands& o) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(o.m * o.n * o.k), benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// args: m, n, k
void BM_OpenBlasPool(benchmark::State& state) {
  Operands o(state.range(0), state.range(1), state.range(2));
  openblas_set_num_threads(1);
  auto& pool = fedtune::kernels::DefaultPool();
  for (auto _ : state) {
    pool.ParallelFor(o.m, 16, [&](int64_t m0, int64_t m1, int) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m1 - m0), static_cast<int>(o.n), static_cast<int>(o.k), 1.0f,
                  o.a.data() + m0 * o.k, static_cast<int>(o.k), o.b.data(), static_cast<int>(o.k), 0.0f, o.c.data() + m0 * o.n,
                  static_cast<int>(o.n));
    });
    benchmark::ClobberMemory();
  }
  Report(state, o);
}

void BM_OpenBlasThreads(benchmark::State& state) {
  Operands o(state.range(0), state.range(1), state.range(2));
  openblas_set_num_threads(fedtune::kernels::DefaultPool().size());
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(o.m), static_cast<int>(o.n), static_cast<int>(o.k), 1.0f, o.a.data(),
                static_cast<int>(o.k), o.b.data(), static_cast<int>(o.k), 0.0f, o.c.data(), static_cast<int>(o.n));
    benchmark::ClobberMemory();
  }
  openblas_set_num_threads(1);
  Report(state, o);
}

void BM_EigenPool(benchmark::State& state) {
  Operands o(state.range(0), state.range(1), state.range(2));
  Eigen::setNbThreads(1);
  auto& pool = fedtune::kernels::DefaultPool();
  for (auto _ : state) {
    pool.ParallelFor(o.m, 16, [&](int64_t m0, int64_t m1, int) {
      Eigen::Map<const RowMajor> a(o.a.data() + m0 * o.k, m1 - m0, o.k);
      Eigen::Map<const RowMajor> b(o.b.data(), o.n, o.k);
      Eigen::Map<RowMajor> c(o.c.data() + m0 * o.n, m1 - m0, o.n);
      c.noalias() = a * b.transpose();
    });
    benchmark::ClobberMemory();
  }
  Report(state, o);
}

#ifdef FEDTUNE_HAVE_DNNL
void BM_OneDnn(benchmark::State& state) {
  Operands o(state.range(0), state.range(1), state.range(2));
  for (auto _ : state) {
    if (dnnl_sgemm('N', 'T', o.m, o.n, o.k, 1.0f, o.a.data(), o.k, o.b.data(), o.k, 0.0f, o.c.data(), o.n) != dnnl_success) {
      state.SkipWithError("dnnl_sgemm failed");
      break;
    }
    benchmark::ClobberMemory();
  }
  Report(state, o);
}
#endif

void Shapes(benchmark::internal::Benchmark* b) {
  for (auto [n, k] : {std::pair<int64_t, int64_t>{576, 576}, {1536, 576}, {576, 1536}, {192, 576}}) b->Args({2048, n, k});
}

BENCHMARK(BM_OpenBlasPool)->Apply(Shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_OpenBlasThreads)->Apply(Shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_EigenPool)->Apply(Shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
#ifdef FEDTUNE_HAVE_DNNL
BENCHMARK(BM_OneDnn)->Apply(Shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
#endif

}  // namespace

BENCHMARK_MAIN();

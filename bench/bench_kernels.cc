// Kernel benchmark (Google Benchmark): the quantized linear layer (dequantization included)
// forward and backward-to-input per weight format and backend, against the same product with
// the weight already dense in f32, on SmolLM2-135M's projection shapes at 2048 tokens (batch 8 x
// 256). Counters: GFLOP/s (2 m n k per product).
//   build/bench/bench_kernels [--benchmark_filter=...] [--threads N]
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "kernels/quant.h"
#include "kernels/thread_pool.h"

namespace {

using fedtune::kernels::GgmlType;

struct Weight {
  std::vector<uint8_t> bytes;
  fedtune::kernels::QMatrix m;
};

Weight MakeWeight(GgmlType t, int64_t n, int64_t k) {
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0.0f, 0.05f);
  std::vector<float> src(static_cast<size_t>(n * k));
  for (auto& x : src) x = d(rng);
  Weight w;
  const size_t rb = *fedtune::kernels::RowBytes(t, k);
  w.bytes.resize(rb * static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) {
    if (!fedtune::kernels::QuantizeRow(t, src.data() + r * k, w.bytes.data() + static_cast<size_t>(r) * rb, k).ok()) std::abort();
  }
  w.m = fedtune::kernels::QMatrix{t, w.bytes.data(), n, k, rb};
  return w;
}

// args: weight type, n (out), k (in), backward?, backend (0 cpu-fast, 1 cpu-ref)
void BM_QLinear(benchmark::State& state) {
  const auto t = static_cast<GgmlType>(state.range(0));
  const int64_t n = state.range(1), k = state.range(2), m = 2048;
  const bool backward = state.range(3) != 0;
  const Weight w = MakeWeight(t, n, k);
  std::vector<float> x(static_cast<size_t>(m * (backward ? n : k)), 0.5f), y(static_cast<size_t>(m * (backward ? k : n)));
  fedtune::kernels::Backend& be =
      state.range(4) != 0 ? fedtune::kernels::CpuReferenceBackend() : fedtune::kernels::CpuFastBackend();
  for (auto _ : state) {
    if (backward) {
      be.QLinearBackward(w.m, x.data(), y.data(), m);
    } else {
      be.QLinearForward(w.m, x.data(), y.data(), m);
    }
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(m * n * k), benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
  state.SetLabel(std::string(be.Name()) + " " + fedtune::kernels::TypeTraits(t).name + (backward ? " backward" : " forward"));
}

void Shapes(benchmark::internal::Benchmark* b) {
  for (GgmlType t : {GgmlType::kF32, GgmlType::kQ4_1, GgmlType::kQ8_0, GgmlType::kNF4}) {
    for (auto [n, k] : {std::pair<int64_t, int64_t>{576, 576}, {1536, 576}, {576, 1536}}) {
      for (int bw : {0, 1}) {
        b->Args({static_cast<int64_t>(t), n, k, bw, 0});
        if (t == GgmlType::kQ4_1) b->Args({static_cast<int64_t>(t), n, k, bw, 1});  // the tiled reference path
      }
    }
  }
}
BENCHMARK(BM_QLinear)->Apply(Shapes)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  int threads = 0;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0) threads = std::atoi(argv[i + 1]);
  }
  fedtune::kernels::SetThreads(threads);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

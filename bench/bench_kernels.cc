// Kernel benchmark (Google Benchmark), per backend (cpu-fast, cpu-ref, cpu-bf16 and cuda when usable):
//  - BM_QLinear: the quantized linear layer (dequantization included) forward and
//    backward-to-input per weight format, against the same product with the weight already
//    dense in f32, on SmolLM2-135M's projection shapes at 2048 tokens (batch 8 x 256);
//    counter GFLOP/s (2 m n k per product);
//  - BM_Op: the other training ops at SmolLM2's sizes for the same 2048 tokens (attention 8
//    sequences of 256, 9 heads / 3 KV heads of 64; cross-entropy over 49152 classes on 256 rows;
//    LoRA r=16 576->1536; DiaBlo N=16 576->1536; AdamW on 1M values); counter tokens/s.
//   build/bench/bench_kernels [--benchmark_filter=...] [--threads N]
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "kernels/bf16_gemm.h"
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

fedtune::kernels::Backend* BackendArg(int64_t i) {
  if (i == 1) return &fedtune::kernels::CpuReferenceBackend();
  if (i == 2) return fedtune::kernels::CudaBackend();
  if (i == 3) return fedtune::kernels::CpuBf16Backend();
  return &fedtune::kernels::CpuFastBackend();
}

// args: weight type, n (out), k (in), backward?, backend (0 cpu-fast, 1 cpu-ref, 2 cuda, 3 cpu-bf16)
void BM_QLinear(benchmark::State& state) {
  const auto t = static_cast<GgmlType>(state.range(0));
  const int64_t n = state.range(1), k = state.range(2), m = 2048;
  const bool backward = state.range(3) != 0;
  const Weight w = MakeWeight(t, n, k);
  std::vector<float> x(static_cast<size_t>(m * (backward ? n : k)), 0.5f), y(static_cast<size_t>(m * (backward ? k : n)));
  fedtune::kernels::Backend* bp = BackendArg(state.range(4));
  if (bp == nullptr) return state.SkipWithError("backend unavailable");
  fedtune::kernels::Backend& be = *bp;
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

// The ceiling of the cpu-bf16 rows: the same products with both operands already bf16 (no
// dequantization, no conversion). args: n, k, backward?
void BM_DenseBf16(benchmark::State& state) {
  const int64_t n = state.range(0), k = state.range(1), m = 2048;
  const bool backward = state.range(2) != 0;
  std::vector<uint16_t> w(static_cast<size_t>(n * k), 0x3f00), x(static_cast<size_t>(m * (backward ? n : k)), 0x3f00);
  std::vector<float> y(static_cast<size_t>(m * (backward ? k : n)));
  for (auto _ : state) {
    if (backward) {
      fedtune::kernels::Bf16MatmulNNAdd(x.data(), w.data(), y.data(), m, n, k);
    } else {
      fedtune::kernels::Bf16MatmulNT(x.data(), w.data(), y.data(), m, n, k);
    }
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(m * n * k), benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
  state.SetLabel(std::string("dense bf16 (oneDNN)") + (backward ? " backward" : " forward"));
}

void Shapes(benchmark::internal::Benchmark* b) {
  for (GgmlType t : {GgmlType::kF32, GgmlType::kQ4_1, GgmlType::kQ8_0, GgmlType::kNF4}) {
    for (auto [n, k] : {std::pair<int64_t, int64_t>{576, 576}, {1536, 576}, {576, 1536}}) {
      for (int bw : {0, 1}) {
        b->Args({static_cast<int64_t>(t), n, k, bw, 0});
        if (fedtune::kernels::CpuBf16Backend() != nullptr) b->Args({static_cast<int64_t>(t), n, k, bw, 3});
        if (t == GgmlType::kQ4_1) {
          b->Args({static_cast<int64_t>(t), n, k, bw, 1});  // the tiled reference path
          if (fedtune::kernels::CudaBackend() != nullptr) b->Args({static_cast<int64_t>(t), n, k, bw, 2});
        }
      }
    }
  }
}

enum OpCase : int64_t { kRmsNorm, kRmsNormBack, kRope, kAttention, kAttentionBack, kSwiGlu, kSwiGluBack, kCrossEntropy, kAdamW, kLora, kLoraBack, kDiablo, kDiabloBack,
                        kCrossEntropyCapped, kAttentionBackCapped, kNumCases };
const char* const kCaseNames[] = {"rmsnorm", "rmsnorm_backward", "rope", "attention", "attention_backward", "swiglu", "swiglu_backward",
                                  "cross_entropy(+backward)", "adamw", "lora", "lora_backward", "diablo", "diablo_backward",
                                  "cross_entropy(+backward) soft-capped 30", "attention_backward soft-capped 50"};

// args: case, backend
void BM_Op(benchmark::State& state) {
  fedtune::kernels::Backend* be = BackendArg(state.range(1));
  if (be == nullptr) return state.SkipWithError("backend unavailable");
  const auto c = static_cast<OpCase>(state.range(0));
  constexpr int64_t n_seq = 8, len = 256, M = n_seq * len, E = 576, F = 1536, H = 9, KV = 3, HD = 64, R = 16, N = 16;
  std::mt19937 rng(2);
  std::normal_distribution<float> d(0.0f, 1.0f);
  auto vec = [&](int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = d(rng) * 0.1f;
    return v;
  };
  std::vector<int32_t> pos(static_cast<size_t>(M));
  for (int64_t i = 0; i < M; ++i) pos[static_cast<size_t>(i)] = static_cast<int32_t>(i % len);
  auto a = vec(M * F), b = vec(M * F), o = vec(M * F), g = vec(M * F), g2 = vec(M * F), w = vec(F);
  auto q = vec(M * E), k = vec(M * KV * HD), v = vec(M * KV * HD), dq = vec(M * E), dk = vec(M * KV * HD), dv = vec(M * KV * HD);
  auto la = vec(R * E), lb = vec(F * R), z = vec(M * R), dla = vec(R * E), dlb = vec(F * R);
  const int64_t bi = (E + N - 1) / N, bo = (F + N - 1) / N;
  auto dd = vec(N * bi * bo), gdd = vec(N * bi * bo);
  const Weight out = MakeWeight(GgmlType::kQ8_0, 49152, E);  // SmolLM2's output matrix (tied embedding) is Q8_0
  std::vector<int32_t> target(256);
  for (auto& t : target) t = static_cast<int32_t>(rng() % 49152);
  const int64_t P = int64_t{1} << 20;
  auto p = vec(P), pg = vec(P), pm = vec(P), pv = vec(P), pf = vec(P);
  for (auto& x : pv) x = x * x;
  fedtune::kernels::AdamWStep st;
  st.lr = 1e-4f;
  int64_t tokens = M;
  for (auto _ : state) {
    switch (c) {
      case kRmsNorm: be->RmsNormForward(a.data(), w.data(), o.data(), b.data(), M, E, 1e-5f); break;
      case kRmsNormBack: be->RmsNormBackward(a.data(), w.data(), b.data(), g.data(), o.data(), M, E); break;
      case kRope: be->RopeForward(q.data(), pos.data(), M, H, HD, HD, 100000.0f, nullptr); break;
      case kAttention: be->AttentionForward(q.data(), k.data(), v.data(), o.data(), n_seq, len, H, KV, HD, nullptr, 0.0f, 0); break;
      case kAttentionBack:
        be->AttentionBackward(q.data(), k.data(), v.data(), g.data(), dq.data(), dk.data(), dv.data(), n_seq, len, H, KV, HD, nullptr, 0.0f, 0);
        break;
      case kSwiGlu: be->SwiGluForward(a.data(), b.data(), o.data(), M * F); break;
      case kSwiGluBack: be->SwiGluBackward(a.data(), b.data(), g.data(), o.data(), g2.data(), M * F); break;
      case kCrossEntropy:
        tokens = 256;
        benchmark::DoNotOptimize(be->CrossEntropy(out.m, q.data(), target.data(), 256, dq.data(), 1.0f / 256, 0.0f));
        break;
      case kAdamW:
        tokens = P;
        be->AdamW(p.data(), pg.data(), pm.data(), pv.data(), pf.data(), P, st);
        break;
      case kLora: be->LoraForward(q.data(), la.data(), lb.data(), z.data(), o.data(), M, E, R, F, 2.0f); break;
      case kLoraBack:
        be->LoraBackward(q.data(), la.data(), lb.data(), z.data(), g.data(), dla.data(), dlb.data(), dq.data(), M, E, R, F, 2.0f);
        break;
      case kDiablo: be->DiabloForward(q.data(), dd.data(), o.data(), M, E, F, N); break;
      case kDiabloBack: be->DiabloBackward(q.data(), dd.data(), g.data(), gdd.data(), dq.data(), M, E, F, N); break;
      case kCrossEntropyCapped:  // Gemma 2's final-logit cap
        tokens = 256;
        benchmark::DoNotOptimize(be->CrossEntropy(out.m, q.data(), target.data(), 256, dq.data(), 1.0f / 256, 30.0f));
        break;
      case kAttentionBackCapped:  // Gemma 2's attention cap
        be->AttentionBackward(q.data(), k.data(), v.data(), g.data(), dq.data(), dk.data(), dv.data(), n_seq, len, H, KV, HD, nullptr, 50.0f, 0);
        break;
      case kNumCases: break;
    }
    benchmark::ClobberMemory();
  }
  state.counters[c == kAdamW ? "values/s" : "tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string(be->Name()) + " " + kCaseNames[c]);
}

void OpCases(benchmark::internal::Benchmark* b) {
  for (int64_t c = 0; c < kNumCases; ++c) {
    for (int64_t be : {0, 1, 2, 3}) {
      if (be == 2 && fedtune::kernels::CudaBackend() == nullptr) continue;
      if (be == 3 && fedtune::kernels::CpuBf16Backend() == nullptr) continue;
      b->Args({c, be});
    }
  }
}


}  // namespace

int main(int argc, char** argv) {
  int threads = 0;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0) threads = std::atoi(argv[i + 1]);
  }
  fedtune::kernels::SetThreads(threads);
  benchmark::Initialize(&argc, argv);
  // Registered here, not at static initialisation: the cuda rows ask whether a device is usable,
  // which loads the CUDA module, and --help should not.
  benchmark::RegisterBenchmark("BM_QLinear", BM_QLinear)->Apply(Shapes)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("BM_Op", BM_Op)->Apply(OpCases)->Unit(benchmark::kMillisecond)->UseRealTime();
  if (fedtune::kernels::CpuBf16Backend() != nullptr) {
    auto* d = benchmark::RegisterBenchmark("BM_DenseBf16", BM_DenseBf16)->Unit(benchmark::kMillisecond)->UseRealTime();
    for (auto [n, k] : {std::pair<int64_t, int64_t>{576, 576}, {1536, 576}, {576, 1536}})
      for (int64_t bw : {0, 1}) d->Args({n, k, bw});
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

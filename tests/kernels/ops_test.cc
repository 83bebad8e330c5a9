#include "kernels/ops.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

#include "common/rng.h"
#include "gtest/gtest.h"
#include "kernels/fast_ops.h"
#include "kernels/gemm.h"
#include "kernels/thread_pool.h"
#include "kernels/vec_dot.h"

namespace fedtune::kernels {
namespace {

struct Case {
  int64_t m, n, k;
  GgmlType type;
};

// MatMulQ against a double-precision loop over the dequantized weights, on odd shapes.
TEST(OpsTest, MatMulQMatchesDoubleReference) {
  Rng rng(11);
  for (const Case& c : {Case{1, 7, 32, GgmlType::kQ4_1}, Case{3, 33, 64, GgmlType::kQ8_0}, Case{17, 300, 96, GgmlType::kQ4_0},
                        Case{5, 9, 13, GgmlType::kF32}, Case{64, 65, 256, GgmlType::kF16}, Case{2, 40, 512, GgmlType::kQ5_1}}) {
    std::vector<float> wf(static_cast<size_t>(c.n * c.k)), x(static_cast<size_t>(c.m * c.k)), y(static_cast<size_t>(c.m * c.n));
    for (auto& v : wf) v = static_cast<float>(rng.Normal());
    for (auto& v : x) v = static_cast<float>(rng.Normal());
    const size_t rb = *RowBytes(c.type, c.k);
    std::vector<uint8_t> wq(rb * static_cast<size_t>(c.n));
    for (int64_t r = 0; r < c.n; ++r) ASSERT_TRUE(QuantizeRow(c.type, wf.data() + r * c.k, wq.data() + r * rb, c.k).ok());
    QMatrix w{c.type, wq.data(), c.n, c.k, rb};
    MatMulQ(w, x.data(), y.data(), c.m);
    std::vector<float> row(static_cast<size_t>(c.k));
    for (int64_t j = 0; j < c.n; ++j) {
      GetRow(w, j, row.data());
      for (int64_t i = 0; i < c.m; ++i) {
        double ref = 0;
        for (int64_t t = 0; t < c.k; ++t) ref += static_cast<double>(x[i * c.k + t]) * row[t];
        ASSERT_NEAR(y[i * c.n + j], ref, 1e-4 * std::sqrt(static_cast<double>(c.k)) * 4) << c.m << "x" << c.n << "x" << c.k;
      }
    }
  }
}

// The fused single-token path (AVX2 when available) and the SIMD dequantizers against the
// reference dequantization.
TEST(OpsTest, FusedGemvAndFastDequantMatchReference) {
  Rng rng(5);
  for (GgmlType t : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0, GgmlType::kF32, GgmlType::kF16, GgmlType::kQ5_0}) {
    const int64_t n = 37, k = 160;
    std::vector<float> wf(static_cast<size_t>(n * k)), x(static_cast<size_t>(k)), y(static_cast<size_t>(n));
    for (auto& v : wf) v = static_cast<float>(rng.Normal());
    for (auto& v : x) v = static_cast<float>(rng.Normal());
    const size_t rb = *RowBytes(t, k);
    std::vector<uint8_t> wq(rb * static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) ASSERT_TRUE(QuantizeRow(t, wf.data() + r * k, wq.data() + r * rb, k).ok());
    QMatrix w{t, wq.data(), n, k, rb};
    MatMulQ(w, x.data(), y.data(), 1);
    std::vector<float> ref(static_cast<size_t>(k)), fast(static_cast<size_t>(k));
    for (int64_t r = 0; r < n; ++r) {
      GetRow(w, r, ref.data());
      DequantizeRowFast(t, w.row(r), fast.data(), k);
      ASSERT_EQ(ref, fast) << TypeTraits(t).name << " row " << r;  // bit-identical
      double dot = 0;
      for (int64_t i = 0; i < k; ++i) dot += static_cast<double>(ref[i]) * x[i];
      ASSERT_NEAR(y[r], dot, 1e-3) << TypeTraits(t).name << " row " << r;
    }
  }
  std::printf("CPU path: %s\n", CpuPathName());
}

// CausalAttention against a direct loop in double precision (odd sizes, GQA, a non-empty cache),
// plain, with Gemma 2's soft-capping (cap 0.8) and with a sliding window of 4 keys.
TEST(OpsTest, CausalAttentionMatchesReference) {
  Rng rng(9);
  for (auto [cap, window] : {std::pair{0.0f, int64_t{0}}, std::pair{0.8f, int64_t{0}}, std::pair{0.0f, int64_t{4}}, std::pair{0.8f, int64_t{4}}}) {
    for (auto [T, past, H, Hkv, hd] : {std::tuple{5, 0, 4, 2, 8}, std::tuple{3, 7, 6, 1, 16}, std::tuple{1, 12, 3, 3, 4}, std::tuple{9, 2, 8, 4, 12}}) {
      const int64_t keys = past + T, E = H * hd, kvd = Hkv * hd;
      std::vector<float> q(static_cast<size_t>(T * E)), kc(static_cast<size_t>(keys * kvd)), vc(kc.size()), out(q.size());
      for (auto* v : {&q, &kc, &vc})
        for (auto& x : *v) x = static_cast<float>(rng.Normal());
      CausalAttention(q.data(), E, kc.data(), vc.data(), kvd, out.data(), E, T, past, H, Hkv, hd, cap, window);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t g = h / (H / Hkv), visible = past + t + 1, j0 = window > 0 ? std::max<int64_t>(0, visible - window) : 0;
          std::vector<double> p(static_cast<size_t>(visible), 0.0);
          double mx = -1e300, sum = 0;
          for (int64_t j = j0; j < visible; ++j) {
            double d = 0;
            for (int64_t i = 0; i < hd; ++i) d += static_cast<double>(q[t * E + h * hd + i]) * kc[j * kvd + g * hd + i];
            p[j] = d / std::sqrt(static_cast<double>(hd));
            if (cap > 0) p[j] = cap * std::tanh(p[j] / cap);
            mx = std::max(mx, p[j]);
          }
          for (int64_t j = j0; j < visible; ++j) sum += (p[j] = std::exp(p[j] - mx));
          for (int64_t i = 0; i < hd; ++i) {
            double o = 0;
            for (int64_t j = j0; j < visible; ++j) o += p[j] / sum * vc[j * kvd + g * hd + i];
            ASSERT_NEAR(out[t * E + h * hd + i], o, 1e-5) << "T=" << T << " past=" << past << " h=" << h << " cap=" << cap << " window=" << window;
          }
        }
      }
    }
  }
}

// The vectorised soft-cap (cpu-fast's Gemma 2 path) against std::tanh / std::cosh in double:
// small, large and saturating values, signs, zero, a NaN, and a tail shorter than a vector.
TEST(OpsTest, VectorisedSoftCapMatchesTanh) {
  if (!HaveAvx2Fma()) GTEST_SKIP() << "no AVX2+FMA on this CPU: the generic path runs instead";
  for (float cap : {0.7f, 30.0f, 50.0f}) {
    std::vector<float> x;
    Rng rng(17);
    for (int i = 0; i < 203; ++i) x.push_back(static_cast<float>(rng.Normal() * cap * (i % 3 == 0 ? 0.01 : i % 3 == 1 ? 1.0 : 8.0)));
    x[0] = 0.0f;
    x[1] = -0.0f;
    x[2] = 1e30f;
    x[3] = -1e30f;
    x[4] = NAN;
    std::vector<float> y = x, d(x.size());
    avx2::SoftCap(y.data(), d.data(), static_cast<int64_t>(y.size()), cap);
    for (size_t i = 0; i < x.size(); ++i) {
      if (std::isnan(x[i])) {
        EXPECT_TRUE(std::isnan(y[i]));
        continue;
      }
      const double u = static_cast<double>(x[i]) / cap, ch = std::cosh(u);
      EXPECT_NEAR(y[i], cap * std::tanh(u), 4e-7 * cap) << x[i];
      // Relative error of the derivative: e^(-2|u|)'s (2e-7) plus the rounding of u = x / cap in
      // float (and of 1 / cap), magnified by the exponent (|2u| x 1.2e-7).
      const double want = std::isinf(ch) ? 0.0 : 1.0 / (ch * ch);
      EXPECT_NEAR(d[i], want, (3e-7 + 3e-7 * std::abs(u)) * want + 1e-30) << x[i];
      EXPECT_EQ(std::signbit(y[i]), std::signbit(x[i])) << x[i];
    }
  }
}

TEST(OpsTest, RmsNormUnitRms) {
  std::vector<float> x = {1, 2, 3, 4, -5, 6}, w(3, 1.0f), y(6);
  RmsNorm(x.data(), w.data(), y.data(), 2, 3, 0.0f);
  for (int r = 0; r < 2; ++r) {
    double ss = 0;
    for (int i = 0; i < 3; ++i) ss += y[r * 3 + i] * y[r * 3 + i];
    EXPECT_NEAR(ss / 3, 1.0, 1e-6);
  }
  EXPECT_NEAR(y[0], 1.0 / std::sqrt(14.0 / 3), 1e-6);
}

TEST(OpsTest, RopeRotatesAdjacentPairsAndKeepsNorms) {
  const int64_t hd = 8;
  std::vector<float> x = {1, 0, 0, 1, 2, 3, -1, 4};
  std::vector<float> orig = x;
  RopeAdjacent(x.data(), 1, hd, hd, 3, 10000.0f);
  // pair 0 rotates by 3 rad
  EXPECT_NEAR(x[0], std::cos(3.0), 1e-6);
  EXPECT_NEAR(x[1], std::sin(3.0), 1e-6);
  for (int i = 0; i < hd / 2; ++i) {
    EXPECT_NEAR(x[2 * i] * x[2 * i] + x[2 * i + 1] * x[2 * i + 1],
                orig[2 * i] * orig[2 * i] + orig[2 * i + 1] * orig[2 * i + 1], 1e-5);
  }
  std::vector<float> y = orig;
  RopeAdjacent(y.data(), 1, hd, hd, 0, 10000.0f);
  EXPECT_EQ(y, orig);  // position 0 is the identity
}

// Linear RoPE scaling by f (every frequency factor f) is position pos / f.
TEST(OpsTest, RopeFrequencyFactorsDivideTheAngles) {
  const int64_t hd = 8;
  const std::vector<float> orig = {1, 0, 0, 1, 2, 3, -1, 4}, two(hd / 2, 2.0f);
  std::vector<float> scaled = orig, plain = orig;
  RopeAdjacent(scaled.data(), 1, hd, hd, 6, 10000.0f, two.data());
  RopeAdjacent(plain.data(), 1, hd, hd, 3, 10000.0f);
  for (int64_t i = 0; i < hd; ++i) EXPECT_NEAR(scaled[static_cast<size_t>(i)], plain[static_cast<size_t>(i)], 1e-6) << i;
  // A factor per pair: pair 1 divided by 4 at position 8 is pair 1 at position 2.
  const std::vector<float> mixed = {1.0f, 4.0f, 1.0f, 1.0f};
  std::vector<float> a = orig, b = orig;
  RopeAdjacent(a.data(), 1, hd, hd, 8, 10000.0f, mixed.data());
  RopeAdjacent(b.data(), 1, hd, hd, 2, 10000.0f);
  EXPECT_NEAR(a[2], b[2], 1e-6);
  EXPECT_NEAR(a[3], b[3], 1e-6);
}

TEST(OpsTest, SoftmaxStableForLargeLogits) {
  std::vector<float> x = {1000.0f, 1000.0f, -1e30f};
  Softmax(x.data(), 3);
  EXPECT_FLOAT_EQ(x[0], 0.5f);
  EXPECT_FLOAT_EQ(x[2], 0.0f);
}

TEST(ThreadPoolTest, CoversRangeExactlyOnce) {
  ThreadPool pool(3);
  std::vector<int> hits(1001, 0);
  for (int rep = 0; rep < 20; ++rep) {
    pool.ParallelFor(1001, 1, [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)]++;
    });
  }
  for (int h : hits) ASSERT_EQ(h, 20);
}

// Inside a LowLatencyScope the threads spin between jobs: many tiny calls back to back (as in
// decoding), from two callers taking turns, must still cover every index exactly once; after the
// scope the pool sleeps again and keeps working.
TEST(ThreadPoolTest, LowLatencyScopeManySmallCallsFromTwoCallers) {
  ThreadPool pool(3);
  std::vector<std::atomic<int>> hits(64);
  {
    ThreadPool::LowLatencyScope spin(pool);
    auto run = [&] {
      for (int rep = 0; rep < 2000; ++rep) {
        pool.ParallelFor(64, 1, [&](int64_t b, int64_t e, int) {
          for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
        });
      }
    };
    std::thread other(run);
    run();
    other.join();
  }
  for (auto& h : hits) ASSERT_EQ(h.load(), 4000);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // the threads fall asleep
  pool.ParallelFor(64, 1, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
  });
  for (auto& h : hits) ASSERT_EQ(h.load(), 4001);
}

}  // namespace
}  // namespace fedtune::kernels

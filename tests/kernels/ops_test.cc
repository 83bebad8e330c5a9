#include "kernels/ops.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
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


float Dot1(VecDotQ8Fn f, const uint8_t* row, const Q8Block* x, int64_t n) {
  float y = 0.0f;
  f(row, x, n, 1, &y, 1);
  return y;
}

std::vector<uint8_t> QuantizedRows(GgmlType t, const std::vector<float>& wf, int64_t n, int64_t k) {
  const size_t rb = *RowBytes(t, k);
  std::vector<uint8_t> wq(rb * static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) EXPECT_TRUE(QuantizeRow(t, wf.data() + r * k, wq.data() + r * rb, k).ok());
  return wq;
}

// 8-bit activations: the quantizer is bit-identical on every path and within half a step of
// each value; the integer dots (AVX2 when the CPU has it, and the portable reference) equal a
// double-precision dot of the dequantized weights with the dequantized activations.
TEST(OpsTest, Int8ActivationDotsMatchReference) {
  Rng rng(21);
  const int64_t n = 29, k = 320;
  std::vector<float> x(static_cast<size_t>(k));
  for (auto& v : x) v = static_cast<float>(rng.Normal() * 3.0);
  for (int j = 64; j < 96; ++j) x[static_cast<size_t>(j)] = 0.0f;        // a block of zeros (d = 0)
  x[200] = 1e4f;                                                          // an outlier in its block
  for (int j = 96; j < 128; ++j) x[static_cast<size_t>(j)] = 0.0f;       // d = 1: ties round to even
  x[96] = 127.0f, x[97] = 2.5f, x[98] = -3.5f, x[99] = 0.5f, x[100] = -126.6f;
  std::vector<Q8Block> xq(static_cast<size_t>(k / 32)), xp(xq.size());
  QuantizeRowQ8(x.data(), xq.data(), k);
  portable::QuantizeRowQ8(x.data(), xp.data(), k);
  std::vector<double> xd(static_cast<size_t>(k));
  for (int64_t b = 0; b < k / 32; ++b) {
    const Q8Block& q = xq[static_cast<size_t>(b)];
    ASSERT_EQ(q.d, xp[static_cast<size_t>(b)].d);
    ASSERT_EQ(q.s, xp[static_cast<size_t>(b)].s);
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      ASSERT_EQ(q.q[j], xp[static_cast<size_t>(b)].q[j]) << "block " << b << " value " << j;
      const double v = static_cast<double>(q.d) * q.q[j];
      xd[static_cast<size_t>(b * 32 + j)] = v;
      ASSERT_LE(std::fabs(v - x[static_cast<size_t>(b * 32 + j)]), 0.5 * q.d * (1 + 1e-6) + 1e-30) << "block " << b;
      sum += q.q[j];
    }
    ASSERT_EQ(q.s, q.d * static_cast<float>(sum));
  }
  ASSERT_EQ(xq[2].d, 0.0f);
  ASSERT_EQ(xq[3].d, 1.0f);
  EXPECT_EQ((std::vector<int>{xq[3].q[0], xq[3].q[1], xq[3].q[2], xq[3].q[3], xq[3].q[4]}), (std::vector<int>{127, 2, -4, 0, -127}));
  for (GgmlType t : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0}) {
    std::vector<float> wf(static_cast<size_t>(n * k));
    for (auto& v : wf) v = static_cast<float>(rng.Normal());
    const std::vector<uint8_t> wq = QuantizedRows(t, wf, n, k);
    QMatrix w{t, wq.data(), n, k, *RowBytes(t, k)};
    const VecDotQ8Fn ref = t == GgmlType::kQ4_0 ? portable::DotQ4_0Q8 : t == GgmlType::kQ4_1 ? portable::DotQ4_1Q8 : portable::DotQ8_0Q8;
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = 0; r < n; ++r) {
      GetRow(w, r, row.data());
      double exact = 0, scale = 0;
      for (int64_t i = 0; i < k; ++i) {
        exact += row[static_cast<size_t>(i)] * xd[static_cast<size_t>(i)];
        scale += std::fabs(row[static_cast<size_t>(i)] * xd[static_cast<size_t>(i)]);
      }
      if (const VecDotQ8Fn dot = GetVecDotQ8(t)) {
        ASSERT_NEAR(Dot1(dot, w.row(r), xq.data(), k), exact, 1e-5 * scale) << TypeTraits(t).name << " row " << r;
      }
      ASSERT_NEAR(Dot1(ref, w.row(r), xq.data(), k), exact, 1e-5 * scale) << TypeTraits(t).name << " row " << r;
    }
  }
}

// MatMulQ's 8-bit decoding: each row's result is the same whatever the number of rows (a
// sequence decoded alone or beside others; every grouping of 4, 3, 2, 1 rows), within the
// activations' rounding bound of the f32 product (|error| <= sum_i |w_i| d_block / 2), and f32
// unless asked for.
TEST(OpsTest, Int8DecodingIsPerRowAndWithinItsBound) {
  if (GetVecDotQ8(GgmlType::kQ4_1) == nullptr) GTEST_SKIP() << "no 8-bit decoding on this CPU (" << CpuPathName() << ")";
  Rng rng(23);
  const int64_t n = 150, k = 192, m = kInt8Rows;
  std::vector<float> x(static_cast<size_t>(m * k));
  for (auto& v : x) v = static_cast<float>(rng.Normal());
  for (GgmlType t : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0}) {
    std::vector<float> wf(static_cast<size_t>(n * k));
    for (auto& v : wf) v = static_cast<float>(rng.Normal());
    const std::vector<uint8_t> wq = QuantizedRows(t, wf, n, k);
    QMatrix w{t, wq.data(), n, k, *RowBytes(t, k)};
    std::vector<float> one(static_cast<size_t>(m * n)), f32(one.size()), rows(one.size());
    for (int64_t i = 0; i < m; ++i) MatMulQ(w, x.data() + i * k, one.data() + i * n, 1, true);
    MatMulQ(w, x.data(), f32.data(), m);  // f32: not asked for
    for (int64_t r = 2; r <= m; ++r) {
      MatMulQ(w, x.data(), rows.data(), r, true);
      for (int64_t i = 0; i < r * n; ++i) ASSERT_EQ(rows[static_cast<size_t>(i)], one[static_cast<size_t>(i)]) << TypeTraits(t).name << " " << r << " rows";
    }
    EXPECT_NE(one, f32) << "the 8-bit path did not run";
    std::vector<float> row(static_cast<size_t>(k));
    std::vector<Q8Block> xq(static_cast<size_t>(k / 32));
    for (int64_t i = 0; i < m; ++i) {
      QuantizeRowQ8(x.data() + i * k, xq.data(), k);
      for (int64_t j = 0; j < n; ++j) {
        GetRow(w, j, row.data());
        double bound = 0, exact = 0;
        for (int64_t c = 0; c < k; ++c) {
          bound += std::fabs(row[static_cast<size_t>(c)]) * xq[static_cast<size_t>(c / 32)].d / 2;
          exact += static_cast<double>(row[static_cast<size_t>(c)]) * x[static_cast<size_t>(i * k + c)];
        }
        ASSERT_NEAR(one[static_cast<size_t>(i * n + j)], exact, bound + 1e-4) << TypeTraits(t).name;
        ASSERT_NEAR(f32[static_cast<size_t>(i * n + j)], exact, 1e-3) << TypeTraits(t).name;
      }
    }
  }
}

// Blocks the quantizer must not turn into garbage: a subnormal block is zero, an Inf or NaN makes
// the block's products NaN (as f32 would), on every path alike.
TEST(OpsTest, Int8QuantizerHandlesTinyAndNonFiniteBlocks) {
  std::vector<float> x(96, 1e-38f);  // block 0: subnormal scale (1e-38 / 127)
  for (int j = 32; j < 64; ++j) x[static_cast<size_t>(j)] = static_cast<float>(j);
  x[40] = std::numeric_limits<float>::infinity();
  for (int j = 64; j < 96; ++j) x[static_cast<size_t>(j)] = 1.0f;
  x[70] = std::nanf("");
  std::vector<Q8Block> a(3), b(3);
  QuantizeRowQ8(x.data(), a.data(), 96);
  portable::QuantizeRowQ8(x.data(), b.data(), 96);
  for (const auto* q : {&a, &b}) {
    EXPECT_EQ((*q)[0].d, 0.0f);
    EXPECT_EQ((*q)[0].s, 0.0f);
    for (int j = 0; j < 32; ++j) EXPECT_EQ((*q)[0].q[j], 0);
    for (int blk = 1; blk < 3; ++blk) {
      EXPECT_TRUE(std::isnan((*q)[static_cast<size_t>(blk)].d) && std::isnan((*q)[static_cast<size_t>(blk)].s)) << blk;
      for (int j = 0; j < 32; ++j) EXPECT_EQ((*q)[static_cast<size_t>(blk)].q[j], 0);
    }
  }
  if (const VecDotQ8Fn dot = GetVecDotQ8(GgmlType::kQ8_0)) {
    std::vector<float> wf(96, 0.5f);
    const std::vector<uint8_t> wq = QuantizedRows(GgmlType::kQ8_0, wf, 1, 96);
    EXPECT_TRUE(std::isnan(Dot1(dot, wq.data(), a.data(), 96)));
    EXPECT_EQ(Dot1(dot, wq.data(), a.data(), 32), 0.0f);
  }
}

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

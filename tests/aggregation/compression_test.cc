// Compressed client updates (aggregation/compression.h): quantization error bounds, top-k
// selection, error feedback's telescoping sum, and the structural checks a coordinator applies.
#include "aggregation/compression.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "common/rng.h"

namespace fedtune::aggregation {
namespace {

std::vector<float> Random(size_t n, uint64_t seed, float scale = 1e-3f) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = scale * static_cast<float>(rng.Normal());
  return v;
}

TEST(CompressionTest, BlockwiseCodesStayWithinHalfAStep) {
  for (Compression kind : {Compression::kInt8, Compression::kInt4}) {
    const float levels = kind == Compression::kInt8 ? 127.0f : 7.0f;
    for (size_t n : {1ul, 63ul, 64ul, 65ul, 1001ul}) {
      std::vector<float> x = Random(n, n);
      if (n > 70) std::fill(x.begin() + 64, x.begin() + 128, 0.0f);  // an all-zero block
      const CompressedTensor c = Compress(x, kind, 0);
      ASSERT_TRUE(CheckCompressed(c, n).ok()) << CheckCompressed(c, n);
      EXPECT_EQ(c.scales.size(), (n + 63) / 64);
      const std::vector<float> y = Decompress(c);
      for (size_t i = 0; i < n; ++i) {
        const float scale = c.scales[i / 64];
        float amax = 0;
        for (size_t j = i / 64 * 64; j < std::min(n, i / 64 * 64 + 64); ++j) amax = std::max(amax, std::fabs(x[j]));
        EXPECT_FLOAT_EQ(scale, amax / levels);
        EXPECT_LE(std::fabs(x[i] - y[i]), 0.5f * scale * (1 + 1e-5f)) << CompressionName(kind) << " n=" << n << " i=" << i;
      }
      // The largest magnitude of every block is exact up to rounding of the scale.
      const auto big = std::max_element(x.begin(), x.end(), [](float a, float b) { return std::fabs(a) < std::fabs(b); }) - x.begin();
      EXPECT_NEAR(y[static_cast<size_t>(big)], x[static_cast<size_t>(big)], 1e-6f * std::fabs(x[static_cast<size_t>(big)]));
      EXPECT_EQ(PayloadBytes(c), c.scales.size() * 4 + (kind == Compression::kInt8 ? n : (n + 1) / 2));
    }
  }
}

TEST(CompressionTest, TopKKeepsTheLargestMagnitudes) {
  const std::vector<float> x = {0.1f, -5.0f, 0.0f, 3.0f, -0.2f, 3.0f, 0.05f, -4.0f};
  const CompressedTensor c = Compress(x, Compression::kTopK, 0.5);
  ASSERT_TRUE(CheckCompressed(c, x.size()).ok());
  EXPECT_EQ(c.indices, (std::vector<uint32_t>{1, 3, 5, 7}));
  EXPECT_EQ(Decompress(c), (std::vector<float>{0, -5.0f, 0, 3.0f, 0, 3.0f, 0, -4.0f}));
  EXPECT_EQ(PayloadBytes(c), 4u * 8);
  EXPECT_EQ(Compress(x, Compression::kTopK, 0.01).indices.size(), 1u);  // at least one value
  EXPECT_EQ(Compress(x, Compression::kTopK, 1.0).indices.size(), 8u);
}

// Error feedback (EF-SGD): what is sent over T rounds sums to the true deltas minus the last
// residual, and the residual stays bounded (half a step per coordinate for the quantizers).
TEST(CompressionTest, ErrorFeedbackLosesNothingForGood) {
  for (Compression kind : {Compression::kInt8, Compression::kInt4, Compression::kTopK}) {
    TensorMap residual;
    std::vector<double> sent_sum(500, 0), true_sum(500, 0);
    for (int t = 0; t < 20; ++t) {
      ClientUpdate u;
      u.client = "c";
      u.num_examples = 1;
      u.delta["w"] = Random(500, 100 + static_cast<uint64_t>(t));
      for (size_t i = 0; i < 500; ++i) true_sum[i] += u.delta["w"][i];
      CompressUpdate(&u, kind, 0.1, &residual);
      ASSERT_EQ(u.compressed.count("w"), 1u);
      EXPECT_EQ(u.delta["w"], Decompress(u.compressed["w"]));
      for (size_t i = 0; i < 500; ++i) sent_sum[i] += u.delta["w"][i];
    }
    double worst = 0, res_norm = 0, true_norm = 0;
    for (size_t i = 0; i < 500; ++i) {
      worst = std::max(worst, std::fabs(sent_sum[i] + residual["w"][i] - true_sum[i]));
      res_norm += residual["w"][i] * residual["w"][i];
      true_norm += true_sum[i] * true_sum[i];
    }
    EXPECT_LT(worst, 1e-6) << CompressionName(kind);  // telescoping: sent + residual = truth
    EXPECT_LT(std::sqrt(res_norm), (kind == Compression::kTopK ? 0.6 : 0.2) * std::sqrt(true_norm)) << CompressionName(kind);
  }
  // Without error feedback nothing is carried.
  ClientUpdate u;
  u.delta["w"] = Random(100, 1);
  CompressUpdate(&u, Compression::kInt4, 0.1, nullptr);
  EXPECT_EQ(u.compressed.size(), 1u);
  ClientUpdate plain;
  plain.delta["w"] = Random(100, 1);
  CompressUpdate(&plain, Compression::kNone, 0.1, nullptr);
  EXPECT_TRUE(plain.compressed.empty());
  EXPECT_EQ(plain.delta["w"], Random(100, 1));
}

TEST(CompressionTest, MalformedTensorsAreRefused) {
  const std::vector<float> x = Random(130, 3);
  auto check = [](CompressedTensor c, size_t n) { return CheckCompressed(c, n).code(); };
  const CompressedTensor q8 = Compress(x, Compression::kInt8, 0), q4 = Compress(x, Compression::kInt4, 0), tk = Compress(x, Compression::kTopK, 0.1);
  EXPECT_EQ(check(q8, 131), absl::StatusCode::kInvalidArgument);  // wrong dense size
  auto m = q8;
  m.q8[5] = -128;
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  m = q8;
  m.scales.pop_back();
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  m = q8;
  m.scales[0] = NAN;
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  m = q8;
  m.scales[1] = -1;
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  m = q4;
  m.q4[3] &= 0xF0;  // a zero nibble: code -8
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  m = q4;
  m.q4.push_back(0x11);
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  m = tk;
  std::swap(m.indices[0], m.indices[1]);
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  m = tk;
  m.indices.back() = 130;
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  m = tk;
  m.values[0] = INFINITY;
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  m = tk;
  m.values.pop_back();
  EXPECT_EQ(check(m, 130), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(check(CompressedTensor{}, 0), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(CheckCompressed(q8, 130).ok() && CheckCompressed(q4, 130).ok() && CheckCompressed(tk, 130).ok());
  EXPECT_FALSE(CompressionFromName("int3").ok());
  EXPECT_EQ(*CompressionFromName(""), Compression::kNone);
}

}  // namespace
}  // namespace fedtune::aggregation

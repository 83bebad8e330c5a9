#include "kernels/quant.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <fstream>
#include <vector>

#include "common/rng.h"
#include "gtest/gtest.h"

namespace fedtune::kernels {
namespace {

// tests/data/dequant_golden.bin comes from the gguf package's numpy dequantization
// (tests/oracles/gen_dequant_golden.py): random blocks of every type with their values.
TEST(QuantTest, DequantizationIsBitExactWithGgufPython) {
  std::ifstream in(std::string(FEDTUNE_SOURCE_DIR) + "/tests/data/dequant_golden.bin", std::ios::binary);
  ASSERT_TRUE(in) << "missing golden file";
  int types_seen = 0;
  for (;;) {
    uint32_t hdr[4];
    if (!in.read(reinterpret_cast<char*>(hdr), sizeof hdr)) break;
    const auto type = static_cast<GgmlType>(hdr[0]);
    const uint32_t n_blocks = hdr[1], type_size = hdr[2], block_size = hdr[3];
    const auto tr = TypeTraits(type);
    ASSERT_EQ(tr.type_size, type_size) << tr.name;
    ASSERT_EQ(tr.block_size, block_size) << tr.name;
    std::vector<uint8_t> blocks(static_cast<size_t>(n_blocks) * type_size);
    std::vector<float> expect(static_cast<size_t>(n_blocks) * block_size), got(expect.size());
    ASSERT_TRUE(in.read(reinterpret_cast<char*>(blocks.data()), static_cast<std::streamsize>(blocks.size())));
    ASSERT_TRUE(in.read(reinterpret_cast<char*>(expect.data()), static_cast<std::streamsize>(expect.size() * 4)));
    DequantizeRow(type, blocks.data(), got.data(), static_cast<int64_t>(got.size()));
    size_t mismatches = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      uint32_t a, b;
      std::memcpy(&a, &got[i], 4);
      std::memcpy(&b, &expect[i], 4);
      if (a != b && !(std::isnan(got[i]) && std::isnan(expect[i]))) {
        if (mismatches++ < 5) ADD_FAILURE() << tr.name << " value " << i << ": " << got[i] << " vs gguf " << expect[i];
      }
    }
    EXPECT_EQ(mismatches, 0u) << tr.name;
    ++types_seen;
  }
  EXPECT_EQ(types_seen, 13);
}

class QuantRoundTripTest : public ::testing::TestWithParam<GgmlType> {};

TEST_P(QuantRoundTripTest, ErrorWithinHalfStep) {
  const GgmlType t = GetParam();
  Rng rng(3);
  const int64_t n = 32 * 64;
  std::vector<float> x(n), y(n);
  for (auto& v : x) v = static_cast<float>(rng.Normal());
  std::vector<uint8_t> q(*RowBytes(t, n));
  ASSERT_TRUE(QuantizeRow(t, x.data(), q.data(), n).ok());
  DequantizeRow(t, q.data(), y.data(), n);
  const int levels = t == GgmlType::kQ8_0 ? 255 : (t == GgmlType::kQ5_0 || t == GgmlType::kQ5_1) ? 31 : 15;
  for (int64_t b = 0; b < n / 32; ++b) {
    float mn = x[b * 32], mx = mn;
    for (int j = 0; j < 32; ++j) { mn = std::min(mn, x[b * 32 + j]); mx = std::max(mx, x[b * 32 + j]); }
    // symmetric formats span [-amax, amax] so their step is at most 2*amax/levels
    const float range = std::max(mx - mn, 2 * std::max(std::fabs(mn), std::fabs(mx)));
    // ggml's symmetric formats (Q4_0, Q5_0) map the largest magnitude to the unused end code,
    // so the opposite extreme can be off by a whole step; the others round to half a step.
    const bool symmetric = t == GgmlType::kQ4_0 || t == GgmlType::kQ5_0;
    const float tol = range / static_cast<float>(levels) * (symmetric ? 1.0f : 0.5f) * 1.02f + 1e-3f * range;
    for (int j = 0; j < 32; ++j) ASSERT_NEAR(y[b * 32 + j], x[b * 32 + j], tol) << TypeTraits(t).name << " block " << b;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, QuantRoundTripTest,
                         ::testing::Values(GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1),
                         [](const auto& p) { return std::string(TypeTraits(p.param).name); });

TEST(QuantTest, F16AndBf16RoundTrip) {
  std::vector<float> x = {0.0f, 1.0f, -2.5f, 1024.0f, 3.140625f};
  for (GgmlType t : {GgmlType::kF16, GgmlType::kBF16}) {
    std::vector<uint8_t> q(*RowBytes(t, 5));
    std::vector<float> y(5);
    ASSERT_TRUE(QuantizeRow(t, x.data(), q.data(), 5).ok());
    DequantizeRow(t, q.data(), y.data(), 5);
    EXPECT_EQ(x, y) << TypeTraits(t).name;
  }
}

TEST(QuantTest, RowBytesRejectsPartialBlocks) {
  EXPECT_EQ(*RowBytes(GgmlType::kQ4_1, 64), 40u);
  EXPECT_EQ(RowBytes(GgmlType::kQ4_K, 100).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeRow(GgmlType::kQ6_K, nullptr, nullptr, 256).code(), absl::StatusCode::kUnimplemented);
}

TEST(QuantTest, TypeNamesAndIds) {
  EXPECT_EQ(GgmlTypeFromName("q4_1"), GgmlType::kQ4_1);
  EXPECT_EQ(GgmlTypeFromName("BF16"), GgmlType::kBF16);
  EXPECT_FALSE(GgmlTypeFromName("q9_9").has_value());
  EXPECT_FALSE(GetTypeTraits(4).has_value());  // removed Q4_2
  EXPECT_FALSE(GetTypeTraits(99).has_value());
}

}  // namespace
}  // namespace fedtune::kernels

namespace fedtune::kernels {
namespace {

TEST(Nf4Test, CodebookMatchesQLoRATestVector) {
  EXPECT_EQ(kNf4Codes[0], -1.0f);
  EXPECT_EQ(kNf4Codes[7], 0.0f);
  EXPECT_FLOAT_EQ(kNf4Codes[1], -0.6961928009986877f);
  EXPECT_FLOAT_EQ(kNf4Codes[14], 0.7229568362236023f);
  EXPECT_EQ(kNf4Codes[15], 1.0f);
  for (int i = 1; i < 16; ++i) EXPECT_LT(kNf4Codes[i - 1], kNf4Codes[i]);
}

TEST(Nf4Test, RoundTripIsNearestCodeTimesAbsmax) {
  Rng rng(8);
  const int64_t n = 64 * 20;
  std::vector<float> x(n), y(n);
  for (auto& v : x) v = static_cast<float>(rng.Normal());
  std::vector<uint8_t> q(*RowBytes(GgmlType::kNF4, n));
  EXPECT_EQ(q.size(), 20u * 36u);  // 4.5 bits per value
  ASSERT_TRUE(QuantizeRow(GgmlType::kNF4, x.data(), q.data(), n).ok());
  DequantizeRow(GgmlType::kNF4, q.data(), y.data(), n);
  for (int64_t b = 0; b < n / 64; ++b) {
    float absmax = 0;
    for (int j = 0; j < 64; ++j) absmax = std::max(absmax, std::fabs(x[b * 64 + j]));
    for (int j = 0; j < 64; ++j) {
      const float v = x[b * 64 + j] / absmax;
      float best = 2;
      for (float c : kNf4Codes) best = std::min(best, std::fabs(c - v));
      ASSERT_NEAR(std::fabs(y[b * 64 + j] / absmax - v), best, 1e-6) << "block " << b << " value " << j;
    }
  }
  EXPECT_EQ(GgmlTypeFromName("nf4"), GgmlType::kNF4);
}

// Double quantization (QLoRA): the absmax constants in 8 bits. Fewer bytes, nearly the same
// error as NF4 with fp32 constants, and the codes are the nearest for the absmax the reader
// reconstructs.
TEST(Nf4Test, DoubleQuantizationSavesBitsAtNearlyTheSameError) {
  Rng rng(9);
  const int64_t n = 576;  // a SmolLM2 row
  std::vector<float> x(static_cast<size_t>(n * 50)), y(x.size()), z(x.size());
  for (auto& v : x) v = static_cast<float>(0.02 * rng.Normal());
  const size_t dq = *RowBytes(GgmlType::kNF4DQ, n), plain = *RowBytes(GgmlType::kNF4, n);
  EXPECT_EQ(dq, 8u + 9u * 33u);
  EXPECT_LT(8.0 * static_cast<double>(dq) / n, 4.25);  // vs 4.5 bits
  double e_dq = 0, e_nf4 = 0;
  for (int64_t r = 0; r < 50; ++r) {
    std::vector<uint8_t> a(dq), b(plain);
    ASSERT_TRUE(QuantizeRow(GgmlType::kNF4DQ, x.data() + r * n, a.data(), n).ok());
    ASSERT_TRUE(QuantizeRow(GgmlType::kNF4, x.data() + r * n, b.data(), n).ok());
    DequantizeRow(GgmlType::kNF4DQ, a.data(), y.data() + r * n, n);
    DequantizeRow(GgmlType::kNF4, b.data(), z.data() + r * n, n);
  }
  for (size_t i = 0; i < x.size(); ++i) {
    e_dq += (y[i] - x[i]) * (y[i] - x[i]);
    e_nf4 += (z[i] - x[i]) * (z[i] - x[i]);
  }
  std::printf("NF4 rmse %.3g, NF4_DQ rmse %.3g (ratio %.4f)\n", std::sqrt(e_nf4 / x.size()), std::sqrt(e_dq / x.size()), std::sqrt(e_dq / e_nf4));
  EXPECT_LT(std::sqrt(e_dq / e_nf4), 1.05);
  EXPECT_EQ(GgmlTypeFromName("nf4_dq"), GgmlType::kNF4DQ);
  // A constant row (zero spread of the constants) and an all-zero row survive.
  std::vector<float> c(static_cast<size_t>(n), 0.5f), out(static_cast<size_t>(n));
  std::vector<uint8_t> q(dq);
  ASSERT_TRUE(QuantizeRow(GgmlType::kNF4DQ, c.data(), q.data(), n).ok());
  DequantizeRow(GgmlType::kNF4DQ, q.data(), out.data(), n);
  for (float v : out) ASSERT_FLOAT_EQ(v, 0.5f);
  std::fill(c.begin(), c.end(), 0.0f);
  ASSERT_TRUE(QuantizeRow(GgmlType::kNF4DQ, c.data(), q.data(), n).ok());
  DequantizeRow(GgmlType::kNF4DQ, q.data(), out.data(), n);
  for (float v : out) ASSERT_EQ(v, 0.0f);
}

// Sub-4-bit formats: fedtune's Q2_K / Q3_K quantizers (their dequantization is checked bit-exact
// against gguf-py above) and the private NF3 / NF2. On Gaussian rows: no value is off by more
// than its group's step, relative RMS error within what the bit width allows and in bit order;
// all-zero and constant rows stay finite and exact where representable.
TEST(QuantTest, Q2KQ3KAndNf3Nf2QuantizeWithinTheirStep) {
  Rng rng(11);
  const int64_t n = 256 * 24;
  std::vector<float> x(n);
  for (auto& v : x) v = static_cast<float>(rng.Normal()) * 0.02f;
  double energy = 0;
  for (float v : x) energy += static_cast<double>(v) * v;
  std::map<std::string, double> rel;
  for (GgmlType t : {GgmlType::kQ3_K, GgmlType::kQ2_K, GgmlType::kNF3, GgmlType::kNF2, GgmlType::kQ4_1}) {
    std::vector<uint8_t> q(*RowBytes(t, n));
    std::vector<float> y(n);
    ASSERT_TRUE(QuantizeRow(t, x.data(), q.data(), n).ok()) << TypeTraits(t).name;
    DequantizeRow(t, q.data(), y.data(), n);
    double err = 0;
    const int64_t group = (t == GgmlType::kQ2_K || t == GgmlType::kQ3_K) ? 16 : TypeTraits(t).block_size;
    for (int64_t g = 0; g < n / group; ++g) {
      float amax = 0;
      for (int64_t j = 0; j < group; ++j) amax = std::max(amax, std::fabs(x[g * group + j]));
      // the widest step of any of these grids relative to the group's magnitude: NF2's 0 -> -1 gap
      for (int64_t j = 0; j < group; ++j) {
        const double e = y[g * group + j] - x[g * group + j];
        ASSERT_LE(std::fabs(e), 1.05 * amax) << TypeTraits(t).name << " group " << g;
        err += e * e;
      }
    }
    rel[TypeTraits(t).name] = std::sqrt(err / energy);
    std::printf("%s: relative RMS error %.4f (%.3f bits per weight)\n", TypeTraits(t).name, rel[TypeTraits(t).name],
                8.0 * static_cast<double>(q.size()) / static_cast<double>(n));
  }
  // Uniform 2- and 3-bit grids on a Gaussian: ~0.3 and ~0.15 at best with per-16 scales.
  EXPECT_LT(rel["Q3_K"], 0.20);
  EXPECT_LT(rel["Q2_K"], 0.40);
  EXPECT_LT(rel["NF3"], 0.20);
  EXPECT_LT(rel["NF2"], 0.45);  // NF2 grid {-1, 0, 0.34, 1} x a searched scale: coarse
  EXPECT_LT(rel["Q4_1"], rel["Q3_K"]);
  EXPECT_LT(rel["Q3_K"], rel["Q2_K"]);
  EXPECT_LT(rel["NF3"], rel["NF2"]);
  for (GgmlType t : {GgmlType::kQ3_K, GgmlType::kQ2_K, GgmlType::kNF3, GgmlType::kNF2}) {
    for (float c : {0.0f, 0.5f, -0.25f}) {
      std::vector<float> flat(256, c), out(256);
      std::vector<uint8_t> q(*RowBytes(t, 256));
      ASSERT_TRUE(QuantizeRow(t, flat.data(), q.data(), 256).ok());
      DequantizeRow(t, q.data(), out.data(), 256);
      for (float v : out) ASSERT_NEAR(v, c, 1e-3f) << TypeTraits(t).name << " constant " << c;
    }
  }
  EXPECT_EQ(GgmlTypeFromName("nf3"), GgmlType::kNF3);
  EXPECT_EQ(GgmlTypeFromName("q2_k"), GgmlType::kQ2_K);
  EXPECT_EQ(RowBytes(GgmlType::kQ3_K, 576).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedtune::kernels


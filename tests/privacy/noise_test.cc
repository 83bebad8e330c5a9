#include "privacy/noise.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "privacy/ledger.h"

namespace fedtune::privacy {
namespace {

TEST(NoiseSourceTest, GaussianHasMeanAndVariance) {
  auto src = NoiseSource::Create();
  ASSERT_TRUE(src.ok());
  const int n = 1'000'000;
  const double sigma = 2.5;
  std::vector<float> x(n, 0.0f);
  (*src)->AddGaussian(x, sigma);
  double s = 0, s2 = 0, s4 = 0;
  for (float v : x) s += v;
  const double mean = s / n;
  for (float v : x) {
    const double d = v - mean;
    s2 += d * d;
    s4 += d * d * d * d;
  }
  const double var = s2 / (n - 1);
  // 5 standard errors: mean SE = sigma/sqrt(n); variance SE = sigma^2 sqrt(2/(n-1)).
  EXPECT_LT(std::fabs(mean), 5 * sigma / std::sqrt(n));
  EXPECT_LT(std::fabs(var - sigma * sigma), 5 * sigma * sigma * std::sqrt(2.0 / (n - 1)));
  // Kurtosis of a normal is 3 (SE sqrt(24/n)).
  EXPECT_NEAR(s4 / n / (var * var), 3.0, 5 * std::sqrt(24.0 / n));
}

TEST(NoiseSourceTest, DiscreteGaussianHasMeanAndVariance) {
  auto src = NoiseSource::Create();
  ASSERT_TRUE(src.ok());
  const int n = 200'000;
  const double sigma = 7.3;
  double s = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    const double v = static_cast<double>((*src)->DiscreteGaussian(sigma));
    s += v;
    s2 += v * v;
  }
  const double mean = s / n, var = s2 / n - mean * mean;
  EXPECT_LT(std::fabs(mean), 5 * sigma / std::sqrt(n));
  // For sigma >= 1 the discrete Gaussian's variance equals sigma^2 to within 1e-10 relative.
  EXPECT_LT(std::fabs(var - sigma * sigma), 5 * sigma * sigma * std::sqrt(2.0 / n));
}

TEST(NoiseSourceTest, SeededStreamsRepeatAndSystemSeedsDiffer) {
  NoiseSource::Seed seed{};
  seed[0] = 7;
  auto a = NoiseSource::FromSeed(seed), b = NoiseSource::FromSeed(seed);
  ASSERT_TRUE(a.ok() && b.ok());
  for (int i = 0; i < 100; ++i) EXPECT_EQ((*a)->NextU64(), (*b)->NextU64());
  auto c = NoiseSource::Create(), d = NoiseSource::Create();
  ASSERT_TRUE(c.ok() && d.ok());
  EXPECT_NE((*c)->NextU64(), (*d)->NextU64());
}

TEST(PrivacyLedgerTest, RefusesReleasePastBudget) {
  PrivacyLedger ledger(2.0, 1e-5);
  int recorded = 0;
  absl::Status st;
  for (int round = 0; round < 1000 && st.ok(); ++round) {
    st = ledger.Record({"round " + std::to_string(round), 0.2, 3.0, 1});
    if (st.ok()) ++recorded;
  }
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_GT(recorded, 0);
  EXPECT_EQ(static_cast<int>(ledger.releases().size()), recorded);
  auto spent = ledger.Spent();
  ASSERT_TRUE(spent.ok());
  EXPECT_LE(spent->epsilon, 2.0);
  auto next = ledger.EpsilonIf({"next", 0.2, 3.0, 1});
  ASSERT_TRUE(next.ok());
  EXPECT_GT(next->epsilon, 2.0);
}

TEST(PrivacyLedgerTest, ComposesLikeOneAccountant) {
  PrivacyLedger ledger(0, 1e-5);
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(ledger.Record({"step", 0.04, 1.5, 225}).ok());
  auto e = ledger.Spent();
  ASSERT_TRUE(e.ok());
  EXPECT_NEAR(e->epsilon, 7.32911117143, 1e-5);
}

}  // namespace
}  // namespace fedtune::privacy

// Test vectors from ALGORITHMS.md (reproduced there with Opacus / TF-Privacy / dp-accounting).
#include "privacy/rdp_accountant.h"

#include <gtest/gtest.h>

#include <cmath>

namespace fedtune::privacy {
namespace {

std::vector<double> Range(int lo, int hi) {
  std::vector<double> o;
  for (int a = lo; a <= hi; ++a) o.push_back(a);
  return o;
}

std::vector<double> TfPrivacyOrders() {
  std::vector<double> o = {1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5};
  for (int a = 5; a <= 63; ++a) o.push_back(a);
  o.insert(o.end(), {128, 256, 512});
  return o;
}

Epsilon EpsilonOf(double q, double sigma, int64_t steps, double delta, const std::vector<double>& orders) {
  std::vector<double> rdp = SampledGaussianRdp(q, sigma, orders);
  for (double& r : rdp) r *= static_cast<double>(steps);
  auto e = EpsilonFromRdp(orders, rdp, delta);
  EXPECT_TRUE(e.ok()) << e.status();
  return *e;
}

TEST(RdpAccountantTest, OpacusDefaultOrdersVector) {
  const Epsilon e = EpsilonOf(0.04, 1.5, 2250, 1e-5, DefaultOrders());
  EXPECT_NEAR(e.epsilon, 7.32911117143, 7.32911117143 * 1e-6);
}

TEST(RdpAccountantTest, MixtureOfTwoMechanisms) {
  const std::vector<double> orders = Range(2, 32);
  std::vector<double> a = SampledGaussianRdp(1e-5, 1.0, orders), b = SampledGaussianRdp(1e-4, 3.0, orders);
  std::vector<double> rdp(orders.size());
  for (size_t k = 0; k < rdp.size(); ++k) rdp[k] = 10 * a[k] + 4 * b[k];
  auto e = EpsilonFromRdp(orders, rdp, 1e-5);
  ASSERT_TRUE(e.ok());
  EXPECT_NEAR(e->epsilon, 0.336344, 6e-7);  // the vector is given to 6 decimals
  EXPECT_EQ(e->order, 23);
}

TEST(RdpAccountantTest, DpSgdMnistVector) {  // n=60000, batch 150, sigma 1.3, 15 epochs
  const Epsilon e = EpsilonOf(150.0 / 60000, 1.3, 6000, 1e-5, TfPrivacyOrders());
  EXPECT_NEAR(e.epsilon, 0.7242234026109595, 0.7242234026109595 * 1e-6);
  EXPECT_EQ(e.order, 19);
}

TEST(RdpAccountantTest, DpSgdLargeDatasetVector) {  // n=100000, batch 100, sigma 1.0, 30 epochs
  const Epsilon e = EpsilonOf(100.0 / 100000, 1.0, 30000, 1e-7, TfPrivacyOrders());
  EXPECT_NEAR(e.epsilon, 1.4154988495444842, 1.4154988495444842 * 1e-6);
  EXPECT_EQ(e.order, 13);
}

TEST(RdpAccountantTest, ConstantRdpConversion) {
  const std::vector<double> orders = Range(2, 32);
  auto e = EpsilonFromRdp(orders, std::vector<double>(orders.size(), 1.1), 1e-5);
  ASSERT_TRUE(e.ok());
  EXPECT_NEAR(e->epsilon, 1.32783806176, 1.32783806176 * 1e-6);
  EXPECT_EQ(e->order, 32);
}

TEST(RdpAccountantTest, FullBatchIsPlainGaussian) {
  const std::vector<double> orders = {2.5, 8};
  const auto rdp = SampledGaussianRdp(1.0, 2.0, orders);
  EXPECT_DOUBLE_EQ(rdp[0], 2.5 / 8);
  EXPECT_DOUBLE_EQ(rdp[1], 1.0);
}

TEST(RdpAccountantTest, FractionalOrdersInterpolateIntegerOnes) {
  // RDP is non-decreasing in the order: the erfc series must sit between its integer neighbours.
  const std::vector<double> orders = {3, 3.5, 4};
  const auto rdp = SampledGaussianRdp(0.01, 1.1, orders);
  EXPECT_LT(rdp[0], rdp[1]);
  EXPECT_LT(rdp[1], rdp[2]);
}

TEST(RdpAccountantTest, AdaptiveClippingNoiseSplit) {
  auto z = AdaptiveClippingUpdateNoise(1.0, 5.0);  // m = 100, sigma_b = m / 20
  ASSERT_TRUE(z.ok());
  EXPECT_NEAR(*z, 1.0050378, 1e-7);
  EXPECT_FALSE(AdaptiveClippingUpdateNoise(10.0, 5.0).ok());
}

TEST(RdpAccountantTest, NoiseMultiplierMeetsTarget) {
  auto sigma = NoiseMultiplierFor(8.0, 1e-5, 0.1, 50);
  ASSERT_TRUE(sigma.ok()) << sigma.status();
  EXPECT_LE(EpsilonOf(0.1, *sigma, 50, 1e-5, DefaultOrders()).epsilon, 8.0);
  EXPECT_GT(EpsilonOf(0.1, *sigma * 0.99, 50, 1e-5, DefaultOrders()).epsilon, 8.0);
}

TEST(RdpAccountantTest, BadDeltaIsRejected) {
  EXPECT_EQ(EpsilonFromRdp({2}, {1}, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EpsilonFromRdp({2, 3}, {1}, 1e-5).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedtune::privacy

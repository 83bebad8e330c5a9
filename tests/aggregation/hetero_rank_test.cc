#include "aggregation/hetero_rank.h"

#include <gtest/gtest.h>

#include <cmath>

#include "common/rng.h"

namespace fedtune::aggregation {
namespace {

LoraFactors Random(Rng& rng, int64_t r, int64_t in, int64_t out, double scale, double weight) {
  LoraFactors f{r, in, out, {}, {}, scale, weight};
  for (int64_t i = 0; i < r * in; ++i) f.a.push_back(static_cast<float>(rng.Normal()));
  for (int64_t i = 0; i < out * r; ++i) f.b.push_back(static_cast<float>(rng.Normal()));
  return f;
}

std::vector<double> WeightedDense(const std::vector<LoraFactors>& cs) {
  double total = 0;
  for (const auto& c : cs) total += c.weight;
  std::vector<double> w(cs[0].out * cs[0].in, 0.0);
  for (const auto& c : cs) {
    auto d = DenseDelta(c);
    for (size_t j = 0; j < w.size(); ++j) w[j] += c.weight / total * d[j];
  }
  return w;
}

double MaxRelErr(const std::vector<float>& got, const std::vector<double>& want) {
  double e = 0, m = 0;
  for (size_t j = 0; j < want.size(); ++j) {
    e = std::max(e, std::fabs(got[j] - want[j]));
    m = std::max(m, std::fabs(want[j]));
  }
  return e / m;
}

std::vector<LoraFactors> Clients(Rng& rng) {
  return {Random(rng, 2, 12, 10, 8.0, 1), Random(rng, 4, 12, 10, 4.0, 3), Random(rng, 8, 12, 10, 2.0, 2)};
}

TEST(HeteroRankTest, FloraStackingIsExact) {
  Rng rng(1);
  auto cs = Clients(rng);
  auto g = FloraStack(cs);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->rank, 14);
  EXPECT_LT(MaxRelErr(DenseDelta(*g), WeightedDense(cs)), 1e-6);
}

TEST(HeteroRankTest, FlexLoraAtFullRankReproducesTheAverage) {
  Rng rng(2);
  auto cs = Clients(rng);
  auto gs = FlexLoraRedistribute(cs, {10, 10}, {1.0, 0.5});
  ASSERT_TRUE(gs.ok()) << gs.status();
  for (const LoraFactors& g : *gs) EXPECT_LT(MaxRelErr(DenseDelta(g), WeightedDense(cs)), 1e-5);
}

TEST(HeteroRankTest, FlexLoraTruncationIsTheBestLowRankApproximation) {
  Rng rng(3);
  auto cs = Clients(rng);
  auto g2 = FlexLoraRedistribute(cs, {2, 6}, {1.0, 1.0});
  ASSERT_TRUE(g2.ok());
  const auto w = WeightedDense(cs);
  auto err = [&](const LoraFactors& f) {
    auto d = DenseDelta(f);
    double e = 0;
    for (size_t j = 0; j < w.size(); ++j) e += (d[j] - w[j]) * (d[j] - w[j]);
    return e;
  };
  EXPECT_GT(err((*g2)[0]), err((*g2)[1]));
  EXPECT_EQ(FlexLoraRedistribute(cs, {11}, {1.0}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(HeteroRankTest, ZeroPaddingIsInexactForLora) {
  Rng rng(4);
  std::vector<LoraFactors> cs = {Random(rng, 2, 12, 10, 1.0, 1), Random(rng, 4, 12, 10, 1.0, 1)};
  auto g = ZeroPadAverage(cs);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->rank, 4);
  EXPECT_GT(MaxRelErr(DenseDelta(*g), WeightedDense(cs)), 0.1);  // mean(B) mean(A) != mean(BA)
}

TEST(HeteroRankTest, MismatchedShapesAreRejected) {
  Rng rng(5);
  std::vector<LoraFactors> cs = {Random(rng, 2, 12, 10, 1.0, 1), Random(rng, 2, 11, 10, 1.0, 1)};
  EXPECT_EQ(FloraStack(cs).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedtune::aggregation

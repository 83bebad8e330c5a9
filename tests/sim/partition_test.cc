#include "sim/partition.h"

#include <gtest/gtest.h>

#include <set>

namespace fedtune::sim {
namespace {

std::vector<int> Labels(int per_task, int tasks) {
  std::vector<int> l;
  for (int t = 0; t < tasks; ++t)
    for (int i = 0; i < per_task; ++i) l.push_back(t);
  return l;
}

void ExpectExactCover(const std::vector<std::vector<size_t>>& parts, size_t n) {
  std::multiset<size_t> seen;
  for (const auto& p : parts) {
    EXPECT_FALSE(p.empty());
    seen.insert(p.begin(), p.end());
  }
  EXPECT_EQ(seen.size(), n);
  EXPECT_EQ(std::set<size_t>(seen.begin(), seen.end()).size(), n);
}

TEST(PartitionTest, IidDealsEvenly) {
  Rng rng(1);
  auto p = Partition(Labels(50, 3), 3, 7, PartitionKind::kIid, 0, 0, rng);
  ASSERT_TRUE(p.ok());
  ExpectExactCover(*p, 150);
  for (const auto& c : *p) EXPECT_NEAR(static_cast<double>(c.size()), 150.0 / 7, 1.0);
}

TEST(PartitionTest, ByTaskGivesEachClientOneTask) {
  Rng rng(2);
  const auto labels = Labels(40, 3);
  auto p = Partition(labels, 3, 6, PartitionKind::kByTask, 0, 0, rng);
  ASSERT_TRUE(p.ok());
  ExpectExactCover(*p, 120);
  for (size_t k = 0; k < p->size(); ++k)
    for (size_t i : (*p)[k]) EXPECT_EQ(labels[i], static_cast<int>(k % 3));
  EXPECT_FALSE(Partition(labels, 3, 2, PartitionKind::kByTask, 0, 0, rng).ok());
}

TEST(PartitionTest, DirichletIsSkewedCompleteAndDeterministic) {
  const auto labels = Labels(200, 4);
  Rng a(3), b(3);
  auto p = Partition(labels, 4, 10, PartitionKind::kDirichlet, 0.1, 0, a);
  auto q = Partition(labels, 4, 10, PartitionKind::kDirichlet, 0.1, 0, b);
  ASSERT_TRUE(p.ok() && q.ok());
  EXPECT_EQ(*p, *q);
  ExpectExactCover(*p, 800);
  // With alpha = 0.1 most clients are dominated by one task.
  int dominated = 0;
  for (const auto& c : *p) {
    std::vector<int> count(4, 0);
    for (size_t i : c) ++count[static_cast<size_t>(labels[i])];
    if (*std::max_element(count.begin(), count.end()) > 0.7 * static_cast<double>(c.size())) ++dominated;
  }
  EXPECT_GE(dominated, 6);
}

TEST(PartitionTest, SizeSkewShrinksLaterClients) {
  Rng rng(4);
  auto p = Partition(Labels(100, 2), 2, 5, PartitionKind::kSizeSkew, 0, 1.5, rng);
  ASSERT_TRUE(p.ok());
  ExpectExactCover(*p, 200);
  EXPECT_GT((*p)[0].size(), 3 * (*p)[4].size());
}

TEST(PartitionTest, MoreClientsThanExamplesIsAnError) {
  Rng rng(5);
  EXPECT_EQ(Partition(Labels(2, 1), 1, 3, PartitionKind::kIid, 0, 0, rng).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(GammaTest, MeanAndVarianceMatchTheShape) {
  Rng rng(6);
  for (double shape : {0.3, 1.0, 4.5}) {
    double s = 0, s2 = 0;
    const int n = 200000;
    for (int i = 0; i < n; ++i) {
      const double x = SampleGamma(shape, rng);
      s += x;
      s2 += x * x;
    }
    const double mean = s / n, var = s2 / n - mean * mean;
    EXPECT_NEAR(mean, shape, 0.02 * shape + 0.01);
    EXPECT_NEAR(var, shape, 0.05 * shape + 0.01);
  }
}

}  // namespace
}  // namespace fedtune::sim

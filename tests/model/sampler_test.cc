#include "model/sampler.h"

#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace fedtune::model {
namespace {

TEST(SamplerTest, GreedyPicksArgmax) {
  Sampler s({0.0f, 1.0f, 1});
  EXPECT_EQ(s.Sample(std::vector<float>{0.1f, 3.0f, 2.0f}), 1);
}

TEST(SamplerTest, TopPExcludesTail) {
  // probabilities ~ 0.665, 0.245, 0.090: top_p 0.8 keeps the first two only.
  Sampler s({1.0f, 0.8f, 7});
  std::map<int, int> seen;
  for (int i = 0; i < 2000; ++i) seen[s.Sample(std::vector<float>{2.0f, 1.0f, 0.0f})]++;
  EXPECT_EQ(seen.count(2), 0u);
  EXPECT_GT(seen[0], seen[1]);
  EXPECT_GT(seen[1], 300);
}

TEST(SamplerTest, TemperatureMatchesSoftmaxFrequencies) {
  Sampler s({1.0f, 1.0f, 9});
  std::vector<int> counts(2);
  const int n = 20000;
  for (int i = 0; i < n; ++i) counts[static_cast<size_t>(s.Sample(std::vector<float>{0.0f, std::log(3.0f)}))]++;
  EXPECT_NEAR(counts[1] / static_cast<double>(n), 0.75, 0.02);
}

}  // namespace
}  // namespace fedtune::model

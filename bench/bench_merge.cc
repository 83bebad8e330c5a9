// Streaming merge throughput: N updates of P float parameters folded into one accumulator
// (FedAvg mean, and uncertainty-aware with a Fisher tensor per update), reported in GB/s of
// update bytes beside this machine's measured memory read bandwidth.
//   build/bench/bench_merge [updates=1000] [params=1000000]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "aggregation/fed_strategy.h"
#include "common/rng.h"

using namespace fedtune;
using Clock = std::chrono::steady_clock;

static double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Sum over a 512 MiB buffer, best of 3: what one core can stream from DRAM.
static double ReadBandwidthGBs() {
  std::vector<float> buf(static_cast<size_t>(128) << 20, 1.0f);
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < 3; ++r) {
    const auto t0 = Clock::now();
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < buf.size(); i += 4) {
      s0 += buf[i];
      s1 += buf[i + 1];
      s2 += buf[i + 2];
      s3 += buf[i + 3];
    }
    sink = s0 + s1 + s2 + s3;
    best = std::max(best, static_cast<double>(buf.size() * 4) / Since(t0) / 1e9);
  }
  (void)sink;
  return best;
}

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 1000;
  const size_t p = argc > 2 ? static_cast<size_t>(std::atol(argv[2])) : 1000000;
  Rng rng(1);
  aggregation::TensorMap global = {{"w", std::vector<float>(p, 0.0f)}};
  std::vector<float> delta(p), fisher(p);
  for (size_t i = 0; i < p; ++i) {
    delta[i] = static_cast<float>(rng.Normal() * 1e-3);
    fisher[i] = static_cast<float>(rng.Uniform() * 1e-4);
  }
  std::printf("memory read bandwidth (1 core, 512 MiB sum): %.1f GB/s\n", ReadBandwidthGBs());
  for (auto rule : {aggregation::MergeRule::kMean, aggregation::MergeRule::kUncertainty}) {
    aggregation::StrategyOptions o;
    o.merge = rule;
    auto s = aggregation::FedStrategy::Create(o);
    auto agg = (*s)->BeginAggregate(1, global);
    double secs = 0;
    for (int k = 0; k < n; ++k) {
      aggregation::ClientUpdate u;
      u.client = "c" + std::to_string(k);
      u.num_examples = 10 + k % 7;
      u.delta["w"] = delta;  // the copy stands for receiving the update: not timed
      if (rule == aggregation::MergeRule::kUncertainty) u.fisher["w"] = fisher;
      const auto t0 = Clock::now();
      if (auto st = agg->Add(std::move(u)); !st.ok()) return 1;
      secs += Since(t0);
    }
    const auto t0 = Clock::now();
    auto m = agg->Merge();
    secs += Since(t0);
    const double bytes = static_cast<double>(n) * static_cast<double>(p) * 4 * (rule == aggregation::MergeRule::kUncertainty ? 2 : 1);
    std::printf("%-12s %d updates x %zu params: %.2f s, %.2f GB/s of update data (validation + fold-in)\n", aggregation::MergeRuleName(rule), n, p,
                secs, bytes / secs / 1e9);
  }
  return 0;
}

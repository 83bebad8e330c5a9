#include "aggregation/fed_strategy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "aggregation/dp_strategy.h"
#include "privacy/ledger.h"

namespace fedtune::aggregation {
namespace {

std::unique_ptr<FedStrategy> Make(StrategyOptions o = {}) {
  auto s = FedStrategy::Create(o);
  EXPECT_TRUE(s.ok()) << s.status();
  return std::move(*s);
}

ClientUpdate Update(const std::string& c, int64_t n, TensorMap delta, TensorMap fisher = {}) {
  return ClientUpdate{c, n, std::move(delta), std::move(fisher), {}};
}

std::vector<float> RandomVec(Rng& rng, size_t n, double scale = 1.0) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(scale * rng.Normal());
  return v;
}

TEST(FedAvgTest, WeightsByExampleCount) {
  auto s = Make();
  const TensorMap global = {{"w", {1.0f, 1.0f}}};
  auto r = AggregateTrain(*s, 1, global, {Update("a", 1, {{"w", {1.0f, 0.0f}}}), Update("b", 3, {{"w", {-1.0f, 4.0f}}})});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(r->global);
  EXPECT_FLOAT_EQ(r->global->at("w")[0], 1.0f + (1.0f - 3.0f) / 4);
  EXPECT_FLOAT_EQ(r->global->at("w")[1], 1.0f + 12.0f / 4);
}

TEST(FedAvgTest, FfaLoraAggregationEqualsMeanOfDenseUpdates) {
  // FFA-LoRA: A frozen and shared, only B averaged. s * mean(B) A == mean(s B_k A) exactly.
  Rng rng(3);
  const int64_t out = 24, in = 20, r = 4;
  const double scale = 2.0;
  const std::vector<float> a = RandomVec(rng, r * in);
  const TensorMap global = {{"blk.0.attn_q.lora_b", std::vector<float>(out * r, 0.0f)}};
  std::vector<ClientUpdate> ups;
  std::vector<double> dense_mean(out * in, 0.0);
  const int64_t counts[] = {5, 1, 9, 3};
  for (int k = 0; k < 4; ++k) {
    std::vector<float> b = RandomVec(rng, out * r);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        double d = 0;
        for (int64_t j = 0; j < r; ++j) d += scale * b[o * r + j] * a[j * in + i];
        dense_mean[o * in + i] += d * counts[k] / 18.0;
      }
    ups.push_back(Update("c" + std::to_string(k), counts[k], {{"blk.0.attn_q.lora_b", b}}));
  }
  auto s = Make();
  auto res = AggregateTrain(*s, 1, global, std::move(ups));
  ASSERT_TRUE(res.ok());
  const std::vector<float>& bm = res->global->at("blk.0.attn_q.lora_b");
  double max_err = 0, max_val = 0;
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      double d = 0;
      for (int64_t j = 0; j < r; ++j) d += scale * bm[o * r + j] * a[j * in + i];
      max_err = std::max(max_err, std::fabs(d - dense_mean[o * in + i]));
      max_val = std::max(max_val, std::fabs(dense_mean[o * in + i]));
    }
  EXPECT_LT(max_err / max_val, 1e-6);
}

TEST(FedAvgTest, DiaBloAggregationEqualsMeanOfDenseUpdates) {
  // DiaBlo: the dense update is block-diagonal with the blocks as they are.
  Rng rng(4);
  const int64_t nb = 3, bi = 4, bo = 5;
  const TensorMap global = {{"blk.0.ffn_up.diablo", std::vector<float>(nb * bi * bo, 0.0f)}};
  auto dense = [&](const std::vector<float>& d) {
    std::vector<double> w(nb * bo * nb * bi, 0.0);
    for (int64_t n = 0; n < nb; ++n)
      for (int64_t i = 0; i < bi; ++i)
        for (int64_t o = 0; o < bo; ++o) w[(n * bo + o) * nb * bi + n * bi + i] = d[(n * bi + i) * bo + o];
    return w;
  };
  std::vector<ClientUpdate> ups;
  std::vector<double> mean(nb * bo * nb * bi, 0.0);
  for (int k = 0; k < 3; ++k) {
    std::vector<float> d = RandomVec(rng, nb * bi * bo);
    auto w = dense(d);
    for (size_t j = 0; j < w.size(); ++j) mean[j] += w[j] * (k + 1) / 6.0;
    ups.push_back(Update("c" + std::to_string(k), k + 1, {{"blk.0.ffn_up.diablo", d}}));
  }
  auto s = Make();
  auto res = AggregateTrain(*s, 1, global, std::move(ups));
  ASSERT_TRUE(res.ok());
  auto w = dense(res->global->at("blk.0.ffn_up.diablo"));
  for (size_t j = 0; j < w.size(); ++j) EXPECT_NEAR(w[j], mean[j], 1e-6 * (1 + std::fabs(mean[j])));
}

TEST(FedAvgTest, PartiallySharedTensorsAverageOverTheirContributors) {
  auto s = Make();
  const TensorMap global = {{"x", {0.0f}}, {"y", {10.0f}}};
  auto r = AggregateTrain(*s, 1, global,
                          {Update("a", 1, {{"x", {1.0f}}, {"y", {2.0f}}}), Update("b", 1, {{"x", {3.0f}}})});
  ASSERT_TRUE(r.ok());
  EXPECT_FLOAT_EQ(r->global->at("x")[0], 2.0f);
  EXPECT_FLOAT_EQ(r->global->at("y")[0], 12.0f);  // only a trained y
}

TEST(FedAvgTest, BadUpdatesAreRejectedAndDoNotPoisonTheAggregate) {
  auto s = Make();
  const TensorMap global = {{"w", {0.0f, 0.0f}}};
  std::vector<ClientFailure> failures;
  auto agg = s->BeginAggregate(1, global);
  EXPECT_EQ(agg->Add(Update("nan", 1, {{"w", {NAN, 1.0f}}})).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(agg->Add(Update("inf", 1, {{"w", {1.0f, INFINITY}}})).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(agg->Add(Update("shape", 1, {{"w", {1.0f}}})).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(agg->Add(Update("name", 1, {{"v", {1.0f, 1.0f}}})).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(agg->Add(Update("zero", 0, {{"w", {1.0f, 1.0f}}})).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(agg->Add(Update("fisher", 1, {{"w", {1.0f, 1.0f}}}, {{"w", {-1.0f, 1.0f}}})).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(agg->Add(Update("good", 2, {{"w", {1.0f, -1.0f}}})).ok());
  EXPECT_EQ(agg->Add(Update("good", 2, {{"w", {1.0f, -1.0f}}})).code(), absl::StatusCode::kAlreadyExists);
  auto m = agg->Merge();
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->accepted, 1);
  auto r = s->Commit(1, global, std::move(*m), failures);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->global->at("w"), (std::vector<float>{1.0f, -1.0f}));
}

TEST(FedAvgTest, TooFewUpdatesKeepTheGlobalAdapter) {
  StrategyOptions o;
  o.min_clients = 2;
  auto s = Make(o);
  auto r = AggregateTrain(*s, 1, {{"w", {0.0f}}}, {Update("a", 1, {{"w", {1.0f}}})}, {{"b", absl::DeadlineExceededError("late")}});
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->global.has_value());
  EXPECT_EQ(r->metrics.at("failures"), 1);
}

TEST(FedAdamTest, MatchesHandComputedSteps) {
  StrategyOptions o;
  o.server = ServerOptimizer::kFedAdam;
  o.server_lr = 0.1;
  o.beta1 = 0.9;
  o.beta2 = 0.99;
  o.tau = 1e-3;
  auto s = Make(o);
  TensorMap g = {{"w", {0.5f, -0.5f}}};
  // Step 1, delta (0.1, -0.2): m = 0.1 d, v = 0.99 tau^2 + 0.01 d^2, w += lr m / (sqrt(v) + tau).
  auto r1 = AggregateTrain(*s, 1, g, {Update("a", 1, {{"w", {0.1f, -0.2f}}})});
  ASSERT_TRUE(r1.ok());
  const double m1[] = {0.01, -0.02}, v1[] = {0.99e-6 + 1e-4, 0.99e-6 + 4e-4};
  const double w1[] = {0.5 + 0.1 * m1[0] / (std::sqrt(v1[0]) + 1e-3), -0.5 + 0.1 * m1[1] / (std::sqrt(v1[1]) + 1e-3)};
  EXPECT_NEAR(r1->global->at("w")[0], w1[0], 1e-6);  // 0.590503
  EXPECT_NEAR(r1->global->at("w")[1], w1[1], 1e-6);
  // Step 2, delta (0.3, 0): m = 0.9 m + 0.1 d, v = 0.99 v + 0.01 d^2.
  auto r2 = AggregateTrain(*s, 2, *r1->global, {Update("a", 1, {{"w", {0.3f, 0.0f}}})});
  ASSERT_TRUE(r2.ok());
  const double m2[] = {0.9 * m1[0] + 0.03, 0.9 * m1[1]}, v2[] = {0.99 * v1[0] + 0.01 * 0.09, 0.99 * v1[1]};
  EXPECT_NEAR(r2->global->at("w")[0], r1->global->at("w")[0] + 0.1 * m2[0] / (std::sqrt(v2[0]) + 1e-3), 1e-6);
  EXPECT_NEAR(r2->global->at("w")[1], r1->global->at("w")[1] + 0.1 * m2[1] / (std::sqrt(v2[1]) + 1e-3), 1e-6);
}

TEST(FedAvgMTest, AccumulatesMomentum) {
  StrategyOptions o;
  o.server = ServerOptimizer::kFedAvgM;
  o.momentum = 0.5;
  auto s = Make(o);
  auto r1 = AggregateTrain(*s, 1, {{"w", {0.0f}}}, {Update("a", 1, {{"w", {1.0f}}})});
  auto r2 = AggregateTrain(*s, 2, *r1->global, {Update("a", 1, {{"w", {1.0f}}})});
  EXPECT_FLOAT_EQ(r2->global->at("w")[0], 1.0f + 1.5f);
}

TEST(FedYogiTest, SecondMomentMovesBySignedStep) {
  StrategyOptions o;
  o.server = ServerOptimizer::kFedYogi;
  o.server_lr = 1.0;
  o.beta1 = 0.0;
  o.beta2 = 0.5;
  o.tau = 0.1;
  auto s = Make(o);
  // v0 = tau^2 = 0.01 < d^2 = 1: v = 0.01 + 0.5 * 1 = 0.51; w = d / (sqrt(0.51) + 0.1).
  auto r = AggregateTrain(*s, 1, {{"w", {0.0f}}}, {Update("a", 1, {{"w", {1.0f}}})});
  EXPECT_NEAR(r->global->at("w")[0], 1.0 / (std::sqrt(0.51) + 0.1), 1e-6);
}

TEST(UncertaintyMergeTest, PrecisionWeightsPerCoordinate) {
  StrategyOptions o;
  o.merge = MergeRule::kUncertainty;
  auto s = Make(o);
  // Coordinate 0: client a is confident (F=9), b not (F=1) -> (2*9*1 + 1*1*5)/(18 + 1).
  auto r = AggregateTrain(*s, 1, {{"w", {0.0f, 0.0f}}},
                          {Update("a", 2, {{"w", {1.0f, 1.0f}}}, {{"w", {9.0f, 1.0f}}}),
                           Update("b", 1, {{"w", {5.0f, 5.0f}}}, {{"w", {1.0f, 8.0f}}})});
  ASSERT_TRUE(r.ok());
  const double l = 1e-6;
  EXPECT_NEAR(r->global->at("w")[0], (2 * (9 + l) * 1 + (1 + l) * 5) / (2 * (9 + l) + (1 + l)), 1e-6);
  EXPECT_NEAR(r->global->at("w")[1], (2 * (1 + l) * 1 + (8 + l) * 5) / (2 * (1 + l) + (8 + l)), 1e-6);
  EXPECT_EQ(r->metrics.at("fisher_fallback_tensors"), 0);
}

TEST(UncertaintyMergeTest, FallsBackToWeightedMeanWithoutFisher) {
  StrategyOptions o;
  o.merge = MergeRule::kUncertainty;
  auto s = Make(o);
  auto r = AggregateTrain(*s, 1, {{"w", {0.0f}}}, {Update("a", 3, {{"w", {1.0f}}}, {{"w", {9.0f}}}), Update("b", 1, {{"w", {5.0f}}})});
  ASSERT_TRUE(r.ok());
  EXPECT_FLOAT_EQ(r->global->at("w")[0], 2.0f);
  EXPECT_EQ(r->metrics.at("fisher_fallback_tensors"), 1);
}

TEST(RobustMergeTest, MedianAndTrimmedMeanIgnoreAnOutlier) {
  std::vector<ClientUpdate> ups;
  for (int k = 0; k < 5; ++k) ups.push_back(Update("c" + std::to_string(k), 1, {{"w", {static_cast<float>(k)}}}));
  ups.push_back(Update("evil", 1, {{"w", {1e3f}}}));  // (beyond kMaxUpdateValue it would be refused outright)
  StrategyOptions o;
  o.merge = MergeRule::kMedian;
  auto r = AggregateTrain(*Make(o), 1, {{"w", {0.0f}}}, ups);
  EXPECT_FLOAT_EQ(r->global->at("w")[0], 2.5f);
  o.merge = MergeRule::kTrimmedMean;
  o.trim_fraction = 0.2;  // cuts one from each side of 6
  r = AggregateTrain(*Make(o), 1, {{"w", {0.0f}}}, ups);
  EXPECT_FLOAT_EQ(r->global->at("w")[0], 2.5f);
}

TEST(RobustMergeTest, MultiKrumDropsByzantineUpdates) {
  Rng rng(9);
  std::vector<ClientUpdate> ups;
  for (int k = 0; k < 8; ++k) ups.push_back(Update("c" + std::to_string(k), 1, {{"w", RandomVec(rng, 16, 0.1)}}));
  for (int k = 0; k < 2; ++k) ups.push_back(Update("evil" + std::to_string(k), 1, {{"w", std::vector<float>(16, 50.0f)}}));
  StrategyOptions o;
  o.merge = MergeRule::kKrum;
  o.krum_byzantine = 2;
  o.krum_select = 4;
  auto r = AggregateTrain(*Make(o), 1, {{"w", std::vector<float>(16, 0.0f)}}, ups);
  ASSERT_TRUE(r.ok()) << r.status();
  for (float x : r->global->at("w")) EXPECT_LT(std::fabs(x), 1.0f);
}

TEST(RobustMergeTest, NormBoundingClipsEachUpdate) {
  StrategyOptions o;
  o.norm_bound = 1.0;
  auto r = AggregateTrain(*Make(o), 1, {{"w", {0.0f, 0.0f}}}, {Update("a", 1, {{"w", {30.0f, 40.0f}}})});
  EXPECT_NEAR(r->global->at("w")[0], 0.6, 1e-6);
  EXPECT_NEAR(r->global->at("w")[1], 0.8, 1e-6);
}

TEST(SampleClientsTest, DrawsWithoutReplacementDeterministically) {
  std::vector<std::string> all;
  for (int i = 0; i < 50; ++i) all.push_back("w" + std::to_string(i));
  Rng a(5), b(5);
  auto x = SampleClients(all, 10, a), y = SampleClients(all, 10, b);
  EXPECT_EQ(x, y);
  EXPECT_EQ(std::set<std::string>(x.begin(), x.end()).size(), 10u);
  Rng c(5);
  EXPECT_EQ(SampleClients(all, 0, c).size(), 50u);
}

TEST(FedProxTest, ConfigureTrainHandsMuToClients) {
  StrategyOptions o;
  o.proximal_mu = 0.01;
  Rng rng(1);
  auto tasks = Make(o)->ConfigureTrain(1, {"a", "b"}, rng);
  ASSERT_EQ(tasks.size(), 2u);
  EXPECT_EQ(tasks[0].config.at("proximal_mu"), 0.01);
}

// The default norm bound: 5x the previous round's median update norm, so one peer's huge update
// moves the global adapter by at most that much; the median survives a restart (state).
TEST(FedStrategyTest, AutomaticNormBoundFollowsLastRoundsMedian) {
  StrategyOptions o;
  o.auto_norm_factor = 5;
  o.weight_by_examples = false;
  auto s = Make(o);
  EXPECT_EQ(s->norm_bound(), 0.0);  // no history: unbounded (the value cap still holds)
  TensorMap g = {{"w", {0.0f}}};
  auto r1 = AggregateTrain(*s, 1, g, {Update("a", 1, {{"w", {1.0f}}}), Update("b", 1, {{"w", {2.0f}}}), Update("c", 1, {{"w", {3.0f}}})});
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_FLOAT_EQ(r1->global->at("w")[0], 2.0f);
  EXPECT_DOUBLE_EQ(s->norm_bound(), 10.0);
  const StrategyState saved = s->SaveState();
  auto s2 = Make(o);
  ASSERT_TRUE(s2->LoadState(saved).ok());
  EXPECT_DOUBLE_EQ(s2->norm_bound(), 10.0);
  auto r2 = AggregateTrain(*s2, 2, g, {Update("a", 1, {{"w", {2.0f}}}), Update("evil", 1, {{"w", {1000.0f}}})});
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_FLOAT_EQ(r2->global->at("w")[0], (2.0f + 10.0f) / 2);  // the huge update clipped to 10
  EXPECT_DOUBLE_EQ(r2->metrics.at("norm_bound"), 10.0);
}

// ---- differential privacy ----

std::unique_ptr<DpStrategy> MakeDp(DpOptions d, StrategyOptions o = {}) {
  auto s = DpStrategy::Create(Make(o), d);
  EXPECT_TRUE(s.ok()) << s.status();
  return std::move(*s);
}

TEST(DpStrategyTest, ClipsWeighsEquallyAndUsesFixedDenominator) {
  DpOptions d;
  d.noise_multiplier = 0;
  d.clip_norm = 1.0;
  d.expected_clients = 4;
  auto s = MakeDp(d);
  // a is clipped to (0.6, 0.8); b is inside the ball; 2 of 4 expected clients arrived.
  auto r = AggregateTrain(*s, 1, {{"w", {0.0f, 0.0f}}}, {Update("a", 100, {{"w", {3.0f, 4.0f}}}), Update("b", 1, {{"w", {0.2f, 0.0f}}})});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NEAR(r->global->at("w")[0], (0.6 + 0.2) / 4, 1e-6);
  EXPECT_NEAR(r->global->at("w")[1], 0.8 / 4, 1e-6);
  // The raw fraction of unclipped updates depends on data: not published without adaptive
  // clipping (which publishes its noisy count instead).
  EXPECT_EQ(r->metrics.count("dp_unclipped_fraction"), 0u);
}

std::vector<std::string> ClientNames(int n) {
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) names.push_back("c" + std::to_string(i));
  return names;
}

// The sampling the accountant assumes is the sampling that runs: every available client is
// drawn independently with q = m / population from the CSPRNG (not from the engine's seeded Rng),
// so round sizes vary, each client's selection frequency is q within a binomial bound, and the
// ledger records q.
TEST(DpStrategyTest, PoissonSamplingFromTheCsprngMatchesTheAccountedRate) {
  DpOptions d;
  d.noise_multiplier = 1.0;
  d.expected_clients = 10;
  d.population = 100;
  StrategyOptions so;
  so.clients_per_round = 10;
  auto s = MakeDp(d, so);
  ASSERT_TRUE(s->private_selection());
  EXPECT_DOUBLE_EQ(s->accounted_rate(), 0.1);
  const std::vector<std::string> available = ClientNames(100);
  const int trials = 2000;
  std::map<std::string, int> times;
  std::set<size_t> sizes;
  double total = 0;
  std::set<std::vector<std::string>> distinct;
  for (int t = 0; t < trials; ++t) {
    Rng rng(42);  // the same engine Rng every time: the draw must not come from it
    std::vector<std::string> chosen;
    for (const ClientTask& ct : s->ConfigureTrain(1, available, rng)) chosen.push_back(ct.client);
    for (const auto& c : chosen) ++times[c];
    sizes.insert(chosen.size());
    total += static_cast<double>(chosen.size());
    if (t < 20) distinct.insert(chosen);
  }
  EXPECT_GT(distinct.size(), 15u);  // not a function of the seeded Rng
  EXPECT_GT(sizes.size(), 5u);      // round sizes vary (Binomial(100, 0.1))
  // Mean round size: 10 +- 5 standard deviations of the mean (sqrt(100 * 0.1 * 0.9 / 2000)).
  EXPECT_NEAR(total / trials, 10.0, 5 * std::sqrt(100 * 0.1 * 0.9 / trials));
  // Each client: Binomial(2000, 0.1) = 200 +- 13.4; 5 standard deviations, 100 clients.
  for (const auto& c : available) EXPECT_NEAR(times[c], 200.0, 5 * std::sqrt(trials * 0.1 * 0.9)) << c;
  auto r = AggregateTrain(*s, 1, {{"w", {0.0f}}}, {Update("c1", 1, {{"w", {0.1f}}})});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(s->ledger().releases().size(), 1u);
  EXPECT_DOUBLE_EQ(s->ledger().releases()[0].q, 0.1);
}

// Fixed-size selection from a seeded generator claims no amplification: accounted at q = 1.
TEST(DpStrategyTest, FixedSizeSelectionIsAccountedWithoutAmplification) {
  DpOptions d;
  d.noise_multiplier = 1.0;
  d.expected_clients = 10;
  d.population = 100;
  d.sampling = DpOptions::Sampling::kFixed;
  StrategyOptions so;
  so.clients_per_round = 10;
  auto s = MakeDp(d, so);
  EXPECT_FALSE(s->private_selection());
  const std::vector<std::string> available = ClientNames(100);
  Rng rng(1);
  EXPECT_EQ(s->ConfigureTrain(1, available, rng).size(), 10u);
  ASSERT_TRUE(AggregateTrain(*s, 1, {{"w", {0.0f}}}, {Update("c1", 1, {{"w", {0.1f}}})}).ok());
  EXPECT_DOUBLE_EQ(s->ledger().releases()[0].q, 1.0);
}

// Distributed noise (added by the clients) and nobody in the sum: nothing data-dependent is
// released, so nothing is accounted (an empty Poisson draw must not cost infinite epsilon).
TEST(DpStrategyTest, DistributedNoiseRoundWithoutClientsIsNotAccounted) {
  DpOptions d;
  d.noise_multiplier = 1.0;
  d.expected_clients = 10;
  d.population = 100;
  d.noise_added_by_clients = true;
  auto s = MakeDp(d);
  auto r = AggregateTrain(*s, 1, {{"w", {0.0f}}}, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(s->ledger().releases().empty());
  EXPECT_EQ(r->global->at("w")[0], 0.0f);
}

TEST(DpStrategyTest, NoiseHasTheCalibratedStandardDeviation) {
  DpOptions d;
  d.noise_multiplier = 1.3;
  d.clip_norm = 0.5;
  d.expected_clients = 10;
  auto s = MakeDp(d);
  const size_t n = 200000;
  auto r = AggregateTrain(*s, 1, {{"w", std::vector<float>(n, 0.0f)}}, {Update("a", 1, {{"w", std::vector<float>(n, 0.0f)}})});
  ASSERT_TRUE(r.ok());
  double s1 = 0, s2 = 0;
  for (float x : r->global->at("w")) {
    s1 += x;
    s2 += static_cast<double>(x) * x;
  }
  const double sd = 1.3 * 0.5 / 10, mean = s1 / n, var = s2 / n - mean * mean;
  EXPECT_LT(std::fabs(mean), 5 * sd / std::sqrt(n));
  EXPECT_LT(std::fabs(var - sd * sd), 5 * sd * sd * std::sqrt(2.0 / n));
  EXPECT_GT(r->metrics.at("epsilon"), 0);
}

// Uncertainty-aware merging with a privatised Fisher (DpOptions::private_fisher_clip): without
// noise, each tensor is the mean weighted by a = mean(min(F, clip)) / clip + lambda / clip.
TEST(DpStrategyTest, PrivateFisherWeighsEachTensorByItsClippedMeanFisher) {
  DpOptions d;
  d.noise_multiplier = 0;
  d.clip_norm = 10;
  d.expected_clients = 2;
  d.private_fisher_clip = 1e-4;
  d.fisher_lambda = 1e-6;
  StrategyOptions o;
  o.merge = MergeRule::kUncertainty;
  auto s = DpStrategy::Create(std::move(*FedStrategy::Create(o)), d);
  ASSERT_TRUE(s.ok()) << s.status();
  const double lam = 0.01;
  // a: Fisher at the bound on w (a_w = 1 + lam), half of it on x (0.5 + lam); b: none (lam).
  // Fisher above the bound is clipped (3e-4 counts as 1e-4).
  auto r = AggregateTrain(**s, 1, {{"w", {0.0f, 0.0f}}, {"x", {0.0f}}},
                          {Update("a", 5, {{"w", {0.3f, 0.4f}}, {"x", {1.0f}}}, {{"w", {1e-4f, 3e-4f}}, {"x", {0.5e-4f}}}),
                           Update("b", 1, {{"w", {-0.1f, 0.2f}}, {"x", {-1.0f}}}, {{"w", {0.0f, 0.0f}}, {"x", {0.0f}}})});
  ASSERT_TRUE(r.ok()) << r.status();
  const double aw = 1 + lam, ax = 0.5 + lam, b = lam;
  EXPECT_NEAR(r->global->at("w")[0], (aw * 0.3 + b * -0.1) / (aw + b), 1e-6);
  EXPECT_NEAR(r->global->at("w")[1], (aw * 0.4 + b * 0.2) / (aw + b), 1e-6);
  EXPECT_NEAR(r->global->at("x")[0], (ax * 1.0 + b * -1.0) / (ax + b), 1e-6);
  // An update without its Fisher is refused.
  auto bad = AggregateTrain(**s, 2, {{"w", {0.0f, 0.0f}}, {"x", {0.0f}}}, {Update("c", 1, {{"w", {0.1f, 0.1f}}})});
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(bad->metrics.at("accepted"), 0);
}

// With noise: the numerator carries N(0, (z sqrt(2) (1 + lambda') S)^2) per value (the pair of
// sums is one release at z, accounted as such); here the denominator is large, so the merged
// values' spread is that over the denominator.
TEST(DpStrategyTest, PrivateFisherNoiseIsCalibratedAndAccounted) {
  DpOptions d;
  d.noise_multiplier = 0.01;
  d.clip_norm = 0.5;
  d.expected_clients = 10;
  d.private_fisher_clip = 1e-4;
  StrategyOptions o;
  o.merge = MergeRule::kUncertainty;
  auto s = DpStrategy::Create(std::move(*FedStrategy::Create(o)), d);
  ASSERT_TRUE(s.ok()) << s.status();
  const size_t n = 200000;
  std::vector<ClientUpdate> ups;
  for (int k = 0; k < 10; ++k)
    ups.push_back(Update("c" + std::to_string(k), 1, {{"w", std::vector<float>(n, 0.0f)}}, {{"w", std::vector<float>(n, 1e-4f)}}));
  auto r = AggregateTrain(**s, 1, {{"w", std::vector<float>(n, 0.0f)}}, ups);
  ASSERT_TRUE(r.ok()) << r.status();
  double s2 = 0;
  for (float x : r->global->at("w")) s2 += static_cast<double>(x) * x;
  const double lam = 0.01, sd = 0.01 * std::sqrt(2.0) * (1 + lam) * 0.5 / (10 * (1 + lam));
  EXPECT_NEAR(std::sqrt(s2 / n) / sd, 1.0, 0.02);
  EXPECT_NEAR(r->metrics.at("dp_noise_stddev"), 0.01 * std::sqrt(2.0) * (1 + lam) * 0.5, 1e-12);
  privacy::PrivacyLedger want(0, 1e-5);
  ASSERT_TRUE(want.Record({"", 1.0, 0.01, 1}).ok());
  EXPECT_DOUBLE_EQ(r->metrics.at("epsilon"), want.Spent()->epsilon);
}

TEST(DpStrategyTest, RefusesRoundsPastTheBudget) {
  DpOptions d;
  d.noise_multiplier = 2.0;
  d.expected_clients = 5;
  d.population = 50;
  d.epsilon_budget = 2.0;
  auto s = MakeDp(d);
  TensorMap g = {{"w", {0.0f}}};
  int rounds = 0;
  for (;; ++rounds) {
    auto r = AggregateTrain(*s, rounds + 1, g, {Update("a", 1, {{"w", {0.1f}}})});
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
      break;
    }
    EXPECT_LE(r->metrics.at("epsilon"), 2.0);
    ASSERT_LT(rounds, 10000);
  }
  EXPECT_GT(rounds, 0);
  EXPECT_EQ(static_cast<int>(s->ledger().releases().size()), rounds);
}

TEST(DpStrategyTest, AdaptiveClippingTracksTheTargetQuantile) {
  DpOptions d;
  d.noise_multiplier = 0.5;
  d.clip_norm = 10.0;
  d.adaptive_clipping = true;
  d.expected_clients = 20;
  auto s = MakeDp(d);
  EXPECT_GT(s->update_noise_multiplier(), 0.5);
  Rng rng(2);
  TensorMap g = {{"w", {0.0f, 0.0f}}};
  for (int round = 1; round <= 60; ++round) {
    std::vector<ClientUpdate> ups;
    for (int k = 0; k < 20; ++k) ups.push_back(Update("c" + std::to_string(k), 1, {{"w", {static_cast<float>(0.5 + k * 0.05), 0.0f}}}));
    ASSERT_TRUE(AggregateTrain(*s, round, g, ups).ok());
  }
  // Norms are 0.5 .. 1.45 (median ~0.97): the clip norm must have come down from 10.
  EXPECT_GT(s->clip_norm(), 0.5);
  EXPECT_LT(s->clip_norm(), 1.6);
}

TEST(DpStrategyTest, RefusesNonLinearStrategies) {
  StrategyOptions o;
  o.merge = MergeRule::kMedian;
  DpOptions d;
  d.expected_clients = 3;
  EXPECT_EQ(DpStrategy::Create(Make(o), d).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedtune::aggregation

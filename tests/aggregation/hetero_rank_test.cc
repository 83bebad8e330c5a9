#include "aggregation/hetero_rank.h"

#include <gtest/gtest.h>

#include <cmath>

#include "aggregation/fed_strategy.h"
#include "protocol/task.h"
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

// Per-worker ranks in a round (HeteroRankAggregation): a global of rank R = 8 on one module
// (in 12, out 10), clients of ranks 2, 4 and 8 with example counts 1, 3, 2.
constexpr int64_t kR = 8, kIn = 12, kOut = 10;
constexpr double kScale = 2.0;
const std::vector<std::pair<int64_t, int64_t>> kClientRanks = {{2, 1}, {4, 3}, {8, 2}};  // rank, examples

std::vector<float> Normal(Rng& rng, size_t n, double sd) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(sd * rng.Normal());
  return v;
}

struct Round {
  TensorMap global;
  std::vector<ClientUpdate> updates;  // rank-r deltas, as clients send them
  std::map<std::string, int64_t> ranks;
};

Round MakeRound(uint64_t seed, bool with_a, const std::vector<std::pair<int64_t, int64_t>>& clients = kClientRanks) {
  Rng rng(seed);
  Round rd;
  if (with_a) rd.global["blk.0.attn_q.lora_a"] = Normal(rng, kR * kIn, 0.3);
  rd.global["blk.0.attn_q.lora_b"] = Normal(rng, kOut * kR, 0.1);
  for (size_t k = 0; k < clients.size(); ++k) {
    const auto [r, n] = clients[k];
    ClientUpdate u;
    u.client = "c" + std::to_string(k);
    u.num_examples = n;
    const absl::StatusOr<TensorMap> mine = TruncateRank(rd.global, kR, r);
    if (!mine.ok()) continue;  // (never: r <= R)
    for (const auto& [name, v] : *mine) u.delta[name] = Normal(rng, v.size(), 0.05);
    rd.ranks[u.client] = r;
    rd.updates.push_back(std::move(u));
  }
  return rd;
}

absl::StatusOr<Merged> MergeRound(const Round& rd, HeteroRankRule rule, double norm_bound = 0) {
  StrategyOptions so;
  so.auto_norm_factor = 0;
  FT_ASSIGN_OR_RETURN(auto strategy, FedStrategy::Create(so));
  HeteroRankOptions ho;
  ho.rule = rule;
  ho.rank = kR;
  ho.scale = kScale;
  ho.norm_bound = norm_bound;
  auto agg = MakeHeteroRankAggregation(ho, rd.ranks, rd.global, strategy->BeginAggregate(1, rd.global));
  for (const ClientUpdate& u : rd.updates) FT_RETURN_IF_ERROR(agg->Add(u));
  return agg->Merge();
}

// B value (o, j) of client k's padded delta (0 where it did not train).
double PaddedB(const Round& rd, size_t k, int64_t o, int64_t j) {
  const int64_t r = rd.ranks.at(rd.updates[k].client);
  return j < r ? rd.updates[k].delta.at("blk.0.attn_q.lora_b")[static_cast<size_t>(o * r + j)] : 0.0;
}

TEST(HeteroRankTest, TruncationAndPaddingKeepEachComponentInPlace) {
  Round rd = MakeRound(10, true);
  auto cut = TruncateRank(rd.global, kR, 3);
  ASSERT_TRUE(cut.ok());
  const auto& a = rd.global.at("blk.0.attn_q.lora_a");
  const auto& b = rd.global.at("blk.0.attn_q.lora_b");
  ASSERT_EQ(cut->at("blk.0.attn_q.lora_a").size(), static_cast<size_t>(3 * kIn));
  ASSERT_EQ(cut->at("blk.0.attn_q.lora_b").size(), static_cast<size_t>(kOut * 3));
  EXPECT_EQ(cut->at("blk.0.attn_q.lora_a")[2 * kIn + 5], a[2 * kIn + 5]);
  EXPECT_EQ(cut->at("blk.0.attn_q.lora_b")[7 * 3 + 2], b[7 * kR + 2]);
  ClientUpdate u;
  u.client = "x";
  u.num_examples = 1;
  u.delta = *cut;
  ASSERT_TRUE(ExpandRank(&u, rd.global, kR, 3, true).ok());
  for (int64_t o = 0; o < kOut; ++o)
    for (int64_t j = 0; j < kR; ++j) {
      const size_t at = static_cast<size_t>(o * kR + j);
      EXPECT_EQ(u.delta.at("blk.0.attn_q.lora_b")[at], j < 3 ? b[at] : 0.0f);
      EXPECT_EQ(u.coverage.at("blk.0.attn_q.lora_b")[at], j < 3 ? 1.0f : 0.0f);
    }
  // Sizes that are not a rank-3 truncation, and ranks outside [1, R], are refused.
  ClientUpdate bad;
  bad.client = "y";
  bad.num_examples = 1;
  auto cut4 = TruncateRank(rd.global, kR, 4);
  ASSERT_TRUE(cut4.ok());
  bad.delta = *cut4;
  EXPECT_EQ(ExpandRank(&bad, rd.global, kR, 3, false).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExpandRank(&bad, rd.global, kR, 9, false).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(TruncateRank(rd.global, kR, 0).ok());
  EXPECT_FLOAT_EQ(RankAlpha(16, 8, 2, false) / 2, 16.0f / 8);
  EXPECT_FLOAT_EQ(RankAlpha(16, 8, 2, true) / std::sqrt(2.0f), 16.0f / std::sqrt(8.0f));
}

// FFA-LoRA: the update is B only, A is the shared frozen one. Nested merging gives, on every
// component, the example-weighted mean of the dense updates of the clients that trained it.
TEST(HeteroRankTest, NestedIsExactForFfaLoraPerComponent) {
  Round rd = MakeRound(11, false);
  Rng rng(99);
  const std::vector<float> a = Normal(rng, kR * kIn, 0.3);  // the frozen A (rank-r clients use its first r rows)
  auto m = MergeRound(rd, HeteroRankRule::kNested);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<float>& db = m->delta.at("blk.0.attn_q.lora_b");
  double err = 0, scale = 0;
  for (int64_t o = 0; o < kOut; ++o)
    for (int64_t i = 0; i < kIn; ++i) {
      double got = 0, want = 0;
      for (int64_t j = 0; j < kR; ++j) {
        got += kScale * db[static_cast<size_t>(o * kR + j)] * a[static_cast<size_t>(j * kIn + i)];
        double num = 0, den = 0;  // component j of the clients' dense updates, over those who trained it
        for (size_t k = 0; k < rd.updates.size(); ++k) {
          if (j >= rd.ranks.at(rd.updates[k].client)) continue;
          const double n = static_cast<double>(rd.updates[k].num_examples);
          num += n * kScale * PaddedB(rd, k, o, j) * a[static_cast<size_t>(j * kIn + i)];
          den += n;
        }
        want += num / den;
      }
      err = std::max(err, std::fabs(got - want));
      scale = std::max(scale, std::fabs(want));
    }
  EXPECT_LT(err / scale, 1e-6);
  EXPECT_EQ(m->accepted, 3);
}

TEST(HeteroRankTest, ZeroPaddingAveragesThePaddedUpdatesOverEveryClient) {
  Round rd = MakeRound(12, true);
  auto m = MergeRound(rd, HeteroRankRule::kZeroPad);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<float>& db = m->delta.at("blk.0.attn_q.lora_b");
  for (int64_t o = 0; o < kOut; ++o)
    for (int64_t j = 0; j < kR; ++j) {
      double want = 0;
      for (size_t k = 0; k < rd.updates.size(); ++k) want += rd.updates[k].num_examples * PaddedB(rd, k, o, j) / 6.0;
      EXPECT_NEAR(db[static_cast<size_t>(o * kR + j)], want, 1e-6);
    }
}

// LoRA factors of every client after training (its components of the global plus its delta).
std::vector<LoraFactors> ClientFactors(const Round& rd) {
  std::vector<LoraFactors> cs;
  for (const ClientUpdate& u : rd.updates) {
    const int64_t r = rd.ranks.at(u.client);
    const absl::StatusOr<TensorMap> cut = TruncateRank(rd.global, kR, r);
    const TensorMap mine = cut.ok() ? *cut : TensorMap{};
    LoraFactors f{r, kIn, kOut, mine.at("blk.0.attn_q.lora_a"), mine.at("blk.0.attn_q.lora_b"), kScale, static_cast<double>(u.num_examples)};
    for (size_t i = 0; i < f.a.size(); ++i) f.a[i] += u.delta.at("blk.0.attn_q.lora_a")[i];
    for (size_t i = 0; i < f.b.size(); ++i) f.b[i] += u.delta.at("blk.0.attn_q.lora_b")[i];
    cs.push_back(std::move(f));
  }
  return cs;
}

std::vector<float> MergedDense(const Round& rd, const Merged& m) {
  LoraFactors g{kR, kIn, kOut, rd.global.at("blk.0.attn_q.lora_a"), rd.global.at("blk.0.attn_q.lora_b"), kScale, 1};
  for (size_t i = 0; i < g.a.size(); ++i) g.a[i] += m.delta.at("blk.0.attn_q.lora_a")[i];
  for (size_t i = 0; i < g.b.size(); ++i) g.b[i] += m.delta.at("blk.0.attn_q.lora_b")[i];
  return DenseDelta(g);
}

// FlexLoRA: the new global is the best rank-R approximation of the exact weighted sum of the
// clients' products (the library's dense SVD as the reference), exact while their ranks fit in R.
TEST(HeteroRankTest, FlexLoraMergeIsTheBestRankRApproximationOfTheExactSum) {
  Round rd = MakeRound(13, true);  // ranks 2 + 4 + 8 = 14 > R
  auto m = MergeRound(rd, HeteroRankRule::kFlexLora);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<LoraFactors> cs = ClientFactors(rd);
  auto best = FlexLoraRedistribute(cs, {kR}, {kScale});
  ASSERT_TRUE(best.ok());
  std::vector<double> ref;
  for (float x : DenseDelta((*best)[0])) ref.push_back(x);
  EXPECT_LT(MaxRelErr(MergedDense(rd, *m), ref), 1e-5);
  EXPECT_GT(m->metrics.at("hetero_truncation"), 1e-3);

  Round fits = MakeRound(14, true, {{2, 1}, {4, 3}});  // 2 + 4 <= R: exact
  auto mf = MergeRound(fits, HeteroRankRule::kFlexLora);
  ASSERT_TRUE(mf.ok()) << mf.status();
  EXPECT_LT(MaxRelErr(MergedDense(fits, *mf), WeightedDense(ClientFactors(fits))), 1e-5);
  EXPECT_LT(mf->metrics.at("hetero_truncation"), 1e-6);
  // Each update is clipped to the strategy's norm bound first: a bound above every update's norm
  // changes nothing, a small one gives the merge of the clipped updates.
  auto same = MergeRound(rd, HeteroRankRule::kFlexLora, 1e6);
  ASSERT_TRUE(same.ok());
  EXPECT_LT(MaxRelErr(MergedDense(rd, *same), ref), 1e-5);
  Round clipped = rd;
  for (ClientUpdate& u : clipped.updates) ClipToNorm(u.delta, 0.01);
  auto want = MergeRound(clipped, HeteroRankRule::kFlexLora);
  auto got = MergeRound(rd, HeteroRankRule::kFlexLora, 0.01);
  ASSERT_TRUE(want.ok() && got.ok());
  std::vector<double> wd;
  for (float x : MergedDense(rd, *want)) wd.push_back(x);
  EXPECT_LT(MaxRelErr(MergedDense(rd, *got), wd), 1e-5);
  // FlexLoRA merges LoRA pairs: a B without its A is refused.
  Round ffa = MakeRound(15, false);
  EXPECT_FALSE(MergeRound(ffa, HeteroRankRule::kFlexLora).ok());
}

}  // namespace
}  // namespace fedtune::aggregation

namespace fedtune::aggregation {
namespace {

// DiaBlo block subsets (issue 22): a global of N = 4 blocks of 3 x 2 on one module, clients
// training its first 1, 2 and 4 blocks (example counts 1, 3, 2). Nested merging moves every
// block by the example-weighted mean of the updates of the clients that trained it (FedAvg over
// those clients, exact for DiaBlo: a block is a linear piece of the weight update); zero_pad by
// the mean over every client.
TEST(HeteroRankTest, DiabloBlocksMergeOverTheClientsThatTrainedThem) {
  constexpr int64_t kN = 4, kBlock = 3 * 2;
  struct Client {
    int64_t blocks, examples, first;  // a window of blocks first .. first + blocks - 1 (protocol::FirstBlock)
  };
  const std::vector<Client> clients = {{1, 1, 2}, {2, 3, 1}, {4, 2, 0}, {1, 2, 0}};
  Rng rng(21);
  TensorMap global;
  global["blk.0.attn_q.diablo"] = Normal(rng, kN * kBlock, 0.1);
  std::vector<ClientUpdate> updates;
  std::map<std::string, int64_t> blocks, firsts;
  for (size_t k = 0; k < clients.size(); ++k) {
    auto cut = TruncateRank(global, kN, clients[k].blocks, clients[k].first);
    ASSERT_TRUE(cut.ok()) << cut.status();
    const std::vector<float>& mine = cut->at("blk.0.attn_q.diablo");
    ASSERT_EQ(mine.size(), static_cast<size_t>(clients[k].blocks * kBlock));
    for (size_t i = 0; i < mine.size(); ++i)  // the window's blocks
      ASSERT_EQ(mine[i], global.at("blk.0.attn_q.diablo")[static_cast<size_t>(clients[k].first * kBlock) + i]);
    ClientUpdate u;
    u.client = "c" + std::to_string(k);
    u.num_examples = clients[k].examples;
    u.delta["blk.0.attn_q.diablo"] = Normal(rng, mine.size(), 0.05);
    blocks[u.client] = clients[k].blocks;
    if (clients[k].first > 0) firsts[u.client] = clients[k].first;
    updates.push_back(std::move(u));
  }
  for (HeteroRankRule rule : {HeteroRankRule::kNested, HeteroRankRule::kZeroPad}) {
    StrategyOptions so;
    so.auto_norm_factor = 0;
    auto strategy = FedStrategy::Create(so);
    ASSERT_TRUE(strategy.ok());
    HeteroRankOptions ho;
    ho.rule = rule;
    ho.rank = kN;
    auto agg = MakeHeteroRankAggregation(ho, blocks, global, (*strategy)->BeginAggregate(1, global), firsts);
    for (const ClientUpdate& u : updates) ASSERT_TRUE(agg->Add(u).ok());
    auto m = agg->Merge();
    ASSERT_TRUE(m.ok()) << m.status();
    const std::vector<float>& got = m->delta.at("blk.0.attn_q.diablo");
    ASSERT_EQ(got.size(), static_cast<size_t>(kN * kBlock));
    for (int64_t i = 0; i < kN * kBlock; ++i) {
      const int64_t block = i / kBlock;
      double num = 0, den = 0;
      for (size_t k = 0; k < updates.size(); ++k) {
        const bool trained = block >= clients[k].first && block < clients[k].first + clients[k].blocks;
        if (trained)
          num += static_cast<double>(updates[k].num_examples) * updates[k].delta.at("blk.0.attn_q.diablo")[static_cast<size_t>(i - clients[k].first * kBlock)];
        if (trained || rule == HeteroRankRule::kZeroPad) den += static_cast<double>(updates[k].num_examples);
      }
      EXPECT_NEAR(got[static_cast<size_t>(i)], num / den, 1e-6) << HeteroRankRuleName(rule) << " value " << i;
    }
  }
  // An update of the wrong number of blocks is refused.
  ClientUpdate bad = updates[1];
  blocks[bad.client] = 1;
  StrategyOptions so;
  auto strategy = FedStrategy::Create(so);
  ASSERT_TRUE(strategy.ok());
  HeteroRankOptions ho;
  ho.rank = kN;
  auto agg = MakeHeteroRankAggregation(ho, blocks, global, (*strategy)->BeginAggregate(1, global));
  EXPECT_EQ(agg->Add(bad).code(), absl::StatusCode::kInvalidArgument);
  // A window past the last block is refused.
  EXPECT_EQ(TruncateRank(global, kN, 2, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TruncateRank(global, kN, 1, -1).status().code(), absl::StatusCode::kInvalidArgument);
}

// The rolling DiaBlo windows: k consecutive blocks inside [0, n), and every block covered within
// ceil(n / k) consecutive rounds, from any round on.
TEST(HeteroRankTest, DiabloWindowsRollOverEveryBlock) {
  for (int64_t n = 1; n <= 16; ++n)
    for (int64_t k = 1; k <= n; ++k)
      for (int start = 1; start <= 5; ++start) {
        std::vector<bool> seen(static_cast<size_t>(n), false);
        const int64_t rounds = (n + k - 1) / k;
        for (int r = start; r < start + rounds; ++r) {
          const int64_t f = protocol::FirstBlock(n, k, r);
          ASSERT_GE(f, 0);
          ASSERT_LE(f + k, n) << n << " " << k << " " << r;
          for (int64_t b = f; b < f + k; ++b) seen[static_cast<size_t>(b)] = true;
        }
        for (int64_t b = 0; b < n; ++b) ASSERT_TRUE(seen[static_cast<size_t>(b)]) << "n " << n << " k " << k << " from round " << start << ": block " << b;
      }
  EXPECT_EQ(protocol::FirstBlock(8, 3, 1), 0);
  EXPECT_EQ(protocol::FirstBlock(8, 3, 2), 3);
  EXPECT_EQ(protocol::FirstBlock(8, 3, 3), 5);  // the last window ends at block 7
  EXPECT_EQ(protocol::FirstBlock(8, 3, 4), 0);
  protocol::AdapterPlan lora;
  lora.kind = "lora";
  lora.rank = 8;
  lora.train_rank = 2;
  EXPECT_EQ(protocol::FirstBlock(lora, 2), 0);  // LoRA ranks are always the first components
}

}  // namespace
}  // namespace fedtune::aggregation

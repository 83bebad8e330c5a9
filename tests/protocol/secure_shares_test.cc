// Secure aggregation with per-worker shares (protocol/task.h): which values a share trains (the
// same as the plain path's ExpandRank coverage), the threshold every unmasked value must meet, and
// the share list bound into what each worker signs.
#include <gtest/gtest.h>

#include "aggregation/hetero_rank.h"
#include "protocol/secagg_identity.h"
#include "protocol/task.h"

namespace fedtune::protocol {
namespace {

// R = 4: q's LoRA pair (in 3, out 2), v's A, and a DiaBlo tensor of 4 blocks of 2 x 2.
aggregation::TensorMap Layout() {
  return {{"blk.0.attn_q.lora_a", std::vector<float>(12, 0.0f)},
          {"blk.0.attn_q.lora_b", std::vector<float>(8, 0.0f)},
          {"blk.0.attn_v.lora_a", std::vector<float>(12, 0.0f)},
          {"blk.1.ffn_up.diablo", std::vector<float>(16, 0.0f)}};
}

TEST(SecureSharesTest, CoverageIsWhatTheShareTrains) {
  auto cov = ShareCoverage({2, 0, {"q"}}, Layout(), 4);
  ASSERT_TRUE(cov.ok()) << cov.status();
  for (size_t i = 0; i < 12; ++i) EXPECT_EQ(cov->at("blk.0.attn_q.lora_a")[i], i < 6 ? 1.0f : 0.0f) << i;  // rows 0, 1
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(cov->at("blk.0.attn_q.lora_b")[i], i % 4 < 2 ? 1.0f : 0.0f) << i;  // columns 0, 1
  for (float c : cov->at("blk.0.attn_v.lora_a")) EXPECT_EQ(c, 0.0f);  // not its module
  for (float c : cov->at("blk.1.ffn_up.diablo")) EXPECT_EQ(c, 0.0f);
  auto blocks = ShareCoverage({2, 2, {}}, Layout(), 4);
  ASSERT_TRUE(blocks.ok());
  for (size_t i = 0; i < 16; ++i) EXPECT_EQ(blocks->at("blk.1.ffn_up.diablo")[i], i >= 8 ? 1.0f : 0.0f) << i;  // blocks 2, 3
  auto whole = ShareCoverage({}, Layout(), 4);
  ASSERT_TRUE(whole.ok());
  for (const auto& [name, c] : *whole)
    for (float x : c) EXPECT_EQ(x, 1.0f) << name;
  EXPECT_FALSE(ShareCoverage({}, {{"not.an.adapter", {0.0f}}}, 4).ok());
}

// The plain path's coverage (aggregation::ExpandRank of a truncated update) marks the same values.
TEST(SecureSharesTest, CoverageAgreesWithThePlainPathsPadding) {
  const aggregation::TensorMap g = Layout();
  for (const auto& [r, first] : std::vector<std::pair<int, int>>{{1, 0}, {2, 0}, {3, 0}, {2, 2}, {1, 3}}) {
    auto t = aggregation::TruncateRank(g, 4, r, first);
    ASSERT_TRUE(t.ok()) << t.status();
    aggregation::ClientUpdate u;
    u.client = "w";
    u.delta = *t;
    ASSERT_TRUE(aggregation::ExpandRank(&u, g, 4, r, /*coverage=*/true, first).ok());
    auto cov = ShareCoverage({r, first, {}}, g, 4);
    ASSERT_TRUE(cov.ok());
    for (const auto& [name, c] : u.coverage) {
      // (LoRA ranks start at 0; a DiaBlo window anywhere.)
      if (name.ends_with("diablo") || first == 0) {
        EXPECT_EQ(c, cov->at(name)) << name << " r " << r << " first " << first;
      }
    }
  }
}

// Narrowing (the round engine's remedy when planned shares miss the threshold): pieces below it
// leave the shares that cover them, ranks from the top and modules whole, until every trained
// piece meets it.
TEST(SecureSharesTest, NarrowingLeavesEveryTrainedPieceAtTheThreshold) {
  const aggregation::TensorMap g = Layout();  // 12 pieces: q, v and up, components 0-3 each
  const std::vector<std::string> all = {"q", "v", "up"};
  std::vector<bool> idle;
  // Two whole shares and two of rank 2, threshold 3: components 2 and 3 have two trainers, so
  // the whole shares drop to rank 2 (nested ranks: the top components go).
  std::vector<SecureShare> ranks = {{}, {}, {2, 0, {}}, {2, 0, {}}};
  ASSERT_FALSE(CheckShareCounts(ranks, {0, 1, 2, 3}, g, 4, 3).ok());
  auto pairs = NarrowShares(&ranks, &idle, all, g, 4, 3);
  ASSERT_TRUE(pairs.ok()) << pairs.status();
  for (const SecureShare& sh : ranks) EXPECT_EQ(sh, (SecureShare{2, 0, {}}));
  EXPECT_EQ(idle, std::vector<bool>(4, false));
  EXPECT_TRUE(CheckShareCounts(ranks, {0, 1, 2, 3}, g, 4, 3).ok());
  EXPECT_EQ(*pairs, 4 * 6);  // components 0 and 1 of three modules each
  EXPECT_EQ(*CoveredPieces(ranks, g, 4), 24);
  EXPECT_EQ(*CoveredPieces({{}, {}, {2, 0, {}}}, g, 4), 12 + 12 + 6);
  // Nothing to narrow: unchanged.
  std::vector<SecureShare> fine = {{}, {}, {2, 0, {}}, {2, 0, {}}};
  ASSERT_TRUE(NarrowShares(&fine, &idle, all, g, 4, 2).ok());
  EXPECT_EQ(fine, (std::vector<SecureShare>{{}, {}, {2, 0, {}}, {2, 0, {}}}));
  // Modules, threshold 2: v and up have one trainer (the whole share), which keeps q only.
  std::vector<SecureShare> modules = {{0, 0, {"q"}}, {0, 0, {"q"}}, {}};
  ASSERT_TRUE(NarrowShares(&modules, &idle, all, g, 4, 2).ok());
  EXPECT_EQ(modules[2].modules, std::vector<std::string>{"q"});
  EXPECT_EQ(idle, std::vector<bool>(3, false));
  EXPECT_TRUE(CheckShareCounts(modules, {0, 1, 2}, g, 4, 2).ok());
  // Threshold 3: nobody's module has three trainers: everyone is left with nothing.
  std::vector<SecureShare> sparse = {{0, 0, {"q"}}, {0, 0, {"v"}}, {0, 0, {"v"}}};
  auto none = NarrowShares(&sparse, &idle, all, g, 4, 3);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, 0);
  EXPECT_EQ(idle, std::vector<bool>(3, true));
  // One rank-1 share of q beside two whole ones, threshold 3: q's components 1-3 have two
  // trainers (the whole shares drop to rank 1), then v's and up's component 0 two as well
  // (component 0 goes with its module): all three train component 0 of q.
  std::vector<SecureShare> low = {{1, 0, {"q"}}, {}, {}};
  ASSERT_TRUE(NarrowShares(&low, &idle, all, g, 4, 3).ok());
  EXPECT_EQ(low, (std::vector<SecureShare>{{1, 0, {"q"}}, {1, 0, {"q"}}, {1, 0, {"q"}}}));
  EXPECT_TRUE(CheckShareCounts(low, {0, 1, 2}, g, 4, 3).ok());
  // A cascade, threshold 2: up's components 2 and 3 (the whole share alone) take the whole
  // share to rank 2, which leaves q's components 2 and 3 to the q-only share alone: a second
  // pass takes it to rank 2 as well.
  std::vector<SecureShare> cascade = {{}, {2, 0, {}}, {0, 0, {"q"}}};
  ASSERT_FALSE(CheckShareCounts(cascade, {0, 1, 2}, g, 4, 2).ok());
  ASSERT_TRUE(NarrowShares(&cascade, &idle, all, g, 4, 2).ok());
  EXPECT_EQ(cascade, (std::vector<SecureShare>{{2, 0, {}}, {2, 0, {}}, {2, 0, {"q"}}}));
  EXPECT_TRUE(CheckShareCounts(cascade, {0, 1, 2}, g, 4, 2).ok());
  // DiaBlo windows roll with the round: not narrowed.
  std::vector<SecureShare> window = {{2, 2, {}}, {}};
  EXPECT_EQ(NarrowShares(&window, &idle, all, g, 4, 2).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SecureSharesTest, EveryUnmaskedValueNeedsTheThresholdOfItsTrainers) {
  const aggregation::TensorMap g = Layout();
  const std::vector<SecureShare> shares = {{}, {}, {2, 0, {}}, {2, 0, {}}};
  EXPECT_TRUE(CheckShareCounts({}, {0, 1}, g, 4, 3).ok());  // no shares: the whole adapter each
  EXPECT_TRUE(CheckShareCounts(shares, {0, 1, 2, 3}, g, 4, 2).ok());
  const absl::Status st = CheckShareCounts(shares, {0, 1, 2, 3}, g, 4, 3);  // components 2, 3: two trainers
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("component 2"), std::string::npos) << st;
  // A survivor listed three times counts once (components 2, 3: one trainer, not three).
  EXPECT_FALSE(CheckShareCounts(shares, {0, 0, 0, 2, 3}, g, 4, 3).ok());
  EXPECT_TRUE(CheckShareCounts(shares, {0, 1, 2, 2, 2}, g, 4, 2).ok());
  // Shares outside the adapter are refused, not counted.
  EXPECT_EQ(CheckShareCounts({{3, 2, {}}, {}}, {0, 1}, g, 4, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckShareCounts({{-1, 0, {}}, {}}, {0, 1}, g, 4, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ShareCoverage({2, 2147483647, {}}, g, 4).ok());
  // Module shares: v and up trained by one worker only.
  const std::vector<SecureShare> modules = {{0, 0, {"q"}}, {0, 0, {"q"}}, {}};
  EXPECT_TRUE(CheckShareCounts(modules, {0, 1, 2}, g, 4, 1).ok());
  const absl::Status mv = CheckShareCounts(modules, {0, 1, 2}, g, 4, 2);
  EXPECT_NE(mv.message().find("trained by 1 survivor"), std::string::npos) << mv;  // v or up
  EXPECT_FALSE(CheckShareCounts(shares, {0, 7}, g, 4, 1).ok());  // no share for id 7
}

TEST(SecureSharesTest, SharesTravelWithTheTask) {
  TrainTask t;
  t.plan.kind = "diablo";
  t.plan.blocks = 4;
  t.plan.train_rank = 2;
  t.round = 2;
  t.plan.train_modules = {"v", "q"};
  const SecureShare s = ShareOf(t.plan, t.round);
  EXPECT_EQ(s.rank, 2);
  EXPECT_EQ(s.first, 2);  // round 2's window
  EXPECT_EQ(s.modules, (std::vector<std::string>{"q", "v"}));
  t.secagg.shares = {s, {}};
  const TrainTask back = FromProto(ToProto(t), "w");
  EXPECT_EQ(back.secagg.shares, t.secagg.shares);
  EXPECT_EQ(back.plan.block_offset, 0);
  // A planned task lists all the adapter's modules when it trains all of them: the whole adapter.
  AdapterPlan planned;
  planned.kind = "lora";
  planned.rank = 4;
  planned.modules = {"q", "v"};
  planned.train_modules = {"v", "q"};
  EXPECT_TRUE(IsWhole(ShareOf(planned, 1)));
  planned.train_modules = {"v"};
  EXPECT_EQ(ShareOf(planned, 1).modules, (std::vector<std::string>{"v"}));
  planned.train_modules = {"q", "v"};
  planned.train_rank = 2;
  EXPECT_EQ(ShareOf(planned, 1), (SecureShare{2, 0, {}}));
  planned.block_offset = 3;  // (LoRA ranks are always the first components)
  EXPECT_EQ(ShareOf(planned, 1).first, 0);
  // What each worker signs names the list: another list, another attempt string.
  rpc::v1::Task a = ToProto(t), b = a, none = a;
  b.mutable_secagg_shares(0)->set_first(0);
  none.clear_secagg_shares();
  EXPECT_NE(SecAggAttempt(a), SecAggAttempt(b));
  EXPECT_NE(SecAggAttempt(a), SecAggAttempt(none));
  EXPECT_EQ(SecAggAttempt(a), SecAggAttempt(ToProto(back)));
  rpc::v1::Task lower = a;  // another threshold for one worker: another attempt string
  lower.set_secagg_threshold(a.secagg_threshold() + 1);
  EXPECT_NE(SecAggAttempt(a), SecAggAttempt(lower));
}

}  // namespace
}  // namespace fedtune::protocol

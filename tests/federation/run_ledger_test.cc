#include "federation/run_ledger.h"

#include <gtest/gtest.h>

#include <cstdio>

#include "tests/support/tiny_model.h"

namespace fedtune::federation {
namespace {

TEST(RunLedgerTest, RoundsCommitOnceAndSurviveReopening) {
  const std::string path = testing::TempPath("ledger.sqlite");
  std::remove(path.c_str());
  {
    auto l = RunLedger::Open(path);
    ASSERT_TRUE(l.ok()) << l.status();
    EXPECT_EQ(*(*l)->LastRound(), 0);
    ASSERT_TRUE((*l)->SetRunInfo("strategy", "fedavg+mean").ok());
    ASSERT_TRUE((*l)->CommitRound(1, {{"accuracy", 0.25}}, {{"w1", "ok", 10, 1.5, 2.0, 1000}, {"w2", "dropped", 0, 0, 0, 0}}).ok());
    ASSERT_TRUE((*l)->CommitRound(2, {{"accuracy", 0.5}}, {}).ok());
    // A round is never counted twice; the failed commit leaves nothing behind.
    EXPECT_FALSE((*l)->CommitRound(2, {{"accuracy", 0.9}}, {}).ok());
  }
  auto l = RunLedger::Open(path);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(*(*l)->LastRound(), 2);
  EXPECT_EQ(*(*l)->Metric(2, "accuracy"), 0.5);
  EXPECT_EQ((*l)->Metric(3, "accuracy").status().code(), absl::StatusCode::kNotFound);
}

TEST(RunLedgerTest, UnwritablePathIsAClearError) {
  auto l = RunLedger::Open("/nonexistent-dir/x/ledger.sqlite");
  EXPECT_FALSE(l.ok());
}

}  // namespace
}  // namespace fedtune::federation

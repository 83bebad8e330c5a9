#include "protocol/update_codec.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "common/rng.h"

namespace fedtune::protocol {
namespace {

aggregation::TensorMap Global() { return {{"blk.0.attn_q.lora_b", std::vector<float>(96, 0.0f)}, {"blk.1.ffn_up.diablo", std::vector<float>(40, 0.0f)}}; }

aggregation::ClientUpdate Good() {
  aggregation::ClientUpdate u;
  u.client = "worker-007";
  u.num_examples = 42;
  Rng rng(1);
  for (const auto& [name, v] : Global()) {
    auto& d = u.delta[name];
    for (size_t i = 0; i < v.size(); ++i) d.push_back(static_cast<float>(rng.Normal()));
    u.fisher[name].assign(v.size(), 0.5f);
  }
  u.metrics["train_loss"] = 1.25;
  return u;
}

TEST(UpdateCodecTest, RoundTripsExactly) {
  auto bytes = EncodeUpdate(Good());
  ASSERT_TRUE(bytes.ok());
  auto u = DecodeUpdate(*bytes, Global(), 1 << 20, "worker-007");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->delta, Good().delta);
  EXPECT_EQ(u->fisher, Good().fisher);
  EXPECT_EQ(u->num_examples, 42);
  EXPECT_EQ(u->metrics.at("train_loss"), 1.25);
}

TEST(UpdateCodecTest, HostileInputGetsPreciseStatuses) {
  const auto global = Global();
  auto bytes = *EncodeUpdate(Good());
  // Oversized.
  EXPECT_EQ(DecodeUpdate(bytes, global, 100).status().code(), absl::StatusCode::kResourceExhausted);
  // Truncated and garbage.
  EXPECT_EQ(DecodeUpdate(std::span(bytes).first(bytes.size() / 2), global, 1 << 20).status().code(), absl::StatusCode::kDataLoss);
  std::vector<uint8_t> garbage(1000, 0xab);
  EXPECT_EQ(DecodeUpdate(garbage, global, 1 << 20).status().code(), absl::StatusCode::kDataLoss);
  // A header far larger than any update of this adapter needs (the DOM parse is what it would cost).
  {
    std::vector<uint8_t> big(8 + 200000, ' ');
    const uint64_t n = 200000;
    for (int i = 0; i < 8; ++i) big[static_cast<size_t>(i)] = static_cast<uint8_t>(n >> (8 * i));
    big[8] = '{';
    big.back() = '}';
    EXPECT_EQ(DecodeUpdate(big, global, 1 << 20).status().code(), absl::StatusCode::kResourceExhausted);
  }
  // Impersonation.
  EXPECT_EQ(DecodeUpdate(bytes, global, 1 << 20, "worker-001").status().code(), absl::StatusCode::kPermissionDenied);
  // Wrong shape, unknown tensor, NaN, Inf, negative Fisher, bad example count.
  auto with = [&](auto mutate) {
    auto u = Good();
    mutate(u);
    return DecodeUpdate(*EncodeUpdate(u), global, 1 << 20).status();
  };
  EXPECT_EQ(with([](auto& u) { u.delta["blk.0.attn_q.lora_b"].pop_back(); }).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(with([](auto& u) { u.delta["blk.9.attn_k.lora_b"] = {1.0f}; }).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(with([](auto& u) { u.delta["blk.1.ffn_up.diablo"][3] = NAN; }).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(with([](auto& u) { u.delta["blk.1.ffn_up.diablo"][3] = -INFINITY; }).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(with([](auto& u) { u.fisher["blk.1.ffn_up.diablo"][0] = -1.0f; }).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(with([](auto& u) { u.num_examples = 0; }).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(with([](auto& u) { u.client.clear(); }).code(), absl::StatusCode::kInvalidArgument);
}

TEST(UpdateCodecTest, TenThousandMutationsNeverCrash) {
  const auto global = Global();
  const auto bytes = *EncodeUpdate(Good());
  Rng rng(7);
  int ok = 0, rejected = 0;
  for (int i = 0; i < 10000; ++i) {
    std::vector<uint8_t> m = bytes;
    const int flips = 1 + static_cast<int>(rng.Below(8));
    for (int f = 0; f < flips; ++f) m[rng.Below(m.size())] = static_cast<uint8_t>(rng.NextU64());
    if (rng.Below(4) == 0) m.resize(rng.Below(m.size()));
    auto u = DecodeUpdate(m, global, 1 << 20);
    if (u.ok()) {
      ++ok;
      for (const auto& [name, v] : u->delta)
        for (float x : v) ASSERT_TRUE(std::isfinite(x));  // nothing poisonous gets through
    } else {
      ++rejected;
      EXPECT_FALSE(u.status().message().empty());
    }
  }
  std::printf("10000 mutated updates: %d accepted (finite, right shapes), %d rejected\n", ok, rejected);
  EXPECT_GT(rejected, 0);
}

}  // namespace
}  // namespace fedtune::protocol

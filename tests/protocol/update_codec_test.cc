#include "protocol/update_codec.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "aggregation/compression.h"
#include "common/rng.h"
#include "model/safetensors.h"
#include "protocol/adapter_tensors.h"

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

// Compressed uploads: the coordinator decodes exactly what the client's delta became, the payload
// shrinks by the expected ratio, and malformed or mismatched parts are refused.
TEST(UpdateCodecTest, CompressedUpdatesRoundTripAndShrink) {
  const auto global = Global();
  const size_t dense = EncodeUpdate(Good())->size();
  for (auto kind : {aggregation::Compression::kInt8, aggregation::Compression::kInt4, aggregation::Compression::kTopK}) {
    auto u = Good();
    u.fisher.clear();
    aggregation::CompressUpdate(&u, kind, 0.25, nullptr);
    auto bytes = EncodeUpdate(u);
    ASSERT_TRUE(bytes.ok());
    auto back = DecodeUpdate(*bytes, global, 1 << 20, "worker-007");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->delta, u.delta) << aggregation::CompressionName(kind);
    EXPECT_EQ(UpdateBytes(*back), UpdateBytes(u));
    auto plain = Good();
    plain.fisher.clear();
    // int8: 1 + 4/64 bytes per value, int4: 0.5 + 4/64 (one scale per block; these tensors have 96
    // and 40 values), top-k at 25%: 8 bytes per kept value = 2 per value.
    const double ratio = kind == aggregation::Compression::kInt8 ? 3.5 : kind == aggregation::Compression::kInt4 ? 6.5 : 1.9;
    EXPECT_LT(static_cast<double>(UpdateBytes(u)) * ratio, static_cast<double>(UpdateBytes(plain))) << aggregation::CompressionName(kind);
    EXPECT_LT(bytes->size(), dense);
  }
  // Mismatched parts: an int4 code tensor in an int8 update, a part without the metadata, a
  // tensor sent both dense and compressed, an unknown compression name, a bad code.
  auto encoded = [&](auto mutate) {
    auto u = Good();
    u.fisher.clear();
    aggregation::CompressUpdate(&u, aggregation::Compression::kInt8, 0.25, nullptr);
    model::SafetensorsWriter w;
    mutate(u, w);
    w.SetMetadata("fedtune.update", "1");
    w.SetMetadata("client", u.client);
    w.SetMetadata("num_examples", "3");
    return DecodeUpdate(w.Serialize(), global, 1 << 20).status();
  };
  auto add_q8 = [](const aggregation::ClientUpdate& u, model::SafetensorsWriter& w, const std::string& name, const std::string& prefix, DType t) {
    const auto& c = u.compressed.at(name);
    ASSERT_TRUE(w.AddF32("scale." + name, {static_cast<int64_t>(c.scales.size())}, c.scales).ok());
    ASSERT_TRUE(w.Add(prefix + name, t, {static_cast<int64_t>(c.q8.size())},
                      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(c.q8.data()), c.q8.size())).ok());
  };
  const std::string a = "blk.0.attn_q.lora_b", b = "blk.1.ffn_up.diablo";
  EXPECT_TRUE(encoded([&](auto& u, auto& w) {
                w.SetMetadata("fedtune.compression", "int8");
                add_q8(u, w, a, "q8.", DType::kI8);
                add_q8(u, w, b, "q8.", DType::kI8);
              }).ok());
  EXPECT_EQ(encoded([&](auto& u, auto& w) {
              w.SetMetadata("fedtune.compression", "int8");
              add_q8(u, w, a, "q4.", DType::kU8);
            }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(encoded([&](auto& u, auto& w) { add_q8(u, w, a, "q8.", DType::kI8); }).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(encoded([&](auto& u, auto& w) {
              w.SetMetadata("fedtune.compression", "int8");
              add_q8(u, w, a, "q8.", DType::kI8);
              ASSERT_TRUE(w.AddF32("delta." + a, {96}, u.delta.at(a)).ok());
            }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(encoded([&](auto& u, auto& w) {
              w.SetMetadata("fedtune.compression", "int3");
              add_q8(u, w, a, "q8.", DType::kI8);
            }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(encoded([&](auto& u, auto& w) {
              w.SetMetadata("fedtune.compression", "int8");
              u.compressed.at(a).q8[0] = -128;
              add_q8(u, w, a, "q8.", DType::kI8);
            }).code(),
            absl::StatusCode::kInvalidArgument);
  // Mutations of a compressed payload never let a non-finite value through.
  auto u = Good();
  u.fisher.clear();
  aggregation::CompressUpdate(&u, aggregation::Compression::kInt4, 0.25, nullptr);
  const auto bytes = *EncodeUpdate(u);
  Rng rng(11);
  for (int i = 0; i < 3000; ++i) {
    std::vector<uint8_t> m = bytes;
    for (int f = 0; f < 1 + static_cast<int>(rng.Below(6)); ++f) m[rng.Below(m.size())] = static_cast<uint8_t>(rng.NextU64());
    auto d = DecodeUpdate(m, global, 1 << 20);
    if (!d.ok()) continue;
    for (const auto& [name, v] : d->delta)
      for (float x : v) ASSERT_TRUE(std::isfinite(x));
  }
}

}  // namespace
}  // namespace fedtune::protocol

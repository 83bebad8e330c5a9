#include "privacy/secagg.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "common/rng.h"

namespace fedtune::privacy::secagg {
namespace {

struct Run {
  std::vector<std::unique_ptr<Client>> clients;
  std::vector<std::vector<float>> inputs;
  Server server;
  explicit Run(const Config& c) : server(c) {}
};

// Every client of `c` created, keys advertised and shares exchanged through the server.
absl::Status AgreeKeys(Run& run, const Config& c) {
  for (int i = 0; i < c.num_clients; ++i) {
    FT_ASSIGN_OR_RETURN(auto cl, Client::Create(c, i));
    FT_RETURN_IF_ERROR(run.server.ReceiveKeys(cl->Advertise()));
    run.clients.push_back(std::move(cl));
  }
  for (auto& cl : run.clients) {
    FT_ASSIGN_OR_RETURN(auto shares, cl->ShareKeys(run.server.KeysFor(cl->id())));
    FT_RETURN_IF_ERROR(run.server.ReceiveShares(cl->id(), shares));
  }
  return absl::OkStatus();
}

// Drives the protocol. drop_before_input: clients that share keys but never send their masked
// input; drop_after_input: clients that send it but never answer the unmask request.
absl::StatusOr<Result> Drive(const Config& c, const std::vector<int>& drop_before_input, const std::vector<int>& drop_after_input,
                             std::function<void(UnmaskReply&)> tamper = {}, std::vector<std::vector<float>>* inputs_out = nullptr) {
  Run run(c);
  Rng rng(11);
  auto rounding = NoiseSource::Create();
  FT_RETURN_IF_ERROR(rounding.status());
  FT_RETURN_IF_ERROR(AgreeKeys(run, c));
  for (int i = 0; i < c.num_clients; ++i) {
    std::vector<float> x(c.vector_length);
    for (float& v : x) v = static_cast<float>(rng.Uniform() * 2 - 1);
    run.inputs.push_back(std::move(x));
  }
  auto in = [](const std::vector<int>& v, int x) { return std::find(v.begin(), v.end(), x) != v.end(); };
  for (auto& cl : run.clients) {
    if (in(drop_before_input, cl->id())) continue;
    FT_ASSIGN_OR_RETURN(auto y, cl->MaskedInput(run.inputs[static_cast<size_t>(cl->id())], run.server.SharesFor(cl->id()), **rounding));
    FT_RETURN_IF_ERROR(run.server.ReceiveMasked(cl->id(), std::move(y)));
  }
  const auto dropped = run.server.Dropped(), survivors = run.server.Survivors();
  for (auto& cl : run.clients) {
    if (in(drop_before_input, cl->id()) || in(drop_after_input, cl->id())) continue;
    FT_ASSIGN_OR_RETURN(UnmaskReply r, cl->Unmask(dropped, survivors));
    if (tamper) tamper(r);
    FT_RETURN_IF_ERROR(run.server.ReceiveUnmask(r));
  }
  if (inputs_out) *inputs_out = run.inputs;
  return run.server.Finish();
}

void ExpectPlainSum(const Result& r, const std::vector<std::vector<float>>& inputs, const Config& c) {
  const double tol = (2 * c.clip_range) / std::ldexp(1.0, c.precision_bits) * static_cast<double>(r.survivors.size());
  double worst = 0;
  for (size_t i = 0; i < r.sum.size(); ++i) {
    double plain = 0;
    for (int u : r.survivors) plain += inputs[static_cast<size_t>(u)][i];
    worst = std::max(worst, std::fabs(r.sum[i] - plain));
  }
  EXPECT_LE(worst, tol);
}

Config Make(int n, int degree, size_t len) {
  Config c;
  c.num_clients = n;
  c.degree = degree;
  c.vector_length = len;
  c.graph_seed = 42;
  return c;
}

TEST(SecAggTest, TwentyClientsFourDropAfterMaskedInput) {
  const Config c = Make(20, 8, 1000);
  std::vector<std::vector<float>> inputs;
  auto r = Drive(c, {}, {2, 7, 11, 19}, {}, &inputs);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->survivors.size(), 20u);  // their inputs are in the sum; only their unmask replies are missing
  ExpectPlainSum(*r, inputs, c);
  EXPECT_TRUE(r->tampered.empty());
}

TEST(SecAggTest, TwentyClientsFourDropBeforeMaskedInputAreRecovered) {
  const Config c = Make(20, 8, 1000);
  std::vector<std::vector<float>> inputs;
  auto r = Drive(c, {0, 5, 6, 13}, {}, {}, &inputs);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->survivors.size(), 16u);
  ExpectPlainSum(*r, inputs, c);
}

TEST(SecAggTest, CompleteGraphIsPlainSecAgg) {
  const Config c = Make(6, 0, 64);
  std::vector<std::vector<float>> inputs;
  auto r = Drive(c, {3}, {1}, {}, &inputs);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectPlainSum(*r, inputs, c);
  EXPECT_EQ(Neighbours(c, 0).size(), 5u);
}

TEST(SecAggTest, NeighbourGraphIsSymmetricAndRegular) {
  const Config c = Make(50, 10, 1);
  for (int u = 0; u < 50; ++u) {
    const auto nb = Neighbours(c, u);
    EXPECT_EQ(nb.size(), 10u);
    for (int v : nb) {
      const auto back = Neighbours(c, v);
      EXPECT_TRUE(std::binary_search(back.begin(), back.end(), u));
    }
  }
}

TEST(SecAggTest, MaskedVectorLooksUniform) {
  const Config c = Make(5, 0, 200000);
  Server s(c);
  std::vector<std::unique_ptr<Client>> cls;
  for (int i = 0; i < 5; ++i) {
    auto cl = Client::Create(c, i);
    ASSERT_TRUE(cl.ok());
    ASSERT_TRUE(s.ReceiveKeys((*cl)->Advertise()).ok());
    cls.push_back(std::move(*cl));
  }
  for (auto& cl : cls) ASSERT_TRUE(s.ReceiveShares(cl->id(), *cl->ShareKeys(s.KeysFor(cl->id()))).ok());
  auto rounding = NoiseSource::Create();
  // A constant input is the worst case: without masks every value would be identical.
  std::vector<float> x(c.vector_length, 0.25f);
  auto y = cls[0]->MaskedInput(x, s.SharesFor(0), **rounding);
  ASSERT_TRUE(y.ok());
  std::vector<double> bins(256, 0);
  for (uint32_t v : *y) bins[v >> 24] += 1;
  const double expected = static_cast<double>(y->size()) / 256;
  double chi2 = 0;
  for (double o : bins) chi2 += (o - expected) * (o - expected) / expected;
  // 255 degrees of freedom: P(chi2 > 370) ~ 3e-6.
  EXPECT_LT(chi2, 370.0);
  EXPECT_GT(chi2, 160.0);  // and not suspiciously flat either
}

TEST(SecAggTest, TamperedUnmaskShareIsDetectedAndNamed) {
  const Config c = Make(12, 8, 200);
  std::vector<std::vector<float>> inputs;
  auto r = Drive(c, {4}, {}, [](UnmaskReply& rep) {
    if (rep.from != 9) return;
    for (auto& [owner, share] : rep.self_mask_shares) share.y[0] ^= 1;  // client 9 lies about every b share
  }, &inputs);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectPlainSum(*r, inputs, c);  // recovered from consistent shares
  ASSERT_FALSE(r->tampered.empty());
  for (const std::string& t : r->tampered) EXPECT_NE(t.find("held by client 9"), std::string::npos) << t;
}

TEST(SecAggTest, TamperedEncryptedShareFailsAuthentication) {
  const Config c = Make(4, 0, 8);
  Server s(c);
  std::vector<std::unique_ptr<Client>> cls;
  for (int i = 0; i < 4; ++i) {
    cls.push_back(std::move(*Client::Create(c, i)));
    ASSERT_TRUE(s.ReceiveKeys(cls.back()->Advertise()).ok());
  }
  for (auto& cl : cls) ASSERT_TRUE(s.ReceiveShares(cl->id(), *cl->ShareKeys(s.KeysFor(cl->id()))).ok());
  auto shares = s.SharesFor(2);
  shares[0].ciphertext[20] ^= 0x40;
  auto rounding = NoiseSource::Create();
  std::vector<float> x(8, 0.0f);
  auto y = cls[2]->MaskedInput(x, shares, **rounding);
  EXPECT_EQ(y.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(std::string(y.status().message()).find("tampered"), std::string::npos);
}

TEST(SecAggTest, ClientRefusesToRevealBothSecretsOfOneClient) {
  const Config c = Make(4, 0, 8);
  auto cl = Client::Create(c, 0);
  ASSERT_TRUE(cl.ok());
  EXPECT_FALSE((*cl)->Unmask({1}, {1, 2}).ok());
}

TEST(SecAggTest, ConfigOverflowIsRejected) {
  Config c = Make(2000, 0, 10);
  EXPECT_EQ(Validate(c).code(), absl::StatusCode::kInvalidArgument);
  c = Make(10, 3, 10);
  EXPECT_EQ(Validate(c).code(), absl::StatusCode::kInvalidArgument);  // odd degree
}

TEST(ShamirTest, AnyThresholdSubsetReconstructs) {
  Secret32 s;
  for (int i = 0; i < 32; ++i) s[static_cast<size_t>(i)] = static_cast<uint8_t>(i * 7 + 1);
  auto shares = ShamirSplit(s, 3, {1, 2, 3, 4, 5});
  ASSERT_TRUE(shares.ok());
  for (auto idx : {std::vector<int>{0, 1, 2}, {2, 3, 4}, {0, 2, 4}}) {
    std::vector<Share> sub;
    for (int i : idx) sub.push_back((*shares)[static_cast<size_t>(i)]);
    auto r = ShamirCombine(sub);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, s);
  }
  std::vector<Share> two = {(*shares)[0], (*shares)[1]};
  auto wrong = ShamirCombine(two);
  EXPECT_TRUE(!wrong.ok() || *wrong != s);
}

// issue 17: a server that asks a client twice (first listing a peer as dropped, then as a
// survivor) would get both of that peer's shares; every honest client answers one request only.
TEST(SecAggHostileServerTest, EveryHonestClientRefusesASecondUnmaskRequest) {
  Config c;
  c.num_clients = 5;
  c.vector_length = 8;
  auto rounding = NoiseSource::Create();
  ASSERT_TRUE(rounding.ok());
  secagg::Run run(c);  // (gtest's Test::Run would shadow the struct)
  ASSERT_TRUE(AgreeKeys(run, c).ok());
  Server& server = run.server;
  std::vector<std::unique_ptr<Client>>& clients = run.clients;
  const std::vector<float> x(c.vector_length, 0.5f);
  for (auto& cl : clients) ASSERT_TRUE(server.ReceiveMasked(cl->id(), *cl->MaskedInput(x, server.SharesFor(cl->id()), **rounding)).ok());
  for (int id = 1; id < c.num_clients; ++id) {
    // First request: client 0 "dropped" (reveals its mask-key share); then: client 0 "survived".
    ASSERT_TRUE(clients[static_cast<size_t>(id)]->Unmask({0}, {1, 2, 3, 4}).ok());
    auto second = clients[static_cast<size_t>(id)]->Unmask({}, {0, 1, 2, 3, 4});
    EXPECT_EQ(second.status().code(), absl::StatusCode::kPermissionDenied) << id;
  }
  // A request that does not list the client itself as a survivor is refused too.
  EXPECT_EQ(clients[0]->Unmask({}, {1, 2}).status().code(), absl::StatusCode::kPermissionDenied);
  // So is one that pads the survivors with a repeated id or ids outside the round (only client 0
  // and client 1 distinct: below the threshold of 3).
  EXPECT_EQ(clients[0]->Unmask({}, {0, 1, 1, 1, 9, -2}).status().code(), absl::StatusCode::kPermissionDenied);
}

// A client that the server relays fewer than t - 1 shares to aborts instead of masking (the
// server could otherwise hold enough of its shares itself).
TEST(SecAggHostileServerTest, AClientWithTooFewRelayedSharesAborts) {
  Config c;
  c.num_clients = 5;
  c.vector_length = 4;
  auto rounding = NoiseSource::Create();
  ASSERT_TRUE(rounding.ok());
  secagg::Run run(c);  // (gtest's Test::Run would shadow the struct)
  ASSERT_TRUE(AgreeKeys(run, c).ok());
  Server& server = run.server;
  std::vector<std::unique_ptr<Client>>& clients = run.clients;
  const std::vector<float> x(c.vector_length, 0.5f);
  auto all = server.SharesFor(0);
  ASSERT_GE(all.size(), 2u);
  const int t = EffectiveThreshold(c);
  std::vector<EncryptedShare> few(all.begin(), all.begin() + (t - 2));
  EXPECT_EQ(clients[0]->MaskedInput(x, few, **rounding).status().code(), absl::StatusCode::kFailedPrecondition);
  // A share relayed twice is refused as well.
  std::vector<EncryptedShare> doubled = server.SharesFor(1);
  doubled.push_back(doubled.front());
  EXPECT_EQ(clients[1]->MaskedInput(x, doubled, **rounding).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedtune::privacy::secagg

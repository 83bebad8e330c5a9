// Signed SecAgg+ key advertisements: a swapped key, another round, another id, an unsigned
// advertisement, a certificate from another CA or another worker's certificate are all refused.
#include "protocol/secagg_identity.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "coordinator/provision.h"
#include "tests/support/tiny_model.h"

namespace fedtune::protocol {
namespace {

class SecAggIdentityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempPath("secagg_identity");
    std::filesystem::remove_all(dir_);
    ASSERT_TRUE(coordinator::Provision({dir_ + "/pki", {}, {"a", "b"}, 30, false}).ok());
    ASSERT_TRUE(coordinator::Provision({dir_ + "/other", {}, {"a"}, 30, false}).ok());
  }
  std::unique_ptr<SecAggIdentity> Id(const std::string& pki, const std::string& w, const std::string& cert_of = "") {
    const std::string p = dir_ + "/" + pki;
    auto id = SecAggIdentity::Load(p + "/ca.pem", p + "/workers/" + (cert_of.empty() ? w : cert_of) + ".pem", p + "/workers/" + w + ".key");
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? std::move(*id) : nullptr;
  }
  static rpc::v1::SecAggKeys Keys(int id) {
    rpc::v1::SecAggKeys k;
    k.set_id(id);
    k.set_enc_pk(std::string(32, '\x11'));
    k.set_mask_pk(std::string(32, '\x22'));
    k.set_b_commitment(std::string(32, '\x33'));
    return k;
  }
  std::string dir_;
};

TEST_F(SecAggIdentityTest, SignedAdvertisementVerifiesAndEveryAlterationIsRefused) {
  auto a = Id("pki", "a"), b = Id("pki", "b");
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->name(), "a");
  rpc::v1::SecAggKeys k = Keys(3);
  ASSERT_TRUE(a->Sign("run-1;7", &k).ok());
  auto who = b->Verify("run-1;7", k);
  ASSERT_TRUE(who.ok()) << who.status();
  EXPECT_EQ(*who, "a");

  rpc::v1::SecAggKeys swapped = k;  // the coordinator puts its own mask key in
  swapped.set_mask_pk(std::string(32, '\x44'));
  EXPECT_EQ(b->Verify("run-1;7", swapped).status().code(), absl::StatusCode::kPermissionDenied);
  swapped = k;
  swapped.set_enc_pk(std::string(32, '\x55'));
  EXPECT_EQ(b->Verify("run-1;7", swapped).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(b->Verify("run-1;8", k).status().code(), absl::StatusCode::kPermissionDenied);  // replayed in another round
  EXPECT_EQ(b->Verify("run-2;7", k).status().code(), absl::StatusCode::kPermissionDenied);  // or another run
  rpc::v1::SecAggKeys moved = k;  // presented under another SecAgg id
  moved.set_id(4);
  EXPECT_EQ(b->Verify("run-1;7", moved).status().code(), absl::StatusCode::kPermissionDenied);
  rpc::v1::SecAggKeys unsigned_keys = Keys(3);
  EXPECT_EQ(b->Verify("run-1;7", unsigned_keys).status().code(), absl::StatusCode::kPermissionDenied);

  // A certificate from another CA (a coordinator minting its own "worker").
  auto foreign = Id("other", "a");
  ASSERT_TRUE(foreign);
  rpc::v1::SecAggKeys f = Keys(3);
  ASSERT_TRUE(foreign->Sign("run-1;7", &f).ok());
  auto r = b->Verify("run-1;7", f);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(r.status().message().find("CA"), std::string::npos) << r.status();
  // Signed by a but carrying b's certificate.
  rpc::v1::SecAggKeys mixed = k;
  mixed.set_certificate(k.certificate());
  auto b_cert = Keys(3);
  ASSERT_TRUE(b->Sign("run-1;7", &b_cert).ok());
  mixed.set_certificate(b_cert.certificate());
  EXPECT_EQ(b->Verify("run-1;7", mixed).status().code(), absl::StatusCode::kPermissionDenied);
  // The coordinator's own (server) certificate from the same CA is not a worker's.
  auto coord = SecAggIdentity::Load(dir_ + "/pki/ca.pem", dir_ + "/pki/coordinator.pem", dir_ + "/pki/coordinator.key");
  ASSERT_TRUE(coord.ok()) << coord.status();
  rpc::v1::SecAggKeys c = Keys(3);
  ASSERT_TRUE((*coord)->Sign("run-1;7", &c).ok());
  EXPECT_EQ(b->Verify("run-1;7", c).status().code(), absl::StatusCode::kPermissionDenied);
  // The attempt string binds the deadline too: an advertisement of an aborted attempt of the same
  // round does not verify in the next attempt.
  rpc::v1::Task t1, t2;
  t1.set_run_id("run-1");
  t1.set_round(7);
  t1.set_deadline_unix_ms(1000);
  t2 = t1;
  t2.set_deadline_unix_ms(2000);
  rpc::v1::SecAggKeys old = Keys(3);
  ASSERT_TRUE(a->Sign(SecAggAttempt(t1), &old).ok());
  EXPECT_TRUE(b->Verify(SecAggAttempt(t1), old).ok());
  EXPECT_EQ(b->Verify(SecAggAttempt(t2), old).status().code(), absl::StatusCode::kPermissionDenied);
  // A key file that does not belong to the certificate is refused at load.
  EXPECT_FALSE(SecAggIdentity::Load(dir_ + "/pki/ca.pem", dir_ + "/pki/workers/b.pem", dir_ + "/pki/workers/a.key").ok());
}

}  // namespace
}  // namespace fedtune::protocol

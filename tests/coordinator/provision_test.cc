#include "coordinator/provision.h"

#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <filesystem>

#include "common/mapped_file.h"
#include "tests/support/tiny_model.h"

namespace fedtune::coordinator {
namespace {

std::string Read(const std::string& p) { return *ReadFileToString(p); }

bool MatchesHost(const std::string& pem, const std::string& host, bool ip) {
  BIO* b = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509* c = PEM_read_bio_X509(b, nullptr, nullptr, nullptr);
  const bool ok = c && (ip ? X509_check_ip_asc(c, host.c_str(), 0) : X509_check_host(c, host.c_str(), host.size(), 0, nullptr)) == 1;
  X509_free(c);
  BIO_free(b);
  return ok;
}

TEST(ProvisionTest, IssuesAVerifiableCaServerAndWorkerCertificates) {
  const std::string dir = testing::TempPath("pki");
  std::filesystem::remove_all(dir);
  auto rep = Provision({dir, {"coord.example", "10.0.0.5"}, {"w1", "w2"}, 30, false});
  ASSERT_TRUE(rep.ok()) << rep.status();
  EXPECT_TRUE(rep->created_ca);
  const std::string ca = Read(dir + "/ca.pem");
  auto cn = VerifyCertificate(ca, Read(dir + "/coordinator.pem"));
  ASSERT_TRUE(cn.ok()) << cn.status();
  EXPECT_EQ(*cn, "coord.example");
  EXPECT_TRUE(MatchesHost(Read(dir + "/coordinator.pem"), "coord.example", false));
  EXPECT_TRUE(MatchesHost(Read(dir + "/coordinator.pem"), "10.0.0.5", true));
  EXPECT_TRUE(MatchesHost(Read(dir + "/coordinator.pem"), "localhost", false));
  EXPECT_FALSE(MatchesHost(Read(dir + "/coordinator.pem"), "evil.example", false));
  for (const char* w : {"w1", "w2"}) {
    auto wcn = VerifyCertificate(ca, Read(dir + "/workers/" + std::string(w) + ".pem"));
    ASSERT_TRUE(wcn.ok());
    EXPECT_EQ(*wcn, w);
    struct stat st {};
    ASSERT_EQ(::stat((dir + "/workers/" + std::string(w) + ".key").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_EQ(Read(dir + "/workers/" + std::string(w) + ".token").size(), 65u);  // 64 hex + newline
  }
  EXPECT_NE(Read(dir + "/tokens.sha256").find("w2 "), std::string::npos);
  // Adding a worker later reuses the CA; a certificate from another CA does not verify.
  auto again = Provision({dir, {}, {"w3"}, 30, false});
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created_ca);
  EXPECT_TRUE(VerifyCertificate(ca, Read(dir + "/workers/w3.pem")).ok());
  EXPECT_NE(Read(dir + "/tokens.sha256").find("w1 "), std::string::npos);
  const std::string other = testing::TempPath("pki_other");
  std::filesystem::remove_all(other);
  ASSERT_TRUE(Provision({other, {}, {"w1"}, 30, false}).ok());
  EXPECT_EQ(VerifyCertificate(ca, Read(other + "/workers/w1.pem")).status().code(), absl::StatusCode::kPermissionDenied);
}

TEST(ProvisionTest, BadWorkerNamesAreRejected) {
  EXPECT_EQ(Provision({testing::TempPath("pki_bad"), {}, {"../escape"}, 30, false}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Provision({"", {}, {"w"}, 30, false}).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedtune::coordinator

#include "protocol/secagg_identity.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"
#include "protocol/update_codec.h"

namespace fedtune::protocol {
namespace {

constexpr size_t kMaxCertificate = 16 << 10, kMaxSignature = 1024;

std::string OpenSslError() {
  const unsigned long e = ERR_get_error();
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return buf;
}

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct StoreFree {
  void operator()(X509_STORE* s) const { X509_STORE_free(s); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;

X509Ptr ParseCert(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  if (!bio) return nullptr;
  X509Ptr x(PEM_read_bio_X509(bio, nullptr, nullptr, nullptr));
  BIO_free(bio);
  return x;
}

std::string CommonName(X509* x) {
  char cn[256] = {0};
  const int n = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn));
  return n > 0 ? std::string(cn, static_cast<size_t>(n)) : std::string();
}

// Ed25519 signs the message itself; EC and RSA keys sign its SHA-256.
const EVP_MD* DigestFor(EVP_PKEY* k) { return EVP_PKEY_id(k) == EVP_PKEY_ED25519 ? nullptr : EVP_sha256(); }

}  // namespace

struct SecAggIdentity::Impl {
  std::unique_ptr<X509_STORE, StoreFree> store;
  PkeyPtr key;
  std::string cert_pem;
};

SecAggIdentity::~SecAggIdentity() = default;

std::string SecAggAttempt(const rpc::v1::Task& task) {
  std::string a = absl::StrCat(task.run_id().size(), ":", task.run_id(), ";round ", task.round(), ";deadline ", task.deadline_unix_ms(),
                               ";clients ", task.secagg_clients(), ";graph ", task.secagg_graph_seed());
  // The round's other public parameters, so that no worker is given a lower threshold (or
  // another encoding) than its neighbours.
  absl::StrAppend(&a, ";degree ", task.secagg_degree(), ";threshold ", task.secagg_threshold(), ";range ", task.secagg_value_range(),
                  ";divisor ", task.secagg_weight_divisor());
  // Per-worker shares: every worker signs the list it was given (its SHA-256), so a coordinator
  // that gave workers different lists (to make some send zeros where a victim trains) fails
  // their neighbours' verification.
  if (task.secagg_shares_size() > 0) {
    std::string list;
    for (const auto& s : task.secagg_shares()) {
      absl::StrAppend(&list, s.rank(), ",", s.first(), ",", s.modules_size());
      for (const auto& m : s.modules()) absl::StrAppend(&list, ",", m.size(), ":", m);
      list.push_back(';');
    }
    absl::StrAppend(&a, ";shares ", Sha256Hex({reinterpret_cast<const uint8_t*>(list.data()), list.size()}));
  }
  return a;
}

std::string SecAggSignedBytes(const std::string& context, const rpc::v1::SecAggKeys& k) {
  std::string m = "fedtune secagg keys v2";
  m.push_back('\0');
  absl::StrAppend(&m, context.size(), ":", context, ";", k.id(), ";");
  for (const std::string* part : {&k.enc_pk(), &k.mask_pk(), &k.b_commitment()}) absl::StrAppend(&m, part->size(), ":", *part);
  return m;
}

absl::StatusOr<std::unique_ptr<SecAggIdentity>> SecAggIdentity::Load(const std::string& ca_pem, const std::string& cert_pem,
                                                                     const std::string& key_pem) {
  std::unique_ptr<SecAggIdentity> id(new SecAggIdentity());
  id->impl_ = std::make_unique<Impl>();
  FT_ASSIGN_OR_RETURN(std::string ca, ReadFileToString(ca_pem));
  FT_ASSIGN_OR_RETURN(id->impl_->cert_pem, ReadFileToString(cert_pem));
  FT_ASSIGN_OR_RETURN(std::string key, ReadFileToString(key_pem));
  id->impl_->store.reset(X509_STORE_new());
  if (!id->impl_->store) return absl::InternalError("X509_STORE_new failed");
  X509Ptr ca_cert = ParseCert(ca);
  if (!ca_cert || X509_STORE_add_cert(id->impl_->store.get(), ca_cert.get()) != 1)
    return absl::InvalidArgumentError(absl::StrCat(ca_pem, ": not a CA certificate (", OpenSslError(), ")"));
  X509Ptr own = ParseCert(id->impl_->cert_pem);
  if (!own) return absl::InvalidArgumentError(absl::StrCat(cert_pem, ": not a certificate"));
  id->name_ = CommonName(own.get());
  BIO* bio = BIO_new_mem_buf(key.data(), static_cast<int>(key.size()));
  id->impl_->key.reset(bio ? PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr) : nullptr);
  BIO_free(bio);
  if (!id->impl_->key) return absl::InvalidArgumentError(absl::StrCat(key_pem, ": not a private key"));
  if (X509_check_private_key(own.get(), id->impl_->key.get()) != 1)
    return absl::InvalidArgumentError(absl::StrCat(key_pem, ": does not belong to ", cert_pem));
  return id;
}

absl::Status SecAggIdentity::Sign(const std::string& context, rpc::v1::SecAggKeys* k) const {
  const std::string m = SecAggSignedBytes(context, *k);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  size_t len = 0;
  std::string sig;
  bool ok = ctx && EVP_DigestSignInit(ctx, nullptr, DigestFor(impl_->key.get()), nullptr, impl_->key.get()) == 1 &&
            EVP_DigestSign(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(m.data()), m.size()) == 1;
  if (ok) {
    sig.resize(len);
    ok = EVP_DigestSign(ctx, reinterpret_cast<unsigned char*>(sig.data()), &len, reinterpret_cast<const unsigned char*>(m.data()), m.size()) == 1;
    sig.resize(len);
  }
  EVP_MD_CTX_free(ctx);
  if (!ok) return absl::InternalError(absl::StrCat("signing the key advertisement: ", OpenSslError()));
  k->set_signature(sig);
  k->set_certificate(impl_->cert_pem);
  return absl::OkStatus();
}

absl::StatusOr<std::string> SecAggIdentity::Verify(const std::string& context, const rpc::v1::SecAggKeys& k) const {
  ERR_clear_error();
  const std::string who = absl::StrCat("key advertisement of client ", k.id());
  if (k.signature().empty() || k.certificate().empty()) return absl::PermissionDeniedError(absl::StrCat(who, ": unsigned"));
  if (k.certificate().size() > kMaxCertificate || k.signature().size() > kMaxSignature)
    return absl::InvalidArgumentError(absl::StrCat(who, ": oversized certificate or signature"));
  X509Ptr cert = ParseCert(k.certificate());
  if (!cert) return absl::PermissionDeniedError(absl::StrCat(who, ": unreadable certificate"));
  X509_STORE_CTX* vctx = X509_STORE_CTX_new();
  // A worker certificate: chained to the CA with the client-authentication purpose (the
  // coordinator's own certificate is for server authentication only and is refused).
  const bool chained = vctx && X509_STORE_CTX_init(vctx, impl_->store.get(), cert.get(), nullptr) == 1 &&
                       X509_STORE_CTX_set_purpose(vctx, X509_PURPOSE_SSL_CLIENT) == 1 && X509_verify_cert(vctx) == 1;
  const std::string why = vctx && !chained ? X509_verify_cert_error_string(X509_STORE_CTX_get_error(vctx)) : "";
  X509_STORE_CTX_free(vctx);
  ERR_clear_error();
  if (!chained) return absl::PermissionDeniedError(absl::StrCat(who, ": not a worker certificate of the deployment CA (", why, ")"));
  EVP_PKEY* pk = X509_get0_pubkey(cert.get());
  const std::string m = SecAggSignedBytes(context, k);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool good = ctx && pk && EVP_DigestVerifyInit(ctx, nullptr, DigestFor(pk), nullptr, pk) == 1 &&
                    EVP_DigestVerify(ctx, reinterpret_cast<const unsigned char*>(k.signature().data()), k.signature().size(),
                                     reinterpret_cast<const unsigned char*>(m.data()), m.size()) == 1;
  EVP_MD_CTX_free(ctx);
  ERR_clear_error();
  if (!good) return absl::PermissionDeniedError(absl::StrCat(who, ": the signature does not match the keys (swapped or altered)"));
  return CommonName(cert.get());
}

}  // namespace fedtune::protocol

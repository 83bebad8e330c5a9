#include "coordinator/provision.h"

#include <sstream>

#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"

namespace fedtune::coordinator {
namespace {

namespace fs = std::filesystem;

template <typename T, void (*F)(T*)>
struct Deleter {
  void operator()(T* p) const { F(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using X509Ptr = std::unique_ptr<X509, Deleter<X509, X509_free>>;
using Bio = std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>>;

absl::Status Ossl(bool ok, const std::string& what) { return ok ? absl::OkStatus() : absl::InternalError("OpenSSL: " + what); }

absl::StatusOr<Pkey> NewKey() {
  Pkey k(EVP_EC_gen("P-256"));
  if (!k) return absl::InternalError("OpenSSL: P-256 key generation failed");
  return k;
}

std::string BioString(BIO* b) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(b, &data);
  return std::string(data, static_cast<size_t>(n));
}

absl::StatusOr<std::string> KeyPem(EVP_PKEY* k) {
  Bio b(BIO_new(BIO_s_mem()));
  FT_RETURN_IF_ERROR(Ossl(b && PEM_write_bio_PrivateKey(b.get(), k, nullptr, nullptr, 0, nullptr, nullptr) == 1, "write key"));
  return BioString(b.get());
}

absl::StatusOr<std::string> CertPem(X509* c) {
  Bio b(BIO_new(BIO_s_mem()));
  FT_RETURN_IF_ERROR(Ossl(b && PEM_write_bio_X509(b.get(), c) == 1, "write certificate"));
  return BioString(b.get());
}

absl::Status AddExt(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (!ext) return absl::InvalidArgumentError(absl::StrCat("bad certificate extension ", OBJ_nid2sn(nid), "=", value));
  const int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  return Ossl(ok == 1, "add extension");
}

// Issues a certificate for `key` (self-signed when issuer is null).
absl::StatusOr<X509Ptr> Issue(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key, int days, bool ca,
                              const std::string& eku, const std::string& san) {
  X509Ptr c(X509_new());
  if (!c) return absl::InternalError("OpenSSL: X509_new");
  uint8_t serial[16];
  FT_RETURN_IF_ERROR(Ossl(RAND_bytes(serial, sizeof serial) == 1, "RAND_bytes"));
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  const bool ok = X509_set_version(c.get(), 2) == 1 && bn && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(c.get())) &&
                  X509_gmtime_adj(X509_getm_notBefore(c.get()), -300) && X509_gmtime_adj(X509_getm_notAfter(c.get()), 86400L * days) &&
                  X509_set_pubkey(c.get(), key) == 1;
  BN_free(bn);
  FT_RETURN_IF_ERROR(Ossl(ok, "certificate fields"));
  X509_NAME* name = X509_get_subject_name(c.get());
  FT_RETURN_IF_ERROR(Ossl(X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("fedtune"), -1, -1, 0) == 1 &&
                              X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0) == 1,
                          "subject"));
  X509* iss = issuer ? issuer : c.get();
  FT_RETURN_IF_ERROR(Ossl(X509_set_issuer_name(c.get(), X509_get_subject_name(iss)) == 1, "issuer"));
  FT_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_basic_constraints, ca ? "critical,CA:TRUE,pathlen:0" : "critical,CA:FALSE"));
  FT_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_key_usage, ca ? "critical,keyCertSign,cRLSign" : "critical,digitalSignature,keyAgreement"));
  FT_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_subject_key_identifier, "hash"));
  if (!eku.empty()) FT_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_ext_key_usage, eku));
  if (!san.empty()) FT_RETURN_IF_ERROR(AddExt(c.get(), iss, NID_subject_alt_name, san));
  FT_RETURN_IF_ERROR(Ossl(X509_sign(c.get(), issuer_key ? issuer_key : key, EVP_sha256()) > 0, "sign certificate"));
  return c;
}

// Keys and tokens: created 0600 (never world-readable, not even between creation and a chmod).
absl::Status WriteSecret(const std::string& path, const std::string& text) { return WriteFileAtomic(path, text, 0600); }

bool ValidName(const std::string& n) {
  if (n.empty() || n.size() > 64 || n[0] == '.') return false;
  for (char ch : n)
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.')) return false;
  return true;
}

bool IsIp(const std::string& h) { return !h.empty() && h.find_first_not_of("0123456789.") == std::string::npos; }

}  // namespace

absl::StatusOr<ProvisionReport> Provision(const ProvisionOptions& o) {
  if (o.dir.empty()) return absl::InvalidArgumentError("provision: an output folder is required");
  if (o.valid_days < 1) return absl::InvalidArgumentError("provision: valid_days must be >= 1");
  for (const auto& w : o.workers)
    if (!ValidName(w)) return absl::InvalidArgumentError(absl::StrCat("provision: bad worker name '", w, "' (letters, digits, - _ .)"));
  std::error_code ec;
  fs::create_directories(o.dir + "/workers", ec);
  if (ec) return absl::UnavailableError(absl::StrCat("provision: cannot create ", o.dir, ": ", ec.message()));
  // The folder holds the CA key and the workers' keys and tokens: owner only.
  for (const std::string& d : {o.dir, o.dir + "/workers"})
    if (::chmod(d.c_str(), 0700) != 0) return absl::UnavailableError(absl::StrCat("provision: chmod 0700 ", d));
  ProvisionReport rep;
  Pkey ca_key;
  X509Ptr ca;
  const std::string ca_pem_path = o.dir + "/ca.pem", ca_key_path = o.dir + "/ca.key";
  if (!o.force && fs::exists(ca_pem_path) && fs::exists(ca_key_path)) {
    FT_ASSIGN_OR_RETURN(std::string cp, ReadFileToString(ca_pem_path));
    FT_ASSIGN_OR_RETURN(std::string kp, ReadFileToString(ca_key_path));
    Bio cb(BIO_new_mem_buf(cp.data(), static_cast<int>(cp.size()))), kb(BIO_new_mem_buf(kp.data(), static_cast<int>(kp.size())));
    ca.reset(PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr));
    ca_key.reset(PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr));
    if (!ca || !ca_key) return absl::DataLossError(absl::StrCat("provision: cannot read the existing CA in ", o.dir, " (use --force to replace it)"));
  } else {
    FT_ASSIGN_OR_RETURN(ca_key, NewKey());
    FT_ASSIGN_OR_RETURN(ca, Issue(ca_key.get(), "fedtune CA", nullptr, nullptr, 3650, true, "", ""));
    FT_ASSIGN_OR_RETURN(std::string kp, KeyPem(ca_key.get()));
    FT_RETURN_IF_ERROR(WriteSecret(ca_key_path, kp));
    FT_ASSIGN_OR_RETURN(std::string cp, CertPem(ca.get()));
    FT_RETURN_IF_ERROR(WriteFileAtomic(ca_pem_path, cp));
    rep.created_ca = true;
    rep.files.insert(rep.files.end(), {ca_pem_path, ca_key_path});
  }
  // Coordinator.
  std::string san = "DNS:localhost,IP:127.0.0.1";
  for (const auto& h : o.hosts) absl::StrAppend(&san, ",", IsIp(h) ? "IP:" : "DNS:", h);
  FT_ASSIGN_OR_RETURN(Pkey skey, NewKey());
  FT_ASSIGN_OR_RETURN(X509Ptr scert, Issue(skey.get(), o.hosts.empty() ? "localhost" : o.hosts[0], ca.get(), ca_key.get(), o.valid_days, false, "serverAuth", san));
  FT_ASSIGN_OR_RETURN(std::string skp, KeyPem(skey.get()));
  FT_ASSIGN_OR_RETURN(std::string scp, CertPem(scert.get()));
  FT_RETURN_IF_ERROR(WriteSecret(o.dir + "/coordinator.key", skp));
  FT_RETURN_IF_ERROR(WriteFileAtomic(o.dir + "/coordinator.pem", scp));
  rep.files.insert(rep.files.end(), {o.dir + "/coordinator.pem", o.dir + "/coordinator.key"});
  // Workers and their join tokens.
  std::string tokens;
  if (auto old = ReadFileToString(o.dir + "/tokens.sha256"); old.ok() && !o.force) tokens = *old;
  for (const auto& w : o.workers) {
    FT_ASSIGN_OR_RETURN(Pkey wkey, NewKey());
    FT_ASSIGN_OR_RETURN(X509Ptr wcert, Issue(wkey.get(), w, ca.get(), ca_key.get(), o.valid_days, false, "clientAuth", ""));
    FT_ASSIGN_OR_RETURN(std::string wkp, KeyPem(wkey.get()));
    FT_ASSIGN_OR_RETURN(std::string wcp, CertPem(wcert.get()));
    const std::string base = o.dir + "/workers/" + w;
    FT_RETURN_IF_ERROR(WriteSecret(base + ".key", wkp));
    FT_RETURN_IF_ERROR(WriteFileAtomic(base + ".pem", wcp));
    uint8_t tok[32], digest[32];
    FT_RETURN_IF_ERROR(Ossl(RAND_bytes(tok, sizeof tok) == 1, "RAND_bytes"));
    std::string hex, dhex;
    for (uint8_t b : tok) absl::StrAppend(&hex, absl::Hex(b, absl::kZeroPad2));
    SHA256(reinterpret_cast<const uint8_t*>(hex.data()), hex.size(), digest);
    for (uint8_t b : digest) absl::StrAppend(&dhex, absl::Hex(b, absl::kZeroPad2));
    FT_RETURN_IF_ERROR(WriteSecret(base + ".token", hex + "\n"));
    absl::StrAppend(&tokens, w, " ", dhex, "\n");
    rep.files.insert(rep.files.end(), {base + ".pem", base + ".key", base + ".token"});
  }
  FT_RETURN_IF_ERROR(WriteSecret(o.dir + "/tokens.sha256", tokens));
  rep.files.push_back(o.dir + "/tokens.sha256");
  return rep;
}

absl::StatusOr<std::string> VerifyCertificate(const std::string& ca_pem, const std::string& cert_pem) {
  Bio cb(BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size())));
  Bio eb(BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size())));
  X509Ptr ca(PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr)), cert(PEM_read_bio_X509(eb.get(), nullptr, nullptr, nullptr));
  if (!ca || !cert) return absl::InvalidArgumentError("not a PEM certificate");
  std::unique_ptr<X509_STORE, Deleter<X509_STORE, X509_STORE_free>> store(X509_STORE_new());
  std::unique_ptr<X509_STORE_CTX, Deleter<X509_STORE_CTX, X509_STORE_CTX_free>> ctx(X509_STORE_CTX_new());
  FT_RETURN_IF_ERROR(Ossl(store && ctx && X509_STORE_add_cert(store.get(), ca.get()) == 1 &&
                              X509_STORE_CTX_init(ctx.get(), store.get(), cert.get(), nullptr) == 1,
                          "verify setup"));
  if (X509_verify_cert(ctx.get()) != 1)
    return absl::PermissionDeniedError(absl::StrCat("certificate does not verify: ", X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get()))));
  char cn[256] = {};
  X509_NAME_get_text_by_NID(X509_get_subject_name(cert.get()), NID_commonName, cn, sizeof cn);
  return std::string(cn);
}

absl::Status Revoke(const std::string& dir, const std::string& name) {
  if (!ValidName(name)) return absl::InvalidArgumentError(absl::StrCat("revoke: bad worker name '", name, "'"));
  const std::string tokens_path = dir + "/tokens.sha256", revoked_path = dir + "/revoked.txt";
  FT_ASSIGN_OR_RETURN(std::string tokens, ReadFileToString(tokens_path));
  std::string kept, line;
  bool found = false;
  std::istringstream in(tokens);
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string n;
    ls >> n;
    if (n == name) {
      found = true;
      continue;
    }
    if (!line.empty()) kept += line + "\n";
  }
  std::string revoked;
  if (auto r = ReadFileToString(revoked_path); r.ok()) revoked = *r;
  std::istringstream rs(revoked);
  std::string n;
  bool listed = false;
  while (rs >> n) listed = listed || n == name;
  if (!found && !listed) return absl::NotFoundError(absl::StrCat("revoke: no worker '", name, "' in ", tokens_path));
  if (!listed) FT_RETURN_IF_ERROR(WriteFileAtomic(revoked_path, revoked + name + "\n"));
  return WriteSecret(tokens_path, kept);
}

}  // namespace fedtune::coordinator

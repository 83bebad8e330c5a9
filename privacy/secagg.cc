#include "privacy/secagg.h"

#include <set>

#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/rng.h"

namespace fedtune::privacy::secagg {
namespace {

struct PkeyDeleter {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct PkeyCtxDeleter {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
struct CipherCtxDeleter {
  void operator()(EVP_CIPHER_CTX* p) const { EVP_CIPHER_CTX_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyDeleter>;
using PkeyCtx = std::unique_ptr<EVP_PKEY_CTX, PkeyCtxDeleter>;
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxDeleter>;

absl::Status Ossl(bool ok, const char* what) { return ok ? absl::OkStatus() : absl::InternalError(absl::StrCat("OpenSSL: ", what)); }

absl::StatusOr<std::pair<Key32, Key32>> NewX25519() {  // (private, public)
  PkeyCtx ctx(EVP_PKEY_CTX_new_id(EVP_PKEY_X25519, nullptr));
  EVP_PKEY* raw = nullptr;
  FT_RETURN_IF_ERROR(Ossl(ctx && EVP_PKEY_keygen_init(ctx.get()) == 1 && EVP_PKEY_keygen(ctx.get(), &raw) == 1, "X25519 keygen"));
  Pkey key(raw);
  Key32 sk{}, pk{};
  size_t n = 32, m = 32;
  FT_RETURN_IF_ERROR(Ossl(EVP_PKEY_get_raw_private_key(key.get(), sk.data(), &n) == 1 &&
                              EVP_PKEY_get_raw_public_key(key.get(), pk.data(), &m) == 1, "X25519 raw key"));
  return std::make_pair(sk, pk);
}

absl::StatusOr<Key32> PublicFromPrivate(const Key32& sk) {
  Pkey key(EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, sk.data(), sk.size()));
  Key32 pk{};
  size_t n = 32;
  FT_RETURN_IF_ERROR(Ossl(key && EVP_PKEY_get_raw_public_key(key.get(), pk.data(), &n) == 1, "X25519 public key"));
  return pk;
}

// HKDF-SHA256(ECDH(sk, pk), info) -> 32 bytes. Symmetric in the two parties.
absl::StatusOr<Key32> Agree(const Key32& sk, const Key32& pk, const char* info) {
  Pkey priv(EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, sk.data(), sk.size()));
  Pkey pub(EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, pk.data(), pk.size()));
  if (!priv || !pub) return absl::InvalidArgumentError("secagg: malformed X25519 key");
  PkeyCtx ctx(EVP_PKEY_CTX_new(priv.get(), nullptr));
  uint8_t shared[32];
  size_t len = sizeof shared;
  FT_RETURN_IF_ERROR(Ossl(ctx && EVP_PKEY_derive_init(ctx.get()) == 1 && EVP_PKEY_derive_set_peer(ctx.get(), pub.get()) == 1 &&
                              EVP_PKEY_derive(ctx.get(), shared, &len) == 1, "X25519 derive"));
  PkeyCtx kdf(EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr));
  Key32 out{};
  size_t out_len = out.size();
  FT_RETURN_IF_ERROR(Ossl(kdf && EVP_PKEY_derive_init(kdf.get()) == 1 && EVP_PKEY_CTX_set_hkdf_md(kdf.get(), EVP_sha256()) == 1 &&
                              EVP_PKEY_CTX_set1_hkdf_key(kdf.get(), shared, static_cast<int>(len)) == 1 &&
                              EVP_PKEY_CTX_add1_hkdf_info(kdf.get(), reinterpret_cast<const unsigned char*>(info), static_cast<int>(std::strlen(info))) == 1 &&
                              EVP_PKEY_derive(kdf.get(), out.data(), &out_len) == 1,
                          "HKDF"));
  return out;
}

Key32 Sha256(const Key32& x) {
  Key32 h{};
  SHA256(x.data(), x.size(), h.data());
  return h;
}

void PutShare(std::vector<uint8_t>& buf, const Share& s) {
  const size_t at = buf.size();
  buf.resize(at + 4 + 8 * kShamirLimbs);
  std::memcpy(buf.data() + at, &s.x, 4);
  std::memcpy(buf.data() + at + 4, s.y.data(), 8 * kShamirLimbs);
}
Share GetShare(const uint8_t* p) {
  Share s;
  std::memcpy(&s.x, p, 4);
  std::memcpy(s.y.data(), p + 4, 8 * kShamirLimbs);
  return s;
}
constexpr size_t kShareBytes = 4 + 8 * kShamirLimbs;

absl::StatusOr<std::vector<uint8_t>> Seal(const Key32& key, int from, int to, const std::vector<uint8_t>& plain) {
  std::vector<uint8_t> out(12 + plain.size() + 16);
  FT_RETURN_IF_ERROR(Ossl(RAND_bytes(out.data(), 12) == 1, "RAND_bytes"));
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  const int32_t aad[2] = {from, to};
  int n = 0;
  FT_RETURN_IF_ERROR(Ossl(ctx && EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, key.data(), out.data()) == 1 &&
                              EVP_EncryptUpdate(ctx.get(), nullptr, &n, reinterpret_cast<const uint8_t*>(aad), sizeof aad) == 1 &&
                              EVP_EncryptUpdate(ctx.get(), out.data() + 12, &n, plain.data(), static_cast<int>(plain.size())) == 1 &&
                              EVP_EncryptFinal_ex(ctx.get(), out.data() + 12 + n, &n) == 1 &&
                              EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, 16, out.data() + 12 + plain.size()) == 1,
                          "AES-GCM seal"));
  return out;
}

absl::StatusOr<std::vector<uint8_t>> Open(const Key32& key, int from, int to, const std::vector<uint8_t>& sealed) {
  if (sealed.size() < 28) return absl::DataLossError(absl::StrCat("secagg: share from client ", from, " is truncated"));
  const size_t len = sealed.size() - 28;
  std::vector<uint8_t> plain(len);
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  const int32_t aad[2] = {from, to};
  int n = 0;
  std::vector<uint8_t> tag(sealed.end() - 16, sealed.end());
  const bool ok = ctx && EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, key.data(), sealed.data()) == 1 &&
                  EVP_DecryptUpdate(ctx.get(), nullptr, &n, reinterpret_cast<const uint8_t*>(aad), sizeof aad) == 1 &&
                  EVP_DecryptUpdate(ctx.get(), plain.data(), &n, sealed.data() + 12, static_cast<int>(len)) == 1 &&
                  EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, 16, tag.data()) == 1 &&
                  EVP_DecryptFinal_ex(ctx.get(), plain.data() + n, &n) == 1;
  if (!ok) return absl::DataLossError(absl::StrCat("secagg: share from client ", from, " to ", to, " failed authentication (tampered)"));
  return plain;
}

void AddPrg(std::vector<uint32_t>& y, const Key32& seed, bool subtract) {
  const std::vector<uint32_t> m = Prg(seed, y.size());
  for (size_t i = 0; i < y.size(); ++i) y[i] = subtract ? y[i] - m[i] : y[i] + m[i];
}

}  // namespace

struct Client::Keys {
  Key32 enc_sk{}, enc_pk{}, mask_sk{}, mask_pk{}, b{};
};

int EffectiveDegree(const Config& c) {
  const int n = c.num_clients;
  return (c.degree <= 0 || c.degree >= n - 1) ? n - 1 : c.degree;
}

int EffectiveThreshold(const Config& c) { return c.threshold > 0 ? c.threshold : (EffectiveDegree(c) + 1) / 2 + 1; }

absl::Status Validate(const Config& c) {
  if (c.num_clients < 2) return absl::InvalidArgumentError("secagg: need at least 2 clients");
  const int k = EffectiveDegree(c);
  if (k < c.num_clients - 1 && k % 2) return absl::InvalidArgumentError("secagg: degree must be even");
  const int t = EffectiveThreshold(c);
  // Above half of each neighbourhood (k + 1 share holders): two disjoint groups of t holders
  // cannot exist, so a server cannot collect a mask-key reconstruction from one group and a
  // self-mask reconstruction of the same client from another.
  const int t_min = std::max(2, (k + 1) / 2 + 1);
  if (t < t_min || t > k + 1)
    return absl::InvalidArgumentError(absl::StrCat("secagg: threshold ", t, " must be in [", t_min, ", ", k + 1, "] (above half of the ", k + 1,
                                                   " share holders)"));
  if (c.precision_bits < 1 || std::ldexp(static_cast<double>(c.num_clients), c.precision_bits) >= 4294967296.0)
    return absl::InvalidArgumentError(absl::StrCat("secagg: ", c.num_clients, " clients x 2^", c.precision_bits, " overflows 2^32"));
  if (!(c.clip_range > 0) || c.vector_length == 0) return absl::InvalidArgumentError("secagg: clip_range and vector_length must be > 0");
  return absl::OkStatus();
}

std::vector<int> Neighbours(const Config& c, int id) {
  const int n = c.num_clients, k = EffectiveDegree(c);
  std::vector<int> out;
  if (k >= n - 1) {
    for (int v = 0; v < n; ++v)
      if (v != id) out.push_back(v);
    return out;
  }
  std::vector<int> perm(static_cast<size_t>(n)), pos(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) perm[static_cast<size_t>(i)] = i;
  Rng rng(c.graph_seed);  // public randomness: everyone derives the same graph
  for (size_t i = perm.size(); i > 1; --i) std::swap(perm[i - 1], perm[rng.Below(i)]);
  for (int i = 0; i < n; ++i) pos[static_cast<size_t>(perm[static_cast<size_t>(i)])] = i;
  const int p = pos[static_cast<size_t>(id)];
  for (int j = 1; j <= k / 2; ++j) {
    out.push_back(perm[static_cast<size_t>((p + j) % n)]);
    out.push_back(perm[static_cast<size_t>((p - j + n) % n)]);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::vector<uint32_t> Prg(const Key32& seed, size_t n) {
  std::vector<uint32_t> out(n, 0);
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  const uint8_t iv[16] = {};
  int len = 0;
  FT_CHECK(ctx && EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_ctr(), nullptr, seed.data(), iv) == 1);
  uint8_t* p = reinterpret_cast<uint8_t*>(out.data());
  FT_CHECK(EVP_EncryptUpdate(ctx.get(), p, &len, p, static_cast<int>(n * sizeof(uint32_t))) == 1);
  return out;
}

uint32_t Encode(float x, double clip, int bits, double u) {
  const double scale = std::ldexp(1.0, bits) / (2 * clip);
  const double v = (std::clamp(static_cast<double>(x), -clip, clip) + clip) * scale;
  const double f = std::floor(v);
  return static_cast<uint32_t>(f + (u < v - f ? 1.0 : 0.0));
}

double DecodeSum(uint32_t s, int count, double clip, int bits) { return static_cast<double>(s) * (2 * clip) / std::ldexp(1.0, bits) - count * clip; }

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const Config& c, int id) {
  FT_RETURN_IF_ERROR(Validate(c));
  if (id < 0 || id >= c.num_clients) return absl::InvalidArgumentError("secagg: client id out of range");
  std::unique_ptr<Client> cl(new Client(c, id));
  cl->k_ = std::make_unique<Keys>();
  FT_ASSIGN_OR_RETURN(auto enc, NewX25519());
  FT_ASSIGN_OR_RETURN(auto mask, NewX25519());
  cl->k_->enc_sk = enc.first;
  cl->k_->enc_pk = enc.second;
  cl->k_->mask_sk = mask.first;
  cl->k_->mask_pk = mask.second;
  FT_RETURN_IF_ERROR(Ossl(RAND_bytes(cl->k_->b.data(), 32) == 1, "RAND_bytes"));
  return cl;
}

Client::Client(const Config& c, int id) : c_(c), id_(id) {}

Client::~Client() {
  if (k_) OPENSSL_cleanse(k_.get(), sizeof(Keys));
}

PublicKeys Client::Advertise() const { return {id_, k_->enc_pk, k_->mask_pk, Sha256(k_->b)}; }

absl::StatusOr<std::vector<EncryptedShare>> Client::ShareKeys(const std::vector<PublicKeys>& neighbour_keys) {
  const std::vector<int> nb = Neighbours(c_, id_);
  for (const PublicKeys& k : neighbour_keys) {
    if (!std::binary_search(nb.begin(), nb.end(), k.id)) return absl::InvalidArgumentError(absl::StrCat("secagg: client ", k.id, " is not a neighbour of ", id_));
    peers_[k.id] = k;
  }
  const int t = EffectiveThreshold(c_);
  // Holders: the live neighbours and this client (x = id + 1).
  std::vector<uint32_t> xs = {static_cast<uint32_t>(id_ + 1)};
  for (const auto& [v, k] : peers_) xs.push_back(static_cast<uint32_t>(v + 1));
  if (static_cast<int>(xs.size()) < t)
    return absl::FailedPreconditionError(absl::StrCat("secagg: client ", id_, " has ", xs.size(), " live share holders, fewer than the threshold ", t));
  Secret32 sk, b;
  std::copy(k_->mask_sk.begin(), k_->mask_sk.end(), sk.begin());
  std::copy(k_->b.begin(), k_->b.end(), b.begin());
  FT_ASSIGN_OR_RETURN(std::vector<Share> sk_shares, ShamirSplit(sk, t, xs));
  FT_ASSIGN_OR_RETURN(std::vector<Share> b_shares, ShamirSplit(b, t, xs));
  held_[id_] = {sk_shares[0], b_shares[0]};
  std::vector<EncryptedShare> out;
  size_t i = 1;
  for (const auto& [v, k] : peers_) {
    std::vector<uint8_t> plain;
    PutShare(plain, sk_shares[i]);
    PutShare(plain, b_shares[i]);
    ++i;
    FT_ASSIGN_OR_RETURN(Key32 key, Agree(k_->enc_sk, k.enc_pk, "fedtune secagg share encryption"));
    FT_ASSIGN_OR_RETURN(auto sealed, Seal(key, id_, v, plain));
    out.push_back({id_, v, std::move(sealed)});
  }
  return out;
}

absl::StatusOr<std::vector<uint32_t>> Client::MaskedInput(std::span<const float> x, const std::vector<EncryptedShare>& received, NoiseSource& rounding) {
  if (x.size() != c_.vector_length) return absl::InvalidArgumentError(absl::StrCat("secagg: input has ", x.size(), " values, expected ", c_.vector_length));
  if (sent_input_) return absl::FailedPreconditionError("secagg: masked input already sent in this round");
  // Enough live neighbours must hold our shares: with fewer than t - 1 relayed shares the
  // server could reconstruct both of our seeds from the few holders it controls. Abort instead.
  const int t = EffectiveThreshold(c_);
  if (static_cast<int>(received.size()) < t - 1)
    return absl::FailedPreconditionError(absl::StrCat("secagg: only ", received.size(), " shares received, fewer than t - 1 = ", t - 1, "; aborting"));
  std::set<int> senders;
  for (const EncryptedShare& e : received) {
    auto it = peers_.find(e.from);
    if (e.to != id_ || it == peers_.end()) return absl::InvalidArgumentError(absl::StrCat("secagg: unexpected share from ", e.from));
    if (!senders.insert(e.from).second) return absl::InvalidArgumentError(absl::StrCat("secagg: two shares relayed from ", e.from));
    FT_ASSIGN_OR_RETURN(Key32 key, Agree(k_->enc_sk, it->second.enc_pk, "fedtune secagg share encryption"));
    FT_ASSIGN_OR_RETURN(auto plain, Open(key, e.from, id_, e.ciphertext));
    if (plain.size() != 2 * kShareBytes) return absl::DataLossError(absl::StrCat("secagg: share from ", e.from, " has the wrong size"));
    held_[e.from] = {GetShare(plain.data()), GetShare(plain.data() + kShareBytes)};
  }
  std::vector<uint32_t> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = Encode(x[i], c_.clip_range, c_.precision_bits, rounding.Uniform());
  AddPrg(y, k_->b, false);
  // Pairwise masks with every neighbour that received our shares (those that are still live).
  for (const auto& [v, k] : peers_) {
    if (!held_.count(v)) continue;  // v dropped before sharing with us: no mask with v
    FT_ASSIGN_OR_RETURN(Key32 s, Agree(k_->mask_sk, k.mask_pk, "fedtune secagg pairwise mask"));
    AddPrg(y, s, v < id_);
  }
  sent_input_ = true;
  return y;
}

absl::StatusOr<UnmaskReply> Client::Unmask(const std::vector<int>& dropped, const std::vector<int>& survivors) {
  if (!sent_input_) return absl::FailedPreconditionError("secagg: unmask before masked input");
  // One unmask reply per round: a server asking again (say, with a client first as dropped, then
  // as a survivor) could collect both its mask-key and self-mask shares and unmask its input.
  if (unmasked_) return absl::PermissionDeniedError("secagg: already answered an unmask request this round; refusing a second");
  if (std::find(survivors.begin(), survivors.end(), id_) == survivors.end())
    return absl::PermissionDeniedError("secagg: unmask request that does not list this client as a survivor");
  // Fewer survivors than the threshold: their sum could expose single inputs. Refuse. (Distinct
  // ids of this round only: a list repeating an id must not pass for a larger one.)
  std::set<int> distinct;
  for (int v : survivors)
    if (v >= 0 && v < c_.num_clients) distinct.insert(v);
  if (static_cast<int>(distinct.size()) < EffectiveThreshold(c_))
    return absl::PermissionDeniedError(absl::StrCat("secagg: only ", distinct.size(), " distinct survivors, fewer than the threshold; refusing to unmask"));
  for (int v : dropped)
    if (std::find(survivors.begin(), survivors.end(), v) != survivors.end())
      return absl::PermissionDeniedError(absl::StrCat("secagg: client ", v, " listed as both dropped and surviving; refusing to reveal"));
  unmasked_ = true;
  UnmaskReply r;
  r.from = id_;
  for (int v : dropped)
    if (auto it = held_.find(v); it != held_.end() && v != id_) r.mask_key_shares[v] = it->second.first;
  for (int v : survivors)
    if (auto it = held_.find(v); it != held_.end()) r.self_mask_shares[v] = it->second.second;
  return r;
}

absl::Status Server::ReceiveKeys(const PublicKeys& k) {
  if (k.id < 0 || k.id >= c_.num_clients) return absl::InvalidArgumentError("secagg: key from unknown client");
  if (!keys_.emplace(k.id, k).second) return absl::AlreadyExistsError(absl::StrCat("secagg: client ", k.id, " advertised twice"));
  return absl::OkStatus();
}

std::vector<PublicKeys> Server::KeysFor(int id) const {
  std::vector<PublicKeys> out;
  for (int v : Neighbours(c_, id))
    if (auto it = keys_.find(v); it != keys_.end()) out.push_back(it->second);
  return out;
}

absl::Status Server::ReceiveShares(int from, const std::vector<EncryptedShare>& shares) {
  if (!keys_.count(from)) return absl::FailedPreconditionError(absl::StrCat("secagg: shares from client ", from, " who sent no keys"));
  for (const EncryptedShare& e : shares) {
    if (e.from != from) return absl::InvalidArgumentError("secagg: share sender mismatch");
    shares_[e.to].push_back(e);
  }
  shared_.insert(from);
  return absl::OkStatus();
}

std::vector<EncryptedShare> Server::SharesFor(int id) const {
  std::vector<EncryptedShare> out;
  if (auto it = shares_.find(id); it != shares_.end())
    for (const EncryptedShare& e : it->second)
      if (shared_.count(e.from)) out.push_back(e);
  return out;
}

absl::Status Server::ReceiveMasked(int from, std::vector<uint32_t> y) {
  if (!shared_.count(from)) return absl::FailedPreconditionError(absl::StrCat("secagg: masked input from client ", from, " who shared no keys"));
  if (y.size() != c_.vector_length) return absl::InvalidArgumentError(absl::StrCat("secagg: masked input from ", from, " has the wrong length"));
  if (!received_.insert(from).second) return absl::AlreadyExistsError(absl::StrCat("secagg: second masked input from ", from));
  if (sum_.empty()) sum_.assign(c_.vector_length, 0);
  for (size_t i = 0; i < sum_.size(); ++i) sum_[i] += y[i];
  return absl::OkStatus();
}

std::vector<int> Server::Dropped() const {
  std::vector<int> d;
  for (int v : shared_)
    if (!received_.count(v)) d.push_back(v);
  return d;
}

std::vector<int> Server::Survivors() const {
  std::vector<int> s;
  return {received_.begin(), received_.end()};
  return s;
}

absl::Status Server::ReceiveUnmask(const UnmaskReply& r) {
  if (!received_.count(r.from)) return absl::FailedPreconditionError(absl::StrCat("secagg: unmask reply from non-survivor ", r.from));
  for (const auto& [owner, s] : r.mask_key_shares) mask_key_shares_[owner][r.from] = s;
  for (const auto& [owner, s] : r.self_mask_shares) self_mask_shares_[owner][r.from] = s;
  return absl::OkStatus();
}

absl::StatusOr<Key32> Server::Reconstruct(int owner, const std::vector<Share>& shares, bool mask_key, std::vector<std::string>* tampered) const {
  const int t = EffectiveThreshold(c_);
  const PublicKeys& pk = keys_.at(owner);
  auto verify = [&](const std::vector<Share>& subset) -> absl::StatusOr<Key32> {
    FT_ASSIGN_OR_RETURN(Secret32 s, ShamirCombine(subset));
    Key32 k;
    std::copy(s.begin(), s.end(), k.begin());
    if (mask_key) {
      FT_ASSIGN_OR_RETURN(Key32 pub, PublicFromPrivate(k));
      if (pub != pk.mask_pk) return absl::DataLossError("mask key does not match its public key");
    } else if (Sha256(k) != pk.b_commitment) {
      return absl::DataLossError("self-mask seed does not match its commitment");
    }
    return k;
  };
  if (static_cast<int>(shares.size()) < t)
    return absl::FailedPreconditionError(absl::StrCat("secagg: only ", shares.size(), " shares for client ", owner, ", threshold ", t));
  std::vector<Share> first(shares.begin(), shares.begin() + t);
  if (auto k = verify(first); k.ok()) {
    for (size_t i = static_cast<size_t>(t); i < shares.size(); ++i)
      if (!ShamirConsistent(first, shares[i]))
        tampered->push_back(absl::StrCat("share of client ", owner, "'s ", mask_key ? "mask key" : "self-mask seed", " held by client ", shares[i].x - 1, " is inconsistent"));
    return k;
  }
  // Search t-subsets (small: the holders are a neighbourhood) for one that verifies, within a
  // bound (a flood of bad shares must not make the server spend unbounded time).
  const size_t n = shares.size();
  std::vector<bool> pick(n, false);
  std::fill(pick.begin(), pick.begin() + t, true);
  int tries = 0;
  do {
    if (++tries > 20000) break;
    std::vector<Share> subset;
    for (size_t i = 0; i < n; ++i)
      if (pick[i]) subset.push_back(shares[i]);
    if (auto k = verify(subset); k.ok()) {
      for (size_t i = 0; i < n; ++i)
        if (!pick[i] && !ShamirConsistent(subset, shares[i]))
          tampered->push_back(absl::StrCat("share of client ", owner, "'s ", mask_key ? "mask key" : "self-mask seed", " held by client ", shares[i].x - 1, " is tampered"));
      return k;
    }
  } while (std::prev_permutation(pick.begin(), pick.end()));
  return absl::DataLossError(absl::StrCat("secagg: no consistent set of ", t, " shares for client ", owner, " (too many tampered shares)"));
}

absl::StatusOr<Result> Server::Finish() {
  Result res;
  res.survivors = Survivors();
  if (static_cast<int>(res.survivors.size()) < EffectiveThreshold(c_))
    return absl::FailedPreconditionError(absl::StrCat("secagg: ", res.survivors.size(), " survivors, fewer than the threshold"));
  std::vector<uint32_t> sum = sum_;
  auto collect = [](const std::map<int, std::map<int, Share>>& all, int owner) {
    std::vector<Share> v;
    if (auto it = all.find(owner); it != all.end())
      for (const auto& [holder, s] : it->second) v.push_back(s);
    return v;
  };
  // Survivors' self masks.
  for (int u : res.survivors) {
    FT_ASSIGN_OR_RETURN(Key32 b, Reconstruct(u, collect(self_mask_shares_, u), false, &res.tampered));
    AddPrg(sum, b, true);
  }
  // Dropped clients' pairwise masks with surviving neighbours that had their shares.
  for (int d : Dropped()) {
    FT_ASSIGN_OR_RETURN(Key32 sk, Reconstruct(d, collect(mask_key_shares_, d), true, &res.tampered));
    for (int u : Neighbours(c_, d)) {
      if (!received_.count(u)) continue;
      // u added +PRG(s_ud) when d > u, and -PRG(s_ud) when d < u: undo it.
      FT_ASSIGN_OR_RETURN(Key32 s, Agree(sk, keys_.at(u).mask_pk, "fedtune secagg pairwise mask"));
      AddPrg(sum, s, d > u);
    }
  }
  res.sum.resize(sum.size());
  for (size_t i = 0; i < sum.size(); ++i)
    res.sum[i] = DecodeSum(sum[i], static_cast<int>(res.survivors.size()), c_.clip_range, c_.precision_bits);
  return res;
}

}  // namespace fedtune::privacy::secagg

// Secure aggregation (Bonawitz et al. 2017, arXiv 1611.04482) with the sparse neighbour graph of
// SecAgg+ (Bell et al. 2020, arXiv 2006.05459), all cryptography from OpenSSL:
//   keys: X25519 pairs for share encryption and for masking; pairwise seeds are
//     HKDF-SHA256(ECDH) and expand by AES-256-CTR (not Flower's MT19937);
//   masking: y_u = enc(x_u) + PRG(b_u) + sum_{v in N(u), v > u} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv)  (mod 2^32);
//   shares: Shamir t-of-(k+1) shares (privacy/shamir.h) of the mask private key and of b_u go to
//     the neighbours, encrypted with AES-256-GCM (key from the encryption ECDH, AAD = sender and
//     recipient);
//   dropout recovery: survivors reveal shares of dropped neighbours' mask keys and of surviving
//     neighbours' b, never both for one client;
//   tamper detection (our addition): each client commits to SHA-256(b) with its public keys; the
//     server checks every reconstruction (b against its commitment, a mask key against its public
//     key), and when one fails searches the shares for a consistent t-subset, names the client
//     whose share does not fit, and goes on with the consistent ones.
// Fixed point (as Flower): clip to [-c, c], stochastic rounding to (x + c) 2^bits / (2c), sums mod
// 2^32, which requires n 2^bits < 2^32.
// The neighbour graph is a Harary graph over a permutation drawn from a public seed: client i is
// joined to the k/2 clients on each side of it in the permuted ring (k = n - 1: everyone).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "privacy/noise.h"
#include "privacy/shamir.h"

namespace fedtune::privacy::secagg {

struct Config {
  int num_clients = 0;
  int degree = 0;          // k, even; 0 or >= n-1: complete graph (plain SecAgg)
  int threshold = 0;       // t of the k+1 share holders; 0: floor((k+1)/2) + 1
  double clip_range = 8.0;
  int precision_bits = 22;
  uint64_t graph_seed = 1;
  size_t vector_length = 0;
};
absl::Status Validate(const Config& c);
int EffectiveDegree(const Config& c);
int EffectiveThreshold(const Config& c);
std::vector<int> Neighbours(const Config& c, int id);  // sorted, excluding id

using Key32 = std::array<uint8_t, 32>;

struct PublicKeys {
  int id = 0;
  Key32 enc_pk{}, mask_pk{}, b_commitment{};
};

struct EncryptedShare {
  int from = 0, to = 0;
  std::vector<uint8_t> ciphertext;  // nonce (12) || AES-256-GCM(shares) || tag (16)
};

struct UnmaskReply {
  int from = 0;
  std::map<int, Share> mask_key_shares;  // owner (dropped) -> share
  std::map<int, Share> self_mask_shares;  // owner (survivor) -> share
};

class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Create(const Config& c, int id);
  ~Client();
  PublicKeys Advertise() const;
  // Keys of this client's neighbours (as relayed by the server); missing ones have dropped out.
  absl::StatusOr<std::vector<EncryptedShare>> ShareKeys(const std::vector<PublicKeys>& neighbour_keys);
  // `received`: the encrypted shares addressed to this client. `rounding` draws the stochastic
  // rounding (a CSPRNG stream).
  absl::StatusOr<std::vector<uint32_t>> MaskedInput(std::span<const float> x, const std::vector<EncryptedShare>& received,
                                                    NoiseSource& rounding);
  absl::StatusOr<UnmaskReply> Unmask(const std::vector<int>& dropped, const std::vector<int>& survivors);
  int id() const { return id_; }

 private:
  Client(const Config& c, int id);
  struct Keys;
  Config c_;
  int id_;
  std::unique_ptr<Keys> k_;
  std::map<int, PublicKeys> peers_;
  std::map<int, std::pair<Share, Share>> held_;  // owner -> (mask key share, b share)
  bool sent_input_ = false;
  bool unmasked_ = false;
};

struct Result {
  std::vector<double> sum;  // decoded sum over the survivors
  std::vector<int> survivors;
  std::vector<std::string> tampered;  // one line per detected bad share
};

class Server {
 public:
  explicit Server(const Config& c) : c_(c) {}
  absl::Status ReceiveKeys(const PublicKeys& k);
  std::vector<PublicKeys> KeysFor(int id) const;
  absl::Status ReceiveShares(int from, const std::vector<EncryptedShare>& shares);
  std::vector<EncryptedShare> SharesFor(int id) const;
  absl::Status ReceiveMasked(int from, std::vector<uint32_t> y);
  // After the masked-input deadline: who dropped (shared keys but sent no input), who survived.
  std::vector<int> Dropped() const;
  std::vector<int> Survivors() const;
  absl::Status ReceiveUnmask(const UnmaskReply& r);
  absl::StatusOr<Result> Finish();

 private:
  absl::StatusOr<Key32> Reconstruct(int owner, const std::vector<Share>& shares, bool mask_key, std::vector<std::string>* tampered) const;
  Config c_;
  std::map<int, PublicKeys> keys_;
  std::map<int, std::vector<EncryptedShare>> shares_;  // by recipient
  std::set<int> shared_;    // clients that completed ShareKeys
  std::set<int> received_;  // clients whose masked input is in sum_ (streamed: no per-client copy)
  std::vector<uint32_t> sum_;
  std::map<int, std::map<int, Share>> mask_key_shares_, self_mask_shares_;  // owner -> holder -> share
};

// PRG(seed) of `n` words: AES-256-CTR keystream.
std::vector<uint32_t> Prg(const Key32& seed, size_t n);
// Fixed-point codec.
uint32_t Encode(float x, double clip, int bits, double u);  // u uniform in [0, 1)
double DecodeSum(uint32_t s, int count, double clip, int bits);

}  // namespace fedtune::privacy::secagg

#include "privacy/shamir.h"

#include <openssl/rand.h>

#include <set>

#include "absl/strings/str_cat.h"

namespace fedtune::privacy {
namespace {

__extension__ typedef unsigned __int128 u128;

uint64_t Reduce(u128 v) {  // mod 2^61 - 1
  uint64_t lo = static_cast<uint64_t>(v & kShamirPrime), hi = static_cast<uint64_t>(v >> 61);
  uint64_t r = lo + hi;
  r = (r & kShamirPrime) + (r >> 61);
  return r >= kShamirPrime ? r - kShamirPrime : r;
}
uint64_t Mul(uint64_t a, uint64_t b) { return Reduce(static_cast<u128>(a) * b); }
uint64_t Add(uint64_t a, uint64_t b) { return Reduce(static_cast<u128>(a) + b); }
uint64_t Sub(uint64_t a, uint64_t b) { return Add(a, kShamirPrime - b); }
uint64_t Pow(uint64_t a, uint64_t e) {
  uint64_t r = 1;
  for (; e; e >>= 1, a = Mul(a, a))
    if (e & 1) r = Mul(r, a);
  return r;
}
uint64_t Inv(uint64_t a) { return Pow(a, kShamirPrime - 2); }

uint64_t RandomField() {
  for (;;) {
    uint64_t v = 0;
    FT_CHECK(RAND_bytes(reinterpret_cast<uint8_t*>(&v), sizeof v) == 1);
    v &= kShamirPrime;
    if (v < kShamirPrime) return v;
  }
}

std::array<uint64_t, kShamirLimbs> ToLimbs(const Secret32& s) {
  std::array<uint8_t, 35> padded{};
  std::copy(s.begin(), s.end(), padded.begin());
  std::array<uint64_t, kShamirLimbs> l{};
  for (int i = 0; i < kShamirLimbs; ++i)
    for (int b = 0; b < 7; ++b) l[static_cast<size_t>(i)] |= static_cast<uint64_t>(padded[static_cast<size_t>(i * 7 + b)]) << (8 * b);
  return l;
}

// Lagrange basis at `at` for the x's of `shares`.
std::vector<uint64_t> Lagrange(const std::vector<Share>& shares, uint64_t at) {
  std::vector<uint64_t> w(shares.size());
  for (size_t i = 0; i < shares.size(); ++i) {
    uint64_t num = 1, den = 1;
    for (size_t j = 0; j < shares.size(); ++j) {
      if (i == j) continue;
      num = Mul(num, Sub(at, shares[j].x));
      den = Mul(den, Sub(shares[i].x, shares[j].x));
    }
    w[i] = Mul(num, Inv(den));
  }
  return w;
}

}  // namespace

absl::StatusOr<std::vector<Share>> ShamirSplit(const Secret32& secret, int t, const std::vector<uint32_t>& xs) {
  if (t < 1 || static_cast<size_t>(t) > xs.size())
    return absl::InvalidArgumentError(absl::StrCat("Shamir threshold ", t, " must be in [1, ", xs.size(), "]"));
  std::set<uint32_t> seen;
  for (uint32_t x : xs)
    if (x == 0 || !seen.insert(x).second) return absl::InvalidArgumentError("Shamir holders must be distinct and >= 1");
  const auto limbs = ToLimbs(secret);
  std::vector<Share> shares(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) shares[i].x = xs[i];
  for (int l = 0; l < kShamirLimbs; ++l) {
    std::vector<uint64_t> coef(static_cast<size_t>(t));
    coef[0] = limbs[static_cast<size_t>(l)];
    for (int k = 1; k < t; ++k) coef[static_cast<size_t>(k)] = RandomField();
    for (Share& s : shares) {
      uint64_t y = 0;
      for (int k = t - 1; k >= 0; --k) y = Add(Mul(y, s.x), coef[static_cast<size_t>(k)]);  // Horner
      s.y[static_cast<size_t>(l)] = y;
    }
  }
  return shares;
}

absl::StatusOr<Secret32> ShamirCombine(const std::vector<Share>& shares) {
  if (shares.empty()) return absl::InvalidArgumentError("no shares");
  std::set<uint32_t> seen;
  for (const Share& s : shares)
    if (s.x == 0 || !seen.insert(s.x).second) return absl::InvalidArgumentError("shares must have distinct x >= 1");
  const std::vector<uint64_t> w = Lagrange(shares, 0);
  std::array<uint8_t, 35> padded{};
  for (int l = 0; l < kShamirLimbs; ++l) {
    uint64_t v = 0;
    for (size_t i = 0; i < shares.size(); ++i) v = Add(v, Mul(w[i], shares[i].y[static_cast<size_t>(l)] % kShamirPrime));
    if (v >> 56) return absl::DataLossError("Shamir reconstruction is not a valid secret (tampered or inconsistent shares)");
    for (int b = 0; b < 7; ++b) padded[static_cast<size_t>(l * 7 + b)] = static_cast<uint8_t>(v >> (8 * b));
  }
  if (padded[32] || padded[33] || padded[34]) return absl::DataLossError("Shamir reconstruction is not a valid secret (tampered or inconsistent shares)");
  Secret32 s;
  std::copy(padded.begin(), padded.begin() + 32, s.begin());
  return s;
}

bool ShamirConsistent(const std::vector<Share>& basis, const Share& s) {
  const std::vector<uint64_t> w = Lagrange(basis, s.x);
  for (int l = 0; l < kShamirLimbs; ++l) {
    uint64_t v = 0;
    for (size_t i = 0; i < basis.size(); ++i) v = Add(v, Mul(w[i], basis[i].y[static_cast<size_t>(l)] % kShamirPrime));
    if (v != s.y[static_cast<size_t>(l)] % kShamirPrime) return false;
  }
  return true;
}

}  // namespace fedtune::privacy

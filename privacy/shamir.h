// Shamir t-of-n secret sharing of 32-byte secrets over GF(2^61 - 1): the secret is cut into five
// 7-byte limbs, each shared by its own random polynomial of degree t-1 (coefficients from
// OpenSSL's CSPRNG). Share x-coordinates are the holders' 1-based indices.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "common/status.h"

namespace fedtune::privacy {

constexpr uint64_t kShamirPrime = (1ull << 61) - 1;
constexpr int kShamirLimbs = 5;
using Secret32 = std::array<uint8_t, 32>;

struct Share {
  uint32_t x = 0;  // holder index, >= 1
  std::array<uint64_t, kShamirLimbs> y{};
};

// Shares for holders x = xs[i] (distinct, >= 1). InvalidArgument for t < 1 or t > xs.size().
absl::StatusOr<std::vector<Share>> ShamirSplit(const Secret32& secret, int t, const std::vector<uint32_t>& xs);
// Lagrange interpolation at 0 from exactly the given shares (>= 1, distinct x). Returns
// DataLoss when the result is not a valid encoding (a limb >= 2^56), which also catches many
// tampered shares; callers verify the secret against a commitment for the rest.
absl::StatusOr<Secret32> ShamirCombine(const std::vector<Share>& shares);
// Whether `s` lies on the polynomial through `basis` (exactly t shares).
bool ShamirConsistent(const std::vector<Share>& basis, const Share& s);

}  // namespace fedtune::privacy

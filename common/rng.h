// Seeded, reproducible random numbers (xoshiro256**, seeded by splitmix64). Not for secrets:
// cryptographic randomness comes from OpenSSL in privacy/.
#pragma once

#include <cmath>
#include <cstdint>

// Host and device: the CUDA backend makes dropout masks with the same functions.
#if defined(__CUDACC__)
#define FT_HOST_DEVICE __host__ __device__
#else
#define FT_HOST_DEVICE
#endif

namespace fedtune {

// A standard normal by Box-Muller from any generator with Uniform() in [0, 1): each draw makes
// a pair, the second is kept in *cached for the next call.
template <typename Generator>
double NormalFrom(Generator& g, double* cached, bool* have_cached) {
  if (*have_cached) {
    *have_cached = false;
    return *cached;
  }
  double u1 = 0;
  do u1 = g.Uniform();
  while (u1 <= 0.0);
  const double u2 = g.Uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  *cached = r * std::sin(2.0 * M_PI * u2);
  *have_cached = true;
  return r * std::cos(2.0 * M_PI * u2);
}

// The SplitMix64 finaliser: a bijective 64-bit mix, for hashing counters into random bits
// (Rng's seeding; dropout masks regenerated from their coordinates).
FT_HOST_DEVICE inline uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Dropout masks as pure functions of their coordinates: element (row, col) of the mask keyed
// `key` is kept iff DropoutKeeps(DropoutRowKey(key, row), col, DropoutThreshold(p)), which has
// probability 1 - p (to 2^-53).
FT_HOST_DEVICE inline uint64_t DropoutThreshold(double p) { return static_cast<uint64_t>(p * 9007199254740992.0); }  // p 2^53
FT_HOST_DEVICE inline uint64_t DropoutRowKey(uint64_t key, uint64_t row) { return Mix64(key + row); }
FT_HOST_DEVICE inline bool DropoutKeeps(uint64_t row_key, uint64_t col, uint64_t threshold) {
  return (Mix64(row_key + col) >> 11) >= threshold;
}

class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (auto& s : s_) s = SplitMix(seed);
  }
  uint64_t NextU64() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }
  // Uniform in [0, 1) with 53 random bits.
  double Uniform() { return static_cast<double>(NextU64() >> 11) * 0x1.0p-53; }
  // Uniform integer in [0, n); n > 0. Lemire's nearly-divisionless method is overkill here.
  uint64_t Below(uint64_t n) { return NextU64() % n; }
  // Standard normal (Box-Muller; one of the pair is cached).
  double Normal() { return NormalFrom(*this, &cached_, &have_cached_); }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static uint64_t SplitMix(uint64_t& x) { return Mix64(x += 0x9e3779b97f4a7c15ull); }
  uint64_t s_[4];
  double cached_ = 0.0;
  bool have_cached_ = false;
};

}  // namespace fedtune

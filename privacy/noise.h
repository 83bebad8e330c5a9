// Gaussian noise for differential privacy from a cryptographically seeded generator: an
// AES-256-CTR keystream (OpenSSL) keyed from RAND_bytes, turned into normals by Box-Muller in
// double precision. Reproducible only when a test passes an explicit seed. Floating-point
// Gaussians leak through their low bits (Mironov 2012); noise that lands in integer
// (secure-aggregated) sums goes through DiscreteGaussian instead.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>

#include "common/status.h"

namespace fedtune::privacy {

class NoiseSource {
 public:
  using Seed = std::array<uint8_t, 32>;
  // Seeded from the operating system's CSPRNG (OpenSSL RAND_bytes).
  static absl::StatusOr<std::unique_ptr<NoiseSource>> Create();
  // Deterministic stream for tests that ask for reproducibility.
  static absl::StatusOr<std::unique_ptr<NoiseSource>> FromSeed(const Seed& seed);
  ~NoiseSource();
  NoiseSource(const NoiseSource&) = delete;
  NoiseSource& operator=(const NoiseSource&) = delete;

  // Fills `out` with uniformly random bytes from the keystream.
  void Bytes(std::span<uint8_t> out);
  uint64_t NextU64();
  double Uniform();  // [0, 1), 53 bits
  double Normal();   // standard normal
  // x[i] += N(0, stddev^2), i.i.d.
  void AddGaussian(std::span<float> x, double stddev);
  // A sample of the discrete Gaussian N_Z(0, sigma^2) (Canonne, Kamath, Steinke 2020, exact
  // rejection sampler over discrete Laplace proposals; uses doubles only for the acceptance
  // test, which is adequate for sigma < 2^20).
  int64_t DiscreteGaussian(double sigma);

 private:
  NoiseSource();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  double cached_ = 0;
  bool have_cached_ = false;
};

}  // namespace fedtune::privacy

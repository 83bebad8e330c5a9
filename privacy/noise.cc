#include "privacy/noise.h"

#include "common/rng.h"

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace fedtune::privacy {

struct NoiseSource::Impl {
  EVP_CIPHER_CTX* ctx = nullptr;
  std::vector<uint8_t> buf = std::vector<uint8_t>(4096);
  size_t pos = 4096;
  ~Impl() { EVP_CIPHER_CTX_free(ctx); }
  void Refill() {
    static const std::vector<uint8_t> zeros(4096, 0);
    int n = 0;
    FT_CHECK(EVP_EncryptUpdate(ctx, buf.data(), &n, zeros.data(), static_cast<int>(zeros.size())) == 1);
    pos = 0;
  }
};

NoiseSource::NoiseSource() : impl_(std::make_unique<Impl>()) {}
NoiseSource::~NoiseSource() = default;

absl::StatusOr<std::unique_ptr<NoiseSource>> NoiseSource::FromSeed(const Seed& seed) {
  std::unique_ptr<NoiseSource> s(new NoiseSource());
  s->impl_->ctx = EVP_CIPHER_CTX_new();
  const uint8_t iv[16] = {};
  if (s->impl_->ctx == nullptr || EVP_EncryptInit_ex(s->impl_->ctx, EVP_aes_256_ctr(), nullptr, seed.data(), iv) != 1)
    return absl::InternalError("OpenSSL: cannot initialise AES-256-CTR");
  return s;
}

absl::StatusOr<std::unique_ptr<NoiseSource>> NoiseSource::Create() {
  Seed seed;
  if (RAND_bytes(seed.data(), static_cast<int>(seed.size())) != 1) return absl::InternalError("OpenSSL RAND_bytes failed");
  return FromSeed(seed);
}

void NoiseSource::Bytes(std::span<uint8_t> out) {
  size_t done = 0;
  while (done < out.size()) {
    if (impl_->pos == impl_->buf.size()) impl_->Refill();
    const size_t n = std::min(out.size() - done, impl_->buf.size() - impl_->pos);
    std::memcpy(out.data() + done, impl_->buf.data() + impl_->pos, n);
    impl_->pos += n;
    done += n;
  }
}

uint64_t NoiseSource::NextU64() {
  uint64_t v = 0;
  Bytes({reinterpret_cast<uint8_t*>(&v), sizeof v});
  return v;
}

double NoiseSource::Uniform() { return static_cast<double>(NextU64() >> 11) * 0x1.0p-53; }

double NoiseSource::Normal() { return NormalFrom(*this, &cached_, &have_cached_); }

void NoiseSource::AddGaussian(std::span<float> x, double stddev) {
  if (stddev == 0) return;
  for (float& v : x) v = static_cast<float>(v + stddev * Normal());
}

int64_t NoiseSource::DiscreteGaussian(double sigma) {
  // Algorithm 3 of Canonne et al.: t = floor(sigma) + 1; propose Y ~ discrete Laplace(t),
  // accept with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)).
  const double t = std::floor(sigma) + 1;
  const double p = 1.0 - std::exp(-1.0 / t);  // geometric success probability
  for (;;) {
    // Discrete Laplace(t) = difference of two i.i.d. geometrics (drawn by inversion).
    auto geometric = [&] {
      double u = 0;
      do u = Uniform();
      while (u <= 0.0);
      return static_cast<int64_t>(std::floor(std::log(u) / std::log1p(-p)));
    };
    const int64_t y = geometric() - geometric();
    const double d = std::fabs(static_cast<double>(y)) - sigma * sigma / t;
    if (Uniform() < std::exp(-d * d / (2 * sigma * sigma))) return y;
  }
}

}  // namespace fedtune::privacy

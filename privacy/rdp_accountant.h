// Rényi-DP accountant for the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019,
// arXiv 1908.10530), computed as in Opacus `analysis/rdp.py` / TF-Privacy: integer orders by the
// binomial sum, fractional orders by the erfc series, conversion to (epsilon, delta) with the
// improved bound of Balle et al. 2020 (ALGORITHMS.md, "Differential privacy").
#pragma once

#include <vector>

#include "common/status.h"

namespace fedtune::privacy {

// 1 + x/10 for x = 1..99, then 12..63 (Opacus' default orders).
std::vector<double> DefaultOrders();

// RDP of ONE application of the Gaussian mechanism with sampling rate q and noise multiplier
// sigma, at each order (> 1). q = 0 gives 0; sigma = 0 gives +inf.
std::vector<double> SampledGaussianRdp(double q, double sigma, const std::vector<double>& orders);

struct Epsilon {
  double epsilon = 0;
  double order = 0;  // the order that attains the minimum
};
// eps = min_a [ rdp_a + log(1 - 1/a) - (log delta + log a) / (a - 1) ]; +inf when no order gives
// a finite value. InvalidArgument for delta outside (0, 1) or mismatched sizes.
absl::StatusOr<Epsilon> EpsilonFromRdp(const std::vector<double>& orders, const std::vector<double>& rdp, double delta);

// Smallest noise multiplier (to 1e-4 relative) such that `steps` releases with sampling rate q
// stay within (target_epsilon, delta). InvalidArgument when the target cannot be met below
// sigma = 1e4.
absl::StatusOr<double> NoiseMultiplierFor(double target_epsilon, double delta, double q, int64_t steps,
                                          const std::vector<double>& orders = DefaultOrders());

// Adaptive clipping (Andrew et al. 2021): with the clipped-count estimate privatised by noise
// sigma_b, the update's noise multiplier becomes z_d = (z^-2 - (2 sigma_b)^-2)^-1/2 so the pair
// costs as much as one release at z. InvalidArgument where z >= 2 sigma_b (no budget left).
absl::StatusOr<double> AdaptiveClippingUpdateNoise(double z, double sigma_b);

}  // namespace fedtune::privacy

#include "privacy/rdp_accountant.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace fedtune::privacy {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

double LogAdd(double x, double y) {
  const double a = std::min(x, y), b = std::max(x, y);
  if (a == -kInf) return b;
  return std::log1p(std::exp(a - b)) + b;
}

double LogSub(double x, double y) {  // log(exp(x) - exp(y)), x >= y
  if (y == -kInf) return x;
  if (x <= y) return -kInf;
  const double d = std::expm1(x - y);
  return std::isinf(d) ? x : std::log(d) + y;
}

// log(erfc(x)), accurate where erfc underflows (asymptotic series beyond x = 20).
double LogErfc(double x) {
  if (x < 20.0) return std::log(std::erfc(x));
  const double x2 = x * x;
  return -x2 - std::log(x) - 0.5 * std::log(M_PI) + std::log1p(-1.0 / (2 * x2) + 3.0 / (4 * x2 * x2) - 15.0 / (8 * x2 * x2 * x2));
}

double LogBinomInt(int n, int k) { return std::lgamma(n + 1.0) - std::lgamma(k + 1.0) - std::lgamma(n - k + 1.0); }

double LogAInt(double q, double sigma, int alpha) {
  double log_a = -kInf;
  for (int i = 0; i <= alpha; ++i) {
    const double c = LogBinomInt(alpha, i) + i * std::log(q) + (alpha - i) * std::log1p(-q);
    log_a = LogAdd(log_a, c + (static_cast<double>(i) * i - i) / (2 * sigma * sigma));
  }
  return log_a;
}

double LogAFrac(double q, double sigma, double alpha) {
  double log_a0 = -kInf, log_a1 = -kInf;
  const double z0 = sigma * sigma * std::log(1.0 / q - 1.0) + 0.5;
  double coef = 1.0;  // binom(alpha, i), by the recurrence; may turn negative
  for (int i = 0; i < 100000; ++i) {
    if (i > 0) coef *= (alpha - (i - 1)) / i;
    const double log_coef = std::log(std::fabs(coef));
    const double j = alpha - i;
    const double log_t0 = log_coef + i * std::log(q) + j * std::log1p(-q);
    const double log_t1 = log_coef + j * std::log(q) + i * std::log1p(-q);
    const double log_e0 = std::log(0.5) + LogErfc((i - z0) / (M_SQRT2 * sigma));
    const double log_e1 = std::log(0.5) + LogErfc((z0 - j) / (M_SQRT2 * sigma));
    const double log_s0 = log_t0 + (static_cast<double>(i) * i - i) / (2 * sigma * sigma) + log_e0;
    const double log_s1 = log_t1 + (j * j - j) / (2 * sigma * sigma) + log_e1;
    if (coef > 0) {
      log_a0 = LogAdd(log_a0, log_s0);
      log_a1 = LogAdd(log_a1, log_s1);
    } else {
      log_a0 = LogSub(log_a0, log_s0);
      log_a1 = LogSub(log_a1, log_s1);
    }
    if (std::max(log_s0, log_s1) < -30) break;
  }
  return LogAdd(log_a0, log_a1);
}

}  // namespace

std::vector<double> DefaultOrders() {
  std::vector<double> o;
  for (int x = 1; x <= 99; ++x) o.push_back(1.0 + x / 10.0);
  for (int x = 12; x <= 63; ++x) o.push_back(x);
  return o;
}

std::vector<double> SampledGaussianRdp(double q, double sigma, const std::vector<double>& orders) {
  std::vector<double> rdp(orders.size());
  for (size_t k = 0; k < orders.size(); ++k) {
    const double a = orders[k];
    if (q == 0) {
      rdp[k] = 0;
    } else if (sigma == 0 || std::isinf(a)) {
      rdp[k] = kInf;
    } else if (q == 1.0) {
      rdp[k] = a / (2 * sigma * sigma);
    } else if (a == std::floor(a)) {
      rdp[k] = LogAInt(q, sigma, static_cast<int>(a)) / (a - 1);
    } else {
      rdp[k] = LogAFrac(q, sigma, a) / (a - 1);
    }
  }
  return rdp;
}

absl::StatusOr<Epsilon> EpsilonFromRdp(const std::vector<double>& orders, const std::vector<double>& rdp, double delta) {
  if (!(delta > 0 && delta < 1)) return absl::InvalidArgumentError(absl::StrCat("delta must be in (0, 1), got ", delta));
  if (orders.size() != rdp.size() || orders.empty()) return absl::InvalidArgumentError("orders and RDP values differ in length");
  Epsilon best{kInf, 0};
  for (size_t k = 0; k < orders.size(); ++k) {
    const double a = orders[k];
    if (!(a > 1)) return absl::InvalidArgumentError(absl::StrCat("RDP order must be > 1, got ", a));
    const double eps = rdp[k] + std::log1p(-1.0 / a) - (std::log(delta) + std::log(a)) / (a - 1);
    if (std::isfinite(eps) && eps < best.epsilon) best = {std::max(0.0, eps), a};
  }
  return best;
}

absl::StatusOr<double> NoiseMultiplierFor(double target_epsilon, double delta, double q, int64_t steps,
                                          const std::vector<double>& orders) {
  if (!(target_epsilon > 0)) return absl::InvalidArgumentError("target epsilon must be > 0");
  auto eps_at = [&](double sigma) -> absl::StatusOr<double> {
    std::vector<double> r = SampledGaussianRdp(q, sigma, orders);
    for (double& x : r) x *= static_cast<double>(steps);
    FT_ASSIGN_OR_RETURN(Epsilon e, EpsilonFromRdp(orders, r, delta));
    return e.epsilon;
  };
  double hi = 1.0;
  for (;;) {
    FT_ASSIGN_OR_RETURN(double e, eps_at(hi));
    if (e <= target_epsilon) break;
    hi *= 2;
    if (hi > 1e4) return absl::InvalidArgumentError(absl::StrCat("epsilon ", target_epsilon, " cannot be reached with ", steps, " releases at q=", q));
  }
  double lo = 0.0;
  while (hi - lo > 1e-4 * hi) {
    const double mid = 0.5 * (lo + hi);
    FT_ASSIGN_OR_RETURN(double e, eps_at(mid));
    (e <= target_epsilon ? hi : lo) = mid;
  }
  return hi;
}

absl::StatusOr<double> AdaptiveClippingUpdateNoise(double z, double sigma_b) {
  const double r = 1.0 / (z * z) - 1.0 / (4 * sigma_b * sigma_b);
  if (!(z > 0) || !(r > 0)) return absl::InvalidArgumentError(absl::StrCat("noise multiplier ", z, " leaves no budget for the clipped-count noise ", sigma_b));
  return 1.0 / std::sqrt(r);
}

}  // namespace fedtune::privacy

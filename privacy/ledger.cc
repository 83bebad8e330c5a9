#include "privacy/ledger.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace fedtune::privacy {

PrivacyLedger::PrivacyLedger(double budget_epsilon, double delta, std::vector<double> orders)
    : budget_(budget_epsilon), delta_(delta), orders_(std::move(orders)), rdp_(orders_.size(), 0.0) {}

absl::StatusOr<Epsilon> PrivacyLedger::EpsilonIf(const Release& r) const {
  if (!(r.q >= 0 && r.q <= 1) || !(r.sigma >= 0) || r.steps < 0)
    return absl::InvalidArgumentError(absl::StrCat("release '", r.label, "': need 0 <= q <= 1, sigma >= 0, steps >= 0"));
  std::vector<double> rdp = SampledGaussianRdp(r.q, r.sigma, orders_);
  for (size_t k = 0; k < rdp.size(); ++k) rdp[k] = rdp_[k] + rdp[k] * static_cast<double>(r.steps);
  return EpsilonFromRdp(orders_, rdp, delta_);
}

absl::Status PrivacyLedger::Record(const Release& r) {
  FT_ASSIGN_OR_RETURN(Epsilon e, EpsilonIf(r));
  if (budget_ > 0 && std::isfinite(budget_) && e.epsilon > budget_)
    return absl::ResourceExhaustedError(absl::StrCat("privacy budget: release '", r.label, "' would bring epsilon to ", e.epsilon,
                                                     " > budget ", budget_, " (delta ", delta_, ")"));
  const std::vector<double> add = SampledGaussianRdp(r.q, r.sigma, orders_);
  for (size_t k = 0; k < rdp_.size(); ++k) rdp_[k] += add[k] * static_cast<double>(r.steps);
  releases_.push_back(r);
  return absl::OkStatus();
}

absl::StatusOr<Epsilon> PrivacyLedger::Spent() const {
  if (releases_.empty()) return Epsilon{0, 0};
  return EpsilonFromRdp(orders_, rdp_, delta_);
}

}  // namespace fedtune::privacy

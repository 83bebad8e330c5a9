// The privacy ledger: every release of a sampled Gaussian mechanism is recorded, the RDP of all
// releases composes by addition, and a release that would take epsilon past the configured budget
// is refused before it happens (so the budget is never exceeded, not even by one round).
#pragma once

#include <string>
#include <vector>

#include "privacy/rdp_accountant.h"

namespace fedtune::privacy {

struct Release {
  std::string label;  // e.g. "round 3"
  double q = 0;       // sampling rate
  double sigma = 0;   // noise multiplier
  int64_t steps = 1;  // compositions of this (q, sigma)
};

class PrivacyLedger {
 public:
  // budget_epsilon <= 0 or +inf: no limit (still accounted). delta in (0, 1).
  PrivacyLedger(double budget_epsilon, double delta, std::vector<double> orders = DefaultOrders());
  // Epsilon after the recorded releases plus `r` (nothing is recorded).
  absl::StatusOr<Epsilon> EpsilonIf(const Release& r) const;
  // Records `r`; ResourceExhausted (nothing recorded) when it would exceed the budget.
  absl::Status Record(const Release& r);
  absl::StatusOr<Epsilon> Spent() const;
  const std::vector<Release>& releases() const { return releases_; }
  double budget() const { return budget_; }
  double delta() const { return delta_; }

 private:
  double budget_, delta_;
  std::vector<double> orders_, rdp_;
  std::vector<Release> releases_;
};

}  // namespace fedtune::privacy

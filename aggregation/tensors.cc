#include "aggregation/tensors.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace fedtune::aggregation {

double L2Norm(const TensorMap& t) {
  double s = 0;
  for (const auto& [name, v] : t)
    for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

void Scale(TensorMap& t, float s) {
  for (auto& [name, v] : t)
    for (float& x : v) x *= s;
}

absl::Status ValidateUpdate(const ClientUpdate& u, const TensorMap& global) {
  if (u.num_examples <= 0) return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': num_examples must be > 0"));
  if (u.delta.empty()) return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "' carries no tensors"));
  for (const auto& [name, v] : u.delta) {
    auto it = global.find(name);
    if (it == global.end()) return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': unknown tensor ", name));
    if (it->second.size() != v.size())
      return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': tensor ", name, " has ", v.size(), " values, expected ", it->second.size()));
    for (size_t i = 0; i < v.size(); ++i) {
      if (!std::isfinite(v[i])) return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': tensor ", name, " has a non-finite value at ", i));
      if (std::fabs(v[i]) > kMaxUpdateValue)
        return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': tensor ", name, " has |value| > ", kMaxUpdateValue, " at ", i));
    }
  }
  for (const auto& [name, f] : u.fisher) {
    auto it = u.delta.find(name);
    if (it == u.delta.end() || it->second.size() != f.size())
      return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': Fisher tensor ", name, " does not match a delta tensor"));
    for (size_t i = 0; i < f.size(); ++i)
      if (!std::isfinite(f[i]) || f[i] < 0) return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': Fisher ", name, " is negative or non-finite at ", i));
  }
  return absl::OkStatus();
}

double ClipToNorm(TensorMap& t, double bound) {
  const double n = L2Norm(t);
  if (bound > 0 && n > bound) Scale(t, static_cast<float>(bound / n));
  return n;
}

}  // namespace fedtune::aggregation

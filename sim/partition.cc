#include "sim/partition.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace fedtune::sim {

double SampleGamma(double shape, Rng& rng) {
  if (shape < 1.0) {  // boost: Gamma(a) = Gamma(a+1) * U^(1/a)
    double u = 0;
    do u = rng.Uniform();
    while (u <= 0.0);
    return SampleGamma(shape + 1.0, rng) * std::pow(u, 1.0 / shape);
  }
  const double d = shape - 1.0 / 3.0, c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    double x = 0, v = 0;
    do {
      x = rng.Normal();
      v = 1.0 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const double u = rng.Uniform();
    if (u < 1.0 - 0.0331 * x * x * x * x) return d * v;
    if (u > 0 && std::log(u) < 0.5 * x * x + d * (1.0 - v + std::log(v))) return d * v;
  }
}

namespace {

void Shuffle(std::vector<size_t>& v, Rng& rng) {
  for (size_t k = v.size(); k > 1; --k) std::swap(v[k - 1], v[rng.Below(k)]);
}

// Splits `idx` into pieces with sizes proportional to `w`, at least one each where possible.
std::vector<std::vector<size_t>> SplitBy(const std::vector<size_t>& idx, const std::vector<double>& w) {
  double total = 0;
  for (double x : w) total += x;
  std::vector<std::vector<size_t>> out(w.size());
  size_t pos = 0;
  double acc = 0;
  for (size_t k = 0; k < w.size(); ++k) {
    acc += w[k];
    size_t end = k + 1 == w.size() ? idx.size() : static_cast<size_t>(std::llround(acc / total * static_cast<double>(idx.size())));
    end = std::max(end, std::min(idx.size(), pos + 1));  // at least one example when any are left
    end = std::min(end, idx.size() - std::min(idx.size(), w.size() - k - 1));  // leave one for each later client
    end = std::max(end, pos);
    out[k].assign(idx.begin() + static_cast<std::ptrdiff_t>(pos), idx.begin() + static_cast<std::ptrdiff_t>(end));
    pos = end;
  }
  return out;
}

}  // namespace

absl::StatusOr<std::vector<std::vector<size_t>>> Partition(const std::vector<int>& labels, int num_tasks, int clients, PartitionKind kind,
                                                           double alpha, double skew, Rng& rng) {
  if (clients < 1) return absl::InvalidArgumentError("clients must be >= 1");
  if (labels.size() < static_cast<size_t>(clients))
    return absl::InvalidArgumentError(absl::StrCat(labels.size(), " training examples cannot be shared by ", clients, " clients"));
  std::vector<size_t> all(labels.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  Shuffle(all, rng);
  std::vector<std::vector<size_t>> out;
  switch (kind) {
    case PartitionKind::kIid:
      out = SplitBy(all, std::vector<double>(static_cast<size_t>(clients), 1.0));
      break;
    case PartitionKind::kSizeSkew: {
      std::vector<double> w;
      for (int k = 0; k < clients; ++k) w.push_back(std::pow(k + 1.0, -skew));
      out = SplitBy(all, w);
      break;
    }
    case PartitionKind::kByTask: {
      if (clients < num_tasks) return absl::InvalidArgumentError(absl::StrCat("by_task needs at least one client per task (", num_tasks, " tasks)"));
      out.resize(static_cast<size_t>(clients));
      for (int t = 0; t < num_tasks; ++t) {
        std::vector<size_t> idx;
        for (size_t i : all)
          if (labels[i] == t) idx.push_back(i);
        std::vector<int> mine;
        for (int k = t; k < clients; k += num_tasks) mine.push_back(k);
        auto parts = SplitBy(idx, std::vector<double>(mine.size(), 1.0));
        for (size_t j = 0; j < mine.size(); ++j) out[static_cast<size_t>(mine[j])] = std::move(parts[j]);
      }
      break;
    }
    case PartitionKind::kDirichlet: {
      if (!(alpha > 0)) return absl::InvalidArgumentError("dirichlet_alpha must be > 0");
      // Per task, the shares of the clients ~ Dirichlet(alpha) (the usual label-skew recipe).
      out.resize(static_cast<size_t>(clients));
      for (int t = 0; t < num_tasks; ++t) {
        std::vector<size_t> idx;
        for (size_t i : all)
          if (labels[i] == t) idx.push_back(i);
        std::vector<double> w;
        for (int k = 0; k < clients; ++k) w.push_back(SampleGamma(alpha, rng) + 1e-12);
        double total = 0;
        for (double x : w) total += x;
        size_t pos = 0;
        double acc = 0;
        for (int k = 0; k < clients; ++k) {
          acc += w[static_cast<size_t>(k)];
          const size_t end = k + 1 == clients ? idx.size() : static_cast<size_t>(std::llround(acc / total * static_cast<double>(idx.size())));
          for (; pos < end; ++pos) out[static_cast<size_t>(k)].push_back(idx[pos]);
        }
      }
      // A client left empty borrows one example from the largest (keeps every client useful).
      for (auto& c : out) {
        if (!c.empty()) continue;
        auto big = std::max_element(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.size() < b.size(); });
        c.push_back(big->back());
        big->pop_back();
      }
      break;
    }
  }
  for (size_t k = 0; k < out.size(); ++k)
    if (out[k].empty()) return absl::InvalidArgumentError(absl::StrCat("client ", k, " would get no training data"));
  return out;
}

}  // namespace fedtune::sim

#include "aggregation/hetero_rank.h"

#include <Eigen/Dense>
#include <algorithm>

#include "absl/strings/str_cat.h"

namespace fedtune::aggregation {
namespace {

using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

absl::StatusOr<std::vector<double>> CheckAndNormalise(const std::vector<LoraFactors>& clients) {
  if (clients.empty()) return absl::InvalidArgumentError("no LoRA factors to merge");
  double total = 0;
  for (size_t k = 0; k < clients.size(); ++k) {
    const LoraFactors& c = clients[k];
    if (c.in != clients[0].in || c.out != clients[0].out)
      return absl::InvalidArgumentError(absl::StrCat("client ", k, ": shape ", c.out, "x", c.in, " differs from ", clients[0].out, "x", clients[0].in));
    if (c.rank < 1 || c.a.size() != static_cast<size_t>(c.rank * c.in) || c.b.size() != static_cast<size_t>(c.out * c.rank))
      return absl::InvalidArgumentError(absl::StrCat("client ", k, ": A/B sizes do not match rank ", c.rank));
    if (!(c.weight > 0)) return absl::InvalidArgumentError(absl::StrCat("client ", k, ": weight must be > 0"));
    total += c.weight;
  }
  std::vector<double> p;
  for (const LoraFactors& c : clients) p.push_back(c.weight / total);
  return p;
}

RowMat WeightedDense(const std::vector<LoraFactors>& clients, const std::vector<double>& p) {
  RowMat w = RowMat::Zero(clients[0].out, clients[0].in);
  for (size_t k = 0; k < clients.size(); ++k) {
    const LoraFactors& c = clients[k];
    Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> a(c.a.data(), c.rank, c.in), b(c.b.data(), c.out, c.rank);
    w += (p[k] * c.scale) * (b.cast<double>() * a.cast<double>());
  }
  return w;
}

}  // namespace

std::vector<float> DenseDelta(const LoraFactors& f) {
  std::vector<float> d(static_cast<size_t>(f.out * f.in), 0.0f);
  for (int64_t o = 0; o < f.out; ++o)
    for (int64_t r = 0; r < f.rank; ++r) {
      const double br = f.scale * f.b[static_cast<size_t>(o * f.rank + r)];
      for (int64_t i = 0; i < f.in; ++i) d[static_cast<size_t>(o * f.in + i)] += static_cast<float>(br * f.a[static_cast<size_t>(r * f.in + i)]);
    }
  return d;
}

absl::StatusOr<LoraFactors> ZeroPadAverage(const std::vector<LoraFactors>& clients) {
  FT_ASSIGN_OR_RETURN(std::vector<double> p, CheckAndNormalise(clients));
  LoraFactors g;
  g.in = clients[0].in;
  g.out = clients[0].out;
  g.scale = clients[0].scale;
  for (const LoraFactors& c : clients) {
    g.rank = std::max(g.rank, c.rank);
    if (c.scale != g.scale) return absl::InvalidArgumentError("zero-padding needs the same scale (alpha/r) on every client");
  }
  g.a.assign(static_cast<size_t>(g.rank * g.in), 0.0f);
  g.b.assign(static_cast<size_t>(g.out * g.rank), 0.0f);
  for (size_t k = 0; k < clients.size(); ++k) {
    const LoraFactors& c = clients[k];
    for (int64_t r = 0; r < c.rank; ++r)
      for (int64_t i = 0; i < c.in; ++i) g.a[static_cast<size_t>(r * g.in + i)] += static_cast<float>(p[k] * c.a[static_cast<size_t>(r * c.in + i)]);
    for (int64_t o = 0; o < c.out; ++o)
      for (int64_t r = 0; r < c.rank; ++r) g.b[static_cast<size_t>(o * g.rank + r)] += static_cast<float>(p[k] * c.b[static_cast<size_t>(o * c.rank + r)]);
  }
  return g;
}

absl::StatusOr<LoraFactors> FloraStack(const std::vector<LoraFactors>& clients) {
  FT_ASSIGN_OR_RETURN(std::vector<double> p, CheckAndNormalise(clients));
  LoraFactors g;
  g.in = clients[0].in;
  g.out = clients[0].out;
  g.scale = 1.0;
  for (const LoraFactors& c : clients) g.rank += c.rank;
  g.a.reserve(static_cast<size_t>(g.rank * g.in));
  g.b.assign(static_cast<size_t>(g.out * g.rank), 0.0f);
  int64_t offset = 0;
  for (size_t k = 0; k < clients.size(); ++k) {
    const LoraFactors& c = clients[k];
    for (float x : c.a) g.a.push_back(static_cast<float>(p[k] * c.scale * x));
    for (int64_t o = 0; o < c.out; ++o)
      for (int64_t r = 0; r < c.rank; ++r) g.b[static_cast<size_t>(o * g.rank + offset + r)] = c.b[static_cast<size_t>(o * c.rank + r)];
    offset += c.rank;
  }
  return g;
}

absl::StatusOr<std::vector<LoraFactors>> FlexLoraRedistribute(const std::vector<LoraFactors>& clients, const std::vector<int64_t>& ranks,
                                                              const std::vector<double>& scales) {
  FT_ASSIGN_OR_RETURN(std::vector<double> p, CheckAndNormalise(clients));
  if (ranks.size() != scales.size()) return absl::InvalidArgumentError("FlexLoRA: one scale per requested rank");
  const int64_t in = clients[0].in, out = clients[0].out;
  const RowMat w = WeightedDense(clients, p);
  Eigen::BDCSVD<Eigen::MatrixXd> svd(w, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::MatrixXd& u = svd.matrixU();
  const Eigen::MatrixXd& v = svd.matrixV();
  const Eigen::VectorXd& s = svd.singularValues();
  std::vector<LoraFactors> result;
  for (size_t j = 0; j < ranks.size(); ++j) {
    const int64_t r = ranks[j];
    if (r < 1 || r > std::min(in, out)) return absl::InvalidArgumentError(absl::StrCat("FlexLoRA: rank ", r, " outside [1, ", std::min(in, out), "]"));
    if (!(scales[j] > 0)) return absl::InvalidArgumentError("FlexLoRA: scales must be > 0");
    LoraFactors f;
    f.rank = r;
    f.in = in;
    f.out = out;
    f.scale = scales[j];
    f.a.resize(static_cast<size_t>(r * in));
    f.b.resize(static_cast<size_t>(out * r));
    for (int64_t k = 0; k < r; ++k)
      for (int64_t i = 0; i < in; ++i) f.a[static_cast<size_t>(k * in + i)] = static_cast<float>(v(i, k));
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < r; ++k) f.b[static_cast<size_t>(o * r + k)] = static_cast<float>(u(o, k) * s(k) / scales[j]);
    result.push_back(std::move(f));
  }
  return result;
}

}  // namespace fedtune::aggregation

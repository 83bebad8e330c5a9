#include "aggregation/hetero_rank.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>

#include "absl/strings/match.h"
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

const char* HeteroRankRuleName(HeteroRankRule r) {
  switch (r) {
    case HeteroRankRule::kNested: return "nested";
    case HeteroRankRule::kZeroPad: return "zero_pad";
    case HeteroRankRule::kFlexLora: return "flexlora";
  }
  return "?";
}

absl::StatusOr<HeteroRankRule> ParseHeteroRankRule(const std::string& s) {
  if (s.empty() || s == "nested") return HeteroRankRule::kNested;
  if (s == "zero_pad") return HeteroRankRule::kZeroPad;
  if (s == "flexlora") return HeteroRankRule::kFlexLora;
  return absl::InvalidArgumentError(absl::StrCat("unknown heterogeneous-rank rule '", s, "' (nested, zero_pad, flexlora)"));
}

float RankAlpha(float alpha, int64_t rank, int64_t r, bool rslora) {
  const double ratio = static_cast<double>(r) / static_cast<double>(rank);
  return static_cast<float>(alpha * (rslora ? std::sqrt(ratio) : ratio));
}

namespace {

// kBlocks: DiaBlo's [N, b_in, b_out], whose "components" are its N diagonal blocks (a worker's
// share is k consecutive blocks from `first`, rows of the same layout as LoRA's A).
enum class Part { kA, kB, kBlocks, kOther };
Part PartOf(const std::string& name) {
  if (absl::EndsWith(name, ".lora_a")) return Part::kA;
  if (absl::EndsWith(name, ".lora_b")) return Part::kB;
  if (absl::EndsWith(name, ".diablo")) return Part::kBlocks;
  return Part::kOther;
}

// Copies the first r of R components of `from` (a tensor of `part`, full size `full`; DiaBlo:
// r blocks from block `first`) into a rank-r tensor, or (expand) the other way round with zeros
// elsewhere.
void CopyComponents(Part part, const std::vector<float>& from, std::vector<float>& to, size_t full, int64_t rank, int64_t r, bool expand,
                    int64_t first = 0) {
  const size_t dim = full / static_cast<size_t>(rank);  // in (A) or out (B)
  const size_t rr = static_cast<size_t>(r), rk = static_cast<size_t>(rank);
  to.assign(expand ? full : dim * rr, 0.0f);
  if (part == Part::kBlocks) {  // [N, b_in, b_out]: rows first .. first + r - 1
    const size_t at = dim * static_cast<size_t>(first);
    if (expand) {
      std::copy_n(from.begin(), dim * rr, to.begin() + static_cast<std::ptrdiff_t>(at));
    } else {
      std::copy_n(from.begin() + static_cast<std::ptrdiff_t>(at), dim * rr, to.begin());
    }
    return;
  }
  if (part != Part::kB) {  // A [rank, in]: a prefix of rows
    std::copy_n(from.begin(), dim * rr, to.begin());
    return;
  }
  for (size_t o = 0; o < dim; ++o)  // [out, rank]: a prefix of every row
    for (size_t k = 0; k < rr; ++k) {
      if (expand) {
        to[o * rk + k] = from[o * rr + k];
      } else {
        to[o * rr + k] = from[o * rk + k];
      }
    }
}

}  // namespace

int64_t ComponentOf(const std::string& name, size_t i, size_t n, int64_t rank) {
  if (rank <= 0 || n % static_cast<size_t>(rank) != 0) return -1;
  const size_t dim = n / static_cast<size_t>(rank);  // as CopyComponents: in (A, blocks) or out (B)
  switch (PartOf(name)) {
    case Part::kA: case Part::kBlocks: return static_cast<int64_t>(i / dim);
    case Part::kB: return static_cast<int64_t>(i % static_cast<size_t>(rank));
    case Part::kOther: return -1;
  }
  return -1;
}

namespace {

absl::Status CheckRanks(int64_t rank, int64_t r, int64_t first) {
  if (rank < 1 || r < 1 || r > rank) return absl::InvalidArgumentError(absl::StrCat("worker rank (or DiaBlo blocks) ", r, " outside [1, ", rank, "]"));
  if (first < 0 || first + r > rank)
    return absl::InvalidArgumentError(absl::StrCat("DiaBlo blocks ", first, "..", first + r - 1, " outside [0, ", rank, ")"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TensorMap> TruncateRank(const TensorMap& t, int64_t rank, int64_t r, int64_t first) {
  FT_RETURN_IF_ERROR(CheckRanks(rank, r, first));
  TensorMap out;
  for (const auto& [name, v] : t) {
    const Part part = PartOf(name);
    if (part == Part::kOther || r == rank) {
      out[name] = v;
      continue;
    }
    if (v.empty() || v.size() % static_cast<size_t>(rank) != 0)
      return absl::InvalidArgumentError(absl::StrCat(name, ": ", v.size(), " values are not rank ", rank, " x a width"));
    CopyComponents(part, v, out[name], v.size(), rank, r, false, first);
  }
  return out;
}

absl::Status ExpandRank(ClientUpdate* u, const TensorMap& global, int64_t rank, int64_t r, bool coverage, int64_t first) {
  FT_RETURN_IF_ERROR(CheckRanks(rank, r, first));
  u->compressed.clear();
  u->coverage.clear();
  if (r == rank) return absl::OkStatus();
  for (auto& [name, d] : u->delta) {
    auto g = global.find(name);
    if (g == global.end()) return absl::InvalidArgumentError(absl::StrCat("update from '", u->client, "': unknown tensor ", name));
    const Part part = PartOf(name);
    const size_t full = g->second.size();
    const size_t expected = part == Part::kOther ? full : full / static_cast<size_t>(rank) * static_cast<size_t>(r);
    if (d.size() != expected)
      return absl::InvalidArgumentError(
          absl::StrCat("update from '", u->client, "': tensor ", name, " has ", d.size(), " values, expected ", expected, " (rank ", r, ")"));
    if (part == Part::kOther) continue;
    std::vector<float> padded;
    CopyComponents(part, d, padded, full, rank, r, true, first);
    d = std::move(padded);
    if (auto f = u->fisher.find(name); f != u->fisher.end()) {
      if (f->second.size() != expected)
        return absl::InvalidArgumentError(absl::StrCat("update from '", u->client, "': Fisher tensor ", name, " does not match its delta"));
      CopyComponents(part, f->second, padded, full, rank, r, true, first);
      f->second = std::move(padded);
    }
    if (coverage) {
      std::vector<float> ones(expected, 1.0f);
      CopyComponents(part, ones, u->coverage[name], full, rank, r, true, first);
    }
  }
  return absl::OkStatus();
}

namespace {

// Factors of one module's client products, buffered for FlexLoRA: W = sum_k p_k s B_k A_k with
// b_cols[k] = B_k (out x r_k) and a_rows[k] = p_k s A_k (r_k x in), p_k unnormalised here.
struct Stack {
  std::vector<Eigen::MatrixXd> b, a;
  double weight = 0;
};

// Thin orthonormal basis and triangular factor of m (rows >= 1): m = Q R.
void ThinQr(const Eigen::MatrixXd& m, Eigen::MatrixXd* q, Eigen::MatrixXd* r) {
  const Eigen::Index k = std::min(m.rows(), m.cols());
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(m);
  *q = qr.householderQ() * Eigen::MatrixXd::Identity(m.rows(), k);
  *r = qr.matrixQR().topRows(k).triangularView<Eigen::Upper>();
}

class HeteroRankAggregation : public Aggregation {
 public:
  HeteroRankAggregation(const HeteroRankOptions& o, std::map<std::string, int64_t> ranks, const TensorMap& global, std::unique_ptr<Aggregation> inner,
                        std::map<std::string, int64_t> firsts)
      : o_(o), ranks_(std::move(ranks)), firsts_(std::move(firsts)), global_(global), inner_(std::move(inner)) {}

  // Secure aggregation (nested, zero_pad): the clients padded their updates before masking and
  // the value weights say who trained what (federation::SecureServer); flexlora needs each
  // client's factors (refused in settings).
  absl::Status AddSecureSum(const TensorMap& weighted_sum, double total_weight, int count, int64_t num_examples,
                            const TensorMap* value_weight) override {
    if (o_.rule == HeteroRankRule::kFlexLora) return Aggregation::AddSecureSum(weighted_sum, total_weight, count, num_examples, value_weight);
    return inner_->AddSecureSum(weighted_sum, total_weight, count, num_examples, value_weight);
  }
  absl::Status AddSecureFisherSums(const TensorMap& num, const TensorMap& den, int count, int64_t num_examples) override {
    if (o_.rule == HeteroRankRule::kFlexLora) return Aggregation::AddSecureFisherSums(num, den, count, num_examples);
    return inner_->AddSecureFisherSums(num, den, count, num_examples);
  }

  absl::Status Add(ClientUpdate u) override {
    auto it = ranks_.find(u.client);
    const int64_t r = it == ranks_.end() ? o_.rank : it->second;
    auto f = firsts_.find(u.client);
    FT_RETURN_IF_ERROR(ExpandRank(&u, global_, o_.rank, r, o_.rule == HeteroRankRule::kNested, f == firsts_.end() ? 0 : f->second));
    if (o_.rule != HeteroRankRule::kFlexLora) return inner_->Add(std::move(u));
    for (const auto& [name, d] : u.delta) {
      if (PartOf(name) != Part::kA && PartOf(name) != Part::kB)
        return absl::InvalidArgumentError(absl::StrCat("flexlora merges LoRA factors only, not ", name));
      const std::string other = name.substr(0, name.size() - 1) + (PartOf(name) == Part::kA ? "b" : "a");
      if (!u.delta.count(other))
        return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': ", name, " without ", other, " (flexlora needs both factors)"));
    }
    // The strategy's checks (sizes, finiteness, a second update) and its record of the norm;
    // its mean of the factors is not used.
    FT_RETURN_IF_ERROR(inner_->Add(u));
    if (o_.norm_bound > 0) ClipToNorm(u.delta, o_.norm_bound);
    const int64_t examples = o_.max_client_examples > 0 ? std::min(u.num_examples, o_.max_client_examples) : u.num_examples;
    const double n = o_.weight_by_examples ? static_cast<double>(examples) : 1.0;
    for (const auto& [name, d] : u.delta) {
      if (PartOf(name) != Part::kA) continue;
      const std::string prefix = name.substr(0, name.size() - 6);  // "blk.L.M."
      const auto db = u.delta.find(prefix + "lora_b");  // (present: checked above)
      const std::vector<float>& ga = global_.at(name);
      const std::vector<float>& gb = global_.at(prefix + "lora_b");
      const Eigen::Index in = static_cast<Eigen::Index>(ga.size() / static_cast<size_t>(o_.rank));
      const Eigen::Index out = static_cast<Eigen::Index>(gb.size() / static_cast<size_t>(o_.rank));
      const Eigen::Index rk = static_cast<Eigen::Index>(r);
      // The client's factors after training: its r components of the global plus its delta.
      Eigen::MatrixXd a(rk, in), b(out, rk);
      for (Eigen::Index k = 0; k < rk; ++k)
        for (Eigen::Index i = 0; i < in; ++i) {
          const size_t at = static_cast<size_t>(k * in + i);
          a(k, i) = static_cast<double>(ga[at]) + d[at];
        }
      for (Eigen::Index o = 0; o < out; ++o)
        for (Eigen::Index k = 0; k < rk; ++k) {
          const size_t at = static_cast<size_t>(o * o_.rank + k);
          b(o, k) = static_cast<double>(gb[at]) + db->second[at];
        }
      Stack& st = stacks_[prefix];
      st.a.push_back(n * o_.scale * a);
      st.b.push_back(std::move(b));
      st.weight += n;
    }
    ++accepted_;
    examples_ += u.num_examples;
    return absl::OkStatus();
  }

  absl::StatusOr<Merged> Merge() override {
    if (o_.rule != HeteroRankRule::kFlexLora) return inner_->Merge();
    Merged m;
    m.accepted = accepted_;
    m.num_examples = examples_;
    double worst = 0;
    for (auto& [prefix, st] : stacks_) {
      const std::vector<float>& ga = global_.at(prefix + "lora_a");
      const std::vector<float>& gb = global_.at(prefix + "lora_b");
      const Eigen::Index in = st.a[0].cols(), out = st.b[0].rows();
      Eigen::Index total = 0;
      for (const auto& x : st.a) total += x.rows();
      Eigen::MatrixXd bs(out, total), as(total, in);
      Eigen::Index at = 0;
      for (size_t k = 0; k < st.a.size(); ++k) {
        bs.middleCols(at, st.b[k].cols()) = st.b[k];
        as.middleRows(at, st.a[k].rows()) = st.a[k] / st.weight;
        at += st.a[k].rows();
      }
      // W = bs as = Qb (Rb Ra^T) Qa^T: the SVD of the small middle matrix gives W's.
      Eigen::MatrixXd qb, rb, qa, ra;
      ThinQr(bs, &qb, &rb);
      ThinQr(as.transpose(), &qa, &ra);
      Eigen::JacobiSVD<Eigen::MatrixXd> svd(rb * ra.transpose(), Eigen::ComputeThinU | Eigen::ComputeThinV);
      const Eigen::MatrixXd u = qb * svd.matrixU(), v = qa * svd.matrixV();
      const Eigen::VectorXd& sv = svd.singularValues();
      const Eigen::Index keep = std::min<Eigen::Index>(o_.rank, sv.size());
      const double all = sv.squaredNorm();
      const double tail = sv.size() > keep ? sv.tail(sv.size() - keep).squaredNorm() : 0.0;
      if (all > 0) worst = std::max(worst, std::sqrt(tail / all));
      std::vector<float>& da = m.delta[prefix + "lora_a"];
      std::vector<float>& db = m.delta[prefix + "lora_b"];
      da.assign(ga.size(), 0.0f);
      db.assign(gb.size(), 0.0f);
      for (Eigen::Index k = 0; k < o_.rank; ++k) {
        // Components beyond W's rank: B column 0 (no effect), A row kept from the global so the
        // component can still learn.
        const bool live = k < keep && sv(k) > 0;
        for (Eigen::Index i = 0; i < in; ++i) {
          const size_t p = static_cast<size_t>(k * in + i);
          da[p] = live ? static_cast<float>(v(i, k) - ga[p]) : 0.0f;
        }
        for (Eigen::Index o = 0; o < out; ++o) {
          const size_t p = static_cast<size_t>(o * o_.rank + k);
          db[p] = static_cast<float>((live ? u(o, k) * sv(k) / o_.scale : 0.0) - gb[p]);
        }
      }
      m.contributors[prefix + "lora_a"] = m.contributors[prefix + "lora_b"] = static_cast<int>(st.a.size());
    }
    m.metrics["hetero_truncation"] = worst;
    stacks_.clear();
    return m;
  }

 private:
  const HeteroRankOptions o_;
  const std::map<std::string, int64_t> ranks_, firsts_;
  const TensorMap& global_;
  std::unique_ptr<Aggregation> inner_;
  std::map<std::string, Stack> stacks_;
  int accepted_ = 0;
  int64_t examples_ = 0;
};

}  // namespace

std::unique_ptr<Aggregation> MakeHeteroRankAggregation(const HeteroRankOptions& o, std::map<std::string, int64_t> ranks, const TensorMap& global,
                                                       std::unique_ptr<Aggregation> inner, std::map<std::string, int64_t> firsts) {
  return std::make_unique<HeteroRankAggregation>(o, std::move(ranks), global, std::move(inner), std::move(firsts));
}

}  // namespace fedtune::aggregation

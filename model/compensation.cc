#include "model/compensation.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <string>

namespace fedtune::model {
namespace {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Top-r singular triplets of m from the smaller Gram matrix (exact up to rounding for the
// leading triplets, which is all a truncation needs). Returns L (rows x r) and R (r x cols).
void TruncatedSvd(const MatD& m, int64_t rank, MatD* l, MatD* r) {
  const int64_t rows = m.rows(), cols = m.cols();
  const int64_t k = std::min({rank, rows, cols});
  const bool tall = rows >= cols;
  const MatD g = tall ? MatD(m.transpose() * m) : MatD(m * m.transpose());
  Eigen::SelfAdjointEigenSolver<MatD> es(g);
  // Eigenvalues ascend: the last k are the largest.
  const int64_t n = g.rows();
  *l = MatD::Zero(rows, k);
  *r = MatD::Zero(k, cols);
  for (int64_t i = 0; i < k; ++i) {
    const double lambda = std::max(0.0, es.eigenvalues()(n - 1 - i));
    const double s = std::sqrt(lambda);
    if (s <= 0) continue;
    const Eigen::VectorXd vec = es.eigenvectors().col(n - 1 - i);
    const double rs = std::sqrt(s);
    if (tall) {  // vec is a right singular vector; u = m v / s
      l->col(i) = (m * vec) / s * rs;
      r->row(i) = vec.transpose() * rs;
    } else {     // vec is a left singular vector; v^T = u^T m / s
      l->col(i) = vec * rs;
      r->row(i) = (vec.transpose() * m) / s * rs;
    }
  }
}

LowRankFactors ToFactors(const MatD& l, const MatD& r) {
  LowRankFactors f;
  f.rows = l.rows();
  f.cols = r.cols();
  f.rank = l.cols();
  f.u.resize(static_cast<size_t>(f.rows * f.rank));
  f.v.resize(static_cast<size_t>(f.rank * f.cols));
  Eigen::Map<MatF>(f.u.data(), f.rows, f.rank) = l.cast<float>();
  Eigen::Map<MatF>(f.v.data(), f.rank, f.cols) = r.cast<float>();
  return f;
}

absl::Status QuantizeRows(kernels::GgmlType type, const MatD& w, std::vector<uint8_t>* bytes, MatD* deq) {
  const int64_t rows = w.rows(), cols = w.cols();
  FT_ASSIGN_OR_RETURN(size_t rb, kernels::RowBytes(type, cols));
  bytes->assign(rb * static_cast<size_t>(rows), 0);
  std::vector<float> row(static_cast<size_t>(cols)), back(row.size());
  deq->resize(rows, cols);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) row[static_cast<size_t>(j)] = static_cast<float>(w(i, j));
    uint8_t* dst = bytes->data() + static_cast<size_t>(i) * rb;
    FT_RETURN_IF_ERROR(kernels::QuantizeRow(type, row.data(), dst, cols));
    kernels::DequantizeRow(type, dst, back.data(), cols);
    for (int64_t j = 0; j < cols; ++j) (*deq)(i, j) = back[static_cast<size_t>(j)];
  }
  return absl::OkStatus();
}

}  // namespace

std::optional<CompensationMethod> ParseCompensationMethod(std::string_view s) {
  if (s == "none" || s.empty()) return CompensationMethod::kNone;
  if (s == "svd") return CompensationMethod::kSvd;
  if (s == "loftq") return CompensationMethod::kLoftQ;
  if (s == "cloq") return CompensationMethod::kCloq;
  return std::nullopt;
}

const char* CompensationMethodName(CompensationMethod m) {
  switch (m) {
    case CompensationMethod::kNone: return "none";
    case CompensationMethod::kSvd: return "svd";
    case CompensationMethod::kLoftQ: return "loftq";
    case CompensationMethod::kCloq: return "cloq";
  }
  return "?";
}

void CalibrationGram::Accumulate(const float* in, int64_t n_rows, int64_t n_cols) {
  if (x.empty()) cols = n_cols;
  FT_CHECK(n_cols == cols);
  x.insert(x.end(), in, in + n_rows * n_cols);
  rows += n_rows;
  h.clear();
  chol.clear();
}

const std::vector<double>& CalibrationGram::Gram() {
  if (h.empty()) {
    const Eigen::Map<const MatF> xm(x.data(), rows, cols);
    MatD g = (xm.transpose() * xm).cast<double>();
    h.resize(static_cast<size_t>(cols * cols));
    Eigen::Map<MatD>(h.data(), cols, cols) = 0.5 * (g + g.transpose());
  }
  return h;
}

absl::Status CalibrationGram::Prepare(double d) {
  if (!chol.empty() && d == damping) return absl::OkStatus();
  MatD hd = Eigen::Map<const MatD>(Gram().data(), cols, cols);
  lambda = d * std::max(hd.diagonal().mean(), 1e-12);
  hd.diagonal().array() += lambda;
  Eigen::LLT<MatD> llt(hd);
  if (llt.info() != Eigen::Success || !hd.allFinite())
    return absl::FailedPreconditionError("calibration inputs give no positive-definite X^T X + lambda I (non-finite activations?)");
  chol.resize(static_cast<size_t>(cols * cols));
  Eigen::Map<MatD>(chol.data(), cols, cols) = llt.matrixL();
  damping = d;
  return absl::OkStatus();
}

absl::StatusOr<CompensatedMatrix> QuantizeCompensated(const float* w, int64_t rows, int64_t cols, kernels::GgmlType type,
                                                      const CompensationOptions& o, CalibrationGram* gram) {
  if (rows <= 0 || cols <= 0) return absl::InvalidArgumentError("QuantizeCompensated: empty matrix");
  if (o.method != CompensationMethod::kNone && o.rank < 1) return absl::InvalidArgumentError("compensation rank must be >= 1");
  if (o.method == CompensationMethod::kLoftQ && o.iterations < 1) return absl::InvalidArgumentError("loftq iterations must be >= 1");
  if (gram != nullptr && gram->cols != cols)
    return absl::InvalidArgumentError(absl::StrCat("calibration inputs have width ", gram->cols, ", the matrix ", cols));
  if (o.method == CompensationMethod::kCloq && gram == nullptr) return absl::InvalidArgumentError("cloq needs calibration inputs");
  const MatD wd = Eigen::Map<const MatF>(w, rows, cols).cast<double>();
  CompensatedMatrix out;
  out.type = type;
  MatD q, l, r;
  switch (o.method) {
    case CompensationMethod::kNone:
      FT_RETURN_IF_ERROR(QuantizeRows(type, wd, &out.bytes, &q));
      l = MatD::Zero(rows, 0);
      r = MatD::Zero(0, cols);
      break;
    case CompensationMethod::kSvd:
    case CompensationMethod::kLoftQ: {
      const int iters = o.method == CompensationMethod::kSvd ? 1 : o.iterations;
      MatD res = wd;
      for (int it = 0; it < iters; ++it) {
        FT_RETURN_IF_ERROR(QuantizeRows(type, res, &out.bytes, &q));
        TruncatedSvd(wd - q, o.rank, &l, &r);
        if (it + 1 < iters) res = wd - l * r;
      }
      break;
    }
    case CompensationMethod::kCloq: {
      FT_RETURN_IF_ERROR(QuantizeRows(type, wd, &out.bytes, &q));
      FT_RETURN_IF_ERROR(gram->Prepare(o.damping));
      const Eigen::Map<const MatD> chol(gram->chol.data(), cols, cols);
      MatD lr;
      TruncatedSvd((wd - q) * chol.triangularView<Eigen::Lower>(), o.rank, &l, &lr);
      // r L = lr  <=>  L^T r^T = lr^T
      r = chol.transpose().triangularView<Eigen::Upper>().solve(lr.transpose()).transpose();
      break;
    }
  }
  const MatD e_before = wd - q;
  const MatD e_after = e_before - l * r;
  const double wn = std::max(wd.norm(), 1e-30);
  out.rel_before = e_before.norm() / wn;
  out.rel_after = e_after.norm() / wn;
  if (gram != nullptr) {
    const Eigen::Map<const MatD> h(gram->Gram().data(), cols, cols);
    auto hnorm = [&](const MatD& e) { return std::sqrt(std::max(0.0, (e * h).cwiseProduct(e).sum())); };
    const double base = std::max(hnorm(wd), 1e-30);
    out.act_before = hnorm(e_before) / base;
    out.act_after = hnorm(e_after) / base;
  }
  if (o.method != CompensationMethod::kNone) out.c = ToFactors(l, r);
  return out;
}

}  // namespace fedtune::model

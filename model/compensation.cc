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

// GPTQ's rounding of w (see compensation.h) with u the upper Cholesky factor of H^-1.
absl::Status GptqRows(kernels::GgmlType type, const MatD& w, const Eigen::Map<const MatD>& u, std::vector<uint8_t>* bytes,
                      MatD* deq) {
  if (type == kernels::GgmlType::kNF4DQ)
    return absl::InvalidArgumentError("gptq cannot round NF4_DQ (its block scales are quantized per row): use nf4");
  const int64_t rows = w.rows(), cols = w.cols();
  const auto tr = kernels::TypeTraits(type);
  const int64_t bs = tr.block_size;
  FT_ASSIGN_OR_RETURN(size_t rb, kernels::RowBytes(type, cols));
  bytes->assign(rb * static_cast<size_t>(rows), 0);
  const bool nf = kernels::IsNormalFloat(type);
  const int64_t nblocks = cols / bs;
  std::vector<float> scales(nf ? static_cast<size_t>(rows * nblocks) : 0);
  MatD wk = w;  // the weights as updated so far
  MatD q(rows, cols);
  MatD err(rows, bs);
  std::vector<float> buf(static_cast<size_t>(std::max<int64_t>(bs, cols))), back(buf.size());
  for (int64_t b = 0; b < cols; b += bs) {
    const int64_t rest = cols - b - bs;
    if (nf) {
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < bs; ++j) buf[static_cast<size_t>(j)] = static_cast<float>(wk(i, b + j));
        scales[static_cast<size_t>(i * nblocks + b / bs)] = kernels::NfBlockScale(type, buf.data());
      }
      for (int64_t j = 0; j < bs; ++j) {
        const int64_t c = b + j;
        const double d = u(c, c);
        for (int64_t i = 0; i < rows; ++i) {
          const double qv = kernels::NfRound(type, static_cast<float>(wk(i, c)), scales[static_cast<size_t>(i * nblocks + b / bs)]);
          q(i, c) = qv;
          err(i, j) = (wk(i, c) - qv) / d;
        }
        if (j + 1 < bs) wk.block(0, c + 1, rows, bs - j - 1).noalias() -= err.col(j) * u.block(c, c + 1, 1, bs - j - 1);
      }
    } else {
      FT_ASSIGN_OR_RETURN(size_t bb, kernels::RowBytes(type, bs));
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < bs; ++j) buf[static_cast<size_t>(j)] = static_cast<float>(wk(i, b + j));
        uint8_t* dst = bytes->data() + static_cast<size_t>(i) * rb + static_cast<size_t>(b / bs) * bb;
        FT_RETURN_IF_ERROR(kernels::QuantizeRow(type, buf.data(), dst, bs));
        kernels::DequantizeRow(type, dst, back.data(), bs);
        for (int64_t j = 0; j < bs; ++j) q(i, b + j) = back[static_cast<size_t>(j)];
      }
      // err = (W_b - Q_b) U_bb^-1, so that the update below is the block form.
      const MatD e = wk.block(0, b, rows, bs) - q.block(0, b, rows, bs);
      err = u.block(b, b, bs, bs).transpose().triangularView<Eigen::Lower>().solve(e.transpose()).transpose();
    }
    if (rest > 0) wk.rightCols(rest).noalias() -= err * u.block(b, b + bs, bs, rest);
  }
  if (nf) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) buf[static_cast<size_t>(j)] = static_cast<float>(q(i, j));
      uint8_t* dst = bytes->data() + static_cast<size_t>(i) * rb;
      FT_RETURN_IF_ERROR(kernels::QuantizeNfRowWithScales(type, buf.data(), scales.data() + i * nblocks, dst, cols));
    }
  }
  // What is stored is what counts (for the normal-float types the encoding reproduces q exactly).
  deq->resize(rows, cols);
  for (int64_t i = 0; i < rows; ++i) {
    kernels::DequantizeRow(type, bytes->data() + static_cast<size_t>(i) * rb, back.data(), cols);
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
  if (s == "gptq") return CompensationMethod::kGptq;
  if (s == "gptq-cloq") return CompensationMethod::kGptqCloq;
  return std::nullopt;
}

bool NeedsCalibration(CompensationMethod m) {
  return m == CompensationMethod::kCloq || m == CompensationMethod::kGptq || m == CompensationMethod::kGptqCloq;
}

bool HasCorrection(CompensationMethod m) { return m != CompensationMethod::kNone && m != CompensationMethod::kGptq; }

const char* CompensationMethodName(CompensationMethod m) {
  switch (m) {
    case CompensationMethod::kNone: return "none";
    case CompensationMethod::kSvd: return "svd";
    case CompensationMethod::kLoftQ: return "loftq";
    case CompensationMethod::kCloq: return "cloq";
    case CompensationMethod::kGptq: return "gptq";
    case CompensationMethod::kGptqCloq: return "gptq-cloq";
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
  inv_upper.clear();
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

absl::Status CalibrationGram::PrepareInverse(double d) {
  if (!inv_upper.empty() && d == inv_damping) return absl::OkStatus();
  FT_RETURN_IF_ERROR(Prepare(d));
  const Eigen::Map<const MatD> l(chol.data(), cols, cols);
  // (L L^T)^-1 = L^-T L^-1; its upper Cholesky factor U (H^-1 = U^T U).
  const MatD linv = l.triangularView<Eigen::Lower>().solve(MatD::Identity(cols, cols));
  const MatD hinv = linv.transpose() * linv;
  Eigen::LLT<MatD> llt(hinv);
  if (llt.info() != Eigen::Success) return absl::FailedPreconditionError("calibration: (X^T X + lambda I)^-1 is not positive definite");
  inv_upper.resize(static_cast<size_t>(cols * cols));
  Eigen::Map<MatD>(inv_upper.data(), cols, cols) = llt.matrixU();
  inv_damping = d;
  return absl::OkStatus();
}

absl::StatusOr<CompensatedMatrix> QuantizeCompensated(const float* w, int64_t rows, int64_t cols, kernels::GgmlType type,
                                                      const CompensationOptions& o, CalibrationGram* gram) {
  if (rows <= 0 || cols <= 0) return absl::InvalidArgumentError("QuantizeCompensated: empty matrix");
  if (HasCorrection(o.method) && o.rank < 1) return absl::InvalidArgumentError("compensation rank must be >= 1");
  if (o.method == CompensationMethod::kLoftQ && o.iterations < 1) return absl::InvalidArgumentError("loftq iterations must be >= 1");
  if (gram != nullptr && gram->cols != cols)
    return absl::InvalidArgumentError(absl::StrCat("calibration inputs have width ", gram->cols, ", the matrix ", cols));
  if (NeedsCalibration(o.method) && gram == nullptr)
    return absl::InvalidArgumentError(absl::StrCat(CompensationMethodName(o.method), " needs calibration inputs"));
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
    case CompensationMethod::kGptq:
    case CompensationMethod::kGptqCloq:
    case CompensationMethod::kCloq: {
      if (o.method == CompensationMethod::kCloq) {
        FT_RETURN_IF_ERROR(QuantizeRows(type, wd, &out.bytes, &q));
      } else {
        FT_RETURN_IF_ERROR(gram->PrepareInverse(o.damping));
        FT_RETURN_IF_ERROR(GptqRows(type, wd, Eigen::Map<const MatD>(gram->inv_upper.data(), cols, cols), &out.bytes, &q));
        if (o.method == CompensationMethod::kGptq) {
          l = MatD::Zero(rows, 0);
          r = MatD::Zero(0, cols);
          break;
        }
      }
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
  if (HasCorrection(o.method)) out.c = ToFactors(l, r);
  return out;
}

}  // namespace fedtune::model

// Quantization-error compensation (model/compensation.h): LoftQ against PEFT + bitsandbytes
// (tests/oracles/gen_loftq_golden.py), CLoQ's optimality in the calibrated norm, and the
// correction as part of the frozen base in a model's forward.
#include <chrono>
#include <cmath>
#include <filesystem>
#include <cstring>
#include <fstream>
#include <set>
#include <vector>

#include <Eigen/Dense>

#include "common/fp16.h"
#include "common/rng.h"
#include "gtest/gtest.h"
#include "model/compensation.h"
#include "model/export.h"
#include "model/llama.h"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

using kernels::GgmlType;

// u v as a dense rows x cols matrix.
std::vector<double> Product(const LowRankFactors& f) {
  std::vector<double> p(static_cast<size_t>(f.rows * f.cols), 0.0);
  for (int64_t i = 0; i < f.rows; ++i)
    for (int64_t k = 0; k < f.rank; ++k)
      for (int64_t j = 0; j < f.cols; ++j)
        p[static_cast<size_t>(i * f.cols + j)] += static_cast<double>(f.u[static_cast<size_t>(i * f.rank + k)]) * f.v[static_cast<size_t>(k * f.cols + j)];
  return p;
}

// PEFT's loftq_init loop with bitsandbytes' NF4 and PEFT's SVD split, one step and five: the
// same dequantized base (NF4 codes chosen identically but for rounding ties) and the same
// correction u v within float rounding of two SVD implementations.
TEST(LoftQTest, MatchesPeftAndBitsandbytesOneStepAndAlternating) {
  std::ifstream in(std::string(FEDTUNE_SOURCE_DIR) + "/tests/data/loftq_golden.bin", std::ios::binary);
  ASSERT_TRUE(in) << "missing tests/data/loftq_golden.bin";
  uint32_t hdr[4];
  ASSERT_TRUE(in.read(reinterpret_cast<char*>(hdr), sizeof hdr));
  const int64_t rows = hdr[0], cols = hdr[1], rank = hdr[2];
  const size_t n = static_cast<size_t>(rows * cols);
  std::vector<float> w(n);
  ASSERT_TRUE(in.read(reinterpret_cast<char*>(w.data()), static_cast<std::streamsize>(n * 4)));
  for (uint32_t c = 0; c < hdr[3]; ++c) {
    uint32_t iters;
    std::vector<float> q_ref(n), lr_ref(n);
    ASSERT_TRUE(in.read(reinterpret_cast<char*>(&iters), 4));
    ASSERT_TRUE(in.read(reinterpret_cast<char*>(q_ref.data()), static_cast<std::streamsize>(n * 4)));
    ASSERT_TRUE(in.read(reinterpret_cast<char*>(lr_ref.data()), static_cast<std::streamsize>(n * 4)));
    CompensationOptions o;
    o.method = iters == 1 ? CompensationMethod::kSvd : CompensationMethod::kLoftQ;
    o.rank = rank;
    o.iterations = static_cast<int>(iters);
    auto r = QuantizeCompensated(w.data(), rows, cols, GgmlType::kNF4, o, nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    std::vector<float> q(n);
    const size_t rb = *kernels::RowBytes(GgmlType::kNF4, cols);
    for (int64_t i = 0; i < rows; ++i) kernels::DequantizeRow(GgmlType::kNF4, r->bytes.data() + static_cast<size_t>(i) * rb, q.data() + i * cols, cols);
    size_t q_mismatch = 0;
    double lr_max = 0, lr_diff = 0, res_ref = 0, res = 0, wn = 0;
    const std::vector<double> lr = Product(r->c);
    for (size_t i = 0; i < n; ++i) {
      // A different code is a whole step (>= 4% of the block's absmax) off; from the second
      // step on, W - LR (hence absmax) may differ in the last float bits.
      if (std::fabs(q[i] - q_ref[i]) > 1e-5f * std::fabs(q_ref[i]) + 1e-9f) ++q_mismatch;
      lr_max = std::max(lr_max, std::fabs(static_cast<double>(lr_ref[i])));
      lr_diff = std::max(lr_diff, std::fabs(lr[i] - lr_ref[i]));
      res_ref += std::pow(static_cast<double>(w[i]) - q_ref[i] - lr_ref[i], 2);
      res += std::pow(static_cast<double>(w[i]) - q[i] - lr[i], 2);
      wn += static_cast<double>(w[i]) * w[i];
    }
    std::printf("LoftQ %u iteration(s), rank %lld: NF4 codes differing from bitsandbytes %zu of %zu; max |uv - LR| %.2e (max |LR| %.2e); "
                "residual %.6f (PEFT %.6f), before %.6f\n", iters, static_cast<long long>(rank), q_mismatch, n, lr_diff, lr_max,
                std::sqrt(res / wn), std::sqrt(res_ref / wn), r->rel_before);
    EXPECT_LE(q_mismatch, n / 1000) << iters;
    EXPECT_LE(lr_diff, 1e-3 * lr_max) << iters;
    EXPECT_NEAR(std::sqrt(res / wn), std::sqrt(res_ref / wn), 1e-4) << iters;
    EXPECT_NEAR(r->rel_after, std::sqrt(res / wn), 1e-6);
    EXPECT_LT(r->rel_after, r->rel_before);
  }
}

// CLoQ's correction minimises tr((E - C) H (E - C)^T) over rank-r C: no perturbation of its
// factors lowers it, and it beats the unweighted SVD correction in that norm (while the SVD
// correction is the better one in the plain Frobenius norm).
TEST(CompensationTest, CloqIsOptimalInTheCalibratedNorm) {
  const int64_t rows = 24, cols = 64, rank = 3, tokens = 200;
  Rng rng(5);
  std::vector<float> w(static_cast<size_t>(rows * cols)), x(static_cast<size_t>(tokens * cols));
  for (auto& v : w) v = static_cast<float>(rng.Normal()) * 0.05f;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < cols; ++j)  // a few strong channels, as in real activations
      x[static_cast<size_t>(t * cols + j)] = static_cast<float>(rng.Normal()) * (j % 16 == 0 ? 8.0f : 1.0f);
  CalibrationGram g;
  g.Accumulate(x.data(), tokens / 2, cols);
  g.Accumulate(x.data() + (tokens / 2) * cols, tokens - tokens / 2, cols);
  CompensationOptions o;
  o.rank = rank;
  o.damping = 1e-6;
  o.method = CompensationMethod::kCloq;
  auto cl = QuantizeCompensated(w.data(), rows, cols, GgmlType::kNF2, o, &g);
  ASSERT_TRUE(cl.ok()) << cl.status();
  o.method = CompensationMethod::kSvd;
  auto sv = QuantizeCompensated(w.data(), rows, cols, GgmlType::kNF2, o, &g);
  ASSERT_TRUE(sv.ok()) << sv.status();
  ASSERT_EQ(cl->bytes, sv->bytes);  // both keep Q = Q(W)
  std::printf("NF2 24x64, rank 3: calibrated error %.4f -> cloq %.4f, svd %.4f; weight error %.4f -> cloq %.4f, svd %.4f\n",
              cl->act_before, cl->act_after, sv->act_after, cl->rel_before, cl->rel_after, sv->rel_after);
  EXPECT_LT(cl->act_after, sv->act_after);
  EXPECT_LT(sv->rel_after, cl->rel_after);
  EXPECT_LT(cl->act_after, 0.95 * cl->act_before);
  // Objective at perturbed factors.
  std::vector<double> q(w.size());
  {
    std::vector<float> row(static_cast<size_t>(cols));
    const size_t rb = *kernels::RowBytes(GgmlType::kNF2, cols);
    for (int64_t i = 0; i < rows; ++i) {
      kernels::DequantizeRow(GgmlType::kNF2, cl->bytes.data() + static_cast<size_t>(i) * rb, row.data(), cols);
      for (int64_t j = 0; j < cols; ++j) q[static_cast<size_t>(i * cols + j)] = row[static_cast<size_t>(j)];
    }
  }
  auto objective = [&](const LowRankFactors& f) {
    const std::vector<double> c = Product(f);
    double s = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t i = 0; i < rows; ++i) {
        double e = 0;
        for (int64_t j = 0; j < cols; ++j) {
          const size_t k = static_cast<size_t>(i * cols + j);
          e += (w[k] - q[k] - c[k]) * x[static_cast<size_t>(t * cols + j)];
        }
        s += e * e;
      }
    }
    return s;
  };
  const double best = objective(cl->c);
  Rng prng(8);
  for (int trial = 0; trial < 20; ++trial) {
    LowRankFactors p = cl->c;
    for (auto& v : p.u) v += static_cast<float>(prng.Normal()) * 1e-2f * std::fabs(v);
    for (auto& v : p.v) v += static_cast<float>(prng.Normal()) * 1e-2f * std::fabs(v);
    EXPECT_GE(objective(p), best * (1 - 1e-6)) << "trial " << trial;
  }
  // Bad input is refused with a reason.
  o.method = CompensationMethod::kCloq;
  EXPECT_EQ(QuantizeCompensated(w.data(), rows, cols, GgmlType::kNF2, o, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  o.rank = 0;
  EXPECT_EQ(QuantizeCompensated(w.data(), rows, cols, GgmlType::kNF2, o, &g).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseCompensationMethod("loftq"), CompensationMethod::kLoftQ);
  EXPECT_EQ(ParseCompensationMethod("gptq"), CompensationMethod::kGptq);
  EXPECT_EQ(ParseCompensationMethod("gptq-cloq"), CompensationMethod::kGptqCloq);
  EXPECT_FALSE(ParseCompensationMethod("awq").has_value());
}

// Calibration inputs with a few strong, correlated channels (as real activations have).
std::vector<float> CorrelatedInputs(int64_t tokens, int64_t cols, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> x(static_cast<size_t>(tokens * cols));
  for (int64_t t = 0; t < tokens; ++t) {
    const double common = rng.Normal();
    for (int64_t j = 0; j < cols; ++j)
      x[static_cast<size_t>(t * cols + j)] = static_cast<float>((rng.Normal() + 0.7 * common) * (j % 16 == 0 ? 6.0 : 1.0));
  }
  return x;
}

std::vector<double> Dequantized(GgmlType t, const std::vector<uint8_t>& bytes, int64_t rows, int64_t cols) {
  std::vector<double> q(static_cast<size_t>(rows * cols));
  std::vector<float> row(static_cast<size_t>(cols));
  const size_t rb = *kernels::RowBytes(t, cols);
  for (int64_t i = 0; i < rows; ++i) {
    kernels::DequantizeRow(t, bytes.data() + static_cast<size_t>(i) * rb, row.data(), cols);
    for (int64_t j = 0; j < cols; ++j) q[static_cast<size_t>(i * cols + j)] = row[static_cast<size_t>(j)];
  }
  return q;
}

// GPTQ's lazy Cholesky updates against the definition they implement, solved densely here: once
// the columns before j are fixed at Q, the weights the remaining columns should take are
// W_f + (W - Q)_p H_pf H_ff^-1 (H with GPTQ's damping), the least calibrated error. Each
// normal-float column must be that value rounded with its block's scale, and each scale the
// quantizer's choice for that block's values when the block comes up; each block of another
// type must be the block quantizer's result on those values.
void ExpectOptimalContinuation(GgmlType type, int64_t rows, int64_t cols) {
  SCOPED_TRACE(kernels::TypeTraits(type).name);
  Rng rng(21);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (auto& v : w) v = static_cast<float>(rng.Normal()) * 0.05f;
  const int64_t tokens = 3 * cols;
  const std::vector<float> x = CorrelatedInputs(tokens, cols, 4);
  CalibrationGram g;
  g.Accumulate(x.data(), tokens, cols);
  CompensationOptions o;
  o.method = CompensationMethod::kGptq;
  auto r = QuantizeCompensated(w.data(), rows, cols, type, o, &g);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->c.rank, 0);
  const std::vector<double> q = Dequantized(type, r->bytes, rows, cols);
  const std::vector<double>& h0 = g.Gram();
  auto H = [&](int64_t a, int64_t b) { return h0[static_cast<size_t>(a * cols + b)] + (a == b ? g.lambda : 0.0); };
  // x_f for the columns from j on, given Q before j: solve H_ff z^T = H_fp e_p^T per row.
  auto continuation = [&](int64_t j) {
    const int64_t nf = cols - j;
    Eigen::MatrixXd hff(nf, nf), hfp(nf, j), ep(rows, j), wf(rows, nf);
    for (int64_t a = 0; a < nf; ++a) {
      for (int64_t b = 0; b < nf; ++b) hff(a, b) = H(j + a, j + b);
      for (int64_t b = 0; b < j; ++b) hfp(a, b) = H(j + a, b);
    }
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t b = 0; b < j; ++b) ep(i, b) = w[static_cast<size_t>(i * cols + b)] - q[static_cast<size_t>(i * cols + b)];
      for (int64_t a = 0; a < nf; ++a) wf(i, a) = w[static_cast<size_t>(i * cols + j + a)];
    }
    const Eigen::MatrixXd z = hff.llt().solve(hfp * ep.transpose());  // nf x rows
    return Eigen::MatrixXd(wf + z.transpose());
  };
  const auto tr = kernels::TypeTraits(type);
  const int64_t bs = tr.block_size;
  const size_t rb = *kernels::RowBytes(type, cols);
  int64_t mismatches = 0, checked = 0;
  std::vector<float> buf(static_cast<size_t>(bs)), enc(tr.type_size), back(static_cast<size_t>(bs));
  for (int64_t b = 0; b < cols; b += bs) {
    const Eigen::MatrixXd xb = continuation(b);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t k = 0; k < bs; ++k) buf[static_cast<size_t>(k)] = static_cast<float>(xb(i, k));
      if (kernels::IsNormalFloat(type)) {
        float stored;
        std::memcpy(&stored, r->bytes.data() + static_cast<size_t>(i) * rb + static_cast<size_t>(b / bs) * tr.type_size, 4);
        EXPECT_FLOAT_EQ(stored, kernels::NfBlockScale(type, buf.data())) << "row " << i << " block " << b / bs;
        continue;
      }
      ASSERT_TRUE(kernels::QuantizeRow(type, buf.data(), enc.data(), bs).ok());
      kernels::DequantizeRow(type, enc.data(), back.data(), bs);
      for (int64_t k = 0; k < bs; ++k, ++checked)
        mismatches += std::fabs(back[static_cast<size_t>(k)] - q[static_cast<size_t>(i * cols + b + k)]) > 1e-7;
    }
    if (!kernels::IsNormalFloat(type)) continue;
    for (int64_t j = b; j < b + bs; ++j) {
      const Eigen::MatrixXd xj = continuation(j);
      for (int64_t i = 0; i < rows; ++i, ++checked) {
        float scale;
        std::memcpy(&scale, r->bytes.data() + static_cast<size_t>(i) * rb + static_cast<size_t>(b / bs) * tr.type_size, 4);
        mismatches += std::fabs(kernels::NfRound(type, static_cast<float>(xj(i, 0)), scale) - q[static_cast<size_t>(i * cols + j)]) > 1e-7;
      }
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << checked;
}

TEST(GptqTest, EveryColumnRoundsTheBestContinuationOfTheColumnsBefore) {
  ExpectOptimalContinuation(GgmlType::kNF3, 6, 128);
  ExpectOptimalContinuation(GgmlType::kNF4, 4, 128);
  ExpectOptimalContinuation(GgmlType::kQ4_0, 4, 96);
  ExpectOptimalContinuation(GgmlType::kQ3_K, 3, 512);
}

// With uncorrelated calibration channels (X^T X diagonal) no error has anywhere to go: GPTQ
// stores exactly what the plain quantizer stores.
TEST(GptqTest, DiagonalCalibrationRoundsAsThePlainQuantizer) {
  for (GgmlType t : {GgmlType::kNF4, GgmlType::kNF3, GgmlType::kNF2, GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_1,
                     GgmlType::kQ3_K, GgmlType::kQ2_K}) {
    SCOPED_TRACE(kernels::TypeTraits(t).name);
    const int64_t rows = 5, cols = 256;
    Rng rng(9);
    std::vector<float> w(static_cast<size_t>(rows * cols)), x(static_cast<size_t>(cols * cols), 0.0f);
    for (auto& v : w) v = static_cast<float>(rng.Normal()) * 0.05f;
    for (int64_t j = 0; j < cols; ++j) x[static_cast<size_t>(j * cols + j)] = 0.5f + static_cast<float>(j % 7);
    CalibrationGram g;
    g.Accumulate(x.data(), cols, cols);
    CompensationOptions o;
    o.method = CompensationMethod::kGptq;
    auto gq = QuantizeCompensated(w.data(), rows, cols, t, o, &g);
    o.method = CompensationMethod::kNone;
    auto rtn = QuantizeCompensated(w.data(), rows, cols, t, o, &g);
    ASSERT_TRUE(gq.ok() && rtn.ok()) << gq.status() << rtn.status();
    EXPECT_EQ(gq->bytes, rtn->bytes);
  }
}

// On correlated inputs GPTQ's rounding lowers the error the outputs see for every block type,
// and CLoQ's correction on top lowers it further; NF4_DQ is refused with the reason.
TEST(GptqTest, LowersTheCalibratedErrorForEveryBlockType) {
  const int64_t rows = 16, cols = 512, tokens = 600;
  Rng rng(13);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (auto& v : w) v = static_cast<float>(rng.Normal()) * 0.05f;
  const std::vector<float> x = CorrelatedInputs(tokens, cols, 6);
  CalibrationGram g;
  g.Accumulate(x.data(), tokens, cols);
  for (GgmlType t : {GgmlType::kNF4, GgmlType::kNF3, GgmlType::kNF2, GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_1,
                     GgmlType::kQ5_0, GgmlType::kQ3_K, GgmlType::kQ2_K}) {
    SCOPED_TRACE(kernels::TypeTraits(t).name);
    CompensationOptions o;
    o.rank = 4;
    auto rtn = QuantizeCompensated(w.data(), rows, cols, t, o, &g);
    o.method = CompensationMethod::kGptq;
    auto gq = QuantizeCompensated(w.data(), rows, cols, t, o, &g);
    o.method = CompensationMethod::kGptqCloq;
    auto gc = QuantizeCompensated(w.data(), rows, cols, t, o, &g);
    ASSERT_TRUE(rtn.ok() && gq.ok() && gc.ok());
    std::printf("%-5s calibrated error: plain %.4f, gptq %.4f, gptq-cloq r4 %.4f (weight error %.4f -> %.4f)\n", kernels::TypeTraits(t).name,
                rtn->act_before, gq->act_before, gc->act_after, rtn->rel_before, gq->rel_before);
    EXPECT_LT(gq->act_before, 0.9 * rtn->act_before);
    EXPECT_EQ(gc->bytes, gq->bytes);
    EXPECT_EQ(gc->c.rank, 4);
    EXPECT_LT(gc->act_after, gq->act_before);
  }
  CompensationOptions o;
  o.method = CompensationMethod::kGptq;
  auto dq = QuantizeCompensated(w.data(), rows, cols, GgmlType::kNF4DQ, o, &g);
  EXPECT_EQ(dq.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(dq.status().message().find("NF4_DQ"), std::string::npos);
  EXPECT_EQ(QuantizeCompensated(w.data(), rows, cols, GgmlType::kNF3, o, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

// Sequential calibration's building block: a pass limited to the first n layers shows layer
// n-1 exactly the inputs a full pass shows it, runs nothing after it and writes no logits.
TEST(CompensationTest, ALayerLimitedPassSeesWhatAFullPassSees) {
  testing::TinyModelOptions to;
  const std::string path = testing::TempPath("layer_limit.gguf");
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, to).ok());
  auto m = LlamaModel::Load(path);
  ASSERT_TRUE(m.ok()) << m.status();
  const int64_t nl = (*m)->config().n_layer;
  ASSERT_GE(nl, 2);
  std::vector<int32_t> tokens(30);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(3 + (i * 37) % 200);
  std::vector<std::vector<float>> full(static_cast<size_t>(nl)), limited(static_cast<size_t>(nl));
  int64_t deepest = -1;
  std::vector<float> logits;
  {
    LlamaContext ctx(**m, 64);
    ctx.SetInputObserver([&](int64_t l, Module mod, const float* in, int64_t rows, int64_t cols) {
      if (mod == Module::kDown) full[static_cast<size_t>(l)].assign(in, in + rows * cols);
    });
    ASSERT_TRUE(ctx.Eval(tokens, false, &logits).ok());
    EXPECT_FALSE(logits.empty());
  }
  for (int64_t n = 1; n <= nl; ++n) {
    LlamaContext ctx(**m, 64);
    ctx.SetLayerLimit(n);
    ctx.SetInputObserver([&](int64_t l, Module mod, const float* in, int64_t rows, int64_t cols) {
      deepest = std::max(deepest, l);
      if (mod == Module::kDown && l == n - 1) limited[static_cast<size_t>(l)].assign(in, in + rows * cols);
    });
    ASSERT_TRUE(ctx.Eval(tokens, false, &logits).ok());
    EXPECT_EQ(deepest, n - 1);
    EXPECT_EQ(logits.empty(), n < nl);
    EXPECT_EQ(limited[static_cast<size_t>(n - 1)], full[static_cast<size_t>(n - 1)]) << "layer " << n - 1;
  }
  // One layer at a time from the hidden states of the one before (RequantizeCompensated's
  // passes): each layer sees exactly the full pass's inputs.
  std::vector<float> hidden;
  for (int64_t l = 0; l < nl; ++l) {
    LlamaContext ctx(**m, 64);
    std::vector<int64_t> seen;
    std::vector<float> down;
    ctx.SetInputObserver([&](int64_t layer, Module mod, const float* in, int64_t rows, int64_t cols) {
      seen.push_back(layer);
      if (mod == Module::kDown) down.assign(in, in + rows * cols);
    });
    ctx.SetHidden(l, &hidden);
    ctx.SetLayerLimit(l + 1);
    ASSERT_TRUE(ctx.Eval(tokens, false, &logits).ok());
    EXPECT_TRUE(logits.empty());
    EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()), std::set<int64_t>{l});
    EXPECT_EQ(down, full[static_cast<size_t>(l)]) << "layer " << l;
    EXPECT_EQ(hidden.size(), tokens.size() * static_cast<size_t>((*m)->config().n_embd));
  }
  std::vector<float> wrong(3);
  LlamaContext bad(**m, 64);
  bad.SetHidden(1, &wrong);
  EXPECT_EQ(bad.Eval(tokens, false, &logits).code(), absl::StatusCode::kInvalidArgument);
}

// A compensated model computes what the plain re-quantized model computes with the correction
// as a LoRA adapter (A = v, B = u, scale 1): the correction is part of the base in Eval.
TEST(CompensationTest, CompensatedModelEqualsTheCorrectionAsAnAdapter) {
  testing::TinyModelOptions to;
  to.n_embd = 64;
  to.n_ff = 128;
  to.weight_type = GgmlType::kQ8_0;
  const std::string path = testing::TempPath("compensated.gguf");
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, to).ok());
  auto m1 = LlamaModel::Load(path);
  auto m2 = LlamaModel::Load(path);
  ASSERT_TRUE(m1.ok() && m2.ok());
  Rng rng(3);
  std::vector<int32_t> calib(300), tokens(20);
  for (auto& t : calib) t = static_cast<int32_t>(3 + rng.Below(250));
  for (auto& t : tokens) t = static_cast<int32_t>(3 + rng.Below(250));
  CompensationOptions o;
  o.method = CompensationMethod::kCloq;
  o.rank = 4;
  auto rep = (*m1)->RequantizeCompensated(GgmlType::kQ3_K, o, calib);  // 64/128-wide rows: NF3
  ASSERT_TRUE(rep.ok()) << rep.status();
  ASSERT_TRUE((*m2)->Requantize(GgmlType::kQ3_K).ok());
  const auto& cfg = (*m1)->config();
  ASSERT_EQ(rep->modules.size(), static_cast<size_t>(cfg.n_layer * kNumModules));
  for (const auto& e : rep->modules) {
    EXPECT_EQ(e.type, GgmlType::kNF3);
    EXPECT_LT(e.act_after, e.act_before) << "layer " << e.layer << " " << ModuleName(e.module);
  }
  EXPECT_EQ((*m1)->ProjectionBytes(), (*m2)->ProjectionBytes());
  EXPECT_GT(rep->correction_bytes, 0u);
  AdapterSet<float> set;
  set.layers.resize(static_cast<size_t>(cfg.n_layer));
  for (int64_t l = 0; l < cfg.n_layer; ++l) {
    for (int mod = 0; mod < kNumModules; ++mod) {
      const LowRankCorrection& c = (*m1)->layer(l).corr[static_cast<size_t>(mod)];
      ASSERT_TRUE(c.present());
      AdapterSpec spec{AdapterKind::kLora, o.rank, static_cast<float>(o.rank), false, 4};
      auto a = ModuleAdapter<float>::Create(spec, c.v.cols, c.u.rows, 1);
      ASSERT_TRUE(a.ok());
      for (int64_t r = 0; r < c.v.rows; ++r) kernels::DequantizeRow(c.v.type, c.v.row(r), a->a.data() + r * c.v.cols, c.v.cols);
      for (int64_t r = 0; r < c.u.rows; ++r) kernels::DequantizeRow(c.u.type, c.u.row(r), a->b.data() + r * c.u.cols, c.u.cols);
      set.layers[static_cast<size_t>(l)][mod] = std::move(*a);
    }
  }
  LlamaContext c1(**m1, 64), c2(**m2, 64), c3(**m2, 64);
  c2.SetAdapters(&set);
  std::vector<float> l1, l2, l3;
  ASSERT_TRUE(c1.Eval(tokens, true, &l1).ok());
  ASSERT_TRUE(c2.Eval(tokens, true, &l2).ok());
  ASSERT_TRUE(c3.Eval(tokens, true, &l3).ok());
  double scale = 0, diff = 0, plain = 0;
  for (size_t i = 0; i < l1.size(); ++i) {
    scale = std::max(scale, std::fabs(static_cast<double>(l2[i])));
    diff = std::max(diff, std::fabs(static_cast<double>(l1[i]) - l2[i]));
    plain = std::max(plain, std::fabs(static_cast<double>(l1[i]) - l3[i]));
  }
  std::printf("compensated vs correction-as-adapter: max |diff| %.2e of %.2e (vs the uncompensated base: %.2e)\n", diff, scale, plain);
  EXPECT_LE(diff, 1e-4 * scale);
  EXPECT_GT(plain, 100 * diff);

  // Merged export of the compensated model with a trained-looking adapter: W ~ Q + C + delta in
  // F32, reloaded as a plain model, computes what the compensated model with the adapter does.
  AdapterSet<float> trained;
  trained.layers.resize(static_cast<size_t>(cfg.n_layer));
  const auto dims = (*m1)->adapter_dims();
  auto made = MakeAdaptersWithLayout<float>(dims, AdapterSpec{AdapterKind::kLora, 2, 4.0f, false, 4}, {Module::kQ, Module::kDown}, "", 7);
  ASSERT_TRUE(made.ok()) << made.status();
  trained = std::move(*made);
  for (auto& layer : trained.layers)
    for (auto& a : layer)
      if (a) for (auto& x : a->b) x = static_cast<float>(rng.Normal()) * 0.05f;
  const std::string merged = testing::TempPath("compensated_merged.gguf");
  ASSERT_TRUE(ExportMergedGguf(merged, **m1, trained, GgmlType::kF32).ok());
  auto m3 = LlamaModel::Load(merged);
  ASSERT_TRUE(m3.ok()) << m3.status();
  LlamaContext c4(**m1, 64), c5(**m3, 64);
  c4.SetAdapters(&trained);
  std::vector<float> l4, l5;
  ASSERT_TRUE(c4.Eval(tokens, true, &l4).ok());
  ASSERT_TRUE(c5.Eval(tokens, true, &l5).ok());
  double mdiff = 0, mscale = 0;
  for (size_t i = 0; i < l4.size(); ++i) {
    mscale = std::max(mscale, std::fabs(static_cast<double>(l4[i])));
    mdiff = std::max(mdiff, std::fabs(static_cast<double>(l4[i]) - l5[i]));
  }
  std::printf("merged export (Q + C + delta, F32) vs the compensated model with its adapter: max |diff| %.2e of %.2e\n", mdiff, mscale);
  EXPECT_LE(mdiff, 1e-4 * mscale);
}

// The compensation cache (LlamaModel::RequantizeCompensated with a folder): a second start reads
// back exactly the computed base (bytes, corrections, logits, report); any change of the inputs
// (calibration, damping, rank, the model file) computes anew; a damaged file is recomputed and
// replaced; at most 4 files stay.
TEST(CompensationTest, ACachedBaseIsTheComputedOneAndChangedInputsRecompute) {
  namespace fs = std::filesystem;
  testing::TinyModelOptions to;
  to.n_embd = 64;
  to.n_ff = 128;
  to.weight_type = GgmlType::kQ8_0;
  const std::string path = testing::TempPath("cached_base.gguf");
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, to).ok());
  const std::string dir = testing::TempPath("compensation_cache");
  fs::remove_all(dir);
  Rng rng(5);
  std::vector<int32_t> calib(300), tokens(20);
  for (auto& t : calib) t = static_cast<int32_t>(3 + rng.Below(250));
  for (auto& t : tokens) t = static_cast<int32_t>(3 + rng.Below(250));
  CompensationOptions o;
  o.method = CompensationMethod::kCloq;
  o.rank = 4;
  auto run = [&](const CompensationOptions& opt, const std::vector<int32_t>& cal, std::unique_ptr<LlamaModel>* out) {
    auto m = LlamaModel::Load(path);
    EXPECT_TRUE(m.ok()) << m.status();
    auto rep = (*m)->RequantizeCompensated(GgmlType::kQ3_K, opt, cal, dir);
    EXPECT_TRUE(rep.ok()) << rep.status();
    *out = std::move(*m);
    return *rep;
  };
  auto same = [&](const LlamaModel& a, const LlamaModel& b) {
    auto bytes = [](const kernels::QMatrix& q) { return std::vector<uint8_t>(q.data, q.data + q.row_bytes * static_cast<size_t>(q.rows)); };
    for (int64_t l = 0; l < a.config().n_layer; ++l) {
      for (int mi = 0; mi < kNumModules; ++mi) {
        const Module mod = static_cast<Module>(mi);
        if (a.layer(l).Projection(mod).type != b.layer(l).Projection(mod).type) return false;
        if (bytes(a.layer(l).Projection(mod)) != bytes(b.layer(l).Projection(mod))) return false;
        const LowRankCorrection &ca = a.layer(l).corr[static_cast<size_t>(mi)], &cb = b.layer(l).corr[static_cast<size_t>(mi)];
        if (ca.present() != cb.present()) return false;
        if (ca.present() && (bytes(ca.u) != bytes(cb.u) || bytes(ca.v) != bytes(cb.v))) return false;
      }
    }
    return true;
  };
  std::unique_ptr<LlamaModel> m1, m2, m3;
  const LlamaModel::CompensationReport r1 = run(o, calib, &m1);
  EXPECT_FALSE(r1.cache_hit);
  ASSERT_FALSE(r1.cache_path.empty());
  ASSERT_TRUE(fs::exists(r1.cache_path));
  const LlamaModel::CompensationReport r2 = run(o, calib, &m2);
  EXPECT_TRUE(r2.cache_hit);
  EXPECT_EQ(r2.cache_path, r1.cache_path);
  EXPECT_TRUE(same(*m1, *m2));
  EXPECT_EQ(r2.projection_bytes, r1.projection_bytes);
  EXPECT_EQ(r2.correction_bytes, r1.correction_bytes);
  ASSERT_EQ(r2.modules.size(), r1.modules.size());
  for (size_t i = 0; i < r1.modules.size(); ++i) {
    EXPECT_EQ(r2.modules[i].type, r1.modules[i].type);
    EXPECT_NEAR(r2.modules[i].rel_after, r1.modules[i].rel_after, 1e-6);
    EXPECT_NEAR(r2.modules[i].act_before, r1.modules[i].act_before, 1e-6);
  }
  EXPECT_NE(r2.Summary().find("read from the cache"), std::string::npos) << r2.Summary();
  {
    LlamaContext c1(*m1, 64), c2(*m2, 64);
    std::vector<float> l1, l2;
    ASSERT_TRUE(c1.Eval(tokens, true, &l1).ok());
    ASSERT_TRUE(c2.Eval(tokens, true, &l2).ok());
    EXPECT_EQ(l1, l2);
  }
  // Changed inputs: each computes and writes its own file.
  std::vector<int32_t> calib2 = calib;
  calib2[7] ^= 1;
  CompensationOptions damped = o, ranked = o;
  damped.damping = 0.1;
  ranked.rank = 2;
  std::set<std::string> files{r1.cache_path};
  for (const auto& [opt, cal] : std::vector<std::pair<CompensationOptions, std::vector<int32_t>>>{{o, calib2}, {damped, calib}, {ranked, calib}}) {
    const auto r = run(opt, cal, &m3);
    EXPECT_FALSE(r.cache_hit);
    EXPECT_TRUE(files.insert(r.cache_path).second) << r.cache_path;
  }
  EXPECT_FALSE(same(*m1, *m3));  // rank 2
  // A damaged file: recomputed, replaced, and read again the next time.
  {
    const auto size = fs::file_size(r1.cache_path);
    fs::resize_file(r1.cache_path, size / 2);
  }
  const LlamaModel::CompensationReport r4 = run(o, calib, &m3);
  EXPECT_FALSE(r4.cache_hit);
  EXPECT_TRUE(same(*m1, *m3));
  EXPECT_TRUE(run(o, calib, &m3).cache_hit);
  // One flipped bit in the tensor data (the file still parses): the checksum catches it.
  {
    std::fstream f(r1.cache_path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-100, std::ios::end);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(-100, std::ios::end);
    f.write(&c, 1);
  }
  const LlamaModel::CompensationReport r4b = run(o, calib, &m3);
  EXPECT_FALSE(r4b.cache_hit);
  EXPECT_TRUE(same(*m1, *m3));
  EXPECT_TRUE(run(o, calib, &m3).cache_hit);
  // The model file changes (a newer modification time): computed anew under another name.
  fs::last_write_time(path, fs::last_write_time(path) + std::chrono::seconds(5));
  const LlamaModel::CompensationReport r5 = run(o, calib, &m3);
  EXPECT_FALSE(r5.cache_hit);
  EXPECT_NE(r5.cache_path, r1.cache_path);
  // Five distinct results so far: the least recently used one went.
  size_t n = 0;
  for (const auto& e : fs::directory_iterator(dir)) n += e.path().extension() == ".gguf";
  EXPECT_EQ(n, 4u);
  EXPECT_TRUE(fs::exists(r5.cache_path));
  EXPECT_TRUE(fs::exists(r1.cache_path));  // read last before r5: kept
}

}  // namespace
}  // namespace fedtune::model

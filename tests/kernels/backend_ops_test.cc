// Every op of every available backend against the cpu-ref backend, over many shapes (odd
// sizes, GQA ratios, sequence lengths, packed rows, ranks, block counts, block formats), by
// normalised mean squared error with a per-op tolerance: the ggml test-backend-ops habit.
// Non-finite values must appear exactly where the reference has them. Backends that are not
// available here (CUDA without a GPU) are skipped with the reason.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/fp16.h"
#include "kernels/backend.h"
#include "kernels/bf16_gemm.h"
#include "kernels/cpu_features.h"
#ifdef FEDTUNE_CUDA_EMULATED
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/host_emulation.h"
#endif
#include "kernels/quant.h"
#include "kernels/thread_pool.h"
#include "model/dataset.h"
#include "model/llama.h"
#include "model/optimizer.h"
#include "model/trainer.h"
#include "tests/support/tiny_model.h"

namespace fedtune::kernels {
namespace {

using Vec = std::vector<float>;

Vec Random(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  Vec v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// NMSE = sum (got - ref)^2 / sum ref^2; fails on non-finite mismatches.
double Nmse(const Vec& ref, const Vec& got, const std::string& what) {
  EXPECT_EQ(ref.size(), got.size()) << what;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    if (!std::isfinite(ref[i]) || !std::isfinite(got[i])) {
      EXPECT_EQ(std::isnan(ref[i]), std::isnan(got[i])) << what << " at " << i << ": ref " << ref[i] << " got " << got[i];
      if (std::isinf(ref[i])) {
        EXPECT_EQ(ref[i], got[i]) << what << " at " << i;
      }
      continue;
    }
    num += (static_cast<double>(got[i]) - ref[i]) * (static_cast<double>(got[i]) - ref[i]);
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return den > 0 ? num / den : num;
}

// Matmul-type ops: a GPU may multiply in TF32/bf16 (ggml allows 5e-4 for its matmuls).
constexpr double kGemmTol = 5e-4;
constexpr double kElemTol = 1e-10;  // element-wise float ops (vectorised exp: ~2e-7 relative)
constexpr double kSoftTol = 1e-8;   // softmax-based ops

class BackendOps : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (OnCuda()) {
#ifdef FEDTUNE_CUDA_EMULATED
      // This binary links kernels/cuda/cuda_backend.cu compiled against the host emulation
      // (an sm_90 device): "cuda" is its default (bf16 products with the weights),
      // "cuda-tf32" / "cuda-fp32" the other precisions, for the ops they change.
      static auto* const emulated = new std::map<std::string, Backend*>;  // never destroyed, like CudaBackend()
      Backend*& b = (*emulated)[GetParam()];
      if (b == nullptr) {
        const CudaGemm gemm = GetParam() == "cuda-tf32" ? CudaGemm::kTf32 : GetParam() == "cuda-fp32" ? CudaGemm::kFp32 : CudaGemm::kAuto;
        std::string why;
        b = MakeCudaBackend(&why, gemm).release();
        ASSERT_NE(b, nullptr) << why;
      }
      be_ = b;
      return;
#endif
      be_ = CudaBackend();
      if (be_ == nullptr) GTEST_SKIP() << "CUDA backend unavailable: " << CudaUnavailableReason();
    } else if (GetParam() == "cpu-bf16") {
      be_ = CpuBf16Backend();
      if (be_ == nullptr) GTEST_SKIP() << "cpu-bf16 unavailable: " << CpuBf16UnavailableReason();
    } else {
      be_ = &CpuFastBackend();
    }
  }
  // Products with the weights in bf16: "cuda" (default precision) and "cpu-bf16".
  bool Bf16Products() const { return GetParam() == "cuda" || GetParam() == "cpu-bf16"; }
  bool OnCuda() const { return GetParam().rfind("cuda", 0) == 0; }
  // cpu-bf16 multiplies attention's scores and probabilities in bf16 too (passes of 64 rows or
  // more; fewer stay cpu-fast, at its tolerance).
  bool Bf16Attention() const { return GetParam() == "cpu-bf16"; }
  // What `op` writes into a fresh backend buffer of n values, read back through Copy.
  template <typename F>
  Vec ThroughBuffer(int64_t n, F op) {
    float* buf = be_->AllocBuffer(n);
    op(buf);
    Vec got(static_cast<size_t>(n), -1.0f);
    be_->Copy(buf, got.data(), n);
    be_->FreeBuffer(buf);
    return got;
  }
  // "cuda" multiplies with the weights in bf16 (its default on sm_80+, and in the emulation).
  // A summed loss then moves by ~2e-3 relative (1e-3 elsewhere); and AdamW, which scales each
  // gradient element to a unit step, turns the rounding noise of near-zero gradient elements
  // into full-size updates, so parameters after a few steps differ by more than one product does.
  double LossRelTol() const { return Bf16Products() ? 5e-3 : 1e-3; }
  double TrainedParamTol() const { return Bf16Products() ? 4 * kGemmTol : kGemmTol; }
  // Runs `check` if the backend has the op; counts the comparisons.
  void Expect(Op op, const Vec& ref, const Vec& got, double tol, const std::string& shape) {
    const double e = Nmse(ref, got, std::string(OpName(op)) + " " + shape);
    EXPECT_LE(e, tol) << be_->Name() << " " << OpName(op) << " " << shape << ": NMSE " << e;
    worst_[static_cast<size_t>(op)] = std::max(worst_[static_cast<size_t>(op)], e);
    ++checks_;
  }
  bool Has(Op op) {
    if (be_->Supports(op)) return true;
    std::printf("[ info ] %s does not support %s (falls back to cpu-fast)\n", be_->Name(), OpName(op));
    return false;
  }
  void TearDown() override {
    if (be_ == nullptr) return;
    for (int i = 0; i < static_cast<int>(Op::kCount); ++i) {
      if (worst_[static_cast<size_t>(i)] >= 0) {
        std::printf("[ nmse ] %-20s %-18s worst %.2e\n", be_->Name(), OpName(static_cast<Op>(i)), worst_[static_cast<size_t>(i)]);
      }
    }
  }
  Backend* be_ = nullptr;
  Backend& ref_ = CpuReferenceBackend();
  std::mt19937 rng_{42};
  std::vector<double> worst_ = std::vector<double>(static_cast<size_t>(Op::kCount), -1.0);
  int checks_ = 0;
};

// The ops with products with the frozen weights: the emulated build also runs them on the
// cuda-tf32 / cuda-fp32 variants, which differ from cuda only there.
class WeightProducts : public BackendOps {};

struct QuantWeight {
  std::vector<uint8_t> bytes;
  QMatrix m;
};
QuantWeight Quantize(GgmlType t, int64_t rows, int64_t cols, std::mt19937& rng) {
  QuantWeight w;
  const Vec src = Random(static_cast<size_t>(rows * cols), rng, 0.5f);
  const size_t rb = *RowBytes(t, cols);
  w.bytes.resize(rb * static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_TRUE(QuantizeRow(t, src.data() + r * cols, w.bytes.data() + static_cast<size_t>(r) * rb, cols).ok());
  }
  w.m = QMatrix{t, w.bytes.data(), rows, cols, rb};
  return w;
}

TEST_P(WeightProducts, QuantizedLinear) {
  using Shapes = std::vector<std::tuple<int64_t, int64_t, int64_t>>;
  const Shapes shapes = {{1, 7, 64}, {3, 65, 128}, {17, 130, 64}, {64, 257, 256}, {33, 600, 576}, {130, 576, 576}};
  const Shapes k_quant_shapes = {{1, 7, 256}, {17, 130, 512}, {33, 576, 1536}};  // rows of 256-value super-blocks
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kNF4, GgmlType::kNF3,
                     GgmlType::kNF2, GgmlType::kQ3_K, GgmlType::kQ2_K}) {
    const bool k_quant = TypeTraits(t).block_size == 256;
    for (auto [m, n, k] : k_quant ? k_quant_shapes : shapes) {
      const QuantWeight w = Quantize(t, n, k, rng_);
      const std::string shape = std::string(TypeTraits(t).name) + " m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k);
      const Vec x = Random(static_cast<size_t>(m * k), rng_);
      if (Has(Op::kQLinearForward)) {
        Vec y_ref(static_cast<size_t>(m * n)), y(y_ref.size());
        ref_.QLinearForward(w.m, x.data(), y_ref.data(), m);
        be_->QLinearForward(w.m, x.data(), y.data(), m);
        Expect(Op::kQLinearForward, y_ref, y, kGemmTol, shape);
      }
      if (Has(Op::kQLinearBackward)) {
        const Vec dy = Random(static_cast<size_t>(m * n), rng_);
        Vec dx_ref = Random(static_cast<size_t>(m * k), rng_), dx = dx_ref;  // accumulates
        ref_.QLinearBackward(w.m, dy.data(), dx_ref.data(), m);
        be_->QLinearBackward(w.m, dy.data(), dx.data(), m);
        Expect(Op::kQLinearBackward, dx_ref, dx, kGemmTol, shape);
      }
    }
  }
}

// A frozen linear layer and its LoRA adapter in one call (cpu-bf16 folds them into one
// product) against the reference's two ops: y and z forward; dx, dA, dB backward (dA null for
// FFA-LoRA); passes of fewer and more than 64 rows.
TEST_P(WeightProducts, LinearWithLoraInOneCall) {
  using Shapes = std::vector<std::tuple<int64_t, int64_t, int64_t>>;  // m, n (out), k (in)
  for (GgmlType t : {GgmlType::kQ4_1, GgmlType::kQ8_0}) {
    for (auto [m, n, k] : Shapes{{5, 65, 128}, {130, 576, 576}, {129, 192, 576}, {70, 576, 1536}}) {
      for (int64_t r : {1, 16}) {
        for (bool frozen_a : {false, true}) {
          const QuantWeight w = Quantize(t, n, k, rng_);
          const std::string shape = std::string(TypeTraits(t).name) + " m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" +
                                    std::to_string(k) + " r=" + std::to_string(r) + (frozen_a ? " frozen A" : "");
          const Vec x = Random(static_cast<size_t>(m * k), rng_), a = Random(static_cast<size_t>(r * k), rng_),
                    b = Random(static_cast<size_t>(n * r), rng_), dy = Random(static_cast<size_t>(m * n), rng_);
          const float scale = 2.0f;
          // y and z are written, not added to: they start as NaN.
          Vec y_ref(static_cast<size_t>(m * n)), y(y_ref.size(), NAN), z_ref(static_cast<size_t>(m * r)), z(z_ref.size(), NAN);
          ref_.QLinearForward(w.m, x.data(), y_ref.data(), m);
          ref_.LoraForward(x.data(), a.data(), b.data(), z_ref.data(), y_ref.data(), m, k, r, n, scale);
          be_->QLinearLoraForward(w.m, x.data(), a.data(), b.data(), z.data(), y.data(), m, r, scale);
          Expect(Op::kQLinearForward, y_ref, y, kGemmTol, shape + " y");
          Expect(Op::kLoraForward, z_ref, z, kGemmTol, shape + " z");
          // cpu-bf16 really folds the adapter in from 64 rows: z comes from the bf16 copy of x
          // (its own fp32 LoRA op would give z within ~1e-14).
          if (GetParam() == "cpu-bf16" && m >= 64) {
            EXPECT_GT(Nmse(z_ref, z, shape + " z"), 1e-9) << shape << ": z not from bf16 operands";
          }
          // All three accumulate: start values as large as the increments (~sqrt(m k)), so that
          // dropping them fails.
          Vec dx_ref = Random(static_cast<size_t>(m * k), rng_, 300.0f), da_ref = Random(a.size(), rng_, 300.0f), db_ref = Random(b.size(), rng_, 300.0f);
          Vec dx = dx_ref, da = da_ref, db = db_ref;
          ref_.QLinearBackward(w.m, dy.data(), dx_ref.data(), m);
          ref_.LoraBackward(x.data(), a.data(), b.data(), z_ref.data(), dy.data(), frozen_a ? nullptr : da_ref.data(), db_ref.data(),
                            dx_ref.data(), m, k, r, n, scale);
          be_->QLinearLoraBackward(w.m, x.data(), a.data(), b.data(), z_ref.data(), dy.data(), frozen_a ? nullptr : da.data(), db.data(),
                                   dx.data(), m, r, scale);
          Expect(Op::kQLinearBackward, dx_ref, dx, kGemmTol, shape + " dx");
          Expect(Op::kLoraBackward, da_ref, da, frozen_a ? 0.0 : kGemmTol, shape + " dA");
          Expect(Op::kLoraBackward, db_ref, db, kGemmTol, shape + " dB");
        }
      }
    }
  }
}

TEST_P(BackendOps, RmsNorm) {
  for (int64_t rows : {1, 7, 33}) {
    for (int64_t n : {8, 63, 576}) {
      const std::string shape = "rows=" + std::to_string(rows) + " n=" + std::to_string(n);
      const Vec x = Random(static_cast<size_t>(rows * n), rng_, 3.0f), g = Random(static_cast<size_t>(n), rng_);
      Vec y_ref(x.size()), y(x.size()), r_ref(static_cast<size_t>(rows)), r(r_ref.size());
      if (Has(Op::kRmsNormForward)) {
        ref_.RmsNormForward(x.data(), g.data(), y_ref.data(), r_ref.data(), rows, n, 1e-5f);
        be_->RmsNormForward(x.data(), g.data(), y.data(), r.data(), rows, n, 1e-5f);
        Expect(Op::kRmsNormForward, y_ref, y, kElemTol, shape);
        Expect(Op::kRmsNormForward, r_ref, r, kElemTol, shape + " rstd");
      }
      if (Has(Op::kRmsNormBackward)) {
        ref_.RmsNormForward(x.data(), g.data(), y_ref.data(), r_ref.data(), rows, n, 1e-5f);
        const Vec dy = Random(x.size(), rng_);
        Vec dx_ref = Random(x.size(), rng_), dx = dx_ref;
        ref_.RmsNormBackward(x.data(), g.data(), r_ref.data(), dy.data(), dx_ref.data(), rows, n);
        be_->RmsNormBackward(x.data(), g.data(), r_ref.data(), dy.data(), dx.data(), rows, n);
        Expect(Op::kRmsNormBackward, dx_ref, dx, kElemTol, shape);
      }
    }
  }
}

TEST_P(BackendOps, Rope) {
  for (int64_t heads : {1, 3, 9}) {
    for (int64_t hd : {8, 64}) {
      for (int64_t rot : {hd, hd / 2}) {
        const int64_t rows = 13;
        std::vector<int32_t> pos(static_cast<size_t>(rows));
        for (auto& p : pos) p = static_cast<int32_t>(rng_() % 300);
        const std::string shape = "heads=" + std::to_string(heads) + " hd=" + std::to_string(hd) + " rot=" + std::to_string(rot);
        const Vec x = Random(static_cast<size_t>(rows * heads * hd), rng_);
        // Llama 3 style frequency factors (divisors of the angles) or none.
        std::vector<float> ff(static_cast<size_t>(rot / 2));
        for (auto& f : ff) f = 1.0f + static_cast<float>(rng_() % 700) / 100.0f;
        for (const float* factors : {static_cast<const float*>(nullptr), static_cast<const float*>(ff.data())}) {
          for (bool fwd : {true, false}) {
            const Op op = fwd ? Op::kRopeForward : Op::kRopeBackward;
            if (!Has(op)) continue;
            Vec a = x, b = x;
            if (fwd) {
              ref_.RopeForward(a.data(), pos.data(), rows, heads, hd, rot, 10000.0f, factors);
              be_->RopeForward(b.data(), pos.data(), rows, heads, hd, rot, 10000.0f, factors);
            } else {
              ref_.RopeBackward(a.data(), pos.data(), rows, heads, hd, rot, 100000.0f, factors);
              be_->RopeBackward(b.data(), pos.data(), rows, heads, hd, rot, 100000.0f, factors);
            }
            Expect(op, a, b, kElemTol, shape + (factors != nullptr ? " scaled" : ""));
          }
        }
      }
    }
  }
}

// The bias glue op (Qwen2's q/k/v biases) on host memory and on the backend's buffers.
TEST_P(BackendOps, AddRowVector) {
  const int64_t rows = 37, n = 24;
  const Vec y0 = Random(static_cast<size_t>(rows * n), rng_), v = Random(static_cast<size_t>(n), rng_);
  Vec want = y0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) want[static_cast<size_t>(r * n + i)] += v[static_cast<size_t>(i)];
  Vec host = y0;
  be_->AddRowVector(host.data(), v.data(), rows, n);
  EXPECT_EQ(host, want);
  float* buf = be_->AllocBuffer(rows * n);
  be_->Copy(y0.data(), buf, rows * n);
  be_->AddRowVector(buf, v.data(), rows, n);
  Vec back(y0.size());
  be_->Copy(buf, back.data(), rows * n);
  be_->FreeBuffer(buf);
  EXPECT_EQ(back, want);
}

// Packed positions: rows split into examples of random lengths.
std::vector<int32_t> PackedPositions(int64_t n_seq, int64_t len, std::mt19937& rng) {
  std::vector<int32_t> pos(static_cast<size_t>(n_seq * len));
  for (int64_t s = 0; s < n_seq; ++s) {
    int32_t p = 0;
    for (int64_t i = 0; i < len; ++i) {
      if (i > 0 && rng() % 5 == 0) p = 0;
      pos[static_cast<size_t>(s * len + i)] = p++;
    }
  }
  return pos;
}

TEST_P(BackendOps, Attention) {
  for (auto [nh, nkv] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {4, 2}, {6, 2}, {3, 3}, {9, 3}}) {
    for (int64_t hd : {4, 16, 64}) {
      for (auto [n_seq, len] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {2, 5}, {1, 33}, {3, 70}}) {
#ifdef FEDTUNE_CUDA_EMULATED
        // The emulation runs every GPU thread as a fiber: the longest sequences with one head
        // size only (the kernels' work per block does not depend on it).
        if (len == 70 && hd != 16) continue;
#endif
        // Gemma 2's soft-capping (cap 0.7: the tanh is far from linear on these scores) and sliding
        // windows (3 and 5 keys), alone and with packing, at one head size.
        using Variant = std::tuple<bool, float, int64_t>;  // packed, softcap, window
        for (auto [packed, cap, window] :
             hd == 16 ? std::vector<Variant>{{false, 0.0f, 0}, {true, 0.0f, 0}, {false, 0.7f, 0}, {true, 0.7f, 0}, {false, 0.0f, 3}, {true, 0.7f, 5}}
                      : std::vector<Variant>{{false, 0.0f, 0}, {true, 0.0f, 0}}) {
          const std::string shape = "heads=" + std::to_string(nh) + "/" + std::to_string(nkv) + " hd=" + std::to_string(hd) + " seq=" +
                                    std::to_string(n_seq) + "x" + std::to_string(len) + (packed ? " packed" : "") +
                                    (cap > 0 ? " softcap" : "") + (window > 0 ? " window=" + std::to_string(window) : "");
          const int64_t M = n_seq * len;
          const std::vector<int32_t> pos = PackedPositions(n_seq, len, rng_);
          const int32_t* sp = packed ? pos.data() : nullptr;
          const Vec q = Random(static_cast<size_t>(M * nh * hd), rng_), k = Random(static_cast<size_t>(M * nkv * hd), rng_),
                    v = Random(static_cast<size_t>(M * nkv * hd), rng_);
          if (Has(Op::kAttentionForward)) {
            Vec o_ref(q.size()), o(q.size());
            ref_.AttentionForward(q.data(), k.data(), v.data(), o_ref.data(), n_seq, len, nh, nkv, hd, sp, cap, window);
            be_->AttentionForward(q.data(), k.data(), v.data(), o.data(), n_seq, len, nh, nkv, hd, sp, cap, window);
            Expect(Op::kAttentionForward, o_ref, o, kSoftTol + kGemmTol * (OnCuda() || (Bf16Attention() && M >= 64)), shape);
          }
          if (Has(Op::kAttentionBackward)) {
            const Vec dout = Random(q.size(), rng_);
            Vec dq_ref = Random(q.size(), rng_), dk_ref = Random(k.size(), rng_), dv_ref = Random(v.size(), rng_);
            Vec dq = dq_ref, dk = dk_ref, dv = dv_ref;
            ref_.AttentionBackward(q.data(), k.data(), v.data(), dout.data(), dq_ref.data(), dk_ref.data(), dv_ref.data(), n_seq, len, nh, nkv, hd, sp, cap, window);
            be_->AttentionBackward(q.data(), k.data(), v.data(), dout.data(), dq.data(), dk.data(), dv.data(), n_seq, len, nh, nkv, hd, sp, cap, window);
            const double tol = kSoftTol + kGemmTol * (OnCuda() || (Bf16Attention() && M >= 64));
            Expect(Op::kAttentionBackward, dq_ref, dq, tol, shape + " dq");
            Expect(Op::kAttentionBackward, dk_ref, dk, tol, shape + " dk");
            Expect(Op::kAttentionBackward, dv_ref, dv, tol, shape + " dv");
          }
        }
      }
    }
  }
  if (Bf16Attention()) {  // not an f32 path in disguise: bf16 rounding shows (f32: ~1e-14)
    EXPECT_GT(worst_[static_cast<size_t>(Op::kAttentionForward)], 1e-8);
    EXPECT_GT(worst_[static_cast<size_t>(Op::kAttentionBackward)], 1e-8);
  }
}

TEST_P(BackendOps, SwiGluWithExtremesAndNonFinite) {
  for (int64_t n : {1, 7, 8, 1000, 4099}) {
    Vec gate = Random(static_cast<size_t>(n), rng_, 4.0f), up = Random(static_cast<size_t>(n), rng_);
    if (n > 8) {  // exp limits and non-finite inputs
      gate[0] = 100.0f;
      gate[1] = -100.0f;
      gate[2] = 88.5f;
      gate[3] = -87.5f;
      gate[4] = NAN;
      up[5] = INFINITY;
    }
    const std::string shape = "n=" + std::to_string(n);
    // The two gated units (SwiGLU, GeGLU), forward and backward, through the same checks.
    using Fwd = void (Backend::*)(const float*, const float*, float*, int64_t);
    using Bwd = void (Backend::*)(const float*, const float*, const float*, float*, float*, int64_t);
    const struct {
      Op fwd_op, bwd_op;
      Fwd fwd;
      Bwd bwd;
    } units[] = {{Op::kSwiGluForward, Op::kSwiGluBackward, &Backend::SwiGluForward, &Backend::SwiGluBackward},
                 {Op::kGegluForward, Op::kGegluBackward, &Backend::GegluForward, &Backend::GegluBackward}};
    for (const auto& u : units) {
      if (Has(u.fwd_op)) {
        Vec o_ref(gate.size()), o(gate.size());
        (ref_.*u.fwd)(gate.data(), up.data(), o_ref.data(), n);
        (be_->*u.fwd)(gate.data(), up.data(), o.data(), n);
        Expect(u.fwd_op, o_ref, o, kElemTol, shape);
      }
      if (Has(u.bwd_op)) {
        const Vec dout = Random(gate.size(), rng_);
        Vec dg_ref = Random(gate.size(), rng_), du_ref = Random(gate.size(), rng_), dg = dg_ref, du = du_ref;
        (ref_.*u.bwd)(gate.data(), up.data(), dout.data(), dg_ref.data(), du_ref.data(), n);
        (be_->*u.bwd)(gate.data(), up.data(), dout.data(), dg.data(), du.data(), n);
        Expect(u.bwd_op, dg_ref, dg, kElemTol, shape + " dgate");
        Expect(u.bwd_op, du_ref, du, kElemTol, shape + " dup");
      }
    }
  }
}

TEST_P(WeightProducts, CrossEntropy) {
  if (!Has(Op::kCrossEntropy)) return;
  for (GgmlType t : {GgmlType::kF32, GgmlType::kQ8_0, GgmlType::kQ4_1}) {
    for (auto [rows, V, E, cap] : std::vector<std::tuple<int64_t, int64_t, int64_t, float>>{
             {1, 7, 32, 0.0f}, {5, 100, 64, 0.0f}, {40, 1000, 64, 0.0f}, {300, 517, 32, 0.0f}, {5, 100, 64, 2.0f}, {300, 517, 32, 2.0f}}) {
      const QuantWeight w = Quantize(t, V, E, rng_);
      const Vec h = Random(static_cast<size_t>(rows * E), rng_, 2.0f);
      std::vector<int32_t> target(static_cast<size_t>(rows));
      for (auto& x : target) x = rng_() % 4 == 0 ? -1 : static_cast<int32_t>(rng_() % static_cast<uint32_t>(V));
      const std::string shape = std::string(TypeTraits(t).name) + " rows=" + std::to_string(rows) + " V=" + std::to_string(V) +
                                (cap > 0 ? " softcap" : "");
      Vec dh_ref = Random(h.size(), rng_), dh = dh_ref;
      const double nll_ref = ref_.CrossEntropy(w.m, h.data(), target.data(), rows, dh_ref.data(), 0.25f, cap);
      const double nll = be_->CrossEntropy(w.m, h.data(), target.data(), rows, dh.data(), 0.25f, cap);
      // The output products in bf16 or on a GPU: the product tolerance.
      const double tol = kSoftTol + kGemmTol * (OnCuda() || Bf16Products());
      Expect(Op::kCrossEntropy, {static_cast<float>(nll_ref)}, {static_cast<float>(nll)}, tol, shape + " nll");
      Expect(Op::kCrossEntropy, dh_ref, dh, tol, shape + " dh");
      EXPECT_NEAR(be_->CrossEntropy(w.m, h.data(), target.data(), rows, nullptr, 1.0f, cap), nll_ref, LossRelTol() * std::abs(nll_ref) + 1e-6) << shape;
    }
  }
}

// The masks are a hash of their coordinates: every backend must give exactly the reference's,
// into host memory and into a buffer, with the kept fraction near 1 - p.
TEST_P(BackendOps, DropoutScale) {
  if (!Has(Op::kDropoutScale)) return;
  for (auto [rows, cols, p] : std::vector<std::tuple<int64_t, int64_t, float>>{{1, 1, 0.5f}, {7, 33, 0.1f}, {130, 576, 0.05f}, {64, 1536, 0.3f}, {5, 9, 0.0f}}) {
    const std::string shape = std::to_string(rows) + "x" + std::to_string(cols) + " p=" + std::to_string(p);
    const uint64_t key = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(rows * cols);
    Vec ref(static_cast<size_t>(rows * cols)), got(ref.size(), -1.0f);
    ref_.DropoutScale(key, 1000, rows, cols, p, ref.data());
    be_->DropoutScale(key, 1000, rows, cols, p, got.data());
    EXPECT_EQ(got, ref) << shape;
    EXPECT_EQ(ThroughBuffer(rows * cols, [&](float* out) { be_->DropoutScale(key, 1000, rows, cols, p, out); }), ref) << shape << " (buffer)";
    Expect(Op::kDropoutScale, ref, got, 0.0, shape);
    const double kept = static_cast<double>(std::count_if(ref.begin(), ref.end(), [](float v) { return v != 0.0f; })) / static_cast<double>(ref.size());
    if (ref.size() > 10000) {
      EXPECT_NEAR(kept, 1.0 - p, 0.01) << shape;
    }
    if (p == 0.0f) {
      EXPECT_EQ(kept, 1.0) << shape;
    }
  }
}

// Token embeddings: rows of a table in each format, exactly the reference's, into host memory
// and buffers: the CUDA backend's device dequantizers (the 2-3-bit formats included) are
// bit-exact with kernels/quant.cc; Q4_K it dequantizes on the host once.
TEST_P(BackendOps, EmbedRows) {
  if (!Has(Op::kEmbedRows)) return;
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kQ8_0, GgmlType::kQ4_1, GgmlType::kNF4, GgmlType::kNF3, GgmlType::kNF2,
                     GgmlType::kQ3_K, GgmlType::kQ2_K, GgmlType::kQ4_K}) {
    const int64_t rows = 37, cols = TypeTraits(t).block_size * 3;
    QuantWeight w;
    if (t == GgmlType::kQ4_K) {  // no quantizer: random blocks with finite scales (d, dmin)
      const size_t rb = *RowBytes(t, cols);
      w.bytes.resize(rb * static_cast<size_t>(rows));
      for (auto& byte : w.bytes) byte = static_cast<uint8_t>(rng_());
      for (size_t b0 = 0; b0 < w.bytes.size(); b0 += TypeTraits(t).type_size) {
        const uint16_t d = Fp32ToFp16(0.01f), dmin = Fp32ToFp16(0.005f);
        std::memcpy(&w.bytes[b0], &d, 2);
        std::memcpy(&w.bytes[b0 + 2], &dmin, 2);
      }
      w.m = QMatrix{t, w.bytes.data(), rows, cols, rb};
    } else {
      w = Quantize(t, rows, cols, rng_);
    }
    std::vector<int32_t> ids = {0, 36, 5, 5, 17, 1, 36, 0, 22};
    const int64_t n = static_cast<int64_t>(ids.size());
    Vec ref(static_cast<size_t>(n * cols)), got(ref.size(), -1.0f);
    ref_.EmbedRows(w.m, ids.data(), n, ref.data());
    be_->EmbedRows(w.m, ids.data(), n, got.data());
    const std::string shape = std::string(TypeTraits(t).name) + " " + std::to_string(n) + " rows of " + std::to_string(cols);
    EXPECT_EQ(got, ref) << shape;
    EXPECT_EQ(ThroughBuffer(n * cols, [&](float* out) { be_->EmbedRows(w.m, ids.data(), n, out); }), ref) << shape << " (buffer)";
    Expect(Op::kEmbedRows, ref, got, 0.0, shape);
  }
}

TEST_P(BackendOps, AdamW) {
  if (!Has(Op::kAdamW)) return;
  for (int64_t n : {1, 9, 10000}) {
    AdamWStep s;
    s.lr = 1e-3f;
    s.weight_decay = 0.01f;
    s.clip = 0.7f;
    s.bc1 = 1 - 0.9f * 0.9f;
    s.bc2 = 1 - 0.999f * 0.999f;
    s.fisher_weight = 0.5f;
    Vec p = Random(static_cast<size_t>(n), rng_), g = Random(p.size(), rng_), m = Random(p.size(), rng_, 0.1f), v(p.size()), f(p.size());
    for (auto& x : v) x = std::abs(static_cast<float>(rng_() % 100)) * 1e-4f;
    for (auto& x : f) x = static_cast<float>(rng_() % 7) * 0.1f;
    Vec p2 = p, g2 = g, m2 = m, v2 = v, f2 = f;
    ref_.AdamW(p.data(), g.data(), m.data(), v.data(), f.data(), n, s);
    be_->AdamW(p2.data(), g2.data(), m2.data(), v2.data(), f2.data(), n, s);
    const std::string shape = "n=" + std::to_string(n);
    Expect(Op::kAdamW, p, p2, kElemTol, shape + " p");
    Expect(Op::kAdamW, m, m2, kElemTol, shape + " m");
    Expect(Op::kAdamW, v, v2, kElemTol, shape + " v");
    Expect(Op::kAdamW, f, f2, kElemTol, shape + " fisher");
    Expect(Op::kAdamW, g, g2, kElemTol, shape + " g zeroed");
  }
}

TEST_P(BackendOps, Lora) {
  for (int64_t m : {1, 5, 40, 129}) {
    for (int64_t in : {8, 33, 576}) {
      for (int64_t r : {1, 4, 16}) {
        for (int64_t out : {7, 64}) {
          for (bool frozen_a : {false, true}) {
            const std::string shape = "m=" + std::to_string(m) + " in=" + std::to_string(in) + " r=" + std::to_string(r) + " out=" +
                                      std::to_string(out) + (frozen_a ? " ffa" : "");
            const Vec x = Random(static_cast<size_t>(m * in), rng_), a = Random(static_cast<size_t>(r * in), rng_, 0.3f),
                      b = Random(static_cast<size_t>(out * r), rng_, 0.3f);
            Vec z_ref(static_cast<size_t>(m * r)), z(z_ref.size());
            if (Has(Op::kLoraForward)) {
              Vec y_ref = Random(static_cast<size_t>(m * out), rng_), y = y_ref;
              ref_.LoraForward(x.data(), a.data(), b.data(), z_ref.data(), y_ref.data(), m, in, r, out, 2.0f);
              be_->LoraForward(x.data(), a.data(), b.data(), z.data(), y.data(), m, in, r, out, 2.0f);
              Expect(Op::kLoraForward, y_ref, y, kGemmTol, shape + " y");
              Expect(Op::kLoraForward, z_ref, z, kGemmTol, shape + " z");
            }
            if (Has(Op::kLoraBackward)) {
              ref_.LoraForward(x.data(), a.data(), b.data(), z_ref.data(), Vec(static_cast<size_t>(m * out)).data(), m, in, r, out, 2.0f);
              const Vec dy = Random(static_cast<size_t>(m * out), rng_);
              Vec da_ref = Random(a.size(), rng_), db_ref = Random(b.size(), rng_), dx_ref = Random(x.size(), rng_);
              Vec da = da_ref, db = db_ref, dx = dx_ref;
              ref_.LoraBackward(x.data(), a.data(), b.data(), z_ref.data(), dy.data(), frozen_a ? nullptr : da_ref.data(), db_ref.data(),
                                dx_ref.data(), m, in, r, out, 2.0f);
              be_->LoraBackward(x.data(), a.data(), b.data(), z_ref.data(), dy.data(), frozen_a ? nullptr : da.data(), db.data(), dx.data(),
                                m, in, r, out, 2.0f);
              Expect(Op::kLoraBackward, da_ref, da, kGemmTol, shape + " dA");
              Expect(Op::kLoraBackward, db_ref, db, kGemmTol, shape + " dB");
              Expect(Op::kLoraBackward, dx_ref, dx, kGemmTol, shape + " dx");
            }
          }
        }
      }
    }
  }
}

TEST_P(BackendOps, Diablo) {
  for (int64_t m : {1, 9, 100}) {
    for (auto [in, out] : std::vector<std::pair<int64_t, int64_t>>{{16, 16}, {30, 33}, {576, 192}, {64, 1536}}) {
      for (int64_t blocks : {1, 3, 4, 16}) {
        const std::string shape = "m=" + std::to_string(m) + " in=" + std::to_string(in) + " out=" + std::to_string(out) + " N=" + std::to_string(blocks);
        const int64_t b_in = (in + blocks - 1) / blocks, b_out = (out + blocks - 1) / blocks;
        const Vec x = Random(static_cast<size_t>(m * in), rng_), d = Random(static_cast<size_t>(blocks * b_in * b_out), rng_, 0.2f);
        if (Has(Op::kDiabloForward)) {
          Vec y_ref = Random(static_cast<size_t>(m * out), rng_), y = y_ref;
          ref_.DiabloForward(x.data(), d.data(), y_ref.data(), m, in, out, blocks);
          be_->DiabloForward(x.data(), d.data(), y.data(), m, in, out, blocks);
          Expect(Op::kDiabloForward, y_ref, y, kGemmTol, shape);
        }
        if (Has(Op::kDiabloBackward)) {
          const Vec dy = Random(static_cast<size_t>(m * out), rng_);
          Vec dd_ref = Random(d.size(), rng_), dx_ref = Random(x.size(), rng_), dd = dd_ref, dx = dx_ref;
          ref_.DiabloBackward(x.data(), d.data(), dy.data(), dd_ref.data(), dx_ref.data(), m, in, out, blocks);
          be_->DiabloBackward(x.data(), d.data(), dy.data(), dd.data(), dx.data(), m, in, out, blocks);
          Expect(Op::kDiabloBackward, dd_ref, dd, kGemmTol, shape + " dD");
          Expect(Op::kDiabloBackward, dx_ref, dx, kGemmTol, shape + " dx");
        }
      }
    }
  }
}

// Buffers and the element-wise glue, with every mix of host pointers and buffers, in place too.
TEST_P(BackendOps, BuffersAndElementwise) {
  for (int64_t n : {1, 7, 1000, 70001}) {
    const Vec a = Random(static_cast<size_t>(n), rng_), b = Random(static_cast<size_t>(n), rng_);
    Vec sum(a.size()), prod(a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      sum[i] = a[i] + b[i];
      prod[i] = a[i] * b[i];
    }
    float* ba = be_->AllocBuffer(n);
    float* bb = be_->AllocBuffer(n);
    float* bo = be_->AllocBuffer(n);
    be_->Copy(a.data(), ba, n);  // host -> buffer
    be_->Copy(b.data(), bb, n);
    Vec got(a.size());
    be_->Add(ba, bb, bo, n);
    be_->Copy(bo, got.data(), n);  // buffer -> host
    EXPECT_EQ(got, sum) << "add, buffers, n=" << n;
    be_->Mul(ba, b.data(), bo, n);  // buffer x host -> buffer
    be_->Copy(bo, got.data(), n);
    EXPECT_EQ(got, prod) << "mul, mixed, n=" << n;
    be_->Add(a.data(), b.data(), got.data(), n);  // all host
    EXPECT_EQ(got, sum) << "add, host, n=" << n;
    be_->Mul(ba, bb, ba, n);  // in place
    be_->Copy(ba, bo, n);     // buffer -> buffer
    be_->Copy(bo, got.data(), n);
    EXPECT_EQ(got, prod) << "mul in place, n=" << n;
    be_->Fill(bo, -2.5f, n);
    be_->Copy(bo, got.data(), n);
    EXPECT_EQ(got, Vec(a.size(), -2.5f)) << "fill, n=" << n;
    be_->Fill(got.data(), 0.0f, n);
    EXPECT_EQ(got, Vec(a.size(), 0.0f)) << "fill host, n=" << n;
    be_->FreeBuffer(ba);
    be_->FreeBuffer(bb);
    be_->FreeBuffer(bo);
  }
}

// The ops together: three optimizer steps of the trainer (packed batch, adapter dropout, kept
// activations in micro-batches of 2) and AdamW (on the backend when its buffers are host
// memory, else on cpu-fast) against the same on cpu-ref, for
// LoRA, FFA-LoRA and DiaBlo on a tiny Q4_1 model: losses, first gradients, final parameters.
TEST_P(WeightProducts, TrainingStepsMatchTheReference) {
  testing::TinyModelOptions o;
  o.weight_type = GgmlType::kQ4_1;
  const std::string path = testing::TempPath("backend_train_" + GetParam() + ".gguf");
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, o).ok());
  auto model = model::LlamaModel::Load(path);
  ASSERT_TRUE(model.ok()) << model.status();
  std::vector<model::Example> ex(5);
  for (size_t e = 0; e < ex.size(); ++e) {
    // cpu-bf16 keeps passes of fewer than 64 rows in f32: longer examples there, so that its bf16
    // products, attention and cross-entropy are what the steps run.
    const size_t n = (GetParam() == "cpu-bf16" ? 40 : 4) + (e * 5) % 9;
    for (size_t i = 0; i < n; ++i) {
      ex[e].tokens.push_back(static_cast<int32_t>(3 + rng_() % 250));
      ex[e].targets.push_back(i < 2 ? -1 : static_cast<int32_t>(3 + rng_() % 250));
    }
  }
  std::vector<const model::Example*> ptrs;
  for (const auto& e : ex) ptrs.push_back(&e);
  const model::Batch batch = model::MakePackedBatch(ptrs, 0);
  // Kept activations on every layer, and recomputation with adapters on the top layer only
  // (backward stops inside it).
  struct Mode {
    bool recompute;
    const char* layout;
    float dropout;  // 0: LoRA goes through QLinearLoraForward / Backward (fused on cpu-bf16)
  };
  for (const Mode mode : {Mode{false, "", 0.1f}, Mode{true, "1:o,up", 0.1f}, Mode{false, "", 0.0f}, Mode{true, "1:o,up", 0.0f}})
  for (auto kind : {model::AdapterKind::kLora, model::AdapterKind::kFfaLora, model::AdapterKind::kDiaBlo}) {
    // Recomputation without dropout: cpu-bf16's fused path under recomputation. Elsewhere the
    // fused op is the two ops the modes above run (on the emulated GPU with TF32 products its
    // FFA-LoRA parameters drift to NMSE 7.9e-4 after AdamW's three steps: the near-zero gradient
    // elements' rounding, see TrainedParamTol).
    if (mode.recompute && mode.dropout == 0.0f && GetParam() != "cpu-bf16") continue;
    const model::AdapterSpec spec{kind, 4, 8.0f, false, 4};
    const std::string name = std::string(kind == model::AdapterKind::kLora ? "lora" : kind == model::AdapterKind::kFfaLora ? "ffa-lora" : "diablo") +
                             (mode.recompute ? "/recompute/" + std::string(mode.layout) : "") + (mode.dropout > 0 ? "" : "/no-dropout");
    auto run = [&](Backend* be, std::vector<double>* losses, Vec* first_grad) {
      auto made = model::MakeAdaptersWithLayout<float>((*model)->adapter_dims(), spec, model::kAllModules, mode.layout, 11);
      EXPECT_TRUE(made.ok()) << made.status();
      model::AdapterSet<float> set = std::move(*made);
      std::mt19937 init(5);  // B != 0, so that every tensor gets a gradient
      std::normal_distribution<float> nd(0.0f, 0.05f);
      set.ForEachTrainable([&](const std::string&, std::span<float> p, std::span<float>) {
        for (auto& v : p) v += nd(init);
      });
      model::Trainer<float> trainer(**model, &set,
                                    model::TrainerOptions{.recompute = mode.recompute, .micro_batch = 2, .backend = be, .adapter_dropout = mode.dropout});
      model::AdamW opt(model::OptimizerConfig{.lr = 1e-2f, .weight_decay = 0.01f, .total_steps = 3});
      opt.set_backend(be);
      for (int step = 0; step < 3; ++step) {
        trainer.set_dropout_seed(100 + static_cast<uint64_t>(step));
        set.ZeroGrad();
        auto nll = trainer.Step(batch, 1.0f / static_cast<float>(batch.n_scored()), true);
        EXPECT_TRUE(nll.ok()) << nll.status();
        losses->push_back(nll.ok() ? *nll : 0.0);
        if (step == 0) {
          set.ForEachTrainable([&](const std::string&, std::span<float>, std::span<float> g) { first_grad->insert(first_grad->end(), g.begin(), g.end()); });
        }
        opt.Step(set);
      }
      Vec params;
      set.ForEachTrainable([&](const std::string&, std::span<float> p, std::span<float>) { params.insert(params.end(), p.begin(), p.end()); });
      return params;
    };
    std::vector<double> loss_ref, loss;
    Vec grad_ref, grad;
    const Vec p_ref = run(&ref_, &loss_ref, &grad_ref);
    const Vec p = run(be_, &loss, &grad);
    ASSERT_EQ(loss.size(), loss_ref.size());
    for (size_t i = 0; i < loss.size(); ++i) {
      EXPECT_NEAR(loss[i], loss_ref[i], LossRelTol() * std::abs(loss_ref[i])) << name << " step " << i;
    }
    EXPECT_LT(loss_ref.back(), loss_ref.front()) << name << ": the reference run learns";
    const double eg = Nmse(grad_ref, grad, name + " gradients"), ep = Nmse(p_ref, p, name + " parameters");
    EXPECT_LE(eg, kGemmTol) << be_->Name() << " trainer " << name << ": first gradients, NMSE " << eg;
    EXPECT_LE(ep, TrainedParamTol()) << be_->Name() << " trainer " << name << ": parameters after 3 steps, NMSE " << ep;
    std::printf("[ nmse ] %-20s trainer %-24s losses %.6f -> %.6f (ref %.6f -> %.6f), gradients %.2e, parameters %.2e\n", be_->Name(),
                name.c_str(), loss.front(), loss.back(), loss_ref.front(), loss_ref.back(), eg, ep);
  }
}

#ifdef FEDTUNE_CUDA_EMULATED
// Activations stay on the device: a trainer step on the (emulated) CUDA backend copies less
// between host and device than the activations it keeps — the per-op copy path moved every op's
// inputs and outputs. What still crosses: the embedding rows, token positions and targets, the
// adapter parameters (one upload) and gradients (one download), and the loss.
TEST(CudaEmulation, TrainerKeepsActivationsOnTheDevice) {
  std::string why;
  static Backend* const be = MakeCudaBackend(&why).release();
  ASSERT_NE(be, nullptr) << why;
  testing::TinyModelOptions o;
  o.n_layer = 4;
  const std::string path = testing::TempPath("device_resident.gguf");
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, o).ok());
  auto model = model::LlamaModel::Load(path);
  ASSERT_TRUE(model.ok()) << model.status();
  model::Batch b;
  b.n_seq = 4;
  b.len = 32;
  std::mt19937 rng(3);
  for (int i = 0; i < 128; ++i) {
    b.tokens.push_back(static_cast<int32_t>(3 + rng() % 250));
    b.targets.push_back(static_cast<int32_t>(3 + rng() % 250));
  }
  auto set = model::MakeAdapters<float>((*model)->adapter_dims(), model::AdapterSpec{model::AdapterKind::kLora, 4, 8.0f, false, 4},
                                        model::kAllModules, 1);
  ASSERT_TRUE(set.ok());
  model::Trainer<float> trainer(**model, &*set, model::TrainerOptions{.recompute = false, .backend = be});
  ASSERT_TRUE(trainer.Step(b, 1.0f, true).ok());  // uploads the weights once
  const uint64_t before = g_emu_copied_bytes, syncs_before = g_emu_syncs;
  ASSERT_TRUE(trainer.Step(b, 1.0f, true).ok());
  const uint64_t copied = g_emu_copied_bytes - before, syncs = g_emu_syncs - syncs_before;
  const int64_t kept = trainer.KeptBytesPerSequence(b.len) * b.n_seq;
  std::printf("[ info ] one step: %llu bytes copied host <-> device, %lld bytes of activations kept on the device, %llu waits for the GPU\n",
              static_cast<unsigned long long>(copied), static_cast<long long>(kept), static_cast<unsigned long long>(syncs));
  EXPECT_LT(copied, static_cast<uint64_t>(kept) / 2);
  // The ops queue their work; the step waits for the GPU twice: for the loss, and for the
  // parameter gradients at the end (each op waited: 57 for this model).
  EXPECT_LE(syncs, 2u);
  // The backend counts the device memory it holds: at least the kept activations.
  EXPECT_GT(be->PeakDeviceBytes(), kept);
  // Adapter dropout: the masks are made on the device, so the traffic stays the same (host-made
  // masks were uploaded for each of an adapter's three multiplications by its mask, 128 tokens x
  // in x 4 bytes each: 2.9 MB per step for this model).
  model::Trainer<float> dropping(**model, &*set, model::TrainerOptions{.recompute = false, .backend = be, .adapter_dropout = 0.1f});
  ASSERT_TRUE(dropping.Step(b, 1.0f, true).ok());
  const uint64_t before_dropout = g_emu_copied_bytes;
  ASSERT_TRUE(dropping.Step(b, 1.0f, true).ok());
  const uint64_t copied_dropout = g_emu_copied_bytes - before_dropout;
  std::printf("[ info ] with adapter dropout: %llu bytes copied\n", static_cast<unsigned long long>(copied_dropout));
  EXPECT_EQ(copied_dropout, copied);
}

// The weight precision reaches the GEMM: on the same product, fp32 matches the reference to
// float rounding, TF32 (10 mantissa bits) is visibly worse and bf16 (8 bits) worse still, each
// within the products' tolerance; the choice shows in Describe; a bad FEDTUNE_CUDA_GEMM is refused.
TEST(CudaEmulation, WeightPrecisionReachesTheGemm) {
  std::mt19937 rng(9);
  const int64_t m = 24, n = 96, k = 128;
  const QuantWeight w = Quantize(GgmlType::kF32, n, k, rng);
  const Vec x = Random(static_cast<size_t>(m * k), rng);
  Vec y_ref(static_cast<size_t>(m * n));
  CpuReferenceBackend().QLinearForward(w.m, x.data(), y_ref.data(), m);
  std::map<CudaGemm, double> err;
  for (CudaGemm g : {CudaGemm::kFp32, CudaGemm::kTf32, CudaGemm::kBf16}) {
    std::string why;
    auto be = MakeCudaBackend(&why, g);
    ASSERT_NE(be, nullptr) << why;
    EXPECT_NE(be->Describe().find(std::string(CudaGemmName(g)) + " GEMM"), std::string::npos) << be->Describe();
    Vec y(y_ref.size());
    be->QLinearForward(w.m, x.data(), y.data(), m);
    err[g] = Nmse(y_ref, y, CudaGemmName(g));
    std::printf("[ nmse ] %s: %.2e\n", be->Describe().c_str(), err[g]);
  }
  EXPECT_LT(err[CudaGemm::kFp32], 1e-12);
  EXPECT_GT(err[CudaGemm::kTf32], 100 * err[CudaGemm::kFp32]);
  EXPECT_GT(err[CudaGemm::kBf16], 4 * err[CudaGemm::kTf32]);
  EXPECT_LT(err[CudaGemm::kBf16], kGemmTol);
  std::string why;
  EXPECT_NE(MakeCudaBackend(&why, CudaGemm::kAuto)->Describe().find("bf16 GEMM"), std::string::npos) << "auto on sm_90";
  ASSERT_EQ(setenv("FEDTUNE_CUDA_GEMM", "fp16", 1), 0);
  EXPECT_EQ(MakeCudaBackend(&why), nullptr);
  EXPECT_NE(why.find("FEDTUNE_CUDA_GEMM=fp16"), std::string::npos) << why;
  ASSERT_EQ(unsetenv("FEDTUNE_CUDA_GEMM"), 0);
}
#endif

#ifndef FEDTUNE_CUDA_EMULATED
TEST(BackendSelect, NamesAndErrors) {
  EXPECT_STREQ((*SelectBackend("cpu-ref"))->Name(), "cpu-ref");
  EXPECT_EQ(*SelectBackend("cpu-fast"), &CpuFastBackend());
  // "cpu" is the best CPU path: bf16 where this CPU (capped by FEDTUNE_CPU_ISA) has it.
  EXPECT_EQ(*SelectBackend("cpu"), CpuBf16Backend() != nullptr ? CpuBf16Backend() : &CpuFastBackend());
  EXPECT_EQ(&BestCpuBackend(), *SelectBackend("cpu"));
  EXPECT_FALSE(SelectBackend("tpu").ok());
  auto a = SelectBackend("auto");
  ASSERT_TRUE(a.ok());
  if (CudaBackend() == nullptr) {
    EXPECT_EQ(*a, &BestCpuBackend());
    EXPECT_FALSE(SelectBackend("cuda").ok()) << "cuda must be refused with a reason when unavailable";
    EXPECT_FALSE(CudaUnavailableReason().empty());
    // A built module must load (the reason is then about the driver or the device): a module
    // with an unresolved symbol would fail only on machines with a GPU.
    EXPECT_EQ(CudaUnavailableReason().find("cannot load the CUDA module"), std::string::npos) << CudaUnavailableReason();
  }
  for (int i = 0; i < static_cast<int>(Op::kCount); ++i) EXPECT_TRUE((*a)->Supports(static_cast<Op>(i))) << OpName(static_cast<Op>(i));
}

#endif

// The choice of CPU path is a function of the features and the cap: checked for made-up CPUs.
TEST(CpuIsaTest, ChoosesTheBestPathTheFeaturesAllowUnderTheCap) {
  CpuFeatures none, avx2, zen4, spr;
  avx2.avx2_fma = true;
  zen4 = avx2;
  zen4.avx512 = zen4.avx512_bf16 = true;
  spr = zen4;
  spr.amx_bf16 = true;
  EXPECT_EQ(*ChooseCpuIsa(none, ""), CpuIsa::kGeneric);
  EXPECT_EQ(*ChooseCpuIsa(avx2, ""), CpuIsa::kAvx2);
  EXPECT_EQ(*ChooseCpuIsa(zen4, ""), CpuIsa::kAvx512Bf16);
  EXPECT_EQ(*ChooseCpuIsa(spr, ""), CpuIsa::kAmxBf16);
  EXPECT_EQ(*ChooseCpuIsa(spr, "avx512-bf16"), CpuIsa::kAvx512Bf16);  // a cap lowers the path
  EXPECT_EQ(*ChooseCpuIsa(spr, "avx2"), CpuIsa::kAvx2);
  EXPECT_EQ(*ChooseCpuIsa(spr, "generic"), CpuIsa::kGeneric);
  EXPECT_EQ(*ChooseCpuIsa(avx2, "amx-bf16"), CpuIsa::kAvx2);  // never above what the CPU has
  CpuFeatures avx512_only = avx2;  // AVX-512 without BF16 (Skylake-X): the fp32 path
  avx512_only.avx512 = true;
  EXPECT_EQ(*ChooseCpuIsa(avx512_only, ""), CpuIsa::kAvx2);
  EXPECT_EQ(ChooseCpuIsa(zen4, "avx9").status().code(), absl::StatusCode::kInvalidArgument);
  CpuFeatures odd = avx2;  // AMX reported without AVX-512-BF16 (a masked VM): never a path it lacks
  odd.amx_bf16 = true;
  EXPECT_EQ(*ChooseCpuIsa(odd, ""), CpuIsa::kAvx2);
  EXPECT_EQ(*ChooseCpuIsa(odd, "avx512-bf16"), CpuIsa::kAvx2);
  EXPECT_FALSE(DescribeCpuFeatures(DetectedCpuFeatures()).empty());
}

// The bf16 products really are bf16 (not an fp32 path in disguise) and within the product
// tolerance of a double-precision reference; bf16 rounding is to nearest even.
TEST(Bf16GemmTest, ProductsAreBf16AndWithinTolerance) {
  EXPECT_EQ(Bf16ToFloat([] { uint16_t b; const float one_and_bit = 1.0f + 1.0f / 256; ToBf16(&one_and_bit, &b, 1); return b; }()), 1.0f);
  if (CpuBf16Backend() == nullptr) GTEST_SKIP() << "cpu-bf16 unavailable: " << CpuBf16UnavailableReason();
  std::mt19937 rng(3);
  const int64_t m = 96, n = 80, k = 200;
  const Vec x = Random(static_cast<size_t>(m * k), rng), w = Random(static_cast<size_t>(n * k), rng), dy = Random(static_cast<size_t>(m * n), rng);
  std::vector<uint16_t> xb(x.size()), wb(w.size()), dyb(dy.size());
  ToBf16(x.data(), xb.data(), m * k);
  ToBf16(w.data(), wb.data(), n * k);
  ToBf16(dy.data(), dyb.data(), m * n);
  Vec y(static_cast<size_t>(m * n)), y_ref(y.size()), dx(static_cast<size_t>(m * k), 1.0f), dx_ref(dx.size(), 1.0f);
  Bf16MatmulNT(xb.data(), wb.data(), y.data(), m, n, k);
  Bf16MatmulNNAdd(dyb.data(), wb.data(), dx.data(), m, n, k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t l = 0; l < k; ++l) s += static_cast<double>(x[i * k + l]) * w[j * k + l];
      y_ref[i * n + j] = static_cast<float>(s);
    }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t l = 0; l < k; ++l) {
      double s = 1.0;
      for (int64_t j = 0; j < n; ++j) s += static_cast<double>(dy[i * n + j]) * w[j * k + l];
      dx_ref[i * k + l] = static_cast<float>(s);
    }
  const double ey = Nmse(y_ref, y, "bf16 forward"), edx = Nmse(dx_ref, dx, "bf16 backward");
  EXPECT_LT(ey, kGemmTol);
  EXPECT_LT(edx, kGemmTol);
  EXPECT_GT(ey, 1e-8) << "no bf16 rounding: not the bf16 path";
  std::printf("bf16 products: NMSE forward %.2e, backward %.2e (%s)\n", ey, edx, CpuBf16Backend()->Name());
}

// The general strided product (attention's blocks, the fused LoRA products) against plain loops
// over the same bf16 operands: every transpose combination, leading dimensions wider than the
// matrices, alpha, accumulation, thin shapes (one output column, rank 1), on the calling thread
// and on pool threads at once.
TEST(Bf16GemmTest, StridedProductsEqualLoops) {
  if (CpuBf16Backend() == nullptr) GTEST_SKIP() << "cpu-bf16 unavailable: " << CpuBf16UnavailableReason();
  std::mt19937 rng(5);
  using Case = std::tuple<int64_t, int64_t, int64_t>;  // m, n, k
  for (auto [m, n, k] : std::vector<Case>{{288, 1, 130}, {64, 64, 256}, {70, 16, 576}, {16, 576, 2048}, {3, 5, 7}, {1, 1, 1}}) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
      const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 5, ldc = n + 2;
      std::vector<uint16_t> a(static_cast<size_t>((ta ? k : m) * lda)), b(static_cast<size_t>((tb ? n : k) * ldb));
      const Vec af = Random(a.size(), rng), bf = Random(b.size(), rng);
      ToBf16(af.data(), a.data(), static_cast<int64_t>(a.size()));
      ToBf16(bf.data(), b.data(), static_cast<int64_t>(b.size()));
      for (const bool add : {false, true}) {
        const Vec c0 = Random(static_cast<size_t>(m * ldc), rng, 10.0f);
        Vec want = c0;
        Bf16GemmLoops(ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, add, want.data(), ldc);
        // The same product on two pool threads at once (each its own primitives) and here.
        std::vector<Vec> got(2, c0);
        DefaultPool().ParallelFor(2, 1, [&](int64_t i0, int64_t i1, int) {
          for (int64_t i = i0; i < i1; ++i) Bf16GemmOnThread(ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, add, got[static_cast<size_t>(i)].data(), ldc);
        });
        got.push_back(c0);
        Bf16GemmOnThread(ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, add, got.back().data(), ldc);
        for (const Vec& g : got) {
          const double e = Nmse(want, g, "bf16 gemm");
          EXPECT_LE(e, 1e-10) << m << "x" << n << "x" << k << " ta=" << ta << " tb=" << tb << " add=" << add;
          for (int64_t i = 0; i < m; ++i)  // the padding columns of C are never written
            for (int64_t j = n; j < ldc; ++j) ASSERT_EQ(g[static_cast<size_t>(i * ldc + j)], c0[static_cast<size_t>(i * ldc + j)]);
        }
      }
    }
  }
}

// Releasing the per-thread caches (a worker daemon between rounds) frees cpu-bf16's copies and
// oneDNN's primitives on every pool thread; the next products rebuild them and give bit-identical
// results (the same kernels on the same operands), the fused LoRA ops and the output layer too.
TEST(Bf16GemmTest, ProductsAfterReleasingThreadCachesAreUnchanged) {
  Backend* be = CpuBf16Backend();
  if (be == nullptr) GTEST_SKIP() << "cpu-bf16 unavailable: " << CpuBf16UnavailableReason();
  std::mt19937 rng(9);
  const int64_t m = 130, n = 576, k = 576, r = 8, V = 300;
  const QuantWeight w = Quantize(GgmlType::kQ4_1, n, k, rng), out = Quantize(GgmlType::kQ4_1, V, k, rng);
  const Vec x = Random(static_cast<size_t>(m * k), rng), a = Random(static_cast<size_t>(r * k), rng), b = Random(static_cast<size_t>(n * r), rng);
  std::vector<int32_t> target(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) target[static_cast<size_t>(i)] = static_cast<int32_t>(i % V);
  auto run = [&] {
    Vec y(static_cast<size_t>(m * n)), z(static_cast<size_t>(m * r)), y2(y.size()), dh(x.size(), 0.0f);
    be->QLinearLoraForward(w.m, x.data(), a.data(), b.data(), z.data(), y.data(), m, r, 2.0f);
    be->QLinearForward(w.m, x.data(), y2.data(), m);
    const double nll = be->CrossEntropy(out.m, x.data(), target.data(), m, dh.data(), 1.0f, 0.0f);
    y.insert(y.end(), y2.begin(), y2.end());
    y.insert(y.end(), dh.begin(), dh.end());
    y.push_back(static_cast<float>(nll));
    return y;
  };
  const Vec before = run();
  EXPECT_GT(Bf16GemmCachedPrimitives(), 0u);
  ReleaseThreadCaches();
  EXPECT_EQ(Bf16GemmCachedPrimitives(), 0u) << "the calling thread's primitives were not released";
  const Vec after = run();
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i) ASSERT_EQ(before[i], after[i]) << i;
  ReleaseThreadCaches();  // twice in a row, and with nothing cached
  ReleaseThreadCaches();
}

// The vectorised f32 -> bf16 conversion (every bf16 product converts its activations and
// weights with it) equals the scalar rounding bit for bit: ties to even both ways, subnormals,
// infinities, signalling and quiet NaNs, and lengths that leave a scalar tail.
TEST(Bf16GemmTest, VectorConversionEqualsScalarRounding) {
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x00000001u, 0x807fffffu, 0x00008000u, 0x00018000u,
                                0x3f808000u, 0x3f818000u, 0x3f817fffu, 0x3f818001u, 0x7f7fffffu, 0xff7fffffu,
                                0x7f800000u, 0xff800000u, 0x7f800001u, 0x7fc00000u, 0xffbfffffu, 0x7f7f8000u};
  std::mt19937 rng(11);
  for (int i = 0; i < 5000; ++i) bits.push_back(static_cast<uint32_t>(rng()));
  for (const size_t n : {bits.size(), size_t{15}, size_t{17}, size_t{1}}) {
    std::vector<float> x(n);
    std::memcpy(x.data(), bits.data(), n * sizeof(float));
    std::vector<uint16_t> out(n, 0xdeadu);
    ToBf16(x.data(), out.data(), static_cast<int64_t>(n));
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], Fp32ToBf16(x[i])) << std::hex << "input bits 0x" << bits[i];
  }
}

// The in-place conversion (the bf16 output layer's logit gradients): row i's bf16 values are the
// scalar rounding of its f32 values, in the first half of its own bytes (leading dimension 2
// cols), for rows shorter and longer than the conversion's 1,024-value blocks and with tails.
TEST(Bf16GemmTest, InPlaceRowConversionEqualsTheCopy) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (const int64_t cols : {int64_t{1}, int64_t{7}, int64_t{1024}, int64_t{1031}, int64_t{2500}}) {
    const int64_t rows = 9;
    std::vector<float> x(static_cast<size_t>(rows * cols));
    for (auto& v : x) v = nd(rng);
    std::vector<uint16_t> want(x.size());
    ToBf16(x.data(), want.data(), rows * cols);
    const uint16_t* got = ToBf16InPlaceRows(x.data(), rows, cols);
    ASSERT_EQ(static_cast<const void*>(got), static_cast<const void*>(x.data()));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        ASSERT_EQ(got[r * 2 * cols + c], want[static_cast<size_t>(r * cols + c)]) << "row " << r << " col " << c << " of " << cols;
    // The strided product the cross-entropy runs on it: dx[rows, k] += got[rows, cols] w[cols, k].
    if (CpuBf16Backend() == nullptr) continue;
    const int64_t k = 40;
    std::vector<uint16_t> w(static_cast<size_t>(cols * k));
    const Vec wf = Random(w.size(), rng);
    ToBf16(wf.data(), w.data(), static_cast<int64_t>(w.size()));
    const Vec dx0 = Random(static_cast<size_t>(rows * k), rng);
    Vec loops = dx0, dx = dx0;
    Bf16GemmLoops(false, false, rows, k, cols, 1.0f, got, 2 * cols, w.data(), k, true, loops.data(), k);
    Bf16MatmulNNAdd(got, w.data(), dx.data(), rows, cols, k, 2 * cols);
    EXPECT_LE(Nmse(loops, dx, "strided bf16 product"), 1e-10) << cols;
  }
}

#ifdef FEDTUNE_CUDA_EMULATED
INSTANTIATE_TEST_SUITE_P(Backends, BackendOps, ::testing::Values("cuda"),
                         [](const ::testing::TestParamInfo<std::string>&) { return std::string("CudaEmulated"); });
INSTANTIATE_TEST_SUITE_P(Backends, WeightProducts, ::testing::Values("cuda", "cuda-tf32", "cuda-fp32"),
                         [](const ::testing::TestParamInfo<std::string>& p) {
                           return p.param == "cuda" ? std::string("CudaEmulated") : p.param == "cuda-tf32" ? std::string("CudaEmulatedTf32") : std::string("CudaEmulatedFp32");
                         });
#else
std::string BackendTestName(const ::testing::TestParamInfo<std::string>& p) {
  return p.param == "cpu-fast" ? "CpuFast" : p.param == "cpu-bf16" ? "CpuBf16" : "Cuda";
}
INSTANTIATE_TEST_SUITE_P(Backends, BackendOps, ::testing::Values("cpu-fast", "cpu-bf16", "cuda"), BackendTestName);
INSTANTIATE_TEST_SUITE_P(Backends, WeightProducts, ::testing::Values("cpu-fast", "cpu-bf16", "cuda"), BackendTestName);
#endif

}  // namespace
}  // namespace fedtune::kernels

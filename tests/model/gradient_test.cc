// Backward passes against central finite differences in double precision: every training op
// on its own, then the whole tiny decoder with each adapter type (base in Q8_0 and Q4_1).
// Reported figure: ||g_analytic - g_fd|| / ||g_fd|| per tensor; required <= 1e-5.
#include <cmath>
#include <span>
#include <functional>

#include "common/rng.h"
#include "gtest/gtest.h"
#include "kernels/train_ops.h"
#include "model/dataset.h"
#include "model/trainer.h"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

using kernels::GgmlType;
constexpr double kTol = 1e-5;

std::vector<double> RandVec(size_t n, Rng& rng, double scale = 1.0) {
  std::vector<double> v(n);
  for (auto& x : v) x = rng.Normal() * scale;
  return v;
}

// Relative error of `analytic` against central differences of f over the entries of p
// (all of them, or `samples` random ones).
double FdRelError(const std::function<double()>& f, std::span<double> p, const std::vector<double>& analytic,
                  size_t samples = 0, uint64_t seed = 1) {
  Rng rng(seed);
  std::vector<size_t> idx;
  if (samples == 0 || samples >= p.size()) {
    for (size_t i = 0; i < p.size(); ++i) idx.push_back(i);
  } else {
    for (size_t i = 0; i < samples; ++i) idx.push_back(rng.Below(p.size()));
  }
  double num = 0, den = 0;
  for (size_t i : idx) {
    const double h = 1e-6 * std::max(1.0, std::fabs(p[i])), old = p[i];
    p[i] = old + h;
    const double fp = f();
    p[i] = old - h;
    const double fm = f();
    p[i] = old;
    const double fd = (fp - fm) / (2 * h);
    num += (analytic[i] - fd) * (analytic[i] - fd);
    den += fd * fd;
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-12);
}

double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

struct QWeight {
  std::vector<uint8_t> bytes;
  kernels::QMatrix m;
};
QWeight MakeWeight(int64_t rows, int64_t cols, GgmlType t, Rng& rng) {
  QWeight w;
  const size_t rb = *kernels::RowBytes(t, cols);
  w.bytes.resize(rb * static_cast<size_t>(rows));
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& x : row) x = static_cast<float>(rng.Normal() * 0.3);
    EXPECT_TRUE(kernels::QuantizeRow(t, row.data(), w.bytes.data() + r * rb, cols).ok());
  }
  w.m = {t, w.bytes.data(), rows, cols, rb};
  return w;
}

TEST(GradientTest, QuantizedLinearBackwardToInput) {
  Rng rng(1);
  const int64_t m = 3, k = 64, n = 37;
  auto w = MakeWeight(n, k, GgmlType::kQ4_1, rng);
  auto x = RandVec(m * k, rng), wy = RandVec(m * n, rng);
  std::vector<double> y(static_cast<size_t>(m * n)), dx(x.size(), 0.0);
  auto f = [&] { kernels::QLinearForward<double>(w.m, x.data(), y.data(), m); return Dot(y, wy); };
  kernels::QLinearBackward<double>(w.m, wy.data(), dx.data(), m);
  const double e = FdRelError(f, x, dx);
  std::printf("QLinear dx rel err %.2e\n", e);
  EXPECT_LE(e, kTol);
}

TEST(GradientTest, RmsNorm) {
  Rng rng(2);
  const int64_t rows = 4, n = 13;
  auto x = RandVec(rows * n, rng), wy = RandVec(rows * n, rng);
  std::vector<float> g(static_cast<size_t>(n));
  for (auto& v : g) v = static_cast<float>(1 + 0.2 * rng.Normal());
  std::vector<double> y(x.size()), rstd(static_cast<size_t>(rows)), dx(x.size(), 0.0);
  auto f = [&] { kernels::RmsNormForward<double>(x.data(), g.data(), y.data(), rstd.data(), rows, n, 1e-5f); return Dot(y, wy); };
  f();
  kernels::RmsNormBackward<double>(x.data(), g.data(), rstd.data(), wy.data(), dx.data(), rows, n);
  const double e = FdRelError(f, x, dx);
  std::printf("RmsNorm rel err %.2e\n", e);
  EXPECT_LE(e, kTol);
}

TEST(GradientTest, Rope) {
  Rng rng(3);
  const int64_t rows = 5, heads = 3, hd = 8;
  auto x = RandVec(rows * heads * hd, rng), wy = RandVec(x.size(), rng);
  std::vector<int32_t> pos = {0, 1, 2, 7, 100};
  auto f = [&] { auto y = x; kernels::RopeForward<double>(y.data(), pos.data(), rows, heads, hd, 6, 10000.0f); return Dot(y, wy); };
  auto dx = wy;
  kernels::RopeBackward<double>(dx.data(), pos.data(), rows, heads, hd, 6, 10000.0f);
  const double e = FdRelError(f, x, dx);
  std::printf("RoPE rel err %.2e\n", e);
  EXPECT_LE(e, kTol);
}

TEST(GradientTest, CausalGroupedQueryAttention) {
  Rng rng(4);
  for (auto [n_seq, len, H, Hkv, hd] : {std::tuple{2, 5, 4, 2, 3}, std::tuple{1, 7, 3, 1, 4}, std::tuple{3, 1, 2, 2, 2}}) {
    const int64_t E = H * hd, kvd = Hkv * hd, M = n_seq * len;
    auto q = RandVec(M * E, rng), k = RandVec(M * kvd, rng), v = RandVec(M * kvd, rng), wy = RandVec(M * E, rng);
    std::vector<double> out(static_cast<size_t>(M * E));
    auto f = [&] { kernels::AttentionForward<double>(q.data(), k.data(), v.data(), out.data(), n_seq, len, H, Hkv, hd); return Dot(out, wy); };
    std::vector<double> dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
    kernels::AttentionBackward<double>(q.data(), k.data(), v.data(), wy.data(), dq.data(), dk.data(), dv.data(), n_seq, len, H, Hkv, hd);
    const double eq = FdRelError(f, q, dq), ek = FdRelError(f, k, dk), ev = FdRelError(f, v, dv);
    std::printf("attention %lldx%lld H%lld/%lld: dq %.2e dk %.2e dv %.2e\n", static_cast<long long>(n_seq), static_cast<long long>(len),
                static_cast<long long>(H), static_cast<long long>(Hkv), eq, ek, ev);
    EXPECT_LE(eq, kTol);
    EXPECT_LE(ek, kTol);
    EXPECT_LE(ev, kTol);
  }
}

// Gemma 2's attention soft-capping: a small cap (0.4) so the tanh is far from linear on these
// scores, with packed rows, without and with a sliding window of 3 keys.
TEST(GradientTest, SoftCappedAndWindowedAttention) {
  Rng rng(41);
  const int64_t n_seq = 2, len = 6, H = 4, Hkv = 2, hd = 4, E = H * hd, kvd = Hkv * hd, M = n_seq * len;
  auto q = RandVec(M * E, rng, 2.0), k = RandVec(M * kvd, rng, 2.0), v = RandVec(M * kvd, rng), wy = RandVec(M * E, rng);
  const std::vector<int32_t> seg = {0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 5};
  std::vector<double> out(static_cast<size_t>(M * E));
  for (int64_t window : {0, 3}) {
    for (const int32_t* sp : {static_cast<const int32_t*>(nullptr), seg.data()}) {
      auto f = [&] {
        kernels::AttentionForward<double>(q.data(), k.data(), v.data(), out.data(), n_seq, len, H, Hkv, hd, sp, false, 0.4f, window);
        return Dot(out, wy);
      };
      std::vector<double> dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
      kernels::AttentionBackward<double>(q.data(), k.data(), v.data(), wy.data(), dq.data(), dk.data(), dv.data(), n_seq, len, H, Hkv, hd, sp,
                                         false, 0.4f, window);
      const double eq = FdRelError(f, q, dq), ek = FdRelError(f, k, dk), ev = FdRelError(f, v, dv);
      std::printf("soft-capped attention%s window %lld: dq %.2e dk %.2e dv %.2e\n", sp ? " packed" : "", static_cast<long long>(window), eq, ek,
                  ev);
      EXPECT_LE(eq, kTol);
      EXPECT_LE(ek, kTol);
      EXPECT_LE(ev, kTol);
    }
  }
  // A window of 3 keys: the last query's output does not depend on the first key (it does
  // without the window).
  for (int64_t window : {0, 3}) {
    auto k2 = k;
    for (int64_t d = 0; d < kvd; ++d) k2[static_cast<size_t>(d)] += 1.0;  // key 0 of sequence 0
    std::vector<double> a(out.size()), b(out.size());
    kernels::AttentionForward<double>(q.data(), k.data(), v.data(), a.data(), n_seq, len, H, Hkv, hd, nullptr, false, 0.0f, window);
    kernels::AttentionForward<double>(q.data(), k2.data(), v.data(), b.data(), n_seq, len, H, Hkv, hd, nullptr, false, 0.0f, window);
    double last = 0;
    for (int64_t d = 0; d < E; ++d) last = std::max(last, std::abs(a[static_cast<size_t>((len - 1) * E + d)] - b[static_cast<size_t>((len - 1) * E + d)]));
    if (window == 0) EXPECT_GT(last, 1e-6);
    else EXPECT_EQ(last, 0.0);
  }
  // The cap changes the output (the test would pass vacuously otherwise).
  std::vector<double> plain(out.size());
  kernels::AttentionForward<double>(q.data(), k.data(), v.data(), plain.data(), n_seq, len, H, Hkv, hd);
  kernels::AttentionForward<double>(q.data(), k.data(), v.data(), out.data(), n_seq, len, H, Hkv, hd, nullptr, false, 0.4f);
  double diff = 0;
  for (size_t i = 0; i < out.size(); ++i) diff = std::max(diff, std::abs(out[i] - plain[i]));
  EXPECT_GT(diff, 1e-2);
}

TEST(GradientTest, SwiGlu) {
  Rng rng(5);
  const int64_t n = 50;
  auto g = RandVec(n, rng, 2.0), u = RandVec(n, rng), wy = RandVec(n, rng);
  std::vector<double> y(static_cast<size_t>(n)), dg(y.size(), 0.0), du(y.size(), 0.0);
  auto f = [&] { kernels::SwiGluForward<double>(g.data(), u.data(), y.data(), n); return Dot(y, wy); };
  kernels::SwiGluBackward<double>(g.data(), u.data(), wy.data(), dg.data(), du.data(), n);
  const double eg = FdRelError(f, g, dg), eu = FdRelError(f, u, du);
  std::printf("SwiGLU rel err gate %.2e up %.2e\n", eg, eu);
  EXPECT_LE(eg, kTol);
  EXPECT_LE(eu, kTol);
}

TEST(GradientTest, ChunkedCrossEntropyWithMask) {
  Rng rng(6);
  const int64_t rows = 7, E = 32, V = 53;
  auto w = MakeWeight(V, E, GgmlType::kQ8_0, rng);
  auto h = RandVec(rows * E, rng);
  std::vector<int32_t> target = {3, -1, 52, 0, -1, 17, 8};
  std::vector<double> dh(h.size(), 0.0);
  const double nll = kernels::CrossEntropyChunked<double>(w.m, h.data(), target.data(), rows, dh.data(), 0.5, /*chunk=*/2);
  auto f = [&] { return 0.5 * kernels::CrossEntropyChunked<double>(w.m, h.data(), target.data(), rows, nullptr, 0.0, 3); };
  EXPECT_NEAR(0.5 * nll, f(), 1e-12);  // chunking does not change the value
  const double e = FdRelError(f, h, dh);
  std::printf("cross-entropy rel err %.2e\n", e);
  EXPECT_LE(e, kTol);
  for (int j = 0; j < E; ++j) {
    EXPECT_EQ(dh[static_cast<size_t>(E + j)], 0.0);  // masked row gets no gradient
  }
}

// Gemma 2's final-logit soft-capping (cap 1.5: the logits here reach a few units).
TEST(GradientTest, SoftCappedCrossEntropy) {
  Rng rng(61);
  const int64_t rows = 5, E = 32, V = 53;
  auto w = MakeWeight(V, E, GgmlType::kQ8_0, rng);
  auto h = RandVec(rows * E, rng, 3.0);
  std::vector<int32_t> target = {3, -1, 52, 0, 17};
  std::vector<double> dh(h.size(), 0.0);
  const double nll = kernels::CrossEntropyChunked<double>(w.m, h.data(), target.data(), rows, dh.data(), 0.5, 2, false, 1.5f);
  auto f = [&] { return 0.5 * kernels::CrossEntropyChunked<double>(w.m, h.data(), target.data(), rows, nullptr, 0.0, 3, false, 1.5f); };
  EXPECT_NEAR(0.5 * nll, f(), 1e-12);
  const double e = FdRelError(f, h, dh);
  std::printf("soft-capped cross-entropy rel err %.2e\n", e);
  EXPECT_LE(e, kTol);
  // Capped logits lie in (-1.5, 1.5): the NLL is at most log(V) + 3 per row, and differs from the uncapped one.
  EXPECT_LT(nll, 4 * (std::log(static_cast<double>(V)) + 3.0));
  EXPECT_GT(std::abs(nll - kernels::CrossEntropyChunked<double>(w.m, h.data(), target.data(), rows, nullptr, 0.0, 3)), 1e-3);
}

template <typename F>
void CheckAdapter(const AdapterSpec& spec, int64_t in, int64_t out, F&& report) {
  Rng rng(7);
  auto a = *ModuleAdapter<double>::Create(spec, in, out, 11);
  for (auto& v : a.b) v = rng.Normal();  // B = 0 at init would hide A's gradient
  for (auto& v : a.d) v = rng.Normal();
  const int64_t m = 4;
  auto x = RandVec(m * in, rng), wy = RandVec(m * out, rng);
  std::vector<double> y, z, dx(x.size(), 0.0);
  auto f = [&] { y.assign(static_cast<size_t>(m * out), 0.0); a.Forward(x.data(), y.data(), m, &z); return Dot(y, wy); };
  f();
  a.Backward(x.data(), z, wy.data(), dx.data(), m);
  report("dx", FdRelError(f, x, dx));
  if (!a.gb.empty()) report("dB", FdRelError(f, a.b, a.gb));
  if (!a.ga.empty()) report("dA", FdRelError(f, a.a, a.ga));
  if (!a.gd.empty()) report("dD", FdRelError(f, a.d, a.gd));
}

TEST(GradientTest, AdaptersOnTheirOwn) {
  for (const AdapterSpec spec : {AdapterSpec{AdapterKind::kLora, 3, 6.0f, false, 1}, AdapterSpec{AdapterKind::kLora, 4, 8.0f, true, 1},
                                 AdapterSpec{AdapterKind::kFfaLora, 2, 4.0f, false, 1}, AdapterSpec{AdapterKind::kDiaBlo, 1, 1, false, 3},
                                 AdapterSpec{AdapterKind::kDiaBlo, 1, 1, false, 4}}) {
    for (auto [in, out] : {std::pair{10, 7}, std::pair{12, 12}, std::pair{5, 9}}) {
      CheckAdapter(spec, in, out, [&](const char* what, double e) {
        EXPECT_LE(e, kTol) << AdapterKindName(spec.kind) << " " << in << "->" << out << " " << what;
      });
    }
  }
}

// The small decoder the whole-model checks run on (2 layers, GQA 4/2), base in `wtype`; with
// `compensated`, written in Q8_0 and re-quantized to `wtype` with a rank-2 svd correction on
// every projection (model/compensation.h), so forward and backward run through the corrections.
absl::StatusOr<std::unique_ptr<LlamaModel>> GradientModel(GgmlType wtype, const std::string& name, bool compensated = false) {
  testing::TinyModelOptions o;
  o.n_embd = 32;
  o.n_head = 4;
  o.n_head_kv = 2;
  o.n_ff = 64;
  o.n_layer = 2;
  o.weight_type = compensated ? GgmlType::kQ8_0 : wtype;
  const std::string path = testing::TempPath(name + ".gguf");
  FT_RETURN_IF_ERROR(testing::WriteTinyLlamaGguf(path, o));
  FT_ASSIGN_OR_RETURN(auto m, LlamaModel::Load(path));
  if (compensated) {
    CompensationOptions c;
    c.method = CompensationMethod::kSvd;
    c.rank = 2;
    FT_ASSIGN_OR_RETURN(auto rep, m->RequantizeCompensated(wtype, c, {}));
    if (rep.correction_bytes == 0) return absl::InternalError("no correction was kept");
  }
  return m;
}

// The whole tiny decoder: loss gradients of every adapter tensor on all seven modules.
class WholeModelGradientTest : public ::testing::TestWithParam<std::tuple<AdapterKind, GgmlType, bool>> {};

TEST_P(WholeModelGradientTest, MatchesFiniteDifferences) {
  const auto [kind, wtype, compensated] = GetParam();
  auto model = GradientModel(wtype, std::string("grad_") + AdapterKindName(kind), compensated);
  ASSERT_TRUE(model.ok()) << model.status();
  const auto& cfg = (*model)->config();
  AdapterSpec spec{kind, 3, 6.0f, false, 4};
  AdapterSet<double> set;
  set.layers.resize(static_cast<size_t>(cfg.n_layer));
  Rng rng(9);
  for (int64_t l = 0; l < cfg.n_layer; ++l) {
    const int64_t kv = cfg.n_head_kv * cfg.head_dim;
    const std::array<std::pair<int64_t, int64_t>, kNumModules> dims = {{{cfg.n_embd, cfg.n_embd}, {cfg.n_embd, kv}, {cfg.n_embd, kv},
                                                                         {cfg.n_embd, cfg.n_embd}, {cfg.n_embd, cfg.n_ff},
                                                                         {cfg.n_embd, cfg.n_ff}, {cfg.n_ff, cfg.n_embd}}};
    for (int mod = 0; mod < kNumModules; ++mod) {
      auto a = ModuleAdapter<double>::Create(spec, dims[mod].first, dims[mod].second, 100 + static_cast<uint64_t>(l * 10 + mod));
      ASSERT_TRUE(a.ok());
      for (auto& v : a->b) v = 0.3 * rng.Normal();
      for (auto& v : a->d) v = 0.1 * rng.Normal();
      set.layers[static_cast<size_t>(l)][mod] = std::move(*a);
    }
  }
  Batch b;
  b.n_seq = 2;
  b.len = 6;
  for (int i = 0; i < 12; ++i) {
    b.tokens.push_back(static_cast<int32_t>(3 + rng.Below(250)));
    b.targets.push_back(i % 6 < 2 ? -1 : static_cast<int32_t>(3 + rng.Below(250)));  // prompt positions masked
  }
  for (bool recompute : {true, false}) {
    Trainer<double> trainer(**model, &set, recompute);
    set.ZeroGrad();
    ASSERT_TRUE(trainer.Step(b, 1.0, true).ok());
    auto loss = [&] { return *trainer.Step(b, 1.0, false); };
    double worst = 0;
    for (int64_t l = 0; l < cfg.n_layer; ++l) {
      for (int mod = 0; mod < kNumModules; ++mod) {
        auto& a = *set.layers[static_cast<size_t>(l)][mod];
        auto check = [&](std::vector<double>& p, const std::vector<double>& g, const char* what) {
          const auto grad = g;  // FdRelError re-runs forward only; gradients stay as computed
          const double e = FdRelError(loss, p, grad, 12, static_cast<uint64_t>(l * 7 + mod));
          worst = std::max(worst, e);
          EXPECT_LE(e, kTol) << "layer " << l << " " << ModuleName(static_cast<Module>(mod)) << " " << what;
        };
        if (!a.gb.empty()) check(a.b, a.gb, "B");
        if (!a.ga.empty()) check(a.a, a.ga, "A");
        if (!a.gd.empty()) check(a.d, a.gd, "D");
      }
    }
    std::printf("%s on %s base, recompute=%d: worst relative error over all adapter tensors %.2e\n", AdapterKindName(kind),
                kernels::TypeTraits(wtype).name, recompute, worst);
  }
}

// Backward stops at the lowest layer with adapters and, there, after the last adapter that needs
// a gradient; the gradients still match finite differences, and nothing is kept below it.
TEST(TrainerModesTest, BackwardStopsAtTheLowestTrainedLayer) {
  auto model = GradientModel(GgmlType::kQ8_0, "grad_truncated");
  ASSERT_TRUE(model.ok()) << model.status();
  const auto& cfg = (*model)->config();
  Rng rng(21);
  Batch b;
  b.n_seq = 2;
  b.len = 5;
  for (int i = 0; i < 10; ++i) {
    b.tokens.push_back(static_cast<int32_t>(3 + rng.Below(250)));
    b.targets.push_back(i % 5 < 1 ? -1 : static_cast<int32_t>(3 + rng.Below(250)));
  }
  // One kept layer (4 E + 2 kvd + 2 F + 2 rstd) and the derived h1, h2, act (2 E + F) once.
  const int64_t kvd = cfg.n_head_kv * cfg.head_dim, per_layer = 4 * cfg.n_embd + 2 * kvd + 2 * cfg.n_ff + 2 + (2 * cfg.n_embd + cfg.n_ff);
  for (const char* layout : {"1:q", "1:o", "1:down", "1:gate", "1:k,up", "0:v;1:o"}) {
    for (AdapterKind kind : {AdapterKind::kLora, AdapterKind::kDiaBlo}) {
      auto made = MakeAdaptersWithLayout<double>((*model)->adapter_dims(), AdapterSpec{kind, 2, 4.0f, false, 4}, kAllModules, layout, 3);
      ASSERT_TRUE(made.ok()) << made.status();
      AdapterSet<double> set = std::move(*made);
      set.ForEachTrainable([&](const std::string&, std::span<double> p, std::span<double>) {
        for (auto& v : p) v += 0.3 * rng.Normal();
      });
      for (bool recompute : {true, false}) {
        Trainer<double> trainer(**model, &set, recompute);
        if (layout[0] == '1') {
          const int64_t z = kind == AdapterKind::kLora ? 2 * (layout == std::string("1:k,up") ? 2 : 1) : 0;
          EXPECT_EQ(trainer.KeptBytesPerSequence(b.len), static_cast<int64_t>(sizeof(double)) * b.len * (per_layer + z)) << layout;
        }
        set.ZeroGrad();
        ASSERT_TRUE(trainer.Step(b, 1.0, true).ok());
        auto loss = [&] { return *trainer.Step(b, 1.0, false); };
        int tensors = 0;
        set.ForEachTrainable([&](const std::string& name, std::span<double> p, std::span<double> g) {
          const std::vector<double> grad(g.begin(), g.end());
          const double e = FdRelError(loss, p, grad, 12, static_cast<uint64_t>(++tensors));
          EXPECT_LE(e, kTol) << layout << " " << AdapterKindName(kind) << " recompute=" << recompute << " " << name;
        });
        EXPECT_GT(tensors, 0) << layout;
      }
    }
  }
}

// Packing, micro-batches and adapter dropout on the whole tiny model (LoRA, Q8_0 base, double):
// a packed batch gives the padded batch's loss and gradients; slices of one sequence give the
// whole batch's; with dropout the gradients still match finite differences of the (fixed-mask)
// training loss, and the mask changes the loss.
TEST(TrainerModesTest, PackingMicroBatchesAndDropout) {
  auto model = GradientModel(GgmlType::kQ8_0, "grad_modes");
  ASSERT_TRUE(model.ok()) << model.status();
  AdapterSpec spec{AdapterKind::kLora, 3, 6.0f, false, 4};
  auto made = MakeAdapters<double>((*model)->adapter_dims(), spec, kAllModules, 5);
  ASSERT_TRUE(made.ok()) << made.status();
  AdapterSet<double> set = std::move(*made);
  Rng rng(3);
  set.ForEachTrainable([&](const std::string&, std::span<double> p, std::span<double>) {
    for (auto& v : p) v += 0.2 * rng.Normal();
  });
  // Five examples of lengths 2..7 with masked prompts.
  std::vector<Example> ex(5);
  for (size_t e = 0; e < ex.size(); ++e) {
    const size_t n = 2 + (e * 3) % 6;
    for (size_t i = 0; i < n; ++i) {
      ex[e].tokens.push_back(static_cast<int32_t>(3 + rng.Below(250)));
      ex[e].targets.push_back(i < 1 ? -1 : static_cast<int32_t>(3 + rng.Below(250)));
    }
  }
  std::vector<const Example*> ptrs;
  for (const auto& e : ex) ptrs.push_back(&e);
  const Batch padded = MakeBatch(ptrs, 0), packed = MakePackedBatch(ptrs, 0);
  EXPECT_LT(packed.n_seq, padded.n_seq);
  EXPECT_EQ(packed.n_scored(), padded.n_scored());
  auto grads = [&](Trainer<double>& t, const Batch& b, double* nll) {
    set.ZeroGrad();
    *nll = *t.Step(b, 1.0, true);
    std::vector<double> g;
    set.ForEachTrainable([&](const std::string&, std::span<double>, std::span<double> gr) { g.insert(g.end(), gr.begin(), gr.end()); });
    return g;
  };
  auto max_rel = [](const std::vector<double>& a, const std::vector<double>& b) {
    double worst = 0, scale = 1e-30;
    for (double x : b) scale = std::max(scale, std::abs(x));
    for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]) / scale);
    return worst;
  };
  Trainer<double> whole(**model, &set, true);
  double nll_padded = 0, nll_packed = 0, nll_sliced = 0;
  const auto g_padded = grads(whole, padded, &nll_padded);
  const auto g_packed = grads(whole, packed, &nll_packed);
  EXPECT_NEAR(nll_packed, nll_padded, 1e-10 * std::abs(nll_padded));
  EXPECT_LE(max_rel(g_packed, g_padded), 1e-10);
  Trainer<double> sliced(**model, &set, TrainerOptions{.recompute = false, .micro_batch = 1});
  const auto g_sliced = grads(sliced, padded, &nll_sliced);
  EXPECT_NEAR(nll_sliced, nll_padded, 1e-10 * std::abs(nll_padded));
  EXPECT_LE(max_rel(g_sliced, g_padded), 1e-10);

  // The memory-driven choice: everything fits / 2 of 5 sequences per pass / recompute; the
  // budget's slicing gives the whole batch's result.
  Trainer<double> probe(**model, &set, true);
  const int64_t per_seq = probe.KeptBytesPerSequence(padded.len);
  // 2 layers x (4 E + 2 kvd + 2 F + 2 rstd) + LoRA z (r = 3 on 7 modules x 2 layers) + the
  // derived h1, h2, act once (2 E + F), in double.
  EXPECT_EQ(per_seq, static_cast<int64_t>(sizeof(double)) * padded.len * (2 * (4 * 32 + 2 * 16 + 2 * 64 + 2) + 42 + (2 * 32 + 64)));
  auto plan_at = [&](int64_t budget) {
    return Trainer<double>(**model, &set, TrainerOptions{.activation_budget_bytes = budget}).PlanFor(padded.n_seq, padded.len);
  };
  EXPECT_FALSE(plan_at(per_seq * 100).recompute);
  EXPECT_EQ(plan_at(per_seq * 100).micro_batch, 0);
  EXPECT_FALSE(plan_at(per_seq * 5 / 2).recompute);
  EXPECT_EQ(plan_at(per_seq * 5 / 2).micro_batch, 2);
  EXPECT_TRUE(plan_at(per_seq / 2).recompute);
  Trainer<double> budgeted(**model, &set, TrainerOptions{.activation_budget_bytes = per_seq * 5 / 2});
  double nll_budget = 0;
  const auto g_budget = grads(budgeted, padded, &nll_budget);
  EXPECT_NEAR(nll_budget, nll_padded, 1e-10 * std::abs(nll_padded));
  EXPECT_LE(max_rel(g_budget, g_padded), 1e-10);

  Trainer<double> drop(**model, &set, TrainerOptions{.recompute = true, .adapter_dropout = 0.3f});
  drop.set_dropout_seed(11);
  drop.set_training_forward(true);
  double nll_drop = 0;
  grads(drop, packed, &nll_drop);
  EXPECT_GT(std::abs(nll_drop - nll_packed), 1e-6) << "dropout must change the training loss";
  auto loss = [&] { return *drop.Step(packed, 1.0, false); };
  double worst = 0;
  for (auto& layer : set.layers) {
    for (auto& a : layer) {
      if (!a) continue;
      const auto gb = a->gb, ga = a->ga;
      worst = std::max(worst, FdRelError(loss, a->b, gb, 6, 1));
      worst = std::max(worst, FdRelError(loss, a->a, ga, 6, 2));
    }
  }
  std::printf("packed %lld rows vs padded %lld; dropout 0.3: worst relative error %.2e\n", static_cast<long long>(packed.n_seq),
              static_cast<long long>(padded.n_seq), worst);
  EXPECT_LE(worst, kTol);
  drop.set_training_forward(false);
  EXPECT_NEAR(*drop.Step(packed, 1.0, false), nll_packed, 1e-12 * std::abs(nll_packed)) << "no dropout outside training";
}

INSTANTIATE_TEST_SUITE_P(Adapters, WholeModelGradientTest,
                         ::testing::Combine(::testing::Values(AdapterKind::kLora, AdapterKind::kFfaLora, AdapterKind::kDiaBlo),
                                            ::testing::Values(GgmlType::kQ8_0, GgmlType::kQ4_1), ::testing::Values(false)),
                         [](const auto& p) {
                           return std::string(AdapterKindName(std::get<0>(p.param))) + "_" + kernels::TypeTraits(std::get<1>(p.param)).name;
                         });
// A compensated low-bit base (Compensation in the name for the test filter).
INSTANTIATE_TEST_SUITE_P(Compensation, WholeModelGradientTest,
                         ::testing::Combine(::testing::Values(AdapterKind::kLora, AdapterKind::kDiaBlo), ::testing::Values(GgmlType::kQ4_0),
                                            ::testing::Values(true)),
                         [](const auto& p) { return std::string(AdapterKindName(std::get<0>(p.param))) + "_Q4_0_svd"; });

}  // namespace
}  // namespace fedtune::model

#include "model/llama.h"

#include <cmath>

#include "gtest/gtest.h"
#include "model/perplexity.h"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

std::unique_ptr<LlamaModel> Tiny(const testing::TinyModelOptions& o, const std::string& name) {
  const std::string path = testing::TempPath(name);
  EXPECT_TRUE(testing::WriteTinyLlamaGguf(path, o).ok());
  auto m = LlamaModel::Load(path);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(m).value() : nullptr;
}

float MaxAbsDiff(const std::vector<float>& a, const float* b) {
  float d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
  return d;
}

TEST(LlamaTest, KvCacheDecodingEqualsBatchEvaluation) {
  auto m = Tiny({}, "kv.gguf");
  ASSERT_NE(m, nullptr);
  const std::vector<int32_t> toks = {5, 80, 120, 7, 200, 33, 90, 100, 101, 4, 250};
  const int64_t V = m->config().n_vocab;
  LlamaContext batch(*m, 64);
  std::vector<float> all;
  ASSERT_TRUE(batch.Eval(toks, true, &all).ok());
  ASSERT_EQ(all.size(), toks.size() * static_cast<size_t>(V));
  LlamaContext step(*m, 64);
  std::vector<float> one;
  // Mixed chunk sizes: 3 tokens, then 1 at a time.
  ASSERT_TRUE(step.Eval(std::span(toks).subspan(0, 3), true, &one).ok());
  EXPECT_LT(MaxAbsDiff(one, all.data()), 1e-4f);
  for (size_t t = 3; t < toks.size(); ++t) {
    ASSERT_TRUE(step.Eval(std::span(toks).subspan(t, 1), false, &one).ok());
    EXPECT_LT(MaxAbsDiff(one, all.data() + t * V), 1e-4f) << "position " << t;
  }
  EXPECT_EQ(step.n_past(), static_cast<int64_t>(toks.size()));
}

TEST(LlamaTest, HuggingFaceFolderGivesSameLogitsAsGguf) {
  for (bool tied : {true, false}) {
    testing::TinyModelOptions o;
    o.weight_type = kernels::GgmlType::kF32;
    o.tied_output = tied;
    const std::string gguf = testing::TempPath(tied ? "hf_tied.gguf" : "hf_untied.gguf");
    const std::string dir = testing::TempPath(tied ? "hf_tied" : "hf_untied");
    ASSERT_TRUE(testing::WriteTinyLlamaGguf(gguf, o).ok());
    ASSERT_TRUE(testing::WriteTinyLlamaHf(gguf, dir).ok());
    auto a = LlamaModel::Load(gguf);
    auto b = LlamaModel::Load(dir);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ((*b)->config().tied_output, tied);
    const std::vector<int32_t> toks = {10, 20, 30, 40, 50, 60};
    std::vector<float> la, lb;
    LlamaContext ca(**a, 16), cb(**b, 16);
    ASSERT_TRUE(ca.Eval(toks, true, &la).ok());
    ASSERT_TRUE(cb.Eval(toks, true, &lb).ok());
    EXPECT_LT(MaxAbsDiff(la, lb.data()), 1e-5f);
  }
}

TEST(LlamaTest, GroupedQueryAttentionVariantsRun) {
  for (auto [h, kv] : {std::pair{4, 4}, std::pair{4, 1}, std::pair{8, 2}}) {
    testing::TinyModelOptions o;
    o.n_head = h;
    o.n_head_kv = kv;
    auto m = Tiny(o, "gqa.gguf");
    ASSERT_NE(m, nullptr);
    LlamaContext c(*m, 8);
    std::vector<float> l;
    ASSERT_TRUE(c.Eval(std::vector<int32_t>{1, 2, 3}, false, &l).ok());
    for (float x : l) ASSERT_TRUE(std::isfinite(x));
  }
}

TEST(LlamaTest, BadInputsReturnPreciseErrors) {
  auto m = Tiny({}, "err.gguf");
  ASSERT_NE(m, nullptr);
  LlamaContext c(*m, 4);
  std::vector<float> l;
  auto s = c.Eval(std::vector<int32_t>{1, 99999}, false, &l);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("99999"), std::string::npos);
  EXPECT_EQ(c.Eval(std::vector<int32_t>{1, 2, 3, 4, 5}, false, &l).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(c.Eval({}, false, &l).code(), absl::StatusCode::kInvalidArgument);
}

TEST(LlamaTest, MissingOrMisshapenTensorIsNamed) {
  const std::string path = testing::TempPath("full.gguf");
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, {}).ok());
  auto g = GgufFile::Open(path);
  ASSERT_TRUE(g.ok());
  for (const std::string drop : {"blk.1.ffn_up.weight", "output_norm.weight"}) {
    GgufWriter w;
    for (const auto& k : (*g)->key_order()) w.SetValue(k, (*g)->metadata().at(k));
    for (const auto& t : (*g)->tensors()) {
      if (t.name != drop) {
        ASSERT_TRUE(w.AddTensor(t.name, t.ne, t.type, {t.data, t.nbytes}).ok());
      }
    }
    auto m = LlamaModel::FromGguf(*GgufFile::Parse(MappedFile::FromBytes(w.Serialize(), "x.gguf")));
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
    EXPECT_NE(m.status().message().find(drop), std::string::npos) << m.status();
  }
  // Wrong head count makes the K projection the wrong shape.
  GgufWriter w;
  for (const auto& k : (*g)->key_order()) {
    if (k == "llama.attention.head_count_kv") w.SetU32(k, 4);
    else w.SetValue(k, (*g)->metadata().at(k));
  }
  for (const auto& t : (*g)->tensors()) ASSERT_TRUE(w.AddTensor(t.name, t.ne, t.type, {t.data, t.nbytes}).ok());
  auto m = LlamaModel::FromGguf(*GgufFile::Parse(MappedFile::FromBytes(w.Serialize(), "x.gguf")));
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("attn_k"), std::string::npos) << m.status();
}

TEST(LlamaTest, PerplexityScoresEveryTokenOnce) {
  auto m = Tiny({}, "ppl.gguf");
  ASSERT_NE(m, nullptr);
  std::vector<int32_t> toks;
  for (int i = 0; i < 40; ++i) toks.push_back(3 + (i * 37) % 250);
  // Overlapping windows score all 39 predictable tokens; disjoint windows (stride == window)
  // cannot score the first token of each window: 40 tokens in 3 windows -> 37.
  for (auto [w, s, expect] : {std::tuple{16, 5, 39}, std::tuple{64, 64, 39}, std::tuple{16, 16, 37}}) {
    auto r = Perplexity(*m, toks, w, s);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->n_scored, expect) << w << "/" << s;
    EXPECT_GT(r->perplexity(), 1.0);
  }
  // Disjoint windows (16, 16, then 8 tokens) score exactly what three separate passes over
  // those chunks score.
  auto windowed = Perplexity(*m, toks, 16, 16);
  ASSERT_TRUE(windowed.ok());
  double chunks = 0;
  for (size_t b = 0; b < toks.size(); b += 16) {
    auto part = Perplexity(*m, std::span(toks).subspan(b, std::min<size_t>(16, toks.size() - b)), 64, 64);
    ASSERT_TRUE(part.ok());
    chunks += part->nll_sum;
  }
  EXPECT_NEAR(windowed->nll_sum, chunks, 1e-4);
  EXPECT_EQ(Perplexity(*m, toks, 1, 1).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedtune::model

namespace fedtune::model {
namespace {

TEST(RequantizeTest, LowerPrecisionBasesStayCloseAndShrink) {
  testing::TinyModelOptions o;
  o.weight_type = kernels::GgmlType::kF32;
  o.n_embd = 128;
  o.n_ff = 256;
  const std::string path = testing::TempPath("requant.gguf");
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, o).ok());
  auto ref = LlamaModel::Load(path);
  ASSERT_TRUE(ref.ok());
  const std::vector<int32_t> toks = {5, 70, 9, 130, 44, 2};
  auto logits = [&](const LlamaModel& m) {
    LlamaContext c(m, 8);
    std::vector<float> l;
    EXPECT_TRUE(c.Eval(toks, true, &l).ok());
    return l;
  };
  const auto base = logits(**ref);
  double base_norm = 0;
  for (float v : base) base_norm += v * v;
  size_t prev_bytes = (*ref)->ProjectionBytes();
  for (auto [t, tol] : {std::pair{kernels::GgmlType::kQ8_0, 0.02}, std::pair{kernels::GgmlType::kNF4, 0.2},
                        std::pair{kernels::GgmlType::kQ4_0, 0.25}, std::pair{kernels::GgmlType::kNF4DQ, 0.2}}) {
    auto m = LlamaModel::Load(path);
    ASSERT_TRUE(m.ok());
    auto bytes = (*m)->Requantize(t);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    // NF4 and Q4_0 both take 4.5 bits. NF4_DQ's 8-byte row header only pays from 171 values per
    // row (this tiny model's rows are shorter; the kernels test checks a 576-value row).
    if (t != kernels::GgmlType::kNF4DQ) {
      EXPECT_LE(*bytes, prev_bytes) << kernels::TypeTraits(t).name;
    }
    const auto l = logits(**m);
    double err = 0;
    for (size_t i = 0; i < l.size(); ++i) err += (l[i] - base[i]) * (l[i] - base[i]);
    const double rel = std::sqrt(err / base_norm);
    std::printf("%s: projection weights %zu bytes, relative logit error %.4f\n", kernels::TypeTraits(t).name, *bytes, rel);
    EXPECT_LT(rel, tol) << kernels::TypeTraits(t).name;
    prev_bytes = *bytes;
  }
  // Dropping the stored model's mapped pages (a worker training on a copy) changes nothing it
  // computes afterwards: the pages are read again from the file.
  (*ref)->ReleaseMappedPages();
  EXPECT_EQ(logits(**ref), base);
}

}  // namespace
}  // namespace fedtune::model

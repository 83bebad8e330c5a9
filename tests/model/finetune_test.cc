// The fine-tuning pieces on tiny models: data loading, AdamW, schedule, the float training
// path against the double one, adapters in the inference path, save/load, and learning.
#include <cmath>
#include <set>
#include <fstream>

#include "absl/strings/ascii.h"
#include "common/rng.h"
#include "gtest/gtest.h"
#include "model/adapter_io.h"
#include "model/dataset.h"
#include "model/finetune.h"
#include "model/sampler.h"
#include "model/tasks.h"
#include "model/trainer.h"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

class TinyFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = testing::TempPath("finetune.gguf");
    testing::TinyModelOptions o;
    o.n_embd = 64;
    o.n_ff = 128;
    o.n_ctx = 512;  // byte-level tiny vocabulary: ~1 token per character
    ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, o).ok());
    auto m = LlamaModel::Load(path);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(m).value();
    dims_ = model_->adapter_dims();
  }
  std::unique_ptr<LlamaModel> model_;
  ModelDims dims_{};
};

TEST_F(TinyFixture, JsonlErrorsNameFileAndLine) {
  const Tokenizer& tok = *model_->tokenizer();
  DatasetOptions o;
  auto err = [&](std::vector<std::string> lines) { return DatasetFromJsonl(lines, "d.jsonl", tok, o).status(); };
  EXPECT_NE(err({R"({"prompt":"a","response":"b"})", "{oops"}).message().find("d.jsonl:2: malformed JSON"), std::string::npos);
  EXPECT_NE(err({R"({"prompt":"a"})"}).message().find("d.jsonl:1: missing string field 'response'"), std::string::npos);
  EXPECT_NE(err({R"({"messages":[{"role":"user","content":"x"}]})"}).message().find("no assistant message"), std::string::npos);
  EXPECT_NE(err({R"({"messages":[{"role":"user"}]})"}).message().find("'role' and 'content'"), std::string::npos);
  EXPECT_NE(err({"", "  "}).message().find("no examples"), std::string::npos);
  EXPECT_EQ(LoadDataset("/nonexistent.jsonl", tok, o).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(TinyFixture, OnlyAssistantTextIsScoredAndLongExamplesAreTruncated) {
  const Tokenizer& tok = *model_->tokenizer();
  DatasetOptions o;
  o.holdout = 0;
  auto d = DatasetFromJsonl({R"({"messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"},{"role":"assistant","content":"the end"}]})"},
                            "m.jsonl", tok, o);
  ASSERT_TRUE(d.ok()) << d.status();
  const Example& ex = d->train[0];
  std::vector<int32_t> scored;
  for (size_t i = 0; i < ex.targets.size(); ++i)
    if (ex.targets[i] >= 0) scored.push_back(ex.targets[i]);
  EXPECT_EQ(tok.Decode(scored), "the end<|im_end|>\n");
  EXPECT_EQ(ex.reference, "the end");
  EXPECT_EQ(tok.Decode(ex.tokens).rfind(ex.prompt_text, 0), 0u);  // the prompt is a prefix of the example
  o.max_len = 10;
  auto t = DatasetFromJsonl({R"({"prompt":"a long long long prompt here","response":"and a long answer"})"}, "t.jsonl", tok, o);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->truncated, 1);
  EXPECT_EQ(t->train[0].tokens.size(), 10u);
}

TEST_F(TinyFixture, SplitIsDeterministic) {
  auto lines = *GenerateTask("record", 50, 3);
  DatasetOptions o;
  o.holdout = 0.2;
  auto a = DatasetFromJsonl(lines, "x", *model_->tokenizer(), o), b = DatasetFromJsonl(lines, "x", *model_->tokenizer(), o);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->eval.size(), 10u);
  for (size_t i = 0; i < a->eval.size(); ++i) EXPECT_EQ(a->eval[i].tokens, b->eval[i].tokens);
}

// Evaluation: the loss over every held-out example, greedy answers (exact match, ROUGE-L) for the
// first max_generated only; "answers" count for exact match; empty answers are refused.
TEST_F(TinyFixture, EvaluationGeneratesForTheFirstExamplesOnlyAndAcceptsAnyAnswer) {
  const auto& tok = *model_->tokenizer();
  DatasetOptions o;
  o.holdout = 0.5;
  auto lines = *GenerateTask("record", 12, 5);
  auto d = DatasetFromJsonl(lines, "x", tok, o);
  ASSERT_TRUE(d.ok());
  ASSERT_EQ(d->eval.size(), 6u);
  auto all = Evaluate(*model_, nullptr, d->eval, 0, 3);
  auto two = Evaluate(*model_, nullptr, d->eval, 0, 3, 8, 2);
  ASSERT_TRUE(all.ok() && two.ok());
  EXPECT_EQ(all->n_generated, 6);
  EXPECT_EQ(two->n_generated, 2);
  EXPECT_EQ(two->n_tokens, all->n_tokens);
  EXPECT_DOUBLE_EQ(two->loss, all->loss);
  // Whatever the tiny model answers first is made an accepted answer: exact match 1, ROUGE-L 1
  // (when the answer has a word).
  const std::string got = *GenerateGreedy(*model_, nullptr, d->eval[0].prompt_text, 3);
  std::vector<Example> one = {d->eval[0]};
  one[0].answers = {"something else", got};
  auto r = Evaluate(*model_, nullptr, one, 0, 3);
  ASSERT_TRUE(r.ok());
  if (!absl::StripAsciiWhitespace(got).empty()) {
    EXPECT_EQ(r->n_exact, 1);
  }
  auto bad = DatasetFromJsonl({R"({"prompt":"p","response":"r","answers":["r", "  "]})"}, "a.jsonl", tok, o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  auto typed = DatasetFromJsonl({R"({"prompt":"p","response":"r","answers":"r"})"}, "a.jsonl", tok, o);
  EXPECT_EQ(typed.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(OptimizerTest, AdamWFirstStepMatchesHandComputation) {
  AdapterSet<float> set;
  set.layers.resize(1);
  AdapterSpec spec{AdapterKind::kDiaBlo, 1, 1, false, 1};
  set.layers[0][0] = *ModuleAdapter<float>::Create(spec, 2, 1, 0);
  auto& a = *set.layers[0][0];
  a.d = {1.0f, -2.0f};
  a.gd = {0.5f, -0.25f};
  OptimizerConfig c;
  c.lr = 0.1f;
  c.weight_decay = 0.01f;
  c.clip_norm = 0;
  c.total_steps = 10;
  c.min_lr_ratio = 1.0f;  // constant lr
  AdamW opt(c);
  const double norm = opt.Step(set);
  EXPECT_NEAR(norm, std::sqrt(0.25 + 0.0625), 1e-6);
  // step 1: mhat = g, vhat = g^2 -> update = lr * (sign(g) + wd * p) (eps negligible)
  EXPECT_NEAR(a.d[0], 1.0f - 0.1f * (1.0f + 0.01f * 1.0f), 1e-6);
  EXPECT_NEAR(a.d[1], -2.0f - 0.1f * (-1.0f + 0.01f * -2.0f), 1e-6);
  EXPECT_EQ(a.gd[0], 0.0f);  // gradients consumed
  EXPECT_NEAR(opt.fisher().at("blk.0.attn_q.diablo")[0], 0.25f, 1e-7);
}

TEST(OptimizerTest, WarmupThenCosine) {
  OptimizerConfig c;
  c.lr = 1.0f;
  c.warmup_steps = 4;
  c.total_steps = 14;
  c.min_lr_ratio = 0.1f;
  EXPECT_FLOAT_EQ(LearningRate(c, 0), 0.25f);
  EXPECT_FLOAT_EQ(LearningRate(c, 3), 1.0f);
  EXPECT_FLOAT_EQ(LearningRate(c, 4), 1.0f);
  EXPECT_NEAR(LearningRate(c, 9), 0.55f, 1e-6);  // half way: 0.1 + 0.9 * 0.5
  EXPECT_NEAR(LearningRate(c, 14), 0.1f, 1e-6);
}

TEST(OptimizerTest, ClipsToGlobalNorm) {
  AdapterSet<float> set;
  set.layers.resize(1);
  set.layers[0][0] = *ModuleAdapter<float>::Create(AdapterSpec{AdapterKind::kDiaBlo, 1, 1, false, 1}, 1, 1, 0);
  set.layers[0][0]->gd = {30.0f};
  OptimizerConfig c;
  c.lr = 1.0f;
  c.clip_norm = 3.0f;
  c.beta1 = 0.0f;
  c.beta2 = 0.0f;  // update = lr * g_clipped / |g_clipped|
  c.min_lr_ratio = 1.0f;
  AdamW opt(c);
  EXPECT_NEAR(opt.Step(set), 30.0, 1e-5);
  EXPECT_NEAR(set.layers[0][0]->d[0], -1.0f, 1e-5);
}

// The float training path (used in production) agrees with the double one (checked against
// finite differences), and the inference path with adapters gives the same loss.
TEST_F(TinyFixture, FloatTrainerAndInferencePathAgreeWithDouble) {
  for (AdapterKind kind : {AdapterKind::kLora, AdapterKind::kFfaLora, AdapterKind::kDiaBlo}) {
    const AdapterSpec spec{kind, 4, 8.0f, false, 8};
    auto mods = *ParseModules("all");
    auto f = *MakeAdapters<float>(dims_, spec, mods, 5);
    auto d = *MakeAdapters<double>(dims_, spec, mods, 5);
    Rng rng(2);
    for (size_t l = 0; l < f.layers.size(); ++l)
      for (int m = 0; m < kNumModules; ++m) {
        auto& af = *f.layers[l][static_cast<size_t>(m)];
        auto& ad = *d.layers[l][static_cast<size_t>(m)];
        for (size_t i = 0; i < af.b.size(); ++i) ad.b[i] = af.b[i] = static_cast<float>(0.2 * rng.Normal());
        for (size_t i = 0; i < af.d.size(); ++i) ad.d[i] = af.d[i] = static_cast<float>(0.05 * rng.Normal());
        for (size_t i = 0; i < af.a.size(); ++i) ad.a[i] = af.a[i];
      }
    Batch b;
    b.n_seq = 1;
    b.len = 12;
    for (int i = 0; i < 12; ++i) b.tokens.push_back(static_cast<int32_t>(3 + rng.Below(250)));
    for (int i = 0; i < 12; ++i) b.targets.push_back(i + 1 < 12 ? b.tokens[static_cast<size_t>(i + 1)] : -1);
    Trainer<float> tf(*model_, &f, true);
    Trainer<double> td(*model_, &d, true);
    const double lf = *tf.Step(b, 1.0f, true), ld = *td.Step(b, 1.0, true);
    EXPECT_NEAR(lf, ld, 1e-4 * std::fabs(ld)) << AdapterKindName(kind);
    double num = 0, den = 0;
    std::vector<std::vector<float>> gf;
    f.ForEachTrainable([&](const std::string&, std::span<float>, std::span<float> g) { gf.emplace_back(g.begin(), g.end()); });
    size_t t = 0;
    d.ForEachTrainable([&](const std::string&, std::span<double>, std::span<double> g) {
      for (size_t i = 0; i < g.size(); ++i) {
        num += (gf[t][i] - g[i]) * (gf[t][i] - g[i]);
        den += g[i] * g[i];
      }
      ++t;
    });
    EXPECT_LT(std::sqrt(num / den), 1e-4) << AdapterKindName(kind);
    // Inference path (KV cache, adapters applied in LlamaContext::Eval).
    LlamaContext ctx(*model_, 16);
    ctx.SetAdapters(&f);
    std::vector<float> logits;
    ASSERT_TRUE(ctx.Eval(b.tokens, true, &logits).ok());
    const int64_t V = model_->config().n_vocab;
    double nll = 0;
    for (int i = 0; i < 11; ++i) {
      const float* row = logits.data() + i * V;
      const float mx = *std::max_element(row, row + V);
      double se = 0;
      for (int64_t j = 0; j < V; ++j) se += std::exp(static_cast<double>(row[j] - mx));
      nll += std::log(se) + mx - row[b.targets[static_cast<size_t>(i)]];
    }
    EXPECT_NEAR(nll, ld, 1e-4 * std::fabs(ld)) << AdapterKindName(kind);
  }
}

// Batched decoding (LlamaContext::EvalBatch) against each sequence alone: prompts of different
// lengths fill their caches in one pass, then decode one token each per pass at different
// positions; with adapters (LoRA and DiaBlo, non-zero) the logits agree with the single-sequence
// path (itself checked against llama.cpp and transformers) to float rounding, and greedy answers
// decoded together are the answers decoded one by one.
TEST_F(TinyFixture, SequencesDecodedTogetherEqualEachAlone) {
  const int64_t V = model_->config().n_vocab;
  const std::vector<std::vector<int32_t>> prompts = {{5, 80, 120, 7, 200, 33, 90}, {101, 4}, {250, 3, 9, 60, 61}};
  for (AdapterKind kind : {AdapterKind::kLora, AdapterKind::kDiaBlo}) {
    auto set = *MakeAdapters<float>(dims_, AdapterSpec{kind, 4, 8.0f, false, 8}, kAllModules, 3);
    Rng rng(11);
    set.ForEachTrainable([&](const std::string&, std::span<float> p, std::span<float>) {
      for (float& x : p) x = 0.05f * static_cast<float>(rng.Normal());
    });
    // Alone: each prompt, then 4 decoded tokens (greedy), recording every pass's last logits.
    std::vector<std::vector<std::vector<float>>> alone(prompts.size());
    std::vector<std::vector<int32_t>> decoded(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      LlamaContext ctx(*model_, 32);
      ctx.SetAdapters(&set);
      std::vector<float> logits;
      ASSERT_TRUE(ctx.Eval(prompts[i], false, &logits).ok());
      alone[i].push_back(logits);
      for (int s = 0; s < 4; ++s) {
        decoded[i].push_back(Argmax(logits));
        ASSERT_TRUE(ctx.Eval(std::vector<int32_t>{decoded[i].back()}, false, &logits).ok());
        alone[i].push_back(logits);
      }
    }
    // Together, fed the same tokens.
    std::vector<std::unique_ptr<LlamaContext>> ctx;
    std::vector<LlamaContext*> ptrs;
    for (size_t i = 0; i < prompts.size(); ++i) {
      ctx.push_back(std::make_unique<LlamaContext>(*model_, 32));
      ctx.back()->SetAdapters(&set);
      ptrs.push_back(ctx.back().get());
    }
    std::vector<float> logits;
    ASSERT_TRUE(LlamaContext::EvalBatch(ptrs, prompts, &logits).ok());
    ASSERT_EQ(logits.size(), prompts.size() * static_cast<size_t>(V));
    for (int s = 0; s <= 4; ++s) {
      for (size_t i = 0; i < prompts.size(); ++i) {
        float d = 0;
        for (int64_t j = 0; j < V; ++j) d = std::max(d, std::fabs(logits[i * static_cast<size_t>(V) + static_cast<size_t>(j)] - alone[i][static_cast<size_t>(s)][static_cast<size_t>(j)]));
        EXPECT_LT(d, 1e-4f) << AdapterKindName(kind) << " sequence " << i << " pass " << s;
      }
      if (s == 4) break;
      std::vector<std::vector<int32_t>> feed;
      for (size_t i = 0; i < prompts.size(); ++i) feed.push_back({decoded[i][static_cast<size_t>(s)]});
      ASSERT_TRUE(LlamaContext::EvalBatch(ptrs, feed, &logits).ok());
    }
    for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(ptrs[i]->n_past(), static_cast<int64_t>(prompts[i].size() + 4));
    // Greedy answers: together == one by one (20 prompts: two groups of at most kGenerateBatch).
    std::vector<std::string> texts = {"hello there", "the", "a longer prompt with more words in it", "x"};
    for (int i = 0; i < 16; ++i) texts.push_back("prompt number " + std::to_string(i) + std::string(static_cast<size_t>(i), 'z'));
    for (bool int8 : {false, true}) {  // f32 and 8-bit activations (kernels::MatMulQ)
      auto together = GenerateGreedyBatch(*model_, &set, texts, 6, int8);
      ASSERT_TRUE(together.ok()) << together.status();
      for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ((*together)[i], *GenerateGreedy(*model_, &set, texts[i], 6, int8)) << texts[i];
    }
  }
  // What EvalBatch refuses.
  auto set = *MakeAdapters<float>(dims_, AdapterSpec{AdapterKind::kLora, 4, 8.0f, false, 8}, kAllModules, 3);
  LlamaContext a(*model_, 8), b(*model_, 8), c(*model_, 2);
  std::vector<float> logits;
  const std::vector<std::vector<int32_t>> two = {{1, 2}, {3}};
  std::vector<LlamaContext*> same = {&a, &a};
  EXPECT_EQ(LlamaContext::EvalBatch(same, two, &logits).code(), absl::StatusCode::kInvalidArgument);
  b.SetAdapters(&set);
  std::vector<LlamaContext*> mixed = {&a, &b};
  EXPECT_EQ(LlamaContext::EvalBatch(mixed, two, &logits).code(), absl::StatusCode::kInvalidArgument);
  b.SetAdapters(nullptr);
  b.set_int8_activations(true);  // activation precisions differ
  EXPECT_EQ(LlamaContext::EvalBatch(mixed, two, &logits).code(), absl::StatusCode::kInvalidArgument);
  b.set_int8_activations(false);
  std::vector<LlamaContext*> one = {&a};
  EXPECT_EQ(LlamaContext::EvalBatch(one, two, &logits).code(), absl::StatusCode::kInvalidArgument);
  const std::vector<std::vector<int32_t>> empty = {{1}, {}};
  std::vector<LlamaContext*> ab = {&a, &b};
  EXPECT_EQ(LlamaContext::EvalBatch(ab, empty, &logits).code(), absl::StatusCode::kInvalidArgument);
  std::vector<LlamaContext*> ac = {&a, &c};
  const std::vector<std::vector<int32_t>> too_long = {{1}, {1, 2, 3}};
  EXPECT_EQ(LlamaContext::EvalBatch(ac, too_long, &logits).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(a.n_past(), 0);  // nothing ran
  a.SetLayerLimit(1);
  EXPECT_EQ(LlamaContext::EvalBatch(ab, two, &logits).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TinyFixture, SavedAdaptersLoadBackIdentically) {
  for (AdapterKind kind : {AdapterKind::kLora, AdapterKind::kFfaLora, AdapterKind::kDiaBlo}) {
    auto set = *MakeAdapters<float>(dims_, AdapterSpec{kind, 4, 8.0f, true, 8}, *ParseModules("q,v,down"), 9);
    Rng rng(1);
    set.ForEachTrainable([&](const std::string&, std::span<float> p, std::span<float>) {
      for (auto& x : p) x = static_cast<float>(rng.Normal());
    });
    const std::string path = testing::TempPath(std::string("ad_") + AdapterKindName(kind) + ".safetensors");
    ASSERT_TRUE(SaveAdapters(path, set).ok());
    auto back = LoadAdapters(path, dims_);
    ASSERT_TRUE(back.ok()) << back.status();
    for (size_t l = 0; l < set.layers.size(); ++l)
      for (int m = 0; m < kNumModules; ++m) {
        ASSERT_EQ(set.layers[l][static_cast<size_t>(m)].has_value(), back->layers[l][static_cast<size_t>(m)].has_value());
        if (!set.layers[l][static_cast<size_t>(m)]) continue;
        const auto& x = *set.layers[l][static_cast<size_t>(m)];
        const auto& y = *back->layers[l][static_cast<size_t>(m)];
        EXPECT_EQ(x.a, y.a);
        EXPECT_EQ(x.b, y.b);
        EXPECT_EQ(x.d, y.d);
        EXPECT_EQ(x.spec.rslora, y.spec.rslora);
      }
    ModelDims other = dims_;
    other.n_ff *= 2;
    EXPECT_EQ(LoadAdapters(path, other).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

// Memorising a handful of examples: the loss must fall a lot for every adapter type.
// DiaBlo trained on its first blocks (a worker's share, issue 22): the trainable values are
// those blocks, their gradient equals the whole adapter's on them, training with weight decay
// leaves the other blocks exactly as they were while they still act in forward, and restoring
// makes the whole adapter trainable again.
TEST_F(TinyFixture, DiabloTrainedOnItsFirstBlocksLeavesTheOthersUntouched) {
  for (int64_t first : {0, 3}) {  // blocks 0..2, and a window in the middle: 3..5 (protocol::FirstBlock)
  SCOPED_TRACE(first);
  const AdapterSpec spec{AdapterKind::kDiaBlo, 4, 8.0f, false, 8};
  auto whole = *MakeAdapters<float>(dims_, spec, *ParseModules("all"), 5);
  Rng rng(4);
  for (auto& layer : whole.layers)
    for (auto& a : layer)
      if (a)
        for (float& x : a->d) x = static_cast<float>(0.05 * rng.Normal());
  auto part = whole;
  ASSERT_TRUE(part.TrainBlocks(first, 3).ok());
  const int64_t before = whole.NumTrainable();
  EXPECT_EQ(part.NumTrainable() * 8, before * 3);
  part.ForEachTrainable([&](const std::string& name, std::span<float> p, std::span<float> g) {
    const auto& a = *part.layers[0][0];
    if (name.rfind("blk.0.attn_q.", 0) == 0) {
      EXPECT_EQ(p.size(), static_cast<size_t>(3 * a.b_in * a.b_out));
    }
    EXPECT_EQ(p.size(), g.size()) << name;
  });
  // One backward pass: the part's gradients are the whole adapter's of those blocks.
  Batch b;
  b.n_seq = 1;
  b.len = 12;
  for (int i = 0; i < 12; ++i) b.tokens.push_back(static_cast<int32_t>(3 + rng.Below(250)));
  for (int i = 0; i < 12; ++i) b.targets.push_back(i + 1 < 12 ? b.tokens[static_cast<size_t>(i + 1)] : -1);
  Trainer<float> tw(*model_, &whole, true), tp(*model_, &part, true);
  const double lw = *tw.Step(b, 1.0f, true), lp = *tp.Step(b, 1.0f, true);
  EXPECT_EQ(lw, lp);  // every block acts in forward
  std::vector<std::vector<float>> gw;
  whole.ForEachTrainable([&](const std::string&, std::span<float>, std::span<float> g) { gw.emplace_back(g.begin(), g.end()); });
  size_t t = 0;
  part.ForEachTrainableAt([&](const std::string& name, std::span<float>, std::span<float> g, size_t at) {
    ASSERT_LT(t, gw.size());
    ASSERT_LT(g.size(), gw[t].size()) << name;
    ASSERT_EQ(at, static_cast<size_t>(first) * (g.size() / 3)) << name;  // 3 blocks handed out, from block `first`
    for (size_t i = 0; i < g.size(); ++i) ASSERT_EQ(g[i], gw[t][at + i]) << name << " " << i;
    ++t;
  });
  EXPECT_EQ(t, gw.size());
  // Training with weight decay: the three trained blocks move, the others keep their values.
  auto lines = *GenerateTask("record", 4, 1);
  DatasetOptions o;
  o.holdout = 0;
  auto data = DatasetFromJsonl(lines, "task", *model_->tokenizer(), o);
  ASSERT_TRUE(data.ok());
  const auto start = part;
  OptimizerConfig oc;
  oc.lr = 1e-2f;
  oc.weight_decay = 0.1f;
  oc.total_steps = 5;
  AdamW opt(oc);
  FinetuneOptions fo;
  fo.steps = 5;
  fo.batch = 2;
  ASSERT_TRUE(Finetune(*model_, data->train, fo, &part, &opt).ok());
  for (size_t l = 0; l < part.layers.size(); ++l)
    for (size_t m = 0; m < part.layers[l].size(); ++m) {
      const auto& a = *part.layers[l][m];
      const auto& s0 = *start.layers[l][m];
      const size_t lo = static_cast<size_t>(first * a.b_in * a.b_out), hi = lo + static_cast<size_t>(3 * a.b_in * a.b_out);
      double moved = 0;
      for (size_t i = lo; i < hi; ++i) moved = std::max(moved, static_cast<double>(std::fabs(a.d[i] - s0.d[i])));
      EXPECT_GT(moved, 0) << "layer " << l << " module " << m;
      for (size_t i = 0; i < a.d.size(); ++i)
        if (i < lo || i >= hi) {
          ASSERT_EQ(a.d[i], s0.d[i]) << "layer " << l << " module " << m << " value " << i;
        }
    }
  ASSERT_TRUE(part.TrainBlocks(0, 0).ok());
  EXPECT_EQ(part.NumTrainable(), before);
  EXPECT_FALSE(part.TrainBlocks(0, 9).ok());
  EXPECT_FALSE(part.TrainBlocks(0, -1).ok());
  EXPECT_FALSE(part.TrainBlocks(6, 3).ok());  // past block 7
  EXPECT_FALSE(part.TrainBlocks(-1, 3).ok());
  auto lora = *MakeAdapters<float>(dims_, AdapterSpec{AdapterKind::kLora, 4, 8.0f, false, 8}, *ParseModules("all"), 5);
  EXPECT_EQ(lora.TrainBlocks(0, 2).code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(TinyFixture, EveryAdapterTypeFitsASmallSet) {
  auto lines = *GenerateTask("record", 4, 1);
  DatasetOptions o;
  o.holdout = 0;
  auto data = DatasetFromJsonl(lines, "task", *model_->tokenizer(), o);
  ASSERT_TRUE(data.ok());
  for (AdapterKind kind : {AdapterKind::kLora, AdapterKind::kFfaLora, AdapterKind::kDiaBlo}) {
    auto set = *MakeAdapters<float>(dims_, AdapterSpec{kind, 8, 16.0f, false, 4}, *ParseModules("all"), 3);
    OptimizerConfig oc;
    oc.lr = 1e-2f;
    oc.total_steps = 40;
    AdamW opt(oc);
    FinetuneOptions fo;
    fo.steps = 40;
    fo.batch = 4;
    double first = -1, last = 0;
    auto rep = Finetune(*model_, data->train, fo, &set, &opt, [&](const StepLog& s) {
      if (first < 0) first = s.loss;
      last = s.loss;
    });
    ASSERT_TRUE(rep.ok()) << rep.status();
    std::printf("%s: loss %.3f -> %.3f in 40 steps\n", AdapterKindName(kind), first, last);
    EXPECT_LT(last, 0.5 * first) << AdapterKindName(kind);
  }
}

}  // namespace
}  // namespace fedtune::model

namespace fedtune::model {
namespace {

// Interrupting a run after a checkpoint and resuming it gives exactly the uninterrupted result.
TEST_F(TinyFixture, ResumedRunEqualsUninterruptedRun) {
  auto lines = *GenerateTask("record", 12, 2);
  DatasetOptions dopt;
  dopt.holdout = 0;
  auto data = DatasetFromJsonl(lines, "task", *model_->tokenizer(), dopt);
  ASSERT_TRUE(data.ok());
  const AdapterSpec spec{AdapterKind::kLora, 4, 8.0f, false, 1};
  OptimizerConfig oc;
  oc.lr = 5e-3f;
  oc.warmup_steps = 2;
  oc.total_steps = 6;
  FinetuneOptions fo;
  fo.steps = 6;
  fo.batch = 5;  // does not divide 12: the resumed order must cross an epoch boundary correctly
  auto straight = *MakeAdapters<float>(dims_, spec, *ParseModules("q,v,down"), 4);
  AdamW opt_a(oc);
  ASSERT_TRUE(Finetune(*model_, data->train, fo, &straight, &opt_a).ok());

  const std::string ckpt = testing::TempPath("resume.safetensors");
  auto first = *MakeAdapters<float>(dims_, spec, *ParseModules("q,v,down"), 4);
  AdamW opt_b(oc);
  FinetuneOptions part = fo;
  part.steps = 3;
  part.checkpoint_every = 3;
  part.checkpoint_path = ckpt;
  ASSERT_TRUE(Finetune(*model_, data->train, part, &first, &opt_b).ok());
  auto resumed = *MakeAdapters<float>(dims_, spec, *ParseModules("q,v,down"), 99);  // different init: overwritten
  AdamW opt_c(oc);
  ASSERT_TRUE(LoadCheckpoint(ckpt, resumed, &opt_c).ok());
  EXPECT_EQ(opt_c.step(), 3);
  ASSERT_TRUE(Finetune(*model_, data->train, fo, &resumed, &opt_c).ok());
  std::vector<std::vector<float>> a, b;
  straight.ForEachTrainable([&](const std::string&, std::span<float> p, std::span<float>) { a.emplace_back(p.begin(), p.end()); });
  resumed.ForEachTrainable([&](const std::string&, std::span<float> p, std::span<float>) { b.emplace_back(p.begin(), p.end()); });
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "tensor " << i;
  EXPECT_EQ(LoadCheckpoint("/nonexistent.safetensors", resumed, &opt_c).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace fedtune::model

namespace fedtune::model {
namespace {

// DP-SGD: with a huge clip and no noise, examples of equal scored length give exactly the plain
// mean gradient; with a tiny clip every step's gradient norm is bounded by the clip.
TEST_F(TinyFixture, DpSgdClipsPerExampleAndMatchesPlainMeanWithoutClipping) {
  std::vector<std::string> lines;
  for (int i = 0; i < 4; ++i) lines.push_back("{\"prompt\": \"q" + std::to_string(i) + "\", \"response\": \"abc" + std::to_string(i) + "\"}");
  DatasetOptions dopt;
  dopt.holdout = 0;
  auto data = DatasetFromJsonl(lines, "eq", *model_->tokenizer(), dopt);
  ASSERT_TRUE(data.ok());
  auto run = [&](double clip, double z, std::vector<double>* norms) {
    auto set = *MakeAdapters<float>(dims_, AdapterSpec{AdapterKind::kLora, 4, 8.0f, false, 4}, *ParseModules("q,v"), 3);
    OptimizerConfig oc;
    oc.lr = 1e-2f;
    oc.total_steps = 3;
    oc.clip_norm = 0;
    AdamW opt(oc);
    FinetuneOptions fo;
    fo.steps = 3;
    fo.batch = 4;
    Rng rng(5);
    fo.dp_clip = clip;
    fo.dp_noise_multiplier = z;
    fo.dp_normal = [&] { return rng.Normal(); };
    fo.dp_uniform = [&] { return rng.Uniform(); };
    EXPECT_TRUE(Finetune(*model_, data->train, fo, &set, &opt, [&](const StepLog& s) { norms->push_back(s.grad_norm); }).ok());
    std::vector<float> flat;
    set.ForEachTrainable([&](const std::string&, std::span<float> p, std::span<float>) { flat.insert(flat.end(), p.begin(), p.end()); });
    return flat;
  };
  std::vector<double> n_plain, n_dp, n_tiny;
  const auto plain = run(0, 0, &n_plain), dp = run(1e9, 0, &n_dp);
  ASSERT_EQ(plain.size(), dp.size());
  double worst = 0;
  for (size_t i = 0; i < plain.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(plain[i] - dp[i])));
  EXPECT_LT(worst, 1e-5);
  run(1e-3, 0, &n_tiny);
  for (double g : n_tiny) EXPECT_LE(g, 1e-3 * (1 + 1e-5));
  std::vector<double> n_noisy;
  run(1e-3, 1.0, &n_noisy);
  EXPECT_GT(n_noisy[0], 1e-3);  // the noise dominates a clipped gradient on many coordinates
}

// Batched DP-SGD: the drawn examples share forward/backward passes that keep each one's gradient
// apart (Trainer::set_per_example). Against one example per pass (the definition): the same
// adapter after 3 noisy, clipped steps, for examples of different lengths (padding), LoRA,
// FFA-LoRA and DiaBlo on part of its blocks, whole passes and micro-batched ones.
TEST_F(TinyFixture, DpSgdWithExamplesSharingPassesEqualsOneExampleAtATime) {
  std::vector<std::string> lines;
  for (int i = 0; i < 12; ++i)
    lines.push_back("{\"prompt\": \"question " + std::string(static_cast<size_t>(i % 5), 'x') + std::to_string(i) + "\", \"response\": \"a" +
                    std::string(static_cast<size_t>(3 * (i % 4)), 'b') + "\"}");
  DatasetOptions dopt;
  dopt.holdout = 0;
  auto data = DatasetFromJsonl(lines, "dp", *model_->tokenizer(), dopt);
  ASSERT_TRUE(data.ok());
  struct Case {
    AdapterKind kind;
    int64_t micro_batch;
    double clip, z;  // clip 0.05: below most examples' gradient norms (clipping acts); 1e9: none
  };
  for (const Case& c : {Case{AdapterKind::kLora, 0, 0.05, 0.5}, Case{AdapterKind::kFfaLora, 0, 0.05, 0.5}, Case{AdapterKind::kDiaBlo, 0, 0.05, 0.5},
                        Case{AdapterKind::kLora, 2, 0.05, 0.5}, Case{AdapterKind::kLora, 0, 1e9, 0}, Case{AdapterKind::kDiaBlo, 2, 1e9, 0}}) {
    auto run = [&](int per_pass) {
      auto set = *MakeAdapters<float>(dims_, AdapterSpec{c.kind, 4, 8.0f, false, 4}, *ParseModules("q,v,down"), 3);
      if (c.kind == AdapterKind::kDiaBlo) {
        EXPECT_TRUE(set.TrainBlocks(1, 2).ok());
      }
      OptimizerConfig oc;
      oc.lr = 1e-2f;
      oc.total_steps = 3;
      AdamW opt(oc);
      FinetuneOptions fo;
      fo.steps = 3;
      fo.batch = 6;
      fo.micro_batch = c.micro_batch;
      fo.recompute = c.micro_batch == 0;
      Rng rng(5);
      fo.dp_clip = c.clip;
      fo.dp_noise_multiplier = c.z;
      fo.dp_examples_per_pass = per_pass;
      fo.dp_normal = [&] { return rng.Normal(); };
      fo.dp_uniform = [&] { return rng.Uniform(); };
      auto rep = Finetune(*model_, data->train, fo, &set, &opt);
      EXPECT_TRUE(rep.ok()) << rep.status();
      EXPECT_GT(rep->dp_examples, 6);
      std::vector<float> flat;
      set.ForEachTrainable([&](const std::string&, std::span<float> p, std::span<float>) { flat.insert(flat.end(), p.begin(), p.end()); });
      return flat;
    };
    const auto alone = run(1), shared = run(0);
    ASSERT_EQ(alone.size(), shared.size());
    double worst = 0, scale = 0;
    for (size_t i = 0; i < alone.size(); ++i) {
      worst = std::max(worst, static_cast<double>(std::fabs(alone[i] - shared[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(alone[i])));
    }
    EXPECT_LT(worst, 1e-5 * scale) << AdapterKindName(c.kind) << " micro_batch " << c.micro_batch << " clip " << c.clip;
  }
  EXPECT_EQ(DpExamplesPerPass(2'400'000, 8), 8);   // LoRA r=8 on SmolLM2's 7 modules: 9.6 MB each
  EXPECT_EQ(DpExamplesPerPass(2'400'000, 64), 13);  // 128 MiB of per-example gradients
  EXPECT_EQ(DpExamplesPerPass(500'000'000, 8), 1);
}

// An empty Poisson batch is a step of noise only (it used to read an empty gradient sum).
TEST_F(TinyFixture, DpSgdStepWithAnEmptyPoissonBatchAddsOnlyNoise) {
  std::vector<std::string> lines;
  for (int i = 0; i < 8; ++i) lines.push_back("{\"prompt\": \"q" + std::to_string(i) + "\", \"response\": \"abc\"}");
  DatasetOptions dopt;
  dopt.holdout = 0;
  auto data = DatasetFromJsonl(lines, "eq", *model_->tokenizer(), dopt);
  ASSERT_TRUE(data.ok());
  auto set = *MakeAdapters<float>(dims_, AdapterSpec{AdapterKind::kLora, 4, 8.0f, false, 4}, *ParseModules("q,v"), 3);
  OptimizerConfig oc;
  oc.total_steps = 2;
  AdamW opt(oc);
  FinetuneOptions fo;
  fo.steps = 2;
  fo.batch = 1;
  Rng rng(9);
  fo.dp_clip = 0.5;
  fo.dp_noise_multiplier = 1.0;
  fo.dp_normal = [&] { return rng.Normal(); };
  fo.dp_uniform = [] { return 0.999; };  // q = 1/8: nobody is drawn
  auto rep = Finetune(*model_, data->train, fo, &set, &opt);
  ASSERT_TRUE(rep.ok()) << rep.status();
  EXPECT_EQ(rep->dp_examples, 0);
  set.ForEachTrainable([&](const std::string& name, std::span<float> p, std::span<float>) {
    for (float x : p) ASSERT_TRUE(std::isfinite(x)) << name;
  });
}

// DP-SGD batches are Poisson samples, as the accountant assumes: sizes vary from step to step and
// each example is drawn with probability q within a binomial bound.
TEST(DpSgdSamplingTest, PoissonBatchesVaryInSizeAndDrawEachExampleAtRateQ) {
  Rng rng(11);
  const size_t n = 200;
  const double q = 0.05;
  const int steps = 4000;
  std::vector<int> times(n, 0);
  std::set<size_t> sizes;
  double total = 0;
  for (int s = 0; s < steps; ++s) {
    const std::vector<size_t> b = PoissonBatch(n, q, [&] { return rng.Uniform(); });
    sizes.insert(b.size());
    total += static_cast<double>(b.size());
    for (size_t i : b) ++times[i];
  }
  EXPECT_GT(sizes.size(), 8u);
  EXPECT_NEAR(total / steps, n * q, 5 * std::sqrt(n * q * (1 - q) / steps));
  for (size_t i = 0; i < n; ++i) EXPECT_NEAR(times[i], steps * q, 5 * std::sqrt(steps * q * (1 - q))) << i;
  EXPECT_EQ(PoissonBatch(5, 1.0, [&] { return rng.Uniform(); }).size(), 5u);
}

}  // namespace
}  // namespace fedtune::model

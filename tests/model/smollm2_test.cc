// Real-model tests (label "model"): SmolLM2-135M-Instruct Q4_1, installed by scripts/setup.sh,
// against golden data from independent implementations (tests/oracles/).
#include <openssl/evp.h>

#include <cstdlib>
#include <fstream>

#include "gtest/gtest.h"
#include "model/finetune.h"
#include "model/llama.h"
#include "model/sampler.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/support/smollm2.h"

namespace fedtune::model {
namespace {

std::string Sha256Hex(const void* data, size_t n) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data, n, md, &len, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) {
    s += hex[md[i] >> 4];
    s += hex[md[i] & 15];
  }
  return s;
}

TEST(SmolLM2Test, EveryTensorDequantizesBitExactlyLikeGgufPython) {
  const LlamaModel& m = testing::SmolLM2();
  const auto golden = testing::ReadJson("tests/data/smollm2_dequant_sha256.json");
  const auto& tensors = m.gguf()->tensors();
  ASSERT_EQ(tensors.size(), golden["tensors"].size());
  int checked = 0;
  for (const auto& t : tensors) {
    std::vector<float> v(static_cast<size_t>(t.n_elements()));
    kernels::DequantizeRow(t.type, t.data, v.data(), t.n_elements());
    const auto& g = golden["tensors"][t.name];
    ASSERT_EQ(g["n"].get<int64_t>(), t.n_elements()) << t.name;
    EXPECT_EQ(Sha256Hex(v.data(), v.size() * 4), g["sha256"].get<std::string>()) << t.name << " (" << kernels::TypeTraits(t.type).name << ")";
    ++checked;
  }
  EXPECT_EQ(checked, 272);
}

// The SmolLM2 vocabulary with tokenizer.ggml.pre replaced, so the gpt2 and llama-3
// pre-tokenizers are checked against Hugging Face on the same corpus.
std::unique_ptr<Tokenizer> TokenizerWithPre(const std::string& pre) {
  const GgufFile& g = *testing::SmolLM2().gguf();
  GgufWriter w;
  for (const auto& k : g.key_order()) {
    if (k.rfind("tokenizer.", 0) != 0) continue;
    if (k == "tokenizer.ggml.pre") w.SetString(k, pre);
    else w.SetValue(k, g.metadata().at(k));
  }
  static std::vector<std::unique_ptr<GgufFile>> keep;
  keep.push_back(*GgufFile::Parse(MappedFile::FromBytes(w.Serialize(), pre + ".gguf")));
  auto t = Tokenizer::FromGguf(*keep.back());
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(t).value();
}

void CheckGoldenCorpus(const Tokenizer& tok, const std::string& field) {
  std::ifstream in(std::string(FEDTUNE_SOURCE_DIR) + "/tests/data/tokenizer_golden.jsonl");
  ASSERT_TRUE(in);
  std::string line;
  std::getline(in, line);  // meta
  int total = 0, same = 0, roundtrip = 0;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    const std::string text = j["text"];
    const auto expect = j[field].get<std::vector<int32_t>>();
    const auto got = tok.Encode(text);
    ++total;
    if (got == expect) {
      ++same;
    } else if (total - same <= 10) {
      ADD_FAILURE() << field << " text: " << nlohmann::json(text).dump() << "\n got: " << nlohmann::json(got).dump()
                    << "\n hf:  " << nlohmann::json(expect).dump();
    }
    if (tok.Decode(got) == text) ++roundtrip;
  }
  std::printf("tokenizer (%s): %d/%d strings identical to Hugging Face tokenizers; %d decode back exactly\n", field.c_str(), same,
              total, roundtrip);
  EXPECT_GE(total, 2000);
  EXPECT_EQ(same, total);
  EXPECT_EQ(roundtrip, total);
}

TEST(SmolLM2Test, TokenizerMatchesHuggingFaceOnGoldenCorpus) {
  const Tokenizer* tok = testing::SmolLM2().tokenizer();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->pre_tokenizer(), Tokenizer::PreTokenizer::kSmolLm);
  CheckGoldenCorpus(*tok, "ids");
}

TEST(SmolLM2Test, Gpt2AndLlama3PreTokenizersMatchHuggingFace) {
  auto gpt2 = TokenizerWithPre("gpt2");
  ASSERT_EQ(gpt2->pre_tokenizer(), Tokenizer::PreTokenizer::kGpt2);
  CheckGoldenCorpus(*gpt2, "ids_gpt2");
  auto llama3 = TokenizerWithPre("llama-bpe");
  ASSERT_EQ(llama3->pre_tokenizer(), Tokenizer::PreTokenizer::kLlama3);
  CheckGoldenCorpus(*llama3, "ids_llama3");
}

struct Agreement {
  int positions = 0, same_argmax = 0;
  double max_lp_diff = 0.0;
  double rate() const { return static_cast<double>(same_argmax) / positions; }
};

// Runs every golden prompt and compares our greedy token and log-probabilities with llama.cpp's.
Agreement CompareWithLlamaCpp(const LlamaModel& m, const nlohmann::json& golden) {
  Agreement a;
  const int64_t V = m.config().n_vocab;
  for (const auto& p : golden["prompts"]) {
    const auto ids = m.tokenizer()->Encode(p["text"].get<std::string>());
    EXPECT_EQ(ids, p["ids"].get<std::vector<int32_t>>()) << p["name"];
    LlamaContext ctx(m, static_cast<int64_t>(ids.size()));
    std::vector<float> logits;
    EXPECT_TRUE(ctx.Eval(ids, true, &logits).ok());
    const auto argmax = p["argmax"].get<std::vector<int32_t>>();
    const auto lp = p["argmax_logprob"].get<std::vector<double>>();
    for (size_t i = 0; i < ids.size(); ++i) {
      const float* row = logits.data() + static_cast<int64_t>(i) * V;
      ++a.positions;
      const int32_t ours = Argmax({row, static_cast<size_t>(V)});
      if (ours == argmax[i]) {
        ++a.same_argmax;
      } else {
        std::printf("  %s position %zu: fedtune %d, llama.cpp %d, our logit margin %.4f\n", p["name"].get<std::string>().c_str(), i,
                    ours, argmax[i], row[ours] - row[argmax[i]]);
      }
      const float mx = *std::max_element(row, row + V);
      double se = 0;
      for (int64_t k = 0; k < V; ++k) se += std::exp(static_cast<double>(row[k] - mx));
      a.max_lp_diff = std::max(a.max_lp_diff, std::fabs(row[argmax[i]] - mx - std::log(se) - lp[i]));
    }
  }
  return a;
}

// The fp32 oracle: llama.cpp on an F32 copy of the model (weights dequantized by gguf-py), which
// computes the same function as fedtune on the Q4_1 file.
TEST(SmolLM2Test, LogitsAgreeWithLlamaCppOnDequantizedWeights) {
  const auto a = CompareWithLlamaCpp(testing::SmolLM2(), testing::ReadJson("tests/data/smollm2_llamacpp_golden.json")["f32"]);
  std::printf("vs llama.cpp F32: greedy token identical at %d/%d positions (%.2f%%); max |log p diff| %.5f\n", a.same_argmax,
              a.positions, 100 * a.rate(), a.max_lp_diff);
  EXPECT_GE(a.rate(), 0.99);
  EXPECT_LT(a.max_lp_diff, 0.02);
}

// llama.cpp on the Q4_1 file itself rounds activations to 8 bits inside each matmul, so it
// differs from exact fp32 at near-ties; reported for reference with a looser bound.
TEST(SmolLM2Test, LogitsCloseToLlamaCppOnQuantizedFile) {
  const auto a = CompareWithLlamaCpp(testing::SmolLM2(), testing::ReadJson("tests/data/smollm2_llamacpp_golden.json")["q4_1"]);
  std::printf("vs llama.cpp Q4_1: greedy token identical at %d/%d positions (%.2f%%); max |log p diff| %.4f\n", a.same_argmax,
              a.positions, 100 * a.rate(), a.max_lp_diff);
  EXPECT_GE(a.rate(), 0.90);
  EXPECT_LT(a.max_lp_diff, 0.5);
}

TEST(SmolLM2Test, ChatAnswersCapitalOfFranceWithParis) {
  const LlamaModel& m = testing::SmolLM2();
  const auto* tok = m.tokenizer();
  const auto ids = tok->EncodeWithBos(tok->FormatChat({{"user", "What is the capital of France?"}}, true));
  LlamaContext ctx(m, 256);
  std::vector<float> logits;
  ASSERT_TRUE(ctx.Eval(ids, false, &logits).ok());
  std::string answer;
  Sampler greedy({});
  for (int i = 0; i < 32; ++i) {
    const int32_t next = greedy.Sample(logits);
    if (tok->IsEndOfGeneration(next)) break;
    answer += tok->TokenBytes(next);
    ASSERT_TRUE(ctx.Eval(std::vector<int32_t>{next}, false, &logits).ok());
  }
  std::printf("answer: %s\n", answer.c_str());
  EXPECT_NE(answer.find("Paris"), std::string::npos);
}

// Evaluation decodes held-out answers 16 at a time (LlamaContext::EvalBatch): on the real model
// the batched greedy answers are the one-by-one answers (whose logits the tests above check
// against llama.cpp), for prompts of different lengths that stop at different steps.
TEST(SmolLM2Test, AnswersDecodedTogetherAreTheAnswersDecodedAlone) {
  const LlamaModel& m = testing::SmolLM2();
  const auto* tok = m.tokenizer();
  std::vector<std::string> prompts;
  for (const char* q : {"What is the capital of France?", "Name a colour.", "Define the word \"lexicon\" in one sentence.",
                        "Write the number after 41.", "Who wrote Hamlet?", "Translate 'cat' to French."})
    prompts.push_back(tok->FormatChat({{"user", q}}, true));
  auto together = GenerateGreedyBatch(m, nullptr, prompts, 24);
  ASSERT_TRUE(together.ok()) << together.status();
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto alone = GenerateGreedy(m, nullptr, prompts[i], 24);
    ASSERT_TRUE(alone.ok());
    EXPECT_EQ((*together)[i], *alone) << prompts[i];
  }
  EXPECT_NE((*together)[0].find("Paris"), std::string::npos) << (*together)[0];
}

}  // namespace
}  // namespace fedtune::model

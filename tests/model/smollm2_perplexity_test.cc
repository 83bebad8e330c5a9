// Perplexity on /usr/share/common-licenses/GPL-3 against llama.cpp's figure with the same
// sliding-window definition (tests/oracles/gen_llamacpp_golden.py). Real model; minutes.
#include "gtest/gtest.h"
#include "common/mapped_file.h"
#include "model/perplexity.h"
#include "tests/support/smollm2.h"

namespace fedtune::model {
namespace {

TEST(SmolLM2PerplexityTest, Gpl3WithinHalfPercentOfLlamaCpp) {
  const LlamaModel& m = testing::SmolLM2();
  const auto all = testing::ReadJson("tests/data/smollm2_llamacpp_golden.json");
  const auto golden = all["f32"]["perplexity"];
  const double q4_ppl = all["q4_1"]["perplexity"]["ppl"].get<double>();
  auto text = ReadFileToString(golden["file"].get<std::string>());
  ASSERT_TRUE(text.ok()) << text.status();
  const auto toks = m.tokenizer()->Encode(*text, false);
  ASSERT_EQ(static_cast<int64_t>(toks.size()), golden["n_tokens"].get<int64_t>());
  auto r = Perplexity(m, toks, golden["window"].get<int64_t>(), golden["stride"].get<int64_t>());
  ASSERT_TRUE(r.ok()) << r.status();
  const double ours = r->perplexity(), theirs = golden["ppl"].get<double>();
  std::printf("GPL-3 perplexity: fedtune %.4f; llama.cpp on dequantized F32 weights %.4f (%+.4f%%); llama.cpp on Q4_1 %.4f (%+.3f%%); "
              "%lld tokens scored, %.1f tok/s evaluated\n", ours, theirs, 100 * (ours / theirs - 1), q4_ppl, 100 * (ours / q4_ppl - 1),
              static_cast<long long>(r->n_scored), r->tokens_per_second);
  EXPECT_EQ(r->n_scored, golden["n_scored"].get<int64_t>());
  EXPECT_NEAR(ours / theirs, 1.0, 0.005);
  EXPECT_NEAR(ours / q4_ppl, 1.0, 0.005);
}

}  // namespace
}  // namespace fedtune::model

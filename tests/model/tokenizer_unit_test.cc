#include "model/tokenizer.h"

#include "gtest/gtest.h"
#include "model/unicode.h"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

class TinyTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = testing::TempPath("tok.gguf");
    ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, {}).ok());
    auto g = GgufFile::Open(path);
    ASSERT_TRUE(g.ok());
    gguf_ = std::move(g).value();
    auto t = Tokenizer::FromGguf(*gguf_);
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = std::move(t).value();
  }
  std::unique_ptr<GgufFile> gguf_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(TinyTokenizerTest, AppliesMergesByRank) {
  const auto ids = tok_->Encode(" the");
  ASSERT_EQ(ids.size(), 1u);
  EXPECT_EQ(tok_->TokenText(ids[0]), "Ġthe");
  EXPECT_EQ(tok_->Encode("then").size(), 2u);  // "t h" -> "th e" -> "the" + "n"
}

TEST_F(TinyTokenizerTest, DecodeInvertsEncodeForAnyBytes) {
  for (const std::string& s : std::vector<std::string>{"hello world", "  spaces\n\ttabs", "emoji 🙂 ok", "digits 12345", std::string("\xff\xfe bad utf8", 12), ""}) {
    EXPECT_EQ(tok_->Decode(tok_->Encode(s)), s);
  }
}

TEST_F(TinyTokenizerTest, SpecialTokensSplitOnlyWhenAsked) {
  const auto with = tok_->Encode("<|im_start|>user");
  EXPECT_EQ(with[0], 1);
  const auto without = tok_->Encode("<|im_start|>user", false);
  EXPECT_GT(without.size(), 5u);
  EXPECT_EQ(tok_->Decode(with, /*skip_special=*/true), "user");
  EXPECT_TRUE(tok_->IsEndOfGeneration(2));
}

TEST_F(TinyTokenizerTest, ChatMlFormat) {
  const auto s = tok_->FormatChat({{"user", "hi"}}, true);
  EXPECT_EQ(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(UnicodeTest, DecodesAndClassifies) {
  const auto u = DecodeUtf8("a\xc3\xa9\xe4\xb8\xad\xf0\x9f\x99\x82\xff");
  ASSERT_EQ(u.size(), 5u);
  EXPECT_EQ(u[1].cp, 0xE9u);
  EXPECT_EQ(u[3].cp, 0x1F642u);
  EXPECT_EQ(u[4].cp, 0xFFFDu);
  EXPECT_TRUE(IsLetter(0xE9));
  EXPECT_TRUE(IsLetter(0x4E2D));
  EXPECT_FALSE(IsLetter(0x1F642));
  EXPECT_TRUE(IsNumber(0x00BD));  // ½ is No
  EXPECT_TRUE(IsNumber(0x0663));  // Arabic-Indic three
  EXPECT_TRUE(IsWhitespace(0x3000));
  EXPECT_FALSE(IsWhitespace(0x200B));  // zero width space is not White_Space
  EXPECT_EQ(DecodeUtf8("\xc0\x80").size(), 2u);  // overlong NUL -> two invalid bytes
}

}  // namespace
}  // namespace fedtune::model

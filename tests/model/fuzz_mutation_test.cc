// Hostile-input test: thousands of mutated GGUF and safetensors files (bit flips, random bytes,
// extreme integers in header fields, truncation, splices) must each either load or fail with
// a status and a message; never crash, hang or read out of bounds (run under ASan in the
// sanitizer build). The libFuzzer targets in fuzz/ explore the same readers without a budget.
#include <filesystem>

#include "common/rng.h"
#include "gtest/gtest.h"
#include "model/llama.h"
#include "model/safetensors.h"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

std::vector<uint8_t> ReadAll(const std::string& path) {
  auto f = MappedFile::Open(path);
  EXPECT_TRUE(f.ok());
  return {(*f)->bytes().begin(), (*f)->bytes().end()};
}

// Mutations concentrate on the header region (where parsing decisions are made) but reach the
// data section too.
std::vector<uint8_t> Mutate(const std::vector<uint8_t>& in, size_t header_size, Rng& rng) {
  std::vector<uint8_t> b = in;
  const int n_mut = 1 + static_cast<int>(rng.Below(4));
  for (int k = 0; k < n_mut && !b.empty(); ++k) {
    const size_t span = rng.Below(4) == 0 ? b.size() : std::min(b.size(), header_size);
    const size_t pos = rng.Below(span);
    switch (rng.Below(6)) {
      case 0: b[pos] ^= static_cast<uint8_t>(1u << rng.Below(8)); break;
      case 1: b[pos] = static_cast<uint8_t>(rng.NextU64()); break;
      case 2: {  // extreme 8-byte or 4-byte integer
        static const uint64_t kVals[] = {0, 1, 0xffffffffull, 0x7fffffffffffffffull, 0xffffffffffffffffull, 1ull << 32, 1ull << 62, 64, 4, 9};
        const uint64_t v = kVals[rng.Below(10)];
        const size_t w = rng.Below(2) ? 8 : 4;
        for (size_t i = 0; i < w && pos + i < b.size(); ++i) b[pos + i] = static_cast<uint8_t>(v >> (8 * i));
        break;
      }
      case 3: b.resize(rng.Below(b.size() + 1)); break;
      case 4: {  // copy a chunk over another place
        const size_t src = rng.Below(span), len = 1 + rng.Below(32);
        for (size_t i = 0; i < len && src + i < b.size() && pos + i < b.size(); ++i) b[pos + i] = b[src + i];
        break;
      }
      default:  // insert or delete a few bytes (shifts everything after)
        if (rng.Below(2)) b.insert(b.begin() + static_cast<std::ptrdiff_t>(pos), 1 + rng.Below(8), static_cast<uint8_t>(rng.NextU64()));
        else b.erase(b.begin() + static_cast<std::ptrdiff_t>(pos), b.begin() + static_cast<std::ptrdiff_t>(std::min(b.size(), pos + 1 + rng.Below(8))));
    }
  }
  return b;
}

// A one-layer model keeps every mutant fast to load and run.
testing::TinyModelOptions SmallSeedModel() {
  testing::TinyModelOptions o;
  o.n_embd = 32;
  o.n_head = 2;
  o.n_head_kv = 1;
  o.n_ff = 64;
  o.n_layer = 1;
  return o;
}

TEST(FuzzMutationTest, TenThousandMutatedGgufFilesNeverCrash) {
  const std::string path = testing::TempPath("fuzz_seed.gguf");
  const testing::TinyModelOptions o = SmallSeedModel();
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, o).ok());
  const auto seed = ReadAll(path);
  size_t header = 0;
  {
    auto g = GgufFile::Parse(MappedFile::FromBytes(seed, "seed"));
    ASSERT_TRUE(g.ok());
    header = static_cast<size_t>((*g)->tensors().front().data - MappedFile::FromBytes(seed, "x")->bytes().data());
    header = std::min(header, seed.size());
  }
  Rng rng(20261123);
  int parsed = 0, loaded = 0, evaluated = 0;
  std::map<absl::StatusCode, int> codes;
  for (int i = 0; i < 10000; ++i) {
    const auto bytes = Mutate(seed, header, rng);
    auto g = GgufFile::Parse(MappedFile::FromBytes(bytes, "mutant.gguf"));
    if (!g.ok()) {
      ASSERT_FALSE(g.status().message().empty());
      codes[g.status().code()]++;
      continue;
    }
    ++parsed;
    auto m = LlamaModel::FromGguf(std::move(g).value());
    if (!m.ok()) {
      ASSERT_FALSE(m.status().message().empty());
      codes[m.status().code()]++;
      continue;
    }
    ++loaded;
    LlamaContext ctx(**m, 4);
    std::vector<float> logits;
    if (ctx.Eval(std::vector<int32_t>{3, 4}, false, &logits).ok()) ++evaluated;
    if ((*m)->tokenizer()) (void)(*m)->tokenizer()->Encode("fuzz the tokenizer 123 <|im_end|>");
  }
  std::string summary;
  for (auto [c, n] : codes) summary += absl::StrCat(absl::StatusCodeToString(c), "=", n, " ");
  std::printf("GGUF mutants: %d parsed, %d loaded as models, %d evaluated; errors: %s\n", parsed, loaded, evaluated, summary.c_str());
  EXPECT_GT(codes[absl::StatusCode::kDataLoss], 1000);  // the mutations do hit the parser
}

TEST(FuzzMutationTest, MutatedSafetensorsFilesNeverCrash) {
  const std::string gguf = testing::TempPath("fuzz_hf.gguf"), dir = testing::TempPath("fuzz_hf");
  const testing::TinyModelOptions o = SmallSeedModel();
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(gguf, o).ok());
  ASSERT_TRUE(testing::WriteTinyLlamaHf(gguf, dir).ok());
  const auto seed = ReadAll(dir + "/model.safetensors");
  uint64_t header = 0;
  std::memcpy(&header, seed.data(), 8);
  Rng rng(7);
  int ok = 0;
  for (int i = 0; i < 5000; ++i) {
    const auto bytes = Mutate(seed, static_cast<size_t>(header) + 8, rng);
    auto f = SafetensorsFile::Parse(MappedFile::FromBytes(bytes, "mutant.safetensors"));
    if (!f.ok()) {
      ASSERT_FALSE(f.status().message().empty());
      continue;
    }
    ++ok;
    for (const auto& t : (*f)->tensors()) (void)(*f)->ToF32(t.name);
  }
  std::printf("safetensors mutants: %d of 5000 parsed\n", ok);
  EXPECT_LT(ok, 5000);
}

}  // namespace
}  // namespace fedtune::model

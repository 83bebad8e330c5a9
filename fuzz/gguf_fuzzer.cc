// libFuzzer target: GGUF parsing, model construction (tokenizer included) and one tiny forward
// step on whatever parses. Build: cmake -DFEDTUNE_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ ...;
// run: build-fuzz/fuzz/gguf_fuzzer -max_len=65536 corpus/
#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/llama.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fedtune;
  auto g = model::GgufFile::Parse(MappedFile::FromBytes({data, size}, "fuzz.gguf"));
  if (!g.ok()) return 0;
  auto m = model::LlamaModel::FromGguf(std::move(g).value());
  if (!m.ok()) return 0;
  const auto& c = (*m)->config();
  if (c.n_embd * c.n_layer > (1 << 16)) return 0;  // keep each input fast
  model::LlamaContext ctx(**m, 2);
  std::vector<float> logits;
  (void)ctx.Eval(std::vector<int32_t>{0}, false, &logits);
  if ((*m)->tokenizer()) (void)(*m)->tokenizer()->Encode("fuzz <|im_start|> 123 \xff");
  return 0;
}

// Tiny random llama models written as real GGUF files (and as Hugging Face folders), with a
// byte-level BPE vocabulary: the unit tests' stand-in for a real checkpoint.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"
#include "kernels/quant.h"

namespace fedtune::testing {

struct TinyModelOptions {
  int64_t n_embd = 64, n_layer = 2, n_head = 4, n_head_kv = 2, n_ff = 96, n_ctx = 128;
  kernels::GgmlType weight_type = kernels::GgmlType::kQ8_0;
  bool tied_output = true;
  float rope_base = 10000.0f;
  uint64_t seed = 1;
};

// Vocabulary: 256 byte tokens, a few merges ("th", "he", "the", " the"), and control tokens
// <|endoftext|> (0 is <|endoftext|>), <|im_start|>, <|im_end|>.
absl::Status WriteTinyLlamaGguf(const std::string& path, const TinyModelOptions& o);

// The same weights (dequantized to f32) as a Hugging Face folder: config.json and
// model.safetensors, with Q/K rows in Hugging Face (rotate_half) order.
absl::Status WriteTinyLlamaHf(const std::string& gguf_path, const std::string& dir);

std::string TempPath(const std::string& name);  // unique per test process

}  // namespace fedtune::testing

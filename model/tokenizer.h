// Tokenizer read from a GGUF file: byte-level BPE (tokenizer.ggml.model = "gpt2") with the
// gpt2, smollm, llama-3 and qwen2 pre-tokenizers, and SentencePiece BPE vocabularies
// (tokenizer.ggml.model = "llama": Llama 2, Mistral, TinyLlama) with scores, byte fallback and the
// space prefix; special-token splitting and ChatML chat formatting.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "model/gguf.h"

namespace fedtune::model {

struct ChatMessage {
  std::string role;     // system, user, assistant
  std::string content;
};

class Tokenizer {
 public:
  enum class PreTokenizer { kGpt2, kSmolLm, kLlama3, kQwen2 };

  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& gguf);

  // Special (control and user-defined) tokens written in `text` become their ids when
  // parse_special is true, as Hugging Face tokenizers do by default.
  std::vector<int32_t> Encode(std::string_view text, bool parse_special = true) const;
  // Adds BOS when the model asks for it (tokenizer.ggml.add_bos_token).
  std::vector<int32_t> EncodeWithBos(std::string_view text, bool parse_special = true) const;
  std::string Decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // The bytes one token stands for (control tokens: their text).
  std::string TokenBytes(int32_t id) const;
  const std::string& TokenText(int32_t id) const { return tokens_[static_cast<size_t>(id)]; }

  // ChatML: <|im_start|>role\ncontent<|im_end|>\n ..., then "<|im_start|>assistant\n" when
  // add_generation_prompt. The model's default system prompt (from its chat template) is added
  // when the conversation has none.
  std::string FormatChat(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }
  bool add_bos() const { return add_bos_; }
  bool IsEndOfGeneration(int32_t id) const;
  bool IsSpecial(int32_t id) const;
  PreTokenizer pre_tokenizer() const { return pre_; }
  bool sentencepiece() const { return spm_; }
  std::optional<int32_t> FindToken(std::string_view text) const;

 private:
  Tokenizer() = default;
  void SplitPieces(std::string_view text, std::vector<std::string_view>* pieces) const;
  absl::Status InitSentencePiece(const GgufFile& g);
  void EncodePiece(std::string_view piece, std::vector<int32_t>* out) const;
  // SentencePiece BPE on one run of text (no special tokens): "▁" for spaces, the space prefix
  // when `prefix`, merges by piece score, byte fallback for what no piece covers.
  void EncodeSentencePiece(std::string_view text, bool prefix, std::vector<int32_t>* out) const;
  // The id SentencePiece may merge into or emit for `piece` (normal, user-defined, unused), or -1.
  int32_t SpmPiece(std::string_view piece) const;

  std::vector<std::string> tokens_;
  std::vector<int32_t> types_;
  std::unordered_map<std::string, int32_t> token_to_id_;
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  std::unordered_map<uint64_t, Merge> merges_;
  std::vector<int32_t> specials_;  // control / user-defined ids, longest text first
  int32_t byte_token_[256];        // id of each byte's mapped character
  uint32_t byte_to_cp_[256];
  std::unordered_map<uint32_t, uint8_t> cp_to_byte_;
  PreTokenizer pre_ = PreTokenizer::kGpt2;
  bool ignore_merges_ = false;
  bool spm_ = false, add_space_prefix_ = true;
  std::vector<float> scores_;       // SentencePiece piece scores
  int32_t byte_fallback_[256];      // SentencePiece: id of "<0xXX>" (-1: none)
  int32_t unk_ = -1;                // tokenizer.ggml.unknown_token_id (SentencePiece without a byte piece)
  int32_t bos_ = -1, eos_ = -1, eot_ = -1;
  bool add_bos_ = false;
  std::string default_system_;
};

}  // namespace fedtune::model

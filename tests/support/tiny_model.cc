#include "tests/support/tiny_model.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <vector>

#include "common/rng.h"
#include "model/gguf.h"
#include "model/safetensors.h"
#include "model/unicode.h"

namespace fedtune::testing {

using kernels::GgmlType;

std::string TempPath(const std::string& name) {
  // One directory per test process, removed when the process exits (set FEDTUNE_KEEP_TEST_FILES
  // to keep it for a post-mortem). Child processes are started with posix_spawn, so they do not
  // run this destructor.
  struct Dir {
    std::filesystem::path path = std::filesystem::temp_directory_path() / ("fedtune_test_" + std::to_string(::getpid()));
    Dir() { std::filesystem::create_directories(path); }
    ~Dir() {
      if (std::getenv("FEDTUNE_KEEP_TEST_FILES") != nullptr) return;
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir dir;
  std::filesystem::create_directories(dir.path);
  return (dir.path / name).string();
}

absl::Status WriteTinyLlamaGguf(const std::string& path, const TinyModelOptions& o) {
  // Byte-level vocabulary in GPT-2's byte->unicode mapping order.
  std::vector<std::string> tokens = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  std::vector<int32_t> types = {3, 3, 3};
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    std::string s;
    model::AppendUtf8(printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++), &s);
    tokens.push_back(s);
    types.push_back(1);
  }
  const std::vector<std::string> merges = {"t h", "h e", "th e", "Ġ the", "i n", "Ġ a"};
  for (const auto& m : merges) {
    const size_t sp = m.find(' ');
    tokens.push_back(m.substr(0, sp) + m.substr(sp + 1));
    types.push_back(1);
  }
  const int64_t V = static_cast<int64_t>(tokens.size());
  const int64_t E = o.n_embd, hd = E / o.n_head, kv = o.n_head_kv * hd, F = o.n_ff;

  model::GgufWriter w;
  w.SetString("general.architecture", "llama");
  w.SetString("general.name", "fedtune-tiny-llama");
  w.SetU32("llama.context_length", static_cast<uint32_t>(o.n_ctx));
  w.SetU32("llama.embedding_length", static_cast<uint32_t>(E));
  w.SetU32("llama.block_count", static_cast<uint32_t>(o.n_layer));
  w.SetU32("llama.feed_forward_length", static_cast<uint32_t>(F));
  w.SetU32("llama.attention.head_count", static_cast<uint32_t>(o.n_head));
  w.SetU32("llama.attention.head_count_kv", static_cast<uint32_t>(o.n_head_kv));
  w.SetF32("llama.rope.freq_base", o.rope_base);
  w.SetF32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.SetU32("llama.rope.dimension_count", static_cast<uint32_t>(hd));
  w.SetU32("llama.vocab_size", static_cast<uint32_t>(V));
  w.SetString("tokenizer.ggml.model", "gpt2");
  w.SetString("tokenizer.ggml.pre", "smollm");
  w.SetStringArray("tokenizer.ggml.tokens", tokens);
  w.SetI32Array("tokenizer.ggml.token_type", types);
  w.SetStringArray("tokenizer.ggml.merges", merges);
  w.SetU32("tokenizer.ggml.bos_token_id", 1);
  w.SetU32("tokenizer.ggml.eos_token_id", 2);
  w.SetBool("tokenizer.ggml.add_bos_token", false);

  Rng rng(o.seed);
  auto rand_vec = [&](int64_t count, float scale) {
    std::vector<float> v(static_cast<size_t>(count));
    for (auto& x : v) x = static_cast<float>(rng.Normal()) * scale;
    return v;
  };
  auto norm_vec = [&](int64_t count) {
    std::vector<float> v(static_cast<size_t>(count));
    for (auto& x : v) x = 1.0f + 0.1f * static_cast<float>(rng.Normal());
    return v;
  };
  const float s_in = 1.0f / std::sqrt(static_cast<float>(E));
  FT_RETURN_IF_ERROR(w.AddTensorF32("token_embd.weight", {E, V}, o.weight_type, rand_vec(V * E, 1.0f)));
  FT_RETURN_IF_ERROR(w.AddTensorF32("output_norm.weight", {E}, GgmlType::kF32, norm_vec(E)));
  if (!o.tied_output) FT_RETURN_IF_ERROR(w.AddTensorF32("output.weight", {E, V}, o.weight_type, rand_vec(V * E, s_in)));
  for (int64_t l = 0; l < o.n_layer; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    FT_RETURN_IF_ERROR(w.AddTensorF32(p + "attn_norm.weight", {E}, GgmlType::kF32, norm_vec(E)));
    FT_RETURN_IF_ERROR(w.AddTensorF32(p + "attn_q.weight", {E, E}, o.weight_type, rand_vec(E * E, s_in)));
    FT_RETURN_IF_ERROR(w.AddTensorF32(p + "attn_k.weight", {E, kv}, o.weight_type, rand_vec(E * kv, s_in)));
    FT_RETURN_IF_ERROR(w.AddTensorF32(p + "attn_v.weight", {E, kv}, o.weight_type, rand_vec(E * kv, s_in)));
    FT_RETURN_IF_ERROR(w.AddTensorF32(p + "attn_output.weight", {E, E}, o.weight_type, rand_vec(E * E, s_in)));
    FT_RETURN_IF_ERROR(w.AddTensorF32(p + "ffn_norm.weight", {E}, GgmlType::kF32, norm_vec(E)));
    FT_RETURN_IF_ERROR(w.AddTensorF32(p + "ffn_gate.weight", {E, F}, o.weight_type, rand_vec(E * F, s_in)));
    FT_RETURN_IF_ERROR(w.AddTensorF32(p + "ffn_up.weight", {E, F}, o.weight_type, rand_vec(E * F, s_in)));
    FT_RETURN_IF_ERROR(w.AddTensorF32(p + "ffn_down.weight", {F, E}, o.weight_type, rand_vec(F * E, 1.0f / std::sqrt(static_cast<float>(F)))));
  }
  return w.WriteFile(path);
}

absl::Status WriteTinyLlamaHf(const std::string& gguf_path, const std::string& dir) {
  FT_ASSIGN_OR_RETURN(auto g, model::GgufFile::Open(gguf_path));
  std::filesystem::create_directories(dir);
  const int64_t E = g->GetIntOr("llama.embedding_length", 0), H = g->GetIntOr("llama.attention.head_count", 0);
  const int64_t Hkv = g->GetIntOr("llama.attention.head_count_kv", 0), L = g->GetIntOr("llama.block_count", 0);
  const int64_t F = g->GetIntOr("llama.feed_forward_length", 0);
  const int64_t V = g->FindTensor("token_embd.weight")->ne[1];
  const int64_t hd = E / H;
  model::SafetensorsWriter st;
  // GGUF row 2i+t of a head = HF row t*hd/2+i (FORMATS.md): undo the converter's permutation.
  auto add = [&](const std::string& gname, const std::string& hname, int64_t heads) -> absl::Status {
    const model::GgufTensor* t = g->FindTensor(gname);
    if (t == nullptr) return absl::NotFoundError(gname);
    const int64_t cols = t->ne[0], rows = t->ne.size() > 1 ? t->ne[1] : 1;
    std::vector<float> v(static_cast<size_t>(rows * cols));
    kernels::DequantizeRow(t->type, t->data, v.data(), rows * cols);
    std::vector<float> out = v;
    if (heads > 0) {
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < hd / 2; ++i)
          for (int64_t s = 0; s < 2; ++s)
            std::copy_n(v.begin() + (h * hd + 2 * i + s) * cols, cols, out.begin() + (h * hd + s * hd / 2 + i) * cols);
    }
    std::vector<int64_t> shape = t->ne.size() > 1 ? std::vector<int64_t>{rows, cols} : std::vector<int64_t>{cols};
    return st.AddF32(hname, shape, out);
  };
  FT_RETURN_IF_ERROR(add("token_embd.weight", "model.embed_tokens.weight", 0));
  FT_RETURN_IF_ERROR(add("output_norm.weight", "model.norm.weight", 0));
  if (g->FindTensor("output.weight")) FT_RETURN_IF_ERROR(add("output.weight", "lm_head.weight", 0));
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".", q = "model.layers." + std::to_string(l) + ".";
    FT_RETURN_IF_ERROR(add(p + "attn_norm.weight", q + "input_layernorm.weight", 0));
    FT_RETURN_IF_ERROR(add(p + "ffn_norm.weight", q + "post_attention_layernorm.weight", 0));
    FT_RETURN_IF_ERROR(add(p + "attn_q.weight", q + "self_attn.q_proj.weight", H));
    FT_RETURN_IF_ERROR(add(p + "attn_k.weight", q + "self_attn.k_proj.weight", Hkv));
    FT_RETURN_IF_ERROR(add(p + "attn_v.weight", q + "self_attn.v_proj.weight", 0));
    FT_RETURN_IF_ERROR(add(p + "attn_output.weight", q + "self_attn.o_proj.weight", 0));
    FT_RETURN_IF_ERROR(add(p + "ffn_gate.weight", q + "mlp.gate_proj.weight", 0));
    FT_RETURN_IF_ERROR(add(p + "ffn_up.weight", q + "mlp.up_proj.weight", 0));
    FT_RETURN_IF_ERROR(add(p + "ffn_down.weight", q + "mlp.down_proj.weight", 0));
  }
  FT_RETURN_IF_ERROR(st.WriteFile(dir + "/model.safetensors"));
  std::ofstream cfg(dir + "/config.json");
  cfg << "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": " << E << ", \"num_hidden_layers\": " << L
      << ", \"num_attention_heads\": " << H << ", \"num_key_value_heads\": " << Hkv << ", \"intermediate_size\": " << F
      << ", \"vocab_size\": " << V << ", \"rms_norm_eps\": 1e-05, \"rope_theta\": " << g->GetFloatOr("llama.rope.freq_base", 1e4)
      << ", \"max_position_embeddings\": " << g->GetIntOr("llama.context_length", 128)
      << ", \"tie_word_embeddings\": " << (g->FindTensor("output.weight") ? "false" : "true") << "}\n";
  if (!cfg) return absl::InternalError("cannot write config.json");
  return absl::OkStatus();
}

}  // namespace fedtune::testing

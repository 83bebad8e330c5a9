// issue 19: decoder families against Hugging Face transformers and PEFT. Each family is a tiny
// random model made by tests/oracles/gen_family_golden.py (tests/data/families/<family>/):
// fedtune loads the folder and must reproduce transformers' logits, PEFT's logits with a LoRA
// adapter on all seven projections, and PyTorch autograd's LoRA gradients. The same weights
// written as GGUF in llama.cpp's conventions (llama: q/k rows permuted and rope_freqs; qwen2/3:
// rows as in the checkpoint, NeoX RoPE) must give the same logits. Settings and tensors the
// engine does not implement are refused at load, by name.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"
#include "kernels/backend.h"
#include "model/adapter.h"
#include "model/export.h"
#include "model/gguf.h"
#include "model/llama.h"
#include "model/safetensors.h"
#include "model/trainer.h"
#include "nlohmann/json.hpp"
#include "model/tokenizer.h"
#include "common/config_loader.h"
#include "model/adapter_io.h"
#include "sim/simulation.h"
#include "planner/planner.h"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

using kernels::GgmlType;

std::string FamilyDir(const std::string& f) { return std::string(FEDTUNE_SOURCE_DIR) + "/tests/data/families/" + f; }

std::vector<float> GoldenF32(const SafetensorsFile& g, const std::string& name) {
  auto t = g.ToF32(name);
  EXPECT_TRUE(t.ok()) << name << ": " << t.status();
  if (!t.ok()) return {};
  return std::vector<float>(t->data<float>(), t->data<float>() + t->size());
}

std::vector<int32_t> GoldenTokens(const SafetensorsFile& g) {
  const SafeTensor* t = g.Find("tokens");
  EXPECT_NE(t, nullptr);
  if (t == nullptr || t->dtype != DType::kI32) return {};
  std::vector<int32_t> v(t->nbytes / 4);
  std::memcpy(v.data(), t->data, t->nbytes);
  return v;
}

// max |a - b| / max |b|.
double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, scale = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

std::vector<float> Logits(const LlamaModel& m, const std::vector<int32_t>& tokens, const AdapterSet<float>* adapters) {
  LlamaContext ctx(m, 64);
  ctx.SetAdapters(adapters);
  std::vector<float> logits;
  const auto st = ctx.Eval(tokens, true, &logits);
  EXPECT_TRUE(st.ok()) << st;
  return logits;
}

// The checkpoint as llama.cpp's convert_hf_to_gguf.py writes it (F32 tensors): for llama the
// q/k rows permuted to adjacent pairs and Llama 3's rope_freqs; for qwen2/qwen3 the rows as they
// are (NeoX RoPE), biases and q/k norms under their GGUF names.
absl::Status WriteConverterStyleGguf(const LlamaModel& hf, const std::string& hf_dir, const std::string& path) {
  const LlamaConfig& c = hf.config();
  FT_ASSIGN_OR_RETURN(auto st, SafetensorsFile::Open(hf_dir + "/model.safetensors"));
  GgufWriter w;
  const std::string a = c.arch + ".";
  w.SetString("general.architecture", c.arch);
  w.SetU32(a + "embedding_length", static_cast<uint32_t>(c.n_embd));
  w.SetU32(a + "block_count", static_cast<uint32_t>(c.n_layer));
  w.SetU32(a + "feed_forward_length", static_cast<uint32_t>(c.n_ff));
  w.SetU32(a + "attention.head_count", static_cast<uint32_t>(c.n_head));
  w.SetU32(a + "attention.head_count_kv", static_cast<uint32_t>(c.n_head_kv));
  w.SetU32(a + "context_length", static_cast<uint32_t>(c.n_ctx_train));
  w.SetF32(a + "rope.freq_base", c.rope_base);
  w.SetF32(a + "attention.layer_norm_rms_epsilon", c.rms_eps);
  if (c.head_dim * c.n_head != c.n_embd) {
    w.SetU32(a + "attention.key_length", static_cast<uint32_t>(c.head_dim));
    w.SetU32(a + "attention.value_length", static_cast<uint32_t>(c.head_dim));
  }
  if (c.sliding_window > 0) w.SetU32(a + "attention.sliding_window", static_cast<uint32_t>(c.sliding_window));
  if (c.attn_softcap > 0) w.SetF32(a + "attn_logit_softcapping", c.attn_softcap);  // gemma2
  if (c.final_softcap > 0) w.SetF32(a + "final_logit_softcapping", c.final_softcap);
  if (c.arch == "gemma3") {  // the local layers' RoPE base; linear scaling of the global ones
    w.SetF32(a + "rope.freq_base_swa", c.rope_base_swa);
    if (!c.rope_freq_factors.empty()) {
      w.SetString(a + "rope.scaling.type", "linear");
      w.SetF32(a + "rope.scaling.factor", c.rope_freq_factors[0]);
    }
  }
  const bool permute = c.arch == "llama";
  auto add = [&](const std::string& hf_name, const std::string& gguf_name, int64_t permute_heads) -> absl::Status {
    const SafeTensor* t = st->Find(hf_name);
    if (t == nullptr) return absl::OkStatus();
    FT_ASSIGN_OR_RETURN(Tensor v, st->ToF32(hf_name));
    std::vector<float> x(v.data<float>(), v.data<float>() + v.size());
    if (c.gemma && hf_name.ends_with("norm.weight"))
      for (float& e : x) e += 1.0f;  // the converter stores Gemma's (1 + w)
    const int64_t cols = t->shape.size() == 2 ? t->shape[1] : 1, rows = t->shape[0];
    if (permute && permute_heads > 0) {  // HF rotate_half rows -> adjacent pairs
      std::vector<float> y(x.size());
      const int64_t hd = rows / permute_heads;
      for (int64_t r = 0; r < rows; ++r) {
        std::copy_n(x.begin() + RotateHalfRow(r, hd) * cols, cols, y.begin() + r * cols);
      }
      x = std::move(y);
    }
    std::vector<int64_t> ne = t->shape.size() == 2 ? std::vector<int64_t>{cols, rows} : std::vector<int64_t>{rows};
    return w.AddTensorF32(gguf_name, ne, GgmlType::kF32, x);
  };
  FT_RETURN_IF_ERROR(add("model.embed_tokens.weight", "token_embd.weight", 0));
  FT_RETURN_IF_ERROR(add("lm_head.weight", "output.weight", 0));
  FT_RETURN_IF_ERROR(add("model.norm.weight", "output_norm.weight", 0));
  if (!c.rope_freq_factors.empty() && !c.gemma) FT_RETURN_IF_ERROR(w.AddTensorF32("rope_freqs.weight", {static_cast<int64_t>(c.rope_freq_factors.size())}, GgmlType::kF32, c.rope_freq_factors));
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string h = absl::StrCat("model.layers.", l, "."), g = absl::StrCat("blk.", l, ".");
    FT_RETURN_IF_ERROR(add(h + "input_layernorm.weight", g + "attn_norm.weight", 0));
    if (c.gemma) {
      FT_RETURN_IF_ERROR(add(h + "post_attention_layernorm.weight", g + "post_attention_norm.weight", 0));
      FT_RETURN_IF_ERROR(add(h + "pre_feedforward_layernorm.weight", g + "ffn_norm.weight", 0));
      FT_RETURN_IF_ERROR(add(h + "post_feedforward_layernorm.weight", g + "post_ffw_norm.weight", 0));
    } else {
      FT_RETURN_IF_ERROR(add(h + "post_attention_layernorm.weight", g + "ffn_norm.weight", 0));
    }
    FT_RETURN_IF_ERROR(add(h + "self_attn.qkv_proj.weight", g + "attn_qkv.weight", 0));  // phi3 (NeoX file: rows as they are)
    FT_RETURN_IF_ERROR(add(h + "mlp.gate_up_proj.weight", g + "ffn_up.weight", 0));
    FT_RETURN_IF_ERROR(add(h + "self_attn.q_proj.weight", g + "attn_q.weight", c.n_head));
    FT_RETURN_IF_ERROR(add(h + "self_attn.k_proj.weight", g + "attn_k.weight", c.n_head_kv));
    FT_RETURN_IF_ERROR(add(h + "self_attn.v_proj.weight", g + "attn_v.weight", 0));
    FT_RETURN_IF_ERROR(add(h + "self_attn.o_proj.weight", g + "attn_output.weight", 0));
    FT_RETURN_IF_ERROR(add(h + "self_attn.q_proj.bias", g + "attn_q.bias", c.n_head));
    FT_RETURN_IF_ERROR(add(h + "self_attn.k_proj.bias", g + "attn_k.bias", c.n_head_kv));
    FT_RETURN_IF_ERROR(add(h + "self_attn.v_proj.bias", g + "attn_v.bias", 0));
    FT_RETURN_IF_ERROR(add(h + "self_attn.q_norm.weight", g + "attn_q_norm.weight", 0));
    FT_RETURN_IF_ERROR(add(h + "self_attn.k_norm.weight", g + "attn_k_norm.weight", 0));
    FT_RETURN_IF_ERROR(add(h + "mlp.gate_proj.weight", g + "ffn_gate.weight", 0));
    FT_RETURN_IF_ERROR(add(h + "mlp.up_proj.weight", g + "ffn_up.weight", 0));
    FT_RETURN_IF_ERROR(add(h + "mlp.down_proj.weight", g + "ffn_down.weight", 0));
  }
  return w.WriteFile(path);
}

uint32_t Fnv1a32(const void* data, size_t n) {
  uint32_t h = 0x811C9DC5u;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(data)[i]) * 0x01000193u;
  return h;
}

// gen_family_golden.py's tokenizer_corpus(): ASCII non-empty first-occurrence lines of the regular
// files in /usr/share/common-licenses and /usr/lib/python3.*/*.py, paths in byte order, <= 10,000.
std::vector<std::string> TokenizerCorpus() {
  namespace fs = std::filesystem;
  std::vector<std::string> paths;
  std::error_code ec;
  auto add_dir = [&](const fs::path& dir, const std::string& suffix) {
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string p = e.path().string();
      if (p.size() >= suffix.size() && p.compare(p.size() - suffix.size(), suffix.size(), suffix) == 0 && fs::is_regular_file(fs::symlink_status(e.path())))
        paths.push_back(p);
    }
  };
  add_dir("/usr/share/common-licenses", "");
  for (const auto& e : fs::directory_iterator("/usr/lib", ec))
    if (e.path().filename().string().rfind("python3.", 0) == 0 && fs::is_directory(e.path())) add_dir(e.path(), ".py");
  std::sort(paths.begin(), paths.end());
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (const auto& p : paths) {
    std::ifstream in(p, std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t start = 0;
    while (start <= text.size()) {
      size_t nl = text.find('\n', start);
      if (nl == std::string::npos) nl = text.size();
      std::string line = text.substr(start, nl - start);
      start = nl + 1;
      if (line.empty() || std::any_of(line.begin(), line.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x80; })) continue;
      if (!seen.insert(line).second) continue;
      out.push_back(std::move(line));
      if (out.size() == 10000) return out;
    }
  }
  return out;
}

// fedtune's adapter gradients as PEFT names them: per layer and PEFT target, the gradient of A
// (a fused target's A is shared by its parts: the sum of theirs) and of B (the parts' rows
// stacked, q/k rows in Hugging Face's rotate_half order).
std::map<std::string, std::vector<float>> PeftGradients(const LlamaModel& m, const AdapterSet<double>& set) {
  const LlamaConfig& c = m.config();
  const int64_t q = c.q_dim(), kv = c.n_head_kv * c.head_dim, f = c.n_ff, hd = c.head_dim;
  struct T {
    std::string name;
    std::vector<std::pair<Module, int64_t>> parts;
  };
  std::vector<T> targets;
  if (c.fused) {
    targets = {{"self_attn.qkv_proj", {{Module::kQ, 0}, {Module::kK, q}, {Module::kV, q + kv}}},
               {"self_attn.o_proj", {{Module::kO, 0}}},
               {"mlp.gate_up_proj", {{Module::kGate, 0}, {Module::kUp, f}}},
               {"mlp.down_proj", {{Module::kDown, 0}}}};
  } else {
    for (int mi = 0; mi < kNumModules; ++mi) {
      const Module mod = static_cast<Module>(mi);
      const bool mlp = mod == Module::kGate || mod == Module::kUp || mod == Module::kDown;
      targets.push_back({std::string(mlp ? "mlp." : "self_attn.") + PeftModuleName(mod), {{mod, 0}}});
    }
  }
  std::map<std::string, std::vector<float>> out;
  for (size_t l = 0; l < set.layers.size(); ++l) {
    for (const T& t : targets) {
      const std::string base = absl::StrCat("base_model.model.model.layers.", l, ".", t.name);
      std::vector<float>& ga = out[base + ".lora_A.weight"];
      std::vector<float>& gb = out[base + ".lora_B.weight"];
      for (const auto& [mod, row0] : t.parts) {
        const auto& a = *set.layers[l][static_cast<size_t>(mod)];
        const int64_t r = a.spec.rank;
        if (ga.empty()) ga.assign(a.ga.size(), 0.0f);
        for (size_t i = 0; i < a.ga.size(); ++i) ga[i] += static_cast<float>(a.ga[i]);
        gb.resize(static_cast<size_t>((row0 + a.out) * r));
        const bool rope = mod == Module::kQ || mod == Module::kK;
        for (int64_t row = 0; row < a.out; ++row) {
          const int64_t hf = rope ? RotateHalfRow(row, hd) : row;
          for (int64_t k = 0; k < r; ++k) gb[static_cast<size_t>((row0 + hf) * r + k)] = static_cast<float>(a.gb[static_cast<size_t>(row * r + k)]);
        }
      }
    }
  }
  return out;
}

template <typename T>
AdapterSet<double> ToDouble(const AdapterSet<T>& src) {
  AdapterSet<double> d;
  d.layers.resize(src.layers.size());
  for (size_t l = 0; l < src.layers.size(); ++l)
    for (size_t k = 0; k < kNumModules; ++k) {
      if (!src.layers[l][k]) continue;
      const auto& s = *src.layers[l][k];
      auto a = ModuleAdapter<double>::Create(s.spec, s.in, s.out, 0);
      EXPECT_TRUE(a.ok());
      a->a.assign(s.a.begin(), s.a.end());
      a->b.assign(s.b.begin(), s.b.end());
      a->ga.assign(s.ga.begin(), s.ga.end());
      a->gb.assign(s.gb.begin(), s.gb.end());
      d.layers[l][k] = std::move(*a);
    }
  return d;
}

// Test names by family: Llama3, Qwen2, Qwen3, Mistral, Gemma2, Gemma3, Phi3.
std::string FamilyTestName(const ::testing::TestParamInfo<std::string>& i) {
  std::string n = i.param;
  n[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(n[0])));
  return n;
}

class FamilyOracle : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = FamilyDir(GetParam());
    auto m = LlamaModel::Load(dir_);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    auto g = SafetensorsFile::Open(dir_ + "/golden.safetensors");
    ASSERT_TRUE(g.ok()) << g.status();
    golden_ = std::move(*g);
    tokens_ = GoldenTokens(*golden_);
    ASSERT_EQ(tokens_.size(), 12u);
  }
  std::string dir_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<SafetensorsFile> golden_;
  std::vector<int32_t> tokens_;
};

TEST_P(FamilyOracle, LoadsWithTheFamilysFeatures) {
  const LlamaConfig& c = model_->config();
  const std::string f = GetParam();
  EXPECT_EQ(c.rope_freq_factors.empty(), f != "llama3" && f != "gemma3") << f;
  EXPECT_EQ(c.tied_output, f == "qwen2" || f == "qwen3" || f == "gemma2" || f == "gemma3");
  EXPECT_EQ(c.neox_file_layout, true);  // every Hugging Face folder
  EXPECT_EQ(!model_->layer(0).bq.empty(), f == "qwen2");
  EXPECT_EQ(c.qk_norm, f == "qwen3" || f == "gemma3");
  EXPECT_EQ(c.q_dim(), f == "qwen3" || f == "gemma2" || f == "gemma3" ? 64 : 32);
  EXPECT_EQ(c.sliding_window, f == "mistral" ? 32 : f == "gemma2" || f == "gemma3" || f == "phi3" ? 128 : 0);
  EXPECT_EQ(c.gemma, f == "gemma2" || f == "gemma3");
  EXPECT_EQ(c.attn_softcap, f == "gemma2" ? 1.5f : 0.0f);  // the generator's small caps: the tanh bends
  EXPECT_EQ(c.final_softcap, f == "gemma2" ? 2.5f : 0.0f);
  if (f == "gemma2") {  // local and global layers alternate, one RoPE base
    for (int64_t l = 0; l < c.n_layer; ++l) EXPECT_EQ(c.IsSwa(l), l % 2 == 0) << l;
    EXPECT_FLOAT_EQ(c.RopeBase(0), c.RopeBase(1));
    EXPECT_FLOAT_EQ(c.query_scale, 1.0f);
  }
  EXPECT_EQ(c.fused, f == "phi3");
  if (f == "gemma3") {  // 5 local layers (RoPE base 1e4, no scaling), then a global one (1e6, linear x2)
    for (int64_t l = 0; l < 6; ++l) EXPECT_EQ(c.IsSwa(l), l < 5) << l;
    EXPECT_FLOAT_EQ(c.RopeBase(0), 10000.0f);
    EXPECT_FLOAT_EQ(c.RopeBase(5), 1e6f);
    EXPECT_EQ(c.FreqFactors(0), nullptr);
    ASSERT_NE(c.FreqFactors(5), nullptr);
    EXPECT_FLOAT_EQ(c.FreqFactors(5)[0], 2.0f);
    EXPECT_FLOAT_EQ(c.embed_scale, std::sqrt(32.0f));
  }
  if (f == "llama3") {  // the three regimes of the ramp: kept, smoothed, divided by 8
    EXPECT_FLOAT_EQ(c.rope_freq_factors[0], 1.0f);
    EXPECT_GT(c.rope_freq_factors[1], 1.0f);
    EXPECT_LT(c.rope_freq_factors[1], 8.0f);
    EXPECT_FLOAT_EQ(c.rope_freq_factors[3], 8.0f);
  }
}

TEST_P(FamilyOracle, LogitsMatchTransformers) {
  const auto want = GoldenF32(*golden_, "logits");
  const double err = RelErr(Logits(*model_, tokens_, nullptr), want);
  EXPECT_LE(err, 1e-4) << GetParam();
  RecordProperty("rel_err", std::to_string(err));
}

// llama.cpp (llama-cpp-python) on an F32 conversion of the folder by its own converter.
TEST_P(FamilyOracle, LogitsMatchLlamaCppF32) {
  auto lc = SafetensorsFile::Open(dir_ + "/llamacpp.safetensors");
  ASSERT_TRUE(lc.ok()) << lc.status();
  const double err = RelErr(Logits(*model_, tokens_, nullptr), GoldenF32(**lc, "logits_f32"));
  if (GetParam() == "gemma2" || GetParam() == "gemma3") {
    // llama.cpp's converter adds Gemma's +1 to the norm weights in the checkpoint's dtype (F16
    // here) and ggml computes GELU from an fp16 table; transformers with both emulated
    // reproduces llama.cpp (the generator measures it), and fedtune matches transformers
    // exactly (LogitsMatchTransformers).
    EXPECT_LE(GoldenF32(**lc, "emulated_vs_llamacpp").at(0), 1e-4);
    EXPECT_LE(err, 2e-2) << GetParam();
  } else {
    EXPECT_LE(err, 1e-4) << GetParam();
  }
  std::printf("[family] %s: fedtune vs llama.cpp F32 logits, max rel diff %.2e\n", GetParam().c_str(), err);
}

// The Q8_0 file llama.cpp's converter wrote (its metadata, tensor names, q/k row order, rope_freqs,
// tokenizer): fedtune loads it and computes llama.cpp's logits up to llama.cpp's own rounding
// of activations to 8 bits inside each Q8_0 product.
TEST_P(FamilyOracle, LlamaCppConvertedQ8_0GgufMatchesLlamaCpp) {
  auto m = LlamaModel::Load(dir_ + "/model.q8_0.gguf");
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_NE((*m)->tokenizer(), nullptr);
  EXPECT_EQ((*m)->config().rope_freq_factors.empty(), GetParam() != "llama3" && GetParam() != "gemma3");
  EXPECT_EQ((*m)->config().qk_norm, GetParam() == "qwen3" || GetParam() == "gemma3");
  auto lc = SafetensorsFile::Open(dir_ + "/llamacpp.safetensors");
  ASSERT_TRUE(lc.ok());
  const auto ours = Logits(**m, tokens_, nullptr);
  // llama.cpp on the file also rounds each product's activations to Q8_0 blocks, which on this
  // tiny random model (hidden 32, weights ~0.2) moves logits by a few percent, as much as
  // rounding the weights to Q8_0 does (compare: transformers on the F16 originals; fedtune
  // with only the projections re-quantized; llama.cpp's own Q8_0 vs F32 logits differ by 2.6-5.7%
  // on these models). A wrong row order or RoPE would be off by ~100%.
  auto hf = LlamaModel::Load(dir_);
  ASSERT_TRUE(hf.ok());
  ASSERT_TRUE((*hf)->Requantize(GgmlType::kQ8_0).ok());
  const double err_requant = RelErr(ours, Logits(**hf, tokens_, nullptr));
  const double err = RelErr(ours, GoldenF32(**lc, "logits_q8_0"));
  const double err_weights = RelErr(ours, GoldenF32(*golden_, "logits"));
  std::printf("[family] %s Q8_0 file: vs llama.cpp on it %.2e; vs transformers on the F16 originals %.2e; vs projections-only Q8_0 %.2e\n",
              GetParam().c_str(), err, err_weights, err_requant);
  EXPECT_LE(err, GetParam() == "gemma2" || GetParam() == "gemma3" ? 0.15 : 0.1) << GetParam();
}

// The vocabulary llama.cpp's converter put into the GGUF, run by fedtune's tokenizer, against
// Hugging Face tokenizers (the family's pre-tokenizer) or sentencepiece (mistral) on 10,000
// lines of text installed on every Debian machine (10,000) and on Unicode edge cases.
TEST_P(FamilyOracle, TokenizerMatchesHuggingFaceTokenizersOrSentencePiece) {
  const std::string tdir = FamilyDir(GetParam() == "qwen3" ? "qwen2" : GetParam() == "phi3" ? "mistral" : GetParam() == "gemma2" ? "gemma3" : GetParam());
  auto m = LlamaModel::Load(dir_ + "/model.q8_0.gguf");
  ASSERT_TRUE(m.ok()) << m.status();
  const Tokenizer& tok = *(*m)->tokenizer();
  if (GetParam() == "mistral" || GetParam() == "gemma2" || GetParam() == "gemma3" || GetParam() == "phi3") {  // SentencePiece BPE with byte fallback (Mistral, Llama 2, Gemma: no space prefix)
    EXPECT_TRUE(tok.sentencepiece());
  } else {
    EXPECT_EQ(tok.pre_tokenizer(), GetParam() == "llama3" ? Tokenizer::PreTokenizer::kLlama3 : Tokenizer::PreTokenizer::kQwen2);
  }
  // Edge cases: ids in full.
  const auto edge_ids = nlohmann::json::parse(*ReadFileToString(tdir + "/tokenizer_edge_cases.json"));
  auto edge_text = ReadFileToString(FamilyDir("") + "/tokenizer_edge_cases.txt");
  ASSERT_TRUE(edge_text.ok());
  std::vector<std::string> edges;
  for (size_t start = 0; start < edge_text->size();) {
    size_t nl = edge_text->find('\n', start);
    if (nl == std::string::npos) nl = edge_text->size();
    std::string line = edge_text->substr(start, nl - start);
    start = nl + 1;
    if (line.empty()) continue;
    for (size_t p; (p = line.find("\\n")) != std::string::npos;) line.replace(p, 2, "\n");
    edges.push_back(line);
  }
  ASSERT_EQ(edges.size(), edge_ids.size());
  for (size_t i = 0; i < edges.size(); ++i) {
    const auto ids = tok.Encode(edges[i], false);
    EXPECT_EQ(ids, edge_ids[i].get<std::vector<int32_t>>()) << edges[i];
    EXPECT_EQ(tok.Decode(ids), edges[i]);  // and back, byte for byte
  }
  // The corpus: its hash, then per line a hash of the reference library's ids.
  auto blob = ReadFileToString(tdir + "/tokenizer_golden.bin");
  ASSERT_TRUE(blob.ok());
  ASSERT_EQ(blob->compare(0, 4, "FTT2"), 0);
  uint32_t n = 0, corpus_hash = 0;
  std::memcpy(&n, blob->data() + 4, 4);
  std::memcpy(&corpus_hash, blob->data() + 8, 4);
  ASSERT_EQ(blob->size(), 12 + 4 * static_cast<size_t>(n));
  const auto corpus = TokenizerCorpus();
  std::string joined;
  for (size_t i = 0; i < corpus.size(); ++i) joined += (i > 0 ? "\n" : "") + corpus[i];
  if (corpus.size() != n || Fnv1a32(joined.data(), joined.size()) != corpus_hash) {
    GTEST_SKIP() << "this machine's /usr/share/common-licenses and python3 library differ from the golden's (other Debian versions)";
  }
  int checked = 0, differ = 0;
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t want = 0;
    std::memcpy(&want, blob->data() + 12 + 4 * i, 4);
    const auto ids = tok.Encode(corpus[i], false);
    ++checked;
    if (Fnv1a32(ids.data(), ids.size() * sizeof(int32_t)) != want && ++differ <= 5) ADD_FAILURE() << "ids differ from the reference on: " << corpus[i];
  }
  std::printf("[family] %s tokenizer: %d corpus lines checked, %d differ; %zu edge cases\n", GetParam().c_str(), checked, differ, edges.size());
  EXPECT_GE(checked, 10000);
  EXPECT_EQ(differ, 0);
}

TEST_P(FamilyOracle, LoraLogitsAndGradientsMatchPeftAndAutograd) {
  auto set = ImportPeft(dir_ + "/adapter", *model_);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_LE(RelErr(Logits(*model_, tokens_, &*set), GoldenF32(*golden_, "logits_lora")), 1e-4) << GetParam();

  Batch b;
  b.n_seq = 1;
  b.len = static_cast<int64_t>(tokens_.size());
  b.tokens = tokens_;
  for (size_t i = 0; i < tokens_.size(); ++i) b.targets.push_back(i + 1 < tokens_.size() ? tokens_[i + 1] : -1);
  const double want_nll = GoldenF32(*golden_, "nll_lora").at(0);
  for (kernels::Backend* be : {&kernels::CpuReferenceBackend(), &kernels::CpuFastBackend()}) {
    const double tol = 1e-4;  // measured: <= 1.2e-5 on both backends
    for (bool recompute : {true, false}) {
      set->ZeroGrad();
      Trainer<float> trainer(*model_, &*set, TrainerOptions{.recompute = recompute, .backend = be});
      auto nll = trainer.Step(b, 1.0f, true);
      ASSERT_TRUE(nll.ok()) << nll.status();
      EXPECT_NEAR(*nll, want_nll, tol * 0.1 * want_nll) << be->Name();
      double worst = 0;
      const auto grads = PeftGradients(*model_, ToDouble(*set));
      for (const auto& [name, g] : grads) {
        const double e = RelErr(g, GoldenF32(*golden_, name + ".grad"));
        worst = std::max(worst, e);
        EXPECT_LE(e, tol) << name << " on " << be->Name();
      }
      EXPECT_EQ(grads.size(), 2u * (model_->config().fused ? 4u : 7u) * static_cast<size_t>(model_->config().n_layer));
      std::printf("[family] %s %s recompute=%d: worst gradient error %.2e\n", GetParam().c_str(), be->Name(), recompute, worst);
    }
  }
}

// In double precision (reference kernels) the gradients match autograd's float64 ones up to
// transformers' RoPE, which computes its angles and cos/sin in float32 even in a float64 model
// (measured 0.8e-6 to 1.5e-5 relative: the deepest model, gemma3, most).
TEST_P(FamilyOracle, LoraGradientsInDoubleMatchAutogradFloat64) {
  auto set = ImportPeft(dir_ + "/adapter", *model_);
  ASSERT_TRUE(set.ok());
  AdapterSet<double> d = ToDouble(*set);
  Batch b;
  b.n_seq = 1;
  b.len = static_cast<int64_t>(tokens_.size());
  b.tokens = tokens_;
  for (size_t i = 0; i < tokens_.size(); ++i) b.targets.push_back(i + 1 < tokens_.size() ? tokens_[i + 1] : -1);
  Trainer<double> trainer(*model_, &d);
  d.ZeroGrad();
  ASSERT_TRUE(trainer.Step(b, 1.0, true).ok());
  double worst = 0;
  for (const auto& [name, g] : PeftGradients(*model_, d)) worst = std::max(worst, RelErr(g, GoldenF32(*golden_, name + ".grad")));
  std::printf("[family] %s double: worst gradient error %.2e\n", GetParam().c_str(), worst);
  EXPECT_LE(worst, 5e-5);
}

TEST_P(FamilyOracle, ConverterStyleGgufGivesTheSameLogitsAndExportsMatch) {
  const std::string path = testing::TempPath(GetParam() + ".gguf");
  ASSERT_TRUE(WriteConverterStyleGguf(*model_, dir_, path).ok());
  auto g = LlamaModel::Load(path);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)->config().neox_file_layout, GetParam() != "llama3" && GetParam() != "mistral");
  EXPECT_LE(RelErr(Logits(**g, tokens_, nullptr), GoldenF32(*golden_, "logits")), 1e-4) << GetParam();
  auto set = ImportPeft(dir_ + "/adapter", **g);
  ASSERT_TRUE(set.ok());
  const auto want = GoldenF32(*golden_, "logits_lora");
  EXPECT_LE(RelErr(Logits(**g, tokens_, &*set), want), 1e-4);
  // Merged into the base (the file's row order): the base model alone gives the adapter's logits.
  const std::string merged = testing::TempPath(GetParam() + "_merged.gguf");
  ASSERT_TRUE(ExportMergedGguf(merged, **g, *set, GgmlType::kF32).ok());
  auto mm = LlamaModel::Load(merged);
  ASSERT_TRUE(mm.ok()) << mm.status();
  EXPECT_LE(RelErr(Logits(**mm, tokens_, nullptr), want), 1e-4);
  // GGUF-LoRA in the file's row order: B rows of q/k as the base stores them.
  const std::string lora = testing::TempPath(GetParam() + "_lora.gguf");
  ASSERT_TRUE(ExportGgufLora(lora, **g, *set).ok());
  // The same adapters exported from the Hugging Face folder give the same GGUF-LoRA: the rows
  // follow the GGUF architecture's convention, not the source file's.
  const std::string lora_hf = testing::TempPath(GetParam() + "_lora_hf.gguf");
  ASSERT_TRUE(ExportGgufLora(lora_hf, *model_, *set).ok());
  auto lh = GgufFile::Open(lora_hf);
  auto lg = GgufFile::Open(lora);
  ASSERT_TRUE(lh.ok() && lg.ok());
  ASSERT_EQ((*lh)->tensors().size(), (*lg)->tensors().size());
  for (size_t i = 0; i < (*lg)->tensors().size(); ++i) {
    const auto& x = (*lg)->tensors()[i];
    const auto& y = (*lh)->tensors()[i];
    ASSERT_EQ(x.name, y.name);
    ASSERT_EQ(x.nbytes, y.nbytes);
    EXPECT_EQ(std::memcmp(x.data, y.data, x.nbytes), 0) << x.name;
  }
  // DiaBlo: its GGUF-LoRA (an exact LoRA of rank min(in, out)) is the merged export's change of
  // each weight, row for row in the file's order.
  auto dia = MakeAdapters<float>((*g)->adapter_dims(), AdapterSpec{AdapterKind::kDiaBlo, 4, 8.0f, false, 4}, {Module::kQ, Module::kV}, 7);
  ASSERT_TRUE(dia.ok());
  for (auto& layer : dia->layers)
    for (auto& a : layer)
      if (a)
        for (size_t i = 0; i < a->d.size(); ++i) a->d[i] = 0.01f * static_cast<float>((i * 7919) % 97) - 0.4f;
  const std::string dia_lora = testing::TempPath(GetParam() + "_dia_lora.gguf"), dia_merged = testing::TempPath(GetParam() + "_dia_merged.gguf");
  ASSERT_TRUE(ExportMergedGguf(dia_merged, **g, *dia, GgmlType::kF32).ok());
  if (!(*g)->config().fused) {
    ASSERT_TRUE(ExportGgufLora(dia_lora, **g, *dia).ok());
    auto dl = GgufFile::Open(dia_lora);
    auto dm = GgufFile::Open(dia_merged);
    auto base = GgufFile::Open(path);
    ASSERT_TRUE(dl.ok() && dm.ok() && base.ok());
    const float alpha = static_cast<float>((*dl)->GetFloatOr("adapter.lora.alpha", 0));
    for (const char* stem : {"blk.0.attn_q.weight", "blk.1.attn_v.weight"}) {
      const GgufTensor* la = (*dl)->FindTensor(std::string(stem) + ".lora_a");
      const GgufTensor* lb = (*dl)->FindTensor(std::string(stem) + ".lora_b");
      ASSERT_TRUE(la != nullptr && lb != nullptr) << stem;
      const int64_t in = la->ne[0], r = la->ne[1], out = lb->ne[1];
      std::vector<float> A(static_cast<size_t>(in * r)), B(static_cast<size_t>(r * out)), w0(static_cast<size_t>(in * out)), w1(w0.size());
      kernels::DequantizeRow(la->type, la->data, A.data(), in * r);
      kernels::DequantizeRow(lb->type, lb->data, B.data(), r * out);
      const GgufTensor* t0 = (*base)->FindTensor(stem);
      const GgufTensor* t1 = (*dm)->FindTensor(stem);
      kernels::DequantizeRow(t0->type, t0->data, w0.data(), in * out);
      kernels::DequantizeRow(t1->type, t1->data, w1.data(), in * out);
      double worst = 0;
      for (int64_t o = 0; o < out; ++o)
        for (int64_t i = 0; i < in; ++i) {
          double d = 0;
          for (int64_t k = 0; k < r; ++k) d += static_cast<double>(B[static_cast<size_t>(o * r + k)]) * A[static_cast<size_t>(k * in + i)];
          worst = std::max(worst, std::abs(alpha / static_cast<double>(r) * d - (w1[static_cast<size_t>(o * in + i)] - w0[static_cast<size_t>(o * in + i)])));
        }
      EXPECT_LE(worst, 1e-5) << stem;
    }
  }
  if ((*g)->config().fused) return;  // fused targets: checked in llama.cpp (check_family_exports.py)
  auto lf = GgufFile::Open(lora);
  ASSERT_TRUE(lf.ok());
  const GgufTensor* bq = (*lf)->FindTensor("blk.0.attn_q.weight.lora_b");
  ASSERT_NE(bq, nullptr);
  auto peft_st = SafetensorsFile::Open(dir_ + "/adapter/adapter_model.safetensors");
  ASSERT_TRUE(peft_st.ok());
  const auto peft_b = GoldenF32(**peft_st, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
  std::vector<float> file_b(static_cast<size_t>(bq->n_elements()));
  kernels::DequantizeRow(bq->type, bq->data, file_b.data(), bq->n_elements());
  const int64_t hd = (*g)->config().head_dim, r = 4;
  for (int64_t row = 0; row < (*g)->config().q_dim(); ++row) {
    // llama's file rows are adjacent pairs (file row i is HF row RotateHalfRow(i)); qwen's are HF's.
    const int64_t hf_row = (*g)->config().neox_file_layout ? row : RotateHalfRow(row, hd);
    for (int64_t k = 0; k < r; ++k) ASSERT_FLOAT_EQ(file_b[static_cast<size_t>(row * r + k)], peft_b[static_cast<size_t>(hf_row * r + k)]) << row;
  }
}

// A short federated fine-tune of the llama.cpp-converted file (3 clients, 2 rounds, LoRA on all
// seven projections, central DP and uncertainty-aware merging), then its exports: the PEFT folder
// and the GGUF-LoRA describe the adapter the run trained, in each target's row order.
TEST_P(FamilyOracle, FederatedFineTuneRunsAndExports) {
  const std::string out = testing::TempPath("sim_" + GetParam());
  const std::string yaml = "model: {path: " + dir_ + "/model.q8_0.gguf}\n"
                           "adapter: {kind: LORA, rank: 4, alpha: 8, target_modules: [all]}\n"
                           "clients: 3\nrounds: 2\n"
                           "data: {tasks: [sentiment, extract], examples_per_task: 24, eval_examples: 4, max_len: 128}\n"
                           "train: {local_steps: 2, batch: 4, learning_rate: 0.01}\n"
                           "strategy: {merge: uncertainty}\n"
                           "eval: {max_new_tokens: 2}\n"
                           "output_dir: " + out + "\n";
  proto::SimulationConfig c;
  ASSERT_TRUE(LoadConfigYaml(yaml, &c, "family.yaml").ok());
  sim::SimOptions o;
  o.progress = false;
  auto r = sim::RunSimulation(c, o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->rounds.size(), 3u);
  const double before = r->rounds[0].metrics.at("eval_loss"), after = r->rounds[2].metrics.at("eval_loss");
  std::printf("[family] %s federated: held-out loss %.4f -> %.4f over 2 rounds\n", GetParam().c_str(), before, after);
  EXPECT_LT(after, before);
  auto m = LlamaModel::Load(dir_ + "/model.q8_0.gguf");
  ASSERT_TRUE(m.ok());
  auto trained = LoadAdapters(r->run_dir + "/adapter.safetensors", (*m)->adapter_dims());
  ASSERT_TRUE(trained.ok()) << trained.status();
  auto peft = ImportPeft(r->run_dir + "/peft", **m);
  ASSERT_TRUE(peft.ok()) << peft.status();
  const auto a = Logits(**m, tokens_, &*trained), b = Logits(**m, tokens_, &*peft);
  EXPECT_LE(RelErr(b, a), 1e-6);
  EXPECT_GT(RelErr(a, Logits(**m, tokens_, nullptr)), 1e-4);  // the run changed the model
  // For tests/oracles/check_family_exports.py (PEFT on the Hugging Face folder): the exported
  // folder and fedtune's logits with it on the same folder.
  if (const char* dump = std::getenv("FEDTUNE_FAMILY_DUMP")) {
    const std::string to = std::string(dump) + "/" + GetParam();
    std::filesystem::create_directories(to);
    std::filesystem::copy(r->run_dir + "/peft", to + "/peft", std::filesystem::copy_options::overwrite_existing | std::filesystem::copy_options::recursive);
    auto on_hf = ImportPeft(r->run_dir + "/peft", *model_);
    ASSERT_TRUE(on_hf.ok());
    SafetensorsWriter w;
    const std::vector<int64_t> shape = {static_cast<int64_t>(tokens_.size()), model_->config().n_vocab};
    ASSERT_TRUE(w.AddF32("logits", shape, Logits(*model_, tokens_, &*on_hf)).ok());
    std::filesystem::copy_file(r->run_dir + "/adapter-lora.gguf", to + "/adapter-lora.gguf", std::filesystem::copy_options::overwrite_existing);
    ASSERT_TRUE(w.WriteFile(to + "/fedtune_logits.safetensors").ok());
  }
  auto lora = GgufFile::Open(r->run_dir + "/adapter-lora.gguf");
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_EQ((*lora)->GetString("general.architecture").value_or(""), (*m)->config().arch);
}

// The planner's memory model sizes activations from the model's shape: what it counts per token
// for one layer is what the trainer keeps (Trainer::KeptBytesPerSequence, less the adapters' z).
TEST_P(FamilyOracle, PlannerShapeCountsWhatTheTrainerKeeps) {
  auto set = ImportPeft(dir_ + "/adapter", *model_);
  ASSERT_TRUE(set.ok());
  Trainer<float> trainer(*model_, &*set);
  const int64_t len = 17, rank_sum = 4 * 7 * model_->config().n_layer;
  const auto shape = planner::ModelShape::Of(*model_);
  EXPECT_EQ(static_cast<double>(trainer.KeptBytesPerSequence(len) - 4 * len * rank_sum),
            shape.LayerCacheBytesPerToken() * static_cast<double>(len * model_->config().n_layer) +
                shape.DerivedBytesPerToken() * static_cast<double>(len));
}

// Sequences longer than the window run (FamilyWindow checks the values against transformers):
// inference with the KV cache and a training step, with finite results.
TEST_P(FamilyOracle, SequencesBeyondTheSlidingWindowRun) {
  if (model_->config().sliding_window == 0) GTEST_SKIP() << "no sliding window in " << GetParam();
  const int64_t n = model_->config().sliding_window + 8;
  std::vector<int32_t> long_seq(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) long_seq[static_cast<size_t>(i)] = static_cast<int32_t>(3 + (i * 7) % 200);
  LlamaContext ctx(*model_, n);
  std::vector<float> logits;
  ASSERT_TRUE(ctx.Eval(long_seq, false, &logits).ok());
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
  auto set = ImportPeft(dir_ + "/adapter", *model_);
  ASSERT_TRUE(set.ok());
  Trainer<float> trainer(*model_, &*set);
  Batch b{1, n, long_seq, std::vector<int32_t>(static_cast<size_t>(n), 1), {}};
  auto nll = trainer.Step(b, 1.0f, true);
  ASSERT_TRUE(nll.ok()) << nll.status();
  EXPECT_TRUE(std::isfinite(*nll));
}

INSTANTIATE_TEST_SUITE_P(Families, FamilyOracle, ::testing::Values("llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"),
                         FamilyTestName);

// Sliding windows shorter than the sequence (tests/oracles/gen_window_golden.py): each folder's
// config with sliding_window 5, against transformers' logits (with and without the LoRA adapter)
// and, for gemma2 (window and soft-capping together), PyTorch autograd's LoRA gradients.
class FamilyWindow : public ::testing::TestWithParam<std::string> {};

TEST_P(FamilyWindow, AWindowShorterThanTheSequenceMatchesTransformers) {
  const std::string src = FamilyDir(GetParam());
  auto golden = SafetensorsFile::Open(src + "/window_golden.safetensors");
  ASSERT_TRUE(golden.ok()) << golden.status();
  auto base_golden = SafetensorsFile::Open(src + "/golden.safetensors");
  ASSERT_TRUE(base_golden.ok());
  const std::vector<int32_t> tokens = GoldenTokens(**base_golden);
  auto j = nlohmann::json::parse(*ReadFileToString(src + "/config.json"));
  j["sliding_window"] = 5;
  const std::string dir = testing::TempPath("window_" + GetParam());
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(src + "/model.safetensors", dir + "/model.safetensors", std::filesystem::copy_options::overwrite_existing);
  const std::string text = j.dump();
  ASSERT_TRUE(WriteFileAtomic(dir + "/config.json", {reinterpret_cast<const uint8_t*>(text.data()), text.size()}).ok());
  auto m = LlamaModel::Load(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  const LlamaConfig& c = (*m)->config();
  ASSERT_EQ(c.sliding_window, 5);
  for (int64_t l = 0; l < c.n_layer; ++l) EXPECT_EQ(c.Window(l), GetParam() == "mistral" || GetParam() == "phi3" || c.IsSwa(l) ? 5 : 0) << l;
  const double err = RelErr(Logits(**m, tokens, nullptr), GoldenF32(**golden, "logits"));
  EXPECT_LE(err, 1e-4);
  // Decoding token by token (the KV cache path) gives the same logits.
  {
    LlamaContext ctx(**m, 64);
    std::vector<float> all, one;
    for (int32_t t : tokens) {
      ASSERT_TRUE(ctx.Eval(std::span<const int32_t>(&t, 1), false, &one).ok());
      all.insert(all.end(), one.begin(), one.end());
    }
    EXPECT_LE(RelErr(all, GoldenF32(**golden, "logits")), 1e-4);
  }
  auto set = ImportPeft(src + "/adapter", **m);
  ASSERT_TRUE(set.ok()) << set.status();
  const double err_lora = RelErr(Logits(**m, tokens, &*set), GoldenF32(**golden, "logits_lora"));
  EXPECT_LE(err_lora, 1e-4);
  std::printf("[family] %s window 5: logits vs transformers %.2e, with LoRA %.2e\n", GetParam().c_str(), err, err_lora);
  if (GetParam() != "gemma2") return;
  Batch b;
  b.n_seq = 1;
  b.len = static_cast<int64_t>(tokens.size());
  b.tokens = tokens;
  for (size_t i = 0; i < tokens.size(); ++i) b.targets.push_back(i + 1 < tokens.size() ? tokens[i + 1] : -1);
  for (kernels::Backend* be : {&kernels::CpuReferenceBackend(), &kernels::CpuFastBackend()}) {
    set->ZeroGrad();
    Trainer<float> trainer(**m, &*set, TrainerOptions{.recompute = false, .backend = be});
    auto nll = trainer.Step(b, 1.0f, true);
    ASSERT_TRUE(nll.ok()) << nll.status();
    EXPECT_NEAR(*nll, GoldenF32(**golden, "nll_lora").at(0), 1e-5 * *nll);
    double worst = 0;
    for (const auto& [name, g] : PeftGradients(**m, ToDouble(*set))) {
      const double e = RelErr(g, GoldenF32(**golden, name + ".grad"));
      worst = std::max(worst, e);
      EXPECT_LE(e, 1e-4) << name << " on " << be->Name();
    }
    std::printf("[family] gemma2 window 5, %s: worst gradient error %.2e\n", be->Name(), worst);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, FamilyWindow, ::testing::Values("mistral", "gemma2", "gemma3", "phi3"),
                         FamilyTestName);

// Phi-3 LongRoPE (tests/oracles/gen_longrope_golden.py): the phi3 folder's weights with a
// longrope config (original context 8 of 256): transformers' logits with the long factors (12
// tokens) and the short ones (8 tokens), LoRA gradients against autograd, llama.cpp's logits on
// its converter's F32 file, and llama.cpp's Q8_0 conversion loaded by fedtune.
TEST(FamilyLongRope, Phi3LongRopeMatchesTransformersAndLlamaCpp) {
  const std::string src = FamilyDir("phi3");
  auto golden = SafetensorsFile::Open(src + "/longrope_golden.safetensors");
  ASSERT_TRUE(golden.ok()) << golden.status();
  auto base_golden = SafetensorsFile::Open(src + "/golden.safetensors");
  ASSERT_TRUE(base_golden.ok());
  const std::vector<int32_t> tokens = GoldenTokens(**base_golden);
  const std::string dir = testing::TempPath("phi3_longrope");
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(src + "/model.safetensors", dir + "/model.safetensors", std::filesystem::copy_options::overwrite_existing);
  std::filesystem::copy_file(src + "/longrope_config.json", dir + "/config.json", std::filesystem::copy_options::overwrite_existing);
  auto m = LlamaModel::Load(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  const LlamaConfig& c = (*m)->config();
  ASSERT_EQ(c.rope_long_factors.size(), 4u);
  EXPECT_EQ(c.rope_orig_ctx, 8);
  EXPECT_NEAR(c.query_scale, 1.0 + std::log(32.0) / std::log(8.0), 1e-6);  // the attention factor, squared
  const double err_long = RelErr(Logits(**m, tokens, nullptr), GoldenF32(**golden, "logits_long"));
  const std::vector<int32_t> first8(tokens.begin(), tokens.begin() + 8);
  std::vector<float> short_logits;
  {
    LlamaContext ctx(**m, 8);  // a context within the original one: the short factors
    ASSERT_TRUE(ctx.Eval(first8, true, &short_logits).ok());
  }
  const double err_short = RelErr(short_logits, GoldenF32(**golden, "logits_short"));
  const double err_llamacpp = RelErr(Logits(**m, tokens, nullptr), GoldenF32(**golden, "llamacpp_f32_long"));
  EXPECT_LE(err_long, 1e-4);
  EXPECT_LE(err_short, 1e-4);
  EXPECT_LE(err_llamacpp, 1e-4);
  auto set = ImportPeft(src + "/adapter", **m);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_LE(RelErr(Logits(**m, tokens, &*set), GoldenF32(**golden, "logits_lora_long")), 1e-4);
  Batch b;
  b.n_seq = 1;
  b.len = static_cast<int64_t>(tokens.size());
  b.tokens = tokens;
  for (size_t i = 0; i < tokens.size(); ++i) b.targets.push_back(i + 1 < tokens.size() ? tokens[i + 1] : -1);
  double worst = 0;
  for (kernels::Backend* be : {&kernels::CpuReferenceBackend(), &kernels::CpuFastBackend()}) {
    set->ZeroGrad();
    Trainer<float> trainer(**m, &*set, TrainerOptions{.recompute = true, .backend = be});
    auto nll = trainer.Step(b, 1.0f, true);
    ASSERT_TRUE(nll.ok()) << nll.status();
    EXPECT_NEAR(*nll, GoldenF32(**golden, "nll_lora_long").at(0), 1e-5 * *nll);
    for (const auto& [name, g] : PeftGradients(**m, ToDouble(*set))) {
      const double e = RelErr(g, GoldenF32(**golden, name + ".grad"));
      worst = std::max(worst, e);
      EXPECT_LE(e, 1e-4) << name << " on " << be->Name();
    }
  }
  // llama.cpp's converter: rope_factors_long/short, rope.scaling.attn_factor and
  // original_context_length, read by fedtune's GGUF loader (Q8_0: llama.cpp's own 8-bit
  // activations move its logits by a few percent, as for the other families).
  auto q8 = LlamaModel::Load(src + "/longrope.q8_0.gguf");
  ASSERT_TRUE(q8.ok()) << q8.status();
  EXPECT_EQ((*q8)->config().rope_orig_ctx, 8);
  EXPECT_NEAR((*q8)->config().query_scale, c.query_scale, 1e-5);
  const double err_q8 = RelErr(Logits(**q8, tokens, nullptr), GoldenF32(**golden, "llamacpp_q8_0_long"));
  EXPECT_LE(err_q8, 0.1);
  std::printf("[family] phi3 longrope: vs transformers long %.2e short %.2e; vs llama.cpp F32 %.2e; gradients %.2e; Q8_0 file vs llama.cpp %.2e\n",
              err_long, err_short, err_llamacpp, worst, err_q8);
}

// A copy of a tiny llama GGUF with one extra key or tensor: the loader names what it refuses.
absl::StatusOr<std::string> TinyWith(const std::string& name, const std::function<void(GgufWriter&)>& extra, const std::string& replaced_key = "") {
  const std::string base = testing::TempPath("refuse_base.gguf");
  FT_RETURN_IF_ERROR(testing::WriteTinyLlamaGguf(base, {}));
  FT_ASSIGN_OR_RETURN(auto g, GgufFile::Open(base));
  GgufWriter w;
  for (const auto& k : g->key_order())
    if (k != replaced_key) w.SetValue(k, g->metadata().at(k));
  for (const auto& t : g->tensors()) FT_RETURN_IF_ERROR(w.AddTensor(t.name, t.ne, t.type, {t.data, t.nbytes}));
  extra(w);
  const std::string path = testing::TempPath(name + ".gguf");
  FT_RETURN_IF_ERROR(w.WriteFile(path));
  return path;
}

TEST(FamilyRefusal, UnimplementedSettingsAndTensorsAreRefusedByName) {
  struct Case {
    std::string name, expect;
    std::function<void(GgufWriter&)> extra;
    std::string replaced_key;
  };
  const std::vector<Case> cases = {
      {"softcap", "llama.attn_logit_softcapping", [](GgufWriter& w) { w.SetF32("llama.attn_logit_softcapping", 50.0f); }, ""},
      {"final_softcap", "llama.final_logit_softcapping", [](GgufWriter& w) { w.SetF32("llama.final_logit_softcapping", 30.0f); }, ""},
      {"experts", "llama.expert_count", [](GgufWriter& w) { w.SetU32("llama.expert_count", 8); }, ""},
      {"yarn", "RoPE scaling 'yarn'", [](GgufWriter& w) { w.SetString("llama.rope.scaling.type", "yarn"); }, ""},
      {"extra_tensor", "tensor 'blk.0.attn_sinks.weight' is not used",
       [](GgufWriter& w) { (void)w.AddTensorF32("blk.0.attn_sinks.weight", {4}, GgmlType::kF32, std::vector<float>(4, 0.0f)); }, ""},
      {"arch", "architecture 'gemma4' is not supported", [](GgufWriter& w) { w.SetString("general.architecture", "gemma4"); }, "general.architecture"},
  };
  for (const auto& c : cases) {
    auto path = TinyWith(c.name, c.extra, c.replaced_key);
    ASSERT_TRUE(path.ok()) << path.status();
    auto m = LlamaModel::Load(*path);
    ASSERT_FALSE(m.ok()) << c.name;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented) << m.status();
    EXPECT_NE(m.status().message().find(c.expect), std::string::npos) << m.status();
  }
  // Linear RoPE scaling is implemented: every angle divided by the factor.
  auto lin = TinyWith("linear", [](GgufWriter& w) {
    w.SetString("llama.rope.scaling.type", "linear");
    w.SetF32("llama.rope.scaling.factor", 4.0f);
  });
  ASSERT_TRUE(lin.ok());
  auto m = LlamaModel::Load(*lin);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_FALSE((*m)->config().rope_freq_factors.empty());
  EXPECT_FLOAT_EQ((*m)->config().rope_freq_factors[0], 4.0f);
  // As llama.cpp: a factor without a type is linear, and so is the older rope.scale_linear.
  auto factor_only = TinyWith("factor_only", [](GgufWriter& w) { w.SetF32("llama.rope.scaling.factor", 2.0f); });
  auto old_key = TinyWith("scale_linear", [](GgufWriter& w) { w.SetF32("llama.rope.scale_linear", 3.0f); });
  ASSERT_TRUE(factor_only.ok() && old_key.ok());
  for (const auto& [file, f] : {std::pair{*factor_only, 2.0f}, std::pair{*old_key, 3.0f}}) {
    auto mm = LlamaModel::Load(file);
    ASSERT_TRUE(mm.ok()) << mm.status();
    ASSERT_FALSE((*mm)->config().rope_freq_factors.empty()) << file;
    EXPECT_FLOAT_EQ((*mm)->config().rope_freq_factors[0], f);
  }
}

// A Gemma 3 config as transformers 4.50-4.52 wrote it (gemma-3-1b-it): rope_theta,
// rope_local_base_freq, rope_scaling and sliding_window_pattern instead of layer_types and
// per-layer-type rope_parameters. Same model, same logits.
TEST(FamilyLegacyConfig, Gemma3WithSlidingWindowPatternKeys) {
  const std::string src = FamilyDir("gemma3");
  auto j = nlohmann::json::parse(*ReadFileToString(src + "/config.json"));
  j.erase("layer_types");
  j.erase("rope_parameters");
  j["rope_theta"] = 1000000.0;
  j["rope_local_base_freq"] = 10000.0;
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  j["sliding_window_pattern"] = 6;
  const std::string dir = testing::TempPath("gemma3_legacy");
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(src + "/model.safetensors", dir + "/model.safetensors", std::filesystem::copy_options::overwrite_existing);
  const std::string text = j.dump();
  ASSERT_TRUE(WriteFileAtomic(dir + "/config.json", {reinterpret_cast<const uint8_t*>(text.data()), text.size()}).ok());
  auto m = LlamaModel::Load(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->config().sliding_window, 128);
  for (int64_t l = 0; l < 6; ++l) EXPECT_EQ((*m)->config().IsSwa(l), l < 5);
  auto g = SafetensorsFile::Open(src + "/golden.safetensors");
  ASSERT_TRUE(g.ok());
  EXPECT_LE(RelErr(Logits(**m, GoldenTokens(**g), nullptr), GoldenF32(**g, "logits")), 1e-4);
}

TEST(FamilyRefusal, HfConfigSettingsTheEngineLacksAreRefused) {
  const std::string src = FamilyDir("qwen2");
  const auto cfg = nlohmann::json::parse(*ReadFileToString(src + "/config.json"));
  struct Case {
    std::string what;
    std::function<void(nlohmann::json&)> edit;
  };
  const std::vector<Case> cases = {
      {"model_type 'gemma'", [](nlohmann::json& j) { j["model_type"] = "gemma"; }},
      {"final_logit_softcapping", [](nlohmann::json& j) { j["final_logit_softcapping"] = 30.0; }},  // only Gemma 2's is implemented
      {"hidden_act 'gelu'", [](nlohmann::json& j) { j["hidden_act"] = "gelu"; }},
      {"rope_scaling type 'yarn'", [](nlohmann::json& j) { j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"rope_theta", 1e6}}; }},
      {"layer type 'chunked_attention'", [](nlohmann::json& j) { j["layer_types"] = {"full_attention", "chunked_attention"}; }},
      {"mlp_bias", [](nlohmann::json& j) { j["mlp_bias"] = true; }},
  };
  for (const auto& c : cases) {
    const std::string dir = testing::TempPath("hf_" + std::to_string(&c - cases.data()));
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(src + "/model.safetensors", dir + "/model.safetensors", std::filesystem::copy_options::overwrite_existing);
    nlohmann::json j = cfg;
    c.edit(j);
    const std::string text = j.dump();
    ASSERT_TRUE(WriteFileAtomic(dir + "/config.json", {reinterpret_cast<const uint8_t*>(text.data()), text.size()}).ok());
    auto m = LlamaModel::Load(dir);
    ASSERT_FALSE(m.ok()) << c.what;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented) << m.status();
    EXPECT_NE(m.status().message().find(c.what), std::string::npos) << m.status();
  }
}

}  // namespace
}  // namespace fedtune::model

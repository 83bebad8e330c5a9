#include "model/llama.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <optional>
#include <set>

#include "absl/strings/str_format.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "kernels/thread_pool.h"
#include "nlohmann/json.hpp"

namespace fedtune::model {
namespace {

using kernels::GgmlType;
using kernels::QMatrix;

absl::Status ExpectShape(const std::string& name, const QMatrix& m, int64_t rows, int64_t cols) {
  if (m.rows != rows || m.cols != cols) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is [", m.rows, " x ", m.cols,
                                                   "] (rows x cols), expected [", rows, " x ", cols, "]"));
  }
  return absl::OkStatus();
}

// Rows [r0, r0 + n) of a matrix, sharing its storage.
QMatrix RowSlice(const QMatrix& m, int64_t r0, int64_t n) { return {m.type, m.data + static_cast<size_t>(r0) * m.row_bytes, n, m.cols, m.row_bytes}; }

absl::StatusOr<QMatrix> GgufMatrix(const GgufFile& g, const std::string& name) {
  const GgufTensor* t = g.FindTensor(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("model has no tensor '", name, "'"));
  if (t->ne.size() != 2) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is not 2-D"));
  return t->AsMatrix();
}

absl::StatusOr<std::vector<float>> GgufVector(const GgufFile& g, const std::string& name, int64_t n) {
  const GgufTensor* t = g.FindTensor(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("model has no tensor '", name, "'"));
  if (t->n_elements() != n) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has ", t->n_elements(), " values, expected ", n));
  std::vector<float> v(static_cast<size_t>(n));
  kernels::DequantizeRow(t->type, t->data, v.data(), n);
  return v;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& path) {
  if (std::filesystem::is_directory(path)) return FromHfFolder(path);
  FT_ASSIGN_OR_RETURN(auto g, GgufFile::Open(path));
  return FromGguf(std::move(g));
}

namespace {

std::vector<uint8_t> PermuteNeoxRows(const uint8_t* src, int64_t rows, size_t row_bytes, int64_t hd) {
  std::vector<uint8_t> buf(static_cast<size_t>(rows) * row_bytes);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(buf.data() + static_cast<size_t>(r) * row_bytes, src + static_cast<size_t>(RotateHalfRow(r, hd)) * row_bytes, row_bytes);
  return buf;
}

std::vector<float> PermuteNeox(const std::vector<float>& v, int64_t hd) {
  std::vector<float> out(v.size());
  for (size_t r = 0; r < v.size(); ++r) out[r] = v[static_cast<size_t>(RotateHalfRow(static_cast<int64_t>(r), hd))];
  return out;
}

// Llama 3 RoPE scaling as transformers' _compute_llama3_parameters and llama.cpp's converter
// (rope_freqs): high frequencies kept, low ones divided by `factor`, a smooth ramp between.
std::vector<float> Llama3FreqFactors(int64_t rope_dim, double base, double factor, double low, double high, double orig_ctx) {
  std::vector<float> f(static_cast<size_t>(rope_dim / 2));
  const double low_wl = orig_ctx / low, high_wl = orig_ctx / high;
  for (int64_t i = 0; i < rope_dim / 2; ++i) {
    const double inv = std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(rope_dim));
    const double wl = 2.0 * M_PI / inv;
    double d = 1.0;
    if (wl > low_wl) {
      d = factor;
    } else if (wl >= high_wl) {
      const double smooth = (orig_ctx / wl - low) / (high - low);
      d = 1.0 / ((1.0 - smooth) / factor + smooth);
    }
    f[static_cast<size_t>(i)] = static_cast<float>(d);
  }
  return f;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromGguf(std::unique_ptr<GgufFile> gguf) {
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  const GgufFile& g = *gguf;
  LlamaConfig& c = m->cfg_;
  FT_ASSIGN_OR_RETURN(c.arch, g.GetString("general.architecture"));
  if (c.arch != "llama" && c.arch != "qwen2" && c.arch != "qwen3" && c.arch != "gemma2" && c.arch != "gemma3" && c.arch != "phi3") {
    return absl::UnimplementedError(absl::StrCat("architecture '", c.arch, "' is not supported (llama, qwen2, qwen3, gemma2, gemma3, phi3)"));
  }
  c.neox_file_layout = c.arch != "llama";  // llama.cpp runs qwen2/qwen3/gemma2/gemma3/phi3 with NeoX RoPE on unpermuted rows
  const bool gemma2 = c.arch == "gemma2";
  c.gemma = gemma2 || c.arch == "gemma3";
  c.fused = c.arch == "phi3";
  const std::string a = c.arch + ".";
  // Settings the engine does not implement: refused by name, never run approximately (Gemma 2's
  // soft-capping is implemented and read below).
  for (const char* k : {"expert_count", "attn_logit_softcapping", "final_logit_softcapping", "attention.layer_norm_epsilon",
                        "attention.clamp_kqv", "attention.q_lora_rank", "embedding_scale", "residual_scale", "logit_scale"}) {
    if (g.Find(a + k) == nullptr) continue;
    if (gemma2 && std::string(k).ends_with("softcapping")) continue;
    if (std::string(k) == "expert_count" && g.GetIntOr(a + k, 0) == 0) continue;
    return absl::UnimplementedError(absl::StrCat("model sets '", a, k, "', which this engine does not implement"));
  }
  FT_ASSIGN_OR_RETURN(c.n_embd, g.GetInt(a + "embedding_length"));
  FT_ASSIGN_OR_RETURN(c.n_layer, g.GetInt(a + "block_count"));
  FT_ASSIGN_OR_RETURN(c.n_ff, g.GetInt(a + "feed_forward_length"));
  FT_ASSIGN_OR_RETURN(c.n_head, g.GetInt(a + "attention.head_count"));
  c.n_head_kv = g.GetIntOr(a + "attention.head_count_kv", c.n_head);
  c.n_ctx_train = g.GetIntOr(a + "context_length", 2048);
  c.rope_base = static_cast<float>(g.GetFloatOr(a + "rope.freq_base", 10000.0));
  c.rms_eps = static_cast<float>(g.GetFloatOr(a + "attention.layer_norm_rms_epsilon", 1e-5));
  // Gemma 2 as llama.cpp reads it: a 4,096-token window unless the file says otherwise, caps
  // 50 (attention) and 30 (logits) unless set.
  c.sliding_window = g.GetIntOr(a + "attention.sliding_window", gemma2 ? 4096 : 0);
  if (gemma2) {
    c.attn_softcap = static_cast<float>(g.GetFloatOr(a + "attn_logit_softcapping", 50.0));
    c.final_softcap = static_cast<float>(g.GetFloatOr(a + "final_logit_softcapping", 30.0));
    if (!(c.attn_softcap >= 0.0f) || !(c.final_softcap >= 0.0f)) return absl::InvalidArgumentError(absl::StrCat(a, "*_logit_softcapping must not be negative"));
  }
  if (c.n_head <= 0 || c.n_embd <= 0) return absl::InvalidArgumentError("embedding_length and head_count must be positive");
  if (g.Find(a + "attention.key_length") != nullptr) {
    c.head_dim = g.GetIntOr(a + "attention.key_length", 0);
    if (g.GetIntOr(a + "attention.value_length", c.head_dim) != c.head_dim) {
      return absl::UnimplementedError(absl::StrCat("model sets ", a, "attention.value_length != key_length, which this engine does not implement"));
    }
  } else {
    if (c.n_embd % c.n_head != 0) return absl::InvalidArgumentError(absl::StrCat("embedding_length ", c.n_embd, " is not a multiple of head_count ", c.n_head));
    c.head_dim = c.n_embd / c.n_head;
  }
  if (c.head_dim <= 0 || c.head_dim > 1024) return absl::InvalidArgumentError(absl::StrCat("head size ", c.head_dim, " out of range"));
  if (c.gemma) {
    // As llama.cpp (models/gemma3.cpp, gemma2-iswa.cpp): embeddings x sqrt(n_embd); attention
    // scale 1/sqrt(head size) except the 27B models' 1/sqrt(n_embd / n_head) (gemma3: 62
    // layers, gemma2: 46); local layers by sliding_window_pattern (a per-layer list, or every
    // n-th layer global; default 6, gemma2: 2) with their own RoPE base (rope.freq_base_swa,
    // default 10000, gemma2: the global base). Norm weights are stored +1.
    c.embed_scale = std::sqrt(static_cast<float>(c.n_embd));
    const bool is_27b = c.n_layer == (gemma2 ? 46 : 62);
    const double attn_scale = is_27b ? 1.0 / std::sqrt(static_cast<double>(c.n_embd / c.n_head)) : 1.0 / std::sqrt(static_cast<double>(c.head_dim));
    c.query_scale = static_cast<float>(attn_scale * std::sqrt(static_cast<double>(c.head_dim)));
    c.rope_base_swa = static_cast<float>(g.GetFloatOr(a + "rope.freq_base_swa", gemma2 ? c.rope_base : 10000.0));
    if (c.sliding_window > 0) {
      c.swa_layers.assign(static_cast<size_t>(c.n_layer), 0);
      const GgufValue* pat = g.Find(a + "attention.sliding_window_pattern");
      if (pat != nullptr && pat->type == GgufType::kArray) {
        if (static_cast<int64_t>(pat->ints.size()) != c.n_layer) return absl::InvalidArgumentError(a + "attention.sliding_window_pattern needs one entry per layer");
        for (int64_t l = 0; l < c.n_layer; ++l) c.swa_layers[static_cast<size_t>(l)] = pat->ints[static_cast<size_t>(l)] != 0;
      } else {
        const int64_t def = gemma2 ? 2 : 6;
        const int64_t n = pat != nullptr ? g.GetIntOr(a + "attention.sliding_window_pattern", def) : def;
        for (int64_t l = 0; l < c.n_layer; ++l) c.swa_layers[static_cast<size_t>(l)] = n > 0 && l % n < n - 1;
      }
    }
  }
  c.rope_dim = g.GetIntOr(a + "rope.dimension_count", c.head_dim);
  if (c.n_layer <= 0 || c.n_layer > 1024 || c.n_ff <= 0) return absl::InvalidArgumentError("block_count or feed_forward_length out of range");
  if (c.neox_file_layout && c.rope_dim != c.head_dim) {
    return absl::UnimplementedError(absl::StrCat("partial rotary embedding (", c.rope_dim, " of ", c.head_dim, ") with NeoX RoPE is not implemented"));
  }
  // Linear RoPE scaling as llama.cpp reads it: rope.scaling.type "linear", or no type with a
  // rope.scaling.factor, or the older rope.scale_linear.
  const bool has_type = g.Find(a + "rope.scaling.type") != nullptr;
  std::string scaling = "none";
  if (has_type) {
    FT_ASSIGN_OR_RETURN(scaling, g.GetString(a + "rope.scaling.type"));
  }
  double factor = g.GetFloatOr(a + "rope.scaling.factor", 1.0);
  if (g.Find(a + "rope.scale_linear") != nullptr) {
    if (has_type || g.Find(a + "rope.scaling.factor") != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("model sets both ", a, "rope.scale_linear and ", a, "rope.scaling.*"));
    }
    factor = g.GetFloatOr(a + "rope.scale_linear", 1.0);
  }
  if (!has_type && factor != 1.0) scaling = "linear";
  if (scaling == "linear") {
    if (!(factor > 0.0)) return absl::InvalidArgumentError(absl::StrCat(a, "rope scaling factor must be positive"));
    c.rope_freq_factors.assign(static_cast<size_t>(c.rope_dim / 2), static_cast<float>(factor));
  } else if (scaling != "none") {
    return absl::UnimplementedError(absl::StrCat("RoPE scaling '", scaling, "' (", a, "rope.scaling.type) is not implemented (none, linear, Llama 3 rope_freqs)"));
  }

  std::set<std::string> used;
  auto matrix = [&](const std::string& name) -> absl::StatusOr<QMatrix> {
    used.insert(name);
    return GgufMatrix(g, name);
  };
  auto vector = [&](const std::string& name, int64_t n) -> absl::StatusOr<std::vector<float>> {
    used.insert(name);
    return GgufVector(g, name, n);
  };
  auto optional_vector = [&](const std::string& name, int64_t n, std::vector<float>* out) -> absl::Status {
    if (g.FindTensor(name) == nullptr) return absl::OkStatus();
    FT_ASSIGN_OR_RETURN(*out, vector(name, n));
    return absl::OkStatus();
  };
  if (g.FindTensor("rope_freqs.weight") != nullptr) {
    if (!c.rope_freq_factors.empty()) return absl::InvalidArgumentError("model has both rope_freqs.weight and linear RoPE scaling");
    FT_ASSIGN_OR_RETURN(c.rope_freq_factors, vector("rope_freqs.weight", c.rope_dim / 2));
  }
  // LongRoPE as llama.cpp's converter writes it (Phi-3): short and long factors, the original
  // context they switch at, and the attention factor. llama.cpp scales cos and sin by
  // rope.scaling.attn_factor (any architecture): q.k scales by its square, here in query_scale.
  if (g.FindTensor("rope_factors_long.weight") != nullptr || g.FindTensor("rope_factors_short.weight") != nullptr) {
    if (!c.rope_freq_factors.empty()) return absl::InvalidArgumentError("model has LongRoPE factors and another RoPE scaling");
    FT_ASSIGN_OR_RETURN(c.rope_freq_factors, vector("rope_factors_short.weight", c.rope_dim / 2));
    FT_ASSIGN_OR_RETURN(c.rope_long_factors, vector("rope_factors_long.weight", c.rope_dim / 2));
    c.rope_orig_ctx = g.GetIntOr(a + "rope.scaling.original_context_length", 0);
    if (c.rope_orig_ctx <= 0) return absl::InvalidArgumentError(absl::StrCat("LongRoPE factors need ", a, "rope.scaling.original_context_length"));
  }
  const double attn_factor = g.GetFloatOr(a + "rope.scaling.attn_factor", 1.0);
  if (!(attn_factor > 0.0)) return absl::InvalidArgumentError(absl::StrCat(a, "rope.scaling.attn_factor must be positive"));
  c.query_scale *= static_cast<float>(attn_factor * attn_factor);
  FT_ASSIGN_OR_RETURN(m->token_embd_, matrix("token_embd.weight"));
  c.n_vocab = m->token_embd_.rows;
  if (g.FindTensor("output.weight") != nullptr) {
    FT_ASSIGN_OR_RETURN(m->output_, matrix("output.weight"));
  } else {
    m->output_ = m->token_embd_;
    c.tied_output = true;
  }
  FT_ASSIGN_OR_RETURN(m->output_norm_, vector("output_norm.weight", c.n_embd));
  const int64_t kv = c.n_head_kv * c.head_dim;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string p = absl::StrCat("blk.", l, ".");
    LlamaLayer L;
    FT_ASSIGN_OR_RETURN(L.attn_norm, vector(p + "attn_norm.weight", c.n_embd));
    FT_ASSIGN_OR_RETURN(L.ffn_norm, vector(p + "ffn_norm.weight", c.n_embd));
    if (c.fused) {  // phi3: attn_qkv = [q; k; v], ffn_up = [gate; up]
      FT_ASSIGN_OR_RETURN(QMatrix qkv, matrix(p + "attn_qkv.weight"));
      FT_RETURN_IF_ERROR(ExpectShape(p + "attn_qkv.weight", qkv, c.q_dim() + 2 * kv, c.n_embd));
      L.wq = RowSlice(qkv, 0, c.q_dim());
      L.wk = RowSlice(qkv, c.q_dim(), kv);
      L.wv = RowSlice(qkv, c.q_dim() + kv, kv);
      FT_ASSIGN_OR_RETURN(QMatrix gate_up, matrix(p + "ffn_up.weight"));
      FT_RETURN_IF_ERROR(ExpectShape(p + "ffn_up.weight", gate_up, 2 * c.n_ff, c.n_embd));
      L.w_gate = RowSlice(gate_up, 0, c.n_ff);
      L.w_up = RowSlice(gate_up, c.n_ff, c.n_ff);
    } else {
      FT_ASSIGN_OR_RETURN(L.wq, matrix(p + "attn_q.weight"));
      FT_ASSIGN_OR_RETURN(L.wk, matrix(p + "attn_k.weight"));
      FT_ASSIGN_OR_RETURN(L.wv, matrix(p + "attn_v.weight"));
      FT_ASSIGN_OR_RETURN(L.w_gate, matrix(p + "ffn_gate.weight"));
      FT_ASSIGN_OR_RETURN(L.w_up, matrix(p + "ffn_up.weight"));
    }
    FT_ASSIGN_OR_RETURN(L.wo, matrix(p + "attn_output.weight"));
    FT_ASSIGN_OR_RETURN(L.w_down, matrix(p + "ffn_down.weight"));
    FT_RETURN_IF_ERROR(optional_vector(p + "attn_q.bias", c.q_dim(), &L.bq));
    FT_RETURN_IF_ERROR(optional_vector(p + "attn_k.bias", kv, &L.bk));
    FT_RETURN_IF_ERROR(optional_vector(p + "attn_v.bias", kv, &L.bv));
    FT_RETURN_IF_ERROR(optional_vector(p + "attn_output.bias", c.n_embd, &L.bo));
    FT_RETURN_IF_ERROR(optional_vector(p + "attn_q_norm.weight", c.head_dim, &L.q_norm));
    FT_RETURN_IF_ERROR(optional_vector(p + "attn_k_norm.weight", c.head_dim, &L.k_norm));
    if (c.gemma) {
      FT_ASSIGN_OR_RETURN(L.post_attn_norm, vector(p + "post_attention_norm.weight", c.n_embd));
      FT_ASSIGN_OR_RETURN(L.post_ffn_norm, vector(p + "post_ffw_norm.weight", c.n_embd));
    }
    if (L.q_norm.empty() != L.k_norm.empty() || (l > 0 && c.qk_norm == L.q_norm.empty())) {
      return absl::InvalidArgumentError(absl::StrCat(p, "attn_q_norm/attn_k_norm: every layer needs both or none"));
    }
    c.qk_norm = !L.q_norm.empty();
    m->layers_.push_back(std::move(L));
  }
  for (const auto& t : g.tensors()) {
    if (!used.contains(t.name)) {
      return absl::UnimplementedError(absl::StrCat("tensor '", t.name, "' is not used by this engine (architecture ", c.arch, "): refusing to run the model without it"));
    }
    c.n_params += t.n_elements();
  }
  auto tok = Tokenizer::FromGguf(g);
  if (tok.ok()) {
    m->tokenizer_ = std::move(tok).value();
  } else if (!absl::IsNotFound(tok.status())) {
    return tok.status();
  }
  m->gguf_ = std::move(gguf);
  FT_RETURN_IF_ERROR(m->Validate());
  if (c.neox_file_layout) m->PermuteFromNeox();
  return m;
}

void LlamaModel::PermuteFromNeox() {
  const int64_t hd = cfg_.head_dim;
  for (auto& L : layers_) {
    for (QMatrix* w : {&L.wq, &L.wk}) {
      owned_.push_back(PermuteNeoxRows(w->data, w->rows, w->row_bytes, hd));
      w->data = owned_.back().data();
    }
    for (auto* v : {&L.bq, &L.bk, &L.q_norm, &L.k_norm}) {
      if (!v->empty()) *v = PermuteNeox(*v, hd);
    }
  }
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromHfFolder(const std::string& dir) {
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  FT_ASSIGN_OR_RETURN(std::string cfg_text, ReadFileToString(dir + "/config.json"));
  const nlohmann::json j = nlohmann::json::parse(cfg_text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(dir, "/config.json is not a JSON object"));
  LlamaConfig& c = m->cfg_;
  auto bad = [&](const std::string& why) { return absl::InvalidArgumentError(absl::StrCat(dir, "/config.json: ", why)); };
  auto unimplemented = [&](const std::string& what) {
    return absl::UnimplementedError(absl::StrCat(dir, "/config.json: ", what, " is not implemented by this engine"));
  };
  auto get_int = [&](const char* k, int64_t* out, std::optional<int64_t> def) -> absl::Status {
    if (!j.contains(k) || (j[k].is_null() && def)) {
      if (def) { *out = *def; return absl::OkStatus(); }
      return bad(absl::StrCat("missing '", k, "'"));
    }
    if (!j[k].is_number_integer()) return bad(absl::StrCat("'", k, "' is not an integer"));
    *out = j[k].get<int64_t>();
    return absl::OkStatus();
  };
  auto flag = [&](const char* k) { return j.contains(k) && j[k].is_boolean() && j[k].get<bool>(); };
  const std::string type = j.value("model_type", std::string("llama"));
  if (type != "llama" && type != "mistral" && type != "qwen2" && type != "qwen3" && type != "gemma2" && type != "gemma3_text" && type != "phi3") {
    return absl::UnimplementedError(absl::StrCat(dir, "/config.json: model_type '", type, "' is not supported (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3)"));
  }
  c.fused = type == "phi3";
  const bool gemma2 = type == "gemma2";
  const bool gemma = gemma2 || type == "gemma3_text";
  // llama.cpp's names: Mistral runs as llama, Gemma 3 (text) as gemma3.
  c.arch = type == "mistral" ? "llama" : type == "gemma3_text" ? "gemma3" : type;
  c.gemma = gemma;
  c.neox_file_layout = true;                   // Hugging Face stores q/k rows in rotate_half order
  FT_RETURN_IF_ERROR(get_int("hidden_size", &c.n_embd, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("num_hidden_layers", &c.n_layer, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("num_attention_heads", &c.n_head, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("num_key_value_heads", &c.n_head_kv, c.n_head));
  FT_RETURN_IF_ERROR(get_int("intermediate_size", &c.n_ff, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("vocab_size", &c.n_vocab, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("max_position_embeddings", &c.n_ctx_train, 2048));
  if (c.n_head <= 0 || c.n_embd <= 0 || c.n_layer <= 0 || c.n_layer > 1024) return bad("hidden_size, num_attention_heads and num_hidden_layers must be positive");
  if (!j.contains("head_dim") && c.n_embd % c.n_head != 0) return bad("hidden_size is not a multiple of num_attention_heads");
  FT_RETURN_IF_ERROR(get_int("head_dim", &c.head_dim, c.n_embd / c.n_head));
  if (c.head_dim <= 0 || c.head_dim > 1024 || c.head_dim % 2 != 0) return bad(absl::StrCat("head_dim ", c.head_dim, " out of range"));
  c.rope_dim = c.head_dim;
  // RoPE settings: transformers >= 5 writes "rope_parameters" (theta included); checkpoints from
  // 4.x have "rope_theta" and "rope_scaling".
  const nlohmann::json* rope = nullptr;
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    rope = &j["rope_parameters"];
    // Per layer type (Gemma 3): the global layers' settings here, the local layers' base below.
    if (rope->is_object() && rope->contains("full_attention")) {
      if (rope->contains("sliding_attention") && (*rope)["sliding_attention"].is_object()) {
        c.rope_base_swa = (*rope)["sliding_attention"].value("rope_theta", 10000.0f);
        if ((*rope)["sliding_attention"].value("rope_type", std::string("default")) != "default") return unimplemented("RoPE scaling on local layers");
      }
      rope = &(*rope)["full_attention"];
    }
  } else if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    rope = &j["rope_scaling"];
  }
  if (gemma && j.contains("rope_local_base_freq") && j["rope_local_base_freq"].is_number()) c.rope_base_swa = j["rope_local_base_freq"].get<float>();
  if (rope != nullptr && !rope->is_object()) return bad("rope_parameters / rope_scaling is not an object");
  c.rope_base = j.value("rope_theta", 10000.0f);
  if (rope != nullptr && rope->contains("rope_theta") && (*rope)["rope_theta"].is_number()) c.rope_base = (*rope)["rope_theta"].get<float>();
  c.rms_eps = j.value("rms_norm_eps", 1e-5f);
  const std::string act = j.contains("hidden_activation") && j["hidden_activation"].is_string() ? j["hidden_activation"].get<std::string>()
                                                                                                : j.value("hidden_act", std::string(gemma ? "gelu_pytorch_tanh" : "silu"));
  if (act != (gemma ? "gelu_pytorch_tanh" : "silu")) return unimplemented(absl::StrCat("hidden_act '", act, "'"));
  for (const char* k : {"final_logit_softcapping", "attn_logit_softcapping"}) {
    if (!j.contains(k) || j[k].is_null()) continue;
    if (!gemma2) return unimplemented(k);
    if (!j[k].is_number() || !(j[k].get<double>() >= 0.0)) return bad(absl::StrCat("'", k, "' must be a non-negative number"));
    (std::string(k) == "final_logit_softcapping" ? c.final_softcap : c.attn_softcap) = j[k].get<float>();
  }
  if (flag("mlp_bias")) return unimplemented("mlp_bias");
  if (j.contains("partial_rotary_factor") && j["partial_rotary_factor"].is_number() && j["partial_rotary_factor"].get<double>() != 1.0) {
    return unimplemented("partial_rotary_factor");
  }
  if (j.contains("num_experts") && j["num_experts"].is_number_integer() && j["num_experts"].get<int64_t>() > 0) return unimplemented("num_experts (mixture of experts)");
  // Sliding windows: Mistral applies `sliding_window` when set; Qwen2/3 only with use_sliding_window.
  bool windowed_layers = false;  // transformers >= 5 lists each layer's attention kind
  if (j.contains("layer_types") && j["layer_types"].is_array()) {
    for (const auto& t : j["layer_types"]) {
      const std::string lt = t.is_string() ? t.get<std::string>() : "";
      if (lt == "sliding_attention") {
        windowed_layers = true;
      } else if (lt != "full_attention") {
        return unimplemented(absl::StrCat("layer type '", lt, "'"));
      }
    }
  }
  if (j.contains("sliding_window") && j["sliding_window"].is_number_integer() &&
      (type == "mistral" || type == "llama" || type == "phi3" || flag("use_sliding_window") || windowed_layers)) {
    c.sliding_window = j["sliding_window"].get<int64_t>();
  }
  // Which layers the window applies to: layer_types where given; transformers 4.x Qwen2/3 with
  // use_sliding_window: the layers from max_window_layers on; otherwise (Mistral, Phi-3) all.
  if (windowed_layers) {
    for (const auto& t : j["layer_types"]) c.swa_layers.push_back(t.get<std::string>() == "sliding_attention");
    if (static_cast<int64_t>(c.swa_layers.size()) != c.n_layer) return bad("layer_types needs one entry per layer");
  } else if (c.sliding_window > 0 && (type == "qwen2" || type == "qwen3") && !j.contains("layer_types")) {
    int64_t first = 0;
    FT_RETURN_IF_ERROR(get_int("max_window_layers", &first, 28));  // transformers' default
    for (int64_t l = 0; l < c.n_layer; ++l) c.swa_layers.push_back(l >= first);
  }
  if (gemma) {
    c.embed_scale = std::sqrt(static_cast<float>(c.n_embd));
    const double qpas = j.value("query_pre_attn_scalar", static_cast<double>(c.head_dim));
    if (!(qpas > 0)) return bad("query_pre_attn_scalar must be positive");
    c.query_scale = static_cast<float>(std::sqrt(static_cast<double>(c.head_dim) / qpas));
    if (!j.contains("layer_types")) {
      // transformers 4.50-4.52 configs (gemma-3-1b-it): sliding_window_pattern, every n-th layer
      // global; transformers 4.x Gemma 2 configs have neither key: every second layer global.
      const int64_t n = j.value("sliding_window_pattern", int64_t{gemma2 ? 2 : 6});
      if (n <= 0) return bad("sliding_window_pattern must be positive");
      for (int64_t l = 0; l < c.n_layer; ++l) c.swa_layers.push_back((l + 1) % n != 0);
      if (n > 1 && j.contains("sliding_window") && j["sliding_window"].is_number_integer()) c.sliding_window = j["sliding_window"].get<int64_t>();
    }
    if (gemma2) c.rope_base_swa = c.rope_base;  // one RoPE base for both kinds of layer
  }
  if (rope != nullptr) {
    const auto& rs = *rope;
    const std::string rt = rs.value("rope_type", rs.value("type", std::string("default")));
    const double factor = rs.value("factor", 1.0);
    if (rt == "llama3") {
      if (!(factor > 0) || !rs.contains("low_freq_factor") || !rs.contains("high_freq_factor") || !rs.contains("original_max_position_embeddings")) {
        return bad("rope_scaling llama3 needs factor, low_freq_factor, high_freq_factor, original_max_position_embeddings");
      }
      c.rope_freq_factors = Llama3FreqFactors(c.rope_dim, c.rope_base, factor, rs["low_freq_factor"].get<double>(), rs["high_freq_factor"].get<double>(),
                                              rs["original_max_position_embeddings"].get<double>());
    } else if (rt == "linear") {
      if (!(factor > 0)) return bad("rope_scaling factor must be positive");
      c.rope_freq_factors.assign(static_cast<size_t>(c.rope_dim / 2), static_cast<float>(factor));
    } else if (rt == "longrope" || rt == "su") {
      // As transformers (_compute_longrope_parameters): short factors up to
      // original_max_position_embeddings, long ones beyond; the attention factor
      // sqrt(1 + ln(s) / ln(orig)) with s = max_position_embeddings / orig unless given, which
      // scales cos and sin (q.k by its square: query_scale).
      auto factors = [&](const char* k, std::vector<float>* out) -> absl::Status {
        if (!rs.contains(k) || !rs[k].is_array() || static_cast<int64_t>(rs[k].size()) != c.rope_dim / 2) {
          return bad(absl::StrCat("rope_scaling longrope needs '", k, "' with ", c.rope_dim / 2, " numbers"));
        }
        for (const auto& v : rs[k]) {
          if (!v.is_number()) return bad(absl::StrCat("rope_scaling '", k, "' holds a non-number"));
          out->push_back(v.get<float>());
        }
        return absl::OkStatus();
      };
      FT_RETURN_IF_ERROR(factors("short_factor", &c.rope_freq_factors));
      FT_RETURN_IF_ERROR(factors("long_factor", &c.rope_long_factors));
      const nlohmann::json* orig = rs.contains("original_max_position_embeddings") ? &rs["original_max_position_embeddings"]
                                   : j.contains("original_max_position_embeddings") ? &j["original_max_position_embeddings"] : nullptr;
      double scale = factor;
      if (orig != nullptr && orig->is_number()) {
        c.rope_orig_ctx = static_cast<int64_t>(orig->get<double>());
        if (c.rope_orig_ctx > 0) scale = static_cast<double>(c.n_ctx_train) / static_cast<double>(c.rope_orig_ctx);
      } else {
        c.rope_orig_ctx = c.n_ctx_train;
      }
      if (c.rope_orig_ctx <= 1) return bad("rope_scaling longrope needs original_max_position_embeddings > 1");
      double attn = scale <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(scale) / std::log(static_cast<double>(c.rope_orig_ctx)));
      if (rs.contains("attention_factor") && rs["attention_factor"].is_number()) attn = rs["attention_factor"].get<double>();
      if (!(attn > 0.0)) return bad("rope_scaling attention_factor must be positive");
      c.query_scale *= static_cast<float>(attn * attn);
    } else if (rt != "default") {
      return unimplemented(absl::StrCat("rope_scaling type '", rt, "'"));
    }
  }
  FT_ASSIGN_OR_RETURN(m->safetensors_, SafetensorsFile::Open(dir + "/model.safetensors"));
  const SafetensorsFile& st = *m->safetensors_;
  std::set<std::string> used;

  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) -> absl::StatusOr<QMatrix> {
    used.insert(name);
    const SafeTensor* t = st.Find(name);
    if (t == nullptr) return absl::NotFoundError(absl::StrCat("safetensors has no tensor '", name, "'"));
    if (t->shape.size() != 2 || t->shape[0] != rows || t->shape[1] != cols) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has shape ", ShapeString(t->shape), ", expected [", rows, ", ", cols, "]"));
    }
    QMatrix q;
    switch (t->dtype) {
      case DType::kF32: q.type = GgmlType::kF32; break;
      case DType::kF16: q.type = GgmlType::kF16; break;
      case DType::kBF16: q.type = GgmlType::kBF16; break;
      default: return absl::UnimplementedError(absl::StrCat("tensor '", name, "' dtype ", DTypeName(t->dtype), " is not supported"));
    }
    q.rows = rows;
    q.cols = cols;
    q.row_bytes = t->nbytes / static_cast<size_t>(rows);
    q.data = t->data;
    return q;
  };
  auto vec = [&](const std::string& name, int64_t n) -> absl::StatusOr<std::vector<float>> {
    used.insert(name);
    FT_ASSIGN_OR_RETURN(Tensor t, st.ToF32(name));
    if (t.size() != n) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has ", t.size(), " values, expected ", n));
    return std::vector<float>(t.data<float>(), t.data<float>() + t.size());
  };
  auto optional_vec = [&](const std::string& name, int64_t n, std::vector<float>* out) -> absl::Status {
    if (st.Find(name) == nullptr) return absl::OkStatus();
    FT_ASSIGN_OR_RETURN(*out, vec(name, n));
    return absl::OkStatus();
  };
  FT_ASSIGN_OR_RETURN(m->token_embd_, matrix("model.embed_tokens.weight", c.n_vocab, c.n_embd));
  if (st.Find("lm_head.weight") != nullptr) {
    FT_ASSIGN_OR_RETURN(m->output_, matrix("lm_head.weight", c.n_vocab, c.n_embd));
  } else {
    if (j.contains("tie_word_embeddings") && j["tie_word_embeddings"].is_boolean() && !j["tie_word_embeddings"].get<bool>()) {
      return bad("tie_word_embeddings is false but model.safetensors has no lm_head.weight");
    }
    m->output_ = m->token_embd_;
    c.tied_output = true;
  }
  // Gemma's RMSNorm multiplies by (1 + weight).
  auto norm = [&](const std::string& name, int64_t n) -> absl::StatusOr<std::vector<float>> {
    FT_ASSIGN_OR_RETURN(std::vector<float> v, vec(name, n));
    if (gemma)
      for (float& x : v) x += 1.0f;
    return v;
  };
  FT_ASSIGN_OR_RETURN(m->output_norm_, norm("model.norm.weight", c.n_embd));
  const int64_t kv = c.n_head_kv * c.head_dim, nq = c.q_dim();
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LlamaLayer L;
    FT_ASSIGN_OR_RETURN(L.attn_norm, norm(p + "input_layernorm.weight", c.n_embd));
    if (gemma) {  // norms around both blocks: post_attention_layernorm is the attention output's
      FT_ASSIGN_OR_RETURN(L.post_attn_norm, norm(p + "post_attention_layernorm.weight", c.n_embd));
      FT_ASSIGN_OR_RETURN(L.ffn_norm, norm(p + "pre_feedforward_layernorm.weight", c.n_embd));
      FT_ASSIGN_OR_RETURN(L.post_ffn_norm, norm(p + "post_feedforward_layernorm.weight", c.n_embd));
    } else {
      FT_ASSIGN_OR_RETURN(L.ffn_norm, vec(p + "post_attention_layernorm.weight", c.n_embd));
    }
    if (c.fused) {  // phi3: qkv_proj = [q; k; v], gate_up_proj = [gate; up]
      FT_ASSIGN_OR_RETURN(QMatrix qkv, matrix(p + "self_attn.qkv_proj.weight", nq + 2 * kv, c.n_embd));
      L.wq = RowSlice(qkv, 0, nq);
      L.wk = RowSlice(qkv, nq, kv);
      L.wv = RowSlice(qkv, nq + kv, kv);
      FT_ASSIGN_OR_RETURN(QMatrix gate_up, matrix(p + "mlp.gate_up_proj.weight", 2 * c.n_ff, c.n_embd));
      L.w_gate = RowSlice(gate_up, 0, c.n_ff);
      L.w_up = RowSlice(gate_up, c.n_ff, c.n_ff);
    } else {
      FT_ASSIGN_OR_RETURN(L.wq, matrix(p + "self_attn.q_proj.weight", nq, c.n_embd));
      FT_ASSIGN_OR_RETURN(L.wk, matrix(p + "self_attn.k_proj.weight", kv, c.n_embd));
      FT_ASSIGN_OR_RETURN(L.wv, matrix(p + "self_attn.v_proj.weight", kv, c.n_embd));
      FT_ASSIGN_OR_RETURN(L.w_gate, matrix(p + "mlp.gate_proj.weight", c.n_ff, c.n_embd));
      FT_ASSIGN_OR_RETURN(L.w_up, matrix(p + "mlp.up_proj.weight", c.n_ff, c.n_embd));
    }
    FT_ASSIGN_OR_RETURN(L.wo, matrix(p + "self_attn.o_proj.weight", c.n_embd, nq));
    FT_ASSIGN_OR_RETURN(L.w_down, matrix(p + "mlp.down_proj.weight", c.n_embd, c.n_ff));
    FT_RETURN_IF_ERROR(optional_vec(p + "self_attn.q_proj.bias", nq, &L.bq));
    FT_RETURN_IF_ERROR(optional_vec(p + "self_attn.k_proj.bias", kv, &L.bk));
    FT_RETURN_IF_ERROR(optional_vec(p + "self_attn.v_proj.bias", kv, &L.bv));
    FT_RETURN_IF_ERROR(optional_vec(p + "self_attn.o_proj.bias", c.n_embd, &L.bo));
    if (type == "qwen3" || type == "gemma3_text") {
      FT_ASSIGN_OR_RETURN(L.q_norm, norm(p + "self_attn.q_norm.weight", c.head_dim));
      FT_ASSIGN_OR_RETURN(L.k_norm, norm(p + "self_attn.k_norm.weight", c.head_dim));
      c.qk_norm = true;
    }
    m->layers_.push_back(std::move(L));
  }
  for (const auto& t : st.tensors()) {
    if (!used.contains(t.name)) {
      return absl::UnimplementedError(absl::StrCat("tensor '", t.name, "' is not used by this engine (model_type ", type, "): refusing to run the model without it"));
    }
    c.n_params += NumElements(t.shape);
  }
  FT_RETURN_IF_ERROR(m->Validate());
  m->PermuteFromNeox();
  return m;
}

absl::Status LlamaModel::Validate() const {
  const LlamaConfig& c = cfg_;
  if (c.n_head_kv <= 0 || c.n_head % c.n_head_kv != 0) {
    return absl::InvalidArgumentError(absl::StrCat("head_count ", c.n_head, " is not a multiple of head_count_kv ", c.n_head_kv));
  }
  if (c.rope_dim <= 0 || c.rope_dim > c.head_dim || c.rope_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("rope dimension ", c.rope_dim, " is invalid for head size ", c.head_dim));
  }
  if (c.n_vocab <= 0) return absl::InvalidArgumentError("empty vocabulary");
  FT_RETURN_IF_ERROR(ExpectShape("token_embd.weight", token_embd_, c.n_vocab, c.n_embd));
  FT_RETURN_IF_ERROR(ExpectShape("output.weight", output_, c.n_vocab, c.n_embd));
  for (const auto* factors : {&c.rope_freq_factors, &c.rope_long_factors}) {
    if (factors->empty()) continue;
    if (static_cast<int64_t>(factors->size()) != c.rope_dim / 2) return absl::InvalidArgumentError("rope frequency factors: one per rotated pair expected");
    for (float f : *factors) {
      if (!(f > 0.0f) || !std::isfinite(f)) return absl::InvalidArgumentError("rope frequency factors must be positive and finite");
    }
  }
  if (!c.rope_long_factors.empty() && c.rope_freq_factors.empty()) return absl::InvalidArgumentError("LongRoPE needs its short factors too");
  if (c.sliding_window < 0) return absl::InvalidArgumentError("negative sliding window");
  const int64_t kv = c.n_head_kv * c.head_dim, nq = c.q_dim();
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const auto& L = layers_[static_cast<size_t>(l)];
    const std::string p = absl::StrCat("blk.", l, ".");
    FT_RETURN_IF_ERROR(ExpectShape(p + "attn_q.weight", L.wq, nq, c.n_embd));
    FT_RETURN_IF_ERROR(ExpectShape(p + "attn_k.weight", L.wk, kv, c.n_embd));
    FT_RETURN_IF_ERROR(ExpectShape(p + "attn_v.weight", L.wv, kv, c.n_embd));
    FT_RETURN_IF_ERROR(ExpectShape(p + "attn_output.weight", L.wo, c.n_embd, nq));
    FT_RETURN_IF_ERROR(ExpectShape(p + "ffn_gate.weight", L.w_gate, c.n_ff, c.n_embd));
    FT_RETURN_IF_ERROR(ExpectShape(p + "ffn_up.weight", L.w_up, c.n_ff, c.n_embd));
    FT_RETURN_IF_ERROR(ExpectShape(p + "ffn_down.weight", L.w_down, c.n_embd, c.n_ff));
  }
  if (tokenizer_ && tokenizer_->vocab_size() != c.n_vocab) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer has ", tokenizer_->vocab_size(), " tokens but the embedding has ", c.n_vocab, " rows"));
  }
  return absl::OkStatus();
}

size_t LlamaModel::ProjectionBytes() const {
  size_t n = 0;
  for (const auto& L : layers_)
    for (const auto* w : L.Projections()) n += w->row_bytes * static_cast<size_t>(w->rows);
  return n;
}

// Replaces a projection's storage by `bytes` (rows of rb bytes of `type`). The original rows
// live in the read-only file mapping and were just paged in: drop those pages from this
// process's memory (they would be read from the file again if touched), so a re-quantized base
// costs its new size, not both.
void LlamaModel::ReplaceMatrix(kernels::QMatrix* w, kernels::GgmlType type, std::vector<uint8_t> bytes, size_t rb) {
  owned_.push_back(std::move(bytes));
  ReplaceMatrixData(w, type, owned_.back().data(), rb);
}

void LlamaModel::ReplaceMatrixData(kernels::QMatrix* w, kernels::GgmlType type, const uint8_t* data, size_t rb) {
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<uintptr_t>(w->data) + page - 1) / page * page;
  const auto end = (reinterpret_cast<uintptr_t>(w->data) + w->row_bytes * static_cast<size_t>(w->rows)) / page * page;
  const bool in_mapping = gguf_ && w->data >= gguf_->mapped_bytes().data() &&
                          w->data + w->row_bytes * static_cast<size_t>(w->rows) <= gguf_->mapped_bytes().data() + gguf_->mapped_bytes().size();
  if (in_mapping && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
  *w = {type, data, w->rows, w->cols, rb};
}

void LlamaModel::ReleaseMappedPages() const {
  if (!gguf_ || !gguf_->file_mapped()) return;  // a heap copy would read back as zeros
  const std::span<const uint8_t> m = gguf_->mapped_bytes();
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<uintptr_t>(m.data()) + page - 1) / page * page;
  const auto end = (reinterpret_cast<uintptr_t>(m.data()) + m.size()) / page * page;
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

absl::StatusOr<size_t> LlamaModel::Requantize(kernels::GgmlType target) {
  const auto tr = kernels::GetTypeTraits(static_cast<uint32_t>(target));
  if (!tr || !tr->supported) return absl::InvalidArgumentError("unknown target type");
  std::vector<float> row;
  for (auto& L : layers_) {
    for (auto* w : L.Projections()) {
      const kernels::GgmlType type = kernels::RowCompatibleType(target, w->cols);
      if (w->type == type) continue;
      FT_ASSIGN_OR_RETURN(size_t rb, kernels::RowBytes(type, w->cols));
      std::vector<uint8_t> buf(rb * static_cast<size_t>(w->rows));
      row.resize(static_cast<size_t>(w->cols));
      for (int64_t r = 0; r < w->rows; ++r) {
        kernels::DequantizeRow(w->type, w->row(r), row.data(), w->cols);
        FT_RETURN_IF_ERROR(kernels::QuantizeRow(type, row.data(), buf.data() + static_cast<size_t>(r) * rb, w->cols));
      }
      ReplaceMatrix(w, type, std::move(buf), rb);
    }
  }
  return ProjectionBytes();
}

std::string LlamaModel::CompensationReport::Summary() const {
  double rb = 0, ra = 0, ab = 0, aa = 0;
  for (const auto& e : modules) {
    rb += e.rel_before;
    ra += e.rel_after;
    ab += e.act_before;
    aa += e.act_after;
  }
  const double n = static_cast<double>(std::max<size_t>(1, modules.size()));
  std::string s = absl::StrFormat("%.1f MiB + %.1f MiB correction (%.1f s); mean relative weight error %.4f -> %.4f",
                                  static_cast<double>(projection_bytes) / (1 << 20), static_cast<double>(correction_bytes) / (1 << 20), seconds,
                                  rb / n, ra / n);
  if (!modules.empty() && modules[0].act_before >= 0) absl::StrAppendFormat(&s, ", on the calibration inputs %.4f -> %.4f", ab / n, aa / n);
  if (cache_hit) absl::StrAppendFormat(&s, "; read from the cache %s in %.1f s", cache_path, load_seconds);
  return s;
}

size_t LlamaModel::CorrectionBytes() const {
  size_t n = 0;
  for (const auto& L : layers_)
    for (const auto& c : L.corr)
      if (c.present()) n += (c.u.row_bytes * static_cast<size_t>(c.u.rows)) + (c.v.row_bytes * static_cast<size_t>(c.v.rows));
  return n;
}

// The compensation cache. Computing a compensated base takes minutes (SmolLM2-135M at Q3_K with
// cloq: ~2 min on 2 cores) and a worker restarted by its service manager would otherwise pay
// it again for the same result; the result depends only on the model file, the target, the
// options and the calibration tokens, which make the key. The file is GGUF (our reader and
// writer, mapped on load, 32-byte aligned tensors): per layer and projection
// "blk.L.<attn_q...>.weight" in its re-quantized type and, with a correction, ".corr_u" /
// ".corr_v" (F16), with the key and the report's figures as metadata. The model file is
// identified by its canonical path, size and modification time (as build caches do: hashing a
// many-GiB model on every start would cost more than it saves); kCompensationCacheVersion is
// bumped whenever the computation changes what it produces.
namespace {
constexpr int kCompensationCacheVersion = 1;
constexpr int kCompensationCacheFiles = 4;

uint64_t Fnv1a(std::string_view bytes, uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}
}  // namespace

absl::StatusOr<LlamaModel::CompensationReport> LlamaModel::RequantizeCompensated(kernels::GgmlType target, const CompensationOptions& o,
                                                                                 std::span<const int32_t> calibration, const std::string& cache_dir) {
  namespace fs = std::filesystem;
  if (cache_dir.empty() || !gguf_) return ComputeCompensated(target, o, calibration);
  std::error_code ec;
  const fs::path src = fs::canonical(gguf_->path(), ec);
  const auto size = ec ? 0 : fs::file_size(src, ec);
  const auto mtime = ec ? fs::file_time_type{} : fs::last_write_time(src, ec);
  if (ec) {
    FT_LOG_WARN("compensation cache: cannot identify the model file {} ({}); not cached", gguf_->path(), ec.message());
    return ComputeCompensated(target, o, calibration);
  }
  const uint64_t calib_hash = Fnv1a(std::string_view(reinterpret_cast<const char*>(calibration.data()), calibration.size() * sizeof(int32_t)));
  const std::string key = absl::StrFormat("v%d|%s|%d|%d|%s|%s|r%d|i%d|d%.17g|c%d:%016x", kCompensationCacheVersion, src.string(), size,
                                          static_cast<int64_t>(mtime.time_since_epoch().count()), kernels::TypeTraits(target).name,
                                          CompensationMethodName(o.method), HasCorrection(o.method) ? o.rank : 0,
                                          o.method == CompensationMethod::kLoftQ ? o.iterations : 0, NeedsCalibration(o.method) ? o.damping : 0.0,
                                          NeedsCalibration(o.method) ? calibration.size() : 0, NeedsCalibration(o.method) ? calib_hash : 0);
  const fs::path file = fs::path(cache_dir) / absl::StrFormat("compensated-%s-%s-%016x.gguf", kernels::TypeTraits(target).name,
                                                              CompensationMethodName(o.method), Fnv1a(key));
  if (fs::exists(file, ec)) {
    const auto t0 = std::chrono::steady_clock::now();
    auto hit = LoadCompensated(file.string(), key, target);
    if (hit.ok()) {
      hit->cache_path = file.string();
      hit->cache_hit = true;
      hit->load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      fs::last_write_time(file, fs::file_time_type::clock::now(), ec);  // least recently used goes first
      return hit;
    }
    FT_LOG_WARN("compensation cache {}: {}; computing it again", file.string(), hit.status().ToString());
  }
  FT_ASSIGN_OR_RETURN(CompensationReport rep, ComputeCompensated(target, o, calibration));
  // A cache that cannot be written costs the next start the computation, not this one its result.
  fs::create_directories(cache_dir, ec);
  if (auto s = ec ? absl::InternalError(ec.message()) : SaveCompensated(file.string(), key, rep); !s.ok()) {
    FT_LOG_WARN("compensation cache: cannot write {}: {}", file.string(), s.ToString());
    return rep;
  }
  rep.cache_path = file.string();
  std::vector<std::pair<fs::file_time_type, fs::path>> files;
  for (const auto& e : fs::directory_iterator(cache_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with("compensated-") && name.ends_with(".gguf") && e.path() != file) files.emplace_back(e.last_write_time(ec), e.path());
  }
  std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = kCompensationCacheFiles - 1; i < files.size(); ++i) {
    FT_LOG_INFO("compensation cache: removing the least recently used {}", files[i].second.string());
    fs::remove(files[i].second, ec);
  }
  return rep;
}

absl::Status LlamaModel::SaveCompensated(const std::string& path, const std::string& key, const CompensationReport& rep) const {
  GgufWriter w;
  w.AllowPrivateTypes();  // NF4/NF3/NF2 projections
  w.SetString("fedtune.compensation.key", key);
  w.SetF32("fedtune.compensation.seconds", static_cast<float>(rep.seconds));
  std::vector<float> rb, ra, ab, aa;
  for (const auto& e : rep.modules) {
    rb.push_back(static_cast<float>(e.rel_before));
    ra.push_back(static_cast<float>(e.rel_after));
    ab.push_back(static_cast<float>(e.act_before));
    aa.push_back(static_cast<float>(e.act_after));
  }
  w.SetF32Array("fedtune.compensation.rel_before", rb);
  w.SetF32Array("fedtune.compensation.rel_after", ra);
  w.SetF32Array("fedtune.compensation.act_before", ab);
  w.SetF32Array("fedtune.compensation.act_after", aa);
  // A checksum of the data (FNV-1a over every tensor's bytes in order): a file whose bytes changed
  // (a bad disk, a partial overwrite) is recomputed, not used.
  uint64_t sum = Fnv1a({});
  auto add = [&](const std::string& name, const kernels::QMatrix& m) {
    sum = Fnv1a(std::string_view(reinterpret_cast<const char*>(m.data), m.row_bytes * static_cast<size_t>(m.rows)), sum);
    return w.AddTensor(name, {m.cols, m.rows}, m.type, {m.data, m.row_bytes * static_cast<size_t>(m.rows)});
  };
  for (size_t li = 0; li < layers_.size(); ++li) {
    const LlamaLayer& L = layers_[li];
    for (int mi = 0; mi < kNumModules; ++mi) {
      const std::string base = absl::StrCat("blk.", li, ".", GgufModuleName(static_cast<Module>(mi)));
      FT_RETURN_IF_ERROR(add(base + ".weight", L.Projection(static_cast<Module>(mi))));
      if (const LowRankCorrection& c = L.corr[static_cast<size_t>(mi)]; c.present()) {
        FT_RETURN_IF_ERROR(add(base + ".corr_u", c.u));
        FT_RETURN_IF_ERROR(add(base + ".corr_v", c.v));
      }
    }
  }
  w.SetString("fedtune.compensation.checksum", absl::StrFormat("%016x", sum));
  return w.WriteFile(path);
}

absl::StatusOr<LlamaModel::CompensationReport> LlamaModel::LoadCompensated(const std::string& path, const std::string& key, kernels::GgmlType target) {
  FT_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> f, GgufFile::Open(path, /*private_types=*/true));
  FT_ASSIGN_OR_RETURN(std::string stored, f->GetString("fedtune.compensation.key"));
  if (stored != key) return absl::NotFoundError("written for other inputs (key mismatch)");
  CompensationReport rep;
  rep.seconds = f->GetFloatOr("fedtune.compensation.seconds", 0);
  std::array<std::vector<double>, 4> figures;
  const char* names[] = {"rel_before", "rel_after", "act_before", "act_after"};
  for (size_t k = 0; k < 4; ++k) {
    FT_ASSIGN_OR_RETURN(const GgufValue* a, f->GetArray(absl::StrCat("fedtune.compensation.", names[k])));
    figures[k] = a->floats;
    if (figures[k].size() != layers_.size() * kNumModules) return absl::DataLossError(absl::StrCat(names[k], ": wrong length"));
  }
  // Every tensor is checked before any projection is replaced: a bad file leaves the model as loaded.
  struct Found { const GgufTensor *w, *u, *v; };
  std::vector<Found> found;
  auto check = [&](const GgufTensor* t, const std::string& name, int64_t rows, int64_t cols, std::optional<kernels::GgmlType> type) -> absl::Status {
    if (t == nullptr) return absl::DataLossError(absl::StrCat("no tensor ", name));
    if (t->ne.size() != 2 || t->ne[0] != cols || (rows >= 0 && t->ne[1] != rows) || (type && t->type != *type))
      return absl::DataLossError(absl::StrCat("tensor ", name, " has another shape or type"));
    return absl::OkStatus();
  };
  for (size_t li = 0; li < layers_.size(); ++li) {
    for (int mi = 0; mi < kNumModules; ++mi) {
      const kernels::QMatrix& m = layers_[li].Projection(static_cast<Module>(mi));
      const std::string base = absl::StrCat("blk.", li, ".", GgufModuleName(static_cast<Module>(mi)));
      Found e{f->FindTensor(base + ".weight"), f->FindTensor(base + ".corr_u"), f->FindTensor(base + ".corr_v")};
      FT_RETURN_IF_ERROR(check(e.w, base + ".weight", m.rows, m.cols, kernels::RowCompatibleType(target, m.cols)));
      if ((e.u == nullptr) != (e.v == nullptr)) return absl::DataLossError(absl::StrCat(base, ": half a correction"));
      if (e.u != nullptr) {
        FT_RETURN_IF_ERROR(check(e.v, base + ".corr_v", -1, m.cols, kernels::GgmlType::kF16));
        if (e.v->ne[1] < 1) return absl::DataLossError(absl::StrCat(base, ": a correction of rank 0"));
        FT_RETURN_IF_ERROR(check(e.u, base + ".corr_u", m.rows, e.v->ne[1], kernels::GgmlType::kF16));
      }
      found.push_back(e);
    }
  }
  uint64_t sum = Fnv1a({});
  for (const Found& e : found)
    for (const GgufTensor* t : {e.w, e.u, e.v})
      if (t != nullptr) sum = Fnv1a(std::string_view(reinterpret_cast<const char*>(t->data), t->nbytes), sum);
  FT_ASSIGN_OR_RETURN(const std::string want, f->GetString("fedtune.compensation.checksum"));
  if (want != absl::StrFormat("%016x", sum)) return absl::DataLossError("the tensors' checksum does not match (damaged file)");
  for (size_t li = 0, i = 0; li < layers_.size(); ++li) {
    LlamaLayer& L = layers_[li];
    const std::array<kernels::QMatrix*, kNumModules> mats = L.Projections();
    for (int mi = 0; mi < kNumModules; ++mi, ++i) {
      const Found& e = found[i];
      const kernels::QMatrix q = e.w->AsMatrix();
      ReplaceMatrixData(mats[static_cast<size_t>(mi)], q.type, q.data, q.row_bytes);
      L.corr[static_cast<size_t>(mi)] = e.u != nullptr ? LowRankCorrection{e.u->AsMatrix(), e.v->AsMatrix()} : LowRankCorrection{};
      rep.modules.push_back({static_cast<int64_t>(li), static_cast<Module>(mi), q.type, figures[0][i], figures[1][i], figures[2][i], figures[3][i]});
    }
  }
  cache_files_.push_back(std::move(f));
  rep.projection_bytes = ProjectionBytes();
  rep.correction_bytes = CorrectionBytes();
  return rep;
}

absl::StatusOr<LlamaModel::CompensationReport> LlamaModel::ComputeCompensated(kernels::GgmlType target, const CompensationOptions& o,
                                                                              std::span<const int32_t> calibration) {
  const auto tr = kernels::GetTypeTraits(static_cast<uint32_t>(target));
  if (!tr || !tr->supported) return absl::InvalidArgumentError("unknown target type");
  if (cfg_.fused) return absl::UnimplementedError("compensation of fused projections (phi3) is not implemented");
  const auto t0 = std::chrono::steady_clock::now();
  // Calibration: each projection's input rows X, one layer at a time (tokens x width floats: 27 MB
  // per SmolLM2 layer at 2,048 tokens, where X^T X would take 25 MB). q/k/v share their input, as
  // do gate/up; it is kept once (under kQ and kGate). Layer by layer as GPTQ does: layer l's
  // inputs are the calibration tokens' hidden states after layers 0..l-1 as already re-quantized
  // and compensated, so each layer also answers for the error of the ones before it; only one
  // layer's inputs and the hidden states (4.7 MB at 2,048 tokens) are held, and each layer runs
  // twice (observed, then advanced through its replacement).
  const size_t nl = layers_.size();
  auto slot = [](Module m) {
    switch (m) {
      case Module::kK: case Module::kV: return Module::kQ;
      case Module::kUp: return Module::kGate;
      default: return m;
    }
  };
  const bool want_gram = !calibration.empty();
  if (NeedsCalibration(o.method) && !want_gram)
    return absl::InvalidArgumentError(absl::StrCat(CompensationMethodName(o.method), " needs calibration tokens"));
  CompensationReport rep;
  // Each window's hidden states before layer li (through layers 0..li-1 as already replaced):
  // one layer pass to observe layer li's inputs, one through the replaced layer li to advance.
  std::vector<std::vector<float>> hidden((calibration.size() + 255) / 256);
  LlamaContext ctx(*this, 256);
  std::vector<float> logits, scratch;
  auto pass = [&](size_t li, bool advance) -> absl::Status {
    for (size_t w = 0; w < hidden.size(); ++w) {
      ctx.Reset();
      std::vector<float>* h = &hidden[w];
      if (!advance) {
        scratch = hidden[w];
        h = &scratch;
      }
      ctx.SetHidden(static_cast<int64_t>(li), h);
      ctx.SetLayerLimit(static_cast<int64_t>(li) + 1);
      FT_RETURN_IF_ERROR(ctx.Eval(calibration.subspan(w * 256, std::min<size_t>(256, calibration.size() - w * 256)), false, &logits));
    }
    return absl::OkStatus();
  };
  for (size_t li = 0; li < nl; ++li) {
    std::array<CalibrationGram, kNumModules> gram;
    if (want_gram) {
      ctx.SetInputObserver([&](int64_t l, Module mod, const float* in, int64_t rows, int64_t cols) {
        if (l != static_cast<int64_t>(li) || slot(mod) != mod) return;
        gram[static_cast<size_t>(mod)].Accumulate(in, rows, cols);
      });
      FT_RETURN_IF_ERROR(pass(li, false));
      ctx.SetInputObserver(nullptr);
    }
    LlamaLayer& L = layers_[li];
    const std::array<kernels::QMatrix*, kNumModules> mats = L.Projections();
    for (int mi = 0; mi < kNumModules; ++mi) {
      kernels::QMatrix* m = mats[static_cast<size_t>(mi)];
      const kernels::GgmlType type = kernels::RowCompatibleType(target, m->cols);
      const std::vector<float> w = kernels::DequantizeMatrix(*m);
      auto& g = gram[static_cast<size_t>(slot(static_cast<Module>(mi)))];
      FT_ASSIGN_OR_RETURN(CompensatedMatrix cm, QuantizeCompensated(w.data(), m->rows, m->cols, type, o, g.x.empty() ? nullptr : &g));
      FT_ASSIGN_OR_RETURN(size_t rb, kernels::RowBytes(type, m->cols));
      ReplaceMatrix(m, type, std::move(cm.bytes), rb);
      LowRankCorrection& c = L.corr[static_cast<size_t>(mi)];
      c = {};
      if (cm.c.rank > 0) {
        // Stored in fp16 (half the memory; its rounding, 2^-11 relative, is far below the
        // quantization error the correction describes).
        auto keep = [&](const std::vector<float>& v, int64_t rows, int64_t cols) {
          std::vector<uint8_t> bytes(v.size() * 2);
          FT_CHECK(kernels::QuantizeRow(kernels::GgmlType::kF16, v.data(), bytes.data(), static_cast<int64_t>(v.size())).ok());
          owned_.push_back(std::move(bytes));
          return kernels::QMatrix{kernels::GgmlType::kF16, owned_.back().data(), rows, cols, static_cast<size_t>(cols) * 2};
        };
        c.u = keep(cm.c.u, cm.c.rows, cm.c.rank);
        c.v = keep(cm.c.v, cm.c.rank, cm.c.cols);
      }
      rep.modules.push_back({static_cast<int64_t>(li), static_cast<Module>(mi), type, cm.rel_before, cm.rel_after, cm.act_before, cm.act_after});
    }
    if (want_gram && li + 1 < nl) FT_RETURN_IF_ERROR(pass(li, true));  // through the replaced layer
  }
  rep.projection_bytes = ProjectionBytes();
  rep.correction_bytes = CorrectionBytes();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

LlamaContext::LlamaContext(const LlamaModel& model, int64_t n_ctx) : m_(model), n_ctx_(n_ctx) {
  const auto& c = m_.config();
  const size_t per = static_cast<size_t>(c.n_layer * n_ctx_ * c.n_head_kv * c.head_dim);
  k_cache_.assign(per, 0.0f);
  v_cache_.assign(per, 0.0f);
}

absl::Status LlamaContext::Eval(std::span<const int32_t> tokens, bool all_logits, std::vector<float>* logits) {
  const Segment seg{this, 0, static_cast<int64_t>(tokens.size())};
  return Run(tokens, std::span<const Segment>(&seg, 1), all_logits, logits);
}

absl::Status LlamaContext::EvalBatch(std::span<LlamaContext* const> ctxs, std::span<const std::vector<int32_t>> tokens, std::vector<float>* logits) {
  if (ctxs.empty() || ctxs.size() != tokens.size())
    return absl::InvalidArgumentError(absl::StrCat("EvalBatch: ", ctxs.size(), " contexts for ", tokens.size(), " token lists"));
  std::vector<int32_t> all;
  std::vector<Segment> segs;
  for (size_t i = 0; i < ctxs.size(); ++i) {
    LlamaContext* c = ctxs[i];
    if (c == nullptr || &c->m_ != &ctxs[0]->m_ || c->adapters_ != ctxs[0]->adapters_ || c->int8_ != ctxs[0]->int8_)
      return absl::InvalidArgumentError("EvalBatch: the contexts must belong to one model and apply the same adapters and activation precision");
    if (c->observer_ || c->hidden_ != nullptr || c->layer_limit_ > 0)
      return absl::InvalidArgumentError("EvalBatch: contexts with an input observer, hidden states or a layer limit run alone");
    for (size_t j = 0; j < i; ++j)
      if (ctxs[j] == c) return absl::InvalidArgumentError("EvalBatch: a context appears twice");
    if (tokens[i].empty()) return absl::InvalidArgumentError(absl::StrCat("EvalBatch: no tokens for sequence ", i));
    segs.push_back({c, static_cast<int64_t>(all.size()), static_cast<int64_t>(tokens[i].size())});
    all.insert(all.end(), tokens[i].begin(), tokens[i].end());
  }
  return ctxs[0]->Run(all, segs, false, logits);
}

absl::Status LlamaContext::Run(std::span<const int32_t> tokens, std::span<const Segment> segs, bool all_logits, std::vector<float>* logits) {
  const auto& c = m_.config();
  const int64_t T = static_cast<int64_t>(tokens.size());
  if (T == 0) return absl::InvalidArgumentError("Eval: no tokens");
  for (const Segment& s : segs) {
    if (s.ctx->n_past_ + s.rows > s.ctx->n_ctx_) {
      return absl::OutOfRangeError(absl::StrCat("context full: ", s.ctx->n_past_, " + ", s.rows, " tokens exceed n_ctx ", s.ctx->n_ctx_));
    }
  }
  for (int32_t t : tokens) {
    if (t < 0 || t >= c.n_vocab) return absl::InvalidArgumentError(absl::StrCat("token id ", t, " outside the vocabulary of ", c.n_vocab));
  }
  // Decoding a token or a few makes hundreds of small parallel calls: the pool's threads spin
  // between them instead of sleeping (kernels/thread_pool.h).
  std::optional<kernels::ThreadPool::LowLatencyScope> low_latency;
  if (T <= 4 || static_cast<int64_t>(segs.size()) == T) low_latency.emplace(kernels::DefaultPool());
  const int64_t E = c.n_embd, H = c.n_head, Hkv = c.n_head_kv, hd = c.head_dim, F = c.n_ff, Dq = c.q_dim();
  const int64_t kvd = Hkv * hd;
  std::vector<float> x(static_cast<size_t>(T * E)), h(x.size()), o(x.size());
  std::vector<float> q(static_cast<size_t>(T * Dq)), attn(q.size());
  std::vector<float> k(static_cast<size_t>(T * kvd)), v(k.size());
  std::vector<float> gate(static_cast<size_t>(T * F)), up(gate.size());
  const int64_t l0 = hidden_ != nullptr ? std::clamp<int64_t>(first_layer_, 0, c.n_layer) : 0;
  if (l0 > 0) {
    if (hidden_->size() != x.size())
      return absl::InvalidArgumentError(absl::StrCat("Eval: ", hidden_->size(), " hidden values for ", T, " tokens of width ", E));
    x = *hidden_;
  } else {
    for (int64_t t = 0; t < T; ++t) kernels::GetRow(m_.token_embd(), tokens[static_cast<size_t>(t)], x.data() + t * E);
    if (c.embed_scale != 1.0f)
      for (float& e : x) e *= c.embed_scale;
  }

  std::vector<float> z, zc, yc;
  const int64_t n_run = layer_limit_ > 0 ? std::min(layer_limit_, c.n_layer) : c.n_layer;
  for (int64_t l = l0; l < n_run; ++l) {
    const LlamaLayer& L = m_.layer(l);
    // Base matmul plus the layer's adapter for this module, if any.
    auto linear = [&](Module mod, const kernels::QMatrix& w, const float* in, float* out, const std::vector<float>& bias = {}) {
      if (observer_) observer_(l, mod, in, T, w.cols);
      kernels::MatMulQ(w, in, out, T, int8_);
      if (const LowRankCorrection& cr = L.corr[static_cast<size_t>(mod)]; cr.present()) {
        zc.resize(static_cast<size_t>(T * cr.v.rows));
        kernels::MatMulQ(cr.v, in, zc.data(), T);
        yc.resize(static_cast<size_t>(T * w.rows));
        kernels::MatMulQ(cr.u, zc.data(), yc.data(), T);
        for (size_t i = 0; i < yc.size(); ++i) out[i] += yc[i];
      }
      if (!bias.empty()) {
        for (int64_t t = 0; t < T; ++t)
          for (int64_t i = 0; i < w.rows; ++i) out[t * w.rows + i] += bias[static_cast<size_t>(i)];
      }
      if (adapters_ != nullptr) {
        if (const auto& a = adapters_->layers[static_cast<size_t>(l)][static_cast<size_t>(mod)]) a->Forward(in, out, T, &z);
      }
    };
    kernels::RmsNorm(x.data(), L.attn_norm.data(), h.data(), T, E, c.rms_eps);
    linear(Module::kQ, L.wq, h.data(), q.data(), L.bq);
    linear(Module::kK, L.wk, h.data(), k.data(), L.bk);
    linear(Module::kV, L.wv, h.data(), v.data(), L.bv);
    if (c.qk_norm) {
      kernels::RmsNorm(q.data(), L.q_norm.data(), q.data(), T * H, hd, c.rms_eps);
      kernels::RmsNorm(k.data(), L.k_norm.data(), k.data(), T * Hkv, hd, c.rms_eps);
    }
    // Each segment: its positions after its own n_past, its own cache.
    for (const Segment& s : segs) {
      LlamaContext& sc = *s.ctx;
      float* kc = sc.k_cache_.data() + l * sc.n_ctx_ * kvd;
      float* vc = sc.v_cache_.data() + l * sc.n_ctx_ * kvd;
      for (int64_t t = s.row0; t < s.row0 + s.rows; ++t) {
        const int64_t pos = sc.n_past_ + (t - s.row0);
        kernels::RopeAdjacent(q.data() + t * Dq, H, hd, c.rope_dim, pos, c.RopeBase(l), c.FreqFactors(l, sc.n_ctx_));
        kernels::RopeAdjacent(k.data() + t * kvd, Hkv, hd, c.rope_dim, pos, c.RopeBase(l), c.FreqFactors(l, sc.n_ctx_));
        std::memcpy(kc + pos * kvd, k.data() + t * kvd, static_cast<size_t>(kvd) * 4);
        std::memcpy(vc + pos * kvd, v.data() + t * kvd, static_cast<size_t>(kvd) * 4);
      }
    }
    if (c.query_scale != 1.0f)
      for (float& e : q) e *= c.query_scale;
    for (const Segment& s : segs) {
      const LlamaContext& sc = *s.ctx;
      kernels::CausalAttention(q.data() + s.row0 * Dq, Dq, sc.k_cache_.data() + l * sc.n_ctx_ * kvd, sc.v_cache_.data() + l * sc.n_ctx_ * kvd, kvd,
                               attn.data() + s.row0 * Dq, Dq, s.rows, sc.n_past_, H, Hkv, hd, c.attn_softcap, c.Window(l));
    }
    linear(Module::kO, L.wo, attn.data(), o.data(), L.bo);
    if (!L.post_attn_norm.empty()) kernels::RmsNorm(o.data(), L.post_attn_norm.data(), o.data(), T, E, c.rms_eps);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    kernels::RmsNorm(x.data(), L.ffn_norm.data(), h.data(), T, E, c.rms_eps);
    linear(Module::kGate, L.w_gate, h.data(), gate.data());
    linear(Module::kUp, L.w_up, h.data(), up.data());
    if (c.gemma) {
      kernels::GeGlu(gate.data(), up.data(), gate.data(), T * F);
    } else {
      kernels::SwiGlu(gate.data(), up.data(), gate.data(), T * F);
    }
    linear(Module::kDown, L.w_down, gate.data(), o.data());
    if (!L.post_ffn_norm.empty()) kernels::RmsNorm(o.data(), L.post_ffn_norm.data(), o.data(), T, E, c.rms_eps);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
  }
  for (const Segment& s : segs) s.ctx->n_past_ += s.rows;
  if (hidden_ != nullptr) *hidden_ = x;
  if (n_run < c.n_layer || hidden_ != nullptr) {
    logits->clear();
    return absl::OkStatus();
  }
  // The rows whose logits are wanted: all, or each segment's last (gathered).
  int64_t rows = T;
  const float* src = x.data();
  if (!all_logits) {
    rows = static_cast<int64_t>(segs.size());
    for (int64_t i = 0; i < rows; ++i) {
      const Segment& s = segs[static_cast<size_t>(i)];
      std::memcpy(o.data() + i * E, x.data() + (s.row0 + s.rows - 1) * E, static_cast<size_t>(E) * 4);
    }
    src = o.data();
  }
  kernels::RmsNorm(src, m_.output_norm().data(), h.data(), rows, E, c.rms_eps);
  logits->resize(static_cast<size_t>(rows * c.n_vocab));
  kernels::MatMulQ(m_.output(), h.data(), logits->data(), rows);  // f32 (set_int8_activations)
  if (c.final_softcap > 0.0f) kernels::SoftCap(logits->data(), static_cast<int64_t>(logits->size()), c.final_softcap);
  return absl::OkStatus();
}

}  // namespace fedtune::model

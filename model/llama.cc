#include "model/llama.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <optional>

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

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromGguf(std::unique_ptr<GgufFile> gguf) {
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  const GgufFile& g = *gguf;
  LlamaConfig& c = m->cfg_;
  FT_ASSIGN_OR_RETURN(c.arch, g.GetString("general.architecture"));
  if (c.arch != "llama") {
    return absl::UnimplementedError(absl::StrCat("architecture '", c.arch, "' is not supported (llama)"));
  }
  const std::string a = c.arch + ".";
  FT_ASSIGN_OR_RETURN(c.n_embd, g.GetInt(a + "embedding_length"));
  FT_ASSIGN_OR_RETURN(c.n_layer, g.GetInt(a + "block_count"));
  FT_ASSIGN_OR_RETURN(c.n_ff, g.GetInt(a + "feed_forward_length"));
  FT_ASSIGN_OR_RETURN(c.n_head, g.GetInt(a + "attention.head_count"));
  c.n_head_kv = g.GetIntOr(a + "attention.head_count_kv", c.n_head);
  c.n_ctx_train = g.GetIntOr(a + "context_length", 2048);
  c.rope_base = static_cast<float>(g.GetFloatOr(a + "rope.freq_base", 10000.0));
  c.rms_eps = static_cast<float>(g.GetFloatOr(a + "attention.layer_norm_rms_epsilon", 1e-5));
  if (c.n_head <= 0 || c.n_embd <= 0 || c.n_embd % c.n_head != 0) {
    return absl::InvalidArgumentError(absl::StrCat("embedding_length ", c.n_embd, " is not a positive multiple of head_count ", c.n_head));
  }
  c.head_dim = c.n_embd / c.n_head;
  c.rope_dim = g.GetIntOr(a + "rope.dimension_count", c.head_dim);
  if (c.n_layer <= 0 || c.n_layer > 1024 || c.n_ff <= 0) return absl::InvalidArgumentError("block_count or feed_forward_length out of range");

  FT_ASSIGN_OR_RETURN(m->token_embd_, GgufMatrix(g, "token_embd.weight"));
  c.n_vocab = m->token_embd_.rows;
  if (g.FindTensor("output.weight") != nullptr) {
    FT_ASSIGN_OR_RETURN(m->output_, GgufMatrix(g, "output.weight"));
  } else {
    m->output_ = m->token_embd_;
    c.tied_output = true;
  }
  FT_ASSIGN_OR_RETURN(m->output_norm_, GgufVector(g, "output_norm.weight", c.n_embd));
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string p = absl::StrCat("blk.", l, ".");
    LlamaLayer L;
    FT_ASSIGN_OR_RETURN(L.attn_norm, GgufVector(g, p + "attn_norm.weight", c.n_embd));
    FT_ASSIGN_OR_RETURN(L.ffn_norm, GgufVector(g, p + "ffn_norm.weight", c.n_embd));
    FT_ASSIGN_OR_RETURN(L.wq, GgufMatrix(g, p + "attn_q.weight"));
    FT_ASSIGN_OR_RETURN(L.wk, GgufMatrix(g, p + "attn_k.weight"));
    FT_ASSIGN_OR_RETURN(L.wv, GgufMatrix(g, p + "attn_v.weight"));
    FT_ASSIGN_OR_RETURN(L.wo, GgufMatrix(g, p + "attn_output.weight"));
    FT_ASSIGN_OR_RETURN(L.w_gate, GgufMatrix(g, p + "ffn_gate.weight"));
    FT_ASSIGN_OR_RETURN(L.w_up, GgufMatrix(g, p + "ffn_up.weight"));
    FT_ASSIGN_OR_RETURN(L.w_down, GgufMatrix(g, p + "ffn_down.weight"));
    m->layers_.push_back(std::move(L));
  }
  for (const auto& t : g.tensors()) c.n_params += t.n_elements();
  auto tok = Tokenizer::FromGguf(g);
  if (tok.ok()) {
    m->tokenizer_ = std::move(tok).value();
  } else if (!absl::IsNotFound(tok.status())) {
    return tok.status();
  }
  m->gguf_ = std::move(gguf);
  FT_RETURN_IF_ERROR(m->Validate());
  return m;
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromHfFolder(const std::string& dir) {
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  FT_ASSIGN_OR_RETURN(std::string cfg_text, ReadFileToString(dir + "/config.json"));
  const nlohmann::json j = nlohmann::json::parse(cfg_text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(dir, "/config.json is not a JSON object"));
  LlamaConfig& c = m->cfg_;
  auto get_int = [&](const char* k, int64_t* out, std::optional<int64_t> def) -> absl::Status {
    if (!j.contains(k)) {
      if (def) { *out = *def; return absl::OkStatus(); }
      return absl::InvalidArgumentError(absl::StrCat(dir, "/config.json: missing '", k, "'"));
    }
    if (!j[k].is_number_integer()) return absl::InvalidArgumentError(absl::StrCat(dir, "/config.json: '", k, "' is not an integer"));
    *out = j[k].get<int64_t>();
    return absl::OkStatus();
  };
  FT_RETURN_IF_ERROR(get_int("hidden_size", &c.n_embd, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("num_hidden_layers", &c.n_layer, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("num_attention_heads", &c.n_head, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("num_key_value_heads", &c.n_head_kv, c.n_head));
  FT_RETURN_IF_ERROR(get_int("intermediate_size", &c.n_ff, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("vocab_size", &c.n_vocab, std::nullopt));
  FT_RETURN_IF_ERROR(get_int("max_position_embeddings", &c.n_ctx_train, 2048));
  if (c.n_head <= 0 || c.n_embd % c.n_head != 0) return absl::InvalidArgumentError("hidden_size is not a multiple of num_attention_heads");
  FT_RETURN_IF_ERROR(get_int("head_dim", &c.head_dim, c.n_embd / c.n_head));
  if (c.head_dim * c.n_head != c.n_embd) return absl::UnimplementedError("head_dim * num_attention_heads != hidden_size is not supported");
  c.rope_dim = c.head_dim;
  c.rope_base = j.value("rope_theta", 10000.0f);
  c.rms_eps = j.value("rms_norm_eps", 1e-5f);
  FT_ASSIGN_OR_RETURN(m->safetensors_, SafetensorsFile::Open(dir + "/model.safetensors"));
  const SafetensorsFile& st = *m->safetensors_;

  // HF rotate_half pairs (i, i + hd/2); GGUF/llama.cpp pairs (2i, 2i+1): permute Q/K rows.
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols, int64_t permute_heads) -> absl::StatusOr<QMatrix> {
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
    if (permute_heads > 0) {
      const int64_t hd = rows / permute_heads;
      std::vector<uint8_t> buf(t->nbytes);
      for (int64_t h = 0; h < permute_heads; ++h) {
        for (int64_t i = 0; i < hd / 2; ++i) {
          for (int64_t s = 0; s < 2; ++s) {
            std::memcpy(buf.data() + (h * hd + 2 * i + s) * q.row_bytes, t->data + (h * hd + s * hd / 2 + i) * q.row_bytes, q.row_bytes);
          }
        }
      }
      m->owned_.push_back(std::move(buf));
      q.data = m->owned_.back().data();
    }
    return q;
  };
  auto vec = [&](const std::string& name) -> absl::StatusOr<std::vector<float>> {
    FT_ASSIGN_OR_RETURN(Tensor t, st.ToF32(name));
    if (t.size() != c.n_embd) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has ", t.size(), " values, expected ", c.n_embd));
    return std::vector<float>(t.data<float>(), t.data<float>() + t.size());
  };
  FT_ASSIGN_OR_RETURN(m->token_embd_, matrix("model.embed_tokens.weight", c.n_vocab, c.n_embd, 0));
  if (st.Find("lm_head.weight") != nullptr) {
    FT_ASSIGN_OR_RETURN(m->output_, matrix("lm_head.weight", c.n_vocab, c.n_embd, 0));
  } else {
    m->output_ = m->token_embd_;
    c.tied_output = true;
  }
  FT_ASSIGN_OR_RETURN(m->output_norm_, vec("model.norm.weight"));
  const int64_t kv = c.n_head_kv * c.head_dim;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LlamaLayer L;
    FT_ASSIGN_OR_RETURN(L.attn_norm, vec(p + "input_layernorm.weight"));
    FT_ASSIGN_OR_RETURN(L.ffn_norm, vec(p + "post_attention_layernorm.weight"));
    FT_ASSIGN_OR_RETURN(L.wq, matrix(p + "self_attn.q_proj.weight", c.n_embd, c.n_embd, c.n_head));
    FT_ASSIGN_OR_RETURN(L.wk, matrix(p + "self_attn.k_proj.weight", kv, c.n_embd, c.n_head_kv));
    FT_ASSIGN_OR_RETURN(L.wv, matrix(p + "self_attn.v_proj.weight", kv, c.n_embd, 0));
    FT_ASSIGN_OR_RETURN(L.wo, matrix(p + "self_attn.o_proj.weight", c.n_embd, c.n_embd, 0));
    FT_ASSIGN_OR_RETURN(L.w_gate, matrix(p + "mlp.gate_proj.weight", c.n_ff, c.n_embd, 0));
    FT_ASSIGN_OR_RETURN(L.w_up, matrix(p + "mlp.up_proj.weight", c.n_ff, c.n_embd, 0));
    FT_ASSIGN_OR_RETURN(L.w_down, matrix(p + "mlp.down_proj.weight", c.n_embd, c.n_ff, 0));
    m->layers_.push_back(std::move(L));
  }
  for (const auto& t : st.tensors()) c.n_params += NumElements(t.shape);
  FT_RETURN_IF_ERROR(m->Validate());
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
  const int64_t kv = c.n_head_kv * c.head_dim;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const auto& L = layers_[static_cast<size_t>(l)];
    const std::string p = absl::StrCat("blk.", l, ".");
    FT_RETURN_IF_ERROR(ExpectShape(p + "attn_q.weight", L.wq, c.n_embd, c.n_embd));
    FT_RETURN_IF_ERROR(ExpectShape(p + "attn_k.weight", L.wk, kv, c.n_embd));
    FT_RETURN_IF_ERROR(ExpectShape(p + "attn_v.weight", L.wv, kv, c.n_embd));
    FT_RETURN_IF_ERROR(ExpectShape(p + "attn_output.weight", L.wo, c.n_embd, c.n_embd));
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
    for (const auto* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) n += w->row_bytes * static_cast<size_t>(w->rows);
  return n;
}

absl::StatusOr<size_t> LlamaModel::Requantize(kernels::GgmlType target) {
  const auto tr = kernels::GetTypeTraits(static_cast<uint32_t>(target));
  if (!tr || !tr->supported) return absl::InvalidArgumentError("unknown target type");
  std::vector<float> row;
  for (auto& L : layers_) {
    for (auto* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) {
      if (w->type == target) continue;
      FT_ASSIGN_OR_RETURN(size_t rb, kernels::RowBytes(target, w->cols));
      std::vector<uint8_t> buf(rb * static_cast<size_t>(w->rows));
      row.resize(static_cast<size_t>(w->cols));
      for (int64_t r = 0; r < w->rows; ++r) {
        kernels::DequantizeRow(w->type, w->row(r), row.data(), w->cols);
        FT_RETURN_IF_ERROR(kernels::QuantizeRow(target, row.data(), buf.data() + static_cast<size_t>(r) * rb, w->cols));
      }
      owned_.push_back(std::move(buf));
      // The original rows live in the read-only file mapping and were just paged in: drop those
      // pages from this process's memory (they would be read from the file again if touched), so
      // a re-quantized base costs its new size, not both.
      const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
      const auto begin = (reinterpret_cast<uintptr_t>(w->data) + page - 1) / page * page;
      const auto end = (reinterpret_cast<uintptr_t>(w->data) + w->row_bytes * static_cast<size_t>(w->rows)) / page * page;
      const bool in_mapping = gguf_ && w->data >= gguf_->mapped_bytes().data() &&
                              w->data + w->row_bytes * static_cast<size_t>(w->rows) <= gguf_->mapped_bytes().data() + gguf_->mapped_bytes().size();
      if (in_mapping && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
      *w = {target, owned_.back().data(), w->rows, w->cols, rb};
    }
  }
  return ProjectionBytes();
}

LlamaContext::LlamaContext(const LlamaModel& model, int64_t n_ctx) : m_(model), n_ctx_(n_ctx) {
  const auto& c = m_.config();
  const size_t per = static_cast<size_t>(c.n_layer * n_ctx_ * c.n_head_kv * c.head_dim);
  k_cache_.assign(per, 0.0f);
  v_cache_.assign(per, 0.0f);
}

absl::Status LlamaContext::Eval(std::span<const int32_t> tokens, bool all_logits, std::vector<float>* logits) {
  const auto& c = m_.config();
  const int64_t T = static_cast<int64_t>(tokens.size());
  if (T == 0) return absl::InvalidArgumentError("Eval: no tokens");
  if (n_past_ + T > n_ctx_) {
    return absl::OutOfRangeError(absl::StrCat("context full: ", n_past_, " + ", T, " tokens exceed n_ctx ", n_ctx_));
  }
  for (int32_t t : tokens) {
    if (t < 0 || t >= c.n_vocab) return absl::InvalidArgumentError(absl::StrCat("token id ", t, " outside the vocabulary of ", c.n_vocab));
  }
  // Decoding a token or a few makes hundreds of small parallel calls: the pool's threads spin
  // between them instead of sleeping (kernels/thread_pool.h).
  std::optional<kernels::ThreadPool::LowLatencyScope> low_latency;
  if (T <= 4) low_latency.emplace(kernels::DefaultPool());
  const int64_t E = c.n_embd, H = c.n_head, Hkv = c.n_head_kv, hd = c.head_dim, F = c.n_ff;
  const int64_t kvd = Hkv * hd;
  std::vector<float> x(static_cast<size_t>(T * E)), h(x.size()), q(x.size()), attn(x.size()), o(x.size());
  std::vector<float> k(static_cast<size_t>(T * kvd)), v(k.size());
  std::vector<float> gate(static_cast<size_t>(T * F)), up(gate.size());
  for (int64_t t = 0; t < T; ++t) kernels::GetRow(m_.token_embd(), tokens[static_cast<size_t>(t)], x.data() + t * E);

  std::vector<float> z;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const LlamaLayer& L = m_.layer(l);
    // Base matmul plus the layer's adapter for this module, if any.
    auto linear = [&](Module mod, const kernels::QMatrix& w, const float* in, float* out) {
      kernels::MatMulQ(w, in, out, T);
      if (adapters_ != nullptr) {
        if (const auto& a = adapters_->layers[static_cast<size_t>(l)][static_cast<size_t>(mod)]) a->Forward(in, out, T, &z);
      }
    };
    kernels::RmsNorm(x.data(), L.attn_norm.data(), h.data(), T, E, c.rms_eps);
    linear(Module::kQ, L.wq, h.data(), q.data());
    linear(Module::kK, L.wk, h.data(), k.data());
    linear(Module::kV, L.wv, h.data(), v.data());
    float* kc = k_cache_.data() + l * n_ctx_ * kvd;
    float* vc = v_cache_.data() + l * n_ctx_ * kvd;
    for (int64_t t = 0; t < T; ++t) {
      kernels::RopeAdjacent(q.data() + t * E, H, hd, c.rope_dim, n_past_ + t, c.rope_base);
      kernels::RopeAdjacent(k.data() + t * kvd, Hkv, hd, c.rope_dim, n_past_ + t, c.rope_base);
      std::memcpy(kc + (n_past_ + t) * kvd, k.data() + t * kvd, static_cast<size_t>(kvd) * 4);
      std::memcpy(vc + (n_past_ + t) * kvd, v.data() + t * kvd, static_cast<size_t>(kvd) * 4);
    }
    kernels::CausalAttention(q.data(), E, kc, vc, kvd, attn.data(), E, T, n_past_, H, Hkv, hd);
    linear(Module::kO, L.wo, attn.data(), o.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    kernels::RmsNorm(x.data(), L.ffn_norm.data(), h.data(), T, E, c.rms_eps);
    linear(Module::kGate, L.w_gate, h.data(), gate.data());
    linear(Module::kUp, L.w_up, h.data(), up.data());
    kernels::SwiGlu(gate.data(), up.data(), gate.data(), T * F);
    linear(Module::kDown, L.w_down, gate.data(), o.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
  }
  n_past_ += T;
  const int64_t first = all_logits ? 0 : T - 1;
  const int64_t rows = T - first;
  kernels::RmsNorm(x.data() + first * E, m_.output_norm().data(), h.data(), rows, E, c.rms_eps);
  logits->resize(static_cast<size_t>(rows * c.n_vocab));
  kernels::MatMulQ(m_.output(), h.data(), logits->data(), rows);
  return absl::OkStatus();
}

}  // namespace fedtune::model

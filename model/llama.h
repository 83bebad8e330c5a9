// Llama-family decoder (SmolLM2, TinyLlama, Llama 3.x) forward pass with a KV cache, on the
// CPU reference kernels. Weights stay in their file's block format (zero-copy from the mmap)
// and are dequantized tile by tile inside the matmul.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "kernels/ops.h"
#include "model/adapter.h"
#include "model/compensation.h"
#include "model/gguf.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"

namespace fedtune::model {

// The decoder families this engine runs (docs/guide.md "Model families"): llama (SmolLM2,
// TinyLlama, Llama 2/3.x with RoPE scaling, Mistral), qwen2 (q/k/v biases), qwen3 (per-head
// q/k RMSNorm), gemma3 (text: GeGLU, scaled embeddings, post-attention and post-MLP norms,
// local/global layers with their own RoPE bases), gemma2 (gemma3's layers without q/k norms,
// with attention and final-logit soft-capping, local/global alternating), phi3 (fused qkv and
// gate_up). Everything a file sets that the engine does not implement is refused at load.
struct LlamaConfig {
  std::string arch = "llama";
  int64_t n_vocab = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0, n_ff = 0;
  int64_t head_dim = 0, rope_dim = 0, n_ctx_train = 0;
  float rope_base = 10000.0f, rms_eps = 1e-5f;
  bool tied_output = false;
  int64_t n_params = 0;  // counted from tensor shapes (tied output counted once)
  // rope_dim / 2 divisors of the RoPE angles (Llama 3 and linear RoPE scaling; llama.cpp's
  // rope_freqs tensor); empty: none.
  std::vector<float> rope_freq_factors;
  // LongRoPE (Phi-3 128k, Phi-3.5): rope_freq_factors are the short factors, these the long
  // ones, used where the positions exceed rope_orig_ctx (LongRopeFactors); empty: none. Its
  // attention factor (cos and sin scaled) is folded into query_scale as its square.
  std::vector<float> rope_long_factors;
  int64_t rope_orig_ctx = 0;
  bool qk_norm = false;  // qwen3: RMSNorm over each head of q and k (before RoPE)
  // The file stores q/k rows in rotate_half order (Hugging Face folders; GGUF qwen2/qwen3,
  // which llama.cpp runs with NeoX RoPE): the loader permuted them (and their biases and norms)
  // into the adjacent-pair order the kernels use; exports permute back where the target expects.
  bool neox_file_layout = false;
  // Sliding-window attention: token i attends to keys i - sliding_window + 1 .. i on the layers
  // Window() names (Mistral, Phi-3: all layers; Gemma 2/3 and layer_types: the local ones;
  // transformers 4.x Qwen2/3 with use_sliding_window: from max_window_layers on).
  int64_t sliding_window = 0;
  // gemma2/gemma3: GeGLU MLP (gelu_tanh), embeddings x sqrt(n_embd), RMSNorm on the attention
  // and MLP outputs before the residual adds (post_attn_norm, post_ffn_norm).
  bool gemma = false;
  // gemma2: attention scores s -> attn_softcap * tanh(s / attn_softcap) before the softmax, and
  // logits z -> final_softcap * tanh(z / final_softcap); 0: none.
  float attn_softcap = 0.0f, final_softcap = 0.0f;
  // phi3: q, k, v are row ranges of one fused attn_qkv / qkv_proj tensor, gate and up of one
  // ffn_up / gate_up_proj (views, no copies); exports address the fused tensors (PEFT's names).
  bool fused = false;
  float embed_scale = 1.0f;
  float query_scale = 1.0f;  // q x this after RoPE: attention scale query_scale / sqrt(head_dim)
  // Per layer: sliding-window ("local") attention; empty: every layer alike (windowed when
  // sliding_window > 0). Gemma's local layers also have their own RoPE: rope_base_swa and no
  // frequency factors.
  std::vector<uint8_t> swa_layers;
  float rope_base_swa = 10000.0f;
  int64_t q_dim() const { return n_head * head_dim; }  // may differ from n_embd (qwen3, gemma)
  bool IsSwa(int64_t l) const { return !swa_layers.empty() && swa_layers[static_cast<size_t>(l)] != 0; }
  // Layer l's attention window (0: full causal attention).
  int64_t Window(int64_t l) const { return sliding_window > 0 && (swa_layers.empty() || IsSwa(l)) ? sliding_window : 0; }
  float RopeBase(int64_t l) const { return gemma && IsSwa(l) ? rope_base_swa : rope_base; }
  // n_positions: the positions in play (training: the batch's largest position + 1, as
  // transformers; inference: the context size, as llama.cpp); LongRoPE picks its long factors
  // above rope_orig_ctx.
  const float* FreqFactors(int64_t l, int64_t n_positions = 0) const {
    if ((gemma && IsSwa(l)) || rope_freq_factors.empty()) return nullptr;
    return !rope_long_factors.empty() && n_positions > rope_orig_ctx ? rope_long_factors.data() : rope_freq_factors.data();
  }
};

// fedtune keeps q/k rows in adjacent-pair RoPE order (llama.cpp's llama layout): row
// h * hd + 2i + s. In rotate_half order (Hugging Face, llama.cpp's NeoX archs) that row is
// h * hd + s * hd / 2 + i, returned here.
inline int64_t RotateHalfRow(int64_t r, int64_t head_dim) {
  const int64_t h = r / head_dim, w = r % head_dim;
  return h * head_dim + (w % 2) * (head_dim / 2) + w / 2;
}

// A frozen low-rank term added to a projection: y += (x v^T) u^T (model/compensation.h).
struct LowRankCorrection {
  kernels::QMatrix u, v;  // F16: rows x rank and rank x cols
  bool present() const { return u.data != nullptr; }
};

struct LlamaLayer {
  std::vector<float> attn_norm, ffn_norm;
  kernels::QMatrix wq, wk, wv, wo, w_gate, w_up, w_down;
  std::array<LowRankCorrection, kNumModules> corr;  // quantization-error compensation, by Module
  // The projection of module m (q, k, v, o, gate, up, down).
  const kernels::QMatrix& Projection(Module m) const { return *Projections()[static_cast<size_t>(m)]; }
  std::array<const kernels::QMatrix*, kNumModules> Projections() const { return {&wq, &wk, &wv, &wo, &w_gate, &w_up, &w_down}; }
  std::array<kernels::QMatrix*, kNumModules> Projections() { return {&wq, &wk, &wv, &wo, &w_gate, &w_up, &w_down}; }
  std::vector<float> bq, bk, bv, bo;  // biases (empty: none): qwen2 q/k/v, llama attention_bias q/k/v/o
  std::vector<float> q_norm, k_norm;  // qwen3: head_dim weights each (empty: none)
  std::vector<float> post_attn_norm, post_ffn_norm;  // gemma3 (empty: none)
};

class LlamaModel {
 public:
  // Loads from a GGUF file (kept open and mapped by the model). Errors name the tensor or key.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> FromGguf(std::unique_ptr<GgufFile> gguf);
  // Loads a Hugging Face checkpoint folder: config.json + model.safetensors (F32/F16/BF16);
  // Q/K rows are permuted into the GGUF (adjacent-pair RoPE) layout. No tokenizer.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> FromHfFolder(const std::string& dir);
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& path);

  // Re-quantizes the frozen projection weights (q, k, v, o, gate, up, down of every layer) to
  // `target` (Q8_0, Q4_0, Q4_1, NF4, Q3_K, NF3, Q2_K, NF2, F16...) to fit a memory budget, each
  // matrix to kernels::RowCompatibleType(target, cols); embeddings and the output head keep
  // their type. Returns the bytes of the projection weights after conversion.
  absl::StatusOr<size_t> Requantize(kernels::GgmlType target);
  size_t ProjectionBytes() const;
  // Drops this process's resident pages of the memory-mapped model file (clean, read-only pages:
  // read again from the file, usually the page cache, on the next access). A worker training on
  // a re-quantized copy calls it on the stored model, which it does not read meanwhile, so that
  // its memory holds one base, not two (measured: bench/run_fleet_memory.sh).
  void ReleaseMappedPages() const;

  // Requantize with a frozen low-rank correction per projection (model/compensation.h), from
  // the weights as loaded. The calibrated methods' inputs (cloq, gptq) come from running
  // `calibration` (token ids) in windows of 256 tokens, layer by layer: layer l's inputs through
  // layers 0..l-1 as already re-quantized and compensated (GPTQ's sequential calibration).
  struct CompensationReport {
    struct Entry {
      int64_t layer;
      Module module;
      kernels::GgmlType type;
      double rel_before, rel_after, act_before, act_after;
    };
    std::vector<Entry> modules;
    size_t projection_bytes = 0, correction_bytes = 0;
    double seconds = 0;          // computing it (a cache hit: the original computation's)
    std::string cache_path;      // the cache file written or read ("" without a cache)
    bool cache_hit = false;
    double load_seconds = 0;     // a cache hit: reading it
    // "P MiB + C MiB correction (S s); mean relative weight error a -> b[, on the calibration
    // inputs c -> d]" (means over the projections)[; "read from the cache F in L s"].
    std::string Summary() const;
  };
  // cache_dir (optional): the result is kept on disk there (model/llama.cc, "compensation cache")
  // and read back instead of recomputed when the same model file (path, size, modification
  // time), target, options and calibration tokens ask again; at most 4 files are kept (least
  // recently used removed). A file that does not match or does not parse is recomputed and
  // rewritten. Models not loaded from a GGUF file are not cached.
  absl::StatusOr<CompensationReport> RequantizeCompensated(kernels::GgmlType target, const CompensationOptions& o,
                                                           std::span<const int32_t> calibration, const std::string& cache_dir = "");
  size_t CorrectionBytes() const;

  const LlamaConfig& config() const { return cfg_; }
  // The in/out sizes adapters need (layers, embedding, K/V width, FFN width).
  ModelDims adapter_dims() const { return {cfg_.n_layer, cfg_.n_embd, cfg_.n_head_kv * cfg_.head_dim, cfg_.n_ff, cfg_.q_dim()}; }
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  const GgufFile* gguf() const { return gguf_.get(); }
  const LlamaLayer& layer(int64_t i) const { return layers_[static_cast<size_t>(i)]; }
  const kernels::QMatrix& token_embd() const { return token_embd_; }
  const kernels::QMatrix& output() const { return output_; }
  const std::vector<float>& output_norm() const { return output_norm_; }

 private:
  LlamaModel() = default;
  absl::Status Validate() const;
  // q/k rows (and their biases and norms) from rotate_half order to adjacent pairs (owned copies).
  void PermuteFromNeox();
  void ReplaceMatrix(kernels::QMatrix* w, kernels::GgmlType type, std::vector<uint8_t> bytes, size_t rb);
  // Points w at `data` (owned elsewhere: owned_ or a cache file), dropping the original's pages.
  void ReplaceMatrixData(kernels::QMatrix* w, kernels::GgmlType type, const uint8_t* data, size_t rb);
  absl::StatusOr<CompensationReport> ComputeCompensated(kernels::GgmlType target, const CompensationOptions& o,
                                                        std::span<const int32_t> calibration);
  // The compensation cache (llama.cc): writes this model's projections and corrections with the
  // report under `key`; reads them back (DataLoss / NotFound when the file is not for `key`).
  absl::Status SaveCompensated(const std::string& path, const std::string& key, const CompensationReport& rep) const;
  absl::StatusOr<CompensationReport> LoadCompensated(const std::string& path, const std::string& key, kernels::GgmlType target);
  std::vector<std::unique_ptr<GgufFile>> cache_files_;  // mapped compensation caches the projections point into
  LlamaConfig cfg_;
  std::unique_ptr<GgufFile> gguf_;
  std::unique_ptr<SafetensorsFile> safetensors_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<std::vector<uint8_t>> owned_;  // storage for weights not backed by the mmap
  kernels::QMatrix token_embd_, output_;
  std::vector<float> output_norm_;
  std::vector<LlamaLayer> layers_;
};

// Inference state for one sequence: the KV cache and scratch buffers.
class LlamaContext {
 public:
  LlamaContext(const LlamaModel& model, int64_t n_ctx);
  int64_t n_ctx() const { return n_ctx_; }
  int64_t n_past() const { return n_past_; }
  void Reset() { n_past_ = 0; }
  // Applies trained adapters on top of the base in Eval (not owned; nullptr = base only).
  void SetAdapters(const AdapterSet<float>* adapters) { adapters_ = adapters; }
  // Called with every projection's input (T rows of its width) during Eval; for calibration.
  using InputObserver = std::function<void(int64_t layer, Module mod, const float* in, int64_t rows, int64_t cols)>;
  void SetInputObserver(InputObserver f) { observer_ = std::move(f); }
  // Eval runs only the first n layers (0: all) and writes no logits (calibration of layer n-1:
  // the cache of the later layers is not written, so Reset before the next Eval).
  void SetLayerLimit(int64_t n) { layer_limit_ = n; }
  // Layer-wise calibration: with `hidden` set, Eval starts at layer `first` from the hidden
  // states in *hidden (T x n_embd; first 0: from the tokens' embeddings), runs up to the layer
  // limit, writes the hidden states after its last layer back to *hidden and no logits (only
  // the run layers' cache is written). nullptr: a normal Eval.
  void SetHidden(int64_t first, std::vector<float>* hidden) {
    first_layer_ = first;
    hidden_ = hidden;
  }
  // Decoding for generation: passes of up to kernels::kInt8Rows rows run the layers' projections
  // with 8-bit activations (kernels::MatMulQ; as llama.cpp decodes), the output layer in f32
  // (its logits pick the next token directly: an 8-bit final hidden state moves them by ~0.1,
  // enough to flip a near tie). Off (the default): every product in f32, exact w.r.t. the
  // dequantized weights (perplexity, calibration, the oracle tests).
  void set_int8_activations(bool on) { int8_ = on; }

  // Runs tokens at positions n_past .. n_past+T-1, appending to the cache. Writes logits
  // (n_vocab floats per row) for every token when all_logits, else for the last token only.
  // OutOfRange past n_ctx; InvalidArgument for a token id outside the vocabulary.
  absl::Status Eval(std::span<const int32_t> tokens, bool all_logits, std::vector<float>* logits);

  // Several sequences in one pass: tokens[i] are appended to ctxs[i] (each at its own positions,
  // attending to its own cache) while the projections run over all rows at once, so B decoded
  // tokens (one per sequence) share each weight read, and several prompts fill their caches in
  // one batched pass. Writes each context's last-token logits, n_vocab floats per context in
  // order. The contexts must be distinct, apply the same adapters and activation precision and
  // use no observer, hidden states or layer limit (InvalidArgument otherwise); each one's errors
  // are Eval's.
  static absl::Status EvalBatch(std::span<LlamaContext* const> ctxs, std::span<const std::vector<int32_t>> tokens, std::vector<float>* logits);

 private:
  // Rows [row0, row0 + rows) of a pass belong to `ctx` (appended at its n_past).
  struct Segment {
    LlamaContext* ctx;
    int64_t row0, rows;
  };
  // The forward pass of Eval / EvalBatch over the concatenated rows of `segs`; this context's
  // adapters, observer, hidden states and layer limit apply. all_logits: every row's logits
  // (else each segment's last row).
  absl::Status Run(std::span<const int32_t> tokens, std::span<const Segment> segs, bool all_logits, std::vector<float>* logits);
  const LlamaModel& m_;
  int64_t n_ctx_;
  int64_t n_past_ = 0;
  std::vector<float> k_cache_, v_cache_;  // [layer][pos][n_head_kv * head_dim]
  const AdapterSet<float>* adapters_ = nullptr;
  InputObserver observer_;
  int64_t layer_limit_ = 0, first_layer_ = 0;
  std::vector<float>* hidden_ = nullptr;
  bool int8_ = false;
};

}  // namespace fedtune::model

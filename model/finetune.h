// The local fine-tuning loop (what every worker runs, and `fedtune train`): mini-batches of
// examples, gradient accumulation, AdamW with warm-up + cosine, and evaluation by held-out
// loss, perplexity and exact-match accuracy of greedy answers.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "model/dataset.h"
#include "model/llama.h"
#include "model/optimizer.h"

namespace fedtune::model {

struct FinetuneOptions {
  int steps = 100;          // optimizer steps
  int batch = 8;            // examples per micro-batch
  int grad_accum = 1;       // micro-batches per optimizer step
  bool recompute = true;    // activation recomputation
  int micro_batch = 0;      // sequences per forward/backward pass (0 = the whole micro-batch)
  // > 0: choose per batch between keeping activations (as many sequences per pass as fit in
  // this many MiB) and recomputation (TrainerOptions::activation_budget_bytes); overrides
  // recompute/micro_batch. 0: as `recompute` / `micro_batch` say (what the planner's memory
  // model assumes for workers).
  int activation_budget_mib = 0;
  bool pack = true;         // sequence packing (MakePackedBatch) instead of padding
  float adapter_dropout = 0.0f;
  kernels::Backend* backend = nullptr;  // null: cpu-fast
  uint64_t seed = 1;        // example order
  int log_every = 10;
  // Checkpointing: every `checkpoint_every` steps (0 = never) the adapters and the optimizer
  // state are written atomically to `checkpoint_path`. A run resumed from a checkpoint (the
  // optimizer's step > 0) replays the example order up to that step, so it continues exactly
  // as the uninterrupted run would have.
  int checkpoint_every = 0;
  std::string checkpoint_path;
  // FedProx (Li et al. 2020, arXiv 1812.06127): adds mu/2 ||theta - center||^2 to the loss, so
  // mu (theta - center) to every gradient. `proximal_center` holds the round's global tensors by
  // trainable name; absent names get no term.
  double proximal_mu = 0;
  const std::map<std::string, std::vector<float>>* proximal_center = nullptr;
  // Local DP-SGD (Abadi et al. 2016, arXiv 1607.00133): dp_clip > 0 draws each step's batch by
  // Poisson sampling (every example independently with q = batch*grad_accum / n, so batch sizes
  // vary), computes each drawn example's gradient of its mean token NLL separately, clips it to
  // L2 norm dp_clip, sums, adds N(0, (dp_noise_multiplier * dp_clip)^2) per coordinate and
  // divides by the expected batch size batch*grad_accum. `dp_normal` draws standard normals and
  // `dp_uniform` uniforms in [0, 1), both from a CSPRNG stream (privacy::NoiseSource): the
  // accountant's amplification at q (privacy/rdp_accountant.h) assumes exactly this sampling.
  // The drawn examples run DpExamplesPerPass at a time through one forward/backward pass that
  // keeps each one's gradient apart (Trainer::set_per_example; one at a time on kernels whose
  // buffers are not host memory, e.g. CUDA), padded to the longest of the pass.
  double dp_clip = 0;
  double dp_noise_multiplier = 0;
  // 0: DpExamplesPerPass (what the planner's memory model assumes); 1: one at a time; more: that
  // many, whatever their gradients' memory (benchmarks and tests). With adapter dropout the masks
  // follow the passes, so results differ from one at a time (equal within rounding without).
  int dp_examples_per_pass = 0;
  std::function<double()> dp_normal;
  std::function<double()> dp_uniform;
};

// The Poisson batch of one DP-SGD step: the indices in [0, examples) for which uniform() < q.
std::vector<size_t> PoissonBatch(size_t examples, double q, const std::function<double()>& uniform);

// DP-SGD's examples per forward/backward pass on host-memory kernels: as many as keep their own
// gradients (trained_values floats each) within kDpExampleGradientBytes, at most the expected
// batch, at least 1. The planner's memory and time models use the same figure.
inline constexpr int64_t kDpExampleGradientBytes = int64_t{128} << 20;
int DpExamplesPerPass(int64_t trained_values, int expected_batch);

// Checkpoint = adapter tensors + AdamW moments + Fisher + step, one safetensors file.
absl::Status SaveCheckpoint(const std::string& path, AdapterSet<float>& adapters, AdamW& opt);
absl::Status LoadCheckpoint(const std::string& path, AdapterSet<float>& adapters, AdamW* opt);

struct StepLog {
  int step;
  double loss;       // mean NLL per scored token over the step
  double grad_norm;
  float lr;
  double tokens_per_second;  // all tokens (incl. padding and prompt) processed per second
};

struct TrainReport {
  int steps = 0;
  double seconds = 0;
  int64_t tokens = 0;
  double final_loss = 0;
  int64_t dp_examples = 0;  // DP-SGD: examples the Poisson batches drew, all steps together
};

absl::StatusOr<TrainReport> Finetune(const LlamaModel& model, const std::vector<Example>& train, const FinetuneOptions& o,
                                     AdapterSet<float>* adapters, AdamW* optimizer,
                                     const std::function<void(const StepLog&)>& on_step = {});

struct EvalResult {
  double loss = 0;  // mean NLL per scored token
  int64_t n_tokens = 0;
  double perplexity() const;
  int n_generated = 0, n_exact = 0;  // exact-match over examples with a reference
  double rouge_l_sum = 0;            // ROUGE-L F1 of each generated answer (best over the accepted answers)
  double accuracy() const { return n_generated ? static_cast<double>(n_exact) / n_generated : 0.0; }
  double rouge_l() const { return n_generated ? rouge_l_sum / n_generated : 0.0; }
  std::vector<std::pair<std::string, std::string>> samples;  // (reference, generated), first few
};

// max_examples <= 0: all. Exact match compares the greedy answer (up to the end-of-turn
// token or max_new_tokens) with the reference (or any of Example::answers), both with
// surrounding whitespace trimmed; ROUGE-L is the best over the same answers.
// max_generated > 0: only the first that many of the scored examples are also answered greedily.
absl::StatusOr<EvalResult> Evaluate(const LlamaModel& model, const AdapterSet<float>* adapters, const std::vector<Example>& eval,
                                    int max_examples, int max_new_tokens, int batch = 8, int max_generated = 0);

// ROUGE-L F1 (Lin 2004; beta = 1, as Google's rouge-score package): longest common subsequence
// of the two token lists. Tokens: lowercased runs of ASCII letters and digits, and of non-ASCII
// bytes (rouge-score drops those; we keep them so French or German answers are scored).
double RougeL(const std::string& reference, const std::string& candidate);

// Greedy answer to a chat-formatted prompt. int8_activations: decoding with 8-bit activations
// (LlamaContext::set_int8_activations); nullopt: kernels::Int8DecodingDefault() (on unless
// FEDTUNE_DECODE_ACTIVATIONS=f32).
absl::StatusOr<std::string> GenerateGreedy(const LlamaModel& model, const AdapterSet<float>* adapters, const std::string& prompt,
                                           int max_new_tokens, std::optional<bool> int8_activations = std::nullopt);
// Greedy answers to several prompts decoded together, in groups of at most kGenerateBatch whose
// KV caches fit in kGenerateKvBytes: each prompt fills its cache alone, then each step decodes
// one token of every unfinished answer of the group in one pass (LlamaContext::EvalBatch, the
// projections batched over them). The same answers as GenerateGreedy one by one up to the
// rounding of the output layer's batched f32 product (an argmax that is a near-tie can differ;
// the 8-bit products are the same per row whatever the group).
absl::StatusOr<std::vector<std::string>> GenerateGreedyBatch(const LlamaModel& model, const AdapterSet<float>* adapters,
                                                             std::span<const std::string> prompts, int max_new_tokens,
                                                             std::optional<bool> int8_activations = std::nullopt);
// How many answers GenerateGreedyBatch (and so Evaluate) decodes together (at most
// kernels::kInt8Rows, the rows the 8-bit products take). SmolLM2-135M Q4_1 on 2 AVX2 cores with
// f32 activations: 103.1 tokens/s alone, 167.7 / 222.8 / 245.2 summed over 8 / 16 / 32 sequences;
// 48 WordNet answers took 23.6 s one by one, 13.5 s 16 at a time (docs/guide.md "Batched
// decoding"; with 8-bit activations: "Decoding with 8-bit activations"). The
// group's KV caches stay within kGenerateKvBytes: 16 of ~8 MB for SmolLM2's prompts, 3 for an
// 8B model's 300-token prompts.
inline constexpr int kGenerateBatch = 16;
inline constexpr int64_t kGenerateKvBytes = int64_t{256} << 20;

}  // namespace fedtune::model

// Forward and backward through the whole decoder with a frozen (quantized) base and trainable
// adapters, for a batch of equal-length sequences. Gradients flow to activations through the
// dequantized base tiles and into adapter parameters only. Loss: causal-LM cross-entropy on
// the positions whose target is >= 0 (response tokens), chunked over the vocabulary.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "kernels/backend.h"
#include "model/adapter.h"
#include "model/llama.h"

namespace fedtune::model {

struct Batch {
  int64_t n_seq = 0, len = 0;
  std::vector<int32_t> tokens;   // n_seq * len
  std::vector<int32_t> targets;  // n_seq * len; targets[i] = token to predict at i, -1 = not scored
  // Packed rows (several examples per row): the position of each token within its example
  // (n_seq * len; empty = 0, 1, ..., len-1 in every row). A token attends to the tokens of its
  // own example only: keys i - pos[i] .. i.
  std::vector<int32_t> pos;
  int64_t n_scored() const;
};

struct TrainerOptions {
  // Keep only each layer's input between the passes and recompute the rest during backward
  // (one extra forward, ~30 MiB instead of ~0.5 GiB per layer at batch 8 x 256 on SmolLM2).
  // Without it every layer's activations are kept.
  bool recompute = true;
  // Sequences per forward/backward pass (0 = the whole batch): a batch is processed in slices
  // of this many rows with the gradient summed over them, so activation memory scales with the
  // slice while the result is the whole batch's (up to float summation order).
  int64_t micro_batch = 0;
  // Kernel backend for Trainer<float> (null: cpu-fast); Trainer<double> always runs the
  // reference kernels (finite-difference checks).
  kernels::Backend* backend = nullptr;
  // Adapter dropout (LoRA's lora_dropout; the DiaBlo paper uses 0.05): during training steps
  // each adapter's input x is replaced by x * mask / (1 - p), mask ~ Bernoulli(1 - p) per
  // element; the base path sees x. The mask is a hash of (dropout seed, layer, module, token,
  // feature), so backward and recomputation regenerate it instead of storing it.
  float adapter_dropout = 0.0f;
  // Memory-driven choice per batch (> 0 overrides recompute/micro_batch): keep activations
  // (no recomputation: ~1.4x faster) for as many sequences per pass as fit in this many bytes of
  // layer caches (KeptBytesPerSequence; one layer's backward temporaries, the cross-entropy
  // chunk and the model come on top), recompute only when not even one sequence fits.
  int64_t activation_budget_bytes = 0;
};

// How one batch is run: recompute or keep, and sequences per pass.
struct PassPlan {
  bool recompute = true;
  int64_t micro_batch = 0;
};

template <typename T>
class Trainer {
 public:
  Trainer(const LlamaModel& model, AdapterSet<T>* adapters, const TrainerOptions& options);
  Trainer(const LlamaModel& model, AdapterSet<T>* adapters, bool recompute = true)
      : Trainer(model, adapters, TrainerOptions{.recompute = recompute}) {}
  ~Trainer();

  // Returns the summed NLL over scored positions. With backward, adds grad_scale * d(sum NLL)
  // to the adapters' gradients (in per-example mode: keeps each sequence's apart instead).
  absl::StatusOr<double> Step(const Batch& batch, T grad_scale, bool backward);

  // Seed of the dropout masks of the following steps (set per optimizer step for fresh masks).
  void set_dropout_seed(uint64_t seed) { dropout_seed_ = seed; }
  // Forward-only steps use the training forward too (dropout on): finite-difference checks.
  void set_training_forward(bool on) { training_forward_ = on; }

  // Bytes of layer activations one sequence of `len` tokens keeps between the passes without
  // recomputation (the caches of the layers from the lowest one with adapters up, adapters
  // included; attention probabilities are never kept).
  int64_t KeptBytesPerSequence(int64_t len) const;
  // What Step does with a batch of n_seq x len under the options.
  PassPlan PlanFor(int64_t n_seq, int64_t len) const;

  // Validates a batch against the model (shape, token ids, context length).
  absl::Status Check(const Batch& batch) const;

  // Per-example gradients (batched DP-SGD, model/finetune.cc): while on, Step's backward keeps
  // the adapters' parameter gradients of each sequence of the batch apart (sequence k's in slot
  // k; the gradient of that sequence's summed NLL times grad_scale) instead of adding them to the
  // adapters' gradients. Needs kernels whose buffers are host memory (FailedPrecondition from
  // Step otherwise; PerExampleSupported says which).
  void set_per_example(bool on) { per_example_ = on; }
  bool PerExampleSupported() const;
  // Sets the adapters' gradients to scale x sequence k's gradient from the last per-example Step.
  void LoadExampleGradient(int64_t k, T scale);

 private:
  struct LayerCache;
  struct Work;
  std::unique_ptr<Work> work_;
  double Slice(const Batch& b, int64_t s0, int64_t n_seq, T grad_scale, bool backward, bool recompute);
  void LayerForward(int64_t l, const T* x_in, LayerCache& c, T* x_out);
  // dx_in null: the gradient w.r.t. the layer input is not needed (the lowest trained layer).
  void LayerBackward(int64_t l, LayerCache& c, const T* dx_out, T* dx_in);
  // Lowest layer with an adapter (n_layer if none): backward stops there.
  int64_t FirstTrainedLayer() const;
  // Points the adapter ops at this step's parameters and gradient accumulators (float: uploads
  // the parameters to backend buffers and zeroes the accumulators; see Work::adapter), and
  // adds the accumulated gradients to the adapters' host gradients after backward.
  void BindAdapters(bool backward, int64_t n_seq);
  void CollectGradients();
  // z: LoRA's A x (M x rank; unused for DiaBlo).
  void AdapterForward(int64_t l, Module mod, const T* x, T* y, T* z);
  void AdapterBackward(int64_t l, Module mod, const T* x, const T* z, const T* dy, T* dx);

  const LlamaModel& m_;
  AdapterSet<T>* adapters_;
  TrainerOptions opt_;
  kernels::Backend* backend_ = nullptr;  // float only
  int64_t n_seq_ = 0, len_ = 0;
  std::vector<int32_t> pos_;
  const int32_t* seg_pos_ = nullptr;  // packed rows: pos_ (else null: plain causal attention)
  int64_t n_positions_ = 0;           // the batch's largest position + 1 (LlamaConfig::FreqFactors)
  bool training_ = false;             // this slice runs backward: dropout applies
  bool training_forward_ = false;
  int64_t tok0_ = 0;                  // batch index of the slice's first token (dropout masks)
  uint64_t dropout_seed_ = 0;
  bool per_example_ = false;
  bool per_example_step_ = false;  // this Step keeps per-example gradients
  bool ex_valid_ = false;          // ex_grads_ holds the last Step's (LoadExampleGradient may read it)
  int64_t ex_stride_ = 0;          // values in one example's slot
  std::vector<T> ex_grads_;        // n_seq x ex_stride_ (per_example_)
  // mask * 1/(1-p) for the adapter input of (layer l, module mod) over this slice: M x in.
  void DropoutScale(int64_t l, Module mod, int64_t in, T* scale) const;
};

}  // namespace fedtune::model

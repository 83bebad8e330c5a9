// Forward and backward through the whole decoder with a frozen (quantized) base and trainable
// adapters, for a batch of equal-length sequences. Gradients flow to activations through the
// dequantized base tiles and into adapter parameters only. Loss: causal-LM cross-entropy on
// the positions whose target is >= 0 (response tokens), chunked over the vocabulary.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "model/adapter.h"
#include "model/llama.h"

namespace fedtune::model {

struct Batch {
  int64_t n_seq = 0, len = 0;
  std::vector<int32_t> tokens;   // n_seq * len
  std::vector<int32_t> targets;  // n_seq * len; targets[i] = token to predict at i, -1 = not scored
  int64_t n_scored() const;
};

template <typename T>
class Trainer {
 public:
  // recompute: keep only each layer's input between the passes and recompute the rest during
  // backward (one extra forward, ~30 MiB instead of ~0.5 GiB per layer at batch 8 x 256 on
  // SmolLM2). Without it every layer's activations are kept.
  Trainer(const LlamaModel& model, AdapterSet<T>* adapters, bool recompute = true);
  ~Trainer();

  // Returns the summed NLL over scored positions. With backward, adds grad_scale * d(sum NLL)
  // to the adapters' gradients.
  absl::StatusOr<double> Step(const Batch& batch, T grad_scale, bool backward);

  // Validates a batch against the model (shape, token ids, context length).
  absl::Status Check(const Batch& batch) const;

 private:
  struct LayerCache;
  void LayerForward(int64_t l, const T* x_in, LayerCache& c, T* x_out);
  void LayerBackward(int64_t l, LayerCache& c, const T* dx_out, T* dx_in);

  const LlamaModel& m_;
  AdapterSet<T>* adapters_;
  bool recompute_;
  int64_t n_seq_ = 0, len_ = 0;
  std::vector<int32_t> pos_;
};

}  // namespace fedtune::model

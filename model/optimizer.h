// AdamW with decoupled weight decay (Loshchilov & Hutter), linear warm-up then cosine decay,
// global-norm gradient clipping, and a running diagonal Fisher estimate (mean of squared
// per-step gradients) kept as a by-product for uncertainty-aware merging.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "model/adapter.h"

namespace fedtune::model {

struct OptimizerConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float weight_decay = 0.0f;
  float clip_norm = 1.0f;  // <= 0: no clipping
  int warmup_steps = 0;
  int total_steps = 100;
  float min_lr_ratio = 0.1f;  // cosine decays to lr * min_lr_ratio
};

// Learning rate at optimizer step `step` (0-based).
float LearningRate(const OptimizerConfig& c, int step);

class AdamW {
 public:
  explicit AdamW(OptimizerConfig c) : c_(c) {}
  // Kernel backend for the update (default: cpu-fast). A device backend is not used: the state
  // is in host memory, so the update runs on cpu-fast (see Step).
  void set_backend(kernels::Backend* b) { backend_ = b; }
  // Applies one update from the accumulated gradients (then zeroes them). Returns the global
  // gradient norm before clipping. Also folds the (unclipped) squared gradients into the Fisher.
  double Step(AdapterSet<float>& params);
  int step() const { return step_; }
  const OptimizerConfig& config() const { return c_; }
  // Mean of squared gradients per trainable tensor over the steps so far.
  const std::map<std::string, std::vector<float>>& fisher() const { return fisher_; }
  int fisher_count() const { return step_; }
  // Optimizer state for checkpoints.
  std::map<std::string, std::vector<float>>& m() { return m_; }
  std::map<std::string, std::vector<float>>& v() { return v_; }
  std::map<std::string, std::vector<float>>& fisher_mut() { return fisher_; }
  void set_step(int s) { step_ = s; }

 private:
  OptimizerConfig c_;
  int step_ = 0;
  kernels::Backend* backend_ = nullptr;
  std::map<std::string, std::vector<float>> m_, v_, fisher_;
};

}  // namespace fedtune::model

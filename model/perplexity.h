// Perplexity over a token sequence with a sliding window (the Hugging Face recipe):
// windows [begin, begin + window) advance by `stride`; each token is scored once, by the first
// window that contains it with at least one token of context before it. Each window starts
// from an empty cache.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "model/llama.h"

namespace fedtune::model {

struct PerplexityResult {
  double nll_sum = 0.0;   // natural-log negative log-likelihood, summed
  int64_t n_scored = 0;
  double perplexity() const;
  double tokens_per_second = 0.0;
};

absl::StatusOr<PerplexityResult> Perplexity(const LlamaModel& model, std::span<const int32_t> tokens,
                                            int64_t window, int64_t stride,
                                            const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace fedtune::model

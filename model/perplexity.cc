#include "model/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

namespace fedtune::model {

double PerplexityResult::perplexity() const {
  return n_scored > 0 ? std::exp(nll_sum / static_cast<double>(n_scored)) : 0.0;
}

absl::StatusOr<PerplexityResult> Perplexity(const LlamaModel& model, std::span<const int32_t> tokens,
                                            int64_t window, int64_t stride,
                                            const std::function<void(int64_t, int64_t)>& progress) {
  if (window < 2 || stride < 1 || stride > window) {
    return absl::InvalidArgumentError(absl::StrCat("perplexity needs window >= 2 and 1 <= stride <= window (got ", window, ", ", stride, ")"));
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < 2) return absl::InvalidArgumentError("perplexity needs at least 2 tokens");
  const int64_t V = model.config().n_vocab;
  LlamaContext ctx(model, window);
  PerplexityResult r;
  std::vector<float> logits;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t evaluated = 0, prev_end = 0;
  for (int64_t begin = 0;; begin += stride) {
    const int64_t end = std::min(begin + window, n);
    ctx.Reset();
    FT_RETURN_IF_ERROR(ctx.Eval(tokens.subspan(static_cast<size_t>(begin), static_cast<size_t>(end - begin)), true, &logits));
    evaluated += end - begin;
    for (int64_t j = std::max(prev_end, begin + 1); j < end; ++j) {
      const float* lg = logits.data() + (j - 1 - begin) * V;
      const float mx = *std::max_element(lg, lg + V);
      double se = 0.0;
      for (int64_t i = 0; i < V; ++i) se += std::exp(static_cast<double>(lg[i] - mx));
      r.nll_sum += std::log(se) + mx - lg[tokens[static_cast<size_t>(j)]];
      ++r.n_scored;
    }
    prev_end = end;
    if (progress) progress(end, n);
    if (end == n) break;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.tokens_per_second = secs > 0 ? static_cast<double>(evaluated) / secs : 0.0;
  return r;
}

}  // namespace fedtune::model

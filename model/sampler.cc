#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace fedtune::model {

int32_t Argmax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (o_.temperature <= 0.0f) return Argmax(logits);
  const float mx = *std::max_element(logits.begin(), logits.end());
  std::vector<std::pair<float, int32_t>> p(logits.size());
  double sum = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float e = std::exp((logits[i] - mx) / o_.temperature);
    p[i] = {e, static_cast<int32_t>(i)};
    sum += e;
  }
  std::sort(p.begin(), p.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  size_t keep = p.size();
  if (o_.top_p < 1.0f) {
    double acc = 0.0;
    for (size_t i = 0; i < p.size(); ++i) {
      acc += p[i].first / sum;
      if (acc >= o_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0.0;
  for (size_t i = 0; i < keep; ++i) kept += p[i].first;
  double r = rng_.Uniform() * kept;
  for (size_t i = 0; i < keep; ++i) {
    r -= p[i].first;
    if (r <= 0.0) return p[i].second;
  }
  return p[keep - 1].second;
}

}  // namespace fedtune::model

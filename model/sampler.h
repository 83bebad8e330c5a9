// Next-token selection: greedy (temperature 0) or temperature + nucleus (top-p) sampling.
#pragma once

#include <cstdint>
#include <span>

#include "common/rng.h"

namespace fedtune::model {

struct SamplerOptions {
  float temperature = 0.0f;  // 0 = greedy
  float top_p = 1.0f;        // keep the smallest set of tokens whose probability >= top_p
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(SamplerOptions o) : o_(o), rng_(o.seed) {}
  int32_t Sample(std::span<const float> logits);

 private:
  SamplerOptions o_;
  Rng rng_;
};

int32_t Argmax(std::span<const float> logits);

}  // namespace fedtune::model

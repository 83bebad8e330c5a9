// Built-in instruction tasks generated deterministically from a seed (no downloads), scored by
// exact match. The simulation issue grows this into a suite; `record` is the first: a format
// conversion the base model cannot do without training (its output format is made up).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace fedtune::model {

// Names of the built-in tasks: record, date, sum, sentiment, extract (synthetic, generated from
// the seed), then the real-text sources of model/text_sources.h (read from Debian packages).
const std::vector<std::string>& TaskNames();
// JSONL lines {"prompt": ..., "response": ...}.
absl::StatusOr<std::vector<std::string>> GenerateTask(const std::string& name, int n, uint64_t seed);

}  // namespace fedtune::model

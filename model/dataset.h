// Fine-tuning data: JSONL with {"prompt","response"[,"answers"]} or {"messages":[{"role","content"}...]}
// in the model's chat format (only assistant text and its end marker are scored), or plain
// text (every token scored, cut into windows). Deterministic shuffling, held-out split,
// truncation with a count, batching by padding.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/rng.h"
#include "common/status.h"
#include "model/tokenizer.h"
#include "model/trainer.h"

namespace fedtune::model {

struct Example {
  std::vector<int32_t> tokens;
  std::vector<int32_t> targets;  // same length; -1 where not scored
  std::string prompt_text;       // chat-formatted prompt (for generation-based evaluation)
  std::string reference;         // expected assistant answer (exact-match), may be empty
  std::vector<std::string> answers;  // JSONL "answers": every accepted answer (exact match with any counts)
};

struct DatasetOptions {
  int64_t max_len = 256;     // longer examples are truncated (and counted)
  double holdout = 0.1;      // fraction kept for evaluation
  int64_t max_holdout = 200;
  uint64_t seed = 1;
};

struct Dataset {
  std::vector<Example> train, eval;
  int64_t truncated = 0;
};

// InvalidArgument naming file:line for malformed JSON or missing fields; NotFound for a
// missing file; InvalidArgument for an empty set.
absl::StatusOr<Dataset> LoadDataset(const std::string& path, const Tokenizer& tok, const DatasetOptions& o);
// Builds examples from in-memory JSONL lines (tests, generated tasks).
absl::StatusOr<Dataset> DatasetFromJsonl(const std::vector<std::string>& lines, const std::string& source,
                                         const Tokenizer& tok, const DatasetOptions& o);

// Pads the examples to the longest and stacks them into a Batch (pad token: EOS, unscored).
Batch MakeBatch(const std::vector<const Example*>& examples, int32_t pad_id);

// Sequence packing: places the examples into as few rows as first-fit-decreasing finds, each
// row as long as the longest example (no example is split), with Batch::pos restarting at 0
// for every example so attention stays within it; what is left of a row is padding (its own
// unscored segment). Same loss and gradients as MakeBatch (without adapter dropout, whose
// masks follow token places), fewer tokens to process when lengths differ.
Batch MakePackedBatch(const std::vector<const Example*>& examples, int32_t pad_id);

}  // namespace fedtune::model

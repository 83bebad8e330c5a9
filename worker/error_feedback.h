// Error feedback of compressed uploads across restarts (issue 21): the residual going into the
// last trained round and the one coming out of it, with the run and round, in one safetensors
// file written atomically after each compressed round. A round after it starts from `after`;
// the same round again (trained, then the process died before or during the upload, and the
// kept update was not reused) from `before`, so a restart never counts a round's compression
// error twice. Not thread-safe: a worker trains one task at a time (RunDaemon's runner).
#pragma once

#include <string>

#include "aggregation/tensors.h"
#include "common/status.h"

namespace fedtune::worker {

class ErrorFeedback {
 public:
  explicit ErrorFeedback(std::string path = "") : path_(std::move(path)) {}
  // The residual round `round` of `run` starts from: `after` of an earlier round, `before` of
  // the same round, nothing for another run (or a file that cannot be read: warned, from zero).
  aggregation::TensorMap For(const std::string& run, int round);
  // Records round `round`'s residual in (`start`) and out (`end`) and writes the file. A round
  // older than the one recorded changes nothing (the newer state stays).
  absl::Status Save(const std::string& run, int round, aggregation::TensorMap start, aggregation::TensorMap end);
  // Round `round`'s update did not count (refused, or not sent): the rounds after it start from
  // its `before`, as if it had not been trained (its compression error is not carried forward
  // with nothing of it merged). Nothing for another run or round than the one recorded.
  absl::Status Discard(const std::string& run, int round);
  int round() const { return round_; }

 private:
  void Load();
  std::string path_;  // empty: in memory only
  bool loaded_ = false;
  std::string run_id_;
  int round_ = -1;  // the round `after_` comes out of (-1: none yet)
  aggregation::TensorMap before_, after_;
};

}  // namespace fedtune::worker

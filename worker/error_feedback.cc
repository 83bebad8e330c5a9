#include "worker/error_feedback.h"

#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "common/log.h"
#include "model/safetensors.h"

namespace fedtune::worker {

void ErrorFeedback::Load() {
  loaded_ = true;
  if (path_.empty() || !std::filesystem::exists(path_)) return;
  auto fail = [&](const std::string& why) {
    FT_LOG_WARN("error-feedback residual {} is unusable ({}); starting from zero", path_, why);
    before_.clear();
    after_.clear();
    run_id_.clear();
    round_ = -1;
  };
  auto file = model::SafetensorsFile::Open(path_);
  if (!file.ok()) return fail(file.status().ToString());
  const auto& md = (*file)->metadata();
  const auto run = md.find("fedtune.run_id");
  const auto rd = md.find("fedtune.round");
  if (run == md.end() || rd == md.end() || !absl::SimpleAtoi(rd->second, &round_)) return fail("no run or round");
  run_id_ = run->second;
  for (const model::SafeTensor& st : (*file)->tensors()) {
    auto x = (*file)->ToF32(st.name);
    if (!x.ok()) return fail(x.status().ToString());
    aggregation::TensorMap* into = absl::StartsWith(st.name, "before/") ? &before_ : absl::StartsWith(st.name, "after/") ? &after_ : nullptr;
    if (into == nullptr) return fail("a tensor outside before/ and after/: " + st.name);
    (*into)[st.name.substr(st.name.find('/') + 1)].assign(x->data<float>(), x->data<float>() + x->size());
  }
}

aggregation::TensorMap ErrorFeedback::For(const std::string& run, int round) {
  if (!loaded_) Load();
  if (run != run_id_ || round_ < 0 || round < round_) return {};
  return round == round_ ? before_ : after_;
}

absl::Status ErrorFeedback::Save(const std::string& run, int round, aggregation::TensorMap start, aggregation::TensorMap end) {
  if (!loaded_) Load();
  if (run == run_id_ && round < round_) return absl::OkStatus();
  run_id_ = run;
  round_ = round;
  before_ = std::move(start);
  after_ = std::move(end);
  if (path_.empty()) return absl::OkStatus();
  model::SafetensorsWriter w;
  for (const auto& [name, v] : before_) FT_RETURN_IF_ERROR(w.AddF32("before/" + name, {static_cast<int64_t>(v.size())}, v));
  for (const auto& [name, v] : after_) FT_RETURN_IF_ERROR(w.AddF32("after/" + name, {static_cast<int64_t>(v.size())}, v));
  w.SetMetadata("fedtune.run_id", run);
  w.SetMetadata("fedtune.round", std::to_string(round));
  return w.WriteFile(path_);
}

absl::Status ErrorFeedback::Discard(const std::string& run, int round) {
  if (!loaded_) Load();
  if (run != run_id_ || round != round_) return absl::OkStatus();
  aggregation::TensorMap start = before_;
  return Save(run, round, std::move(start), before_);
}

}  // namespace fedtune::worker

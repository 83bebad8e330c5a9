#include "model/dataset.h"

#include <algorithm>
#include <fstream>

#include "absl/strings/ascii.h"
#include "common/log.h"
#include "nlohmann/json.hpp"

namespace fedtune::model {
namespace {

// Appends text to tokens; scored text also writes targets (token i predicts token i+1).
void Append(const Tokenizer& tok, const std::string& text, bool scored, Example* ex, std::vector<bool>* score) {
  const auto ids = tok.Encode(text);
  ex->tokens.insert(ex->tokens.end(), ids.begin(), ids.end());
  score->insert(score->end(), ids.size(), scored);
}

Example Finish(Example ex, const std::vector<bool>& score) {
  ex.targets.assign(ex.tokens.size(), -1);
  for (size_t i = 0; i + 1 < ex.tokens.size(); ++i) {
    if (score[i + 1]) ex.targets[i] = ex.tokens[i + 1];
  }
  return ex;
}

// Deterministic Fisher-Yates shuffle, then the held-out split.
Dataset ShuffleAndSplit(std::vector<Example> all, const DatasetOptions& o) {
  Rng rng(o.seed);
  for (size_t i = all.size(); i > 1; --i) std::swap(all[i - 1], all[rng.Below(i)]);
  Dataset d;
  const size_t n_eval = all.size() < 2 ? 0 : std::min<size_t>(static_cast<size_t>(o.max_holdout), static_cast<size_t>(static_cast<double>(all.size()) * o.holdout));
  d.eval.assign(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n_eval));
  d.train.assign(all.begin() + static_cast<std::ptrdiff_t>(n_eval), all.end());
  return d;
}

}  // namespace

absl::StatusOr<Dataset> DatasetFromJsonl(const std::vector<std::string>& lines, const std::string& source, const Tokenizer& tok,
                                         const DatasetOptions& o) {
  std::vector<Example> all;
  int64_t truncated = 0;
  const std::string end = "<|im_end|>\n";
  for (size_t ln = 0; ln < lines.size(); ++ln) {
    const std::string& line = lines[ln];
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto where = [&](const std::string& what) { return absl::InvalidArgumentError(absl::StrCat(source, ":", ln + 1, ": ", what)); };
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) return where("malformed JSON");
    if (!j.is_object()) return where("expected a JSON object");
    Example ex;
    std::vector<bool> score;
    if (j.contains("messages")) {
      if (!j["messages"].is_array() || j["messages"].empty()) return where("'messages' must be a non-empty array");
      std::vector<ChatMessage> msgs;
      for (const auto& m : j["messages"]) {
        if (!m.is_object() || !m.contains("role") || !m.contains("content") || !m["role"].is_string() || !m["content"].is_string()) {
          return where("each message needs string 'role' and 'content'");
        }
        msgs.push_back({m["role"], m["content"]});
      }
      // Context (system/user turns, the assistant header) is not scored; each assistant
      // turn's content and its end marker are. The model's default system prompt is added
      // as FormatChat would.
      std::string context = (msgs[0].role == "system") ? "" : tok.FormatChat({}, false);
      Append(tok, context, false, &ex, &score);
      bool has_answer = false;
      for (const auto& m : msgs) {
        if (m.role == "assistant") {
          const std::string header = "<|im_start|>assistant\n";
          Append(tok, header, false, &ex, &score);
          context += header;
          if (!has_answer) ex.prompt_text = context, ex.reference = m.content;
          has_answer = true;
          Append(tok, m.content + end, true, &ex, &score);
          context += m.content + end;
        } else {
          const std::string turn = "<|im_start|>" + m.role + "\n" + m.content + end;
          Append(tok, turn, false, &ex, &score);
          context += turn;
        }
      }
      if (!has_answer) return where("no assistant message to learn from");
    } else {
      if (!j.contains("prompt") || !j["prompt"].is_string()) return where("missing string field 'prompt' (or 'messages')");
      if (!j.contains("response") || !j["response"].is_string()) return where("missing string field 'response'");
      ex.prompt_text = tok.FormatChat({{"user", j["prompt"]}}, true);
      ex.reference = j["response"];
      if (j.contains("answers")) {
        if (!j["answers"].is_array()) return where("'answers' must be an array of strings");
        for (const auto& a : j["answers"]) {
          if (!a.is_string()) return where("'answers' must be an array of strings");
          if (absl::StripAsciiWhitespace(a.get<std::string>()).empty()) return where("'answers' has an empty answer");
          ex.answers.push_back(a);
        }
      }
      Append(tok, ex.prompt_text, false, &ex, &score);
      Append(tok, ex.reference + end, true, &ex, &score);
    }
    if (static_cast<int64_t>(ex.tokens.size()) > o.max_len) {
      ex.tokens.resize(static_cast<size_t>(o.max_len));
      score.resize(static_cast<size_t>(o.max_len));
      ++truncated;
    }
    all.push_back(Finish(std::move(ex), score));
  }
  if (all.empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": no examples"));
  if (truncated > 0) FT_LOG_WARN("{}: {} of {} examples longer than {} tokens were truncated", source, truncated, all.size(), o.max_len);
  Dataset d = ShuffleAndSplit(std::move(all), o);
  d.truncated = truncated;
  return d;
}

absl::StatusOr<Dataset> LoadDataset(const std::string& path, const Tokenizer& tok, const DatasetOptions& o) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open dataset '", path, "'"));
  std::vector<std::string> lines;
  std::string line;
  const bool jsonl = path.size() >= 6 && (path.ends_with(".jsonl") || path.ends_with(".json"));
  if (jsonl) {
    while (std::getline(in, line)) lines.push_back(line);
    return DatasetFromJsonl(lines, path, tok, o);
  }
  // Plain text: windows of max_len tokens, every token scored.
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto ids = tok.Encode(text, false);
  if (ids.size() < 2) return absl::InvalidArgumentError(absl::StrCat(path, ": text too short"));
  std::vector<Example> all;
  for (size_t s = 0; s + 1 < ids.size(); s += static_cast<size_t>(o.max_len)) {
    Example ex;
    ex.tokens.assign(ids.begin() + static_cast<std::ptrdiff_t>(s), ids.begin() + static_cast<std::ptrdiff_t>(std::min(ids.size(), s + static_cast<size_t>(o.max_len))));
    ex.targets.assign(ex.tokens.size(), -1);
    for (size_t i = 0; i + 1 < ex.tokens.size(); ++i) ex.targets[i] = ex.tokens[i + 1];
    all.push_back(std::move(ex));
  }
  return ShuffleAndSplit(std::move(all), o);
}

Batch MakeBatch(const std::vector<const Example*>& examples, int32_t pad_id) {
  Batch b;
  b.n_seq = static_cast<int64_t>(examples.size());
  for (const auto* e : examples) b.len = std::max<int64_t>(b.len, static_cast<int64_t>(e->tokens.size()));
  b.tokens.assign(static_cast<size_t>(b.n_seq * b.len), pad_id);
  b.targets.assign(b.tokens.size(), -1);
  for (size_t i = 0; i < examples.size(); ++i) {
    std::copy(examples[i]->tokens.begin(), examples[i]->tokens.end(), b.tokens.begin() + static_cast<std::ptrdiff_t>(i) * b.len);
    std::copy(examples[i]->targets.begin(), examples[i]->targets.end(), b.targets.begin() + static_cast<std::ptrdiff_t>(i) * b.len);
  }
  return b;
}

Batch MakePackedBatch(const std::vector<const Example*>& examples, int32_t pad_id) {
  Batch b;
  for (const auto* e : examples) {
    FT_CHECK(e->targets.size() == e->tokens.size());
    b.len = std::max<int64_t>(b.len, static_cast<int64_t>(e->tokens.size()));
  }
  // First-fit decreasing by length (stable on ties: deterministic).
  std::vector<size_t> order(examples.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return examples[x]->tokens.size() > examples[y]->tokens.size(); });
  std::vector<std::vector<size_t>> rows;
  std::vector<int64_t> used;
  for (size_t i : order) {
    const auto n = static_cast<int64_t>(examples[i]->tokens.size());
    size_t r = 0;
    while (r < rows.size() && used[r] + n > b.len) ++r;
    if (r == rows.size()) {
      rows.emplace_back();
      used.push_back(0);
    }
    rows[r].push_back(i);
    used[r] += n;
  }
  b.n_seq = static_cast<int64_t>(rows.size());
  b.tokens.assign(static_cast<size_t>(b.n_seq * b.len), pad_id);
  b.targets.assign(b.tokens.size(), -1);
  b.pos.assign(b.tokens.size(), 0);
  for (size_t r = 0; r < rows.size(); ++r) {
    size_t at = r * static_cast<size_t>(b.len);
    for (size_t i : rows[r]) {
      const Example& e = *examples[i];
      std::copy(e.tokens.begin(), e.tokens.end(), b.tokens.begin() + static_cast<std::ptrdiff_t>(at));
      std::copy(e.targets.begin(), e.targets.end(), b.targets.begin() + static_cast<std::ptrdiff_t>(at));
      for (size_t k = 0; k < e.tokens.size(); ++k) b.pos[at + k] = static_cast<int32_t>(k);
      at += e.tokens.size();
    }
    for (int32_t k = 0; at < (r + 1) * static_cast<size_t>(b.len); ++at, ++k) b.pos[at] = k;  // padding segment
  }
  return b;
}

}  // namespace fedtune::model

// Inference benchmark on a real model: prompt processing (one batch of --pp tokens) and
// generation (--tg tokens one at a time after a 1-token prompt), tokens/s over --reps runs,
// and peak RSS. Same protocol as bench/llamacpp_bench.py so the two print comparable rows.
// --batch B...: generation of B sequences decoded together (LlamaContext::EvalBatch), tokens/s
// summed over the sequences. --answers FILE.jsonl: greedy answers to the file's prompts (as
// evaluation decodes them), one by one vs model::kGenerateBatch together, seconds each, and how
// many equal the answers decoded with f32 activations. --f32-decoding: decoding with f32
// activations throughout (as FEDTUNE_DECODE_ACTIVATIONS=f32) instead of 8-bit ones.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "kernels/thread_pool.h"
#include "model/dataset.h"
#include "model/finetune.h"
#include "model/llama.h"
#include "model/sampler.h"

using namespace fedtune;
using Clock = std::chrono::steady_clock;

namespace {

struct Stats {
  double mean = 0, sd = 0;
};
Stats Summarize(const std::vector<double>& v) {
  Stats s;
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
  s.sd = v.size() > 1 ? std::sqrt(s.sd / static_cast<double>(v.size() - 1)) : 0.0;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fedtune inference benchmark"};
  std::string model_path;
  int pp = 512, tg = 128, reps = 3, threads = 0;
  app.add_option("model", model_path, "GGUF model")->required();
  app.add_option("--pp", pp, "Prompt tokens")->check(CLI::Range(1, 8192));
  app.add_option("--tg", tg, "Generated tokens")->check(CLI::Range(1, 8192));
  app.add_option("--reps", reps, "Repetitions")->check(CLI::Range(1, 100));
  app.add_option("-t,--threads", threads, "Threads (0 = all cores)");
  std::vector<int> batches = {8, 16};
  app.add_option("--batch", batches, "Sequences decoded together (tg rows per batch size)");
  std::string answers;
  int max_answers = 48, max_new = 40;
  app.add_option("--answers", answers, "JSONL whose prompts are answered greedily, one by one vs batched");
  app.add_option("--n-answers", max_answers, "Prompts of --answers to answer")->check(CLI::Range(1, 100000));
  app.add_option("--max-new", max_new, "Longest answer in tokens")->check(CLI::Range(1, 4096));
  bool f32_decoding = false, evaluation_only = false;
  app.add_flag("--f32-decoding", f32_decoding, "Decode with f32 activations (default: 8-bit, as llama.cpp)");
  app.add_flag("--evaluation-only", evaluation_only,
               "Only answer --answers' prompts as an evaluation does (batched) and time it; no other test");
  CLI11_PARSE(app, argc, argv);
  kernels::SetThreads(threads);
  const bool int8 = !f32_decoding && kernels::Int8DecodingDefault();
  f32_decoding = !int8;
  const std::string path = std::string(kernels::CpuPathName()) + (f32_decoding ? ", f32 activations" : ", int8 activations");
  auto loaded = model::LlamaModel::Load(model_path);
  if (!loaded.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  const auto& m = **loaded;
  // The first --n-answers prompts of --answers.
  auto load_prompts = [&]() -> absl::StatusOr<std::vector<std::string>> {
    model::DatasetOptions dopt;
    dopt.holdout = 0;
    auto data = model::LoadDataset(answers, *m.tokenizer(), dopt);
    if (!data.ok()) return data.status();
    std::vector<std::string> prompts;
    for (const auto& e : data->train)
      if (!e.prompt_text.empty() && static_cast<int>(prompts.size()) < max_answers) prompts.push_back(e.prompt_text);
    return prompts;
  };
  if (evaluation_only) {  // what a round's evaluation decodes: all prompts, 16 at a time
    if (answers.empty()) {
      std::fprintf(stderr, "error: --evaluation-only needs --answers\n");
      return 1;
    }
    auto prompts = load_prompts();
    if (!prompts.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(prompts.status().message()).c_str());
      return 1;
    }
    const auto t0 = Clock::now();
    auto got = model::GenerateGreedyBatch(m, nullptr, *prompts, max_new, int8);
    if (!got.ok()) return 1;
    const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
    int64_t generated = 0;
    for (const auto& a : *got) generated += static_cast<int64_t>(m.tokenizer()->Encode(a).size());
    std::printf("| fedtune evaluation decoding (%s; %zu prompts, <= %d new tokens, %d together) | %d | evaluation | %.1f s (%.1f answers/s, %.1f generated tokens/s) |\n",
                path.c_str(), prompts->size(), max_new, model::kGenerateBatch, kernels::DefaultPool().size(), sec,
                static_cast<double>(prompts->size()) / sec, static_cast<double>(generated) / sec);
    return 0;
  }
  Rng rng(1);
  std::vector<int32_t> prompt(static_cast<size_t>(pp));
  for (auto& t : prompt) t = static_cast<int32_t>(17 + rng.Below(static_cast<uint64_t>(m.config().n_vocab - 17)));
  model::LlamaContext ctx(m, pp + tg + 1);
  ctx.set_int8_activations(int8);
  std::vector<float> logits;
  std::vector<double> pp_rates, tg_rates;
  for (int r = 0; r < reps + 1; ++r) {  // first round warms up caches and page faults
    ctx.Reset();
    const auto t0 = Clock::now();
    if (!ctx.Eval(prompt, false, &logits).ok()) return 1;
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (r > 0) pp_rates.push_back(pp / s);
    ctx.Reset();
    if (!ctx.Eval(std::vector<int32_t>{prompt[0]}, false, &logits).ok()) return 1;
    const auto t1 = Clock::now();
    for (int i = 0; i < tg; ++i) {
      const int32_t next = model::Argmax(logits);
      if (!ctx.Eval(std::vector<int32_t>{next}, false, &logits).ok()) return 1;
    }
    const double s2 = std::chrono::duration<double>(Clock::now() - t1).count();
    if (r > 0) tg_rates.push_back(tg / s2);
  }
  const Stats a = Summarize(pp_rates), b = Summarize(tg_rates);
  std::printf("| fedtune (%s) | %d | pp%d | %.1f ± %.1f |\n", path.c_str(), kernels::DefaultPool().size(), pp, a.mean, a.sd);
  std::printf("| fedtune (%s) | %d | tg%d | %.1f ± %.1f |\n", path.c_str(), kernels::DefaultPool().size(), tg, b.mean, b.sd);
  struct rusage single {};  // peak RSS of the single-sequence protocol (llama.cpp's row compares with it)
  getrusage(RUSAGE_SELF, &single);
  std::printf("| fedtune | peak RSS | %.0f MiB |\n", static_cast<double>(single.ru_maxrss) / 1024.0);
  for (int nb : batches) {
    if (nb < 1) continue;
    std::vector<std::unique_ptr<model::LlamaContext>> ctxs;
    std::vector<model::LlamaContext*> ptrs;
    for (int i = 0; i < nb; ++i) {
      ctxs.push_back(std::make_unique<model::LlamaContext>(m, tg + 2));
      ctxs.back()->set_int8_activations(int8);
      ptrs.push_back(ctxs.back().get());
    }
    std::vector<double> rates;
    for (int r = 0; r < reps + 1; ++r) {
      std::vector<std::vector<int32_t>> feed;
      for (int i = 0; i < nb; ++i) {
        ctxs[static_cast<size_t>(i)]->Reset();
        feed.push_back({prompt[static_cast<size_t>(i) % prompt.size()]});  // a different first token per sequence
      }
      if (!model::LlamaContext::EvalBatch(ptrs, feed, &logits).ok()) return 1;
      const auto t1 = Clock::now();
      const size_t V = static_cast<size_t>(m.config().n_vocab);
      for (int t = 0; t < tg; ++t) {
        for (int i = 0; i < nb; ++i) feed[static_cast<size_t>(i)] = {model::Argmax(std::span<const float>(logits).subspan(static_cast<size_t>(i) * V, V))};
        if (!model::LlamaContext::EvalBatch(ptrs, feed, &logits).ok()) return 1;
      }
      const double s2 = std::chrono::duration<double>(Clock::now() - t1).count();
      if (r > 0) rates.push_back(static_cast<double>(tg) * nb / s2);
    }
    const Stats c = Summarize(rates);
    std::printf("| fedtune (%s), %d sequences together | %d | tg%d | %.1f ± %.1f |\n", path.c_str(), nb,
                kernels::DefaultPool().size(), tg, c.mean, c.sd);
  }
  if (!answers.empty()) {
    auto loaded_prompts = load_prompts();
    if (!loaded_prompts.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(loaded_prompts.status().message()).c_str());
      return 1;
    }
    const std::vector<std::string>& prompts = *loaded_prompts;
    const auto t0 = Clock::now();
    std::vector<std::string> alone;
    for (const auto& p : prompts) alone.push_back(*model::GenerateGreedy(m, nullptr, p, max_new, int8));
    const double s_alone = std::chrono::duration<double>(Clock::now() - t0).count();
    const auto t1 = Clock::now();
    auto batched = model::GenerateGreedyBatch(m, nullptr, prompts, max_new, int8);
    if (!batched.ok()) return 1;
    const std::vector<std::string>& together = *batched;
    const double s_together = std::chrono::duration<double>(Clock::now() - t1).count();
    int same = 0, same_f32 = 0;
    for (size_t i = 0; i < prompts.size(); ++i) same += alone[i] == together[i];
    std::printf("| fedtune greedy answers (%s; %zu prompts of %s, <= %d tokens) | %d | one by one %.1f s, %d together %.1f s (x%.2f) | %d of %zu answers identical |\n",
                path.c_str(), prompts.size(), answers.c_str(), max_new, kernels::DefaultPool().size(), s_alone, model::kGenerateBatch, s_together,
                s_alone / s_together, same, prompts.size());
    if (!f32_decoding) {  // what the 8-bit activations change: answers against f32 decoding's
      auto exact = model::GenerateGreedyBatch(m, nullptr, prompts, max_new, false);
      if (!exact.ok()) return 1;
      for (size_t i = 0; i < prompts.size(); ++i) same_f32 += (*exact)[i] == together[i];
      // Teacher-forced: each prompt + its f32 answer decoded one token at a time both ways; the
      // next-token choice agreement and KL(f32 || int8) of the next-token distributions.
      int64_t agree = 0, steps = 0;
      double kl = 0;
      for (size_t i = 0; i < prompts.size(); ++i) {
        const std::vector<int32_t> ids = m.tokenizer()->EncodeWithBos(prompts[i] + (*exact)[i]);
        std::vector<std::vector<float>> by_mode[2];
        for (int mode = 0; mode < 2; ++mode) {
          model::LlamaContext tc(m, static_cast<int64_t>(ids.size()) + 1);
          tc.set_int8_activations(mode == 1);
          for (int32_t t : ids) {
            if (!tc.Eval(std::vector<int32_t>{t}, false, &logits).ok()) return 1;
            by_mode[mode].push_back(logits);
          }
        }
        for (size_t t = 0; t < ids.size(); ++t) {
          const std::vector<float>& p = by_mode[0][t];
          const std::vector<float>& q = by_mode[1][t];
          agree += model::Argmax(p) == model::Argmax(q);
          ++steps;
          const float mp = *std::max_element(p.begin(), p.end()), mq = *std::max_element(q.begin(), q.end());
          double zp = 0, zq = 0;
          for (size_t v = 0; v < p.size(); ++v) zp += std::exp(static_cast<double>(p[v] - mp)), zq += std::exp(static_cast<double>(q[v] - mq));
          for (size_t v = 0; v < p.size(); ++v) {
            const double lp = p[v] - mp - std::log(zp), lq = q[v] - mq - std::log(zq);
            kl += std::exp(lp) * (lp - lq);
          }
        }
      }
      std::printf("| fedtune greedy answers, int8 vs f32 activations | %d | %d of %zu answers identical; teacher-forced over %lld tokens: next token agrees %.2f%%, mean KL %.2e nats |\n",
                  kernels::DefaultPool().size(), same_f32, prompts.size(), static_cast<long long>(steps), 100.0 * static_cast<double>(agree) / static_cast<double>(steps),
                  kl / static_cast<double>(steps));
    }
  }
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  if (ru.ru_maxrss > single.ru_maxrss) std::printf("| fedtune, batched decoding included | peak RSS | %.0f MiB |\n", static_cast<double>(ru.ru_maxrss) / 1024.0);
  return 0;
}

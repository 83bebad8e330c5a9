// Inference benchmark on a real model: prompt processing (one batch of --pp tokens) and
// generation (--tg tokens one at a time after a 1-token prompt), tokens/s over --reps runs,
// and peak RSS. Same protocol as bench/llamacpp_bench.py so the two print comparable rows.
#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/thread_pool.h"
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
  CLI11_PARSE(app, argc, argv);
  kernels::SetThreads(threads);
  auto loaded = model::LlamaModel::Load(model_path);
  if (!loaded.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  const auto& m = **loaded;
  Rng rng(1);
  std::vector<int32_t> prompt(static_cast<size_t>(pp));
  for (auto& t : prompt) t = static_cast<int32_t>(17 + rng.Below(static_cast<uint64_t>(m.config().n_vocab - 17)));
  model::LlamaContext ctx(m, pp + tg + 1);
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
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  const Stats a = Summarize(pp_rates), b = Summarize(tg_rates);
  std::printf("| fedtune (%s, OpenBLAS) | %d | pp%d | %.1f ± %.1f |\n", kernels::CpuPathName(), kernels::DefaultPool().size(), pp, a.mean, a.sd);
  std::printf("| fedtune (%s, OpenBLAS) | %d | tg%d | %.1f ± %.1f |\n", kernels::CpuPathName(), kernels::DefaultPool().size(), tg, b.mean, b.sd);
  std::printf("| fedtune | peak RSS | %.0f MiB |\n", static_cast<double>(ru.ru_maxrss) / 1024.0);
  return 0;
}

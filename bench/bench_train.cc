// Training benchmark: tokens/s and peak RSS of adapter fine-tuning steps on a real model with
// random tokens (every position scored), the protocol of bench/peft_train_bench.py.
// --dp-clip C: local DP-SGD steps instead (model::Finetune: Poisson batches of expected size
// --batch from 8 x batch examples of seq tokens, noise multiplier 1), --dp-per-pass N examples
// per pass (0: model::DpExamplesPerPass, 1: one at a time); examples/s and tokens/s.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>

#include "CLI/CLI.hpp"
#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/backend.h"
#include "kernels/thread_pool.h"
#include "model/finetune.h"
#include "model/optimizer.h"
#include "model/trainer.h"

using namespace fedtune;

int main(int argc, char** argv) {
  CLI::App app{"fedtune training benchmark"};
  std::string model_path, adapter = "lora", modules = "all";
  std::string device = "cpu", layers;
  int seq = 256, batch = 8, steps = 3, threads = 0, micro_batch = 0, budget_mib = 0;
  int64_t rank = 16, blocks = 16;
  bool no_recompute = false;
  app.add_option("model", model_path)->required();
  app.add_option("--adapter", adapter);
  app.add_option("--modules", modules);
  app.add_option("--rank", rank);
  app.add_option("--blocks", blocks);
  app.add_option("--seq", seq);
  app.add_option("--batch", batch);
  app.add_option("--steps", steps, "Timed steps (after one warm-up step)");
  app.add_option("-t,--threads", threads);
  app.add_flag("--no-recompute", no_recompute);
  app.add_option("--micro-batch", micro_batch, "Sequences per forward/backward pass (0 = the whole batch)");
  app.add_option("--layers", layers, "Per-layer settings as in fedtune train --layers (e.g. \"15-29\"; default: every layer)");
  app.add_option("--device", device, "cpu (the best CPU path: cpu-bf16 where the CPU has a bf16 unit, else cpu-fast), cpu-fast, cpu-bf16, cpu-ref, cuda or auto");
  app.add_option("--activation-budget", budget_mib, "MiB: keep activations for as many sequences per pass as fit (fedtune train's default: 1024)");
  double dp_clip = 0;
  int dp_per_pass = 0;
  app.add_option("--dp-clip", dp_clip, "Local DP-SGD with this per-example clip norm (0: plain steps)");
  app.add_option("--dp-per-pass", dp_per_pass, "DP-SGD examples per forward/backward pass (0: model::DpExamplesPerPass)");
  CLI11_PARSE(app, argc, argv);
  kernels::SetThreads(threads);
  auto m = model::LlamaModel::Load(model_path);
  if (!m.ok()) return std::fprintf(stderr, "%s\n", std::string(m.status().message()).c_str()), 1;
  const auto& c = (*m)->config();
  const auto kind = model::ParseAdapterKind(adapter);
  if (!kind) return std::fprintf(stderr, "bad --adapter\n"), 1;
  auto set = model::MakeAdaptersWithLayout<float>((*m)->adapter_dims(),
                                                  model::AdapterSpec{*kind, rank, 2.0f * static_cast<float>(rank), false, blocks},
                                                  *model::ParseModules(modules), layers, 1);
  if (!set.ok()) return std::fprintf(stderr, "%s\n", std::string(set.status().message()).c_str()), 1;
  auto backend = kernels::SelectBackend(device);
  if (!backend.ok()) return std::fprintf(stderr, "%s\n", std::string(backend.status().message()).c_str()), 1;
  model::Trainer<float> trainer(**m, &*set,
                                model::TrainerOptions{.recompute = !no_recompute,
                                                      .micro_batch = micro_batch,
                                                      .backend = *backend,
                                                      .activation_budget_bytes = int64_t{budget_mib} << 20});
  const model::PassPlan plan = trainer.PlanFor(batch, seq);
  model::AdamW opt({});
  opt.set_backend(*backend);
  Rng rng(1);
  model::Batch b;
  b.n_seq = batch;
  b.len = seq;
  for (int i = 0; i < batch * seq; ++i) b.tokens.push_back(static_cast<int32_t>(17 + rng.Below(static_cast<uint64_t>(c.n_vocab - 17))));
  for (int i = 0; i < batch * seq; ++i) b.targets.push_back((i + 1) % seq ? b.tokens[static_cast<size_t>(i + 1)] : -1);
  if (dp_clip > 0) {
    std::vector<model::Example> data(static_cast<size_t>(8 * batch));
    for (auto& e : data) {
      for (int i = 0; i < seq; ++i) e.tokens.push_back(static_cast<int32_t>(17 + rng.Below(static_cast<uint64_t>(c.n_vocab - 17))));
      for (int i = 0; i < seq; ++i) e.targets.push_back(i + 1 < seq ? e.tokens[static_cast<size_t>(i + 1)] : -1);
    }
    model::FinetuneOptions fo;
    fo.batch = batch;
    fo.recompute = !no_recompute;
    fo.micro_batch = micro_batch;
    fo.activation_budget_mib = budget_mib;
    fo.backend = *backend;
    fo.log_every = 0;
    fo.dp_clip = dp_clip;
    fo.dp_noise_multiplier = 1.0;
    fo.dp_examples_per_pass = dp_per_pass;
    Rng noise(7);
    fo.dp_normal = [&] { return noise.Normal(); };
    fo.dp_uniform = [&] { return noise.Uniform(); };
    fo.steps = 1;  // warm-up
    if (!model::Finetune(**m, data, fo, &*set, &opt).ok()) return 1;
    fo.steps = 1 + steps;
    auto rep = model::Finetune(**m, data, fo, &*set, &opt);
    if (!rep.ok()) return std::fprintf(stderr, "%s\n", std::string(rep.status().message()).c_str()), 1;
    struct rusage ru {};
    getrusage(RUSAGE_SELF, &ru);
    const int64_t slot = [&] {
      int64_t v = 0;
      for (const auto& l : set->layers)
        for (const auto& a : l)
          if (a) v += static_cast<int64_t>(a->ga.size() + a->gb.size() + a->gd.size());
      return v;
    }();
    // Kernels without host-memory buffers (CUDA) run one example at a time (model/finetune.cc).
    const int per_pass = !(*backend)->HostMemoryBuffers() ? 1 : dp_per_pass > 0 ? dp_per_pass : model::DpExamplesPerPass(slot, batch);
    std::printf("| fedtune DP-SGD (%s, %d example(s) per pass) | %s r=%lld on %s | %d x %d | %d | %.2f examples/s, %.1f tokens/s | %.0f MiB |\n",
                (*backend)->Describe().c_str(), per_pass, adapter.c_str(), static_cast<long long>(*kind == model::AdapterKind::kDiaBlo ? blocks : rank),
                (layers.empty() ? modules : layers).c_str(), batch, seq, kernels::DefaultPool().size(),
                static_cast<double>(rep->dp_examples) / rep->seconds, static_cast<double>(rep->tokens) / rep->seconds,
                static_cast<double>(ru.ru_maxrss) / 1024.0);
    return 0;
  }
  double total = 0;
  for (int s = 0; s <= steps; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    if (!trainer.Step(b, 1.0f / static_cast<float>(b.n_scored()), true).ok()) return 1;
    opt.Step(*set);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s > 0) total += dt;
    std::fprintf(stderr, "step %d: %.2f s\n", s, dt);
  }
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  const std::string mode = std::string(plan.recompute ? "recompute" : "no recompute") +
                           (plan.micro_batch > 0 ? ", micro-batch " + std::to_string(plan.micro_batch) : "") +
                           (budget_mib > 0 ? ", budget " + std::to_string(budget_mib) + " MiB" : "");
  // On a device backend the memory column adds the device memory the backend allocated.
  const int64_t device_bytes = (*backend)->PeakDeviceBytes();
  const std::string device_mem = device_bytes > 0 ? ", GPU " + std::to_string(device_bytes >> 20) + " MiB" : "";
  std::printf("| fedtune (%s, %s) | %s r=%lld on %s | %d x %d | %d | %.1f | %.0f MiB%s |\n", (*backend)->Describe().c_str(), mode.c_str(), adapter.c_str(),
              static_cast<long long>(*kind == model::AdapterKind::kDiaBlo ? blocks : rank), (layers.empty() ? modules : layers).c_str(), batch, seq,
              kernels::DefaultPool().size(), static_cast<double>(batch * seq * steps) / total, static_cast<double>(ru.ru_maxrss) / 1024.0,
              device_mem.c_str());
  return 0;
}

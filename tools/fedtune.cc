// fedtune command-line interface: info, generate, perplexity (more subcommands arrive with the
// fine-tuning, federated and simulation modules).

#include <malloc.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "nlohmann/json.hpp"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/progress.h"
#include "kernels/backend.h"
#include "kernels/ops.h"
#include "kernels/thread_pool.h"
#include "model/llama.h"
#include "model/perplexity.h"
#include "model/adapter_io.h"
#include "model/export.h"
#include "model/finetune.h"
#include "model/sampler.h"
#include "model/tasks.h"
#include "common/config_loader.h"
#include "sim/planning.h"
#include "sim/simulation.h"
#include "coordinator/provision.h"
#include "coordinator/server.h"
#include "coordinator/service_config.h"
#include "coordinator/http_status.h"
#include "absl/strings/numbers.h"
#include "worker/daemon.h"
#include "worker/local_trainer.h"

#include <csignal>
#include <thread>

#include <filesystem>
#include <fstream>

namespace {

using namespace fedtune;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Every subcommand returns a Status; this is the one place it becomes a message and an exit code.
// A service that cannot start because of its configuration (the file, a path in it, the
// credentials, the model or data it names) exits with 78 (EX_CONFIG, sysexits.h): the systemd units
// do not restart on it (RestartPreventExitStatus=78) — restarting cannot fix a configuration.
constexpr int kExitConfig = 78;
constexpr absl::string_view kConfigErrorPayload = "fedtune/config-error";
absl::Status ConfigError(absl::Status s) {
  if (!s.ok()) s.SetPayload(kConfigErrorPayload, absl::Cord("1"));
  return s;
}

// A configuration error found while reading `where` (a config file): its message, prefixed.
absl::Status ConfigErrorIn(const std::string& where, const absl::Status& s) {
  return ConfigError(absl::InvalidArgumentError(absl::StrCat(where, ": ", s.message())));
}

int ExitCode(const absl::Status& s) {
  if (s.ok()) return 0;
  std::fprintf(stderr, "fedtune: error: %s\n", std::string(s.ToString(absl::StatusToStringMode::kWithNoExtraData)).c_str());
  return s.GetPayload(kConfigErrorPayload).has_value() ? kExitConfig : 1;
}

std::string HumanBytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  int u = 0;
  while (b >= 1024 && u < 3) { b /= 1024; ++u; }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", b, units[u]);
  return buf;
}

absl::Status RunInfo(const std::string& path, bool all_tensors) {
  auto m = model::LlamaModel::Load(path);
  if (!m.ok()) return m.status();
  const auto& c = (*m)->config();
  std::printf("model: %s\narchitecture: %s\nparameters: %lld\n", path.c_str(), c.arch.c_str(), static_cast<long long>(c.n_params));
  std::printf("layers %lld, embedding %lld, heads %lld (kv %lld, head dim %lld), ffn %lld, vocab %lld\n",
              static_cast<long long>(c.n_layer), static_cast<long long>(c.n_embd), static_cast<long long>(c.n_head),
              static_cast<long long>(c.n_head_kv), static_cast<long long>(c.head_dim), static_cast<long long>(c.n_ff),
              static_cast<long long>(c.n_vocab));
  std::printf("context %lld, rope base %g (dims %lld), rms eps %g, output %s\n", static_cast<long long>(c.n_ctx_train),
              c.rope_base, static_cast<long long>(c.rope_dim), c.rms_eps, c.tied_output ? "tied to token_embd" : "separate");
  // The family features the engine applies (model/llama.h), so a user sees what will run.
  std::string features;
  auto feature = [&](const std::string& f) { features += (features.empty() ? "" : ", ") + f; };
  if (c.sliding_window > 0) {
    int64_t windowed = 0;
    for (int64_t l = 0; l < c.n_layer; ++l) windowed += c.Window(l) > 0 ? 1 : 0;
    feature(absl::StrCat("sliding window ", c.sliding_window, " on ", windowed, " of ", c.n_layer, " layers"));
  }
  if (c.attn_softcap > 0) feature(absl::StrCat("attention soft-cap ", c.attn_softcap));
  if (c.final_softcap > 0) feature(absl::StrCat("final-logit soft-cap ", c.final_softcap));
  if (!c.rope_long_factors.empty()) feature(absl::StrCat("LongRoPE (original context ", c.rope_orig_ctx, ")"));
  else if (!c.rope_freq_factors.empty()) feature("RoPE frequency factors");
  if (c.qk_norm) feature("q/k norms");
  if (c.gemma) feature("GeGLU, post-norms");
  if (c.fused) feature("fused qkv / gate_up");
  if (!features.empty()) std::printf("features: %s\n", features.c_str());
  if (const auto* tok = (*m)->tokenizer()) {
    std::printf("tokenizer: %s, %d tokens, bos %d, eos %d, add_bos %s\n", tok->sentencepiece() ? "SentencePiece BPE" : "byte-level BPE",
                tok->vocab_size(), tok->bos_id(), tok->eos_id(), tok->add_bos() ? "yes" : "no");
  }
  const model::GgufFile* g = (*m)->gguf();
  if (g == nullptr) return absl::OkStatus();
  std::printf("\nGGUF v%u, %s, %zu metadata keys, %zu tensors\n", g->version(), HumanBytes(static_cast<double>(g->file_size())).c_str(),
              g->metadata().size(), g->tensors().size());
  for (const auto& k : g->key_order()) {
    std::string v = g->metadata().at(k).ToString(4);
    if (v.size() > 100) v = v.substr(0, 97) + "...";
    for (char& ch : v) if (ch == '\n') ch = ' ';
    std::printf("  %-45s %s\n", k.c_str(), v.c_str());
  }
  std::map<std::string, std::pair<int, size_t>> by_type;
  for (const auto& t : g->tensors()) {
    auto& e = by_type[std::string(kernels::TypeTraits(t.type).name)];
    e.first++;
    e.second += t.nbytes;
  }
  std::printf("\ntensor types:\n");
  for (const auto& [name, e] : by_type) std::printf("  %-6s %4d tensors, %s\n", name.c_str(), e.first, HumanBytes(static_cast<double>(e.second)).c_str());
  std::printf("\ntensors%s:\n", all_tensors ? "" : " (first 12; --all for every one)");
  size_t shown = 0;
  for (const auto& t : g->tensors()) {
    if (!all_tensors && shown++ >= 12) break;
    std::string shape;
    for (size_t d = 0; d < t.ne.size(); ++d) shape += (d ? " x " : "") + std::to_string(t.ne[d]);
    std::printf("  %-32s %-6s [%s] %s\n", t.name.c_str(), std::string(kernels::TypeTraits(t.type).name).c_str(), shape.c_str(),
                HumanBytes(static_cast<double>(t.nbytes)).c_str());
  }
  return absl::OkStatus();
}

struct GenerateArgs {
  std::string model, prompt, system;
  bool chat = false, raw = false;
  int max_tokens = 128;
  float temperature = 0.0f, top_p = 0.95f;
  uint64_t seed = 42;
  int64_t n_ctx = 2048;
};

absl::Status RunGenerate(const GenerateArgs& a) {
  auto loaded = model::LlamaModel::Load(a.model);
  if (!loaded.ok()) return loaded.status();
  const auto& m = **loaded;
  const model::Tokenizer* tok = m.tokenizer();
  if (tok == nullptr) return absl::FailedPreconditionError("model has no tokenizer (generate needs a GGUF model)");
  std::string text = a.prompt;
  if (a.chat) {
    std::vector<model::ChatMessage> msgs;
    if (!a.system.empty()) msgs.push_back({"system", a.system});
    msgs.push_back({"user", a.prompt});
    text = tok->FormatChat(msgs, true);
  }
  const std::vector<int32_t> prompt = tok->EncodeWithBos(text, /*parse_special=*/a.chat || a.raw);
  if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  const int64_t n_ctx = std::min<int64_t>(a.n_ctx, m.config().n_ctx_train);
  if (static_cast<int64_t>(prompt.size()) + a.max_tokens > n_ctx) {
    return absl::OutOfRangeError(absl::StrCat("prompt (", prompt.size(), " tokens) + max tokens (", a.max_tokens, ") exceed the context of ",
                                              n_ctx, " (--ctx)"));
  }
  model::LlamaContext ctx(m, n_ctx);
  ctx.set_int8_activations(kernels::Int8DecodingDefault());  // (FEDTUNE_DECODE_ACTIVATIONS=f32: exact)
  model::Sampler sampler({a.temperature, a.top_p, a.seed});
  std::vector<float> logits;
  const auto t0 = Clock::now();
  if (auto s = ctx.Eval(prompt, false, &logits); !s.ok()) return s;
  const auto t1 = Clock::now();
  int generated = 0;
  std::string pending;  // bytes of an incomplete UTF-8 character
  for (; generated < a.max_tokens; ++generated) {
    const int32_t next = sampler.Sample(logits);
    if (tok->IsEndOfGeneration(next)) break;
    std::string piece = tok->TokenBytes(next);
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
    const int32_t one[1] = {next};
    if (auto s = ctx.Eval(one, false, &logits); !s.ok()) return s;
  }
  const auto t2 = Clock::now();
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr, "[fedtune] prompt %zu tokens in %.2f s (%.1f tok/s); generated %d tokens in %.2f s (%.1f tok/s); peak RSS %.0f MiB\n",
               prompt.size(), Seconds(t0, t1), static_cast<double>(prompt.size()) / Seconds(t0, t1), generated, Seconds(t1, t2),
               generated / std::max(1e-9, Seconds(t1, t2)), PeakRssMiB());
  return absl::OkStatus();
}

// --base-type and its compensation: re-quantize the frozen projections on load (memory budget),
// optionally with a frozen low-rank correction per projection (model/compensation.h).
struct BaseArgs {
  std::string type, compensate = "none", calibration;  // calibration: "" = the training data (train), Apache-2.0 (perplexity)
  std::string cache;  // compensation cache folder ("": none)
  int64_t rank = 16, calibration_tokens = 2048;
  int iterations = 5;
  double damping = 0.01;
};

void AddBaseOptions(CLI::App* cmd, BaseArgs& b) {
  cmd->add_option("--base-type", b.type, "Re-quantize the frozen base on load: q8_0, q4_0, q4_1, nf4, nf4_dq (NF4 with double quantization), "
                  "q3_k, nf3, q2_k, nf2 (K-quants fall back to NF3/NF2 on rows that are not a multiple of 256 values)");
  cmd->add_option("--compensate", b.compensate, "Quantization-error correction with --base-type: none, svd (LoftQ one step), loftq "
                  "(alternating), cloq (calibrated closed form), gptq (calibrated rounding, no correction), gptq-cloq (both)");
  cmd->add_option("--compensate-rank", b.rank, "Rank of the correction per projection")->check(CLI::Range(1, 4096));
  cmd->add_option("--loftq-iterations", b.iterations, "LoftQ alternations")->check(CLI::Range(1, 100));
  cmd->add_option("--compensate-damping", b.damping, "cloq/gptq: lambda = damping x mean(diag X^T X) added to X^T X "
                  "(larger: less fitted to the calibration text)")->check(CLI::Range(1e-6, 1e3));
  cmd->add_option("--calibration", b.calibration, "Text file whose first tokens calibrate cloq and gptq (default: train: the training "
                  "examples; perplexity: /usr/share/common-licenses/Apache-2.0; never the evaluated text)");
  cmd->add_option("--calibration-tokens", b.calibration_tokens, "Calibration tokens for cloq and gptq")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--compensation-cache", b.cache, "Folder that keeps compensated bases (--compensate) to read back instead of "
                  "recomputing them with the same model file, options and calibration (at most 4 files)");
}

absl::Status ApplyBaseType(model::LlamaModel& m, const BaseArgs& b, const std::vector<model::Example>* train = nullptr) {
  const auto method = model::ParseCompensationMethod(b.compensate);
  if (!method) return absl::InvalidArgumentError("--compensate must be none, svd, loftq, cloq, gptq or gptq-cloq");
  if (b.type.empty()) {
    if (*method != model::CompensationMethod::kNone) return absl::InvalidArgumentError("--compensate needs --base-type");
    return absl::OkStatus();
  }
  const auto t = kernels::GgmlTypeFromName(b.type);
  if (!t) return absl::InvalidArgumentError("--base-type must be q8_0, q4_0, q4_1, nf4, nf4_dq, q3_k, nf3, q2_k, nf2, f16 or f32");
  const size_t before = m.ProjectionBytes();
  if (*method == model::CompensationMethod::kNone) {
    FT_ASSIGN_OR_RETURN(size_t after, m.Requantize(*t));
    std::fprintf(stderr, "[fedtune] base projections re-quantized to %s: %.1f MiB -> %.1f MiB\n", kernels::TypeTraits(*t).name,
                 static_cast<double>(before) / (1 << 20), static_cast<double>(after) / (1 << 20));
    return absl::OkStatus();
  }
  std::vector<int32_t> calib;
  if (model::NeedsCalibration(*method)) {
    if (m.tokenizer() == nullptr) return absl::FailedPreconditionError("model has no tokenizer (calibration)");
    if (b.calibration.empty() && train != nullptr) {
      for (const auto& e : *train) calib.insert(calib.end(), e.tokens.begin(), e.tokens.end());
    } else {
      const std::string file = b.calibration.empty() ? "/usr/share/common-licenses/Apache-2.0" : b.calibration;
      FT_ASSIGN_OR_RETURN(std::string text, ReadFileToString(file));
      calib = m.tokenizer()->Encode(text, false);
    }
    if (static_cast<int64_t>(calib.size()) > b.calibration_tokens) calib.resize(static_cast<size_t>(b.calibration_tokens));
    if (calib.empty()) return absl::InvalidArgumentError(absl::StrCat("--calibration ", b.calibration, ": no tokens"));
  }
  model::CompensationOptions o;
  o.method = *method;
  o.rank = b.rank;
  o.iterations = b.iterations;
  o.damping = b.damping;
  FT_ASSIGN_OR_RETURN(auto rep, m.RequantizeCompensated(*t, o, calib, b.cache));
  std::fprintf(stderr, "[fedtune] base projections re-quantized to %s with %s rank %lld: %.1f MiB -> %s\n", kernels::TypeTraits(*t).name,
               b.compensate.c_str(), static_cast<long long>(model::HasCorrection(*method) ? b.rank : 0), static_cast<double>(before) / (1 << 20), rep.Summary().c_str());
  return absl::OkStatus();
}

absl::Status RunPerplexity(const std::string& model_path, const std::vector<std::string>& files, int64_t window, int64_t stride,
                           int64_t max_tokens, const BaseArgs& base) {
  auto loaded = model::LlamaModel::Load(model_path);
  if (!loaded.ok()) return loaded.status();
  FT_RETURN_IF_ERROR(ApplyBaseType(**loaded, base));
  const auto& m = **loaded;
  if (m.tokenizer() == nullptr) return absl::FailedPreconditionError("model has no tokenizer");
  for (const std::string& file : files) {
    auto text = ReadFileToString(file);
    if (!text.ok()) return text.status();
    std::vector<int32_t> tokens = m.tokenizer()->EncodeWithBos(*text, false);
    if (max_tokens > 0 && static_cast<int64_t>(tokens.size()) > max_tokens) tokens.resize(static_cast<size_t>(max_tokens));
    std::fprintf(stderr, "[fedtune] %s: %zu tokens, window %lld, stride %lld\n", file.c_str(), tokens.size(),
                 static_cast<long long>(window), static_cast<long long>(stride));
    Progress progress("perplexity", static_cast<int64_t>(tokens.size()), "tok");
    auto r = model::Perplexity(m, tokens, window, stride, [&](int64_t done, int64_t) { progress.Update(done); });
    progress.Finish();
    if (!r.ok()) return r.status();
    std::printf("%sperplexity %.4f over %lld tokens (mean NLL %.6f); %.1f tok/s evaluated; peak RSS %.0f MiB\n",
                files.size() > 1 ? (file + ": ").c_str() : "", r->perplexity(), static_cast<long long>(r->n_scored),
                r->nll_sum / static_cast<double>(r->n_scored), r->tokens_per_second, PeakRssMiB());
  }
  return absl::OkStatus();
}

struct TrainArgs {
  std::string model, data, out = "out/train", init_adapter;
  BaseArgs base;
  std::string adapter = "lora", modules = "all", layers;
  int64_t rank = 8, blocks = 16, max_len = 256;
  float alpha = 16.0f;
  bool rslora = false, no_recompute = false, resume = false, no_pack = false;
  int checkpoint_every = 0, micro_batch = 0, activation_budget = 1024;
  float adapter_dropout = 0.0f;
  std::string device = "cpu";
  int steps = 100, batch = 8, grad_accum = 1, warmup = 10, eval_examples = 50, max_new_tokens = 48;
  float lr = 1e-3f, weight_decay = 0.0f, clip = 1.0f;
  uint64_t seed = 1, adapter_seed = 1;
  double holdout = 0.1;
};

void PrintEval(const char* when, const model::EvalResult& r) {
  std::printf("[%s] held-out loss %.4f (ppl %.3f) over %lld tokens; exact match %d/%d = %.1f%%, ROUGE-L %.3f\n", when, r.loss, r.perplexity(),
              static_cast<long long>(r.n_tokens), r.n_exact, r.n_generated, 100.0 * r.accuracy(), r.rouge_l());
  for (const auto& [ref, got] : r.samples) std::printf("    want: %s\n     got: %s\n", ref.c_str(), got.c_str());
  std::fflush(stdout);
}

absl::Status RunTrain(const TrainArgs& a) {
  auto loaded = model::LlamaModel::Load(a.model);
  if (!loaded.ok()) return loaded.status();
  const auto& m = **loaded;
  if (m.tokenizer() == nullptr) return absl::FailedPreconditionError("training needs a model with a tokenizer (GGUF)");
  model::DatasetOptions dopt;
  dopt.max_len = a.max_len;
  dopt.holdout = a.holdout;
  dopt.seed = a.seed;
  auto data = model::LoadDataset(a.data, *m.tokenizer(), dopt);
  if (!data.ok()) return data.status();
  // After the data: cloq and gptq calibrate on the training examples' inputs by default.
  if (auto s = ApplyBaseType(**loaded, a.base, &data->train); !s.ok()) return s;
  const auto kind = model::ParseAdapterKind(a.adapter);
  if (!kind) return absl::InvalidArgumentError("--adapter must be lora, ffa_lora or diablo");
  auto modules = model::ParseModules(a.modules);
  if (!modules.ok()) return modules.status();
  model::AdapterSpec spec{*kind, a.rank, a.alpha, a.rslora, a.blocks};
  // --init: a fedtune adapter.safetensors, or a Hugging Face PEFT LoRA folder.
  absl::StatusOr<model::AdapterSet<float>> adapters =
      a.init_adapter.empty()                          ? model::MakeAdaptersWithLayout<float>(m.adapter_dims(), spec, *modules, a.layers, a.adapter_seed)
      : std::filesystem::is_directory(a.init_adapter) ? model::ImportPeft(a.init_adapter, m)
                                                      : model::LoadAdapters(a.init_adapter, m.adapter_dims());
  if (!adapters.ok()) return adapters.status();
  std::fprintf(stderr, "[fedtune] %zu train / %zu held-out examples (%lld truncated to %lld tokens); %s on %s: %lld trainable parameters\n",
               data->train.size(), data->eval.size(), static_cast<long long>(data->truncated), static_cast<long long>(a.max_len),
               a.adapter.c_str(), a.layers.empty() ? a.modules.c_str() : ("layers " + a.layers).c_str(), static_cast<long long>(adapters->NumTrainable()));
  std::error_code ec;
  std::filesystem::create_directories(a.out, ec);
  if (ec) return absl::InternalError("cannot create " + a.out + ": " + ec.message());
  if (a.eval_examples != 0 && !a.resume) {
    auto before = model::Evaluate(m, &*adapters, data->eval, a.eval_examples, a.max_new_tokens);
    if (!before.ok()) return before.status();
    PrintEval("before", *before);
  }
  model::OptimizerConfig oc;
  oc.lr = a.lr;
  oc.weight_decay = a.weight_decay;
  oc.clip_norm = a.clip;
  oc.warmup_steps = a.warmup;
  oc.total_steps = a.steps;
  model::AdamW opt(oc);
  const std::string ckpt = a.out + "/checkpoint.safetensors";
  if (a.resume) {
    if (auto s = model::LoadCheckpoint(ckpt, *adapters, &opt); !s.ok()) return s;
    std::fprintf(stderr, "[fedtune] resumed from %s at step %d\n", ckpt.c_str(), opt.step());
  }
  model::FinetuneOptions fo;
  fo.checkpoint_every = a.checkpoint_every;
  fo.checkpoint_path = ckpt;
  fo.steps = a.steps;
  fo.batch = a.batch;
  fo.grad_accum = a.grad_accum;
  fo.recompute = !a.no_recompute;
  fo.micro_batch = a.micro_batch;
  // Memory-driven by default; an explicit --no-recompute / --micro-batch takes over.
  fo.activation_budget_mib = (a.no_recompute || a.micro_batch > 0) ? 0 : a.activation_budget;
  fo.pack = !a.no_pack;
  fo.adapter_dropout = a.adapter_dropout;
  auto backend = kernels::SelectBackend(a.device);
  if (!backend.ok()) return backend.status();
  fo.backend = *backend;
  std::fprintf(stderr, "[fedtune] kernels: %s\n", (*backend)->Name());
  fo.seed = a.seed;
  Progress progress("train", a.steps, "steps");
  double last_loss = 0;
  auto rep = model::Finetune(m, data->train, fo, &*adapters, &opt, [&](const model::StepLog& s) {
    last_loss = s.loss;
    if (s.step == 1 || s.step % 10 == 0 || s.step == a.steps) {
      std::fprintf(stderr, "[fedtune] step %d/%d loss %.4f grad-norm %.3f lr %.2e %.0f tok/s\n", s.step, a.steps, s.loss, s.grad_norm,
                   static_cast<double>(s.lr), s.tokens_per_second);
    }
  });
  if (!rep.ok()) return rep.status();
  const std::string path = a.out + "/adapter.safetensors";
  if (auto s = model::SaveAdapters(path, *adapters); !s.ok()) return s;
  std::printf("trained %d steps in %.1f s (%.0f tok/s incl. prompt and padding), final loss %.4f, peak RSS %.0f MiB; adapter: %s\n",
              rep->steps, rep->seconds, static_cast<double>(rep->tokens) / rep->seconds, rep->final_loss, PeakRssMiB(), path.c_str());
  if (a.eval_examples != 0) {
    auto after = model::Evaluate(m, &*adapters, data->eval, a.eval_examples, a.max_new_tokens);
    if (!after.ok()) return after.status();
    PrintEval("after", *after);
  }
  return absl::OkStatus();
}

absl::Status RunEval(const std::string& model_path, const std::string& data_path, const std::string& adapter_path, int n, int max_new,
            int64_t max_len, double holdout, const std::string& dump) {
  auto loaded = model::LlamaModel::Load(model_path);
  if (!loaded.ok()) return loaded.status();
  const auto& m = **loaded;
  if (m.tokenizer() == nullptr) return absl::FailedPreconditionError("eval needs a model with a tokenizer (GGUF)");
  model::DatasetOptions dopt;
  dopt.max_len = max_len;
  dopt.holdout = holdout;
  auto data = model::LoadDataset(data_path, *m.tokenizer(), dopt);
  if (!data.ok()) return data.status();
  std::optional<model::AdapterSet<float>> adapters;
  if (!adapter_path.empty()) {
    auto a = model::LoadAdapters(adapter_path, m.adapter_dims());
    if (!a.ok()) return a.status();
    adapters = std::move(*a);
  }
  const auto& set = holdout > 0 ? data->eval : data->train;
  auto r = model::Evaluate(m, adapters ? &*adapters : nullptr, set, n, max_new);
  if (!r.ok()) return r.status();
  PrintEval(adapter_path.empty() ? "base" : "adapter", *r);
  if (!dump.empty()) {  // prompts and greedy answers, for comparing with other runtimes
    std::string text;
    const size_t count = n > 0 ? std::min(set.size(), static_cast<size_t>(n)) : set.size();
    for (size_t i = 0; i < count; ++i) {
      auto got = model::GenerateGreedy(m, adapters ? &*adapters : nullptr, set[i].prompt_text, max_new);
      if (!got.ok()) return got.status();
      text += nlohmann::json{{"prompt", set[i].prompt_text}, {"reference", set[i].reference}, {"fedtune", *got}}.dump() + "\n";
    }
    if (auto s = WriteFileAtomic(dump, {reinterpret_cast<const uint8_t*>(text.data()), text.size()}); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status RunExport(const std::string& model_path, const std::string& adapter_path, const std::string& format, const std::string& out,
              const std::string& merged_type, const std::string& base_name) {
  auto loaded = model::LlamaModel::Load(model_path);
  if (!loaded.ok()) return loaded.status();
  const auto& m = **loaded;
  auto adapters = model::LoadAdapters(adapter_path, m.adapter_dims());
  if (!adapters.ok()) return adapters.status();
  absl::Status s;
  if (format == "peft") {
    s = model::ExportPeft(out, m, *adapters, base_name);
  } else if (format == "gguf-lora") {
    s = model::ExportGgufLora(out, m, *adapters);
  } else if (format == "merged") {
    const auto t = kernels::GgmlTypeFromName(merged_type);
    if (!t || !(*t == kernels::GgmlType::kF32 || *t == kernels::GgmlType::kF16 || *t == kernels::GgmlType::kBF16 ||
                *t == kernels::GgmlType::kQ8_0)) {
      return absl::InvalidArgumentError("--merged-type must be f32, f16, bf16 or q8_0");
    }
    s = model::ExportMergedGguf(out, m, *adapters, *t);
  } else {
    s = absl::InvalidArgumentError("--format must be peft, gguf-lora or merged");
  }
  if (!s.ok()) return s;
  std::printf("exported %s to %s\n", format.c_str(), out.c_str());
  return absl::OkStatus();
}

absl::Status RunProvision(coordinator::ProvisionOptions po, int prov_n, int prov_clients, const std::vector<std::string>& revoke) {
  if (!revoke.empty()) {
    for (const std::string& name : revoke) {
      FT_RETURN_IF_ERROR(coordinator::Revoke(po.dir, name));
      std::printf("revoked %s (listed in %s/revoked.txt; its join token removed)\n", name.c_str(), po.dir.c_str());
    }
    return absl::OkStatus();
  }
  for (int i = 1; i <= prov_n; ++i) po.workers.push_back(absl::StrFormat("worker-%03d", i));
  for (int k = 0; k < prov_clients; ++k) po.workers.push_back(sim::ClientName(k));
  auto r = coordinator::Provision(po);
  if (!r.ok()) return r.status();
  std::printf("%s CA in %s; wrote %zu files (coordinator certificate for localhost, 127.0.0.1%s%s; %zu worker certificates and tokens)\n",
              r->created_ca ? "created a new" : "reused the", po.dir.c_str(), r->files.size(), po.hosts.empty() ? "" : ", ",
              absl::StrJoin(po.hosts, ", ").c_str(), po.workers.size());
  return absl::OkStatus();
}

absl::Status RunMakeTask(const std::string& mk_name, int mk_n, uint64_t mk_seed, const std::string& mk_out) {
  auto lines = model::GenerateTask(mk_name, mk_n, mk_seed);
  if (!lines.ok()) return lines.status();
  std::string text;
  for (const auto& l : *lines) text += l + "\n";
  if (const auto parent = std::filesystem::path(mk_out).parent_path(); !parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    if (ec) return absl::InternalError("cannot create " + parent.string() + ": " + ec.message());
  }
  if (auto s = WriteFileAtomic(mk_out, {reinterpret_cast<const uint8_t*>(text.data()), text.size()}); !s.ok()) return s;
  std::printf("wrote %zu examples of '%s' to %s%s\n", lines->size(), mk_name.c_str(), mk_out.c_str(),
              static_cast<int>(lines->size()) < mk_n ? " (all the source has)" : "");
  return absl::OkStatus();
}

}  // namespace

// fedtune simulate CONFIG: the whole federated run in one process (see sim/simulation.h).
absl::Status RunSimulate(const std::string& config_path, const std::string& out_dir, bool validate_only) {
  proto::SimulationConfig c;
  if (auto st = LoadConfigFile(config_path, &c); !st.ok()) return st;
  if (!out_dir.empty()) c.set_output_dir(out_dir);
  if (auto st = sim::ValidateConfig(c); !st.ok()) return absl::InvalidArgumentError(config_path + ": " + std::string(st.message()));
  if (validate_only) {
    std::printf("%s: valid\n", config_path.c_str());
    return absl::OkStatus();
  }
  sim::SimOptions o;
  auto text = ReadFileToString(config_path);
  if (!text.ok()) return text.status();
  o.config_text = *text;
  o.default_run_name = std::filesystem::path(config_path).stem().string();
  auto r = sim::RunSimulation(c, o);
  if (!r.ok()) return r.status();
  std::printf("\n%-8s %-12s %-12s %-10s %-10s %-10s %-12s\n", "round", "train loss", "eval loss", "accuracy", "epsilon", "MiB up", "sim time s");
  for (const auto& rec : r->rounds) {
    auto m = [&](const char* k) { auto it = rec.metrics.find(k); return it == rec.metrics.end() ? std::string("-") : absl::StrFormat("%.4g", it->second); };
    auto acc = rec.metrics.find("accuracy");
    std::printf("%-8d %-12s %-12s %-10s %-10s %-10s %-12s\n", rec.round, m("train_loss").c_str(), m("eval_loss").c_str(),
                acc == rec.metrics.end() ? "-" : absl::StrFormat("%.1f%%", 100 * acc->second).c_str(), m("epsilon").c_str(),
                rec.metrics.count("bytes_up") ? absl::StrFormat("%.2f", rec.metrics.at("bytes_up") / 1048576).c_str() : "-",
                m("sim_round_seconds").c_str());
  }
  std::printf("\nheld-out exact-match accuracy: %.1f%% before -> %.1f%% after", 100 * r->accuracy_before, 100 * r->accuracy_after);
  if (r->centralized_accuracy >= 0) std::printf(" (centralized, same budget: %.1f%%)", 100 * r->centralized_accuracy);
  std::printf("\nwall time %.0f s, peak RSS %.0f MiB; outputs in %s (report.html, metrics.csv, ledger.sqlite, peft/, adapter-lora.gguf)\n",
              r->wall_seconds, r->peak_rss_mib, r->run_dir.c_str());
  return absl::OkStatus();
}

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

absl::Status ServeCoordinator(const proto::CoordinatorConfig& c, const std::string& path, const coordinator::HeldOutFn& held_out = nullptr);

// fedtune coordinator --config: serves rounds until done (SIGINT/SIGTERM: shut down cleanly;
// a restart resumes after the last committed round).
absl::Status RunCoordinator(const std::string& path, bool check_only) {
  proto::CoordinatorConfig c;
  if (auto st = LoadConfigFile(path, &c); !st.ok()) return ConfigError(st);
  if (check_only) {  // everything the service reads before it serves, without serving
    auto svc = coordinator::ServiceFromConfig(c);
    if (!svc.ok()) return ConfigErrorIn(path, svc.status());
    for (const std::string& f : {c.tls().ca(), c.tls().cert(), c.tls().key()})
      if (auto t = ReadFileToString(f); !t.ok()) return ConfigErrorIn(path + ": tls", t.status());
    std::printf("%s: valid (%d rounds, state in %s)\n", path.c_str(), c.rounds(), c.state_dir().c_str());
    return absl::OkStatus();
  }
  return ServeCoordinator(c, path);
}

// The coordinator service for a loaded configuration (`coordinator --config`, `simulate --serve`).
absl::Status ServeCoordinator(const proto::CoordinatorConfig& c, const std::string& path, const coordinator::HeldOutFn& held_out) {
  // Allocator policy for a server whose large buffers (updates, chunks) are allocated on many
  // gRPC threads: buffers of 512 KiB and more come from mmap and go back to the system when freed
  // (glibc otherwise raises that threshold dynamically and keeps them in per-thread arenas), and
  // two arenas in all. Measured with bench/run_load.sh (200 workers): together with the
  // transport quota, peak RSS 2.2 GB -> ~220 MiB at the same speed.
  mallopt(M_MMAP_THRESHOLD, 512 << 10);
  mallopt(M_ARENA_MAX, 2);
  auto svc = coordinator::ServiceFromConfig(c, held_out);
  if (!svc.ok()) return ConfigErrorIn(path, svc.status());
  auto server = coordinator::CoordinatorServer::Start((*svc)->options);
  if (!server.ok()) return server.status();
  const coordinator::ServerOptions& o = (*svc)->options;
  std::printf("coordinator listening on port %d (state in %s)\n", (*server)->port(), o.engine.state_dir.c_str());
  if ((*server)->http_port())
    std::printf("status server on port %d: / (dashboard), /metrics, /status.json; `fedtune status HOST:%d`\n", (*server)->http_port(), (*server)->http_port());
  std::fflush(stdout);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  std::thread watcher([&] {
    while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    (*server)->Shutdown();
  });
  const absl::Status st = (*server)->Wait();
  if (st.ok() && !g_stop) {
    // Workers between requests when the last round committed learn the run is over before the
    // service goes away (otherwise they would keep retrying it).
    const int untold = (*server)->TellWorkersTheRunIsOver(std::chrono::seconds(15));
    if (untold > 0) FT_LOG_WARN("{} online worker(s) were not told the run is over within 15 s", untold);
  }
  g_stop = true;
  watcher.join();
  if (!st.ok() && !absl::IsCancelled(st)) return st;
  std::printf("coordinator: %d rounds committed\n", (*server)->last_committed_round());
  return absl::OkStatus();
}

absl::Status ServeWorker(const proto::WorkerConfig& c, const model::LlamaModel& model, const std::vector<model::Example>& train,
                         const std::vector<model::Example>& eval, kernels::Backend* backend);

// fedtune worker --config: trains tasks from the coordinator until it says the run is over.
absl::Status RunWorker(const std::string& path, bool check_only) {
  proto::WorkerConfig c;
  if (auto st = LoadConfigFile(path, &c); !st.ok()) return ConfigError(st);
  auto backend = kernels::SelectBackend(c.device().empty() ? "cpu" : c.device());
  if (!backend.ok()) return ConfigErrorIn("device", backend.status());
  if (c.activation_budget_mib() < -1)
    return ConfigError(absl::InvalidArgumentError("activation_budget_mib: -1 (recompute), 0 (as memory allows, the default) or a budget in MiB"));
  auto m = model::LlamaModel::Load(c.model().path());
  if (!m.ok()) return ConfigError(m.status());
  model::DatasetOptions d;
  d.holdout = 0;
  d.max_len = OrDefault(c.max_len(), 256);
  auto data = model::LoadDataset(c.data(), *(*m)->tokenizer(), d);
  if (!data.ok()) return ConfigError(data.status());
  std::vector<model::Example> eval;
  if (!c.eval_data().empty()) {
    auto e = model::LoadDataset(c.eval_data(), *(*m)->tokenizer(), d);
    if (!e.ok()) return ConfigErrorIn("eval_data", e.status());
    eval = std::move(e->train);
  }
  if (check_only) {  // everything the daemon reads before it connects, without connecting
    for (const std::string& f : {c.tls().ca(), c.tls().cert(), c.tls().key(), c.token_file()})
      if (auto t = ReadFileToString(f); !t.ok()) return ConfigErrorIn(path, t.status());
    std::printf("%s: valid (%zu training examples, kernels %s, coordinator %s)\n", path.c_str(), data->train.size(), (*backend)->Name(),
                c.coordinator().c_str());
    return absl::OkStatus();
  }
  return ServeWorker(c, **m, data->train, eval, *backend);
}

// A worker daemon for a loaded configuration, model and data (`worker --config`, `simulate --client`).
absl::Status ServeWorker(const proto::WorkerConfig& c, const model::LlamaModel& model, const std::vector<model::Example>& train,
                         const std::vector<model::Example>& eval, kernels::Backend* backend) {
  auto token = ReadFileToString(c.token_file());
  if (!token.ok()) return ConfigError(token.status());
  worker::DaemonOptions o;
  o.address = c.coordinator();
  o.ca_pem = c.tls().ca();
  o.cert_pem = c.tls().cert();
  o.key_pem = c.tls().key();
  o.token = std::string(absl::StripAsciiWhitespace(*token));
  o.state_dir = c.state_dir();
  if (c.device_memory_budget_mib() < 0) return ConfigErrorIn("device_memory_budget_mib", absl::InvalidArgumentError("must be >= 0"));
  o.profile = worker::MeasureProfile(&model, &train, c.memory_budget_mib(), backend, c.device_memory_budget_mib());
  if (!eval.empty()) o.profile.set_eval_examples(static_cast<int64_t>(eval.size()));
  o.measure_bases = worker::BaseSpeedMeasurer(model, c.model().path(), train, backend, o.state_dir.empty() ? "" : o.state_dir + "/base_speeds.json",
                                              static_cast<double>(o.profile.memory_bytes()) / (1 << 20), &g_stop);
  std::printf("worker profile: %d cores, %.1f GiB for training, kernels %s, %.0f training tokens/s (measured at batch 1; x%.2f keeping activations, "
              "x%.2f at batch 4)\n",
              o.profile.cores(), static_cast<double>(o.profile.memory_bytes()) / (1 << 30), backend->Name(), o.profile.train_tokens_per_second(),
              o.profile.keep_speedup(), o.profile.batch4_speedup());
  if (o.profile.device_memory_bytes() > 0)
    std::printf("worker device: %s, %.0f MiB for training\n", o.profile.gpu().c_str(), static_cast<double>(o.profile.device_memory_bytes()) / (1 << 20));
  std::fflush(stdout);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  // One set of re-quantized (compensated) bases for training and evaluation: built once.
  auto bases = std::make_shared<worker::BaseModels>(model, c.model().path(), /*keep_one=*/true);
  if (!o.state_dir.empty()) bases->SetCacheDir(o.state_dir + "/compensation-cache");
  auto r = worker::RunDaemon(o, worker::ModelTaskRunner(model, train, c.model().path(), c.activation_budget_mib(), backend,
                                                         o.state_dir.empty() ? "" : o.state_dir + "/local_privacy.json",
                                                         static_cast<double>(o.profile.memory_bytes()) / (1 << 20), /*report_peak=*/true, bases,
                                                         static_cast<double>(o.profile.device_memory_bytes()) / (1 << 20),
                                                         o.state_dir.empty() ? "" : o.state_dir + "/error_feedback.safetensors"),
                             g_stop,
                             eval.empty() ? worker::TaskEvaluator() : worker::ModelTaskEvaluator(model, eval, c.model().path(), &train, bases));
  if (!r.ok()) return r.status();
  std::printf("worker: trained %d rounds (%d from its state directory, %d abandoned, %d declined over its memory budget), %d evaluations\n",
              r->rounds_trained, r->rounds_reused, r->rounds_abandoned, r->rounds_declined, r->evaluations);
  return absl::OkStatus();
}

// fedtune simulate CONFIG --serve | --client K: the simulation across machines. The coordinator
// runs the config's rounds for `clients` worker processes named client-000...; client process K
// computes the config's data split, takes its part and trains as a worker daemon (a Slurm array
// task or a Kubernetes Indexed Job pod per client; docs/deploy.md). Client profiles (speed, link,
// dropout) are simulation-only and not applied; the rest of the round is the simulation's.
struct ClusterSimArgs {
  bool serve = false, check = false;
  int client = -1;
  std::string pki, coordinator, listen = "0.0.0.0:7443", state, device, http;
  int deadline_seconds = 600;
  int64_t memory_budget_mib = 0;
};

absl::Status RunSimulateCluster(const std::string& config_path, const ClusterSimArgs& a) {
  proto::SimulationConfig c;
  if (auto st = LoadConfigFile(config_path, &c); !st.ok()) return ConfigError(st);
  const std::string stem = std::filesystem::path(config_path).stem().string();
  const absl::Status no_pki = ConfigError(absl::InvalidArgumentError("--pki: the folder `fedtune provision --clients N` wrote"));
  if (a.serve) {
    auto cc = sim::CoordinatorConfigFor(c);
    if (!cc.ok()) return ConfigErrorIn(config_path, cc.status());
    if (a.check) {  // what --serve would refuse, without starting anything
      std::printf("%s: valid for --serve\n", config_path.c_str());
      return absl::OkStatus();
    }
    if (a.pki.empty()) return no_pki;
    cc->set_listen(a.listen);
    cc->mutable_tls()->set_ca(a.pki + "/ca.pem");
    cc->mutable_tls()->set_cert(a.pki + "/coordinator.pem");
    cc->mutable_tls()->set_key(a.pki + "/coordinator.key");
    cc->set_tokens(a.pki + "/tokens.sha256");
    cc->set_state_dir(a.state.empty() ? "runs/" + stem + "-cluster" : a.state);
    cc->set_deadline_seconds(a.deadline_seconds);
    cc->set_http(a.http);
    if (c.profiles_size() > 0) std::printf("client profiles (speed, links, dropout) are simulation-only: real processes run at their own speed\n");
    // The global adapter is scored on the simulation's held-out split after evaluated rounds
    // (with data.client_files: on eval.data, as in the simulation).
    coordinator::HeldOutFn held_out;
    if (c.data().client_files_size() == 0)
      held_out = [&c](const model::Tokenizer& tok) -> absl::StatusOr<std::vector<model::Example>> {
        FT_ASSIGN_OR_RETURN(std::vector<model::Example> h, sim::HeldOutData(c, tok));
        std::printf("held-out evaluation: %zu examples of the config's split\n", h.size());
        return h;
      };
    return ServeCoordinator(*cc, config_path, held_out);
  }
  if (a.pki.empty()) return no_pki;
  if (a.coordinator.empty()) return ConfigError(absl::InvalidArgumentError("--coordinator HOST:PORT is needed with --client"));
  const std::string name = sim::ClientName(a.client);
  proto::WorkerConfig w;
  w.set_coordinator(a.coordinator);
  w.mutable_tls()->set_ca(a.pki + "/ca.pem");
  w.mutable_tls()->set_cert(a.pki + "/workers/" + name + ".pem");
  w.mutable_tls()->set_key(a.pki + "/workers/" + name + ".key");
  w.set_token_file(a.pki + "/workers/" + name + ".token");
  *w.mutable_model() = c.model();
  w.set_state_dir(a.state.empty() ? "runs/" + stem + "-" + name : a.state);
  w.set_memory_budget_mib(a.memory_budget_mib);
  w.set_activation_budget_mib(c.train().no_recompute() ? 0 : c.train().activation_budget_mib());
  const std::string device = !a.device.empty() ? a.device : c.train().device().empty() ? "cpu" : c.train().device();
  auto backend = kernels::SelectBackend(device);
  if (!backend.ok()) return ConfigErrorIn("device", backend.status());
  auto m = model::LlamaModel::Load(c.model().path());
  if (!m.ok()) return ConfigError(m.status());
  if ((*m)->tokenizer() == nullptr) return ConfigError(absl::FailedPreconditionError("the model has no tokenizer"));
  auto train = sim::ClientTrainingData(c, a.client, *(*m)->tokenizer());
  if (!train.ok()) return ConfigErrorIn(config_path, train.status());
  std::printf("%s: %zu training examples of the config's split\n", name.c_str(), train->size());
  return ServeWorker(w, **m, *train, {}, *backend);
}

// fedtune status HOST:PORT — the coordinator's status server (its `http` setting).
absl::Status RunStatus(const std::string& address, const std::string& token_file) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port))
    return absl::InvalidArgumentError("status: expected HOST:PORT of the coordinator's http setting");
  std::string token;
  if (!token_file.empty()) {
    FT_ASSIGN_OR_RETURN(token, ReadFileToString(token_file));
    token = std::string(absl::StripAsciiWhitespace(token));
  }
  auto body = coordinator::HttpGet(address.substr(0, colon), port, "/status.json", token);
  if (!body.ok()) return body.status();
  const auto j = nlohmann::json::parse(*body, nullptr, false);
  if (j.is_discarded()) return absl::DataLossError("status: not JSON");
  std::printf("round %d of %d (%d committed), phase: %s\n", j.value("round", 0), j.value("rounds_total", 0), j.value("committed", 0),
              j.value("phase", std::string("?")).c_str());
  if (j.contains("workers"))
    for (const auto& w : j["workers"])
      std::printf("  %-20s last seen %6.1f s ago, %d updates accepted\n", w.value("id", std::string("?")).c_str(), w.value("last_seen_seconds", -1.0),
                  w.value("updates_accepted", 0));
  if (j.contains("rounds") && !j["rounds"].empty()) {
    // One line per committed round: what the dashboard charts (held-out evaluation, privacy).
    auto cell = [](const nlohmann::json& r, const char* k, const char* fmt, double scale) {
      return r.contains(k) && r[k].is_number() ? absl::StrFormat(fmt, scale * r[k].get<double>()) : std::string("-");
    };
    std::printf("%-6s %-9s %-9s %-11s %-10s %-10s %-10s %-8s\n", "round", "accepted", "failures", "train loss", "eval loss", "accuracy",
                "epsilon", "local eps");
    for (const auto& r : j["rounds"])
      std::printf("%-6d %-9s %-9s %-11s %-10s %-10s %-10s %-8s\n", r.value("round", 0), cell(r, "accepted", "%.0f", 1).c_str(),
                  cell(r, "failures", "%.0f", 1).c_str(), cell(r, "train_loss", "%.4f", 1).c_str(), cell(r, "eval_loss", "%.4f", 1).c_str(),
                  cell(r, "accuracy", "%.1f%%", 100).c_str(), cell(r, "epsilon", "%.3f", 1).c_str(), cell(r, "local_epsilon", "%.3f", 1).c_str());
  }
  return absl::OkStatus();
}

int main(int argc, char** argv) {
  // Buffers of 1 MiB and more come from mmap and go back to the system when freed. glibc raises
  // that threshold after large frees and then serves such buffers from the heap, where the
  // changing sizes of packed batches fragment it: the main job (configs/quickstart.yaml) peaked at
  // 1,373 MiB without this and 1,024 MiB with it, same wall time within noise (129-134 s). The
  // coordinator sets its own, lower threshold (RunCoordinator).
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  CLI::App app{"fedtune: federated fine-tuning of quantized LLMs"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("fedtune ") + FEDTUNE_VERSION + " (" + FEDTUNE_SYSTEM_PROCESSOR + ")");
  int threads = 0;
  std::string log_level = "info";
  app.add_option("-t,--threads", threads, "Worker threads (0 = all cores)");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off");

  auto* info = app.add_subcommand("info", "Describe a model: architecture, metadata, tensors");
  std::string info_model;
  bool all_tensors = false;
  info->add_option("model", info_model, "GGUF file or Hugging Face folder")->required();
  info->add_flag("--all", all_tensors, "List every tensor");

  auto* gen = app.add_subcommand("generate", "Generate text from a prompt");
  GenerateArgs ga;
  gen->add_option("model", ga.model, "GGUF model file")->required();
  gen->add_option("-p,--prompt", ga.prompt, "Prompt text")->required();
  gen->add_flag("--chat", ga.chat, "Wrap the prompt as a user turn in the model's chat format");
  gen->add_option("--system", ga.system, "System message (with --chat)");
  gen->add_flag("--special", ga.raw, "Parse special tokens written in the prompt (always on with --chat)");
  gen->add_option("-n,--max-tokens", ga.max_tokens, "Tokens to generate")->check(CLI::Range(1, 1 << 20));
  gen->add_option("--temp", ga.temperature, "Temperature (0 = greedy)")->check(CLI::Range(0.0, 100.0));
  gen->add_option("--top-p", ga.top_p, "Nucleus sampling threshold")->check(CLI::Range(0.0, 1.0));
  gen->add_option("--seed", ga.seed, "Sampling seed");
  gen->add_option("--ctx", ga.n_ctx, "Context length")->check(CLI::Range(16, 1 << 20));

  auto* ppl = app.add_subcommand("perplexity", "Perplexity of a text file with a sliding window");
  std::string ppl_model;
  std::vector<std::string> ppl_files;
  int64_t window = 512, stride = 256, max_tokens = 0;
  ppl->add_option("model", ppl_model, "GGUF model file")->required();
  ppl->add_option("-f,--file", ppl_files, "Text file (repeat for several: the model is loaded and re-quantized once)")->required();
  ppl->add_option("--window", window, "Window length in tokens")->check(CLI::Range(2, 1 << 20));
  ppl->add_option("--stride", stride, "Window stride in tokens")->check(CLI::Range(1, 1 << 20));
  ppl->add_option("--max-tokens", max_tokens, "Score at most this many tokens (0 = all)");
  BaseArgs ppl_base;
  AddBaseOptions(ppl, ppl_base);

  auto* train = app.add_subcommand("train", "Fine-tune adapters on a dataset (single machine; the centralized baseline)");
  TrainArgs ta;
  train->add_option("model", ta.model, "GGUF model file")->required();
  train->add_option("-d,--data", ta.data, "JSONL ({prompt,response} or {messages}) or plain text")->required();
  train->add_option("-o,--out", ta.out, "Output folder (adapter.safetensors)");
  train->add_option("--adapter", ta.adapter, "lora, ffa_lora or diablo");
  train->add_option("--modules", ta.modules, "q,k,v,o,gate,up,down | all | attn | mlp");
  train->add_option("--layers", ta.layers, "Per-layer settings: LAYERS[:MODULES][:rRANK] entries separated by ';', e.g. \"0-14:q,v:r4;15-29:all:r16\" (layers no entry names get no adapters)");
  train->add_option("--rank", ta.rank, "LoRA rank")->check(CLI::Range(1, 4096));
  train->add_option("--alpha", ta.alpha, "LoRA alpha (scale alpha/rank)");
  train->add_flag("--rslora", ta.rslora, "Scale alpha/sqrt(rank)");
  train->add_option("--blocks", ta.blocks, "DiaBlo blocks")->check(CLI::Range(1, 65536));
  train->add_option("--steps", ta.steps, "Optimizer steps")->check(CLI::Range(0, 10000000));
  train->add_option("--batch", ta.batch, "Examples per micro-batch")->check(CLI::Range(1, 4096));
  train->add_option("--grad-accum", ta.grad_accum, "Micro-batches per step")->check(CLI::Range(1, 4096));
  train->add_option("--lr", ta.lr, "Peak learning rate");
  train->add_option("--warmup", ta.warmup, "Warm-up steps");
  train->add_option("--weight-decay", ta.weight_decay, "AdamW decoupled weight decay");
  train->add_option("--clip", ta.clip, "Gradient clipping norm (0 = off)");
  train->add_option("--max-len", ta.max_len, "Truncate examples to this many tokens")->check(CLI::Range(2, 1 << 20));
  train->add_option("--holdout", ta.holdout, "Held-out fraction")->check(CLI::Range(0.0, 0.9));
  train->add_option("--eval-examples", ta.eval_examples, "Held-out examples to evaluate before/after (0 = skip)");
  train->add_option("--max-new-tokens", ta.max_new_tokens, "Answer length limit in evaluation");
  train->add_option("--seed", ta.seed, "Data order / split seed");
  train->add_option("--adapter-seed", ta.adapter_seed, "Seed of the adapter init (FFA-LoRA's frozen A)");
  train->add_option("--init", ta.init_adapter, "Continue from an adapter.safetensors or a PEFT LoRA folder");
  train->add_flag("--no-recompute", ta.no_recompute, "Keep all activations instead of recomputing them in backward");
  train->add_option("--micro-batch", ta.micro_batch,
                    "Sequences per forward/backward pass (0 = whole batch); with --no-recompute bounds activation memory")
      ->check(CLI::Range(0, 4096));
  train->add_option("--activation-budget", ta.activation_budget,
                    "MiB of activations to keep per pass (default 1024): keep them for as many sequences per pass as fit "
                    "(faster), recompute when none fits; 0 = always recompute")
      ->check(CLI::Range(0, 1 << 20));
  train->add_flag("--no-pack", ta.no_pack, "Pad every example to the batch's longest instead of packing several per row");
  train->add_option("--adapter-dropout", ta.adapter_dropout, "Dropout on the adapters' inputs (LoRA lora_dropout)")->check(CLI::Range(0.0, 0.99));
  train->add_option("--device", ta.device, "Kernels: cpu (default: cpu-bf16 where the CPU has a bf16 unit, else cpu-fast), cpu-fast (fp32), cpu-bf16 (bf16 weight products on AVX-512-BF16 / AMX CPUs), cpu-ref, cuda, or auto (CUDA when usable; never run on a real GPU yet)");
  train->add_option("--checkpoint-every", ta.checkpoint_every, "Write OUT/checkpoint.safetensors (adapters + optimizer) every N steps");
  train->add_flag("--resume", ta.resume, "Continue from OUT/checkpoint.safetensors (same data, seed and options)");
  AddBaseOptions(train, ta.base);

  auto* ev = app.add_subcommand("eval", "Held-out loss, perplexity and exact-match accuracy");
  std::string ev_model, ev_data, ev_adapter;
  int ev_n = 100, ev_new = 48;
  int64_t ev_len = 256;
  double ev_holdout = 0.1;
  ev->add_option("model", ev_model, "GGUF model file")->required();
  ev->add_option("-d,--data", ev_data, "Dataset (the held-out split is evaluated, same seed as train)")->required();
  ev->add_option("-a,--adapter-file", ev_adapter, "adapter.safetensors from train (omit for the base model)");
  ev->add_option("-n,--examples", ev_n, "Examples to evaluate");
  ev->add_option("--max-new-tokens", ev_new, "Answer length limit");
  ev->add_option("--max-len", ev_len, "Truncate examples to this many tokens");
  ev->add_option("--holdout", ev_holdout, "Held-out fraction (as in train; 0 = evaluate everything)");

  std::string ev_dump;
  ev->add_option("--dump", ev_dump, "Write prompts and greedy answers as JSONL");

  auto* ex = app.add_subcommand("export", "Export a trained adapter: PEFT, GGUF-LoRA or a merged GGUF model");
  std::string ex_model, ex_adapter, ex_format = "gguf-lora", ex_out, ex_merged = "f16", ex_base = "HuggingFaceTB/SmolLM2-135M-Instruct";
  ex->add_option("model", ex_model, "Base GGUF model")->required();
  ex->add_option("-a,--adapter-file", ex_adapter, "adapter.safetensors from train")->required();
  ex->add_option("-f,--format", ex_format, "peft (folder), gguf-lora (file) or merged (file)");
  ex->add_option("-o,--out", ex_out, "Output path")->required();
  ex->add_option("--merged-type", ex_merged, "Type of merged weights: f16, bf16, f32, q8_0");
  ex->add_option("--base-name", ex_base, "base_model_name_or_path written into the PEFT config");

  auto* mk = app.add_subcommand("make-task", "Write a built-in task as JSONL");
  std::string mk_name = "record", mk_out;
  int mk_n = 1000;
  uint64_t mk_seed = 1;
  mk->add_option("name", mk_name, "Task: record, date, sum, sentiment, extract (synthetic); wordnet, gcide, foldoc, jargon, "
                                  "eng-fra, eng-deu, eng-spa, names-fr, names-de, names-es (real text from Debian packages)");
  mk->add_option("-o,--out", mk_out, "Output .jsonl")->required();
  mk->add_option("-n", mk_n, "Examples");
  mk->add_option("--seed", mk_seed, "Seed");

  auto* simc = app.add_subcommand("simulate", "Simulated federated fine-tune: many clients on this machine");
  std::string sim_config, sim_out;
  bool sim_check = false;
  simc->add_option("config", sim_config, "Simulation config (YAML), e.g. configs/quickstart.yaml")->required();
  simc->add_option("-o,--out", sim_out, "Run directory (overrides output_dir)");
  simc->add_flag("--check", sim_check, "Only validate the config");
  ClusterSimArgs csa;
  auto* serve_opt = simc->add_flag("--serve", csa.serve, "Across machines: run the coordinator for the config's clients as worker processes");
  auto* client_opt = simc->add_option("--client", csa.client, "Across machines: run simulated client K (0-based) as a worker process")
                         ->check(CLI::Range(0, 99999));
  serve_opt->excludes(client_opt);
  simc->add_option("--pki", csa.pki, "With --serve/--client: the folder of `fedtune provision --clients N`");
  simc->add_option("--coordinator", csa.coordinator, "With --client: HOST:PORT of the --serve process");
  simc->add_option("--listen", csa.listen, "With --serve: address to listen on (default 0.0.0.0:7443)");
  simc->add_option("--state", csa.state, "With --serve/--client: state folder (default runs/<config>-cluster, runs/<config>-client-K)");
  simc->add_option("--deadline", csa.deadline_seconds, "With --serve: seconds a round waits for its clients")->check(CLI::Range(1, 1 << 20));
  simc->add_option("--http", csa.http, "With --serve: status server address, e.g. 127.0.0.1:9090");
  simc->add_option("--device", csa.device, "With --client: kernels (default: the config's train.device, else cpu)");
  simc->add_option("--memory-budget", csa.memory_budget_mib, "With --client: memory budget in MiB reported to the planner");

  auto* prov = app.add_subcommand("provision", "Create a CA, the coordinator certificate and per-worker certificates and join tokens");
  coordinator::ProvisionOptions po;
  int prov_n = 0;
  prov->add_option("-o,--out", po.dir, "Output folder (keys are written with mode 0600)")->required();
  prov->add_option("--host", po.hosts, "Coordinator DNS name or IP address (repeatable)");
  prov->add_option("--worker", po.workers, "Worker name (repeatable)");
  prov->add_option("--workers", prov_n, "Also create workers worker-001 .. worker-N");
  int prov_clients = 0;
  prov->add_option("--clients", prov_clients, "Also create client-000 .. client-(N-1): the simulated clients of `simulate --client`")
      ->check(CLI::Range(0, 100000));
  prov->add_option("--days", po.valid_days, "Validity of the coordinator and worker certificates");
  prov->add_flag("--force", po.force, "Replace an existing CA");
  std::vector<std::string> prov_revoke;
  prov->add_option("--revoke", prov_revoke, "Revoke a worker (repeatable): a running coordinator refuses it within a second");

  auto* coord = app.add_subcommand("coordinator", "Run the coordinator service (gRPC, mutual TLS)");
  std::string coord_config;
  coord->add_option("--config", coord_config, "Coordinator config (YAML), e.g. configs/coordinator.yaml")->required();
  bool coord_check = false;
  coord->add_flag("--check", coord_check, "Check the config and the files it names (credentials, model, tokens), then exit");
  auto* wk = app.add_subcommand("worker", "Run a worker daemon against a coordinator");
  std::string worker_config;
  wk->add_option("--config", worker_config, "Worker config (YAML), e.g. configs/worker.yaml")->required();
  bool worker_check = false;
  wk->add_flag("--check", worker_check, "Check the config and the files it names (credentials, model, data), then exit");

  auto* stat = app.add_subcommand("status", "Show a running coordinator's state (from its http status server)");
  std::string stat_addr;
  stat->add_option("address", stat_addr, "HOST:PORT of the coordinator's `http` setting")->required();
  std::string stat_token;
  stat->add_option("--token-file", stat_token, "File with the status server's bearer token (http_token_file)");

  CLI11_PARSE(app, argc, argv);
  if (!SetLogLevel(log_level)) return ExitCode(absl::InvalidArgumentError("unknown --log-level " + log_level));
  kernels::SetThreads(threads);
  if (*info) return ExitCode(RunInfo(info_model, all_tensors));
  if (*gen) return ExitCode(RunGenerate(ga));
  if (*ppl) return ExitCode(RunPerplexity(ppl_model, ppl_files, window, stride, max_tokens, ppl_base));
  if (*train) return ExitCode(RunTrain(ta));
  if (*ev) return ExitCode(RunEval(ev_model, ev_data, ev_adapter, ev_n, ev_new, ev_len, ev_holdout, ev_dump));
  if (*ex) return ExitCode(RunExport(ex_model, ex_adapter, ex_format, ex_out, ex_merged, ex_base));
  if (*simc) {
    csa.check = sim_check;
    if (csa.serve || (csa.client >= 0 && !sim_check)) return ExitCode(RunSimulateCluster(sim_config, csa));
    return ExitCode(RunSimulate(sim_config, sim_out, sim_check));
  }
  if (*coord) return ExitCode(RunCoordinator(coord_config, coord_check));
  if (*stat) return ExitCode(RunStatus(stat_addr, stat_token));
  if (*wk) return ExitCode(RunWorker(worker_config, worker_check));
  if (*prov) return ExitCode(RunProvision(po, prov_n, prov_clients, prov_revoke));
  if (*mk) return ExitCode(RunMakeTask(mk_name, mk_n, mk_seed, mk_out));
  return 0;
}

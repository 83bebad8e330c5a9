// fedtune command-line interface: info, generate, perplexity (more subcommands arrive with the
// fine-tuning, federated and simulation modules).
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/progress.h"
#include "kernels/thread_pool.h"
#include "model/llama.h"
#include "model/perplexity.h"
#include "model/sampler.h"

namespace {

using namespace fedtune;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double PeakRssMiB() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "fedtune: error: %s\n", std::string(s.ToString()).c_str());
  return 1;
}

std::string HumanBytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  int u = 0;
  while (b >= 1024 && u < 3) { b /= 1024; ++u; }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", b, units[u]);
  return buf;
}

int RunInfo(const std::string& path, bool all_tensors) {
  auto m = model::LlamaModel::Load(path);
  if (!m.ok()) return Fail(m.status());
  const auto& c = (*m)->config();
  std::printf("model: %s\narchitecture: %s\nparameters: %lld\n", path.c_str(), c.arch.c_str(), static_cast<long long>(c.n_params));
  std::printf("layers %lld, embedding %lld, heads %lld (kv %lld, head dim %lld), ffn %lld, vocab %lld\n",
              static_cast<long long>(c.n_layer), static_cast<long long>(c.n_embd), static_cast<long long>(c.n_head),
              static_cast<long long>(c.n_head_kv), static_cast<long long>(c.head_dim), static_cast<long long>(c.n_ff),
              static_cast<long long>(c.n_vocab));
  std::printf("context %lld, rope base %g (dims %lld), rms eps %g, output %s\n", static_cast<long long>(c.n_ctx_train),
              c.rope_base, static_cast<long long>(c.rope_dim), c.rms_eps, c.tied_output ? "tied to token_embd" : "separate");
  if (const auto* tok = (*m)->tokenizer()) {
    std::printf("tokenizer: byte-level BPE, %d tokens, bos %d, eos %d, add_bos %s\n", tok->vocab_size(), tok->bos_id(),
                tok->eos_id(), tok->add_bos() ? "yes" : "no");
  }
  const model::GgufFile* g = (*m)->gguf();
  if (g == nullptr) return 0;
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
  return 0;
}

struct GenerateArgs {
  std::string model, prompt, system;
  bool chat = false, raw = false;
  int max_tokens = 128;
  float temperature = 0.0f, top_p = 0.95f;
  uint64_t seed = 42;
  int64_t n_ctx = 2048;
};

int RunGenerate(const GenerateArgs& a) {
  auto loaded = model::LlamaModel::Load(a.model);
  if (!loaded.ok()) return Fail(loaded.status());
  const auto& m = **loaded;
  const model::Tokenizer* tok = m.tokenizer();
  if (tok == nullptr) return Fail(absl::FailedPreconditionError("model has no tokenizer (generate needs a GGUF model)"));
  std::string text = a.prompt;
  if (a.chat) {
    std::vector<model::ChatMessage> msgs;
    if (!a.system.empty()) msgs.push_back({"system", a.system});
    msgs.push_back({"user", a.prompt});
    text = tok->FormatChat(msgs, true);
  }
  const std::vector<int32_t> prompt = tok->EncodeWithBos(text, /*parse_special=*/a.chat || a.raw);
  if (prompt.empty()) return Fail(absl::InvalidArgumentError("empty prompt"));
  const int64_t n_ctx = std::min<int64_t>(a.n_ctx, m.config().n_ctx_train);
  if (static_cast<int64_t>(prompt.size()) + a.max_tokens > n_ctx) {
    return Fail(absl::OutOfRangeError(absl::StrCat("prompt (", prompt.size(), " tokens) + max tokens (", a.max_tokens,
                                                   ") exceed the context of ", n_ctx, " (--ctx)")));
  }
  model::LlamaContext ctx(m, n_ctx);
  model::Sampler sampler({a.temperature, a.top_p, a.seed});
  std::vector<float> logits;
  const auto t0 = Clock::now();
  if (auto s = ctx.Eval(prompt, false, &logits); !s.ok()) return Fail(s);
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
    if (auto s = ctx.Eval(one, false, &logits); !s.ok()) return Fail(s);
  }
  const auto t2 = Clock::now();
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr, "[fedtune] prompt %zu tokens in %.2f s (%.1f tok/s); generated %d tokens in %.2f s (%.1f tok/s); peak RSS %.0f MiB\n",
               prompt.size(), Seconds(t0, t1), static_cast<double>(prompt.size()) / Seconds(t0, t1), generated, Seconds(t1, t2),
               generated / std::max(1e-9, Seconds(t1, t2)), PeakRssMiB());
  return 0;
}

int RunPerplexity(const std::string& model_path, const std::string& file, int64_t window, int64_t stride, int64_t max_tokens) {
  auto loaded = model::LlamaModel::Load(model_path);
  if (!loaded.ok()) return Fail(loaded.status());
  const auto& m = **loaded;
  if (m.tokenizer() == nullptr) return Fail(absl::FailedPreconditionError("model has no tokenizer"));
  auto text = ReadFileToString(file);
  if (!text.ok()) return Fail(text.status());
  std::vector<int32_t> tokens = m.tokenizer()->EncodeWithBos(*text, false);
  if (max_tokens > 0 && static_cast<int64_t>(tokens.size()) > max_tokens) tokens.resize(static_cast<size_t>(max_tokens));
  std::fprintf(stderr, "[fedtune] %s: %zu tokens, window %lld, stride %lld\n", file.c_str(), tokens.size(),
               static_cast<long long>(window), static_cast<long long>(stride));
  Progress progress("perplexity", static_cast<int64_t>(tokens.size()), "tok");
  auto r = model::Perplexity(m, tokens, window, stride, [&](int64_t done, int64_t) { progress.Update(done); });
  progress.Finish();
  if (!r.ok()) return Fail(r.status());
  std::printf("perplexity %.4f over %lld tokens (mean NLL %.6f); %.1f tok/s evaluated; peak RSS %.0f MiB\n", r->perplexity(),
              static_cast<long long>(r->n_scored), r->nll_sum / static_cast<double>(r->n_scored), r->tokens_per_second, PeakRssMiB());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fedtune: federated fine-tuning of quantized LLMs"};
  app.require_subcommand(1);
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
  std::string ppl_model, ppl_file;
  int64_t window = 512, stride = 256, max_tokens = 0;
  ppl->add_option("model", ppl_model, "GGUF model file")->required();
  ppl->add_option("-f,--file", ppl_file, "Text file")->required();
  ppl->add_option("--window", window, "Window length in tokens")->check(CLI::Range(2, 1 << 20));
  ppl->add_option("--stride", stride, "Window stride in tokens")->check(CLI::Range(1, 1 << 20));
  ppl->add_option("--max-tokens", max_tokens, "Score at most this many tokens (0 = all)");

  CLI11_PARSE(app, argc, argv);
  if (!SetLogLevel(log_level)) return Fail(absl::InvalidArgumentError("unknown --log-level " + log_level));
  kernels::SetThreads(threads);
  if (*info) return RunInfo(info_model, all_tensors);
  if (*gen) return RunGenerate(ga);
  if (*ppl) return RunPerplexity(ppl_model, ppl_file, window, stride, max_tokens);
  return 0;
}

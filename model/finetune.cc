#include "model/finetune.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "common/log.h"
#include "common/rng.h"
#include "kernels/ops.h"
#include "model/safetensors.h"
#include "model/sampler.h"
#include "model/trainer.h"

namespace fedtune::model {

using Clock = std::chrono::steady_clock;

namespace {

// Dropout masks: a fresh seed for every forward/backward pass (each micro-batch, each DP-SGD
// pass) that depends only on the run's seed and the pass's place in the schedule, so a
// resumed run draws the masks the uninterrupted one would have (on kernels of the same kind:
// DP-SGD's examples per pass, and so its masks, differ between host and device kernels).
uint64_t DropoutSeed(uint64_t seed, int step, int pass) {
  return Mix64(seed * 0x9e3779b97f4a7c15ULL + (static_cast<uint64_t>(step) << 20) + static_cast<uint64_t>(pass));
}

}  // namespace

int DpExamplesPerPass(int64_t trained_values, int expected_batch) {
  const int64_t fit = kDpExampleGradientBytes / std::max<int64_t>(1, trained_values * static_cast<int64_t>(sizeof(float)));
  return static_cast<int>(std::clamp<int64_t>(fit, 1, std::max(1, expected_batch)));
}

std::vector<size_t> PoissonBatch(size_t examples, double q, const std::function<double()>& uniform) {
  std::vector<size_t> chosen;
  for (size_t i = 0; i < examples; ++i)
    if (uniform() < q) chosen.push_back(i);
  return chosen;
}

namespace {

// One DP-SGD step's gradient: a Poisson batch (each example with q = batch / examples, from the
// CSPRNG), per-example gradients clipped to dp_clip, summed, noised, divided by the expected
// batch size; left in the adapters' gradient buffers. The drawn examples run DpExamplesPerPass
// at a time with per-example gradients kept apart (one at a time where the kernels cannot).
absl::Status DpSgdGradients(Trainer<float>& trainer, int step, const std::vector<Example>& train, const FinetuneOptions& o, AdapterSet<float>* adapters,
                            int32_t pad, std::map<std::string, std::vector<double>>* sum, double* nll, int64_t* scored, int64_t* tokens,
                            int64_t* drawn) {
  const int n = o.batch * o.grad_accum;
  const double q = std::min(1.0, static_cast<double>(n) / static_cast<double>(train.size()));
  for (auto& [name, v] : *sum) std::fill(v.begin(), v.end(), 0.0);
  const std::vector<size_t> batch = PoissonBatch(train.size(), q, o.dp_uniform);
  *drawn += static_cast<int64_t>(batch.size());
  // Clips the gradient in the adapters' buffers (one example's) and adds it to the sum.
  auto clip_and_add = [&] {
    double sq = 0;
    adapters->ForEachTrainable([&](const std::string&, std::span<float>, std::span<float> g) {
      for (float x : g) sq += static_cast<double>(x) * x;
    });
    const double f = std::min(1.0, o.dp_clip / std::max(std::sqrt(sq), 1e-30));
    adapters->ForEachTrainable([&](const std::string& name, std::span<float>, std::span<float> g) {
      std::vector<double>& acc = (*sum)[name];
      acc.resize(g.size(), 0.0);
      for (size_t k = 0; k < g.size(); ++k) {
        acc[k] += f * g[k];
        g[k] = 0.0f;
      }
    });
  };
  const int want = o.dp_examples_per_pass > 0 ? o.dp_examples_per_pass : DpExamplesPerPass(adapters->GradientValues(), n);
  const size_t per_pass = trainer.PerExampleSupported() ? static_cast<size_t>(std::max(1, want)) : 1;
  trainer.set_per_example(per_pass > 1);
  for (size_t i = 0, pass = 0; i < batch.size(); i += per_pass, ++pass) {
    std::vector<const Example*> ex;
    for (size_t k = i; k < std::min(batch.size(), i + per_pass); ++k) ex.push_back(&train[batch[k]]);
    const Batch b = MakeBatch(ex, pad);
    trainer.set_dropout_seed(DropoutSeed(o.seed, step, static_cast<int>(pass)));
    const int64_t s = b.n_scored();
    *scored += s;
    *tokens += b.n_seq * b.len;
    if (per_pass == 1) {  // the gradient of the example's mean token NLL, straight into the adapters' buffers
      FT_ASSIGN_OR_RETURN(double l, trainer.Step(b, s > 0 ? 1.0f / static_cast<float>(s) : 0.0f, true));
      *nll += l;
      clip_and_add();
      continue;
    }
    FT_ASSIGN_OR_RETURN(double l, trainer.Step(b, 1.0f, true));  // per sequence: the gradient of its summed NLL
    *nll += l;
    for (size_t k = 0; k < ex.size(); ++k) {
      int64_t own = 0;  // scored tokens of example k
      for (int32_t t : ex[k]->targets) own += t >= 0;
      trainer.LoadExampleGradient(static_cast<int64_t>(k), own > 0 ? 1.0f / static_cast<float>(own) : 0.0f);
      clip_and_add();
    }
  }
  trainer.set_per_example(false);
  const double sd = o.dp_noise_multiplier * o.dp_clip;
  adapters->ForEachTrainable([&](const std::string& name, std::span<float>, std::span<float> g) {
    std::vector<double>& acc = (*sum)[name];
    acc.resize(g.size(), 0.0);  // an empty Poisson batch leaves the sum at zero: noise only
    for (size_t k = 0; k < g.size(); ++k) g[k] = static_cast<float>((acc[k] + (sd > 0 ? sd * o.dp_normal() : 0.0)) / n);
  });
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TrainReport> Finetune(const LlamaModel& model, const std::vector<Example>& train, const FinetuneOptions& o,
                                     AdapterSet<float>* adapters, AdamW* optimizer, const std::function<void(const StepLog&)>& on_step) {
  if (train.empty()) return absl::InvalidArgumentError("no training examples");
  if (o.batch < 1 || o.grad_accum < 1 || o.steps < 0) return absl::InvalidArgumentError("batch, grad_accum must be >= 1 and steps >= 0");
  const Tokenizer* tok = model.tokenizer();
  const int32_t pad = tok ? tok->eos_id() : 0;
  if (o.micro_batch < 0) return absl::InvalidArgumentError("micro_batch must be >= 0");
  if (o.activation_budget_mib < 0) return absl::InvalidArgumentError("activation budget must be >= 0 MiB");
  if (!(o.adapter_dropout >= 0.0f && o.adapter_dropout < 1.0f)) return absl::InvalidArgumentError("adapter dropout must be in [0, 1)");
  Trainer<float> trainer(model, adapters,
                         TrainerOptions{.recompute = o.recompute,
                                        .micro_batch = o.micro_batch,
                                        .backend = o.backend,
                                        .adapter_dropout = o.adapter_dropout,
                                        .activation_budget_bytes = int64_t{o.activation_budget_mib} << 20});
  if (o.backend != nullptr) optimizer->set_backend(o.backend);
  if (o.activation_budget_mib > 0 && o.log_every > 0) {
    int64_t longest = 1;
    for (const Example& e : train) longest = std::max<int64_t>(longest, static_cast<int64_t>(e.tokens.size()));
    const PassPlan p = trainer.PlanFor(o.batch, longest);
    const double per_seq_mib = static_cast<double>(trainer.KeptBytesPerSequence(longest)) / (1 << 20);
    if (p.recompute) {
      FT_LOG_INFO("activations: recomputed (one sequence of {} tokens keeps {:.0f} MiB > budget {} MiB)", longest, per_seq_mib, o.activation_budget_mib);
    } else {
      FT_LOG_INFO("activations: kept, {} sequence(s) per pass ({:.0f} MiB each at {} tokens; budget {} MiB)", p.micro_batch > 0 ? p.micro_batch : o.batch,
                  per_seq_mib, longest, o.activation_budget_mib);
    }
  }
  Rng rng(o.seed);
  std::vector<size_t> order(train.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  size_t cursor = order.size();  // forces a shuffle first
  auto next_example = [&] {  // a deterministic reshuffle at every epoch boundary
    if (cursor >= order.size()) {
      for (size_t k = order.size(); k > 1; --k) std::swap(order[k - 1], order[rng.Below(k)]);
      cursor = 0;
    }
    return order[cursor++];
  };
  if (o.dp_clip > 0 && (!o.dp_normal || !o.dp_uniform)) return absl::InvalidArgumentError("DP-SGD needs a CSPRNG (dp_normal, dp_uniform)");
  if (o.dp_noise_multiplier < 0) return absl::InvalidArgumentError("dp_noise_multiplier must be >= 0");
  std::map<std::string, std::vector<double>> dp_sum;
  TrainReport rep;
  const auto t_start = Clock::now();
  adapters->ZeroGrad();
  // Resuming: replay the example order of the steps already taken.
  const int first = optimizer->step();
  for (int64_t skip = static_cast<int64_t>(first) * o.grad_accum * o.batch; skip > 0; --skip) next_example();
  for (int step = first; step < o.steps; ++step) {
    const auto t0 = Clock::now();
    double nll = 0;
    int64_t scored = 0, tokens = 0;
    if (o.dp_clip > 0) {
      FT_RETURN_IF_ERROR(DpSgdGradients(trainer, step, train, o, adapters, pad, &dp_sum, &nll, &scored, &tokens, &rep.dp_examples));
    } else {
      std::vector<Batch> micro;
      for (int a = 0; a < o.grad_accum; ++a) {
        std::vector<const Example*> ex;
        for (int i = 0; i < o.batch; ++i) ex.push_back(&train[next_example()]);
        micro.push_back(o.pack ? MakePackedBatch(ex, pad) : MakeBatch(ex, pad));
        scored += micro.back().n_scored();
      }
      // Loss = mean NLL over all scored tokens of the step: each micro-batch's gradient is
      // scaled by 1 / (scored tokens in the whole step).
      const float scale = scored > 0 ? 1.0f / static_cast<float>(scored) : 0.0f;
      for (size_t k = 0; k < micro.size(); ++k) {
        const Batch& b = micro[k];
        trainer.set_dropout_seed(DropoutSeed(o.seed, step, static_cast<int>(k)));
        FT_ASSIGN_OR_RETURN(double l, trainer.Step(b, scale, true));
        nll += l;
        tokens += b.n_seq * b.len;
      }
    }
    if (o.proximal_mu > 0 && o.proximal_center != nullptr) {
      const float mu = static_cast<float>(o.proximal_mu);
      adapters->ForEachTrainableAt([&](const std::string& name, std::span<float> p, std::span<float> g, size_t at) {
        auto it = o.proximal_center->find(name);
        // (A DiaBlo module trained on some of its blocks: the center's values of those blocks.)
        if (it == o.proximal_center->end()) return;
        if (it->second.size() != p.size() && !(name.ends_with(".diablo") && it->second.size() >= at + p.size())) return;
        for (size_t i = 0; i < p.size(); ++i) g[i] += mu * (p[i] - it->second[at + i]);
      });
    }
    const float lr = LearningRate(optimizer->config(), optimizer->step());
    const double gnorm = optimizer->Step(*adapters);
    // The optimizer cleared the gradients it stepped; a DiaBlo module trained on some of its
    // blocks also accumulated gradients for the others (nobody reads them): clear those too.
    adapters->ZeroGrad();
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    rep.tokens += tokens;
    rep.final_loss = scored ? nll / static_cast<double>(scored) : 0.0;
    ++rep.steps;
    if (on_step) on_step({step + 1, rep.final_loss, gnorm, lr, static_cast<double>(tokens) / secs});
    if (o.checkpoint_every > 0 && ((step + 1) % o.checkpoint_every == 0 || step + 1 == o.steps)) {
      FT_RETURN_IF_ERROR(SaveCheckpoint(o.checkpoint_path, *adapters, *optimizer));
    }
  }
  rep.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  return rep;
}

absl::Status SaveCheckpoint(const std::string& path, AdapterSet<float>& adapters, AdamW& opt) {
  if (path.empty()) return absl::InvalidArgumentError("checkpoint path is empty");
  SafetensorsWriter w;
  absl::Status st;
  adapters.ForEachTrainable([&](const std::string& name, std::span<float> p, std::span<float>) {
    if (!st.ok()) return;
    st = w.AddF32("param." + name, {static_cast<int64_t>(p.size())}, p);
    for (auto* kv : {&opt.m(), &opt.v()}) {
      auto it = kv->find(name);
      if (st.ok() && it != kv->end()) st = w.AddF32((kv == &opt.m() ? "adam_m." : "adam_v.") + name, {static_cast<int64_t>(it->second.size())}, it->second);
    }
    auto f = opt.fisher().find(name);
    if (st.ok() && f != opt.fisher().end()) st = w.AddF32("fisher." + name, {static_cast<int64_t>(f->second.size())}, f->second);
  });
  FT_RETURN_IF_ERROR(st);
  w.SetMetadata("fedtune.checkpoint_step", std::to_string(opt.step()));
  return w.WriteFile(path);
}

absl::Status LoadCheckpoint(const std::string& path, AdapterSet<float>& adapters, AdamW* opt) {
  FT_ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(path));
  auto it = f->metadata().find("fedtune.checkpoint_step");
  int step = 0;
  if (it == f->metadata().end() || !absl::SimpleAtoi(it->second, &step) || step < 0) {
    return absl::DataLossError(absl::StrCat(path, ": not a fedtune checkpoint (no step)"));
  }
  absl::Status st;
  auto load = [&](const std::string& name, std::vector<float>& dst, bool required) {
    if (!st.ok()) return;
    if (f->Find(name) == nullptr) {
      if (required) st = absl::NotFoundError(absl::StrCat(path, ": missing ", name));
      return;
    }
    auto t = f->ToF32(name);
    if (!t.ok()) {
      st = t.status();
      return;
    }
    if (!dst.empty() && static_cast<size_t>(t->size()) != dst.size()) {
      st = absl::InvalidArgumentError(absl::StrCat(path, ": ", name, " has ", t->size(), " values, expected ", dst.size()));
      return;
    }
    dst.assign(t->data<float>(), t->data<float>() + t->size());
  };
  adapters.ForEachTrainable([&](const std::string& name, std::span<float> p, std::span<float>) {
    std::vector<float> values(p.begin(), p.end());
    load("param." + name, values, true);
    if (st.ok()) std::copy(values.begin(), values.end(), p.begin());
    load("adam_m." + name, opt->m()[name], step > 0);
    load("adam_v." + name, opt->v()[name], step > 0);
    load("fisher." + name, opt->fisher_mut()[name], false);
  });
  FT_RETURN_IF_ERROR(st);
  opt->set_step(step);
  return absl::OkStatus();
}

double EvalResult::perplexity() const { return std::exp(loss); }

absl::StatusOr<std::string> GenerateGreedy(const LlamaModel& model, const AdapterSet<float>* adapters, const std::string& prompt,
                                           int max_new_tokens, std::optional<bool> int8_activations) {
  FT_ASSIGN_OR_RETURN(std::vector<std::string> out,
                      GenerateGreedyBatch(model, adapters, std::span<const std::string>(&prompt, 1), max_new_tokens, int8_activations));
  return std::move(out[0]);
}

absl::StatusOr<std::vector<std::string>> GenerateGreedyBatch(const LlamaModel& model, const AdapterSet<float>* adapters,
                                                             std::span<const std::string> prompts, int max_new_tokens,
                                                             std::optional<bool> int8_activations) {
  const Tokenizer* tok = model.tokenizer();
  if (tok == nullptr) return absl::FailedPreconditionError("model has no tokenizer");
  std::vector<std::string> out(prompts.size());
  if (prompts.empty() || max_new_tokens < 1) return out;
  const auto& c = model.config();
  const int64_t n_vocab = c.n_vocab;
  const int64_t kv_per_token = 2 * c.n_layer * c.n_head_kv * c.head_dim * static_cast<int64_t>(sizeof(float));
  std::vector<float> logits, one;
  // Decoding steps of up to kGenerateBatch sequences take the same per-row 8-bit products as
  // one sequence alone (kernels::MatMulQ); only the output layer's f32 products may differ in
  // rounding (fused dot alone, SGEMM together), as before the 8-bit path existed.
  static_assert(kGenerateBatch <= kernels::kInt8Rows);
  const bool int8 = int8_activations.value_or(kernels::Int8DecodingDefault());
  for (size_t first = 0; first < prompts.size();) {
    // A group: up to kGenerateBatch prompts whose KV caches fit in kGenerateKvBytes (at least one).
    std::vector<std::unique_ptr<LlamaContext>> ctx;
    std::vector<LlamaContext*> active;
    std::vector<size_t> which;  // prompt index of each active context
    int64_t kv_bytes = 0;
    logits.clear();
    for (size_t i = first; i < prompts.size() && ctx.size() < static_cast<size_t>(kGenerateBatch); ++i) {
      const std::vector<int32_t> ids = tok->EncodeWithBos(prompts[i]);
      const int64_t n_ctx = static_cast<int64_t>(ids.size()) + max_new_tokens + 1;
      if (!ctx.empty() && kv_bytes + n_ctx * kv_per_token > kGenerateKvBytes) break;
      kv_bytes += n_ctx * kv_per_token;
      ctx.push_back(std::make_unique<LlamaContext>(model, n_ctx));
      ctx.back()->set_int8_activations(int8);
      ctx.back()->SetAdapters(adapters);
      // Each prompt fills its cache alone (a pass over all prompts at once would hold every
      // prompt's activations together); the decoding steps below are batched. Tried (2026-12-07):
      // prompts prefilled together (EvalBatch, <= 512 rows a pass) took 200 WordNet prompts with
      // <= 32 new tokens from 41.1 to 37.7 s, but the f32 SGEMM rounds a row differently with the
      // pass's height and one of six SmolLM2 answers flipped at a near-tie
      // (SmolLM2Test.AnswersDecodedTogetherAreTheAnswersDecodedAlone): not kept.
      FT_RETURN_IF_ERROR(ctx.back()->Eval(ids, false, &one));
      logits.insert(logits.end(), one.begin(), one.end());
      active.push_back(ctx.back().get());
      which.push_back(i);
    }
    first += ctx.size();
    for (int step = 0; !active.empty(); ++step) {
      std::vector<LlamaContext*> next_active;
      std::vector<size_t> next_which;
      std::vector<std::vector<int32_t>> feed;
      for (size_t j = 0; j < active.size(); ++j) {
        const int32_t next = Argmax(std::span<const float>(logits).subspan(j * static_cast<size_t>(n_vocab), static_cast<size_t>(n_vocab)));
        if (tok->IsEndOfGeneration(next)) continue;
        out[which[j]] += tok->TokenBytes(next);
        if (step + 1 >= max_new_tokens) continue;  // the last token needs no pass of its own
        next_active.push_back(active[j]);
        next_which.push_back(which[j]);
        feed.push_back({next});
      }
      active = std::move(next_active);
      which = std::move(next_which);
      if (!active.empty()) FT_RETURN_IF_ERROR(LlamaContext::EvalBatch(active, feed, &logits));
    }
  }
  return out;
}

namespace {
std::vector<std::string> RougeTokens(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (std::isalnum(c) || c >= 0x80) {
      cur += static_cast<char>(std::tolower(c));
    } else if (!cur.empty()) {
      out.push_back(std::move(cur));
      cur.clear();
    }
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}
}  // namespace

double RougeL(const std::string& reference, const std::string& candidate) {
  const auto a = RougeTokens(reference), b = RougeTokens(candidate);
  if (a.empty() || b.empty()) return 0.0;
  std::vector<int> prev(b.size() + 1, 0), cur(b.size() + 1, 0);
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) cur[j] = a[i - 1] == b[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], cur[j - 1]);
    std::swap(prev, cur);
  }
  const double lcs = prev[b.size()];
  if (lcs == 0) return 0.0;
  const double p = lcs / static_cast<double>(b.size()), r = lcs / static_cast<double>(a.size());
  return 2 * p * r / (p + r);
}

absl::StatusOr<EvalResult> Evaluate(const LlamaModel& model, const AdapterSet<float>* adapters, const std::vector<Example>& eval,
                                    int max_examples, int max_new_tokens, int batch, int max_generated) {
  EvalResult r;
  const size_t n = max_examples > 0 ? std::min(eval.size(), static_cast<size_t>(max_examples)) : eval.size();
  if (n == 0) return r;
  // Loss through the training forward (no backward); the adapters are only read.
  AdapterSet<float>* rw = const_cast<AdapterSet<float>*>(adapters);
  AdapterSet<float> none;
  if (rw == nullptr) {
    none.layers.resize(static_cast<size_t>(model.config().n_layer));
    rw = &none;
  }
  Trainer<float> trainer(model, rw, true);
  double nll = 0;
  for (size_t i = 0; i < n; i += static_cast<size_t>(batch)) {
    std::vector<const Example*> ex;
    for (size_t k = i; k < std::min(n, i + static_cast<size_t>(batch)); ++k) ex.push_back(&eval[k]);
    const Batch b = MakeBatch(ex, model.tokenizer() ? model.tokenizer()->eos_id() : 0);
    FT_ASSIGN_OR_RETURN(double l, trainer.Step(b, 0.0f, false));
    nll += l;
    r.n_tokens += b.n_scored();
  }
  r.loss = r.n_tokens ? nll / static_cast<double>(r.n_tokens) : 0.0;
  const size_t n_gen = max_generated > 0 ? std::min(n, static_cast<size_t>(max_generated)) : n;
  std::vector<size_t> asked;
  std::vector<std::string> prompts;
  for (size_t i = 0; i < n_gen; ++i) {
    if (eval[i].reference.empty() || eval[i].prompt_text.empty()) continue;
    asked.push_back(i);
    prompts.push_back(eval[i].prompt_text);
  }
  FT_ASSIGN_OR_RETURN(const std::vector<std::string> answers, GenerateGreedyBatch(model, adapters, prompts, max_new_tokens));
  for (size_t q = 0; q < asked.size(); ++q) {
    const size_t i = asked[q];
    const std::string& got = answers[q];
    ++r.n_generated;
    const std::string answer(absl::StripAsciiWhitespace(got));
    bool exact = answer == absl::StripAsciiWhitespace(eval[i].reference);
    double rouge = RougeL(eval[i].reference, got);
    for (const std::string& a : eval[i].answers) {
      exact = exact || answer == absl::StripAsciiWhitespace(a);
      rouge = std::max(rouge, RougeL(a, got));
    }
    if (exact) ++r.n_exact;
    r.rouge_l_sum += rouge;
    if (r.samples.size() < 5) r.samples.emplace_back(eval[i].reference, got);
  }
  return r;
}

}  // namespace fedtune::model

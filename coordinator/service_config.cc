#include "coordinator/service_config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/config_loader.h"
#include "common/mapped_file.h"
#include "aggregation/compression.h"
#include "federation/settings.h"
#include "model/finetune.h"
#include "protocol/adapter_tensors.h"

namespace fedtune::coordinator {
namespace {

absl::Status Bad(const std::string& key, const std::string& what) { return absl::InvalidArgumentError(absl::StrCat(key, ": ", what)); }

}  // namespace

absl::StatusOr<std::unique_ptr<Service>> ServiceFromConfig(const proto::CoordinatorConfig& c, const HeldOutFn& held_out) {
  auto svc = std::make_unique<Service>();
  ServerOptions& o = svc->options;
  // Keys the deployed runner does not honour (yet): refused, never silently ignored.
  if (c.train().activation_budget_mib() != 0)
    return Bad("train.activation_budget_mib", "set it in each worker's config (activation_budget_mib), not the coordinator's");
  if (c.train().no_recompute()) return Bad("train.no_recompute", "a worker decides its activation memory (worker config activation_budget_mib)");
  if (!c.train().device().empty()) return Bad("train.device", "each worker chooses its kernels (worker config device)");
  if (c.train().stand_in()) return Bad("train.stand_in", "simulation only");
  if (!c.train().compensation_cache().empty())
    return Bad("train.compensation_cache", "simulation only: a worker keeps its compensated bases under its state_dir");
  if (c.secure_aggregation().stage_seconds() < 0) return Bad("secure_aggregation.stage_seconds", "must be >= 0");
  if (c.eval().per_client()) return Bad("eval.per_client", "simulation only");
  if (c.dp().enabled() && c.dp().local() && c.dp().target_epsilon() > 0)
    return Bad("dp.target_epsilon", "with local DP the coordinator does not know the workers' data sizes: set dp.noise_multiplier (workers report their epsilon)");
  if (c.planner().calibration_steps() != 0) return Bad("planner.calibration_steps", "simulation only (deployed workers measure their own speed)");

  // Population for DP accounting: the provisioned workers.
  FT_ASSIGN_OR_RETURN(std::string tokens, ReadFileToString(c.tokens()));
  int population = 0;
  {
    std::istringstream ts(tokens);
    std::string name, hash;
    while (ts >> name >> hash) ++population;
  }
  if (population < 1) return Bad("tokens", absl::StrCat(c.tokens(), " lists no worker"));
  FT_ASSIGN_OR_RETURN(federation::RunSettings rs, federation::ResolveRun(c, population));
  if (rs.secure.enabled && OrDefault(c.min_workers(), 1) < 3)
    return Bad("min_workers", "secure aggregation needs at least 3 workers in a round: set min_workers >= 3");

  FT_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> m, model::LlamaModel::Load(c.model().path()));
  FT_ASSIGN_OR_RETURN(auto set, model::MakeAdaptersWithLayout<float>(m->adapter_dims(), rs.adapter.spec, rs.adapter.modules, rs.adapter.layout,
                                                                      rs.adapter_seed));
  o.initial_global = protocol::AdapterTensors(set);
  o.address = c.listen().empty() ? "0.0.0.0:7443" : c.listen();
  o.ca_pem = c.tls().ca();
  o.cert_pem = c.tls().cert();
  o.key_pem = c.tls().key();
  o.tokens_path = c.tokens();
  o.engine.state_dir = c.state_dir();
  o.engine.min_available = OrDefault(c.min_workers(), 1);
  o.engine.quorum = OrDefault(c.quorum(), 1);
  o.engine.target_updates = c.target_updates();
  o.deadline_ms = OrDefault(c.deadline_seconds(), 600) * 1000;
  o.http_address = c.http();
  o.http_allow_remote = c.http_allow_remote();
  if (!c.http_token_file().empty()) {
    auto t = ReadFileToString(c.http_token_file());
    if (!t.ok()) return Bad("http_token_file", std::string(t.status().message()));
    o.http_token = std::string(absl::StripAsciiWhitespace(*t));
  }
  o.max_concurrent_uploads = OrDefault(c.max_concurrent_uploads(), 4);
  o.heartbeat_ms = OrDefault(c.heartbeat_seconds(), 2) * 1000;
  o.offline_after_ms = OrDefault(c.offline_after_seconds(), 30) * 1000;
  o.secure_stage_ms = OrDefault(c.secure_aggregation().stage_seconds(), 60) * 1000;
  if (c.planner().enabled()) {
    const planner::Candidate uniform{rs.adapter.modules, m->layer(0).wq.type, rs.batch, rs.local_steps};
    FT_ASSIGN_OR_RETURN(planner::PlannerOptions po, federation::PlannerOptionsFrom(c.planner(), rs.adapter.spec, rs.adapter.modules, uniform,
                                                                                   OrDefault(c.planner().seq(), 256), rs.send_fisher, true));
    po.memory.keep_within_limit = true;  // workers keep activations as far as their memory allows (ClientEnv)
    po.upload_ratio = aggregation::CompressedBytesPerFp32Byte(rs.compression, rs.topk_fraction);
    if (!rs.adapter.layout.empty()) {  // the modules and ranks each layer has
      FT_ASSIGN_OR_RETURN(po.memory.layout, model::ParseLayerLayout(rs.adapter.layout, m->config().n_layer, rs.adapter.modules));
      FT_RETURN_IF_ERROR(planner::CheckLayout(po.memory.layout, rs.adapter.modules));
    }
    po.memory.adapter_copies = 2;        // a worker daemon's global adapter and update (ClientEnv)
    if (!rs.compensation.empty()) po.memory.compensation_rank = rs.compensation_rank;
    po.whole_adapter = rs.secure.enabled;  // no per-module shares under secure aggregation (settings.cc)
    if (rs.dp.local) {  // every worker within the uniform configuration's privacy cost (its reported examples)
      po.local_dp_sigma = rs.dp.noise_multiplier;
      po.local_dp_delta = rs.dp.delta;
      po.local_dp_rounds = rs.rounds;
      po.memory.per_example = true;
    }
    std::map<model::Module, double> importance;  // uniform until merged updates show where they move
    for (model::Module mod : rs.adapter.modules) importance[mod] = 1.0 / static_cast<double>(rs.adapter.modules.size());
    o.engine.planning = federation::EngineOptions::Planning{planner::ModelShape::Of(*m), po, importance, /*every_round=*/true};
  }
  o.engine.settings = rs;
  if (held_out) {
    if (!c.eval().data().empty()) return Bad("eval.data", "not with a simulation's own held-out split");
    if (m->tokenizer() == nullptr) return Bad("model.path", "the model has no tokenizer");
    FT_ASSIGN_OR_RETURN(svc->eval_data, held_out(*m->tokenizer()));
  } else if (!c.eval().data().empty()) {
    if (m->tokenizer() == nullptr) return Bad("eval.data", "the model has no tokenizer");
    model::DatasetOptions d;
    d.holdout = 0;
    d.max_len = 256;
    FT_ASSIGN_OR_RETURN(model::Dataset data, model::LoadDataset(c.eval().data(), *m->tokenizer(), d));
    if (data.train.empty()) return Bad("eval.data", absl::StrCat(c.eval().data(), " holds no example"));
    svc->eval_data = std::move(data.train);
  }
  if (!svc->eval_data.empty()) {  // server-side evaluation keeps the base in memory
    svc->eval_model = std::move(m);
    const model::LlamaModel* model = svc->eval_model.get();
    const std::vector<model::Example>* examples = &svc->eval_data;
    auto adapters = std::make_shared<model::AdapterSet<float>>(std::move(set));
    const int max_new = rs.max_new_tokens, generate = rs.generate_examples;
    o.evaluate = [model, examples, adapters, max_new, generate](const aggregation::TensorMap& g, std::map<std::string, double>& metrics) -> absl::Status {
      FT_RETURN_IF_ERROR(protocol::SetAdapterTensors(g, adapters.get()));
      FT_ASSIGN_OR_RETURN(model::EvalResult r, model::Evaluate(*model, adapters.get(), *examples, 0, max_new, 8, generate));
      metrics["eval_loss"] = r.loss;
      metrics["eval_ppl"] = std::exp(r.loss);
      if (r.n_generated > 0) {
        metrics["accuracy"] = r.accuracy();
        metrics["rouge_l"] = r.rouge_l();
      }
      return absl::OkStatus();
    };
  }
  return svc;
}

}  // namespace fedtune::coordinator

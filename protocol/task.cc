#include "protocol/task.h"

#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "aggregation/hetero_rank.h"
#include "model/adapter.h"

namespace fedtune::protocol {

SecureShare ShareOf(const AdapterPlan& p, int round) {
  SecureShare s;
  if (TrainsPart(p)) {
    s.rank = p.train_rank;
    s.first = static_cast<int>(FirstBlock(p, round));
  }
  // A planned task lists its modules even when it trains all of them: that is the whole adapter.
  std::vector<std::string> all = p.modules;
  s.modules = p.train_modules;
  std::sort(all.begin(), all.end());
  std::sort(s.modules.begin(), s.modules.end());
  if (!all.empty() && std::includes(s.modules.begin(), s.modules.end(), all.begin(), all.end())) s.modules.clear();
  return s;
}

namespace {

// The module (ModuleName) of an adapter tensor "blk.L.<gguf module>.<kind>"; its values'
// components are aggregation::ComponentOf's (the layout TruncateRank / ExpandRank cut).
absl::StatusOr<std::string> ModuleOf(const std::string& name) {
  const std::vector<std::string> p = absl::StrSplit(name, '.');
  if (p.size() != 4 || p[0] != "blk") return absl::InvalidArgumentError(absl::StrCat("secure shares: unexpected tensor name ", name));
  for (int m = 0; m < model::kNumModules; ++m)
    if (p[2] == model::GgufModuleName(static_cast<model::Module>(m))) return std::string(model::ModuleName(static_cast<model::Module>(m)));
  return absl::InvalidArgumentError(absl::StrCat("secure shares: no module in tensor name ", name));
}
bool Covers(const SecureShare& s, const std::string& module, int64_t component) {
  if (!s.modules.empty() && std::find(s.modules.begin(), s.modules.end(), module) == s.modules.end()) return false;
  return s.rank == 0 || component < 0 || (component >= s.first && component < static_cast<int64_t>(s.first) + s.rank);
}
absl::Status ValidShare(const SecureShare& s, int full) {
  if (s.rank < 0 || s.first < 0 || static_cast<int64_t>(s.first) + s.rank > full || (s.rank == 0 && s.first != 0))
    return absl::InvalidArgumentError(absl::StrCat("secure shares: ", s.rank, " components from ", s.first, " are not within ", full));
  return absl::OkStatus();
}

// The distinct (module, component) pieces of the adapter (component -1: a tensor not split by
// component): at most modules x full.
absl::StatusOr<std::set<std::pair<std::string, int64_t>>> Pieces(const aggregation::TensorMap& layout, int full) {
  std::set<std::pair<std::string, int64_t>> pieces;
  for (const auto& [name, v] : layout) {
    FT_ASSIGN_OR_RETURN(const std::string module, ModuleOf(name));
    const bool split = aggregation::ComponentOf(name, 0, v.size(), full) >= 0;
    for (int64_t c = split ? 0 : -1; c < (split ? full : 0); ++c) pieces.insert({module, c});
  }
  return pieces;
}

}  // namespace

absl::StatusOr<aggregation::TensorMap> ShareCoverage(const SecureShare& s, const aggregation::TensorMap& layout, int full) {
  FT_RETURN_IF_ERROR(ValidShare(s, full));
  aggregation::TensorMap cov;
  for (const auto& [name, v] : layout) {
    FT_ASSIGN_OR_RETURN(const std::string module, ModuleOf(name));
    std::vector<float>& c = cov[name];
    c.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) c[i] = Covers(s, module, aggregation::ComponentOf(name, i, v.size(), full)) ? 1.0f : 0.0f;
  }
  return cov;
}

absl::Status CheckShareCounts(const std::vector<SecureShare>& shares, const std::vector<int>& survivors, const aggregation::TensorMap& layout,
                              int full, int threshold) {
  if (shares.empty()) return absl::OkStatus();
  for (const SecureShare& s : shares) FT_RETURN_IF_ERROR(ValidShare(s, full));
  const std::set<int> distinct(survivors.begin(), survivors.end());  // (a repeated id counts once)
  FT_ASSIGN_OR_RETURN(const auto pieces, Pieces(layout, full));
  for (const auto& [module, c] : pieces) {
    int n = 0;
    for (int id : distinct) {
      if (id < 0 || static_cast<size_t>(id) >= shares.size()) return absl::InvalidArgumentError(absl::StrCat("secure shares: no share for id ", id));
      n += Covers(shares[static_cast<size_t>(id)], module, c) ? 1 : 0;
    }
    if (n > 0 && n < threshold)
      return absl::FailedPreconditionError(absl::StrCat("secure aggregation: module ", module, c >= 0 ? absl::StrCat(" component ", c) : "",
                                                        " is trained by ", n, " survivor(s), fewer than the threshold ", threshold,
                                                        ": its sum would show too few updates"));
  }
  return absl::OkStatus();
}


absl::StatusOr<int64_t> CoveredPieces(const std::vector<SecureShare>& shares, const aggregation::TensorMap& layout, int full) {
  FT_ASSIGN_OR_RETURN(const auto pieces, Pieces(layout, full));
  int64_t n = 0;
  for (const SecureShare& s : shares) {
    FT_RETURN_IF_ERROR(ValidShare(s, full));
    for (const auto& [module, c] : pieces) n += Covers(s, module, c) ? 1 : 0;
  }
  return n;
}

absl::StatusOr<int64_t> NarrowShares(std::vector<SecureShare>* shares, std::vector<bool>* nothing, const std::vector<std::string>& modules,
                                     const aggregation::TensorMap& layout, int full, int threshold) {
  nothing->assign(shares->size(), false);
  for (const SecureShare& s : *shares) {
    FT_RETURN_IF_ERROR(ValidShare(s, full));
    if (s.first != 0) return absl::InvalidArgumentError("secure shares: DiaBlo windows are not narrowed");
  }
  FT_ASSIGN_OR_RETURN(const auto pieces, Pieces(layout, full));
  for (bool changed = true; changed;) {
    changed = false;
    for (const auto& [module, c] : pieces) {
      std::vector<size_t> covering;
      for (size_t i = 0; i < shares->size(); ++i)
        if (!(*nothing)[i] && Covers((*shares)[i], module, c)) covering.push_back(i);
      if (covering.empty() || static_cast<int>(covering.size()) >= threshold) continue;
      changed = true;
      for (size_t i : covering) {
        SecureShare& s = (*shares)[i];
        if (c > 0) {  // components c.. of every module the share trains
          s.rank = static_cast<int>(c);
          continue;
        }
        if (s.modules.empty()) s.modules = modules;  // all of them, listed
        std::erase(s.modules, module);
        if (s.modules.empty()) (*nothing)[i] = true;
      }
    }
  }
  std::vector<SecureShare> training;
  for (size_t i = 0; i < shares->size(); ++i) {
    std::sort((*shares)[i].modules.begin(), (*shares)[i].modules.end());  // as ShareOf lists them
    if (!(*nothing)[i]) training.push_back((*shares)[i]);
  }
  return CoveredPieces(training, layout, full);
}

rpc::v1::Task ToProto(const TrainTask& t) {
  rpc::v1::Task p;
  p.set_kind(t.evaluate ? rpc::v1::Task::EVALUATE : rpc::v1::Task::TRAIN);
  p.set_max_new_tokens(t.max_new_tokens);
  p.set_generate_examples(t.generate_examples);
  p.set_run_id(t.run_id);
  p.set_round(t.round);
  rpc::v1::AdapterPlan* a = p.mutable_plan();
  a->set_kind(t.plan.kind);
  a->set_rank(t.plan.rank);
  a->set_alpha(t.plan.alpha);
  a->set_blocks(t.plan.blocks);
  a->set_rslora(t.plan.rslora);
  for (const auto& m : t.plan.modules) a->add_modules(m);
  a->set_adapter_seed(t.plan.adapter_seed);
  a->set_layers(t.plan.layers);
  for (const auto& m : t.plan.train_modules) a->add_train_modules(m);
  a->set_base_type(t.plan.base_type);
  a->set_compensation(t.plan.compensation);
  a->set_compensation_rank(t.plan.compensation_rank);
  a->set_compensation_damping(t.plan.compensation_damping);
  a->set_train_rank(t.plan.train_rank);
  a->set_block_offset(t.plan.block_offset);
  a->set_plan_memory_mib(t.plan.plan_memory_mib);
  a->set_plan_device_memory_mib(t.plan.plan_device_memory_mib);
  a->set_explanation(t.plan.explanation);
  p.set_local_steps(t.local_steps);
  p.set_batch(t.batch);
  p.set_learning_rate(t.learning_rate);
  p.set_warmup_steps(t.warmup_steps);
  p.set_weight_decay(t.weight_decay);
  p.set_grad_clip_norm(t.grad_clip_norm);
  p.set_seed(t.seed);
  for (const auto& [k, v] : t.config) (*p.mutable_config())[k] = v;
  p.set_send_fisher(t.send_fisher);
  p.set_compression(t.compression);
  p.set_topk_fraction(t.topk_fraction);
  p.set_error_feedback(t.error_feedback);
  p.set_local_dp_clip(t.local_dp_clip);
  p.set_local_dp_noise(t.local_dp_noise);
  p.set_local_dp_delta(t.local_dp_delta);
  p.set_secure_aggregation(t.secure_aggregation);
  p.set_dp_clip_norm(t.dp_clip_norm);
  p.set_dp_noise_stddev(t.dp_noise_stddev);
  p.set_secagg_id(t.secagg.id);
  p.set_secagg_clients(t.secagg.clients);
  p.set_secagg_degree(t.secagg.degree);
  p.set_secagg_threshold(t.secagg.threshold);
  p.set_secagg_graph_seed(t.secagg.graph_seed);
  p.set_secagg_value_range(t.secagg.value_range);
  p.set_secagg_weight_divisor(t.secagg.weight_divisor);
  p.set_test_noise_seed(t.test_noise_seed);
  p.set_secagg_fisher_clip(t.secagg.fisher_clip);
  p.set_secagg_fisher_lambda(t.secagg.fisher_lambda);
  for (const SecureShare& s : t.secagg.shares) {
    rpc::v1::SecAggShareOfAdapter* o = p.add_secagg_shares();
    o->set_rank(s.rank);
    o->set_first(s.first);
    for (const auto& m : s.modules) o->add_modules(m);
  }
  p.set_adapter_sha256(t.adapter_sha256);
  p.set_adapter_bytes(t.adapter_bytes);
  p.set_deadline_unix_ms(t.deadline_unix_ms);
  return p;
}

TrainTask FromProto(const rpc::v1::Task& p, const std::string& client) {
  TrainTask t;
  t.evaluate = p.kind() == rpc::v1::Task::EVALUATE;
  t.max_new_tokens = p.max_new_tokens();
  t.generate_examples = p.generate_examples();
  t.run_id = p.run_id();
  t.round = p.round();
  t.client = client;
  const rpc::v1::AdapterPlan& a = p.plan();
  t.plan.kind = a.kind();
  t.plan.rank = a.rank();
  t.plan.alpha = a.alpha();
  t.plan.blocks = a.blocks();
  t.plan.rslora = a.rslora();
  t.plan.modules.assign(a.modules().begin(), a.modules().end());
  t.plan.adapter_seed = a.adapter_seed();
  t.plan.layers = a.layers();
  t.plan.train_modules.assign(a.train_modules().begin(), a.train_modules().end());
  t.plan.base_type = a.base_type();
  t.plan.compensation = a.compensation();
  // (0 from a coordinator whose method has no correction, gptq: the rank is then unused.)
  t.plan.compensation_rank = a.compensation_rank() > 0 ? a.compensation_rank() : 16;
  t.plan.compensation_damping = a.compensation_damping() > 0 && std::isfinite(a.compensation_damping()) ? a.compensation_damping() : 0.01;
  t.plan.train_rank = a.train_rank();
  t.plan.block_offset = std::clamp(a.block_offset(), 0, 1 << 20);
  // (From the coordinator: finite and positive, or ignored.)
  t.plan.plan_memory_mib = std::isfinite(a.plan_memory_mib()) && a.plan_memory_mib() > 0 ? a.plan_memory_mib() : 0;
  t.plan.plan_device_memory_mib = std::isfinite(a.plan_device_memory_mib()) && a.plan_device_memory_mib() > 0 ? a.plan_device_memory_mib() : 0;
  t.plan.explanation = a.explanation();
  t.local_steps = p.local_steps();
  t.batch = p.batch();
  t.learning_rate = p.learning_rate();
  t.warmup_steps = p.warmup_steps();
  t.weight_decay = p.weight_decay();
  t.grad_clip_norm = p.grad_clip_norm();
  t.seed = p.seed();
  t.config.insert(p.config().begin(), p.config().end());
  t.send_fisher = p.send_fisher();
  t.compression = p.compression();
  t.topk_fraction = p.topk_fraction();
  t.error_feedback = p.error_feedback();
  t.local_dp_clip = p.local_dp_clip();
  t.local_dp_noise = p.local_dp_noise();
  t.local_dp_delta = p.local_dp_delta();
  t.secure_aggregation = p.secure_aggregation();
  t.dp_clip_norm = p.dp_clip_norm();
  t.dp_noise_stddev = p.dp_noise_stddev();
  t.secagg.id = p.secagg_id();
  t.secagg.clients = p.secagg_clients();
  t.secagg.degree = p.secagg_degree();
  t.secagg.threshold = p.secagg_threshold();
  t.secagg.graph_seed = p.secagg_graph_seed();
  t.secagg.value_range = p.secagg_value_range();
  t.secagg.weight_divisor = p.secagg_weight_divisor();
  t.test_noise_seed = p.test_noise_seed();
  t.secagg.fisher_clip = p.secagg_fisher_clip();
  t.secagg.fisher_lambda = p.secagg_fisher_lambda();
  for (const auto& o : p.secagg_shares()) t.secagg.shares.push_back({o.rank(), o.first(), {o.modules().begin(), o.modules().end()}});
  t.adapter_sha256 = p.adapter_sha256();
  t.adapter_bytes = p.adapter_bytes();
  t.deadline_unix_ms = p.deadline_unix_ms();
  return t;
}

uint64_t TrainingSeed(const std::string& client, int round) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (char c : client) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h ^ static_cast<uint64_t>(round);
}

}  // namespace fedtune::protocol

#include "protocol/task.h"

#include <cmath>

namespace fedtune::protocol {

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

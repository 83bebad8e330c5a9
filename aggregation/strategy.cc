#include "aggregation/strategy.h"

namespace fedtune::aggregation {

std::map<std::string, double> Strategy::AggregateEvaluate(int, const std::vector<EvalReport>& reports) {
  std::map<std::string, double> sum, weight;
  for (const EvalReport& r : reports) {
    for (const auto& [k, v] : r.metrics) {
      sum[k] += v * static_cast<double>(r.num_examples);
      weight[k] += static_cast<double>(r.num_examples);
    }
  }
  std::map<std::string, double> out;
  for (const auto& [k, v] : sum)
    if (weight[k] > 0) out[k] = v / weight[k];
  return out;
}

absl::Status Aggregation::AddSecureSum(const TensorMap&, double, int, int64_t, const TensorMap*) {
  return absl::FailedPreconditionError("this merge rule needs individual updates; secure aggregation only gives their sum");
}

absl::Status Aggregation::AddSecureFisherSums(const TensorMap&, const TensorMap&, int, int64_t) {
  return absl::FailedPreconditionError("only uncertainty-aware merging takes Fisher-weighted sums");
}

absl::StatusOr<RoundResult> AggregateTrain(Strategy& s, int round, const TensorMap& global, std::vector<ClientUpdate> updates,
                                           std::vector<ClientFailure> failures) {
  std::unique_ptr<Aggregation> agg = s.BeginAggregate(round, global);
  for (ClientUpdate& u : updates) {
    std::string client = u.client;
    if (absl::Status st = agg->Add(std::move(u)); !st.ok()) failures.push_back({client, st});
  }
  FT_ASSIGN_OR_RETURN(Merged m, agg->Merge());
  return s.Commit(round, global, std::move(m), failures);
}

}  // namespace fedtune::aggregation

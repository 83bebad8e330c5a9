// One round of secure aggregation among in-process clients (the simulation's transport):
// keys are agreed before training, each client's masked update is folded into the server's
// running sum as soon as it is ready (no per-client copy is kept), and after the deadline the
// survivors unmask. Tensors are flattened in the layout's (name) order and scaled so that
// value_range maps to the fixed-point clip range.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "aggregation/tensors.h"
#include "privacy/secagg.h"

namespace fedtune::federation {

class SecureRound {
 public:
  static absl::StatusOr<std::unique_ptr<SecureRound>> Begin(const std::vector<std::string>& clients, const aggregation::TensorMap& layout,
                                                            double value_range, int degree, int threshold, uint64_t graph_seed);
  // The client's weighted update (tensors absent from it count as zeros).
  absl::Status Submit(const std::string& client, const aggregation::TensorMap& weighted);
  struct Sum {
    aggregation::TensorMap sum;
    std::vector<std::string> survivors;
    std::vector<std::string> tampered;
    int64_t clamped = 0;  // coordinates beyond value_range (clamped by their clients)
  };
  absl::StatusOr<Sum> Finish();
  int64_t bytes_up_per_client() const { return bytes_ / std::max<int64_t>(1, static_cast<int64_t>(submitted_)); }

 private:
  SecureRound() = default;
  privacy::secagg::Config cfg_;
  aggregation::TensorMap layout_;
  double scale_ = 1;
  std::vector<std::string> names_;
  std::vector<std::unique_ptr<privacy::secagg::Client>> clients_;
  std::unique_ptr<privacy::secagg::Server> server_;
  std::unique_ptr<privacy::NoiseSource> rounding_;
  int64_t bytes_ = 0, clamped_ = 0;
  size_t submitted_ = 0;
};

}  // namespace fedtune::federation

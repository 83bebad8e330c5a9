// The server side of one round of secure aggregation (SecAgg+, privacy/secagg.h), owned by the
// round engine and driven through the transport: it relays keys and encrypted shares between
// the round's clients, folds each masked input into a running sum as it arrives (no per-client
// copy), and after the unmask stage decodes the sum of the survivors' weighted updates. Every
// message is checked against the client that sent it (a client can speak only for its own id).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "aggregation/tensors.h"
#include "privacy/secagg.h"
#include "protocol/task.h"

namespace fedtune::federation {

class SecureServer {
 public:
  // `clients` in id order; `layout` the round's global adapter; `secagg` the round's parameters
  // (id unused). Per-worker shares (secagg.shares): `full_share` is what their ranks are out of
  // (LoRA rank, DiaBlo blocks); by_component: values are weighted by the survivors that trained
  // each component (the nested rule), else by module only (zero_pad: a component moves by its
  // trainers' share of the clients that hold the module).
  static absl::StatusOr<std::unique_ptr<SecureServer>> Begin(const std::vector<std::string>& clients, const aggregation::TensorMap& layout,
                                                             const protocol::TrainTask::Secure& secagg, int full_share = 0,
                                                             bool by_component = true);
  // -1 when `client` is not in this round.
  int IdOf(const std::string& client) const;
  const std::vector<std::string>& clients() const { return names_; }
  size_t vector_length() const { return cfg_.vector_length; }  // values per masked input

  absl::Status Keys(const std::string& client, const privacy::secagg::PublicKeys& k);
  std::vector<privacy::secagg::PublicKeys> KeysFor(const std::string& client) const;
  absl::Status Shares(const std::string& client, const std::vector<privacy::secagg::EncryptedShare>& shares);
  std::vector<privacy::secagg::EncryptedShare> SharesFor(const std::string& client) const;
  // `weight`: what the client multiplied its update by (the sum is divided by the survivors' total).
  absl::Status Masked(const std::string& client, std::vector<uint32_t> y, double weight, int64_t num_examples);
  std::vector<int> Dropped() const { return server_->Dropped(); }
  std::vector<int> Survivors() const { return server_->Survivors(); }
  absl::Status Unmask(const std::string& client, const privacy::secagg::UnmaskReply& r);

  struct Sum {
    aggregation::TensorMap sum;         // sum over survivors of weight x delta (x Fisher weight)
    aggregation::TensorMap fisher_sum;  // uncertainty-aware merging: sum of the Fisher weights
    std::vector<std::string> survivors;
    double total_weight = 0;
    int64_t num_examples = 0;
    std::vector<std::string> tampered;
    // Per-worker shares: per value, the survivors' weight that trained it (empty without shares).
    aggregation::TensorMap value_weight;
  };
  // FailedPrecondition before anything is decoded when a value some survivor trained was trained
  // by fewer survivors than the threshold (protocol::CheckShareCounts; the clients check too).
  absl::StatusOr<Sum> Finish();
  int64_t bytes_up() const { return bytes_; }

 private:
  SecureServer() = default;
  absl::StatusOr<int> Check(const std::string& client, int claimed) const;
  privacy::secagg::Config cfg_;
  protocol::TrainTask::Secure params_;
  aggregation::TensorMap layout_;
  double scale_ = 1;
  int full_share_ = 0;
  bool by_component_ = true;
  std::vector<std::string> names_;
  std::map<std::string, int> ids_;
  std::map<int, std::pair<double, int64_t>> weights_;  // id -> (weight, examples)
  std::unique_ptr<privacy::secagg::Server> server_;
  int64_t bytes_ = 0;
};

}  // namespace fedtune::federation

// The client side of secure aggregation (SecAgg+, privacy/secagg.h) for one round, shared by the
// worker daemon and the simulation's virtual clients: keys before training, then the update is
// weighted (num_examples / the task's weight divisor; under distributed DP weight 1, clipped to
// dp_clip_norm and noised with the client's share N(0, dp_noise_stddev^2)), scaled so that
// +-value_range fills the fixed-point range, and masked; the server only ever sees the sum.
#pragma once

#include <memory>
#include <vector>

#include "aggregation/tensors.h"
#include "privacy/noise.h"
#include "privacy/secagg.h"
#include "protocol/task.h"

namespace fedtune::worker {

class SecureClient {
 public:
  // `layout`: the round's global adapter (names and sizes; values in name order).
  static absl::StatusOr<std::unique_ptr<SecureClient>> Create(const protocol::TrainTask& task, const aggregation::TensorMap& layout);
  privacy::secagg::PublicKeys Advertise() const { return client_->Advertise(); }
  absl::StatusOr<std::vector<privacy::secagg::EncryptedShare>> ShareKeys(const std::vector<privacy::secagg::PublicKeys>& neighbours) {
    return client_->ShareKeys(neighbours);
  }
  absl::StatusOr<std::vector<uint32_t>> Mask(const aggregation::ClientUpdate& u, const std::vector<privacy::secagg::EncryptedShare>& received);
  // Refuses (FailedPrecondition) where any value would be unmasked in a sum of fewer survivors
  // that trained it than the threshold (per-worker shares, protocol::CheckShareCounts).
  absl::StatusOr<privacy::secagg::UnmaskReply> Unmask(const std::vector<int>& dropped, const std::vector<int>& survivors);
  int id() const { return client_->id(); }
  int64_t clamped() const { return clamped_; }  // values beyond +-value_range (clamped)

 private:
  SecureClient() = default;
  float Scaled(double x);  // into the fixed-point range; counts values beyond it
  protocol::TrainTask task_;
  aggregation::TensorMap layout_;
  double scale_ = 1, clip_ = 8;
  int threshold_ = 1;  // survivors needed to unmask (privacy::secagg::EffectiveThreshold)
  std::unique_ptr<privacy::secagg::Client> client_;
  std::unique_ptr<privacy::NoiseSource> rounding_, noise_;
  int64_t clamped_ = 0;
};

}  // namespace fedtune::worker

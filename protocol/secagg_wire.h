// Secure aggregation on the wire: the SecAgg+ configuration a secure task implies, and the
// stages' messages (privacy::secagg types) to and from protobuf. Everything arriving from a peer
// is size-checked here; the cryptographic checks are privacy/secagg's.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "privacy/secagg.h"
#include "proto/service.pb.h"
#include "protocol/task.h"

namespace fedtune::protocol {

// The SecAgg+ configuration of a round: n clients, the degree (0: about 2 log2 n, made even as
// the Harary graph needs), threshold, graph seed; vector_length = values in the adapter.
absl::StatusOr<privacy::secagg::Config> SecAggConfig(const TrainTask::Secure& s, size_t vector_length);
// Adapter value -> fixed-point input: values within +-value_range are encoded exactly.
double SecAggScale(const privacy::secagg::Config& c, double value_range);
// Values a client masks for an adapter of `adapter_values`: twice as many with Fisher weights.
size_t SecAggVectorLength(const TrainTask::Secure& s, size_t adapter_values);
// Fisher weights a = (min(F, clip) + lambda) / clip lie in (0, vmax], vmax = 1 + lambda / clip; they
// travel scaled by value_range / vmax so that they share the deltas' fixed-point range.
double SecAggFisherMax(const TrainTask::Secure& s);

rpc::v1::SecAggKeys ToProto(const privacy::secagg::PublicKeys& k);
absl::StatusOr<privacy::secagg::PublicKeys> FromProto(const rpc::v1::SecAggKeys& k);
rpc::v1::SecAggShare ToProto(const privacy::secagg::EncryptedShare& s);
privacy::secagg::EncryptedShare FromProto(const rpc::v1::SecAggShare& s);
rpc::v1::SecAggUnmask ToProto(const privacy::secagg::UnmaskReply& r);
absl::StatusOr<privacy::secagg::UnmaskReply> FromProto(const rpc::v1::SecAggUnmask& r);

// A masked input as upload payload: little-endian uint32 words.
std::vector<uint8_t> EncodeMasked(std::span<const uint32_t> y);
absl::StatusOr<std::vector<uint32_t>> DecodeMasked(std::span<const uint8_t> bytes, size_t expected_words);

}  // namespace fedtune::protocol

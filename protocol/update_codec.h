// The wire format of a client update (what a worker uploads, chunked): a safetensors payload
// with F32 tensors "delta.<name>" and optionally "fisher.<name>", and metadata
// fedtune.update = 1, client, num_examples and metric.<key>. The decoder is the coordinator's
// first line of defence against hostile input: every failure is a precise status, nothing it
// accepts can poison the aggregate (sizes, names and finiteness are checked against the
// global adapter), and it is fuzzed (fuzz/update_fuzzer.cc).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "aggregation/tensors.h"

namespace fedtune::protocol {

absl::StatusOr<std::vector<uint8_t>> EncodeUpdate(const aggregation::ClientUpdate& u);

// ResourceExhausted when bytes.size() > max_bytes; DataLoss for garbage or truncation;
// InvalidArgument for a well-formed payload with wrong names, shapes, types, counts or
// non-finite values. `expected_client`, when not empty, must match the payload's.
absl::StatusOr<aggregation::ClientUpdate> DecodeUpdate(std::span<const uint8_t> bytes, const aggregation::TensorMap& global,
                                                       size_t max_bytes, const std::string& expected_client = "");

// A global adapter on the wire / on disk: F32 tensors by name, metadata fedtune.round.
absl::StatusOr<std::vector<uint8_t>> EncodeTensors(const aggregation::TensorMap& t, int round);
absl::StatusOr<aggregation::TensorMap> DecodeTensors(std::span<const uint8_t> bytes, int* round = nullptr);
// Lower-case hex SHA-256.
std::string Sha256Hex(std::span<const uint8_t> bytes);

}  // namespace fedtune::protocol

// The one translation between the model's AdapterSet and the plain tensors that rounds move
// (aggregation::TensorMap): names from AdapterSet::ForEachTrainable.
#pragma once

#include <cstdint>

#include "aggregation/tensors.h"
#include "model/adapter.h"

namespace fedtune::protocol {

// Copies of the trainable tensors.
aggregation::TensorMap AdapterTensors(model::AdapterSet<float>& adapters);
// Writes `t` into the adapters; every tensor must exist with the same size (InvalidArgument
// naming it otherwise). Tensors absent from `t` are left as they are.
absl::Status SetAdapterTensors(const aggregation::TensorMap& t, model::AdapterSet<float>* adapters);
// Bytes on the wire for tensors (float32 payload).
int64_t TensorBytes(const aggregation::TensorMap& t);
// Bytes of an update's tensors on the wire: compressed deltas as their codes and scales (or
// top-k indices and values), the others and the Fisher as float32.
int64_t UpdateBytes(const aggregation::ClientUpdate& u);

}  // namespace fedtune::protocol

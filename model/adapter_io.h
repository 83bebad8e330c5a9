// Saving and loading fedtune adapters (checkpoints, worker updates) as safetensors: tensors
// named as AdapterSet::ForEachTrainable names them (plus frozen FFA-LoRA A as ".lora_a"),
// the adapter spec and module list in the metadata.
#pragma once

#include <string>

#include "model/adapter.h"

namespace fedtune::model {

absl::Status SaveAdapters(const std::string& path, AdapterSet<float>& adapters);
// NotFound / DataLoss for bad files; InvalidArgument when shapes do not fit the model dims.
absl::StatusOr<AdapterSet<float>> LoadAdapters(const std::string& path, const ModelDims& dims);

}  // namespace fedtune::model

// Exports for serving: Hugging Face PEFT (LoRA, FFA-LoRA), llama.cpp GGUF-LoRA (all types;
// DiaBlo as an exact LoRA of rank min(in, out) whose other factor is a scaled identity), and a merged model
// GGUF; import of a PEFT LoRA adapter. See FORMATS.md.
//
// Orientation trap: fedtune trains on GGUF weights, whose Q/K rows llama.cpp's converter
// permuted (GGUF row 2i+t of a head = HF row t*hd/2+i). GGUF-LoRA keeps fedtune's order; PEFT
// un-permutes the rows of B for q and k (A is untouched), and import permutes them back.
#pragma once

#include <string>

#include "model/adapter.h"
#include "model/llama.h"

namespace fedtune::model {

// Dense update of one adapted module, [out, in] row-major (what merging adds to W).
std::vector<float> DenseDelta(const ModuleAdapter<float>& a);

absl::Status ExportPeft(const std::string& dir, const LlamaModel& model, const AdapterSet<float>& adapters,
                        const std::string& base_model_name);
absl::StatusOr<AdapterSet<float>> ImportPeft(const std::string& dir, const LlamaModel& model);

absl::Status ExportGgufLora(const std::string& path, const LlamaModel& model, const AdapterSet<float>& adapters);

// The base GGUF with every adapted weight replaced by W + delta stored as `merged_type`
// (F16 by default: re-quantizing to the base's 4-bit type would drown small updates).
absl::Status ExportMergedGguf(const std::string& path, const LlamaModel& model, const AdapterSet<float>& adapters,
                              kernels::GgmlType merged_type = kernels::GgmlType::kF16);

}  // namespace fedtune::model

// Exports for serving: Hugging Face PEFT (LoRA, FFA-LoRA), llama.cpp GGUF-LoRA (all types;
// DiaBlo as an exact LoRA of rank min(in, out) whose other factor is a scaled identity), and a merged model
// GGUF; import of a PEFT LoRA adapter. See FORMATS.md.
//
// Orientation trap: fedtune keeps Q/K rows in adjacent-pair order (row 2i+t of a head = HF row
// t*hd/2+i, RotateHalfRow). PEFT always gets rotate_half rows of B for q and k (A is untouched;
// import permutes them back); GGUF-LoRA and merged GGUF get the order of llama.cpp's GGUF for the
// architecture (llama: adjacent pairs; qwen2/qwen3/gemma3/phi3: rotate_half). Phi-3's fused
// projections are exported as the fused tensors PEFT and llama.cpp address.
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
// (F16 by default: re-quantizing to the base's 4-bit type would drown small updates). A
// projection the model holds re-quantized (LlamaModel::Requantize / RequantizeCompensated) is
// written from the model's copy, Q + C + delta: the exported model is the one that trained.
absl::Status ExportMergedGguf(const std::string& path, const LlamaModel& model, const AdapterSet<float>& adapters,
                              kernels::GgmlType merged_type = kernels::GgmlType::kF16);

}  // namespace fedtune::model

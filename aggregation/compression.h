// Compressed client updates (issue 21): 8-bit and 4-bit blockwise quantized deltas and top-k
// sparsification, with error feedback on the client (EF-SGD, Karimireddy et al. 2019: what a
// round's compression drops is added to the next round's delta, so nothing is lost for good).
//
//   int8  per block of 64 values: scale = max|x| / 127, code = round(x / scale) in [-127, 127];
//         1 + 4/64 bytes per value (3.76x smaller than fp32)
//   int4  the same with 7 levels each side, two codes per byte: 0.5 + 4/64 bytes (7.1x)
//   topk  the ceil(fraction * n) largest |x| of each tensor as (uint32 index, fp32 value):
//         8 bytes per kept value (fraction 0.05: 10x)
//
// Deterministic rounding to nearest (ties away from zero). The codes travel in the update's
// safetensors payload (protocol/update_codec.h); the coordinator decompresses and validates them
// before aggregation, so every merge rule works unchanged.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "aggregation/tensors.h"
#include "common/status.h"

namespace fedtune::aggregation {

// "none", "int8", "int4", "topk".
const char* CompressionName(Compression c);
absl::StatusOr<Compression> CompressionFromName(const std::string& name);

// top-k: fraction in (0, 1]; ignored otherwise.
CompressedTensor Compress(std::span<const float> x, Compression kind, double topk_fraction);
std::vector<float> Decompress(const CompressedTensor& c);
// Bytes of the codes, scales, indices and values (what the payload carries besides its header).
size_t PayloadBytes(const CompressedTensor& c);
// PayloadBytes per fp32 byte of a large tensor (the planner's upload time): none 1, int8
// (1 + 4/64) / 4, int4 (0.5 + 4/64) / 4, topk 2 x fraction (8 bytes per kept value).
double CompressedBytesPerFp32Byte(Compression kind, double topk_fraction);
// Structural check of a received tensor against the dense size n: counts, code ranges, index
// order and range, finite non-negative scales, finite values. InvalidArgument naming the problem.
absl::Status CheckCompressed(const CompressedTensor& c, size_t n);

// The client side: every delta tensor of `u` plus its residual is compressed into u->compressed,
// u->delta becomes the decompressed values, and the residual keeps what was dropped (nullptr:
// no error feedback). The Fisher (uncertainty-aware merging) is sent as it is.
void CompressUpdate(ClientUpdate* u, Compression kind, double topk_fraction, TensorMap* residual);

}  // namespace fedtune::aggregation

// ggml block formats: type ids, sizes, dequantization (reference, bit-exact with the `gguf`
// Python package's numpy code) and quantization for the formats fedtune writes.
// Layouts: ggml src/ggml-common.h; see FORMATS.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "common/status.h"

namespace fedtune::kernels {

enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kQ8_K = 15, kBF16 = 30,
  // fedtune-private (never written to GGUF): QLoRA's NF4, blocks of 64 values with an fp32
  // absmax, two 4-bit codes per byte, high nibble first (bitsandbytes layout).
  kNF4 = 0x1000,
  // NF4 with QLoRA's double quantization: the per-block absmax constants are themselves
  // quantized to 8 bits. Ours is per row: [fp32 scale][fp32 mean][one int8 absmax code per
  // 64-value block][the blocks' 4-bit codes], absmax = mean + code * scale (QLoRA groups 256
  // constants of the flattened tensor instead; per row keeps rows independent for tiled
  // dequantization). 8 + 33 n/64 bytes per row of n: 4.24 bits per weight at n = 576 vs 4.5.
  kNF4DQ = 0x1001,
  // fedtune-private 3- and 2-bit normal-float formats (QLoRA's construction with 8 and 4 codes,
  // as the NFQuantizer of PEFT <= 0.19's LoftQ built them): blocks of 64 values with an fp32 absmax, then the
  // codes, lowest bits first (NF3: eight codes per 3 bytes; NF2: four per byte). 3.5 and 2.5
  // bits per weight. They serve rows K-quants cannot (length not a multiple of 256).
  kNF3 = 0x1002,
  kNF2 = 0x1003,
};

// The 16 NF4 code values (QLoRA, Dettmers et al. 2023; ALGORITHMS.md test vector).
extern const float kNf4Codes[16];
extern const float kNf3Codes[8];
extern const float kNf2Codes[4];

struct GgmlTypeTraits {
  const char* name;
  int64_t block_size;  // values per block
  size_t type_size;    // bytes per block
  bool supported;      // fedtune can dequantize it
};

// nullopt for an id that is not a known ggml type.
std::optional<GgmlTypeTraits> GetTypeTraits(uint32_t type_id);
GgmlTypeTraits TypeTraits(GgmlType t);  // FT_CHECKs that t is known
std::optional<GgmlType> GgmlTypeFromName(std::string_view name);  // "q4_1", "F16", ...

// Bytes used by a row of n values; InvalidArgument if n is not a multiple of the block size.
absl::StatusOr<size_t> RowBytes(GgmlType t, int64_t n);

// The type a row of n values is stored in when t is asked for: t itself, except that K-quants
// (256-value super-blocks) fall back to the block-64 normal-float format of about the same width
// on rows that are not a multiple of 256 (Q2_K -> NF2, Q3_K -> NF3, Q4_K/Q5_K -> NF4, Q6_K ->
// Q8_0). llama.cpp falls back to Q4_0/Q5_0/Q8_0 instead, which would make a "2-bit" base mostly
// 4-bit on models like SmolLM2 (576-wide rows).
GgmlType RowCompatibleType(GgmlType t, int64_t n);

// Whether QuantizeRow can write t (re-quantization targets).
bool CanQuantize(GgmlType t);

// Dequantizes n values (n a multiple of the block size; FT_CHECKed) from src into dst.
void DequantizeRow(GgmlType t, const void* src, float* dst, int64_t n);

// Quantizes n values into dst (RowBytes(t, n) bytes). Supported: F32, F16, BF16, Q8_0, Q4_0,
// Q4_1, Q5_0, Q5_1 (ggml reference rounding), NF4/NF4_DQ/NF3/NF2 (nearest code), Q2_K and
// Q3_K (fedtune's own search, not ggml's: see quant.cc). Unimplemented otherwise.
absl::Status QuantizeRow(GgmlType t, const float* src, void* dst, int64_t n);

// GPTQ-style rounding (model/compensation.cc) of the normal-float block types, whose blocks are
// a scale and nearest codes: the scale QuantizeRow stores for one 64-value block x, the value a
// block with that scale stores for v (exactly what QuantizeRow + DequantizeRow give), and a row
// quantized with given block scales (n / 64 of them). NF4_DQ is not one of them (its block
// scales are themselves quantized per row).
bool IsNormalFloat(GgmlType t);  // NF4, NF3, NF2
float NfBlockScale(GgmlType t, const float* x);
float NfRound(GgmlType t, float v, float scale);
absl::Status QuantizeNfRowWithScales(GgmlType t, const float* src, const float* scales, void* dst, int64_t n);

}  // namespace fedtune::kernels

// Adapter tensors as the server sees them: named flat float vectors (names follow
// model::AdapterSet::ForEachTrainable, e.g. "blk.3.attn_q.lora_b"). Nothing here knows about
// models, protobuf or transport.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "common/status.h"

namespace fedtune::aggregation {

using TensorMap = std::map<std::string, std::vector<float>>;

// Upload compression of a delta tensor (aggregation/compression.h): blockwise symmetric 8- or
// 4-bit codes with one fp32 scale per block, or the top-k coordinates by magnitude.
enum class Compression { kNone, kInt8, kInt4, kTopK };
struct CompressedTensor {
  Compression kind = Compression::kNone;
  size_t n = 0;                  // values in the dense tensor
  std::vector<float> scales;     // int8/int4: one per block of kCompressionBlock values
  std::vector<int8_t> q8;        // int8: n codes in [-127, 127]
  std::vector<uint8_t> q4;       // int4: ceil(n / 2) bytes, two codes (+8 offset, 1..15) each, low nibble first
  std::vector<uint32_t> indices; // top-k: strictly increasing
  std::vector<float> values;     // top-k: the kept values
};
inline constexpr size_t kCompressionBlock = 64;

// One client's contribution to a round. `delta` = theta_k - theta_global for the tensors the
// client trained (a subset of the global tensors: partially shared adapters are fine).
struct ClientUpdate {
  std::string client;
  int64_t num_examples = 0;
  TensorMap delta;
  TensorMap fisher;  // optional diagonal Fisher per tensor (same names and sizes as delta)
  std::map<std::string, double> metrics;
  // When compressed: the wire form of every delta tensor (delta then holds exactly what the
  // server decodes from it, so in-process aggregation sees what a coordinator would).
  std::map<std::string, CompressedTensor> compressed = {};
  // Per-worker ranks (aggregation/hetero_rank.h, nested rule): per delta tensor, 1 where the
  // client trained a value and 0 where its update was padded; a linear merge then averages each
  // value over the clients that trained it. Empty: every value trained.
  TensorMap coverage = {};
};

struct ClientFailure {
  std::string client;
  absl::Status status;
};

// L2 norm over all tensors (double accumulation).
double L2Norm(const TensorMap& t);
// x *= s.
void Scale(TensorMap& t, float s);
// Checks an update against the global tensors: every name known, sizes equal, all values
// finite, Fisher non-negative, num_examples > 0. InvalidArgument naming client and tensor.
absl::Status ValidateUpdate(const ClientUpdate& u, const TensorMap& global);
// No adapter update moves a value by more than this in one round (they move by ~learning rate x
// steps); larger values are refused as hostile or broken, before any sum could overflow.
inline constexpr float kMaxUpdateValue = 1e4f;
// Scales `t` to L2 norm <= bound (bound > 0). Returns the norm before clipping.
double ClipToNorm(TensorMap& t, double bound);

}  // namespace fedtune::aggregation

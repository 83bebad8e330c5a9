// libFuzzer target for the coordinator's update decoder (protocol/update_codec.h).
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "protocol/update_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const fedtune::aggregation::TensorMap global = {{"blk.0.attn_q.lora_b", std::vector<float>(96, 0.0f)},
                                                         {"blk.1.ffn_up.diablo", std::vector<float>(40, 0.0f)}};
  auto u = fedtune::protocol::DecodeUpdate({data, size}, global, 1 << 20);
  if (u.ok()) {
    for (const auto& [name, v] : u->delta)
      for (float x : v)
        if (!std::isfinite(x)) std::abort();  // the decoder must never pass a non-finite value
  }
  return 0;
}

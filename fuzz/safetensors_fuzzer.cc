// libFuzzer target: safetensors parsing and conversion of every tensor to f32.
#include <cstddef>
#include <cstdint>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fedtune;
  auto f = model::SafetensorsFile::Parse(MappedFile::FromBytes({data, size}, "fuzz.safetensors"));
  if (!f.ok()) return 0;
  for (const auto& t : (*f)->tensors()) {
    if (t.nbytes < (1u << 20)) (void)(*f)->ToF32(t.name);
  }
  return 0;
}

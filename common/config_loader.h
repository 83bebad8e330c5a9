// Strict YAML config loading into a protobuf message (the schema). Any unknown key, wrong
// type, out-of-range number, unknown enum name or missing required field is an
// InvalidArgument error whose message names the key path, e.g. "model.context_length".
#pragma once

#include <string>

#include "common/status.h"
#include "google/protobuf/message.h"

namespace fedtune {

// proto3 cannot tell an unset scalar from zero: configs treat zero as "use the default".
template <typename T>
T OrDefault(T value, T fallback) {
  return value == T{} ? fallback : value;
}

absl::Status LoadConfigYaml(const std::string& yaml_text, google::protobuf::Message* out,
                            const std::string& source_name = "<string>");
absl::Status LoadConfigFile(const std::string& path, google::protobuf::Message* out);

}  // namespace fedtune

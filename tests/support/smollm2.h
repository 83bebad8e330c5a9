// Shared access to the real model for the "model" tests: loaded once per process from
// $FEDTUNE_MODEL or models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/setup.sh installs it).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "model/llama.h"
#include "nlohmann/json.hpp"

namespace fedtune::testing {

inline std::string SmolLM2Path() {
  const char* env = std::getenv("FEDTUNE_MODEL");
  return env ? env : std::string(FEDTUNE_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

inline const model::LlamaModel& SmolLM2() {
  static std::unique_ptr<model::LlamaModel> m = [] {
    auto r = model::LlamaModel::Load(SmolLM2Path());
    if (!r.ok()) {
      std::fprintf(stderr, "cannot load the real model (run scripts/setup.sh): %s\n", std::string(r.status().message()).c_str());
      std::abort();
    }
    return std::move(r).value();
  }();
  return *m;
}

inline nlohmann::json ReadJson(const std::string& rel) {
  std::ifstream in(std::string(FEDTUNE_SOURCE_DIR) + "/" + rel);
  return nlohmann::json::parse(in);
}

}  // namespace fedtune::testing

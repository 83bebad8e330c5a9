#include "protocol/adapter_tensors.h"

#include <algorithm>

#include "aggregation/compression.h"

#include "absl/strings/str_cat.h"

namespace fedtune::protocol {

aggregation::TensorMap AdapterTensors(model::AdapterSet<float>& adapters) {
  aggregation::TensorMap t;
  adapters.ForEachTrainable([&](const std::string& name, std::span<float> p, std::span<float>) { t[name].assign(p.begin(), p.end()); });
  return t;
}

absl::Status SetAdapterTensors(const aggregation::TensorMap& t, model::AdapterSet<float>* adapters) {
  size_t found = 0;
  absl::Status st;
  adapters->ForEachTrainable([&](const std::string& name, std::span<float> p, std::span<float>) {
    auto it = t.find(name);
    if (it == t.end() || !st.ok()) return;
    if (it->second.size() != p.size()) {
      st = absl::InvalidArgumentError(absl::StrCat("adapter tensor ", name, " has ", it->second.size(), " values, expected ", p.size()));
      return;
    }
    std::copy(it->second.begin(), it->second.end(), p.begin());
    ++found;
  });
  FT_RETURN_IF_ERROR(st);
  if (found != t.size()) return absl::InvalidArgumentError(absl::StrCat(t.size() - found, " adapter tensors do not exist in this adapter layout"));
  return absl::OkStatus();
}

int64_t TensorBytes(const aggregation::TensorMap& t) {
  int64_t b = 0;
  for (const auto& [name, v] : t) b += static_cast<int64_t>(v.size() * sizeof(float));
  return b;
}

int64_t UpdateBytes(const aggregation::ClientUpdate& u) {
  int64_t b = TensorBytes(u.fisher);
  for (const auto& [name, v] : u.delta) {
    auto c = u.compressed.find(name);
    b += c == u.compressed.end() ? static_cast<int64_t>(v.size() * sizeof(float)) : static_cast<int64_t>(aggregation::PayloadBytes(c->second));
  }
  return b;
}

}  // namespace fedtune::protocol

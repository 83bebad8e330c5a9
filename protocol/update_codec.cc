#include "protocol/update_codec.h"

#include <openssl/sha.h>

#include <cstring>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "aggregation/compression.h"
#include "common/mapped_file.h"
#include "model/safetensors.h"

namespace fedtune::protocol {

absl::StatusOr<std::vector<uint8_t>> EncodeUpdate(const aggregation::ClientUpdate& u) {
  model::SafetensorsWriter w;
  auto bytes_of = [](const auto& v) {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(v[0]));
  };
  auto n = [](const auto& v) { return std::vector<int64_t>{static_cast<int64_t>(v.size())}; };
  for (const auto& [name, v] : u.delta) {
    auto c = u.compressed.find(name);
    if (c == u.compressed.end() || c->second.kind == aggregation::Compression::kNone) {
      FT_RETURN_IF_ERROR(w.AddF32("delta." + name, n(v), v));
      continue;
    }
    const aggregation::CompressedTensor& t = c->second;
    w.SetMetadata("fedtune.compression", aggregation::CompressionName(t.kind));
    if (t.kind == aggregation::Compression::kTopK) {
      FT_RETURN_IF_ERROR(w.Add("topk_idx." + name, DType::kI32, n(t.indices), bytes_of(t.indices)));
      FT_RETURN_IF_ERROR(w.AddF32("topk_val." + name, n(t.values), t.values));
    } else {
      FT_RETURN_IF_ERROR(w.AddF32("scale." + name, n(t.scales), t.scales));
      if (t.kind == aggregation::Compression::kInt8) FT_RETURN_IF_ERROR(w.Add("q8." + name, DType::kI8, n(t.q8), bytes_of(t.q8)));
      if (t.kind == aggregation::Compression::kInt4) FT_RETURN_IF_ERROR(w.Add("q4." + name, DType::kU8, n(t.q4), bytes_of(t.q4)));
    }
  }
  for (const auto& [name, v] : u.fisher) FT_RETURN_IF_ERROR(w.AddF32("fisher." + name, {static_cast<int64_t>(v.size())}, v));
  w.SetMetadata("fedtune.update", "1");
  w.SetMetadata("client", u.client);
  w.SetMetadata("num_examples", std::to_string(u.num_examples));
  for (const auto& [k, v] : u.metrics) w.SetMetadata("metric." + k, absl::StrCat(v));
  return w.Serialize();
}

absl::StatusOr<aggregation::ClientUpdate> DecodeUpdate(std::span<const uint8_t> bytes, const aggregation::TensorMap& global, size_t max_bytes,
                                                       const std::string& expected_client) {
  if (bytes.size() > max_bytes)
    return absl::ResourceExhaustedError(absl::StrCat("update of ", bytes.size(), " bytes exceeds the limit of ", max_bytes));
  // The JSON header is parsed into a DOM: cap it by what this adapter's update can need (names
  // of deltas and Fisher, a few metrics), so a peer cannot make us spend gigabytes on a header.
  if (bytes.size() >= 8) {
    uint64_t header = 0;
    for (int i = 0; i < 8; ++i) header |= static_cast<uint64_t>(bytes[static_cast<size_t>(i)]) << (8 * i);
    const uint64_t cap = 16384 + 512 * 3 * static_cast<uint64_t>(global.size());  // compressed: two entries per delta
    if (header > cap && header <= bytes.size() - 8)  // (longer than the payload: truncated, DataLoss below)
      return absl::ResourceExhaustedError(absl::StrCat("update header of ", header, " bytes exceeds the limit of ", cap));
  }
  FT_ASSIGN_OR_RETURN(auto file, model::SafetensorsFile::Parse(MappedFile::FromBytes(bytes, "update")));
  const auto& md = file->metadata();
  if (md.size() > 64) return absl::InvalidArgumentError(absl::StrCat("update: ", md.size(), " metadata entries (at most 64)"));
  auto get = [&](const char* k) -> const std::string* {
    auto it = md.find(k);
    return it == md.end() ? nullptr : &it->second;
  };
  if (const std::string* v = get("fedtune.update"); v == nullptr || *v != "1")
    return absl::InvalidArgumentError("update: missing or unsupported fedtune.update version");
  aggregation::ClientUpdate u;
  if (const std::string* c = get("client")) u.client = *c;
  if (u.client.empty()) return absl::InvalidArgumentError("update: no client name");
  if (!expected_client.empty() && u.client != expected_client)
    return absl::PermissionDeniedError(absl::StrCat("update: sent by '", expected_client, "' but claims to be from '", u.client, "'"));
  const std::string* n = get("num_examples");
  if (n == nullptr || !absl::SimpleAtoi(*n, &u.num_examples) || u.num_examples <= 0 || u.num_examples > (int64_t{1} << 40))
    return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': bad num_examples"));
  for (const auto& [k, v] : md) {
    if (k.rfind("metric.", 0) != 0) continue;
    double x = 0;
    if (absl::SimpleAtod(v, &x)) u.metrics[k.substr(7)] = x;
  }
  // Compressed deltas: the kind in the metadata, each tensor's parts by prefix.
  aggregation::Compression kind = aggregation::Compression::kNone;
  if (const std::string* c = get("fedtune.compression")) {
    auto k = aggregation::CompressionFromName(*c);
    if (!k.ok() || *k == aggregation::Compression::kNone)
      return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': unknown compression '", *c, "'"));
    kind = *k;
  }
  std::map<std::string, aggregation::CompressedTensor> parts;
  struct Part {
    const char* prefix;
    DType dtype;
    aggregation::Compression kind;
  };
  static const Part kParts[] = {{"scale.", DType::kF32, aggregation::Compression::kInt8}, {"q8.", DType::kI8, aggregation::Compression::kInt8},
                                {"q4.", DType::kU8, aggregation::Compression::kInt4},     {"topk_idx.", DType::kI32, aggregation::Compression::kTopK},
                                {"topk_val.", DType::kF32, aggregation::Compression::kTopK}};
  for (const model::SafeTensor& t : file->tensors()) {
    const Part* part = nullptr;
    for (const Part& p : kParts)
      if (t.name.rfind(p.prefix, 0) == 0) part = &p;
    if (part != nullptr) {
      const std::string name = t.name.substr(std::strlen(part->prefix));
      const bool scale = std::strcmp(part->prefix, "scale.") == 0;
      if (kind == aggregation::Compression::kNone || t.dtype != part->dtype || t.shape.size() != 1 ||
          (scale ? kind == aggregation::Compression::kTopK : part->kind != kind))
        return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': tensor ", t.name, " does not belong to a ",
                                                       aggregation::CompressionName(kind), " update"));
      auto g = global.find(name);
      if (g == global.end()) return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': unknown tensor ", name));
      aggregation::CompressedTensor& c = parts[name];
      c.kind = kind;
      c.n = g->second.size();
      const size_t count = static_cast<size_t>(t.shape[0]);
      if (t.nbytes != count * DTypeSize(t.dtype))  // counts against the dense size: CheckCompressed below
        return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': tensor ", t.name, " has the wrong size"));
      auto fill = [&](auto& v) {
        v.resize(count);
        std::memcpy(v.data(), t.data, t.nbytes);
      };
      if (scale) fill(c.scales);
      else if (part->dtype == DType::kI8) fill(c.q8);
      else if (part->dtype == DType::kU8) fill(c.q4);
      else if (part->dtype == DType::kI32) fill(c.indices);
      else fill(c.values);
      continue;
    }
    if (t.dtype != DType::kF32 || t.shape.size() != 1)
      return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': tensor ", t.name, " must be 1-D F32"));
    aggregation::TensorMap* dst = nullptr;
    std::string name;
    if (t.name.rfind("delta.", 0) == 0) {
      dst = &u.delta;
      name = t.name.substr(6);
    } else if (t.name.rfind("fisher.", 0) == 0) {
      dst = &u.fisher;
      name = t.name.substr(7);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': unexpected tensor ", t.name));
    }
    auto g = global.find(name);
    if (g == global.end()) return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': unknown tensor ", name));
    if (static_cast<size_t>(t.shape[0]) != g->second.size() || t.nbytes != g->second.size() * sizeof(float))
      return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': tensor ", name, " has the wrong size"));
    std::vector<float> v(g->second.size());
    std::memcpy(v.data(), t.data, t.nbytes);
    (*dst)[name] = std::move(v);
  }
  for (auto& [name, c] : parts) {
    if (u.delta.count(name)) return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': tensor ", name, " sent twice"));
    if (absl::Status st = aggregation::CheckCompressed(c, c.n); !st.ok())
      return absl::InvalidArgumentError(absl::StrCat("update from '", u.client, "': tensor ", name, ": ", st.message()));
    u.delta[name] = aggregation::Decompress(c);
  }
  u.compressed = std::move(parts);  // kept for the byte count (protocol::UpdateBytes)
  FT_RETURN_IF_ERROR(aggregation::ValidateUpdate(u, global));  // finiteness, Fisher >= 0, non-empty
  return u;
}

absl::StatusOr<std::vector<uint8_t>> EncodeTensors(const aggregation::TensorMap& t, int round) {
  model::SafetensorsWriter w;
  for (const auto& [name, v] : t) FT_RETURN_IF_ERROR(w.AddF32(name, {static_cast<int64_t>(v.size())}, v));
  w.SetMetadata("fedtune.round", std::to_string(round));
  return w.Serialize();
}

absl::StatusOr<aggregation::TensorMap> DecodeTensors(std::span<const uint8_t> bytes, int* round) {
  FT_ASSIGN_OR_RETURN(auto file, model::SafetensorsFile::Parse(MappedFile::FromBytes(bytes, "adapter")));
  aggregation::TensorMap t;
  for (const model::SafeTensor& st : file->tensors()) {
    FT_ASSIGN_OR_RETURN(Tensor x, file->ToF32(st.name));
    t[st.name].assign(x.data<float>(), x.data<float>() + x.size());
  }
  if (round) {
    auto it = file->metadata().find("fedtune.round");
    if (it == file->metadata().end() || !absl::SimpleAtoi(it->second, round)) return absl::DataLossError("adapter: no fedtune.round");
  }
  return t;
}

std::string Sha256Hex(std::span<const uint8_t> bytes) {
  uint8_t d[SHA256_DIGEST_LENGTH];
  SHA256(bytes.data(), bytes.size(), d);
  std::string h;
  for (uint8_t b : d) absl::StrAppend(&h, absl::Hex(b, absl::kZeroPad2));
  return h;
}

}  // namespace fedtune::protocol

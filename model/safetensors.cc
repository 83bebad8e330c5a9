#include "model/safetensors.h"

#include <cstring>
#include <limits>

#include "common/fp16.h"
#include "nlohmann/json.hpp"

namespace fedtune::model {
namespace {

constexpr uint64_t kMaxHeader = 100ull << 20;  // the reference implementation's limit

std::optional<DType> ParseDType(const std::string& s) {
  if (s == "F32") return DType::kF32;
  if (s == "F16") return DType::kF16;
  if (s == "BF16") return DType::kBF16;
  if (s == "F64") return DType::kF64;
  if (s == "I8") return DType::kI8;
  if (s == "U8") return DType::kU8;
  if (s == "I16") return DType::kI16;
  if (s == "I32") return DType::kI32;
  if (s == "I64") return DType::kI64;
  return std::nullopt;
}

const char* DTypeTag(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kF64: return "F64";
    case DType::kI8: return "I8";
    case DType::kU8: return "U8";
    case DType::kI16: return "I16";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
  }
  return "?";
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  FT_ASSIGN_OR_RETURN(auto f, MappedFile::Open(path));
  auto parsed = Parse(std::move(f));
  if (!parsed.ok()) return absl::Status(parsed.status().code(), absl::StrCat(path, ": ", parsed.status().message()));
  return parsed;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(std::unique_ptr<MappedFile> file) {
  std::unique_ptr<SafetensorsFile> s(new SafetensorsFile());
  s->file_ = std::move(file);
  const auto bytes = s->file_->bytes();
  if (bytes.size() < 8) return absl::DataLossError("safetensors: file shorter than its 8-byte header length");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  if (n > kMaxHeader || n > bytes.size() - 8) {
    return absl::DataLossError(absl::StrCat("safetensors: header length ", n, " exceeds the file (", bytes.size(), " bytes) or the 100 MiB limit"));
  }
  const std::string_view header(reinterpret_cast<const char*>(bytes.data() + 8), n);
  const nlohmann::json j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::DataLossError("safetensors: header is not valid JSON");
  if (!j.is_object()) return absl::DataLossError("safetensors: header is not a JSON object");
  const uint8_t* base = bytes.data() + 8 + n;
  const size_t data_size = bytes.size() - 8 - n;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const auto& item : j.items()) {
    const std::string name = item.key();  // not a structured binding: lambdas below capture it
    const auto& v = item.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return absl::DataLossError("safetensors: __metadata__ is not an object");
      for (const auto& [k, mv] : v.items()) {
        if (!mv.is_string()) return absl::DataLossError(absl::StrCat("safetensors: metadata '", k, "' is not a string"));
        s->metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& what) { return absl::DataLossError(absl::StrCat("safetensors: tensor '", name, "': ", what)); };
    if (!v.is_object()) return bad("entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) return bad("missing dtype");
    if (!v.contains("shape") || !v["shape"].is_array()) return bad("missing shape");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2) return bad("missing data_offsets");
    SafeTensor t;
    t.name = name;
    const auto dt = ParseDType(v["dtype"].get<std::string>());
    if (!dt) return absl::UnimplementedError(absl::StrCat("safetensors: tensor '", name, "' has unsupported dtype ", v["dtype"].get<std::string>()));
    t.dtype = *dt;
    uint64_t count = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) return bad("shape entries must be non-negative integers");
      const uint64_t x = d.get<uint64_t>();
      if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) || (x != 0 && count > std::numeric_limits<uint64_t>::max() / 8 / x)) return bad("shape overflows");
      count *= x;
      t.shape.push_back(static_cast<int64_t>(x));
    }
    const auto& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) return bad("data_offsets must be non-negative integers");
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e || e > data_size) return bad(absl::StrCat("data_offsets [", b, ", ", e, "] outside the ", data_size, "-byte buffer"));
    if (e - b != count * DTypeSize(t.dtype)) return bad(absl::StrCat("holds ", e - b, " bytes but its shape and dtype need ", count * DTypeSize(t.dtype)));
    t.data = base + b;
    t.nbytes = e - b;
    spans.emplace_back(b, e);
    s->index_[name] = s->tensors_.size();
    s->tensors_.push_back(std::move(t));
  }
  // The format requires the tensors to tile the buffer: no overlaps, no gaps.
  std::sort(spans.begin(), spans.end());
  uint64_t at = 0;
  for (const auto& [b, e] : spans) {
    if (b != at) return absl::DataLossError(absl::StrCat("safetensors: data region has a gap or overlap at byte ", b));
    at = e;
  }
  if (at != data_size) return absl::DataLossError(absl::StrCat("safetensors: ", data_size - at, " trailing bytes after the last tensor"));
  return s;
}

const SafeTensor* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<Tensor> SafetensorsFile::ToF32(const std::string& name) const {
  const SafeTensor* t = Find(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("safetensors: no tensor '", name, "'"));
  Tensor out(DType::kF32, t->shape);
  float* y = out.data<float>();
  const int64_t n = out.size();
  for (int64_t i = 0; i < n; ++i) {
    switch (t->dtype) {
      case DType::kF32: std::memcpy(&y[i], t->data + 4 * i, 4); break;
      case DType::kF16: { uint16_t h = 0; std::memcpy(&h, t->data + 2 * i, 2); y[i] = Fp16ToFp32(h); break; }
      case DType::kBF16: { uint16_t h = 0; std::memcpy(&h, t->data + 2 * i, 2); y[i] = Bf16ToFp32(h); break; }
      case DType::kF64: { double d = 0; std::memcpy(&d, t->data + 8 * i, 8); y[i] = static_cast<float>(d); break; }
      default: return absl::InvalidArgumentError(absl::StrCat("safetensors: tensor '", name, "' is ", DTypeName(t->dtype), ", not a float type"));
    }
  }
  return out;
}

absl::Status SafetensorsWriter::Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                                    std::span<const uint8_t> bytes) {
  if (name == "__metadata__" || name.empty()) return absl::InvalidArgumentError(absl::StrCat("invalid tensor name '", name, "'"));
  if (entries_.count(name)) return absl::InvalidArgumentError(absl::StrCat("duplicate tensor '", name, "'"));
  if (static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype) != bytes.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': byte count does not match shape ", ShapeString(shape)));
  }
  entries_[name] = Entry{dtype, std::move(shape), std::vector<uint8_t>(bytes.begin(), bytes.end())};
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::AddF32(const std::string& name, std::vector<int64_t> shape, std::span<const float> v) {
  return Add(name, DType::kF32, std::move(shape), {reinterpret_cast<const uint8_t*>(v.data()), v.size() * 4});
}

std::vector<uint8_t> SafetensorsWriter::Serialize() const {
  nlohmann::ordered_json j;
  if (!metadata_.empty()) j["__metadata__"] = metadata_;
  uint64_t off = 0;
  for (const auto& [name, e] : entries_) {
    j[name] = {{"dtype", DTypeTag(e.dtype)}, {"shape", e.shape}, {"data_offsets", {off, off + e.bytes.size()}}};
    off += e.bytes.size();
  }
  std::string header = j.dump();
  header.resize((header.size() + 7) / 8 * 8, ' ');
  size_t total = 8 + header.size();
  for (const auto& [name, e] : entries_) total += e.bytes.size();
  std::vector<uint8_t> out(total);
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  size_t at = 8 + header.size();
  for (const auto& [name, e] : entries_) {
    if (!e.bytes.empty()) std::memcpy(out.data() + at, e.bytes.data(), e.bytes.size());
    at += e.bytes.size();
  }
  return out;
}

absl::Status SafetensorsWriter::WriteFile(const std::string& path) const {
  const auto bytes = Serialize();
  return WriteFileAtomic(path, bytes);
}

}  // namespace fedtune::model

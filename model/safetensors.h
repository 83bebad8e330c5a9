// safetensors reader (memory-mapped, hardened) and writer. Format: 8-byte little-endian header
// length N, N bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, data.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/mapped_file.h"
#include "common/status.h"
#include "common/tensor.h"

namespace fedtune::model {

struct SafeTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // outermost first
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
};

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // DataLoss for corrupt/truncated input, Unimplemented for an unsupported dtype.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(std::unique_ptr<MappedFile> file);

  const std::vector<SafeTensor>& tensors() const { return tensors_; }
  const SafeTensor* Find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Copies a tensor into f32 (from F32, F16, BF16, F64).
  absl::StatusOr<Tensor> ToF32(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::unique_ptr<MappedFile> file_;
  std::vector<SafeTensor> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  // Copies the bytes; shape outermost first.
  absl::Status Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                   std::span<const uint8_t> bytes);
  absl::Status AddF32(const std::string& name, std::vector<int64_t> shape, std::span<const float> v);
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  std::vector<uint8_t> Serialize() const;
  absl::Status WriteFile(const std::string& path) const;  // atomic

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::map<std::string, Entry> entries_;  // safetensors orders tensors by name
  std::map<std::string, std::string> metadata_;
};

}  // namespace fedtune::model

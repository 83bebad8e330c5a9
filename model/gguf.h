// GGUF v2/v3 reader (memory-mapped, zero-copy, hardened against hostile files) and writer.
// Format: ggml docs/gguf.md; summary in FORMATS.md.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/mapped_file.h"
#include "common/status.h"
#include "kernels/ops.h"
#include "kernels/quant.h"

namespace fedtune::model {

enum class GgufType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

// One metadata value. Scalars use the field matching their kind; arrays hold their elements
// in `strings` (string arrays) or `ints` / `floats` (numeric and bool arrays).
struct GgufValue {
  GgufType type = GgufType::kU32;
  GgufType array_type = GgufType::kU32;
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0.0;
  std::string s;
  std::vector<std::string> strings;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  bool is_integer() const;
  bool is_float() const { return type == GgufType::kF32 || type == GgufType::kF64; }
  size_t array_size() const;
  std::string ToString(size_t max_items = 8) const;
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> ne;  // ne[0] innermost (GGUF order)
  kernels::GgmlType type = kernels::GgmlType::kF32;
  uint64_t offset = 0;      // from the start of the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t n_elements() const;
  // A 2-D view (rows = ne[1], cols = ne[0]); FT_CHECKs that the tensor has <= 2 dims.
  kernels::QMatrix AsMatrix() const;
};

class GgufFile {
 public:
  // private_types: accept fedtune's in-memory block types (NF4, NF4_DQ, NF3, NF2) in 2-D
  // tensors, as fedtune's own files hold them (GgufWriter::AllowPrivateTypes).
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path, bool private_types = false);
  // Parses a file already in memory (tests, fuzzers). Errors are DataLoss (corrupt/truncated),
  // Unimplemented (unsupported version or block type).
  static absl::StatusOr<std::unique_ptr<GgufFile>> Parse(std::unique_ptr<MappedFile> file, bool private_types = false);

  uint32_t version() const { return version_; }
  const std::string& path() const { return file_->path(); }
  size_t file_size() const { return file_->bytes().size(); }
  std::span<const uint8_t> mapped_bytes() const { return file_->bytes(); }
  bool file_mapped() const { return file_->mapped(); }  // mapped_bytes() is an mmap of the file
  const std::map<std::string, GgufValue>& metadata() const { return kv_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const std::vector<std::string>& key_order() const { return key_order_; }

  const GgufValue* Find(const std::string& key) const;
  const GgufTensor* FindTensor(const std::string& name) const;
  // Typed getters: NotFound when missing, InvalidArgument (naming the key) on a type mismatch.
  absl::StatusOr<int64_t> GetInt(const std::string& key) const;
  absl::StatusOr<double> GetFloat(const std::string& key) const;  // accepts integers too
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  absl::StatusOr<bool> GetBool(const std::string& key) const;
  absl::StatusOr<const GgufValue*> GetArray(const std::string& key) const;
  int64_t GetIntOr(const std::string& key, int64_t def) const;
  double GetFloatOr(const std::string& key, double def) const;

 private:
  GgufFile() = default;
  std::unique_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  std::map<std::string, GgufValue> kv_;
  std::vector<std::string> key_order_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// Builds a GGUF v3 file: metadata in insertion order, tensors padded to the alignment.
class GgufWriter {
 public:
  explicit GgufWriter(uint32_t alignment = 32) : alignment_(alignment) {}
  // Accepts fedtune's in-memory block types (ids from 0x1000): a file only fedtune reads
  // (GgufFile::Open with private_types), never one for llama.cpp.
  void AllowPrivateTypes() { private_types_ = true; }
  void SetString(const std::string& key, const std::string& v);
  void SetU32(const std::string& key, uint32_t v);
  void SetI32(const std::string& key, int32_t v);
  void SetU64(const std::string& key, uint64_t v);
  void SetF32(const std::string& key, float v);
  void SetBool(const std::string& key, bool v);
  void SetStringArray(const std::string& key, const std::vector<std::string>& v);
  void SetI32Array(const std::string& key, const std::vector<int32_t>& v);
  void SetF32Array(const std::string& key, const std::vector<float>& v);
  // Copies a value read from another file (e.g. to carry the base model's metadata over).
  void SetValue(const std::string& key, const GgufValue& v);
  // ne in GGUF order (ne[0] innermost); data holds the encoded bytes of `type`.
  absl::Status AddTensor(const std::string& name, std::vector<int64_t> ne, kernels::GgmlType type,
                         std::span<const uint8_t> data);
  // Quantizes f32 values into `type` (rows of ne[0]) and adds the tensor.
  absl::Status AddTensorF32(const std::string& name, std::vector<int64_t> ne,
                            kernels::GgmlType type, std::span<const float> values);

  std::vector<uint8_t> Serialize() const;
  absl::Status WriteFile(const std::string& path) const;  // atomic

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> ne;
    kernels::GgmlType type;
    std::vector<uint8_t> data;
  };
  void PutKey(const std::string& key, GgufType type);
  uint32_t alignment_;
  bool private_types_ = false;
  std::vector<uint8_t> kv_bytes_;
  uint64_t n_kv_ = 0;
  std::vector<Tensor> tensors_;
};

}  // namespace fedtune::model

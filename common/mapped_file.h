// Read-only memory-mapped files (zero-copy model loading) and atomic file writes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/status.h"

namespace fedtune {

class MappedFile {
 public:
  // NotFound if the file does not exist; Internal for other OS errors.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  // Wraps bytes already in memory (tests, fuzzers); the MappedFile keeps its own copy.
  static std::unique_ptr<MappedFile> FromBytes(std::span<const uint8_t> bytes, std::string name);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }
  bool mapped() const { return mapped_; }  // bytes() is a file mapping (not a heap copy)

 private:
  MappedFile() = default;
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
  std::unique_ptr<uint8_t[]> owned_;
};

// Writes `bytes` to `path` atomically: temp file in the same folder created with `mode` (so a
// secret is never readable by others, not even briefly), fsync, rename, fsync of the folder.
absl::Status WriteFileAtomic(const std::string& path, std::span<const uint8_t> bytes, unsigned mode = 0644);
inline absl::Status WriteFileAtomic(const std::string& path, const std::string& text, unsigned mode = 0644) {
  return WriteFileAtomic(path, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()), mode);
}
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace fedtune

#include "common/tensor.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_join.h"

namespace fedtune {

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kF64: return 8;
    case DType::kI8: return 1;
    case DType::kU8: return 1;
    case DType::kI16: return 2;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
  }
  return 0;
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
    case DType::kF64: return "f64";
    case DType::kI8: return "i8";
    case DType::kU8: return "u8";
    case DType::kI16: return "i16";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
  }
  return "?";
}

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const Shape& shape) { return "[" + absl::StrJoin(shape, ", ") + "]"; }

void Tensor::Free::operator()(void* p) const { std::free(p); }

Tensor::Tensor(DType dtype, Shape shape) : dtype_(dtype), shape_(std::move(shape)) {
  for (int64_t d : shape_) FT_CHECK(d >= 0);
  const size_t bytes = (nbytes() + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
  FT_CHECK(p != nullptr);
  std::memset(p, 0, bytes == 0 ? 64 : bytes);
  data_.reset(p);
}

Tensor Tensor::Clone() const {
  Tensor t(dtype_, shape_);
  if (nbytes() > 0) std::memcpy(t.raw(), raw(), nbytes());
  return t;
}

absl::Status Tensor::Reshape(Shape shape) {
  if (NumElements(shape) != size()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot reshape ", ShapeString(shape_),
                                                   " to ", ShapeString(shape)));
  }
  shape_ = std::move(shape);
  return absl::OkStatus();
}

}  // namespace fedtune

// Dense row-major tensors: an owning container (Tensor) and non-owning views (TensorView).
// Shapes are outermost-first like PyTorch ([rows, cols]); quantized block formats live in
// kernels/quant.h, not here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace fedtune {

enum class DType : uint8_t { kF32, kF16, kBF16, kF64, kI8, kU8, kI16, kI32, kI64 };

size_t DTypeSize(DType t);
const char* DTypeName(DType t);

using Shape = std::vector<int64_t>;
int64_t NumElements(const Shape& shape);
std::string ShapeString(const Shape& shape);

// A read-only or mutable view of contiguous elements with a shape. Does not own memory.
template <typename T>
class TensorView {
 public:
  TensorView() = default;
  TensorView(T* data, Shape shape) : data_(data), shape_(std::move(shape)) {}
  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_[i]; }
  int64_t size() const { return NumElements(shape_); }
  std::span<T> span() const { return {data_, static_cast<size_t>(size())}; }
  T& operator[](int64_t i) const { return data_[i]; }

 private:
  T* data_ = nullptr;
  Shape shape_;
};

// Owning tensor with 64-byte aligned storage, zero-initialised.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Shape shape);
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  Tensor Clone() const;
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_[i]; }
  int64_t size() const { return NumElements(shape_); }
  size_t nbytes() const { return static_cast<size_t>(size()) * DTypeSize(dtype_); }
  void* raw() { return data_.get(); }
  const void* raw() const { return data_.get(); }

  // Typed access; FT_CHECKs that T matches the dtype.
  template <typename T> T* data();
  template <typename T> const T* data() const;
  template <typename T> TensorView<T> view() { return {data<T>(), shape_}; }
  template <typename T> TensorView<const T> view() const { return {data<T>(), shape_}; }

  // Returns InvalidArgument when the element count differs.
  absl::Status Reshape(Shape shape);

 private:
  struct Free {
    void operator()(void* p) const;
  };
  DType dtype_ = DType::kF32;
  Shape shape_;
  std::unique_ptr<void, Free> data_;
};

template <typename T> constexpr DType DTypeOf();
template <> constexpr DType DTypeOf<float>() { return DType::kF32; }
template <> constexpr DType DTypeOf<double>() { return DType::kF64; }
template <> constexpr DType DTypeOf<int8_t>() { return DType::kI8; }
template <> constexpr DType DTypeOf<uint8_t>() { return DType::kU8; }
template <> constexpr DType DTypeOf<int16_t>() { return DType::kI16; }
template <> constexpr DType DTypeOf<int32_t>() { return DType::kI32; }
template <> constexpr DType DTypeOf<int64_t>() { return DType::kI64; }

template <typename T> T* Tensor::data() {
  if constexpr (std::is_same_v<T, uint16_t>) {
    FT_CHECK(dtype_ == DType::kF16 || dtype_ == DType::kBF16 || dtype_ == DType::kI16);
  } else {
    FT_CHECK(dtype_ == DTypeOf<T>());
  }
  return static_cast<T*>(data_.get());
}
template <typename T> const T* Tensor::data() const {
  return const_cast<Tensor*>(this)->data<T>();
}

}  // namespace fedtune

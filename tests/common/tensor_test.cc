#include "common/tensor.h"

#include "gtest/gtest.h"

namespace fedtune {
namespace {

TEST(TensorTest, AllocatesZeroedAlignedStorage) {
  Tensor t(DType::kF32, {3, 5});
  EXPECT_EQ(t.size(), 15);
  EXPECT_EQ(t.nbytes(), 60u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 64, 0u);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(t.data<float>()[i], 0.0f);
}

TEST(TensorTest, CloneIsDeep) {
  Tensor t(DType::kI32, {4});
  t.data<int32_t>()[2] = 7;
  Tensor c = t.Clone();
  t.data<int32_t>()[2] = 9;
  EXPECT_EQ(c.data<int32_t>()[2], 7);
}

TEST(TensorTest, ReshapeChecksElementCount) {
  Tensor t(DType::kF32, {2, 6});
  EXPECT_TRUE(t.Reshape({3, 4}).ok());
  EXPECT_EQ(t.dim(0), 3);
  const auto s = t.Reshape({5, 5});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("[3, 4]"), std::string::npos);
}

TEST(TensorTest, ViewSharesMemory) {
  Tensor t(DType::kF32, {2, 2});
  auto v = t.view<float>();
  v[3] = 1.5f;
  EXPECT_EQ(t.data<float>()[3], 1.5f);
  EXPECT_EQ(v.dim(1), 2);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_STREQ(DTypeName(DType::kBF16), "bf16");
}

}  // namespace
}  // namespace fedtune

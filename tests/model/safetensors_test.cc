#include "model/safetensors.h"

#include <cstring>

#include "common/fp16.h"
#include "gtest/gtest.h"

namespace fedtune::model {
namespace {

absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(const std::vector<uint8_t>& b) {
  return SafetensorsFile::Parse(MappedFile::FromBytes(b, "mem.safetensors"));
}

std::vector<uint8_t> Raw(const std::string& header, size_t data_bytes) {
  std::vector<uint8_t> b(8 + header.size() + data_bytes, 0);
  const uint64_t n = header.size();
  std::memcpy(b.data(), &n, 8);
  std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}

TEST(SafetensorsTest, WriterOutputReadsBack) {
  SafetensorsWriter w;
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  ASSERT_TRUE(w.AddF32("b.weight", {2, 3}, a).ok());
  const uint16_t h[2] = {Fp32ToFp16(0.5f), Fp32ToFp16(-1.0f)};
  ASSERT_TRUE(w.Add("a.half", DType::kF16, {2}, {reinterpret_cast<const uint8_t*>(h), 4}).ok());
  w.SetMetadata("format", "pt");
  const auto bytes = w.Serialize();
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  auto f = Parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  auto t = (*f)->ToF32("b.weight");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->shape(), (Shape{2, 3}));
  EXPECT_EQ(t->data<float>()[5], 6.0f);
  auto hh = (*f)->ToF32("a.half");
  ASSERT_TRUE(hh.ok());
  EXPECT_EQ(hh->data<float>()[1], -1.0f);
  EXPECT_EQ((*f)->ToF32("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, RejectsMalformedHeaders) {
  struct C { std::string header; size_t data; absl::StatusCode code; const char* needle; };
  const std::vector<C> cases = {
      {"{not json", 0, absl::StatusCode::kDataLoss, "not valid JSON"},
      {"[1,2]", 0, absl::StatusCode::kDataLoss, "not a JSON object"},
      {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4, absl::StatusCode::kDataLoss, "need 8"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}})", 4, absl::StatusCode::kDataLoss, "outside"},
      {R"({"t":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}})", 4, absl::StatusCode::kUnimplemented, "unsupported dtype"},
      {R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, absl::StatusCode::kDataLoss, "non-negative"},
      {R"({"t":{"dtype":"F32","shape":[1]}})", 4, absl::StatusCode::kDataLoss, "data_offsets"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8, absl::StatusCode::kDataLoss, "gap or overlap"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 12, absl::StatusCode::kDataLoss, "trailing"},
      {R"({"__metadata__":{"k":1}})", 0, absl::StatusCode::kDataLoss, "not a string"},
  };
  for (const auto& c : cases) {
    auto r = Parse(Raw(c.header, c.data));
    ASSERT_FALSE(r.ok()) << c.header;
    EXPECT_EQ(r.status().code(), c.code) << c.header << " -> " << r.status();
    EXPECT_NE(r.status().message().find(c.needle), std::string::npos) << c.header << " -> " << r.status();
  }
  std::vector<uint8_t> huge(8, 0xff);
  EXPECT_EQ(Parse(huge).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(Parse({1, 2}).status().code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace fedtune::model

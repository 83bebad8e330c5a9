#include "model/gguf.h"

#include <cmath>
#include <cstring>

#include "gtest/gtest.h"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

using kernels::GgmlType;

std::unique_ptr<GgufFile> ParseBytes(const std::vector<uint8_t>& b, absl::Status* st = nullptr) {
  auto r = GgufFile::Parse(MappedFile::FromBytes(b, "mem.gguf"));
  if (st) *st = r.status();
  return r.ok() ? std::move(r).value() : nullptr;
}

TEST(GgufTest, WriterOutputReadsBack) {
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  w.SetU32("a.u32", 7);
  w.SetI32("a.i32", -3);
  w.SetU64("a.u64", 1ull << 40);
  w.SetF32("a.f32", 0.5f);
  w.SetBool("a.bool", true);
  w.SetStringArray("a.strs", {"x", "", "zz"});
  w.SetF32Array("a.floats", {1.5f, -2.0f});
  std::vector<float> vals(64);
  for (int i = 0; i < 64; ++i) vals[i] = static_cast<float>(i) * 0.25f;
  ASSERT_TRUE(w.AddTensorF32("t.f32", {32, 2}, GgmlType::kF32, vals).ok());
  ASSERT_TRUE(w.AddTensorF32("t.q8", {64}, GgmlType::kQ8_0, vals).ok());
  auto g = ParseBytes(w.Serialize());
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(g->version(), 3u);
  EXPECT_EQ(*g->GetString("general.architecture"), "llama");
  EXPECT_EQ(*g->GetInt("a.u32"), 7);
  EXPECT_EQ(*g->GetInt("a.i32"), -3);
  EXPECT_EQ(*g->GetInt("a.u64"), 1ll << 40);
  EXPECT_EQ(*g->GetFloat("a.f32"), 0.5);
  EXPECT_TRUE(*g->GetBool("a.bool"));
  EXPECT_EQ((*g->GetArray("a.strs"))->strings, (std::vector<std::string>{"x", "", "zz"}));
  EXPECT_EQ((*g->GetArray("a.floats"))->floats, (std::vector<double>{1.5, -2.0}));
  const GgufTensor* t = g->FindTensor("t.f32");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->ne, (std::vector<int64_t>{32, 2}));
  EXPECT_EQ(t->offset % 32, 0u);
  EXPECT_EQ(g->FindTensor("t.q8")->offset, 256u);  // 64 f32 values padded to the alignment
  float f;
  std::memcpy(&f, t->data + 4 * 63, 4);
  EXPECT_EQ(f, 63 * 0.25f);
  EXPECT_EQ(g->FindTensor("t.q8")->nbytes, 68u);
  EXPECT_EQ(g->key_order().front(), "general.architecture");
}

TEST(GgufTest, TypedGettersNameTheKey) {
  GgufWriter w;
  w.SetString("s", "x");
  auto g = ParseBytes(w.Serialize());
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(g->GetInt("s").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g->GetInt("s").status().message().find("'s'"), std::string::npos);
  EXPECT_EQ(g->GetInt("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(g->GetIntOr("missing", 5), 5);
}

TEST(GgufTest, WriterRejectsBadTensors) {
  GgufWriter w;
  std::vector<uint8_t> bytes(10);
  EXPECT_EQ(w.AddTensor("x", {5}, GgmlType::kF32, bytes).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddTensor("y", {33}, GgmlType::kQ8_0, bytes).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddTensor(std::string(65, 'n'), {1}, GgmlType::kF32, std::vector<uint8_t>(4)).code(), absl::StatusCode::kInvalidArgument);
}

// fedtune's in-memory types (NF4, NF4_DQ, NF3, NF2) go only into fedtune's own files: refused by
// a default writer and reader, read back byte for byte with private_types (NF4_DQ's per-row
// header included), and only as matrices.
TEST(GgufTest, PrivateTypesOnlyWhereAskedFor) {
  std::vector<float> vals(2 * 128);
  for (size_t i = 0; i < vals.size(); ++i) vals[i] = std::sin(static_cast<float>(i));
  for (GgmlType t : {GgmlType::kNF4, GgmlType::kNF4DQ, GgmlType::kNF3, GgmlType::kNF2}) {
    const size_t rb = *kernels::RowBytes(t, 128);
    std::vector<uint8_t> q(2 * rb);
    for (int r = 0; r < 2; ++r) ASSERT_TRUE(kernels::QuantizeRow(t, vals.data() + r * 128, q.data() + r * rb, 128).ok());
    GgufWriter plain;
    EXPECT_EQ(plain.AddTensor("w", {128, 2}, t, q).code(), absl::StatusCode::kInvalidArgument);
    GgufWriter w;
    w.AllowPrivateTypes();
    ASSERT_TRUE(w.AddTensor("w", {128, 2}, t, q).ok());
    ASSERT_TRUE(w.AddTensor("v", {256}, t, std::vector<uint8_t>(*kernels::RowBytes(t, 256))).ok());
    const std::vector<uint8_t> file = w.Serialize();
    absl::Status st;
    EXPECT_EQ(ParseBytes(file, &st), nullptr);
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    auto g = GgufFile::Parse(MappedFile::FromBytes(file, "mem.gguf"), /*private_types=*/true);
    EXPECT_EQ(g.status().code(), absl::StatusCode::kDataLoss);  // "v" is not a matrix
    EXPECT_NE(g.status().message().find("not a matrix"), std::string::npos) << g.status();
    GgufWriter m;
    m.AllowPrivateTypes();
    ASSERT_TRUE(m.AddTensor("w", {128, 2}, t, q).ok());
    g = GgufFile::Parse(MappedFile::FromBytes(m.Serialize(), "mem.gguf"), /*private_types=*/true);
    ASSERT_TRUE(g.ok()) << g.status();
    const kernels::QMatrix back = (*g)->FindTensor("w")->AsMatrix();
    EXPECT_EQ(back.type, t);
    EXPECT_EQ(back.row_bytes, rb);
    EXPECT_EQ(std::vector<uint8_t>(back.data, back.data + 2 * rb), q);
  }
}

struct Corruption {
  const char* what;
  std::function<void(std::vector<uint8_t>&)> mutate;
  absl::StatusCode code;
  const char* needle;
};

TEST(GgufTest, CorruptFilesGiveClearErrors) {
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  ASSERT_TRUE(w.AddTensorF32("tensor", {32}, GgmlType::kQ8_0, std::vector<float>(32, 1.0f)).ok());
  const auto good = w.Serialize();
  ASSERT_NE(ParseBytes(good), nullptr);
  // Layout: magic 4, version 4, n_tensors 8, n_kv 8, key len 8 @24, key @32 (20 bytes), type @52,
  // value len @56, value @64 (5), tensor name len @69, name @77 (6), n_dims @83, ne @87, type @95, offset @99.
  const std::vector<Corruption> cases = {
      {"magic", [](auto& b) { b[0] = 'X'; }, absl::StatusCode::kDataLoss, "bad magic"},
      {"version", [](auto& b) { b[4] = 9; }, absl::StatusCode::kUnimplemented, "version 9"},
      {"kv count", [](auto& b) { b[16] = 0xff; b[17] = 0xff; b[18] = 0xff; }, absl::StatusCode::kDataLoss, "metadata count"},
      {"key length", [](auto& b) { b[31] = 0x10; }, absl::StatusCode::kDataLoss, "claims length"},
      {"value type", [](auto& b) { b[52] = 42; }, absl::StatusCode::kDataLoss, "invalid value type 42"},
      {"dims", [](auto& b) { b[83] = 7; }, absl::StatusCode::kDataLoss, "7 dimensions"},
      {"block type", [](auto& b) { b[95] = 15; }, absl::StatusCode::kUnimplemented, "Q8_K"},
      {"unknown type", [](auto& b) { b[95] = 77; }, absl::StatusCode::kDataLoss, "unknown type id 77"},
      {"offset", [](auto& b) { b[100] = 0x40; }, absl::StatusCode::kDataLoss, "past the end"},
      {"unaligned", [](auto& b) { b[99] = 3; }, absl::StatusCode::kDataLoss, "not aligned"},
      {"truncated", [](auto& b) { b.resize(b.size() - 40); }, absl::StatusCode::kDataLoss, "past the end"},
      {"header cut", [](auto& b) { b.resize(60); }, absl::StatusCode::kDataLoss, "truncated"},
  };
  for (const auto& c : cases) {
    auto b = good;
    c.mutate(b);
    absl::Status st;
    EXPECT_EQ(ParseBytes(b, &st), nullptr) << c.what;
    EXPECT_EQ(st.code(), c.code) << c.what << ": " << st;
    EXPECT_NE(st.message().find(c.needle), std::string::npos) << c.what << ": " << st;
  }
}

TEST(GgufTest, OpenMissingFileIsNotFound) {
  EXPECT_EQ(GgufFile::Open("/nonexistent.gguf").status().code(), absl::StatusCode::kNotFound);
}

TEST(GgufTest, TinyModelFileRoundTrips) {
  const std::string path = testing::TempPath("tiny_roundtrip.gguf");
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, {}).ok());
  auto g = GgufFile::Open(path);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)->tensors().size(), 2u + 2 * 9);
  // Copy every key and tensor into a new writer: the bytes must be identical.
  GgufWriter w;
  for (const auto& k : (*g)->key_order()) w.SetValue(k, (*g)->metadata().at(k));
  for (const auto& t : (*g)->tensors()) ASSERT_TRUE(w.AddTensor(t.name, t.ne, t.type, {t.data, t.nbytes}).ok());
  const auto bytes = w.Serialize();
  auto orig = MappedFile::Open(path);
  ASSERT_TRUE(orig.ok());
  ASSERT_EQ(bytes.size(), (*orig)->bytes().size());
  EXPECT_EQ(std::memcmp(bytes.data(), (*orig)->bytes().data(), bytes.size()), 0);
}

}  // namespace
}  // namespace fedtune::model

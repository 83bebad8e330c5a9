// Exports on a tiny model: the merged GGUF computes what base + adapters compute; the
// GGUF-LoRA and PEFT files hold the same dense update (with PEFT's Q/K rows in HF order);
// PEFT import inverts export.
#include <cmath>

#include "common/rng.h"
#include "gtest/gtest.h"
#include "model/export.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

class ExportTest : public ::testing::TestWithParam<AdapterKind> {
 protected:
  void SetUp() override {
    path_ = testing::TempPath("export_base.gguf");
    ASSERT_TRUE(testing::WriteTinyLlamaGguf(path_, {}).ok());
    model_ = std::move(LlamaModel::Load(path_)).value();
    auto s = MakeAdapters<float>(model_->adapter_dims(), AdapterSpec{GetParam(), 4, 8.0f, false, 8},
                                 *ParseModules("all"), 3);
    ASSERT_TRUE(s.ok());
    set_ = std::move(*s);
    Rng rng(4);
    set_.ForEachTrainable([&](const std::string&, std::span<float> p, std::span<float>) {
      for (auto& x : p) x = static_cast<float>(0.1 * rng.Normal());
    });
  }
  std::vector<float> Logits(const LlamaModel& m, const AdapterSet<float>* a) {
    LlamaContext ctx(m, 16);
    ctx.SetAdapters(a);
    std::vector<float> l;
    EXPECT_TRUE(ctx.Eval(std::vector<int32_t>{5, 60, 7, 200, 33}, true, &l).ok());
    return l;
  }
  std::string path_;
  std::unique_ptr<LlamaModel> model_;
  AdapterSet<float> set_;
};

TEST_P(ExportTest, MergedModelEqualsBasePlusAdapters) {
  const std::string out = testing::TempPath(std::string("merged_") + AdapterKindName(GetParam()) + ".gguf");
  ASSERT_TRUE(ExportMergedGguf(out, *model_, set_, kernels::GgmlType::kF32).ok());
  auto merged = LlamaModel::Load(out);
  ASSERT_TRUE(merged.ok()) << merged.status();
  const auto a = Logits(*model_, &set_), b = Logits(**merged, nullptr);
  float d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
  EXPECT_LT(d, 1e-4f);
}

TEST_P(ExportTest, GgufLoraHoldsTheDenseUpdate) {
  const std::string out = testing::TempPath(std::string("lora_") + AdapterKindName(GetParam()) + ".gguf");
  ASSERT_TRUE(ExportGgufLora(out, *model_, set_).ok());
  auto g = GgufFile::Open(out);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(*(*g)->GetString("general.type"), "adapter");
  EXPECT_EQ(*(*g)->GetString("adapter.type"), "lora");
  const double alpha = *(*g)->GetFloat("adapter.lora.alpha");
  const auto& a = *set_.layers[1][static_cast<size_t>(Module::kDown)];
  const auto* ta = (*g)->FindTensor("blk.1.ffn_down.weight.lora_a");
  const auto* tb = (*g)->FindTensor("blk.1.ffn_down.weight.lora_b");
  ASSERT_TRUE(ta && tb);
  const int64_t r = ta->ne[1];
  ASSERT_EQ(ta->ne[0], a.in);
  ASSERT_EQ(tb->ne[0], r);
  ASSERT_EQ(tb->ne[1], a.out);
  const float* A = reinterpret_cast<const float*>(ta->data);
  const float* B = reinterpret_cast<const float*>(tb->data);
  const auto want = DenseDelta(a);
  double err = 0;
  for (int64_t o = 0; o < a.out; ++o)
    for (int64_t i = 0; i < a.in; ++i) {
      double s = 0;
      for (int64_t k = 0; k < r; ++k) s += static_cast<double>(B[o * r + k]) * A[k * a.in + i];
      err = std::max(err, std::fabs(alpha / static_cast<double>(r) * s - want[static_cast<size_t>(o * a.in + i)]));
    }
  EXPECT_LT(err, 1e-6);
}

TEST_P(ExportTest, PeftRoundTripsAndUsesHfRowOrder) {
  const std::string dir = testing::TempPath(std::string("peft_") + AdapterKindName(GetParam()));
  const auto s = ExportPeft(dir, *model_, set_, "tiny");
  if (GetParam() == AdapterKind::kDiaBlo) {
    EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
    return;
  }
  ASSERT_TRUE(s.ok()) << s;
  const auto cfg = nlohmann::json::parse(*ReadFileToString(dir + "/adapter_config.json"));
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["r"], 4);
  EXPECT_EQ(cfg["target_modules"].size(), 7u);
  auto back = ImportPeft(dir, *model_);
  ASSERT_TRUE(back.ok()) << back.status();
  for (size_t l = 0; l < set_.layers.size(); ++l)
    for (int m = 0; m < kNumModules; ++m) {
      EXPECT_EQ(set_.layers[l][static_cast<size_t>(m)]->a, back->layers[l][static_cast<size_t>(m)]->a);
      EXPECT_EQ(set_.layers[l][static_cast<size_t>(m)]->b, back->layers[l][static_cast<size_t>(m)]->b);
    }
  // q's B rows in the file are in HF order: GGUF row 2i+t of a head = HF row t*hd/2+i.
  auto st = SafetensorsFile::Open(dir + "/adapter_model.safetensors");
  ASSERT_TRUE(st.ok());
  auto b = (*st)->ToF32("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
  ASSERT_TRUE(b.ok());
  const auto& q = *set_.layers[0][0];
  const int64_t hd = model_->config().head_dim, r = 4;
  for (int64_t row = 0; row < q.out; ++row) {
    const int64_t h = row / hd, w = row % hd, hf = h * hd + (w % 2) * (hd / 2) + w / 2;
    for (int64_t k = 0; k < r; ++k) ASSERT_EQ(b->data<float>()[hf * r + k], q.b[static_cast<size_t>(row * r + k)]);
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, ExportTest, ::testing::Values(AdapterKind::kLora, AdapterKind::kFfaLora, AdapterKind::kDiaBlo),
                         [](const auto& p) { return std::string(AdapterKindName(p.param)); });

}  // namespace
}  // namespace fedtune::model

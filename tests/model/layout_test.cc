// issue 3: per-layer adapter settings ("LAYERS[:MODULES][:rRANK]" entries): parsing with errors
// that name the entry, adapters built per layer, saved and loaded back with their layout, and
// exported to PEFT with a rank_pattern for the layers whose rank differs.
#include <gtest/gtest.h>

#include "common/mapped_file.h"
#include "model/adapter.h"
#include "model/adapter_io.h"
#include "model/export.h"
#include "model/llama.h"
#include "nlohmann/json.hpp"
#include "absl/strings/str_cat.h"
#include "tests/support/tiny_model.h"

namespace fedtune::model {
namespace {

TEST(LayerLayoutTest, ParsesEntriesAndNamesTheBadOne) {
  const std::vector<Module> def = {Module::kQ, Module::kV};
  auto l = ParseLayerLayout("0-1:q,k:r4;2:all", 4, def);
  ASSERT_TRUE(l.ok()) << l.status();
  ASSERT_TRUE((*l)[0] && (*l)[1] && (*l)[2]);
  EXPECT_FALSE((*l)[3]);  // named by no entry: no adapters
  EXPECT_EQ((*l)[0]->rank, 4);
  EXPECT_EQ((*l)[0]->modules, (std::vector<Module>{Module::kQ, Module::kK}));
  EXPECT_EQ((*l)[2]->rank, 0);
  EXPECT_EQ((*l)[2]->modules.size(), 7u);
  auto all = ParseLayerLayout("*;3:q:r2", 4, def);  // later entries override
  ASSERT_TRUE(all.ok());
  EXPECT_EQ((*all)[0]->modules, def);
  EXPECT_EQ((*all)[3]->rank, 2);
  for (const char* bad : {"7", "2-1", "x", "0:q:rX", "0:bogus", ":q", "0:q:r0"}) {
    auto r = ParseLayerLayout(bad, 4, def);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(std::string("'") + bad + "'"), std::string::npos) << r.status();
  }
}

TEST(LayerLayoutTest, SavedAndLoadedWithItsLayoutAndExportedWithRankPattern) {
  const std::string path = testing::TempPath("layout.gguf");
  ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, {}).ok());
  auto m = LlamaModel::Load(path);
  ASSERT_TRUE(m.ok());
  const AdapterSpec spec{AdapterKind::kLora, 4, 8.0f, false, 1};
  const int64_t last = (*m)->config().n_layer - 1;
  auto set = MakeAdaptersWithLayout<float>((*m)->adapter_dims(), spec, {Module::kQ, Module::kV}, absl::StrCat("0:q:r2;", last, ":all"), 3);
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_TRUE(set->layers[0][0]);
  EXPECT_EQ(set->layers[0][0]->spec.rank, 2);
  EXPECT_FALSE(set->layers[0][2]);  // v not on layer 0
  EXPECT_TRUE(set->layers[static_cast<size_t>(last)][6]);
  for (auto& l : set->layers)
    for (auto& a : l)
      if (a)
        for (auto& x : a->b) x = 0.25f;
  const std::string file = testing::TempPath("layout.safetensors");
  ASSERT_TRUE(SaveAdapters(file, *set).ok());
  auto back = LoadAdapters(file, (*m)->adapter_dims());
  ASSERT_TRUE(back.ok()) << back.status();
  for (size_t l = 0; l < set->layers.size(); ++l)
    for (size_t k = 0; k < 7; ++k) {
      ASSERT_EQ(static_cast<bool>(set->layers[l][k]), static_cast<bool>(back->layers[l][k])) << l << " " << k;
      if (!set->layers[l][k]) continue;
      EXPECT_EQ(set->layers[l][k]->spec.rank, back->layers[l][k]->spec.rank);
      EXPECT_EQ(set->layers[l][k]->a, back->layers[l][k]->a);
      EXPECT_EQ(set->layers[l][k]->b, back->layers[l][k]->b);
    }
  const std::string peft = testing::TempPath("layout_peft");
  ASSERT_TRUE(ExportPeft(peft, **m, *set, "tiny").ok());
  const auto cfg = nlohmann::json::parse(*ReadFileToString(peft + "/adapter_config.json"));
  EXPECT_EQ(cfg["r"], 2);  // the first adapter's rank is the file's r ...
  EXPECT_EQ(cfg["rank_pattern"][absl::StrCat("model.layers.", last, ".self_attn.q_proj")], 4);  // ... the others are listed
}

}  // namespace
}  // namespace fedtune::model

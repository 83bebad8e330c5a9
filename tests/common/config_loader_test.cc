#include "common/config_loader.h"

#include "gtest/gtest.h"
#include "proto/config.pb.h"

namespace fedtune {
namespace {

using proto::FederatedConfig;

absl::Status Load(const std::string& yaml, FederatedConfig* c) { return LoadConfigYaml(yaml, c, "test.yaml"); }

TEST(ConfigLoaderTest, LoadsNestedMessagesEnumsAndLists) {
  FederatedConfig c;
  ASSERT_TRUE(Load(R"(
model: {path: m.gguf, context_length: 512}
adapter:
  kind: FFA_LORA
  rank: 8
  alpha: 16
  target_modules: [q, v]
rounds: 3
seed: 18446744073709551615
learning_rate: 2e-4
)", &c).ok());
  EXPECT_EQ(c.model().path(), "m.gguf");
  EXPECT_EQ(c.model().context_length(), 512);
  EXPECT_EQ(c.adapter().kind(), proto::AdapterConfig::FFA_LORA);
  EXPECT_EQ(c.adapter().target_modules_size(), 2);
  EXPECT_EQ(c.adapter().target_modules(1), "v");
  EXPECT_FLOAT_EQ(c.adapter().alpha(), 16.0f);
  EXPECT_EQ(c.seed(), 18446744073709551615ull);
  EXPECT_DOUBLE_EQ(c.learning_rate(), 2e-4);
}

void ExpectError(const std::string& yaml, const std::string& needle) {
  FederatedConfig c;
  const auto s = Load(yaml, &c);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << yaml;
  EXPECT_NE(s.message().find(needle), std::string::npos) << "message: " << s.message() << "\nexpected: " << needle;
}

TEST(ConfigLoaderTest, UnknownKeyNamesItsPath) { ExpectError("model: {path: x, contxt: 5}\nrounds: 1", "model.contxt: unknown key"); }
TEST(ConfigLoaderTest, WrongTypeNamesItsPath) { ExpectError("model: {path: x, context_length: big}\nrounds: 1", "model.context_length: expected an integer"); }
TEST(ConfigLoaderTest, MissingRequiredField) { ExpectError("model: {path: x}", "rounds: required key is missing"); }
TEST(ConfigLoaderTest, MissingNestedRequiredField) { ExpectError("model: {context_length: 5}\nrounds: 1", "model.path: required key is missing"); }
TEST(ConfigLoaderTest, Int32Overflow) { ExpectError("model: {path: x}\nrounds: 3000000000", "rounds: integer out of 32-bit range"); }
TEST(ConfigLoaderTest, NegativeUnsigned) { ExpectError("model: {path: x}\nrounds: 1\nseed: -1", "seed: expected a non-negative integer"); }
TEST(ConfigLoaderTest, BadEnumListsChoices) { ExpectError("model: {path: x}\nrounds: 1\nadapter: {kind: QLORA}", "LORA, FFA_LORA, DIABLO"); }
TEST(ConfigLoaderTest, ListWhereScalarExpected) { ExpectError("model: {path: x}\nrounds: [1]", "rounds: expected a scalar"); }
TEST(ConfigLoaderTest, ScalarWhereListExpected) { ExpectError("model: {path: x}\nrounds: 1\nadapter: {target_modules: q}", "adapter.target_modules: expected a list"); }
TEST(ConfigLoaderTest, ListElementPath) { ExpectError("model: {path: x}\nrounds: 1\nadapter: {target_modules: [q, {a: 1}]}", "adapter.target_modules[1]"); }
TEST(ConfigLoaderTest, SyntaxErrorHasLine) { ExpectError("model: {path: x\nrounds: 1", "YAML syntax error at line"); }
TEST(ConfigLoaderTest, NaNRejected) { ExpectError("model: {path: x}\nrounds: 1\nlearning_rate: .nan", "learning_rate"); }

TEST(ConfigLoaderTest, MissingFileIsNotFound) {
  FederatedConfig c;
  EXPECT_EQ(LoadConfigFile("/nonexistent/x.yaml", &c).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace fedtune

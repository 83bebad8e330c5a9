// The simulation end to end on a tiny generated model (unit label: seconds).
#include "sim/simulation.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <set>

#include <cstdlib>
#include <filesystem>

#include "common/config_loader.h"
#include "common/mapped_file.h"
#include "federation/run_ledger.h"
#include "model/safetensors.h"
#include "tests/support/processes.h"
#include "tests/support/tiny_model.h"
#include "worker/client.h"
#include "worker/error_feedback.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace fedtune::sim {
namespace {

// All float values of a safetensors file, in tensor-name order.
std::vector<float> LoadTensors(const std::string& path) {
  std::vector<float> out;
  auto f = model::SafetensorsFile::Open(path);
  EXPECT_TRUE(f.ok()) << f.status();
  if (!f.ok()) return out;
  for (const auto& st : (*f)->tensors()) {
    auto t = (*f)->ToF32(st.name);
    EXPECT_TRUE(t.ok());
    out.insert(out.end(), t->data<float>(), t->data<float>() + t->size());
  }
  return out;
}

class SimTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = new std::string(testing::TempPath("sim_tiny.gguf"));
    testing::TinyModelOptions o;
    o.n_ctx = 256;
    ASSERT_TRUE(testing::WriteTinyLlamaGguf(*model_, o).ok());
  }
  // A valid config; `extra` lines ("key: value") replace the default of the same top-level key.
  static std::string Yaml(const std::string& extra, const std::string& out) {
    std::vector<std::pair<std::string, std::string>> kv = {
        {"model", "{path: " + *model_ + "}"},
        {"adapter", "{kind: FFA_LORA, rank: 4, alpha: 8}"},
        {"clients", "3"},
        {"rounds", "2"},
        {"data", "{tasks: [sentiment, extract], examples_per_task: 40, eval_examples: 4, max_len: 96}"},
        {"train", "{local_steps: 2, batch: 4, learning_rate: 0.01}"},
        {"eval", "{max_new_tokens: 4}"},
        {"output_dir", out}};
    std::string tail;
    size_t pos = 0;
    while (pos < extra.size()) {
      const size_t nl = extra.find('\n', pos);
      const std::string line = extra.substr(pos, nl - pos);
      pos = nl == std::string::npos ? extra.size() : nl + 1;
      const std::string key = line.substr(0, line.find(':'));
      bool replaced = false;
      for (auto& [k, v] : kv)
        if (k == key) {
          v = line.substr(line.find(':') + 1);
          replaced = true;
        }
      if (!replaced) tail += line + "\n";
    }
    std::string y;
    for (const auto& [k, v] : kv) y += k + ": " + v + "\n";
    return y + tail;
  }
  static absl::StatusOr<SimulationResult> Run(const std::string& yaml) {
    proto::SimulationConfig c;
    FT_RETURN_IF_ERROR(LoadConfigYaml(yaml, &c, "test.yaml"));
    SimOptions o;
    o.progress = false;
    o.config_text = yaml;
    return RunSimulation(c, o);
  }
  static absl::Status Check(const std::string& yaml) {
    proto::SimulationConfig c;
    FT_RETURN_IF_ERROR(LoadConfigYaml(yaml, &c, "test.yaml"));
    return ValidateConfig(c);
  }
  static std::string* model_;
};
std::string* SimTest::model_ = nullptr;

TEST_F(SimTest, RunWritesEveryOutputAndTheLedger) {
  const std::string out = testing::TempPath("sim_run");
  auto r = Run(Yaml("strategy: {merge: uncertainty}\nprofiles: [{name: fast, count: 1, speed: 4}, {name: slow, count: 2, dropout: 0.3}]\n", out));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->rounds.size(), 3u);  // round 0 + 2 rounds
  for (const char* f : {"metrics.csv", "metrics.jsonl", "ledger.sqlite", "report.html", "adapter.safetensors", "adapter-lora.gguf",
                        "peft/adapter_config.json", "peft/adapter_model.safetensors", "config.yaml"})
    EXPECT_TRUE(std::filesystem::exists(out + "/" + f)) << f;
  auto ledger = federation::RunLedger::Open(out + "/ledger.sqlite");
  ASSERT_TRUE(ledger.ok());
  EXPECT_EQ(*(*ledger)->LastRound(), 2);
  auto csv = ReadFileToString(out + "/metrics.csv");
  ASSERT_TRUE(csv.ok());
  EXPECT_EQ(std::count(csv->begin(), csv->end(), '\n'), 4);  // header + 3 rows
  auto html = ReadFileToString(out + "/report.html");
  ASSERT_TRUE(html.ok());
  EXPECT_NE(html->find("<canvas id=\"accuracy\""), std::string::npos);
  EXPECT_NE(html->find("const DATA = "), std::string::npos);
  EXPECT_GT(r->rounds[2].metrics.at("sim_round_seconds"), 0);
}

// issue 21: the same-compute baselines. Local-only: each client trains alone for its own steps in
// the federation and is scored on its own tasks' held-out examples (by_task: one task each), beside
// the federated adapter on the same tasks; centralized: the pooled data, the federation's steps.
TEST_F(SimTest, LocalAndCentralizedBaselinesAreScoredPerClientAndTask) {
  const std::string out = testing::TempPath("sim_baselines");
  auto r = Run(Yaml("data: {tasks: [sentiment, extract], examples_per_task: 40, eval_examples: 4, max_len: 96, partition: BY_TASK, holdout: 0.25}\n"
                    "clients: 2\nlocal_baseline: true\ncentralized_baseline: true\n", out));
  ASSERT_TRUE(r.ok()) << r.status();
  auto text = ReadFileToString(out + "/baselines.json");
  ASSERT_TRUE(text.ok()) << text.status();
  const auto j = nlohmann::json::parse(*text);
  ASSERT_EQ(j["local"].size(), 2u);
  for (int k = 0; k < 2; ++k) {
    const auto& c = j["local"][static_cast<size_t>(k)];
    EXPECT_EQ(c["client"], absl::StrFormat("client-%03d", k));
    ASSERT_EQ(c["tasks"].size(), 1u) << c;  // by_task: its own task only
    const std::string task = c["tasks"].begin().key();
    EXPECT_EQ(task, k == 0 ? "sentiment" : "extract");
    EXPECT_TRUE(c["federated"]["tasks"].contains(task));
    for (const char* m : {"accuracy", "rouge_l", "loss"}) {
      EXPECT_GE(c[m].get<double>(), 0.0) << m;
      EXPECT_GE(c["federated"][m].get<double>(), 0.0) << m;
    }
    EXPECT_GT(c["loss"].get<double>(), 0.0);
    // The federated figures for a task are those of the final evaluation.
    EXPECT_NEAR(c["federated"]["tasks"][task]["accuracy"].get<double>(), r->rounds.back().metrics.at("acc_" + task), 1e-12);
    EXPECT_NEAR(c["federated"]["tasks"][task]["rouge_l"].get<double>(), r->rounds.back().metrics.at("rouge_" + task), 1e-12);
  }
  EXPECT_EQ(j["centralized"]["tasks"].size(), 2u);
  EXPECT_NEAR(j["centralized"]["accuracy"].get<double>(), r->centralized_accuracy, 1e-12);
  // holdout 0.25 of 40 examples per task: 10 held out, eval_examples 4 -> 2 scored per task.
  EXPECT_NE(Check(Yaml("data: {tasks: [sentiment], holdout: 1.5}\n", out + "x")).message().find("data.holdout"), std::string::npos);
}

// issue 7: report.html renders in headless Chromium with its charts (Chart.js inlined, so no
// network), and a screenshot is taken. Skips where no Chromium is installed (setup.sh installs
// chromium-headless-shell).
TEST_F(SimTest, ReportRendersInHeadlessChromium) {
  const std::string browser = testing::FindHeadlessChromium();
  if (browser.empty()) GTEST_SKIP() << "no headless Chromium installed";
  const std::string out = testing::TempPath("sim_report");
  ASSERT_TRUE(Run(Yaml("dp: {enabled: true, noise_multiplier: 0.8, clip_norm: 0.05}\n", out)).ok());
  auto page = testing::RenderPage(browser, "file://" + out + "/report.html", out);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_NE(page->dom.find("data-charts-ready=\"yes\""), std::string::npos) << "Chart.js did not run";
  EXPECT_EQ(page->png.substr(1, 3), "PNG");
  EXPECT_GT(page->png.size(), 20000u);  // charts drawn, not a blank page
}

// issue 8: the planner in the simulation — per-client plans applied, recorded in the ledger and
// the report, a client too small for anything left out (and told why), the rest trained.
// Clients train on a re-quantized base with a cloq correction (calibrated on the first client's
// inputs): the run completes, learns, and trains a different adapter than on the plain
// re-quantized base (the correction is part of the base the clients train on).
TEST_F(SimTest, CompensatedLowBitBaseTrainsTheClients) {
  const std::string plain = testing::TempPath("sim_q4_0"), comp = testing::TempPath("sim_q4_0_cloq");
  const std::string fleet = "profiles: [{count: 3, base_type: q4_0}]\n";
  auto a = Run(Yaml(fleet + "train: {local_steps: 2, batch: 4, learning_rate: 0.01}\n", plain));
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Run(Yaml(fleet + "train: {local_steps: 2, batch: 4, learning_rate: 0.01, compensation: cloq, compensation_rank: 2}\n", comp));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_LT(b->rounds.back().metrics.at("eval_loss"), b->rounds.front().metrics.at("eval_loss"));
  const auto ta = LoadTensors(plain + "/adapter.safetensors"), tb = LoadTensors(comp + "/adapter.safetensors");
  ASSERT_EQ(ta.size(), tb.size());
  double diff = 0;
  for (size_t i = 0; i < ta.size(); ++i) diff = std::max(diff, static_cast<double>(std::fabs(ta[i] - tb[i])));
  EXPECT_GT(diff, 1e-6);
  // A fleet of mixed precisions (profiles[].base_type), the low-bit clients compensated.
  auto c = Run(Yaml("profiles: [{name: q8, count: 1, base_type: q8_0}, {name: low, count: 2, base_type: q4_0}]\n"
                    "train: {local_steps: 2, batch: 4, learning_rate: 0.01, compensation: svd, compensation_rank: 2}\n",
                    testing::TempPath("sim_mixed_bases")));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rounds.back().metrics.at("accepted"), 3);
}

// train.compensation_cache: the simulation keeps its compensated bases on disk and a second run
// reads them back (the same file, not rewritten: same inode, its time refreshed as the cache's
// least-recently-used order wants) and trains the same adapter.
TEST_F(SimTest, ACompensationCacheIsReadBackByTheNextRun) {
  namespace fs = std::filesystem;
  const std::string cache = testing::TempPath("sim_compensation_cache");
  const std::string yaml = "profiles: [{count: 3, base_type: q4_0}]\ntrain: {local_steps: 2, batch: 4, learning_rate: 0.01, compensation: cloq, "
                           "compensation_rank: 2, compensation_cache: " + cache + "}\n";
  const std::string first = testing::TempPath("sim_cache_run1"), second = testing::TempPath("sim_cache_run2");
  ASSERT_TRUE(Run(Yaml(yaml, first)).ok());
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(cache)) files.push_back(e.path());
  ASSERT_EQ(files.size(), 1u);
  struct stat before {};
  ASSERT_EQ(stat(files[0].c_str(), &before), 0);
  fs::last_write_time(files[0], fs::file_time_type::clock::now() - std::chrono::hours(24));
  ASSERT_TRUE(Run(Yaml(yaml, second)).ok());
  struct stat after {};
  ASSERT_EQ(stat(files[0].c_str(), &after), 0);
  EXPECT_EQ(after.st_ino, before.st_ino) << "the cached base was rewritten, not read";
  EXPECT_GT(fs::last_write_time(files[0]), fs::file_time_type::clock::now() - std::chrono::hours(1)) << "a hit refreshes its time";
  EXPECT_EQ(LoadTensors(first + "/adapter.safetensors"), LoadTensors(second + "/adapter.safetensors"));
  // The key needs the compensation it keeps (the coordinator refuses it: workers keep their own,
  // SimulateEqualsDeployedTest.KeysTheDeployedRunnerCannotHonourAreRefusedByName).
  auto bad = Run(Yaml("train: {compensation_cache: " + cache + "}\n", testing::TempPath("sim_cache_bad")));
  EXPECT_NE(bad.status().message().find("train.compensation_cache"), std::string::npos) << bad.status();
}

// Per-worker ranks (issue 22): clients of ranks 1, 2 and 4 (the shared rank) train one adapter
// under each merge rule; every update is accepted, the held-out loss falls, the adapter keeps
// the shared rank.
TEST_F(SimTest, ClientsOfDifferentRanksTrainOneAdapterUnderEveryRule) {
  const std::string fleet = "profiles: [{name: r1, count: 1, rank: 1}, {name: r2, count: 1, rank: 2}, {name: r4, count: 1}]\n";
  for (const std::string kind : {"LORA", "FFA_LORA"})
    for (const std::string rule : {"nested", "zero_pad", "flexlora"}) {
      if (kind == "FFA_LORA" && rule == "flexlora") continue;  // refused: nested is exact there
      const std::string out = testing::TempPath("sim_ranks_" + kind + "_" + rule);
      auto r = Run(Yaml(fleet + "adapter: {kind: " + kind + ", rank: 4, alpha: 8}\nstrategy: {hetero_rank: " + rule + "}\n", out));
      ASSERT_TRUE(r.ok()) << kind << " " << rule << ": " << r.status();
      const auto& last = r->rounds.back().metrics;
      EXPECT_EQ(last.at("accepted"), 3) << kind << " " << rule;
      EXPECT_EQ(last.at("hetero_rank_clients"), 2) << kind << " " << rule;
      EXPECT_LT(last.at("eval_loss"), r->rounds.front().metrics.at("eval_loss")) << kind << " " << rule;
      if (rule == "flexlora") {  // ranks 1 + 2 + 4 = 7 > 4: the re-factored sum drops its smallest components
        EXPECT_GT(last.at("hetero_truncation"), 0);
        EXPECT_LT(last.at("hetero_truncation"), 1);
      }
      for (const auto& [name, v] : r->global) EXPECT_EQ(v.size() % 4, 0u) << name;  // rank 4 x a width
    }
}

// DiaBlo block subsets (issue 22): clients training 1, 2 and all 4 diagonal blocks of every
// module train one adapter under each rule; their smaller uploads are accepted (a client that
// sent more blocks than its share would be refused), the held-out loss falls; the planner and
// flexlora are refused for DiaBlo with the reason.
TEST_F(SimTest, DiabloClientsTrainingFewerBlocksTrainOneAdapter) {
  const std::string fleet = "profiles: [{name: b1, count: 1, blocks: 1}, {name: b2, count: 1, blocks: 2}, {name: b4, count: 1}]\n";
  for (const std::string rule : {"nested", "zero_pad"}) {
    const std::string out = testing::TempPath("sim_blocks_" + rule);
    auto r = Run(Yaml(fleet + "adapter: {kind: DIABLO, blocks: 4}\nstrategy: {hetero_rank: " + rule + "}\n", out));
    ASSERT_TRUE(r.ok()) << rule << ": " << r.status();
    const auto& last = r->rounds.back().metrics;
    EXPECT_EQ(last.at("accepted"), 3) << rule;
    EXPECT_EQ(last.at("hetero_rank_clients"), 2) << rule;
    EXPECT_LT(last.at("eval_loss"), r->rounds.front().metrics.at("eval_loss")) << rule;
  }
  auto flex = Run(Yaml(fleet + "adapter: {kind: DIABLO, blocks: 4}\nstrategy: {hetero_rank: flexlora}\n", testing::TempPath("sim_blocks_flex")));
  EXPECT_NE(flex.status().message().find("flexlora needs adapter.kind lora"), std::string::npos) << flex.status();
  auto too_many = Run(Yaml("profiles: [{count: 1, blocks: 5}, {count: 2}]\nadapter: {kind: DIABLO, blocks: 4}\n", testing::TempPath("sim_blocks_5")));
  EXPECT_NE(too_many.status().message().find("adapter.blocks = 4"), std::string::npos) << too_many.status();
  // The window rolls (protocol::FirstBlock) and the three clients of a round take consecutive
  // windows (AdapterPlan::block_offset 0, 1, 2): round 1 moves blocks 0-2, and after 4 rounds
  // every block of every module has trained (DiaBlo starts at 0; without the offsets all three
  // would train block 0 in round 1).
  for (int rounds : {1, 4}) {
    auto one = Run(Yaml("profiles: [{count: 3, blocks: 1}]\nadapter: {kind: DIABLO, blocks: 4}\nrounds: " + std::to_string(rounds) + "\n",
                        testing::TempPath("sim_blocks_roll" + std::to_string(rounds))));
    ASSERT_TRUE(one.ok()) << one.status();
    for (const auto& [name, v] : one->global) {
      const size_t block = v.size() / 4;
      for (size_t b = 0; b < 4; ++b) {
        double moved = 0;
        for (size_t i = b * block; i < (b + 1) * block; ++i) moved = std::max(moved, static_cast<double>(std::fabs(v[i])));
        EXPECT_EQ(moved > 0, static_cast<int>(b) < std::min(4, rounds + 2)) << name << " block " << b << " after " << rounds << " rounds";
      }
    }
  }
  auto rank_for_diablo = Run(Yaml("profiles: [{count: 1, rank: 2}, {count: 2}]\nadapter: {kind: DIABLO, blocks: 4}\n", testing::TempPath("sim_blocks_rank")));
  EXPECT_NE(rank_for_diablo.status().message().find("profiles[].blocks"), std::string::npos) << rank_for_diablo.status();
}

// A client whose memory cannot hold the configured task declines it every round (with the
// reason in the ledger's per-client outcome); the others train and the run finishes.
TEST_F(SimTest, AClientOverItsMemoryDeclinesAndTheRunGoesOn) {
  const std::string out = testing::TempPath("sim_decline");
  auto r = Run(Yaml("profiles: [{name: big, count: 2}, {name: toaster, count: 1, memory_mib: 4}]\n", out));
  ASSERT_TRUE(r.ok()) << r.status();
  for (const auto& rec : r->rounds) {
    if (rec.round == 0) continue;
    EXPECT_EQ(rec.metrics.at("accepted"), 2);
    EXPECT_EQ(rec.metrics.at("declined"), 1);
  }
  EXPECT_LT(r->rounds.back().metrics.at("eval_loss"), r->rounds.front().metrics.at("eval_loss"));
}

TEST_F(SimTest, PlannerGivesEachClientItsPlanAndLeavesOutOneTooSmall) {
  const std::string out = testing::TempPath("sim_plan");
  auto r = Run(Yaml("profiles: [{name: fast, count: 1, speed: 1, memory_mib: 4000}, {name: slow, count: 1, speed: 0.125, memory_mib: 4000},"
                    " {name: toaster, count: 1, memory_mib: 1}]\nplanner: {enabled: true, calibration_steps: 1, base_types: [q8_0, q4_0]}\n",
                    out));
  ASSERT_TRUE(r.ok()) << r.status();
  // The calibration timed training on q4_0 against the stored q8_0 (issue 22), into plan.json.
  auto plan = ReadFileToString(out + "/plan.json");
  ASSERT_TRUE(plan.ok());
  const auto pj = nlohmann::json::parse(*plan);
  ASSERT_TRUE(pj.contains("base_speed")) << *plan;
  EXPECT_GT(pj.at("base_speed").at("Q4_0").get<double>(), 0);
  EXPECT_FALSE(pj.at("base_speed").contains("Q8_0"));  // the stored type: the reference
  EXPECT_GT(r->rounds.back().metrics.at("planned_round_seconds"), 0);
  EXPECT_EQ(r->rounds.back().metrics.at("accepted"), 2);  // the toaster never takes part
  auto ledger = federation::RunLedger::Open(out + "/ledger.sqlite");
  ASSERT_TRUE(ledger.ok());
  auto report = ReadFileToString(out + "/report.html");
  ASSERT_TRUE(report.ok());
  EXPECT_NE(report->find("<h2>Plan</h2>"), std::string::npos);
  EXPECT_NE(report->find("left out: the smallest configuration"), std::string::npos);
  EXPECT_NE(report->find("% of module importance"), std::string::npos);
}

// Per-layer adapter settings from the config: layer 0 adapts q and v at rank 2, layer 1 every
// module at rank 4; the merged adapter has exactly those tensors and shapes, and the planner
// refuses the combination it does not support.
TEST_F(SimTest, PerLayerAdapterSettingsFromTheConfig) {
  const std::string out = testing::TempPath("sim_layers");
  auto r = Run(Yaml("adapter: {kind: LORA, rank: 4, alpha: 8, layers: \"0:q,v:r2;1:all\"}\nrounds: 1\n", out));
  ASSERT_TRUE(r.ok()) << r.status();
  auto f = model::SafetensorsFile::Open(out + "/adapter.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  int layer0 = 0, layer1 = 0;
  for (const auto& t : (*f)->tensors()) {
    if (t.name.rfind("blk.0.", 0) == 0) {
      ++layer0;
      EXPECT_TRUE(t.name.find("attn_q") != std::string::npos || t.name.find("attn_v") != std::string::npos) << t.name;
      if (t.name.find("lora_a") != std::string::npos) {
        EXPECT_EQ(t.shape.front(), 2) << t.name;
      }
    } else if (t.name.rfind("blk.1.", 0) == 0) {
      ++layer1;
      if (t.name.find("lora_a") != std::string::npos) {
        EXPECT_EQ(t.shape.front(), 4) << t.name;
      }
    }
  }
  EXPECT_EQ(layer0, 4);   // q, v x (A, B)
  EXPECT_EQ(layer1, 14);  // 7 modules x (A, B)
  // The planner works over layouts; per-worker ranks do not (a layer's rank is the layout's).
  auto run = Run(Yaml("adapter: {kind: LORA, layers: \"0:q\"}\nplanner: {enabled: true, ranks: [4, 8]}\n", testing::TempPath("sim_layers_plan2")));
  EXPECT_FALSE(run.ok());
  EXPECT_NE(run.status().message().find("adapter.layers"), std::string::npos) << run.status();
  auto worse = Run(Yaml("adapter: {kind: LORA, layers: \"0-9:q\"}\nrounds: 1\n", testing::TempPath("sim_layers_bad")));
  EXPECT_FALSE(worse.ok()) << "a layer range beyond the model must be refused";
}

TEST_F(SimTest, AnExplicitRunDirectoryIsNeverOverwritten) {
  const std::string out = testing::TempPath("sim_twice");
  ASSERT_TRUE(Run(Yaml("rounds: 1\n", out)).ok());
  auto again = Run(Yaml("rounds: 1\n", out));
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(SimTest, SameSeedSameAdapter) {
  const std::string a = testing::TempPath("sim_a"), b = testing::TempPath("sim_b");
  ASSERT_TRUE(Run(Yaml("seed: 3\n", a)).ok());
  ASSERT_TRUE(Run(Yaml("seed: 3\n", b)).ok());
  EXPECT_EQ(*ReadFileToString(a + "/adapter.safetensors"), *ReadFileToString(b + "/adapter.safetensors"));
}

TEST_F(SimTest, TrainingLowersHeldOutLoss) {
  auto r = Run(Yaml("rounds: 3\n", testing::TempPath("sim_loss")));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_LT(r->rounds.back().metrics.at("eval_loss"), r->rounds.front().metrics.at("eval_loss"));
}

TEST_F(SimTest, DifferentialPrivacyStaysWithinTheTargetEpsilon) {
  auto r = Run(Yaml("dp: {enabled: true, target_epsilon: 8, clip_norm: 0.05}\n", testing::TempPath("sim_dp")));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->rounds.back().metrics.at("epsilon"), 1.0);
  EXPECT_LE(r->rounds.back().metrics.at("epsilon"), 8.0 + 1e-6);
}

// Secure aggregation changes nothing but the fixed-point rounding: same seeds, same adapter.
TEST_F(SimTest, SecureAggregationGivesThePlainResult) {
  const std::string a = testing::TempPath("sim_plain"), b = testing::TempPath("sim_secure");
  // One round: both runs start from the same global adapter, so the results differ only by the
  // stochastic fixed-point rounding (<= 5 clients x 2 x 0.05 / 2^22 per value). Over more rounds
  // local AdamW amplifies such differences in near-zero gradients into lr-sized steps.
  const std::string common = "clients: 5\nrounds: 1\nprofiles: [{count: 4}, {count: 1, dropout: 0.5}]\n";
  ASSERT_TRUE(Run(Yaml(common, a)).ok());
  auto r = Run(Yaml(common + "secure_aggregation: {enabled: true, value_range: 0.05}\n", b));
  ASSERT_TRUE(r.ok()) << r.status();
  auto sa = LoadTensors(a + "/adapter.safetensors"), sb = LoadTensors(b + "/adapter.safetensors");
  ASSERT_EQ(sa.size(), sb.size());
  double worst = 0, scale = 0;
  for (size_t i = 0; i < sa.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(sa[i] - sb[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(sa[i])));
  }
  EXPECT_GT(scale, 0);
  EXPECT_LT(worst, 1e-6) << "max |plain - secure| over " << sa.size() << " values";
  EXPECT_EQ(r->rounds.back().metrics.at("secagg_tampered_shares"), 0);
  // With central DP on top, the clients add the noise before masking.
  auto d = Run(Yaml(common + "secure_aggregation: {enabled: true}\ndp: {enabled: true, target_epsilon: 8, clip_norm: 0.05}\n"
                             "strategy: {min_clients: 4}\n",
                    testing::TempPath("sim_secure_dp")));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_GT(d->rounds.back().metrics.at("epsilon"), 0);
  EXPECT_LE(d->rounds.back().metrics.at("epsilon"), 8.0 + 1e-6);
  EXPECT_FALSE(d->stopped_early);
}

// Secure aggregation with per-worker shares (issue 22 item 4): lower ranks, DiaBlo windows and
// module shares, padded by each client before masking and weighted per value by the survivors
// that trained it (nested) or per module (zero_pad), give the plain run's adapter up to the
// fixed-point rounding. Shares that too few clients train to reach the threshold (6 clients: 4)
// are narrowed, or the partial ones sit out, whichever trains more; else whole adapters.
TEST_F(SimTest, SecureAggregationWithPerWorkerSharesGivesThePlainResult) {
  auto compare = [&](const std::string& name, const std::string& plain, const std::string& secure) -> double {
    const std::string a = testing::TempPath("sim_shares_plain_" + name), b = testing::TempPath("sim_shares_secure_" + name);
    auto p = Run(Yaml(plain, a));
    EXPECT_TRUE(p.ok()) << name << ": " << p.status();
    auto r = Run(Yaml(secure + "secure_aggregation: {enabled: true, value_range: 0.05}\n", b));
    EXPECT_TRUE(r.ok()) << name << ": " << r.status();
    if (!p.ok() || !r.ok()) return 1;
    EXPECT_EQ(r->rounds.back().metrics.at("accepted"), 6) << name;
    auto sa = LoadTensors(a + "/adapter.safetensors"), sb = LoadTensors(b + "/adapter.safetensors");
    EXPECT_EQ(sa.size(), sb.size()) << name;
    double worst = 0, scale = 0;
    for (size_t i = 0; i < std::min(sa.size(), sb.size()); ++i) {
      worst = std::max(worst, static_cast<double>(std::fabs(sa[i] - sb[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(sa[i])));
    }
    EXPECT_GT(scale, 0) << name;
    std::printf("%s: max |plain - secure| %.3g (max |value| %.3g)\n", name.c_str(), worst, scale);
    EXPECT_FALSE(r->rounds.back().metrics.count("secagg_whole_shares")) << name;
    return worst;
  };
  const std::string one = "clients: 6\nrounds: 1\n";
  const std::string ranks = one + "profiles: [{count: 2, rank: 2}, {count: 4}]\n";
  EXPECT_LT(compare("nested", ranks, ranks), 1e-6);
  EXPECT_LT(compare("zero_pad", ranks + "strategy: {hetero_rank: zero_pad}\n", ranks + "strategy: {hetero_rank: zero_pad}\n"), 1e-6);
  const std::string blocks = one + "adapter: {kind: DIABLO, blocks: 4}\nprofiles: [{count: 2, blocks: 2}, {count: 4}]\n";
  EXPECT_LT(compare("diablo", blocks, blocks), 1e-6);
  const std::string modules = one + "adapter: {kind: FFA_LORA, rank: 4, alpha: 8, target_modules: [q, v]}\nprofiles: [{count: 2, modules: q}, {count: 4}]\n";
  EXPECT_LT(compare("modules", modules, modules), 1e-6);
  // Components 2 and 3 would be trained by 3 < 4 clients: the three full-rank clients are
  // narrowed to rank 2 (6 clients x 2 components, as many (client, piece) pairs as the three
  // full-rank clients alone, and every client's data), as the plain run with everyone at rank 2.
  auto same_as = [&](const std::string& name, const std::string& plain, const std::string& secure) {
    const std::string a = testing::TempPath("sim_shares_plain_" + name), b = testing::TempPath("sim_shares_secure_" + name);
    EXPECT_TRUE(Run(Yaml(plain, a)).ok()) << name;
    auto r = Run(Yaml(secure + "secure_aggregation: {enabled: true, value_range: 0.05}\n", b));
    EXPECT_TRUE(r.ok()) << name << ": " << r.status();
    if (!r.ok()) return std::map<std::string, double>{};
    auto sa = LoadTensors(a + "/adapter.safetensors"), sb = LoadTensors(b + "/adapter.safetensors");
    EXPECT_EQ(sa.size(), sb.size()) << name;
    double worst = 0;
    for (size_t i = 0; i < std::min(sa.size(), sb.size()); ++i) worst = std::max(worst, static_cast<double>(std::fabs(sa[i] - sb[i])));
    EXPECT_LT(worst, 1e-6) << name;
    return r->rounds.back().metrics;
  };
  auto m3 = same_as("narrowed3", one + "profiles: [{count: 6, rank: 2}]\n", one + "profiles: [{count: 3, rank: 2}, {count: 3}]\n");
  EXPECT_EQ(m3["secagg_narrowed"], 3);
  EXPECT_EQ(m3["accepted"], 6);
  EXPECT_EQ(m3.count("secagg_sat_out"), 0u);
  EXPECT_EQ(m3.count("secagg_whole_shares"), 0u);
  // By 2 < 4 with only two full-rank clients (sitting out would leave fewer than 3): narrowed too.
  auto m2 = same_as("narrowed2", one + "profiles: [{count: 6, rank: 2}]\n", one + "profiles: [{count: 4, rank: 2}, {count: 2}]\n");
  EXPECT_EQ(m2["secagg_narrowed"], 2);
  EXPECT_EQ(m2["accepted"], 6);
  // Module shares that no module's threshold of clients train (q by two, v by two; 4 clients,
  // threshold 3): narrowing would leave nobody and sitting out too few: whole adapters, as the
  // plain run with every client on both modules.
  const std::string ffa = "clients: 4\nrounds: 1\nadapter: {kind: FFA_LORA, rank: 4, alpha: 8, target_modules: [q, v]}\n";
  auto mw = same_as("whole", ffa, ffa + "profiles: [{count: 2, modules: q}, {count: 2, modules: v}]\n");
  EXPECT_EQ(mw["secagg_whole_shares"], 1);
  EXPECT_EQ(mw.count("secagg_narrowed"), 0u);
  // Three at rank 1 and three at rank 4 (t = 4): narrowing would train 6 x 1 components per
  // module, the three full-rank clients alone 3 x 4: the three at rank 1 sit out.
  auto out = Run(Yaml(one + "profiles: [{count: 3, rank: 1}, {count: 3}]\nsecure_aggregation: {enabled: true, value_range: 0.05}\n",
                      testing::TempPath("sim_shares_sat_out")));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->rounds.back().metrics.at("secagg_sat_out"), 3);
  EXPECT_EQ(out->rounds.back().metrics.at("accepted"), 3);
  EXPECT_EQ(out->rounds.back().metrics.count("secagg_narrowed"), 0u);
}

// The planner under secure aggregation (issue 22): it plans batch, steps, base and shares per
// worker; here every worker fits the whole adapter (and with 4 clients, threshold 3, a share the
// two big workers alone trained could not be unmasked: the round would train whole adapters).
TEST_F(SimTest, ThePlannerUnderSecureAggregationPlansWholeAdapters) {
  const std::string out = testing::TempPath("sim_plan_secure");
  auto p = Run(Yaml("clients: 4\nrounds: 1\nadapter: {kind: FFA_LORA, rank: 4, alpha: 8, target_modules: [q, v, up]}\n"
                    "profiles: [{name: big, count: 2, memory_mib: 4000}, {name: slow, count: 2, speed: 0.125, memory_mib: 4000}]\n"
                    "planner: {enabled: true, calibration_steps: 1}\nsecure_aggregation: {enabled: true}\n",
                    out));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->rounds.back().metrics.at("accepted"), 4);
  auto plan = ReadFileToString(out + "/plan.json");
  ASSERT_TRUE(plan.ok());
  const auto pj = nlohmann::json::parse(*plan);  // (a named value: a range-for over a temporary's member would dangle)
  for (const auto& w : pj.at("workers")) EXPECT_EQ(w.at("modules").get<std::string>(), "q,v,up") << w.dump();
}

// The planner over a per-layer layout (issue 22 item 4): planned shares of the layout's modules,
// merged per module over the clients that trained them; plan.json lists each worker's share.
TEST_F(SimTest, ThePlannerPlansOverAPerLayerLayout) {
  const std::string out = testing::TempPath("sim_plan_layout");
  auto p = Run(Yaml("clients: 4\nrounds: 2\nadapter: {kind: LORA, rank: 4, alpha: 8, target_modules: [q, v, up], layers: '0:q:r2;1'}\n"
                    "profiles: [{name: big, count: 2, memory_mib: 4000}, {name: slow, count: 2, speed: 0.125, memory_mib: 4000}]\n"
                    "planner: {enabled: true, calibration_steps: 1}\n",
                    out));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->rounds.back().metrics.at("accepted"), 4);
  auto plan = ReadFileToString(out + "/plan.json");
  ASSERT_TRUE(plan.ok());
  const auto pj = nlohmann::json::parse(*plan);
  ASSERT_EQ(pj.at("workers").size(), 4u);
  for (const auto& w : pj.at("workers")) EXPECT_FALSE(w.at("modules").get<std::string>().empty()) << w.dump();
}

// Uncertainty-aware merging in its secure-aggregation form (clients mask Fisher-weighted deltas
// and the weights; the server divides the sums) equals the plain Fisher merge with the same
// public Fisher bound, up to the fixed-point rounding; and it differs from the plain mean.
TEST_F(SimTest, SecureUncertaintyAwareMergingGivesThePlainResult) {
  const std::string common = "clients: 4\nrounds: 1\nstrategy: {merge: uncertainty, fisher_clip: 1.0e-4}\n";
  const std::string a = testing::TempPath("sim_ua_plain"), b = testing::TempPath("sim_ua_secure"), c = testing::TempPath("sim_ua_mean");
  ASSERT_TRUE(Run(Yaml(common, a)).ok());
  auto r = Run(Yaml(common + "secure_aggregation: {enabled: true, value_range: 0.05}\n", b));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(Run(Yaml("clients: 4\nrounds: 1\nstrategy: {merge: mean}\nsecure_aggregation: {enabled: true, value_range: 0.05}\n", c)).ok());
  auto sa = LoadTensors(a + "/adapter.safetensors"), sb = LoadTensors(b + "/adapter.safetensors"), sc = LoadTensors(c + "/adapter.safetensors");
  ASSERT_EQ(sa.size(), sb.size());
  double worst = 0, scale = 0, vs_mean = 0;
  for (size_t i = 0; i < sa.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(sa[i] - sb[i])));
    vs_mean = std::max(vs_mean, static_cast<double>(std::fabs(sa[i] - sc[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(sa[i])));
  }
  EXPECT_GT(scale, 0);
  EXPECT_LT(worst, 1e-6) << "max |plain - secure| Fisher merge over " << sa.size() << " values";
  EXPECT_GT(vs_mean, 100 * worst) << "the Fisher merge must differ from the mean";
  std::printf("uncertainty-aware: max |plain - secure| %.3g, max |Fisher merge - mean| %.3g (max |value| %.3g)\n", worst, vs_mean, scale);
}

TEST_F(SimTest, LocalDpSgdReportsEachClientsEpsilon) {
  auto r = Run(Yaml("dp: {enabled: true, local: true, noise_multiplier: 1.0, clip_norm: 0.5}\nstrategy: {merge: uncertainty}\n",
                    testing::TempPath("sim_ldp")));
  ASSERT_TRUE(r.ok()) << r.status();
  const auto& m = r->rounds.back().metrics;
  EXPECT_GT(m.at("local_epsilon"), 0);
  EXPECT_EQ(m.count("epsilon"), 0u);
  EXPECT_GT(r->rounds[1].metrics.at("local_epsilon"), 0);
  EXPECT_GT(m.at("local_epsilon"), r->rounds[1].metrics.at("local_epsilon"));  // composes over rounds
  // With the planner (issue 22): per-client batches and steps, none costing more privacy than the
  // uniform configuration, so no client's epsilon exceeds the uniform run's largest.
  auto p = Run(Yaml("dp: {enabled: true, local: true, noise_multiplier: 1.0, clip_norm: 0.5}\n"
                    "profiles: [{name: fast, count: 1, speed: 1, memory_mib: 4000}, {name: slow, count: 2, speed: 0.25, memory_mib: 4000}]\n"
                    "planner: {enabled: true, calibration_steps: 1, batches: [1, 2, 4, 8], max_local_steps: 8}\n",
                    testing::TempPath("sim_ldp_plan")));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->rounds.back().metrics.at("accepted"), 3);
  EXPECT_GT(p->rounds.back().metrics.at("local_epsilon"), 0);
  EXPECT_LE(p->rounds.back().metrics.at("local_epsilon"), m.at("local_epsilon") * (1 + 1e-9));
}

// Per-worker ranks with local DP-SGD (issue 22): a rank-1 and a rank-2 client train their slices
// with clipped, noised gradients; privacy is per record, whatever the slice, so every client
// spends what the uniform run's clients spend with the same batch, steps and noise.
TEST_F(SimTest, ClientsOfDifferentRanksTrainWithLocalDpSgd) {
  const std::string dp = "dp: {enabled: true, local: true, noise_multiplier: 1.0, clip_norm: 0.5}\n";
  auto uniform = Run(Yaml(dp, testing::TempPath("sim_ldp_uniform")));
  auto ranks = Run(Yaml(dp + "profiles: [{name: r1, count: 1, rank: 1}, {name: r2, count: 1, rank: 2}, {name: r4, count: 1}]\n"
                             "adapter: {kind: FFA_LORA, rank: 4, alpha: 8}\n",
                        testing::TempPath("sim_ldp_ranks")));
  ASSERT_TRUE(uniform.ok()) << uniform.status();
  ASSERT_TRUE(ranks.ok()) << ranks.status();
  const auto& last = ranks->rounds.back().metrics;
  EXPECT_EQ(last.at("accepted"), 3);
  EXPECT_EQ(last.at("hetero_rank_clients"), 2);
  EXPECT_GT(last.at("local_epsilon"), 0);
  EXPECT_NEAR(last.at("local_epsilon"), uniform->rounds.back().metrics.at("local_epsilon"), 1e-9);
  for (const auto& [name, v] : ranks->global)
    for (float x : v) ASSERT_TRUE(std::isfinite(x)) << name;
  // The planner choosing ranks under local DP-SGD: no client above the uniform run's epsilon.
  auto planned = Run(Yaml(dp + "profiles: [{name: big, count: 1, memory_mib: 4000}, {name: slow, count: 2, speed: 0.25, memory_mib: 4000, bandwidth_mbps: 0.05}]\n"
                               "planner: {enabled: true, calibration_steps: 1, ranks: [1, 2, 4]}\n",
                          testing::TempPath("sim_ldp_ranks_plan")));
  ASSERT_TRUE(planned.ok()) << planned.status();
  EXPECT_EQ(planned->rounds.back().metrics.at("accepted"), 3);
  EXPECT_LE(planned->rounds.back().metrics.at("local_epsilon"), uniform->rounds.back().metrics.at("local_epsilon") * (1 + 1e-9));
  // Central DP with ranks stays refused with the reason.
  auto central = Run(Yaml("dp: {enabled: true, noise_multiplier: 1.0, clip_norm: 0.5}\nprofiles: [{count: 1, rank: 1}, {count: 2}]\n",
                          testing::TempPath("sim_cdp_ranks")));
  EXPECT_NE(central.status().message().find("central differential privacy"), std::string::npos) << central.status();
}

// The planner choosing ranks under secure aggregation (issue 22): three clients behind slow links
// plan low ranks; the three fast ones would plan rank 4, whose upper components only three (< the
// threshold, 4 of 6) would train, so the planner caps them at the slow ones' rank: the round
// engine has nothing to narrow and every client is accepted. Without secure aggregation the
// fast ones keep rank 4.
TEST_F(SimTest, PlannedRanksUnderSecureAggregationMeetTheThreshold) {
  const std::string fleet =
      "clients: 6\nrounds: 1\nprofiles: [{name: fast, count: 3, memory_mib: 4000}, {name: slow, count: 3, memory_mib: 4000, bandwidth_mbps: 0.05}]\n"
      "planner: {enabled: true, calibration_steps: 1, ranks: [1, 2, 4]}\n";
  auto plain = Run(Yaml(fleet, testing::TempPath("sim_plan_ranks_plain")));
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_EQ(plain->rounds.back().metrics.at("hetero_rank_clients"), 3) << "the slow clients should plan lower ranks, the fast ones rank 4";
  auto secure = Run(Yaml(fleet + "secure_aggregation: {enabled: true}\n", testing::TempPath("sim_plan_ranks_secure")));
  ASSERT_TRUE(secure.ok()) << secure.status();
  const auto& m = secure->rounds.back().metrics;
  EXPECT_EQ(m.at("accepted"), 6);
  EXPECT_EQ(m.count("secagg_narrowed"), 0u) << "the plan already met the threshold";
  EXPECT_EQ(m.count("secagg_sat_out"), 0u);
  EXPECT_EQ(m.at("hetero_rank_clients"), 6) << "the fast clients capped below rank 4 too";
  for (const auto& [name, v] : secure->global)
    for (float x : v) ASSERT_TRUE(std::isfinite(x)) << name;
}

TEST_F(SimTest, TextDomainsAreScoredByPerplexity) {
  const std::string out = testing::TempPath("sim_text");
  auto r = Run(Yaml("clients: 4\ndata: {tasks: [sentiment], text_domains: [GPL-3, Apache-2.0], examples_per_task: 40, eval_examples: 6, "
                    "max_len: 64, partition: BY_TASK}\n", out));
  ASSERT_TRUE(r.ok()) << r.status();
  const auto& first = r->rounds.front().metrics;
  const auto& last = r->rounds.back().metrics;
  EXPECT_GT(first.at("ppl_GPL-3"), 1.0);
  EXPECT_LT(last.at("ppl_GPL-3"), first.at("ppl_GPL-3"));
  EXPECT_EQ(last.count("acc_GPL-3"), 0u);
  EXPECT_EQ(last.count("acc_sentiment"), 1u);
  auto csv = ReadFileToString(out + "/metrics.csv");
  EXPECT_NE(csv->find("ppl_Apache-2.0"), std::string::npos);
}

// Central DP with clients_per_round below the population: Poisson selection from a CSPRNG, so
// round sizes vary, every drawn client is trained, nothing per client is published, and the
// strategy line states the sampling the accountant assumes.
TEST_F(SimTest, CentralDpSamplesClientsByPoissonAndWithholdsPerClientFigures) {
  auto r = Run(Yaml("clients: 40\nrounds: 6\ntrain: {stand_in: true}\nstrategy: {clients_per_round: 10}\n"
                    "dp: {enabled: true, noise_multiplier: 1.0, clip_norm: 0.5}\n"
                    "data: {tasks: [sentiment, extract], examples_per_task: 80, eval_examples: 2, max_len: 96}\n",
                    testing::TempPath("sim_poisson")));
  ASSERT_TRUE(r.ok()) << r.status();
  std::set<double> sizes;
  for (const auto& rec : r->rounds) {
    if (rec.round == 0) continue;
    sizes.insert(rec.metrics.at("accepted"));  // every drawn stand-in answers
    EXPECT_EQ(rec.metrics.count("train_loss"), 0u) << "a per-client figure published under DP";
    EXPECT_EQ(rec.metrics.count("num_examples"), 0u) << "the clients' counts published under DP";
    EXPECT_GT(rec.metrics.at("epsilon"), 0);
  }
  EXPECT_GT(sizes.size(), 1u) << "Poisson round sizes should vary";
}

// A worker's local DP-SGD ledger survives a restart: a new LocalPrivacy on the same file
// continues the count (the same epsilon as one that never stopped); an unreadable file is
// refused rather than silently restarting the count at zero.
// The error-feedback residual a worker keeps in its state directory: a later round starts from
// what the last one left, the same round again from what it started with, another run from zero;
// an older round never overwrites a newer state; an unusable file starts from zero (warned).
TEST(ErrorFeedbackTest, EachRoundStartsFromTheRightResidualAcrossRestarts) {
  const std::string path = testing::TempPath("ef_residual.safetensors");
  std::filesystem::remove(path);
  const aggregation::TensorMap in{{"blk.0.attn_q.lora_b", {1.0f, 2.0f}}}, out{{"blk.0.attn_q.lora_b", {3.0f, 4.0f}}};
  {
    worker::ErrorFeedback ef(path);
    EXPECT_TRUE(ef.For("run-a", 1).empty());
    ASSERT_TRUE(ef.Save("run-a", 2, in, out).ok());
    EXPECT_EQ(ef.For("run-a", 3), out);
  }
  worker::ErrorFeedback again(path);  // a restarted worker
  EXPECT_EQ(again.For("run-a", 3), out);
  EXPECT_EQ(again.For("run-a", 7), out);
  EXPECT_EQ(again.For("run-a", 2), in);  // round 2 trained again: from what it started with
  EXPECT_TRUE(again.For("run-a", 1).empty());
  EXPECT_TRUE(again.For("run-b", 3).empty());
  ASSERT_TRUE(again.Save("run-a", 1, out, in).ok());  // older: ignored
  EXPECT_EQ(worker::ErrorFeedback(path).For("run-a", 3), out);
  ASSERT_TRUE(again.Save("run-b", 1, {}, in).ok());  // a new run replaces it
  EXPECT_EQ(worker::ErrorFeedback(path).For("run-b", 2), in);
  EXPECT_TRUE(worker::ErrorFeedback(path).For("run-a", 3).empty());
  // Unusable files: garbage, no metadata, a tensor outside before/ and after/.
  ASSERT_TRUE(WriteFileAtomic(path, std::string("not a safetensors file")).ok());
  EXPECT_TRUE(worker::ErrorFeedback(path).For("run-b", 2).empty());
  model::SafetensorsWriter w;
  ASSERT_TRUE(w.AddF32("x", {1}, std::vector<float>{1.0f}).ok());
  ASSERT_TRUE(w.WriteFile(path).ok());
  EXPECT_TRUE(worker::ErrorFeedback(path).For("run-b", 2).empty());
  w.SetMetadata("fedtune.run_id", "run-b");
  w.SetMetadata("fedtune.round", "1");
  ASSERT_TRUE(w.WriteFile(path).ok());
  EXPECT_TRUE(worker::ErrorFeedback(path).For("run-b", 2).empty());
  // In memory only (no path): the same rules.
  worker::ErrorFeedback mem;
  ASSERT_TRUE(mem.Save("r", 4, in, out).ok());
  EXPECT_EQ(mem.For("r", 4), in);
  EXPECT_EQ(mem.For("r", 5), out);
}

// An update that does not count (refused by the coordinator, or not sent because the round
// closed): Discard rolls the residual back to what the round started with, so its compression
// error is not carried into later rounds with nothing of the update merged; kept across a
// restart; another run or round changes nothing.
TEST(ErrorFeedbackTest, AnUpdateThatDidNotCountIsRolledBack) {
  const std::string path = testing::TempPath("ef_discard.safetensors");
  std::filesystem::remove(path);
  const aggregation::TensorMap in{{"blk.0.attn_q.lora_b", {1.0f, 2.0f}}}, out{{"blk.0.attn_q.lora_b", {3.0f, 4.0f}}};
  worker::ErrorFeedback ef(path);
  ASSERT_TRUE(ef.Save("run-a", 2, in, out).ok());
  ASSERT_TRUE(ef.Discard("run-b", 2).ok());  // another run: nothing
  ASSERT_TRUE(ef.Discard("run-a", 1).ok());  // another round: nothing
  EXPECT_EQ(ef.For("run-a", 3), out);
  ASSERT_TRUE(ef.Discard("run-a", 2).ok());
  EXPECT_EQ(ef.For("run-a", 3), in);
  EXPECT_EQ(ef.For("run-a", 2), in);
  EXPECT_EQ(worker::ErrorFeedback(path).For("run-a", 3), in);  // a restarted worker
  worker::ErrorFeedback mem;
  ASSERT_TRUE(mem.Save("r", 4, in, out).ok());
  ASSERT_TRUE(mem.Discard("r", 4).ok());
  EXPECT_EQ(mem.For("r", 5), in);
}

TEST(LocalPrivacyTest, TheLedgerPersistsAcrossRestartsAndACorruptFileIsRefused) {
  const std::string dir = testing::TempPath("local_privacy");
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/local_privacy.json";
  protocol::TrainTask t;
  t.batch = 4;
  t.local_steps = 3;
  t.local_dp_noise = 1.0;
  worker::LocalPrivacy uninterrupted;
  double e_uninterrupted = 0, e_restarted = 0;
  {
    worker::LocalPrivacy first(path);
    for (int r = 1; r <= 2; ++r) {
      t.round = r;
      ASSERT_TRUE(first.Record(t, 100).ok());
      e_uninterrupted = *uninterrupted.Record(t, 100);
    }
  }
  worker::LocalPrivacy restarted(path);
  t.round = 3;
  auto e = restarted.Record(t, 100);
  ASSERT_TRUE(e.ok()) << e.status();
  e_restarted = *e;
  const double e3 = *uninterrupted.Record(t, 100);
  EXPECT_GT(e3, e_uninterrupted);
  EXPECT_NEAR(e_restarted, e3, 1e-9 * e3);
  ASSERT_TRUE(WriteFileAtomic(path, std::string("{not json")).ok());
  worker::LocalPrivacy corrupt(path);
  EXPECT_EQ(corrupt.Record(t, 100).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(SimTest, StandInClientsMeasureServerOverhead) {
  auto r = Run(Yaml("clients: 60\ntrain: {stand_in: true}\nstrategy: {clients_per_round: 50, merge: uncertainty}\n"
                    "data: {tasks: [sentiment, extract], examples_per_task: 60, eval_examples: 2, max_len: 96}\n",
                    testing::TempPath("sim_standin")));
  ASSERT_TRUE(r.ok()) << r.status();
  const auto& m = r->rounds.back().metrics;
  EXPECT_EQ(m.at("accepted"), 50);
  EXPECT_GE(m.at("overhead_seconds"), 0);
  EXPECT_GT(m.at("bytes_up"), 0);
  // Stand-in clients of a lower rank send updates of their rank (accepted, padded by the server).
  auto ranked = Run(Yaml("train: {stand_in: true}\nadapter: {kind: LORA, rank: 4, alpha: 8}\nstrategy: {hetero_rank: flexlora}\n"
                         "profiles: [{count: 2, rank: 2}, {count: 1}]\n",
                         testing::TempPath("sim_standin_ranks")));
  ASSERT_TRUE(ranked.ok()) << ranked.status();
  EXPECT_EQ(ranked->rounds.back().metrics.at("accepted"), 3);
}

TEST_F(SimTest, BadConfigsFailBeforeAnyWorkNamingTheKey) {
  auto expect = [&](const std::string& extra, const std::string& key) {
    absl::Status st = Check(Yaml(extra, "/tmp/never"));
    EXPECT_FALSE(st.ok()) << extra;
    EXPECT_NE(std::string(st.message()).find(key), std::string::npos) << st.message();
  };
  expect("colour: blue\n", "colour");
  expect("strategy: {clients_per_round: 9}\n", "strategy.clients_per_round");
  expect("strategy: {merge: average}\n", "strategy.merge");
  expect("data: {tasks: [poetry]}\n", "data.tasks");
  expect("data: {text_domains: [NO-SUCH-LICENSE]}\n", "data.text_domains");
  expect("data: {files: [/no/such/file.jsonl]}\n", "data.files");
  expect("profiles: [{count: 2}]\n", "profiles");
  expect("dp: {enabled: true, target_epsilon: 0.000001}\n", "dp.target_epsilon");
  expect("dp: {enabled: true, target_epsilon: 8}\nstrategy: {merge: median}\n", "dp.enabled");
  expect("train: {base_type: q3_x}\n", "train.base_type");
  expect("train: {base_type: q4_0, compensation: gptq}\n", "train.compensation");
  expect("train: {base_type: q4_0, compensation: svd}\n", "train.compensation");  // profiles[].base_type instead
  expect("train: {base_type: q6_k}\n", "train.base_type");  // no quantizer for it
  expect("train: {compensation: svd}\n", "train.compensation");  // nothing re-quantized to compensate
  expect("profiles: [{count: 3, base_type: q4_0}]\ntrain: {compensation: svd, compensation_rank: -1}\n", "train.compensation_rank");
  expect("profiles: [{count: 3, base_type: q4_0}]\ntrain: {compensation: cloq, compensation_damping: -0.1}\n", "train.compensation_damping");
  expect("profiles: [{count: 3, base_type: q9_9}]\n", "profiles[0].base_type");
  expect("profiles: [{count: 3, base_type: q4_0}]\nplanner: {enabled: true}\n", "profiles[0].base_type");
  expect("train: {activation_budget_mib: 512}\nplanner: {enabled: true}\n", "train.activation_budget_mib");
  expect("train: {activation_budget_mib: -2}\n", "train.activation_budget_mib");
  expect("train: {device: tpu}\n", "train.device");
  expect("adapter: {kind: LORA, layers: \"0:q\"}\nplanner: {enabled: true, ranks: [4, 8]}\n", "adapter.layers");
  expect("strategy: {compression: int3}\n", "strategy.compression");
  expect("strategy: {compression: topk, topk_fraction: 1.5}\n", "strategy.topk_fraction");
  expect("strategy: {compression: int8}\nsecure_aggregation: {enabled: true}\n", "strategy.compression");
  expect("data: {tasks: [sum], holdout: 1.0}\n", "data.holdout");
  expect("eval: {generate_examples: -1}\n", "eval.generate_examples");
  expect("profiles: [{count: 3, rank: 9}]\n", "profiles[0].rank");
  expect("profiles: [{count: 3, rank: 2}]\ndp: {enabled: true, noise_multiplier: 1}\n", "profiles[0].rank");  // central DP
  expect("profiles: [{count: 3, rank: 2}]\nstrategy: {merge: median}\n", "profiles[0].rank");
  expect("profiles: [{count: 3, rank: 2}]\nstrategy: {hetero_rank: flexlora}\n", "strategy.hetero_rank");  // FFA-LoRA
  expect("profiles: [{count: 3, rank: 2}]\nadapter: {kind: LORA, rank: 4}\nstrategy: {hetero_rank: flexlora, server: fedadam}\n", "strategy.hetero_rank");
  expect("strategy: {hetero_rank: stacking}\n", "strategy.hetero_rank");
  expect("profiles: [{count: 3, modules: w}]\n", "profiles[0].modules");
  expect("adapter: {kind: FFA_LORA, rank: 4, alpha: 8, target_modules: [q, v]}\nprofiles: [{count: 3, modules: down}]\n", "profiles[0].modules");
  expect("profiles: [{count: 3, modules: q}]\nplanner: {enabled: true}\n", "profiles[0].modules");
  expect("profiles: [{count: 3, modules: q}]\nsecure_aggregation: {enabled: true}\ndp: {enabled: true, target_epsilon: 8, clip_norm: 0.05}\n",
         "profiles[0].modules");
  expect("profiles: [{count: 3, rank: 2}, {count: 3}]\nsecure_aggregation: {enabled: true}\nstrategy: {hetero_rank: flexlora}\n",
         "strategy.hetero_rank");
  expect("planner: {enabled: true, ranks: [2, 8]}\n", "planner.ranks");
  expect("planner: {enabled: true, ranks: [2]}\n", "planner.ranks");  // must include adapter.rank (4)
  expect("adapter: {kind: DIABLO}\nplanner: {enabled: true, ranks: [2]}\n", "planner.ranks");
  proto::SimulationConfig c;
  ASSERT_TRUE(LoadConfigYaml("model: {path: /no/model.gguf}\nclients: 2\nrounds: 1\ndata: {tasks: [sum]}\n", &c, "t").ok());
  absl::Status st = ValidateConfig(c);
  EXPECT_NE(std::string(st.message()).find("model.path"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace fedtune::sim

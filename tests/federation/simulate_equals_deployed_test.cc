// issue 16: one round engine. The same config runs as `fedtune simulate` (virtual clients, one
// data file each) and as a deployed coordinator with three worker daemons over mutual TLS on
// loopback (workers named like the simulated clients, each with the same file): the final global
// adapters agree within 1e-6 for FedAvg, FedAdam, uncertainty-aware merging and central DP (noise
// from a seeded test stream). A deployed run stopped after a committed round and restarted
// continues exactly (FedAdam moments and the privacy ledger are durable) and ends where the
// simulation ends, with epsilon equal to the accountant's value for the committed rounds.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <limits>
#include <regex>
#include <thread>

#include "common/config_loader.h"
#include "common/mapped_file.h"
#include "coordinator/provision.h"
#include "coordinator/server.h"
#include "coordinator/service_config.h"
#include "federation/run_ledger.h"
#include "model/tasks.h"
#include "privacy/ledger.h"
#include "sim/simulation.h"
#include "tests/support/processes.h"
#include "tests/support/tiny_model.h"
#include "worker/client.h"
#include "worker/daemon.h"
#include "worker/error_feedback.h"

namespace fedtune {
namespace {

namespace fs = std::filesystem;

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

class SimulateEqualsDeployedTest : public ::testing::Test {
 protected:
  static constexpr int kClients = 3;
  void SetUp() override {
    dir_ = testing::TempPath("sim_vs_deployed");
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    model_path_ = dir_ + "/tiny.gguf";
    testing::TinyModelOptions mo;
    mo.n_ctx = 256;
    ASSERT_TRUE(testing::WriteTinyLlamaGguf(model_path_, mo).ok());
    model_ = std::move(*model::LlamaModel::Load(model_path_));
    pki_ = dir_ + "/pki";
    for (int k = 0; k < kClients; ++k) names_.push_back("client-00" + std::to_string(k));
    ASSERT_TRUE(coordinator::Provision({pki_, {}, names_, 30, false}).ok());
    for (int k = 0; k < kClients; ++k) {
      auto lines = *model::GenerateTask(k == 1 ? "record" : "sentiment", 10 + 4 * k, 300 + static_cast<uint64_t>(k));
      std::string jsonl;
      for (const auto& l : lines) jsonl += l + "\n";
      files_.push_back(dir_ + "/" + names_[static_cast<size_t>(k)] + ".jsonl");
      ASSERT_TRUE(WriteFileAtomic(files_.back(), jsonl).ok());
      model::DatasetOptions d;  // as `fedtune worker` loads its data
      d.holdout = 0;
      d.max_len = 96;
      auto ds = model::LoadDataset(files_.back(), *model_->tokenizer(), d);
      ASSERT_TRUE(ds.ok()) << ds.status();
      data_.push_back(std::move(ds->train));
    }
  }

  // The keys both runners share.
  std::string Common(const std::string& extra) const {
    return "model: {path: " + model_path_ +
           "}\nadapter: {kind: FFA_LORA, rank: 4, alpha: 8, target_modules: [q, v]}\nseed: 11\nadapter_seed: 5\n"
           "train: {local_steps: 2, batch: 4, learning_rate: 1.0e-2}\n" +
           extra;
  }

  absl::StatusOr<aggregation::TensorMap> Simulate(const std::string& extra, int rounds, const std::string& name) const {
    std::string files;
    for (const auto& f : files_) files += (files.empty() ? "" : ", ") + f;
    proto::SimulationConfig c;
    FT_RETURN_IF_ERROR(LoadConfigYaml(Common(extra) + "clients: " + std::to_string(kClients) + "\nrounds: " + std::to_string(rounds) +
                                          "\ndata: {client_files: [" + files + "], max_len: 96}\noutput_dir: " + dir_ + "/sim-" + name + "\n",
                                      &c, "sim"));
    c.mutable_train()->set_device("cpu-fast");  // the kernels of the deployed workers here (ModelTaskRunner, no backend)
    sim::SimOptions o;
    o.progress = false;
    FT_ASSIGN_OR_RETURN(sim::SimulationResult r, sim::RunSimulation(c, o));
    return r.global;
  }

  absl::StatusOr<std::unique_ptr<coordinator::Service>> Service(const std::string& extra, int rounds, const std::string& state) const {
    proto::CoordinatorConfig c;
    FT_RETURN_IF_ERROR(LoadConfigYaml(Common(extra) + "listen: 127.0.0.1:0\ntls: {ca: " + pki_ + "/ca.pem, cert: " + pki_ +
                                          "/coordinator.pem, key: " + pki_ + "/coordinator.key}\ntokens: " + pki_ +
                                          "/tokens.sha256\nstate_dir: " + state + "\nrounds: " + std::to_string(rounds) +
                                          "\nmin_workers: 3\ndeadline_seconds: 120\n",
                                      &c, "coordinator"));
    return coordinator::ServiceFromConfig(c);
  }

  worker::DaemonOptions Daemon(int k, int port) const {
    worker::DaemonOptions d;
    const std::string w = pki_ + "/workers/" + names_[static_cast<size_t>(k)];
    d.address = "localhost:" + std::to_string(port);
    d.ca_pem = pki_ + "/ca.pem";
    d.cert_pem = w + ".pem";
    d.key_pem = w + ".key";
    d.token = Trim(*ReadFileToString(w + ".token"));
    d.poll_ms = 200;
    d.quiet = true;
    return d;
  }

  // Runs the workers against `server` until it is done (or `stop_after` rounds are committed,
  // then shuts it down); returns the committed rounds.
  int Serve(coordinator::CoordinatorServer& server, int stop_after = 0, int drop_after_masking = -1,
            const std::vector<std::vector<model::Example>>* eval = nullptr) const {
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int k = 0; k < kClients; ++k)
      threads.emplace_back([&, k] {
        worker::DaemonOptions d = Daemon(k, server.port());
        d.drop_after_masking = k == drop_after_masking;
        d.profile.set_num_examples(static_cast<int64_t>(data_[static_cast<size_t>(k)].size()));  // as MeasureProfile reports it
        worker::TaskEvaluator evaluator;
        if (eval) {
          d.profile.set_eval_examples(static_cast<int64_t>((*eval)[static_cast<size_t>(k)].size()));
          evaluator = worker::ModelTaskEvaluator(*model_, (*eval)[static_cast<size_t>(k)]);
        }
        auto r = worker::RunDaemon(d, worker::ModelTaskRunner(*model_, data_[static_cast<size_t>(k)]), stop, evaluator);
        EXPECT_TRUE(r.ok()) << r.status();
        if (eval && r.ok()) {
          EXPECT_GE(r->evaluations, 1) << k;
        }
      });
    if (stop_after > 0) {
      while (server.last_committed_round() < stop_after) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      server.Shutdown();
    }
    const absl::Status st = server.Wait();
    EXPECT_TRUE(st.ok() || (stop_after > 0 && absl::IsCancelled(st))) << st;
    stop = true;
    for (auto& t : threads) t.join();
    return server.last_committed_round();
  }

  absl::StatusOr<aggregation::TensorMap> Deploy(const std::string& extra, int rounds, const std::string& name, int drop_after_masking = -1) const {
    FT_ASSIGN_OR_RETURN(auto svc, Service(extra, rounds, dir_ + "/state-" + name));
    FT_ASSIGN_OR_RETURN(auto server, coordinator::CoordinatorServer::Start(svc->options));
    EXPECT_EQ(Serve(*server, 0, drop_after_masking), rounds);
    return server->global();
  }

  static void ExpectSame(const aggregation::TensorMap& sim, const aggregation::TensorMap& deployed, const std::string& what) {
    ASSERT_EQ(sim.size(), deployed.size()) << what;
    double worst = 0, scale = 0;
    for (const auto& [name, v] : sim) {
      ASSERT_TRUE(deployed.count(name)) << what << ": " << name;
      ASSERT_EQ(deployed.at(name).size(), v.size()) << name;
      for (size_t i = 0; i < v.size(); ++i) {
        worst = std::max(worst, static_cast<double>(std::fabs(v[i] - deployed.at(name)[i])));
        scale = std::max(scale, static_cast<double>(std::fabs(v[i])));
      }
    }
    EXPECT_GT(scale, 0) << what;
    EXPECT_LE(worst, 1e-6) << what << ": max |simulated - deployed| (max |value| " << scale << ")";
    std::printf("%s: max |simulated - deployed| = %.3g (max |value| %.3g)\n", what.c_str(), worst, scale);
  }

  void Compare(const std::string& extra, const std::string& name, int drop_after_masking = -1) {
    auto s = Simulate(extra, 2, name);
    ASSERT_TRUE(s.ok()) << s.status();
    auto d = Deploy(extra, 2, name, drop_after_masking);
    ASSERT_TRUE(d.ok()) << d.status();
    ExpectSame(*s, *d, name);
  }

  std::string dir_, model_path_, pki_;
  std::unique_ptr<model::LlamaModel> model_;
  std::vector<std::string> names_, files_;
  std::vector<std::vector<model::Example>> data_;
};

TEST_F(SimulateEqualsDeployedTest, FedAvg) { Compare("strategy: {merge: mean, server: fedavg}\n", "fedavg"); }

TEST_F(SimulateEqualsDeployedTest, FedAdam) { Compare("strategy: {server: fedadam, server_lr: 0.01}\n", "fedadam"); }

TEST_F(SimulateEqualsDeployedTest, UncertaintyAwareMerging) { Compare("strategy: {merge: uncertainty}\n", "uncertainty"); }

TEST_F(SimulateEqualsDeployedTest, CentralDp) {
  Compare("dp: {enabled: true, noise_multiplier: 0.8, clip_norm: 0.05}\ntest_noise_seed: 42\n", "central-dp");
}

// SecAgg+ over the wire: every selected worker agrees keys, masks its weighted update and the
// coordinator only learns the sum; worker 2 vanishes after uploading its masked input in every
// round, the other two reveal its self-mask shares, and the sum still holds its update (as in
// the simulation, where nobody drops). The sums differ from the simulation's only by the
// stochastic fixed-point rounding (2 x 0.1 / 2^22 per value and client).
TEST_F(SimulateEqualsDeployedTest, SecureAggregationWithAWorkerDroppingAfterMasking) {
  Compare("secure_aggregation: {enabled: true, value_range: 0.1, stage_seconds: 2}\n", "secagg", /*drop_after_masking=*/2);
}

// Uncertainty-aware merging under SecAgg+ (masked Fisher-weighted sums), simulated and deployed.
TEST_F(SimulateEqualsDeployedTest, SecureUncertaintyAwareMerging) {
  Compare("strategy: {merge: uncertainty}\nsecure_aggregation: {enabled: true, value_range: 0.1, stage_seconds: 20}\n", "secagg-uncertainty");
}

// Distributed DP under SecAgg+ in deployment: workers clip and add their share of the noise
// before masking; the coordinator accounts the round.
TEST_F(SimulateEqualsDeployedTest, SecureAggregationWithDistributedDpIsAccounted) {
  const std::string extra =
      "secure_aggregation: {enabled: true, stage_seconds: 20}\ndp: {enabled: true, noise_multiplier: 0.8, clip_norm: 0.05}\n";
  auto d = Deploy(extra, 2, "secagg-dp");
  ASSERT_TRUE(d.ok()) << d.status();
  auto ledger = federation::RunLedger::Open(dir_ + "/state-secagg-dp/ledger.sqlite");
  ASSERT_TRUE(ledger.ok());
  privacy::PrivacyLedger want(0, 1e-5);
  for (int r = 1; r <= 2; ++r) ASSERT_TRUE(want.Record({"", 1.0, 0.8, 1}).ok());
  auto eps = (*ledger)->Metric(2, "epsilon");
  ASSERT_TRUE(eps.ok()) << eps.status();
  EXPECT_DOUBLE_EQ(*eps, want.Spent()->epsilon);
  auto survivors = (*ledger)->Metric(2, "secagg_survivors");
  ASSERT_TRUE(survivors.ok());
  EXPECT_EQ(*survivors, 3);
}

// Federated evaluation: every worker with held-out data of its own scores the global adapter
// after each round (EVALUATE tasks); the coordinator records the example-weighted mean. Checked
// against each worker's own scores of the final adapter, computed here.
TEST_F(SimulateEqualsDeployedTest, FederatedEvaluationByTheWorkers) {
  std::vector<std::vector<model::Example>> eval;
  for (int k = 0; k < kClients; ++k) {
    auto lines = *model::GenerateTask(k == 1 ? "record" : "sentiment", 3 + k, 900 + static_cast<uint64_t>(k));
    model::DatasetOptions d;
    d.holdout = 0;
    d.max_len = 96;
    eval.push_back(std::move(model::DatasetFromJsonl(lines, "heldout", *model_->tokenizer(), d)->train));
  }
  auto svc = Service("eval: {max_new_tokens: 4}\nhttp: 127.0.0.1:0\ndp: {enabled: true, noise_multiplier: 5, clip_norm: 1}\ntest_noise_seed: 3\n", 2,
                     dir_ + "/state-fedeval");
  ASSERT_TRUE(svc.ok()) << svc.status();
  auto server = coordinator::CoordinatorServer::Start((*svc)->options);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_EQ(Serve(**server, 0, -1, &eval), 2);
  // The dashboard, rendered by headless Chromium, shows held-out accuracy and epsilon per round.
  if (const std::string browser = testing::FindHeadlessChromium(); !browser.empty()) {
    const std::string scratch = dir_ + "/dashboard";
    fs::create_directories(scratch);
    auto shot = testing::RenderPage(browser, "http://127.0.0.1:" + std::to_string((*server)->http_port()) + "/", scratch);
    ASSERT_TRUE(shot.ok()) << shot.status();
    EXPECT_NE(shot->dom.find("data-charts-ready=\"yes\""), std::string::npos) << "Chart.js did not run";
    EXPECT_NE(shot->dom.find("<canvas id=\"accuracy\""), std::string::npos);
    EXPECT_NE(shot->dom.find("<th>accuracy</th><th>epsilon</th>"), std::string::npos);
    // Round 2's row ends with its accuracy (a percentage) and epsilon (a number).
    EXPECT_TRUE(std::regex_search(shot->dom, std::regex("<tr><td>2</td>.*<td>[0-9.]+%</td><td>[0-9]+\\.[0-9]{3}</td></tr>"))) << shot->dom;
  } else {
    std::printf("no headless Chromium: dashboard rendering not checked\n");
  }
  auto ledger = federation::RunLedger::Open(dir_ + "/state-fedeval/ledger.sqlite");
  ASSERT_TRUE(ledger.ok());
  auto all = (*ledger)->AllMetrics();
  ASSERT_TRUE(all.ok());
  const auto& m = all->at(2);
  ASSERT_TRUE(m.count("fed_eval_loss")) << "no federated evaluation recorded";
  EXPECT_EQ(m.at("fed_eval_clients"), 3);
  // The workers' own scores of the final adapter.
  worker::BaseModels bases(*model_, model_path_);
  double loss = 0, acc = 0, n = 0;
  for (int k = 0; k < kClients; ++k) {
    protocol::TrainTask t;
    t.plan.kind = "ffa_lora";
    t.plan.rank = 4;
    t.plan.alpha = 8;
    t.plan.modules = {"q", "v"};
    t.plan.adapter_seed = 5;
    t.max_new_tokens = 4;
    auto r = worker::RunEvalTask(bases, eval[static_cast<size_t>(k)], t, (*server)->global(), nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    loss += r->metrics.at("eval_loss") * static_cast<double>(r->num_examples);
    acc += r->metrics.at("accuracy") * static_cast<double>(r->num_examples);
    n += static_cast<double>(r->num_examples);
  }
  EXPECT_NEAR(m.at("fed_eval_loss"), loss / n, 1e-9);
  EXPECT_NEAR(m.at("fed_accuracy"), acc / n, 1e-9);
  EXPECT_NEAR(m.at("eval_loss"), loss / n, 1e-9) << "without server-side evaluation the federated figures are the round's";
}

// Compressed uploads with error feedback (issue 21): the workers' residuals carry across rounds as
// the simulated clients' do, and the coordinator decodes exactly what the simulation aggregates.
TEST_F(SimulateEqualsDeployedTest, Int4CompressedUpdatesWithErrorFeedback) {
  Compare("strategy: {merge: mean, compression: int4}\n", "int4");
  // Compression did happen: another adapter than the plain run's, about 7x fewer bytes up
  // as the simulation counts them, and fewer as the coordinator received them (payload headers too).
  auto plain = Simulate("strategy: {merge: mean}\n", 2, "int4-plain");
  auto compressed = Simulate("strategy: {merge: mean, compression: int4}\n", 2, "int4-again");
  ASSERT_TRUE(plain.ok() && compressed.ok());
  EXPECT_NE(*plain, *compressed);
  auto bytes_up = [&](const std::string& db) {
    auto ledger = federation::RunLedger::Open(dir_ + "/" + db + "/ledger.sqlite");
    EXPECT_TRUE(ledger.ok()) << db;
    return ledger.ok() ? (*(*ledger)->AllMetrics()).at(1).at("bytes_up") : 0.0;
  };
  const double dense = bytes_up("sim-int4-plain"), simulated = bytes_up("sim-int4-again"), received = bytes_up("state-int4");
  std::printf("bytes up in round 1: plain %.0f, int4 simulated %.0f, int4 received by the coordinator %.0f\n", dense, simulated, received);
  EXPECT_GT(dense, 6.5 * simulated);
  EXPECT_GT(dense, 2.0 * received);  // this tiny adapter's payload header (~850 bytes per update) weighs in
  EXPECT_GE(received, simulated);
}
// Error feedback survives a worker restart: every worker process is stopped once round 1 is
// committed and started again (new runner, same state directory); with the residual kept there
// the deployed run still equals the simulation (which never restarts), without it it does not.
TEST_F(SimulateEqualsDeployedTest, ErrorFeedbackSurvivesWorkerRestarts) {
  const std::string extra = "strategy: {merge: mean, compression: int4}\n";
  auto sim = Simulate(extra, 3, "ef-restart");
  ASSERT_TRUE(sim.ok()) << sim.status();
  for (bool persist : {true, false}) {
    const std::string name = persist ? "ef-restart-kept" : "ef-restart-lost";
    auto svc = Service(extra, 3, dir_ + "/state-" + name);
    ASSERT_TRUE(svc.ok()) << svc.status();
    auto server = coordinator::CoordinatorServer::Start((*svc)->options);
    ASSERT_TRUE(server.ok()) << server.status();
    int restarted = 0;
    for (int life = 0; life < 2; ++life) {
      std::atomic<bool> stop{false};
      std::vector<std::thread> threads;
      for (int k = 0; k < kClients; ++k)
        threads.emplace_back([&, k] {
          worker::DaemonOptions d = Daemon(k, (*server)->port());
          d.state_dir = dir_ + "/" + name + "-worker" + std::to_string(k);
          d.profile.set_num_examples(static_cast<int64_t>(data_[static_cast<size_t>(k)].size()));
          auto r = worker::RunDaemon(d, worker::ModelTaskRunner(*model_, data_[static_cast<size_t>(k)], "", 0, nullptr, "", 0, false, nullptr, 0,
                                                                persist ? d.state_dir + "/error_feedback.safetensors" : ""), stop);
          EXPECT_TRUE(r.ok()) << r.status();
        });
      if (life == 0) {
        while ((*server)->last_committed_round() < 1) std::this_thread::sleep_for(std::chrono::milliseconds(5));
        stop = true;
        restarted = (*server)->last_committed_round();
      } else {
        EXPECT_TRUE((*server)->Wait().ok());
        stop = true;
      }
      for (auto& t : threads) t.join();
    }
    EXPECT_LT(restarted, 3);
    ASSERT_EQ((*server)->last_committed_round(), 3);
    const aggregation::TensorMap deployed = (*server)->global();
    if (persist) {
      ExpectSame(*sim, deployed, name);
      EXPECT_TRUE(fs::exists(dir_ + "/" + name + "-worker0/error_feedback.safetensors"));
    } else {
      double worst = 0;
      for (const auto& [n, v] : *sim)
        for (size_t i = 0; i < v.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(v[i] - deployed.at(n)[i])));
      std::printf("%s: max |simulated - deployed| = %.3g (the residual restarted at zero)\n", name.c_str(), worst);
      EXPECT_GT(worst, 1e-5);
    }
  }
}

// A compressed update the coordinator refuses (here: worker 0's round-2 update made undecodable,
// a non-finite int4 scale) does not carry its compression error forward: the worker rolls its
// residual back, so round 3 starts from the residual round 2 started with (the file says so),
// and the run finishes.
TEST_F(SimulateEqualsDeployedTest, ARefusedCompressedUpdateRollsTheResidualBack) {
  const std::string extra = "strategy: {merge: mean, compression: int4}\n";
  auto svc = Service(extra, 3, dir_ + "/state-ef-refused");
  ASSERT_TRUE(svc.ok()) << svc.status();
  auto server = coordinator::CoordinatorServer::Start((*svc)->options);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string path = dir_ + "/ef-refused-worker0/error_feedback.safetensors";
  std::string run_id;
  aggregation::TensorMap round2_start;
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int k = 0; k < kClients; ++k)
    threads.emplace_back([&, k] {
      worker::DaemonOptions d = Daemon(k, (*server)->port());
      d.state_dir = dir_ + "/ef-refused-worker" + std::to_string(k);
      d.profile.set_num_examples(static_cast<int64_t>(data_[static_cast<size_t>(k)].size()));
      worker::TaskRunner inner = worker::ModelTaskRunner(*model_, data_[static_cast<size_t>(k)], "", 0, nullptr, "", 0, false, nullptr, 0,
                                                         d.state_dir + "/error_feedback.safetensors");
      worker::TaskRunner runner = inner;
      if (k == 0) {
        runner = [&, inner](const protocol::TrainTask& task, const aggregation::TensorMap& global,
                            const std::function<void(double)>& progress) -> absl::StatusOr<worker::LocalResult> {
          auto r = inner(task, global, progress);
          if (r.ok() && task.round == 2) {
            run_id = task.run_id;
            round2_start = worker::ErrorFeedback(path).For(task.run_id, 2);
            EXPECT_NE(worker::ErrorFeedback(path).For(task.run_id, 3), round2_start);  // before the refusal: round 2's residual out
            for (auto& [name, c] : r->update.compressed)
              if (!c.scales.empty()) c.scales[0] = std::numeric_limits<float>::quiet_NaN();
          }
          return r;
        };
      }
      auto r = worker::RunDaemon(d, runner, stop);
      EXPECT_TRUE(r.ok()) << r.status();
    });
  EXPECT_TRUE((*server)->Wait().ok());
  stop = true;
  for (auto& t : threads) t.join();
  ASSERT_EQ((*server)->last_committed_round(), 3);
  ASSERT_FALSE(round2_start.empty());
  // Round 3 was trained from round 2's starting residual (the file now records round 3: its
  // `before` is what round 3 started from).
  EXPECT_EQ(worker::ErrorFeedback(path).For(run_id, 3), round2_start);
}

TEST_F(SimulateEqualsDeployedTest, TopKCompressedUpdates) {
  Compare("strategy: {merge: uncertainty, compression: topk, topk_fraction: 0.1}\n", "topk");
}

// Central DP with uncertainty-aware merging on a privatised Fisher (dp.private_fisher).
TEST_F(SimulateEqualsDeployedTest, CentralDpWithPrivateFisher) {
  Compare("strategy: {merge: uncertainty}\ndp: {enabled: true, noise_multiplier: 0.8, clip_norm: 0.05, private_fisher: true}\ntest_noise_seed: 42\n",
          "private-fisher");
}

TEST_F(SimulateEqualsDeployedTest, LocalDpSgdReportsEachWorkersEpsilon) {
  const std::string extra = "dp: {enabled: true, local: true, noise_multiplier: 1.0, clip_norm: 1.0}\n";
  auto svc = Service(extra, 2, dir_ + "/state-local");
  ASSERT_TRUE(svc.ok()) << svc.status();
  auto server = coordinator::CoordinatorServer::Start((*svc)->options);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_EQ(Serve(**server), 2);
  auto ledger = federation::RunLedger::Open(dir_ + "/state-local/ledger.sqlite");
  ASSERT_TRUE(ledger.ok());
  // The worst worker: the smallest data set (10 examples, batch 4), 2 rounds x 2 DP-SGD steps.
  privacy::PrivacyLedger want(0, 1e-5);
  for (int r = 1; r <= 2; ++r) ASSERT_TRUE(want.Record({"", 4.0 / 10.0, 1.0, 2}).ok());
  auto eps = (*ledger)->Metric(2, "local_epsilon");
  ASSERT_TRUE(eps.ok()) << eps.status();
  EXPECT_DOUBLE_EQ(*eps, want.Spent()->epsilon);
}

// The server's state is durable: a deployed FedAdam + central-DP run shut down after round 1 and
// restarted ends where the simulation ends, and its epsilon is the accountant's for 3 rounds.
TEST_F(SimulateEqualsDeployedTest, RestartedDeployedRunContinuesExactly) {
  const std::string extra = "strategy: {server: fedadam, server_lr: 0.01}\ndp: {enabled: true, noise_multiplier: 0.8, clip_norm: 0.05}\ntest_noise_seed: 7\n";
  auto sim = Simulate(extra, 3, "restart");
  ASSERT_TRUE(sim.ok()) << sim.status();
  const std::string state = dir_ + "/state-restart";
  {
    auto svc = Service(extra, 3, state);
    ASSERT_TRUE(svc.ok()) << svc.status();
    auto first = coordinator::CoordinatorServer::Start((*svc)->options);
    ASSERT_TRUE(first.ok()) << first.status();
    const int committed = Serve(**first, 1);
    EXPECT_GE(committed, 1);
    EXPECT_LT(committed, 3) << "the first coordinator must stop before the run ends";
  }
  auto svc = Service(extra, 3, state);
  ASSERT_TRUE(svc.ok()) << svc.status();
  auto second = coordinator::CoordinatorServer::Start((*svc)->options);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(Serve(**second), 3);
  ExpectSame(*sim, (*second)->global(), "restarted fedadam + central dp");
  auto ledger = federation::RunLedger::Open(state + "/ledger.sqlite");
  ASSERT_TRUE(ledger.ok());
  privacy::PrivacyLedger want(0, 1e-5);
  for (int r = 1; r <= 3; ++r) ASSERT_TRUE(want.Record({"", 1.0, 0.8, 1}).ok());
  auto eps = (*ledger)->Metric(3, "epsilon");
  ASSERT_TRUE(eps.ok()) << eps.status();
  EXPECT_DOUBLE_EQ(*eps, want.Spent()->epsilon);
  auto all = (*ledger)->AllMetrics();
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 3u) << "each round once";
}

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t n = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n);
  close(fd);
  return ntohs(a.sin_port);
}

// The fault drill: a `fedtune coordinator` process with FedAdam, SecAgg+ and distributed DP is
// killed with SIGKILL after dispatching round 1, while asking the survivors of round 2 to
// unmask, and between writing round 3's state and committing its ledger row (FEDTUNE_FAULT),
// and restarted each time on the same port; three worker daemons ride it out. The ledger then
// holds each of the 4 rounds once, epsilon equals the accountant's value for 4 releases (never
// less), and the final adapter equals the uninterrupted simulation of the same config
// (test_noise_seed makes the clients' noise and rounding reproducible; a re-run round adds the
// same noise, so nothing is released twice with different noise).
TEST_F(SimulateEqualsDeployedTest, FaultDrillKill9WithDpAndSecureAggregation) {
  const std::string extra =
      "strategy: {server: fedadam, server_lr: 0.01}\nsecure_aggregation: {enabled: true, value_range: 0.1, stage_seconds: 5}\n"
      "dp: {enabled: true, noise_multiplier: 0.8, clip_norm: 0.05}\ntest_noise_seed: 13\n";
  auto sim = Simulate(extra, 4, "drill");
  ASSERT_TRUE(sim.ok()) << sim.status();
  const int port = FreePort();
  const std::string state = dir_ + "/state-drill", yaml = dir_ + "/drill.yaml";
  ASSERT_TRUE(WriteFileAtomic(yaml, Common(extra) + "listen: 127.0.0.1:" + std::to_string(port) + "\ntls: {ca: " + pki_ + "/ca.pem, cert: " +
                                        pki_ + "/coordinator.pem, key: " + pki_ + "/coordinator.key}\ntokens: " + pki_ +
                                        "/tokens.sha256\nstate_dir: " + state + "\nrounds: 4\nmin_workers: 3\ndeadline_seconds: 60\n")
                  .ok());
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int k = 0; k < kClients; ++k)
    threads.emplace_back([&, k] {
      worker::DaemonOptions d = Daemon(k, port);
      d.max_backoff_ms = 300;
      d.profile.set_num_examples(static_cast<int64_t>(data_[static_cast<size_t>(k)].size()));
      auto r = worker::RunDaemon(d, worker::ModelTaskRunner(*model_, data_[static_cast<size_t>(k)]), stop);
      EXPECT_TRUE(r.ok()) << r.status();
    });
  int run = 0;
  for (const std::string fault : {"after-dispatch:1", "during-unmask:2", "before-ledger-commit:3", ""}) {
    const std::string log = dir_ + "/drill-" + std::to_string(run++) + ".log";
    std::vector<std::string> argv = {"/usr/bin/env"};
    if (!fault.empty()) argv.push_back("FEDTUNE_FAULT=" + fault);
    for (const char* a : {FEDTUNE_BINARY, "coordinator", "--config"}) argv.push_back(a);
    argv.push_back(yaml);
    auto pid = testing::Spawn(argv, log);
    ASSERT_TRUE(pid.ok()) << pid.status();
    auto rc = testing::WaitFor(*pid, 300);
    ASSERT_TRUE(rc.ok()) << rc.status();
    if (fault.empty()) {
      EXPECT_EQ(*rc, 0) << *ReadFileToString(log);
    } else {
      EXPECT_EQ(*rc, 128 + SIGKILL) << fault << ": " << *ReadFileToString(log);
      EXPECT_TRUE(testing::WaitForText(log, "FEDTUNE_FAULT: killing", 1)) << fault;
    }
  }
  stop = true;
  for (auto& t : threads) t.join();
  auto ledger = federation::RunLedger::Open(state + "/ledger.sqlite");
  ASSERT_TRUE(ledger.ok());
  auto all = (*ledger)->AllMetrics();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 4u) << "each round once";
  for (int r = 1; r <= 4; ++r) EXPECT_TRUE(all->count(r)) << r;
  privacy::PrivacyLedger want(0, 1e-5);
  for (int r = 1; r <= 4; ++r) ASSERT_TRUE(want.Record({"", 1.0, 0.8, 1}).ok());
  EXPECT_DOUBLE_EQ(all->at(4).at("epsilon"), want.Spent()->epsilon);
  aggregation::TensorMap deployed;
  ASSERT_TRUE(federation::LoadCommittedAdapter(state, 4, &deployed).ok());
  ExpectSame(*sim, deployed, "fault drill (FedAdam + SecAgg+ + distributed DP)");
}

TEST_F(SimulateEqualsDeployedTest, KeysTheDeployedRunnerCannotHonourAreRefusedByName) {
  auto expect = [&](const std::string& extra, const std::string& key) {
    auto svc = Service(extra, 2, dir_ + "/never");
    ASSERT_FALSE(svc.ok()) << extra;
    EXPECT_NE(std::string(svc.status().message()).find(key), std::string::npos) << svc.status();
  };
  expect("secure_aggregation: {enabled: true, stage_seconds: -1}\n", "secure_aggregation.stage_seconds");
  expect("secure_aggregation: {enabled: true}\nstrategy: {merge: median}\n", "secure_aggregation.enabled");
  expect("secure_aggregation: {enabled: true, threshold: 7}\n", "secure_aggregation");
  expect("train: {activation_budget_mib: 64}\n", "train.activation_budget_mib");
  expect("train: {device: cpu-bf16}\n", "train.device");
  expect("train: {compensation_cache: /tmp/x}\n", "train.compensation_cache");
  expect("dp: {enabled: true, local: true, target_epsilon: 3}\n", "dp.target_epsilon");
  expect("dp: {enabled: true, delta: 2}\n", "dp");
  expect("dp: {enabled: true, noise_multiplier: 1}\nstrategy: {merge: median}\n", "dp.enabled");
  expect("strategy: {clients_per_round: 9}\n", "strategy.clients_per_round");
  expect("eval: {per_client: true}\n", "eval.per_client");
}

}  // namespace
}  // namespace fedtune

// issue 5, criterion 1: a coordinator and 3 workers over mutual TLS on loopback run 3 rounds on
// a tiny model; the final adapter equals a plain in-process computation with the same seeds.
// Security: a certificate from another CA, and a valid certificate with a wrong token, are
// refused.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include "aggregation/fed_strategy.h"
#include "common/mapped_file.h"
#include "coordinator/http_status.h"
#include "coordinator/provision.h"
#include "coordinator/server.h"
#include "model/tasks.h"
#include "proto/service.grpc.pb.h"
#include "tests/support/tiny_model.h"
#include "worker/daemon.h"
#include "worker/local_trainer.h"

namespace fedtune {
namespace {

namespace fs = std::filesystem;

std::string Read(const std::string& p) { return *ReadFileToString(p); }
std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

class E2ETest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = testing::TempPath("e2e.gguf");
    testing::TinyModelOptions mo;
    mo.n_ctx = 256;
    ASSERT_TRUE(testing::WriteTinyLlamaGguf(path, mo).ok());
    model_ = std::move(*model::LlamaModel::Load(path));
    pki_ = testing::TempPath("e2e_pki");
    fs::remove_all(pki_);
    ASSERT_TRUE(coordinator::Provision({pki_, {}, {"w1", "w2", "w3"}, 30, false}).ok());
    for (int k = 0; k < 3; ++k) {
      auto lines = *model::GenerateTask("sentiment", 12, 100 + static_cast<uint64_t>(k));
      model::DatasetOptions d;
      d.holdout = 0;
      d.max_len = 96;
      data_.push_back(std::move(model::DatasetFromJsonl(lines, "t", *model_->tokenizer(), d)->train));
    }
    plan_.set_kind("ffa_lora");
    plan_.set_rank(4);
    plan_.set_alpha(8);
    plan_.set_blocks(4);
    plan_.add_modules("q");
    plan_.add_modules("v");
    plan_.set_adapter_seed(5);
    auto set = *model::MakeAdapters<float>(model_->adapter_dims(), Spec(), *model::ParseModules("q,v"), 5);
    initial_ = worker::AdapterTensors(set);
  }
  model::AdapterSpec Spec() const { return {model::AdapterKind::kFfaLora, 4, 8.0f, false, 4}; }
  coordinator::ServerOptions Options(const std::string& state) const {
    coordinator::ServerOptions o;
    o.ca_pem = pki_ + "/ca.pem";
    o.cert_pem = pki_ + "/coordinator.pem";
    o.key_pem = pki_ + "/coordinator.key";
    o.tokens_path = pki_ + "/tokens.sha256";
    o.state_dir = state;
    o.initial_global = initial_;
    o.plan = plan_;
    o.rounds = 3;
    o.min_workers = 3;
    o.deadline_ms = 120000;
    o.local_steps = 2;
    o.batch = 4;
    o.learning_rate = 1e-2;
    o.seed = 9;
    o.http_address = "127.0.0.1:0";
    return o;
  }
  worker::DaemonOptions Daemon(const std::string& w, int port) const {
    worker::DaemonOptions d;
    d.address = "localhost:" + std::to_string(port);
    d.ca_pem = pki_ + "/ca.pem";
    d.cert_pem = pki_ + "/workers/" + w + ".pem";
    d.key_pem = pki_ + "/workers/" + w + ".key";
    d.token = Trim(Read(pki_ + "/workers/" + w + ".token"));
    d.poll_ms = 200;
    return d;
  }
  std::unique_ptr<model::LlamaModel> model_;
  std::string pki_;
  std::vector<std::vector<model::Example>> data_;
  rpc::v1::AdapterPlan plan_;
  aggregation::TensorMap initial_;
};

TEST_F(E2ETest, ThreeWorkersOverMutualTlsMatchInProcessComputation) {
  const std::string state = testing::TempPath("e2e_state");
  fs::remove_all(state);
  auto server = coordinator::CoordinatorServer::Start(Options(state), std::move(*aggregation::FedStrategy::Create({})));
  ASSERT_TRUE(server.ok()) << server.status();
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  std::vector<absl::Status> results(3);
  for (int k = 0; k < 3; ++k)
    workers.emplace_back([&, k] {
      const std::string w = "w" + std::to_string(k + 1);
      auto r = worker::RunDaemon(Daemon(w, (*server)->port()), worker::ModelTrainer(*model_, data_[static_cast<size_t>(k)]), stop);
      results[static_cast<size_t>(k)] = r.status();
    });
  ASSERT_TRUE((*server)->Wait().ok());
  for (auto& t : workers) t.join();
  for (const auto& st : results) EXPECT_TRUE(st.ok()) << st;
  EXPECT_EQ((*server)->last_committed_round(), 3);
  // Observability: Prometheus text, JSON and the dashboard.
  auto metrics = coordinator::HttpGet("127.0.0.1", (*server)->http_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_NE(metrics->find("fedtune_rounds_committed 3"), std::string::npos) << *metrics;
  EXPECT_NE(metrics->find("fedtune_updates_total{outcome=\"accepted\"} 9"), std::string::npos) << *metrics;
  EXPECT_NE(metrics->find("fedtune_worker_last_seen_seconds{worker=\"w2\"}"), std::string::npos);
  auto page = coordinator::HttpGet("127.0.0.1", (*server)->http_port(), "/");
  ASSERT_TRUE(page.ok());
  EXPECT_NE(page->find("\"id\":\"w3\""), std::string::npos);  // the status the page starts from
  EXPECT_NE(page->find("<script src=\"/chart.js\">"), std::string::npos);
  EXPECT_EQ(coordinator::HttpGet("127.0.0.1", (*server)->http_port(), "/nope").status().code(), absl::StatusCode::kNotFound);

  // The same computation in process.
  auto strategy = *aggregation::FedStrategy::Create({});
  aggregation::TensorMap global = initial_;
  for (int r = 1; r <= 3; ++r) {
    std::vector<aggregation::ClientUpdate> ups;
    for (int k = 0; k < 3; ++k) {
      const std::string w = "w" + std::to_string(k + 1);
      auto set = *model::MakeAdapters<float>(model_->adapter_dims(), Spec(), *model::ParseModules("q,v"), 5);
      worker::LocalTrainOptions lt;
      lt.finetune.steps = 2;
      lt.finetune.batch = 4;
      lt.finetune.log_every = 0;
      lt.finetune.seed = worker::TrainingSeed(w, r);
      lt.optimizer.lr = 1e-2f;
      lt.optimizer.total_steps = 2;
      lt.optimizer.min_lr_ratio = 1.0f;
      lt.send_fisher = false;
      auto res = worker::TrainLocal(*model_, data_[static_cast<size_t>(k)], global, {}, w, lt, &set);
      ASSERT_TRUE(res.ok());
      ups.push_back(std::move(res->update));
    }
    auto rr = aggregation::AggregateTrain(*strategy, r, global, std::move(ups));
    ASSERT_TRUE(rr.ok() && rr->global);
    global = *rr->global;
  }
  const aggregation::TensorMap served = (*server)->global();
  ASSERT_EQ(served.size(), global.size());
  double worst = 0, scale = 0;
  for (const auto& [name, v] : global)
    for (size_t i = 0; i < v.size(); ++i) {
      worst = std::max(worst, static_cast<double>(std::fabs(v[i] - served.at(name)[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(v[i])));
    }
  EXPECT_GT(scale, 0);
  EXPECT_LT(worst, 1e-6) << "max |in-process - served|";
  // A restarted coordinator sees the run as finished and does not count a round twice.
  server->reset();
  auto again = coordinator::CoordinatorServer::Start(Options(state), std::move(*aggregation::FedStrategy::Create({})));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE((*again)->Wait().ok());
  EXPECT_EQ((*again)->last_committed_round(), 3);
}

TEST_F(E2ETest, WorkersWithoutValidCertificateOrTokenAreRefused) {
  const std::string state = testing::TempPath("e2e_state_sec");
  fs::remove_all(state);
  auto o = Options(state);
  o.min_workers = 99;  // never starts a round
  auto server = coordinator::CoordinatorServer::Start(o, std::move(*aggregation::FedStrategy::Create({})));
  ASSERT_TRUE(server.ok());
  auto join = [&](const std::string& ca, const std::string& cert, const std::string& key, const std::string& token) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = Read(ca);
    ssl.pem_cert_chain = Read(cert);
    ssl.pem_private_key = Read(key);
    auto stub = rpc::v1::Coordinator::NewStub(grpc::CreateChannel("localhost:" + std::to_string((*server)->port()), grpc::SslCredentials(ssl)));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    rpc::v1::JoinRequest req;
    req.set_token(token);
    rpc::v1::JoinResponse resp;
    return stub->Join(&ctx, req, &resp).error_code();
  };
  const std::string good_token = Trim(Read(pki_ + "/workers/w1.token"));
  EXPECT_EQ(join(pki_ + "/ca.pem", pki_ + "/workers/w1.pem", pki_ + "/workers/w1.key", good_token), grpc::StatusCode::OK);
  EXPECT_EQ(join(pki_ + "/ca.pem", pki_ + "/workers/w1.pem", pki_ + "/workers/w1.key", std::string(64, 'a')), grpc::StatusCode::PERMISSION_DENIED);
  // w2's certificate with w1's token.
  EXPECT_EQ(join(pki_ + "/ca.pem", pki_ + "/workers/w2.pem", pki_ + "/workers/w2.key", good_token), grpc::StatusCode::PERMISSION_DENIED);
  const std::string other = testing::TempPath("e2e_pki_other");
  fs::remove_all(other);
  ASSERT_TRUE(coordinator::Provision({other, {}, {"w1"}, 30, false}).ok());
  EXPECT_NE(join(pki_ + "/ca.pem", other + "/workers/w1.pem", other + "/workers/w1.key", good_token), grpc::StatusCode::OK);
  (*server)->Shutdown();
}

}  // namespace
}  // namespace fedtune

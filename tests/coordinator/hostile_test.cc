// issue 17: a worker with a valid certificate attacks the coordinator while two honest workers
// run their rounds. For every attack: the precise refusal, the coordinator stays up, the honest
// workers finish, the ledger and the adapter stay consistent.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <thread>

#include "common/mapped_file.h"
#include "coordinator/http_status.h"
#include "coordinator/provision.h"
#include "coordinator/server.h"
#include "federation/run_ledger.h"
#include "nlohmann/json.hpp"
#include "proto/service.grpc.pb.h"
#include "protocol/update_codec.h"
#include "tests/support/tiny_model.h"
#include "worker/daemon.h"
#include "worker/local_trainer.h"

namespace fedtune {
namespace {

namespace fs = std::filesystem;
using grpc::StatusCode;

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

class HostileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempPath("hostile");
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    ASSERT_TRUE(testing::WriteTinyLlamaGguf(dir_ + "/tiny.gguf", {}).ok());
    model_ = std::move(*model::LlamaModel::Load(dir_ + "/tiny.gguf"));
    pki_ = dir_ + "/pki";
    ASSERT_TRUE(coordinator::Provision({pki_, {}, {"h1", "h2", "evil"}, 30, false}).ok());
    auto set = *model::MakeAdapters<float>(model_->adapter_dims(), {model::AdapterKind::kFfaLora, 2, 4.0f, false, 1},
                                           {model::Module::kQ, model::Module::kV}, 5);
    initial_ = worker::AdapterTensors(set);
  }

  coordinator::ServerOptions Options(int rounds, int deadline_ms) const {
    coordinator::ServerOptions o;
    o.ca_pem = pki_ + "/ca.pem";
    o.cert_pem = pki_ + "/coordinator.pem";
    o.key_pem = pki_ + "/coordinator.key";
    o.tokens_path = pki_ + "/tokens.sha256";
    o.engine.state_dir = dir_ + "/state";
    o.initial_global = initial_;
    federation::RunSettings& s = o.engine.settings;
    s.rounds = rounds;
    s.population = s.expected_clients = 3;
    s.adapter = {{model::AdapterKind::kFfaLora, 2, 4.0f, false, 1}, {model::Module::kQ, model::Module::kV}, ""};
    s.adapter_seed = 5;
    s.strategy.max_client_examples = 100;
    o.engine.min_available = 3;
    o.engine.quorum = 1;
    o.deadline_ms = deadline_ms;
    o.http_address = "127.0.0.1:0";
    return o;
  }

  std::unique_ptr<rpc::v1::Coordinator::Stub> Stub(const std::string& who, int port) const {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = *ReadFileToString(pki_ + "/ca.pem");
    ssl.pem_cert_chain = *ReadFileToString(pki_ + "/workers/" + who + ".pem");
    ssl.pem_private_key = *ReadFileToString(pki_ + "/workers/" + who + ".key");
    return rpc::v1::Coordinator::NewStub(grpc::CreateChannel("localhost:" + std::to_string(port), grpc::SslCredentials(ssl)));
  }
  std::string Token(const std::string& who) const { return Trim(*ReadFileToString(pki_ + "/workers/" + who + ".token")); }

  static StatusCode Join(rpc::v1::Coordinator::Stub& stub, const std::string& token) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    rpc::v1::JoinRequest req;
    req.set_token(token);
    rpc::v1::JoinResponse resp;
    return stub.Join(&ctx, req, &resp).error_code();
  }

  // The honest workers: stand-in updates after `seconds` of pretend work (the coordinator's side
  // is what is under test; the pause keeps a round open while the attacker acts).
  void StartHonest(int port, double seconds = 0) {
    for (const char* w : {"h1", "h2"})
      honest_.emplace_back([this, w, port, seconds] {
        worker::DaemonOptions d;
        d.address = "localhost:" + std::to_string(port);
        d.ca_pem = pki_ + "/ca.pem";
        d.cert_pem = pki_ + "/workers/" + std::string(w) + ".pem";
        d.key_pem = pki_ + "/workers/" + std::string(w) + ".key";
        d.token = Token(w);
        d.poll_ms = 200;
        d.quiet = true;
        auto r = worker::RunDaemon(d, worker::StandInTaskRunner(10, seconds), stop_);
        EXPECT_TRUE(r.ok()) << r.status();
      });
  }
  void StopHonest() {
    stop_ = true;
    for (auto& t : honest_) t.join();
    honest_.clear();
  }

  // The attacker's task for the current round (polls until there is one).
  rpc::v1::Task WaitForTask(rpc::v1::Coordinator::Stub& stub) {
    for (int i = 0; i < 200; ++i) {
      grpc::ClientContext ctx;
      rpc::v1::GetTaskRequest req;
      req.set_wait_ms(200);
      rpc::v1::Task t;
      if (stub.GetTask(&ctx, req, &t).ok() && t.kind() == rpc::v1::Task::TRAIN) return t;
    }
    ADD_FAILURE() << "no task";
    return {};
  }

  struct Upload {
    grpc::Status status;
    rpc::v1::UploadResponse resp;
  };
  // `announce` bytes in the header; `send` of the payload actually sent.
  static Upload SendUpload(rpc::v1::Coordinator::Stub& stub, int round, const std::vector<uint8_t>& payload, int64_t announce, size_t send,
                           int64_t num_examples = 10, size_t resume = 0) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    Upload u;
    auto w = stub.UploadUpdate(&ctx, &u.resp);
    rpc::v1::UploadMessage head;
    head.mutable_header()->set_round(round);
    head.mutable_header()->set_num_examples(num_examples);
    head.mutable_header()->set_total_bytes(announce);
    head.mutable_header()->set_sha256(protocol::Sha256Hex(payload));
    head.mutable_header()->set_resume_offset(static_cast<int64_t>(resume));
    w->Write(head);
    for (size_t off = resume; off < send; off += 1 << 20) {
      rpc::v1::UploadMessage m;
      m.mutable_chunk()->set_offset(static_cast<int64_t>(off));
      m.mutable_chunk()->set_data(payload.data() + off, std::min<size_t>(1 << 20, send - off));
      if (!w->Write(m)) break;
    }
    w->WritesDone();
    u.status = w->Finish();
    return u;
  }
  std::vector<uint8_t> Encoded(float value, int64_t num_examples = 10) const {
    aggregation::ClientUpdate u;
    u.client = "evil";
    u.num_examples = num_examples;
    for (const auto& [name, v] : initial_) u.delta[name].assign(v.size(), value);
    return *protocol::EncodeUpdate(u);
  }

  std::string dir_, pki_;
  std::unique_ptr<model::LlamaModel> model_;
  aggregation::TensorMap initial_;
  std::atomic<bool> stop_{false};
  std::vector<std::thread> honest_;
};

TEST_F(HostileTest, RequestsBeforeJoiningOrBeforeTheFirstRoundAreRefused) {
  auto server = coordinator::CoordinatorServer::Start(Options(1, 60000));
  ASSERT_TRUE(server.ok()) << server.status();
  auto evil = Stub("evil", (*server)->port());
  {  // GetStatus without joining
    grpc::ClientContext ctx;
    rpc::v1::StatusResponse resp;
    EXPECT_EQ(evil->GetStatus(&ctx, {}, &resp).error_code(), StatusCode::FAILED_PRECONDITION);
  }
  ASSERT_EQ(Join(*evil, Token("evil")), StatusCode::OK);
  // The crash of issue 17: a download for round 0 before any adapter is published.
  for (int round : {0, 1, 99}) {
    grpc::ClientContext ctx;
    rpc::v1::DownloadRequest req;
    req.set_round(round);
    auto reader = evil->DownloadAdapter(&ctx, req);
    rpc::v1::Chunk c;
    while (reader->Read(&c)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), StatusCode::FAILED_PRECONDITION) << round;
  }
  // Another worker's token, an oversized token.
  EXPECT_EQ(Join(*Stub("h1", (*server)->port()), Token("evil")), StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Join(*evil, std::string(100000, 'a')), StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Join(*Stub("h1", (*server)->port()), Token("h1")), StatusCode::OK) << "the coordinator is still up";
  (*server)->Shutdown();
}

TEST_F(HostileTest, MalformedTransfersAreRefusedAndHonestWorkersFinish) {
  auto server = coordinator::CoordinatorServer::Start(Options(2, 20000));
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  auto evil = Stub("evil", port);
  ASSERT_EQ(Join(*evil, Token("evil")), StatusCode::OK);
  StartHonest(port, 2.0);
  rpc::v1::Task t = WaitForTask(*evil);
  ASSERT_EQ(t.round(), 1);
  {  // an offset past the end
    grpc::ClientContext ctx;
    rpc::v1::DownloadRequest req;
    req.set_round(1);
    req.set_offset(t.adapter_bytes() + 1);
    auto reader = evil->DownloadAdapter(&ctx, req);
    rpc::v1::Chunk c;
    while (reader->Read(&c)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), StatusCode::OUT_OF_RANGE);
  }
  const std::vector<uint8_t> good = Encoded(1e-3f);
  EXPECT_EQ(SendUpload(*evil, 99, good, static_cast<int64_t>(good.size()), good.size()).status.error_code(), StatusCode::FAILED_PRECONDITION)
      << "wrong round";
  EXPECT_EQ(SendUpload(*evil, 1, good, int64_t{1} << 40, good.size()).status.error_code(), StatusCode::INVALID_ARGUMENT) << "oversized";
  EXPECT_EQ(SendUpload(*evil, 1, good, static_cast<int64_t>(good.size()), good.size() / 2).status.error_code(), StatusCode::DATA_LOSS)
      << "truncated";
  EXPECT_EQ(SendUpload(*evil, 1, good, 100, good.size()).status.error_code(), StatusCode::INVALID_ARGUMENT) << "chunk beyond the size";
  // NaN, then huge values: refused with the reason (the round's slot for this worker is used).
  const std::vector<uint8_t> nan = Encoded(std::nanf(""));
  Upload u = SendUpload(*evil, 1, nan, static_cast<int64_t>(nan.size()), nan.size());
  ASSERT_TRUE(u.status.ok()) << u.status.error_message();
  EXPECT_FALSE(u.resp.accepted());
  EXPECT_NE(u.resp.reason().find("non-finite"), std::string::npos) << u.resp.reason();
  // A second upload for the round is told its update was refused (a worker rolls back), not
  // that it was received.
  u = SendUpload(*evil, 1, good, static_cast<int64_t>(good.size()), good.size());
  EXPECT_EQ(u.status.error_code(), StatusCode::FAILED_PRECONDITION) << "a second upload for the round";
  EXPECT_NE(u.status.error_message().find("refused"), std::string::npos) << u.status.error_message();
  // Round 2: huge values are refused; then inflated example counts weigh at most the cap (100).
  t = WaitForTask(*evil);
  ASSERT_EQ(t.round(), 2);
  const std::vector<uint8_t> huge = Encoded(1e20f);
  u = SendUpload(*evil, 2, huge, static_cast<int64_t>(huge.size()), huge.size());
  ASSERT_TRUE(u.status.ok());
  EXPECT_FALSE(u.resp.accepted());
  EXPECT_NE(u.resp.reason().find("|value|"), std::string::npos) << u.resp.reason();
  ASSERT_TRUE((*server)->Wait().ok());
  StopHonest();
  EXPECT_EQ((*server)->last_committed_round(), 2);
  auto ledger = federation::RunLedger::Open(dir_ + "/state/ledger.sqlite");
  ASSERT_TRUE(ledger.ok());
  EXPECT_EQ(ledger->get()->AllMetrics()->size(), 2u);
  for (const auto& [name, v] : (*server)->global())
    for (float x : v) ASSERT_TRUE(std::isfinite(x) && std::fabs(x) < 1.0f) << name;
}

// A broken upload resumes where the coordinator stopped receiving (the offset comes back in the
// heartbeat); a resume at any other offset, or of another payload, is refused.
TEST_F(HostileTest, BrokenUploadResumesAtTheKeptOffsetAndBadResumesAreRefused) {
  auto server = coordinator::CoordinatorServer::Start(Options(1, 20000));
  ASSERT_TRUE(server.ok()) << server.status();
  auto evil = Stub("evil", (*server)->port());
  ASSERT_EQ(Join(*evil, Token("evil")), StatusCode::OK);
  StartHonest((*server)->port(), 1.0);
  ASSERT_EQ(WaitForTask(*evil).round(), 1);
  const std::vector<uint8_t> good = Encoded(1e-3f);
  const size_t half = good.size() / 2;
  EXPECT_EQ(SendUpload(*evil, 1, good, static_cast<int64_t>(good.size()), half).status.error_code(), StatusCode::DATA_LOSS);
  grpc::ClientContext ctx;
  rpc::v1::HeartbeatRequest hreq;
  hreq.set_round(1);
  rpc::v1::HeartbeatResponse hresp;
  ASSERT_TRUE(evil->Heartbeat(&ctx, hreq, &hresp).ok());
  EXPECT_EQ(hresp.upload_resume_offset(), static_cast<int64_t>(half));
  EXPECT_EQ(hresp.upload_sha256(), protocol::Sha256Hex(good));
  // Past the kept bytes: refused (the worker would then start over from byte 0).
  EXPECT_EQ(SendUpload(*evil, 1, good, static_cast<int64_t>(good.size()), good.size(), 10, half + 1).status.error_code(),
            StatusCode::FAILED_PRECONDITION);
  // Break again, then resume properly: accepted with the whole payload's checksum.
  EXPECT_EQ(SendUpload(*evil, 1, good, static_cast<int64_t>(good.size()), half).status.error_code(), StatusCode::DATA_LOSS);
  Upload u = SendUpload(*evil, 1, good, static_cast<int64_t>(good.size()), good.size(), 10, half);
  ASSERT_TRUE(u.status.ok()) << u.status.error_message();
  EXPECT_TRUE(u.resp.accepted()) << u.resp.reason();
  EXPECT_EQ(u.resp.received_bytes(), static_cast<int64_t>(good.size()));
  ASSERT_TRUE((*server)->Wait().ok());
  StopHonest();
  EXPECT_EQ((*server)->last_committed_round(), 1);
  // A retry of the accepted upload (as after a lost answer) is told it was received, also after
  // the round was evaluated and committed: the worker keeps what it trained.
  const Upload again = SendUpload(*evil, 1, good, static_cast<int64_t>(good.size()), good.size());
  EXPECT_EQ(again.status.error_code(), StatusCode::ALREADY_EXISTS) << again.status.error_message();
}

TEST_F(HostileTest, InflatedExampleCountsWeighAtMostTheCap) {
  auto o = Options(1, 20000);
  auto server = coordinator::CoordinatorServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  auto evil = Stub("evil", (*server)->port());
  ASSERT_EQ(Join(*evil, Token("evil")), StatusCode::OK);
  StartHonest((*server)->port());
  WaitForTask(*evil);
  const std::vector<uint8_t> big = Encoded(1e-3f, int64_t{1} << 40);
  Upload u = SendUpload(*evil, 1, big, static_cast<int64_t>(big.size()), big.size(), int64_t{1} << 40);
  ASSERT_TRUE(u.status.ok() && u.resp.accepted()) << u.status.error_message() << u.resp.reason();
  ASSERT_TRUE((*server)->Wait().ok());
  StopHonest();
  // global = initial + (100 x 1e-3 + 10 d_h1 + 10 d_h2) / 120 (the honest stand-in deltas are ~1e-3 at most).
  const auto h1 = worker::StandInUpdate(initial_, "h1", 10, false, protocol::TrainingSeed("h1", 1));
  const auto h2 = worker::StandInUpdate(initial_, "h2", 10, false, protocol::TrainingSeed("h2", 1));
  for (const auto& [name, v] : (*server)->global())
    for (size_t i = 0; i < v.size(); ++i) {
      const double want = initial_.at(name)[i] + (100 * 1e-3 + 10.0 * h1.update.delta.at(name)[i] + 10.0 * h2.update.delta.at(name)[i]) / 120;
      ASSERT_NEAR(v[i], want, 1e-6) << name << "[" << i << "]";
    }
}

TEST_F(HostileTest, AStalledUploadIsCancelledAndTheRoundCommits) {
  auto server = coordinator::CoordinatorServer::Start(Options(1, 3000));
  ASSERT_TRUE(server.ok()) << server.status();
  auto evil = Stub("evil", (*server)->port());
  ASSERT_EQ(Join(*evil, Token("evil")), StatusCode::OK);
  StartHonest((*server)->port());
  WaitForTask(*evil);
  // A header announcing an update, then nothing: the coordinator cancels it after the deadline.
  grpc::ClientContext ctx;
  rpc::v1::UploadResponse resp;
  auto w = evil->UploadUpdate(&ctx, &resp);
  rpc::v1::UploadMessage head;
  head.mutable_header()->set_round(1);
  head.mutable_header()->set_num_examples(10);
  head.mutable_header()->set_total_bytes(1000);
  ASSERT_TRUE(w->Write(head));
  const auto t0 = std::chrono::steady_clock::now();
  const grpc::Status st = w->Finish();  // blocks until the server ends the call
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(st.error_code(), StatusCode::CANCELLED) << st.error_message();
  EXPECT_LT(waited, 30);
  ASSERT_TRUE((*server)->Wait().ok());
  StopHonest();
  EXPECT_EQ((*server)->last_committed_round(), 1);
}

TEST_F(HostileTest, AThousandConcurrentLongPollsAreRefusedBeyondTwo) {
  auto server = coordinator::CoordinatorServer::Start(Options(1, 60000));
  ASSERT_TRUE(server.ok()) << server.status();
  auto evil = Stub("evil", (*server)->port());
  ASSERT_EQ(Join(*evil, Token("evil")), StatusCode::OK);
  grpc::CompletionQueue cq;
  struct Call {
    grpc::ClientContext ctx;
    rpc::v1::Task task;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<rpc::v1::Task>> rpc;
  };
  std::vector<std::unique_ptr<Call>> calls;
  for (int i = 0; i < 1000; ++i) {
    auto c = std::make_unique<Call>();
    c->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    rpc::v1::GetTaskRequest req;
    req.set_wait_ms(2000);
    c->rpc = evil->AsyncGetTask(&c->ctx, req, &cq);
    c->rpc->Finish(&c->task, &c->status, c.get());
    calls.push_back(std::move(c));
  }
  int ok = 0, exhausted = 0, other = 0;
  for (size_t n = 0; n < calls.size(); ++n) {
    void* tag = nullptr;
    bool fine = false;
    ASSERT_TRUE(cq.Next(&tag, &fine));
    const grpc::Status& st = static_cast<Call*>(tag)->status;
    if (st.ok()) {
      ++ok;
    } else if (st.error_code() == StatusCode::RESOURCE_EXHAUSTED) {
      ++exhausted;
    } else {
      ++other;
    }
  }
  std::printf("1000 concurrent long polls: %d answered, %d refused (RESOURCE_EXHAUSTED), %d other\n", ok, exhausted, other);
  EXPECT_EQ(other, 0);
  EXPECT_GE(exhausted, 900);
  EXPECT_EQ(Join(*Stub("h1", (*server)->port()), Token("h1")), StatusCode::OK) << "the coordinator is still up";
  (*server)->Shutdown();
}

TEST_F(HostileTest, ARevokedWorkerIsRefusedWithinASecond) {
  auto server = coordinator::CoordinatorServer::Start(Options(1, 60000));
  ASSERT_TRUE(server.ok()) << server.status();
  auto evil = Stub("evil", (*server)->port());
  ASSERT_EQ(Join(*evil, Token("evil")), StatusCode::OK);
  ASSERT_TRUE(coordinator::Revoke(pki_, "evil").ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  grpc::ClientContext ctx;
  rpc::v1::HeartbeatRequest hb;
  rpc::v1::HeartbeatResponse resp;
  EXPECT_EQ(evil->Heartbeat(&ctx, hb, &resp).error_code(), StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Join(*evil, Token("evil")), StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Join(*Stub("h1", (*server)->port()), Token("h1")), StatusCode::OK) << "other workers are unaffected";
  (*server)->Shutdown();
}

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 ? fd : -1;
}

TEST_F(HostileTest, GarbageOnTheTlsAndHttpPortsAndIdleHttpClientsLeaveTheServerUp) {
  auto server = coordinator::CoordinatorServer::Start(Options(1, 60000));
  ASSERT_TRUE(server.ok()) << server.status();
  std::vector<char> junk(65536);
  for (size_t i = 0; i < junk.size(); ++i) junk[i] = static_cast<char>((i * 2654435761u) >> 13);
  for (int port : {(*server)->port(), (*server)->http_port()}) {
    const int fd = Connect(port);
    ASSERT_GE(fd, 0);
    (void)!write(fd, junk.data(), junk.size());
    close(fd);
  }
  // Idle HTTP clients that never send a request: others are still served at once.
  std::vector<int> idle;
  for (int i = 0; i < 8; ++i) idle.push_back(Connect((*server)->http_port()));
  const auto t0 = std::chrono::steady_clock::now();
  auto metrics = coordinator::HttpGet("127.0.0.1", (*server)->http_port(), "/metrics");
  EXPECT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 2.0);
  for (int fd : idle) close(fd);
  EXPECT_EQ(Join(*Stub("h1", (*server)->port()), Token("h1")), StatusCode::OK);
  (*server)->Shutdown();
}

TEST_F(HostileTest, TheStatusServerRefusesRemoteBindsWithoutATokenAndChecksTheToken) {
  auto o = Options(1, 60000);
  o.http_address = "0.0.0.0:0";
  auto refused = coordinator::CoordinatorServer::Start(o);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("http_token_file"), std::string::npos) << refused.status();
  o.http_token = "0123456789abcdef-token";
  auto server = coordinator::CoordinatorServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_FALSE(coordinator::HttpGet("127.0.0.1", (*server)->http_port(), "/status.json").ok());
  EXPECT_FALSE(coordinator::HttpGet("127.0.0.1", (*server)->http_port(), "/status.json", "wrong-token-wrong-token").ok());
  EXPECT_TRUE(coordinator::HttpGet("127.0.0.1", (*server)->http_port(), "/status.json", o.http_token).ok());
  // The health probes (Kubernetes) need no token and reveal nothing but "ok".
  for (const char* probe : {"/healthz", "/readyz"}) {
    auto body = coordinator::HttpGet("127.0.0.1", (*server)->http_port(), probe);
    ASSERT_TRUE(body.ok()) << probe << ": " << body.status();
    EXPECT_EQ(*body, "ok\n") << probe;
  }
  EXPECT_FALSE(coordinator::HttpGet("127.0.0.1", (*server)->http_port(), "/metrics").ok());
  (*server)->Shutdown();
}

// A worker's profile is shown on the status page and fed to the planner: strings are cut to 128
// printable characters, numbers made finite and non-negative, whatever the worker sent.
TEST_F(HostileTest, AHostileProfileIsSanitised) {
  auto server = coordinator::CoordinatorServer::Start(Options(1, 60000));
  ASSERT_TRUE(server.ok()) << server.status();
  auto evil = Stub("evil", (*server)->port());
  {
    grpc::ClientContext ctx;
    rpc::v1::JoinRequest req;
    req.set_token(Token("evil"));
    auto* p = req.mutable_profile();
    p->set_kernels(std::string(100000, 'k') + "\x1b[2J");
    p->set_gpu(std::string("H100\n\x01") + std::string(500, 'g'));
    p->set_version("v\xc3\xa9");  // valid UTF-8 (gRPC refuses invalid UTF-8 in strings itself)
    p->set_train_tokens_per_second(std::nan(""));
    p->set_link_mbps(-5);
    p->set_cores(-3);
    p->set_memory_bytes(-1);
    auto& speeds = *p->mutable_base_tokens_per_second();
    speeds["q8_0"] = std::nan("");
    speeds["q4_0"] = 1e300;
    speeds[std::string(100000, 'x')] = 5;
    speeds["q4_1"] = -1;
    speeds["Q4_0"] = 7;  // the same type spelled otherwise: one entry survives
    rpc::v1::JoinResponse resp;
    ASSERT_TRUE(evil->Join(&ctx, req, &resp).ok());
  }
  auto body = coordinator::HttpGet("127.0.0.1", (*server)->http_port(), "/status.json");
  ASSERT_TRUE(body.ok()) << body.status();
  auto j = nlohmann::json::parse(*body);
  bool found = false;
  for (const auto& w : j["workers"]) {
    if (w["id"] != "evil") continue;
    found = true;
    EXPECT_EQ(w["kernels"].get<std::string>(), std::string(128, 'k'));
    EXPECT_EQ(w["train_tokens_per_second"].get<double>(), 0.0);
    EXPECT_EQ(w["link_mbps"].get<double>(), 0.0);
    EXPECT_EQ(w["cores"].get<int>(), 0);
    EXPECT_EQ(w["version"].get<std::string>(), "v??");
    EXPECT_EQ(w["memory_bytes"].get<int64_t>(), 0);
    // Known types only, finite, positive, bounded, one entry per type (whichever spelling came first).
    const auto& speeds = w["base_tokens_per_second"];
    ASSERT_EQ(speeds.size(), 1u) << speeds.dump();
    const double q4 = speeds.at("Q4_0").get<double>();
    EXPECT_TRUE(q4 == 1e12 || q4 == 7) << q4;
  }
  EXPECT_TRUE(found) << *body;
  (*server)->Shutdown();
}

}  // namespace
}  // namespace fedtune

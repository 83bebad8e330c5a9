// libFuzzer target for the coordinator's RPC handlers (issue 17): mutated request messages sent
// over real gRPC + mutual TLS by a worker holding a valid certificate, to two live coordinators
// (plain rounds and secure-aggregation rounds) whose round engines keep rounds open meanwhile.
//
// An input is a sequence of records [kind: 1 byte][length: 2 bytes LE][payload]. The low 3 bits
// of kind pick the RPC, bit 7 the coordinator (secure when set); the payload is parsed as that
// RPC's request (UploadUpdate: consecutive upload records form one stream of UploadMessages).
// A crash, a sanitizer report or a hang of the process is a finding; refusals are expected.
#include <google/protobuf/stubs/logging.h>
#include <grpcpp/grpcpp.h>
#include <stdlib.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/mapped_file.h"
#include "coordinator/provision.h"
#include "coordinator/server.h"
#include "model/adapter.h"
#include "proto/service.grpc.pb.h"
#include "protocol/adapter_tensors.h"

namespace {

using namespace fedtune;

struct Target {
  std::unique_ptr<coordinator::CoordinatorServer> server;
  std::unique_ptr<rpc::v1::Coordinator::Stub> stub;  // the fuzzing worker, joined
};

struct World {
  std::string dir;
  Target plain, secure;
};

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

void Die(const std::string& what) {
  std::fprintf(stderr, "rpc_fuzzer setup: %s\n", what.c_str());
  std::abort();
}

std::unique_ptr<rpc::v1::Coordinator::Stub> Stub(const std::string& pki, const std::string& who, int port) {
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = *ReadFileToString(pki + "/ca.pem");
  ssl.pem_cert_chain = *ReadFileToString(pki + "/workers/" + who + ".pem");
  ssl.pem_private_key = *ReadFileToString(pki + "/workers/" + who + ".key");
  return rpc::v1::Coordinator::NewStub(grpc::CreateChannel("localhost:" + std::to_string(port), grpc::SslCredentials(ssl)));
}

void Join(rpc::v1::Coordinator::Stub& stub, const std::string& pki, const std::string& who) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  rpc::v1::JoinRequest req;
  req.set_token(Trim(*ReadFileToString(pki + "/workers/" + who + ".token")));
  rpc::v1::JoinResponse resp;
  if (grpc::Status st = stub.Join(&ctx, req, &resp); !st.ok()) Die("join " + who + ": " + st.error_message());
}

Target Start(const std::string& dir, const std::string& pki, bool secure, std::vector<std::unique_ptr<rpc::v1::Coordinator::Stub>>* others) {
  const model::AdapterSpec spec{model::AdapterKind::kLora, 2, 4.0f, false, 1};
  const model::ModelDims dims{1, 16, 8, 32};  // layers, width, key/value width, feed-forward
  auto set = model::MakeAdapters<float>(dims, spec, {model::Module::kQ, model::Module::kV}, 5);
  if (!set.ok()) Die(std::string(set.status().message()));
  coordinator::ServerOptions o;
  o.ca_pem = pki + "/ca.pem";
  o.cert_pem = pki + "/coordinator.pem";
  o.key_pem = pki + "/coordinator.key";
  o.tokens_path = pki + "/tokens.sha256";
  o.engine.state_dir = dir + (secure ? "/state-secure" : "/state-plain");
  o.initial_global = protocol::AdapterTensors(*set);
  federation::RunSettings& s = o.engine.settings;
  s.rounds = 1000000;  // rounds keep opening (and failing their quorum) while the fuzzer runs
  s.population = s.expected_clients = 3;
  s.adapter = {spec, {model::Module::kQ, model::Module::kV}, ""};
  s.adapter_seed = 5;
  s.secure.enabled = secure;
  s.secure.value_range = 0.05;
  o.engine.min_available = secure ? 3 : 1;
  o.engine.quorum = 1;
  o.engine.evaluate_start = false;
  o.deadline_ms = 1500;
  o.secure_stage_ms = 500;
  o.max_threads = 64;
  auto server = coordinator::CoordinatorServer::Start(std::move(o));
  if (!server.ok()) Die(std::string(server.status().message()));
  Target t;
  t.server = std::move(*server);
  t.stub = Stub(pki, "w1", t.server->port());
  Join(*t.stub, pki, "w1");
  if (secure)
    for (const char* w : {"w2", "w3"}) {  // joined and silent: the secure rounds run their stages to the deadline
      others->push_back(Stub(pki, w, t.server->port()));
      Join(*others->back(), pki, w);
    }
  return t;
}

World& Setup() {
  static World* w = [] {
    google::protobuf::SetLogHandler(nullptr);  // mutated strings are often not UTF-8: expected, not worth a log line
    auto* world = new World;
    char tmpl[] = "/tmp/fedtune-rpc-fuzz-XXXXXX";
    if (!mkdtemp(tmpl)) Die("mkdtemp");
    world->dir = tmpl;
    const std::string pki = world->dir + "/pki";
    if (auto p = coordinator::Provision({pki, {}, {"w1", "w2", "w3"}, 30, false}); !p.ok()) Die(std::string(p.status().message()));
    static std::vector<std::unique_ptr<rpc::v1::Coordinator::Stub>> others;
    world->plain = Start(world->dir, pki, false, &others);
    world->secure = Start(world->dir, pki, true, &others);
    return world;
  }();
  return *w;
}

std::chrono::system_clock::time_point Soon() { return std::chrono::system_clock::now() + std::chrono::milliseconds(300); }

void SendUpload(rpc::v1::Coordinator::Stub& stub, const std::vector<rpc::v1::UploadMessage>& msgs) {
  grpc::ClientContext ctx;
  ctx.set_deadline(Soon());
  rpc::v1::UploadResponse resp;
  auto w = stub.UploadUpdate(&ctx, &resp);
  for (const auto& m : msgs)
    if (!w->Write(m)) break;
  w->WritesDone();
  (void)w->Finish();
}

// One unary call with the payload parsed as its request (unparsable payloads are skipped).
template <class Req, class Resp, class Method>
void Unary(rpc::v1::Coordinator::Stub& stub, Method method, const uint8_t* p, size_t n) {
  Req req;
  if (!req.ParseFromArray(p, static_cast<int>(n))) return;
  grpc::ClientContext ctx;
  ctx.set_deadline(Soon());
  Resp resp;
  (void)(stub.*method)(&ctx, req, &resp);
}

void Call(rpc::v1::Coordinator::Stub& stub, int rpc, const uint8_t* p, size_t n) {
  using S = rpc::v1::Coordinator::Stub;
  switch (rpc) {
    case 0: return Unary<rpc::v1::JoinRequest, rpc::v1::JoinResponse>(stub, &S::Join, p, n);
    case 1: return Unary<rpc::v1::HeartbeatRequest, rpc::v1::HeartbeatResponse>(stub, &S::Heartbeat, p, n);
    case 2: return Unary<rpc::v1::GetTaskRequest, rpc::v1::Task>(stub, &S::GetTask, p, n);
    case 3: {
      rpc::v1::DownloadRequest req;
      if (!req.ParseFromArray(p, static_cast<int>(n))) return;
      grpc::ClientContext ctx;
      ctx.set_deadline(Soon());
      auto r = stub.DownloadAdapter(&ctx, req);
      rpc::v1::Chunk c;
      for (int i = 0; i < 4 && r->Read(&c); ++i) {
      }
      ctx.TryCancel();
      (void)r->Finish();
      return;
    }
    case 5: return Unary<rpc::v1::EvalReport, rpc::v1::EvalAck>(stub, &S::ReportEvaluation, p, n);
    case 6: return Unary<rpc::v1::SecAggRequest, rpc::v1::SecAggResponse>(stub, &S::SecureAggregation, p, n);
    default: return Unary<rpc::v1::StatusRequest, rpc::v1::StatusResponse>(stub, &S::GetStatus, p, n);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  World& w = Setup();
  std::vector<rpc::v1::UploadMessage> upload;
  rpc::v1::Coordinator::Stub* upload_to = nullptr;
  size_t i = 0;
  int calls = 0;
  while (i + 3 <= size && calls < 16) {
    const uint8_t kind = data[i];
    const size_t len = std::min<size_t>(data[i + 1] | (static_cast<size_t>(data[i + 2]) << 8), size - i - 3);
    const uint8_t* payload = data + i + 3;
    i += 3 + len;
    rpc::v1::Coordinator::Stub& stub = (kind & 0x80) ? *w.secure.stub : *w.plain.stub;
    const int rpc = kind & 0x07;
    if (rpc == 4) {  // part of an upload stream
      if (upload_to && upload_to != &stub) {
        SendUpload(*upload_to, upload);
        upload.clear();
        ++calls;
      }
      upload_to = &stub;
      rpc::v1::UploadMessage m;
      if (m.ParseFromArray(payload, static_cast<int>(len))) upload.push_back(std::move(m));
      continue;
    }
    if (upload_to) {
      SendUpload(*upload_to, upload);
      upload.clear();
      upload_to = nullptr;
      ++calls;
    }
    Call(stub, rpc, payload, len);
    ++calls;
  }
  if (upload_to) SendUpload(*upload_to, upload);
  return 0;
}

#include "worker/daemon.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "coordinator/update_codec.h"
#include "proto/service.grpc.pb.h"
#include "worker/local_trainer.h"

namespace fedtune::worker {
namespace {

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
}

// One poll: NO_TASK -> false, a trained and uploaded round -> true (accepted or not), the run's
// end -> OutOfRange, RPC failures -> their status.
absl::StatusOr<bool> OneTask(rpc::v1::Coordinator::Stub& stub, const std::string& me, const DaemonOptions& o, const model::LlamaModel& model,
                             const std::vector<model::Example>& data) {
  rpc::v1::Task task;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(o.poll_ms + 10000));
    rpc::v1::GetTaskRequest req;
    req.set_worker_id(me);
    req.set_wait_ms(o.poll_ms);
    FT_RETURN_IF_ERROR(FromGrpc(stub.GetTask(&ctx, req, &task), "get task"));
  }
  if (task.kind() == rpc::v1::Task::SHUTDOWN) return absl::OutOfRangeError("run finished");
  if (task.kind() != rpc::v1::Task::TRAIN) return false;

  // Download the global adapter.
  std::vector<uint8_t> bytes;
  std::string sha;
  {
    grpc::ClientContext ctx;
    rpc::v1::DownloadRequest req;
    req.set_run_id(task.run_id());
    req.set_round(task.round());
    auto reader = stub.DownloadAdapter(&ctx, req);
    rpc::v1::Chunk c;
    while (reader->Read(&c)) {
      bytes.insert(bytes.end(), c.data().begin(), c.data().end());
      if (!c.sha256().empty()) sha = c.sha256();
    }
    FT_RETURN_IF_ERROR(FromGrpc(reader->Finish(), "download"));
  }
  if (coordinator::Sha256Hex(bytes) != task.adapter_sha256() || sha != task.adapter_sha256())
    return absl::DataLossError(absl::StrCat("round ", task.round(), ": downloaded adapter fails its checksum"));
  FT_ASSIGN_OR_RETURN(aggregation::TensorMap global, coordinator::DecodeTensors(bytes));

  // Train.
  const auto& p = task.plan();
  const auto kind = model::ParseAdapterKind(p.kind());
  if (!kind) return absl::InvalidArgumentError(absl::StrCat("task: unknown adapter kind ", p.kind()));
  FT_ASSIGN_OR_RETURN(auto modules, model::ParseModules(p.modules().empty() ? "all" : absl::StrJoin(p.modules(), ",")));
  model::AdapterSpec spec{*kind, p.rank(), p.alpha(), p.rslora(), p.blocks()};
  FT_ASSIGN_OR_RETURN(model::AdapterSet<float> adapters, model::MakeAdapters<float>(model.adapter_dims(), spec, modules, p.adapter_seed()));
  LocalTrainOptions lt;
  lt.finetune.steps = task.local_steps();
  lt.finetune.batch = task.batch();
  lt.finetune.log_every = 0;
  lt.finetune.seed = TrainingSeed(me, task.round());
  lt.optimizer.lr = static_cast<float>(task.learning_rate());
  lt.optimizer.total_steps = task.local_steps();
  lt.optimizer.min_lr_ratio = 1.0f;
  lt.send_fisher = task.send_fisher();
  std::map<std::string, double> config(task.config().begin(), task.config().end());
  FT_ASSIGN_OR_RETURN(LocalResult lr, TrainLocal(model, data, global, config, me, lt, &adapters));

  // Upload.
  FT_ASSIGN_OR_RETURN(std::vector<uint8_t> payload, coordinator::EncodeUpdate(lr.update));
  grpc::ClientContext ctx;
  rpc::v1::UploadResponse resp;
  auto writer = stub.UploadUpdate(&ctx, &resp);
  rpc::v1::UploadMessage head;
  auto* h = head.mutable_header();
  h->set_run_id(task.run_id());
  h->set_round(task.round());
  h->set_worker_id(me);
  h->set_num_examples(lr.update.num_examples);
  h->set_total_bytes(static_cast<int64_t>(payload.size()));
  h->set_sha256(coordinator::Sha256Hex(payload));
  bool ok = writer->Write(head);
  for (size_t off = 0; ok && off < payload.size(); off += 1 << 20) {
    rpc::v1::UploadMessage m;
    m.mutable_chunk()->set_offset(static_cast<int64_t>(off));
    m.mutable_chunk()->set_data(payload.data() + off, std::min<size_t>(1 << 20, payload.size() - off));
    ok = writer->Write(m);
  }
  writer->WritesDone();
  const grpc::Status fin = writer->Finish();
  if (fin.error_code() == grpc::StatusCode::ALREADY_EXISTS) return false;  // a restarted coordinator already has it
  FT_RETURN_IF_ERROR(FromGrpc(fin, absl::StrCat("upload of round ", task.round())));
  if (!resp.accepted()) FT_LOG_WARN("round {}: the coordinator refused the update: {}", task.round(), resp.reason());
  return resp.accepted();
}

}  // namespace

uint64_t TrainingSeed(const std::string& worker, int round) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (char c : worker) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h ^ static_cast<uint64_t>(round);
}

absl::StatusOr<DaemonReport> RunDaemon(const DaemonOptions& o, const model::LlamaModel& model, const std::vector<model::Example>& data,
                                       const std::atomic<bool>& stop) {
  FT_ASSIGN_OR_RETURN(std::string ca, ReadFileToString(o.ca_pem));
  FT_ASSIGN_OR_RETURN(std::string cert, ReadFileToString(o.cert_pem));
  FT_ASSIGN_OR_RETURN(std::string key, ReadFileToString(o.key_pem));
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ca;
  ssl.pem_cert_chain = cert;
  ssl.pem_private_key = key;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(4 << 20);
  auto channel = grpc::CreateCustomChannel(o.address, grpc::SslCredentials(ssl), args);
  auto stub = rpc::v1::Coordinator::NewStub(channel);
  DaemonReport rep;

  // Outer loop: (re)join with exponential backoff; inner loop: tasks. A coordinator that went
  // away (UNAVAILABLE) or restarted and no longer knows us (FAILED_PRECONDITION) sends us back to
  // joining; the task in hand is retried from scratch (training is deterministic per round).
  auto transient = [](const absl::Status& s) {
    return absl::IsUnavailable(s) || absl::IsFailedPrecondition(s) || absl::IsCancelled(s) || absl::IsDeadlineExceeded(s) ||
           absl::IsAborted(s);
  };
  while (!stop) {
    std::string me;
    for (int backoff = 100; !stop; backoff = std::min(o.max_backoff_ms, backoff * 2)) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      rpc::v1::JoinRequest req;
      req.set_token(o.token);
      req.mutable_profile()->set_cores(static_cast<int>(std::thread::hardware_concurrency()));
      rpc::v1::JoinResponse resp;
      grpc::Status s = stub->Join(&ctx, req, &resp);
      if (s.ok()) {
        me = resp.worker_id();
        break;
      }
      if (s.error_code() != grpc::StatusCode::UNAVAILABLE && s.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) return FromGrpc(s, "join");
      std::this_thread::sleep_for(std::chrono::milliseconds(backoff));
    }
    if (stop) break;
    bool finished = false;
    while (!stop) {
      absl::StatusOr<bool> r = OneTask(*stub, me, o, model, data);
      if (r.ok()) {
        if (*r) ++rep.rounds_trained;
        continue;
      }
      if (absl::IsOutOfRange(r.status())) {  // the run is over
        finished = true;
        break;
      }
      if (!transient(r.status())) return r.status();
      FT_LOG_WARN("worker {}: {}; reconnecting", me, r.status().ToString());
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      break;
    }
    if (finished) break;
  }
  return rep;
}

}  // namespace fedtune::worker

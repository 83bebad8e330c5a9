#include "worker/daemon.h"

#include <grpcpp/grpcpp.h>
#include <malloc.h>

#include <chrono>
#include <condition_variable>
#include <fstream>
#include <map>
#include <mutex>
#include <filesystem>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "aggregation/hetero_rank.h"
#include "common/log.h"
#include "common/progress.h"
#include "common/mapped_file.h"
#include "protocol/secagg_identity.h"
#include "protocol/secagg_wire.h"
#include "protocol/task.h"
#include "protocol/update_codec.h"
#include "kernels/quant.h"
#include "worker/error_feedback.h"
#include "worker/secure_client.h"
#include "nlohmann/json.hpp"
#include "proto/service.grpc.pb.h"

namespace fedtune::worker {
namespace {

using Clock = std::chrono::steady_clock;

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
}

// Sends heartbeats (round, progress, refreshed profile) every `interval` while a task is in
// hand; remembers when the coordinator says the round is closed.
class Heartbeats {
 public:
  Heartbeats(rpc::v1::Coordinator::Stub& stub, std::string me, int round, int interval_ms, rpc::v1::Profile profile)
      : stub_(stub), me_(std::move(me)), round_(round), interval_(std::max(interval_ms, 50)), profile_(std::move(profile)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~Heartbeats() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void set_progress(double p) { progress_ = p; }
  bool abandoned() const { return abandon_; }

 private:
  void Loop() {
    std::unique_lock<std::mutex> l(mu_);
    while (!cv_.wait_for(l, std::chrono::milliseconds(interval_), [&] { return stop_; })) {
      l.unlock();
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(interval_ + 5000));
      rpc::v1::HeartbeatRequest req;
      req.set_worker_id(me_);
      req.set_round(round_);
      req.set_progress(progress_);
      *req.mutable_profile() = profile_;
      rpc::v1::HeartbeatResponse resp;
      if (stub_.Heartbeat(&ctx, req, &resp).ok() && (resp.abandon_round() || resp.shutdown())) abandon_ = true;
      l.lock();
    }
  }
  rpc::v1::Coordinator::Stub& stub_;
  const std::string me_;
  const int round_, interval_;
  const rpc::v1::Profile profile_;
  std::atomic<double> progress_{0};
  std::atomic<bool> abandon_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

// The update kept in the state directory (see daemon.h).
struct Kept {
  std::string run_id, adapter_sha256, task_key;
  int round = 0;
  int64_t num_examples = 0;
  std::map<std::string, double> metrics;
  std::vector<uint8_t> payload;
};

std::string KeptMeta(const std::string& dir) { return dir + "/last-update.json"; }
std::string KeptData(const std::string& dir) { return dir + "/last-update.bin"; }

absl::Status SaveKept(const std::string& dir, const Kept& k) {
  // Payload first, then the description naming its checksum: a crash between the two leaves a
  // description that does not match and is ignored.
  FT_RETURN_IF_ERROR(WriteFileAtomic(KeptData(dir), std::string(k.payload.begin(), k.payload.end())));
  nlohmann::json j = {{"run_id", k.run_id}, {"round", k.round}, {"adapter_sha256", k.adapter_sha256}, {"task", k.task_key},
                      {"num_examples", k.num_examples}, {"metrics", k.metrics}, {"payload_sha256", protocol::Sha256Hex(k.payload)}};
  return WriteFileAtomic(KeptMeta(dir), j.dump(1));
}

// What an update was trained for: the round's task without its deadline (a retried round has a
// new one). A kept update is reused only for the very same task.
std::string TaskKey(const rpc::v1::Task& task) {
  rpc::v1::Task t = task;
  t.clear_deadline_unix_ms();
  std::string bytes;
  t.SerializeToString(&bytes);  // deterministic enough here: same binary, same message
  return protocol::Sha256Hex(std::vector<uint8_t>(bytes.begin(), bytes.end()));
}

std::optional<Kept> LoadKept(const std::string& dir, const rpc::v1::Task& task) try {
  if (dir.empty()) return std::nullopt;
  auto meta = ReadFileToString(KeptMeta(dir));
  if (!meta.ok()) return std::nullopt;
  const nlohmann::json j = nlohmann::json::parse(*meta, nullptr, false);
  if (j.is_discarded() || !j.is_object() || j.value("run_id", "") != task.run_id() || j.value("round", 0) != task.round() ||
      j.value("adapter_sha256", "") != task.adapter_sha256() || j.value("task", "") != TaskKey(task))
    return std::nullopt;
  auto data = ReadFileToString(KeptData(dir));
  if (!data.ok()) return std::nullopt;
  Kept k;
  k.payload.assign(data->begin(), data->end());
  if (protocol::Sha256Hex(k.payload) != j.value("payload_sha256", "")) return std::nullopt;
  k.run_id = task.run_id();
  k.round = task.round();
  k.adapter_sha256 = task.adapter_sha256();
  k.num_examples = j.value("num_examples", int64_t{0});
  if (j.contains("metrics") && j["metrics"].is_object())
    for (const auto& [name, v] : j["metrics"].items())
      if (v.is_number()) k.metrics[name] = v.get<double>();
  k.task_key = TaskKey(task);
  return k;
} catch (const nlohmann::json::exception& e) {  // a damaged state file: train again
  FT_LOG_WARN("ignoring the state directory's kept update: {}", e.what());
  return std::nullopt;
}

// The round's global adapter; a broken stream is resumed at the received offset (3 tries).
absl::StatusOr<std::vector<uint8_t>> Download(rpc::v1::Coordinator::Stub& stub, const rpc::v1::Task& task) {
  std::vector<uint8_t> bytes;
  bytes.reserve(static_cast<size_t>(std::max<int64_t>(task.adapter_bytes(), 0)));
  std::string sha;
  absl::Status last;
  for (int attempt = 0; attempt < 3; ++attempt) {
    grpc::ClientContext ctx;
    rpc::v1::DownloadRequest req;
    req.set_run_id(task.run_id());
    req.set_round(task.round());
    req.set_offset(static_cast<int64_t>(bytes.size()));
    auto reader = stub.DownloadAdapter(&ctx, req);
    rpc::v1::Chunk c;
    while (reader->Read(&c)) {
      if (c.offset() != static_cast<int64_t>(bytes.size())) return absl::DataLossError("download: chunk out of order");
      bytes.insert(bytes.end(), c.data().begin(), c.data().end());
      if (!c.sha256().empty()) sha = c.sha256();
    }
    last = FromGrpc(reader->Finish(), "download");
    if (last.ok()) break;
    if (!absl::IsUnavailable(last) && !absl::IsCancelled(last) && !absl::IsDeadlineExceeded(last)) return last;
    FT_LOG_WARN("round {}: download broke at {} bytes ({}); resuming", task.round(), bytes.size(), last.ToString());
  }
  FT_RETURN_IF_ERROR(last);
  if (protocol::Sha256Hex(bytes) != task.adapter_sha256() || sha != task.adapter_sha256())
    return absl::DataLossError(absl::StrCat("round ", task.round(), ": downloaded adapter fails its checksum"));
  return bytes;
}

// Tells the coordinator this worker declines its task (over its memory budget): an upload header
// with the reason and figures and no payload. Under local DP only the word: the figures depend
// on the data (the longest example).
absl::Status SendDecline(rpc::v1::Coordinator::Stub& stub, const rpc::v1::Task& task, const std::string& me, const Decline& d) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  rpc::v1::UploadResponse resp;
  auto writer = stub.UploadUpdate(&ctx, &resp);
  rpc::v1::UploadMessage head;
  auto* h = head.mutable_header();
  h->set_run_id(task.run_id());
  h->set_round(task.round());
  h->set_worker_id(me);
  h->set_secure(false);
  const bool private_data = task.local_dp_clip() > 0;
  h->set_declined(private_data ? "declined: over this worker's memory budget" : d.reason);
  h->set_declined_needed_mib(private_data ? 0 : d.needed_mib);
  h->set_declined_budget_mib(private_data ? 0 : d.budget_mib);
  h->set_declined_device(!private_data && d.device);
  writer->Write(head);
  writer->WritesDone();
  const grpc::Status fin = writer->Finish();
  if (!fin.ok() && fin.error_code() != grpc::StatusCode::FAILED_PRECONDITION && fin.error_code() != grpc::StatusCode::ALREADY_EXISTS)
    return FromGrpc(fin, absl::StrCat("declining round ", task.round()));
  return absl::OkStatus();
}

grpc::Status UploadOnce(rpc::v1::Coordinator::Stub& stub, const rpc::v1::Task& task, const std::string& me, const Kept& kept,
                        rpc::v1::UploadResponse* resp, bool secure = false, int64_t resume_offset = 0) {
  grpc::ClientContext ctx;
  // Past the round's deadline (plus slack for the clock) the coordinator refuses it anyway.
  if (task.deadline_unix_ms() > 0) ctx.set_deadline(std::chrono::system_clock::time_point(std::chrono::milliseconds(task.deadline_unix_ms() + 30000)));
  auto writer = stub.UploadUpdate(&ctx, resp);
  rpc::v1::UploadMessage head;
  auto* h = head.mutable_header();
  h->set_run_id(task.run_id());
  h->set_round(task.round());
  h->set_worker_id(me);
  h->set_num_examples(kept.num_examples);
  h->set_total_bytes(static_cast<int64_t>(kept.payload.size()));
  h->set_sha256(protocol::Sha256Hex(kept.payload));
  h->set_secure(secure);
  h->set_resume_offset(resume_offset);
  for (const auto& [k, v] : kept.metrics) (*h->mutable_metrics())[k] = v;
  bool ok = writer->Write(head);
  for (size_t off = static_cast<size_t>(resume_offset); ok && off < kept.payload.size(); off += 1 << 20) {
    rpc::v1::UploadMessage m;
    m.mutable_chunk()->set_offset(static_cast<int64_t>(off));
    m.mutable_chunk()->set_data(kept.payload.data() + off, std::min<size_t>(1 << 20, kept.payload.size() - off));
    ok = writer->Write(m);
  }
  writer->WritesDone();
  return writer->Finish();
}

// Upload with retries while the coordinator sheds load (RESOURCE_EXHAUSTED: its transport is at
// its memory quota) or the connection breaks.
grpc::Status UploadWithRetries(rpc::v1::Coordinator::Stub& stub, const rpc::v1::Task& task, const std::string& me, const Kept& kept,
                               rpc::v1::UploadResponse* resp, bool secure) {
  grpc::Status fin;
  int64_t resume = 0;
  const std::string sha = protocol::Sha256Hex(kept.payload);
  for (int attempt = 0, backoff_ms = 200;; ++attempt, backoff_ms = std::min(backoff_ms * 2, 10000)) {
    fin = UploadOnce(stub, task, me, kept, resp, secure, resume);
    if (fin.error_code() == grpc::StatusCode::FAILED_PRECONDITION && resume > 0) {  // the kept part is gone: from the start
      resume = 0;
      fin = UploadOnce(stub, task, me, kept, resp, secure, 0);
    }
    // A broken link (UNAVAILABLE, or a stream cut short: DATA_LOSS) or a loaded coordinator.
    const bool retry = fin.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED || fin.error_code() == grpc::StatusCode::UNAVAILABLE ||
                       fin.error_code() == grpc::StatusCode::DATA_LOSS;
    if (!retry || attempt >= 8) break;
    const int jitter = static_cast<int>(protocol::TrainingSeed(me, attempt) % static_cast<uint64_t>(backoff_ms));
    std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms / 2 + jitter / 2));
    // Resume where the coordinator stopped receiving, if it kept the part of this payload.
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    rpc::v1::HeartbeatRequest hreq;
    hreq.set_worker_id(me);
    hreq.set_round(task.round());
    rpc::v1::HeartbeatResponse hresp;
    resume = 0;
    const bool answered = stub.Heartbeat(&ctx, hreq, &hresp).ok();
    if (answered && hresp.abandon_round()) {
      // The round is over for this worker: closed, moved on, or the update was received (an
      // answer lost). For a plain update one more try, refused after its header, says which
      // (received: kept; refused or closed before it arrived: rolled back; moved on: kept,
      // OneTask). A secure round keeps the transient status (its caller retries the round).
      if (!secure) fin = UploadOnce(stub, task, me, kept, resp, secure, 0);
      break;
    }
    if (answered && hresp.upload_sha256() == sha && hresp.upload_resume_offset() > 0 &&
        hresp.upload_resume_offset() < static_cast<int64_t>(kept.payload.size())) {
      resume = hresp.upload_resume_offset();
      FT_LOG_INFO("round {}: resuming the upload at byte {} of {}", task.round(), resume, kept.payload.size());
    }
  }
  return fin;
}

// A secure-aggregation round (protocol in proto/service.proto, SecureAggregation): keys and
// shares before training, the masked input as the upload, then the unmask reply. Nothing is kept
// across restarts (the keys belong to this attempt): a worker restarted mid-round is dropped from
// it and the others unmask without it.
absl::Status SecureTask(rpc::v1::Coordinator::Stub& stub, const std::string& me, int heartbeat_ms, const DaemonOptions& o,
                        const TaskRunner& trainer, const rpc::v1::Task& task, DaemonReport* rep) {
  FT_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, Download(stub, task));
  FT_ASSIGN_OR_RETURN(aggregation::TensorMap global, protocol::DecodeTensors(bytes));
  bytes = {};
  const protocol::TrainTask tt = protocol::FromProto(task, me);
  FT_ASSIGN_OR_RETURN(std::unique_ptr<SecureClient> sc, SecureClient::Create(tt, global));
  auto call = [&](rpc::v1::SecAggRequest::Step step, rpc::v1::SecAggRequest req, rpc::v1::SecAggResponse* resp) -> absl::Status {
    grpc::ClientContext ctx;
    if (task.deadline_unix_ms() > 0) ctx.set_deadline(std::chrono::system_clock::time_point(std::chrono::milliseconds(task.deadline_unix_ms() + 120000)));
    req.set_run_id(task.run_id());
    req.set_round(task.round());
    req.set_worker_id(me);
    req.set_step(step);
    return FromGrpc(stub.SecureAggregation(&ctx, req, resp), "secure aggregation");
  };
  auto out = [&](const char* stage) {
    ++rep->rounds_abandoned;
    FT_LOG_WARN("round {}: dropped from secure aggregation at the {} stage", task.round(), stage);
    return absl::OkStatus();
  };
  // Signed key advertisements: ours with our certificate's key, the neighbours' checked against
  // the deployment CA (a coordinator that swapped a key is caught here; we leave the round).
  FT_ASSIGN_OR_RETURN(std::unique_ptr<protocol::SecAggIdentity> identity, protocol::SecAggIdentity::Load(o.ca_pem, o.cert_pem, o.key_pem));
  rpc::v1::SecAggRequest req;
  rpc::v1::SecAggResponse resp;
  *req.mutable_keys() = protocol::ToProto(sc->Advertise());
  const std::string attempt = protocol::SecAggAttempt(task);
  FT_RETURN_IF_ERROR(identity->Sign(attempt, req.mutable_keys()));
  FT_RETURN_IF_ERROR(call(rpc::v1::SecAggRequest::ADVERTISE_KEYS, req, &resp));
  if (resp.dropped_from_round()) return out("key");
  std::vector<privacy::secagg::PublicKeys> neighbours;
  std::set<std::string> signers = {identity->name()};
  for (const auto& k : resp.keys()) {
    absl::StatusOr<std::string> signer = identity->Verify(attempt, k);
    if (signer.ok() && !signers.insert(*signer).second)
      signer = absl::PermissionDeniedError(absl::StrCat("two advertisements in this round signed by '", *signer, "'"));
    if (!signer.ok()) {
      FT_LOG_WARN("round {}: refusing secure aggregation: {}", task.round(), std::string(signer.status().message()));
      return out("key");
    }
    FT_ASSIGN_OR_RETURN(privacy::secagg::PublicKeys pk, protocol::FromProto(k));
    neighbours.push_back(pk);
  }
  FT_ASSIGN_OR_RETURN(std::vector<privacy::secagg::EncryptedShare> shares, sc->ShareKeys(neighbours));
  req.Clear();
  resp.Clear();
  for (const auto& sh : shares) *req.add_shares() = protocol::ToProto(sh);
  FT_RETURN_IF_ERROR(call(rpc::v1::SecAggRequest::SHARE_KEYS, req, &resp));
  if (resp.dropped_from_round()) return out("share");
  std::vector<privacy::secagg::EncryptedShare> received;
  for (const auto& sh : resp.shares()) received.push_back(protocol::FromProto(sh));

  Heartbeats hb(stub, me, task.round(), heartbeat_ms, o.profile);
  absl::StatusOr<LocalResult> trained = trainer(tt, global, [&hb](double p) { hb.set_progress(p); });
  if (const std::optional<Decline> d = trained.ok() ? std::nullopt : DeclineFrom(trained.status())) {
    // Over the memory budget in a secure round: drop out of it (the others unmask without us),
    // telling the coordinator so that it neither waits for us nor hands us the task again.
    FT_LOG_WARN("round {}: {}; leaving the secure round", task.round(), d->reason);
    ++rep->rounds_declined;
    return SendDecline(stub, task, me, *d);
  }
  FT_RETURN_IF_ERROR(trained.status());
  LocalResult lr = std::move(*trained);
  if (hb.abandoned()) return out("training");
  FT_ASSIGN_OR_RETURN(std::vector<uint32_t> y, sc->Mask(lr.update, received));
  Kept kept;
  kept.num_examples = lr.update.num_examples;
  kept.metrics = lr.update.metrics;
  kept.metrics["secagg_clamped"] = static_cast<double>(sc->clamped());
  kept.payload = protocol::EncodeMasked(y);
  rpc::v1::UploadResponse up;
  FT_RETURN_IF_ERROR(FromGrpc(UploadWithRetries(stub, task, me, kept, &up, true), absl::StrCat("upload of round ", task.round())));
  if (!up.accepted()) {
    FT_LOG_WARN("round {}: the coordinator refused the masked input: {}", task.round(), up.reason());
    return absl::OkStatus();
  }
  ++rep->rounds_trained;
  if (o.drop_after_masking) return absl::OkStatus();  // fault drill: vanish before unmasking
  req.Clear();
  resp.Clear();
  FT_RETURN_IF_ERROR(call(rpc::v1::SecAggRequest::MASKED_INPUT, req, &resp));
  if (resp.dropped_from_round()) return out("unmask");
  absl::StatusOr<privacy::secagg::UnmaskReply> reply = sc->Unmask({resp.dropped().begin(), resp.dropped().end()},
                                                                  {resp.survivors().begin(), resp.survivors().end()});
  if (!reply.ok() && (absl::IsFailedPrecondition(reply.status()) || absl::IsPermissionDenied(reply.status()))) {
    // Too few survivors (or too few training a value this worker trains): its sum would show
    // too few updates. Leave without revealing anything; the round fails at the server.
    FT_LOG_WARN("round {}: refusing to unmask: {}", task.round(), std::string(reply.status().message()));
    return out("unmask");
  }
  FT_RETURN_IF_ERROR(reply.status());
  req.Clear();
  resp.Clear();
  *req.mutable_unmask() = protocol::ToProto(*reply);
  FT_RETURN_IF_ERROR(call(rpc::v1::SecAggRequest::UNMASK, req, &resp));
  if (!o.quiet) FT_LOG_INFO("round {}: masked input accepted and unmask reply sent", task.round());
  return absl::OkStatus();
}

// One poll: NO_TASK -> nothing counted; a trained and uploaded round -> counted in `rep`; the
// run's end -> OutOfRange; RPC failures -> their status.
absl::Status OneTask(rpc::v1::Coordinator::Stub& stub, const std::string& me, int heartbeat_ms, const DaemonOptions& o, const TaskRunner& trainer,
                     const TaskEvaluator& evaluator, DaemonReport* rep) {
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
  if (task.kind() == rpc::v1::Task::EVALUATE) {
    if (!evaluator) return absl::OkStatus();  // not selected unless it reported held-out data
    FT_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, Download(stub, task));
    FT_ASSIGN_OR_RETURN(aggregation::TensorMap global, protocol::DecodeTensors(bytes));
    FT_ASSIGN_OR_RETURN(aggregation::EvalReport er, evaluator(protocol::FromProto(task, me), global));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    rpc::v1::EvalReport req;
    req.set_run_id(task.run_id());
    req.set_round(task.round());
    req.set_worker_id(me);
    req.set_num_examples(er.num_examples);
    for (const auto& [k, v] : er.metrics) (*req.mutable_metrics())[k] = v;
    rpc::v1::EvalAck ack;
    FT_RETURN_IF_ERROR(FromGrpc(stub.ReportEvaluation(&ctx, req, &ack), "evaluation report"));
    if (ack.accepted()) ++rep->evaluations;
    if (!ack.accepted()) FT_LOG_WARN("round {}: evaluation report refused: {}", task.round(), ack.reason());
    return absl::OkStatus();
  }
  if (task.kind() != rpc::v1::Task::TRAIN) return absl::OkStatus();
  if (task.secure_aggregation()) return SecureTask(stub, me, heartbeat_ms, o, trainer, task, rep);

  rpc::v1::Profile profile = o.profile;
  std::optional<Kept> kept = LoadKept(o.state_dir, task);
  const bool reused = kept.has_value();
  // Trained here (not a kept update re-sent after a restart): what training changed in this
  // worker's state, undone when the update does not count.
  std::function<void()> discard = [] {};
  if (reused) {
    FT_LOG_INFO("round {}: uploading the update kept from before a restart (no retraining)", task.round());
  } else {
    const auto t0 = Clock::now();
    FT_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, Download(stub, task));
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    if (bytes.size() > (1u << 20) && secs > 0) profile.set_link_mbps(static_cast<double>(bytes.size()) * 8e-6 / secs);
    FT_ASSIGN_OR_RETURN(aggregation::TensorMap global, protocol::DecodeTensors(bytes));
    bytes = {};
    Heartbeats hb(stub, me, task.round(), heartbeat_ms, profile);
    absl::StatusOr<LocalResult> trained = trainer(protocol::FromProto(task, me), global, [&hb](double p) { hb.set_progress(p); });
    if (const std::optional<Decline> d = trained.ok() ? std::nullopt : DeclineFrom(trained.status())) {
      // Over this worker's memory budget: tell the coordinator why, so it re-plans (nothing trained).
      FT_LOG_WARN("round {}: {}", task.round(), d->reason);
      ++rep->rounds_declined;
      return SendDecline(stub, task, me, *d);
    }
    FT_RETURN_IF_ERROR(trained.status());
    LocalResult lr = std::move(*trained);
    if (lr.discard) discard = lr.discard;
    if (hb.abandoned()) {
      discard();
      ++rep->rounds_abandoned;
      if (!o.quiet) FT_LOG_INFO("round {}: the coordinator closed the round; update not sent", task.round());
      return absl::OkStatus();
    }
    kept.emplace();
    kept->run_id = task.run_id();
    kept->round = task.round();
    kept->adapter_sha256 = task.adapter_sha256();
    kept->task_key = TaskKey(task);
    kept->num_examples = lr.update.num_examples;
    kept->metrics = lr.update.metrics;
    FT_ASSIGN_OR_RETURN(kept->payload, protocol::EncodeUpdate(lr.update));
    if (!o.state_dir.empty()) FT_RETURN_IF_ERROR(SaveKept(o.state_dir, *kept));
  }

  // Upload; retried with backoff while the coordinator sheds load (RESOURCE_EXHAUSTED: its
  // transport is at its memory quota) or the connection breaks.
  rpc::v1::UploadResponse resp;
  const grpc::Status fin = UploadWithRetries(stub, task, me, *kept, &resp, false);
  if (fin.error_code() == grpc::StatusCode::ALREADY_EXISTS) return absl::OkStatus();  // received before an answer was lost
  // Answers that say the update will not count (the round closed or its deadline passed before
  // it was received, or a retry of a refused update): roll back, do not offer it again. ("no task
  // for ... in round r", the round having moved on, is not among them: an update received before
  // an answer was lost may have counted; the residual is kept.)
  // (Matched by their prefixes: "no task for '<name>' ..." carries the worker's name.)
  const bool closed = absl::StartsWith(fin.error_message(), "round ") && absl::StrContains(fin.error_message(), " is closed");
  const bool refused = absl::StartsWith(fin.error_message(), "update refused for this round");
  if (fin.error_code() == grpc::StatusCode::FAILED_PRECONDITION && (closed || refused)) {
    if (refused)
      FT_LOG_WARN("round {}: the update will not count: {}", task.round(), fin.error_message());
    discard();
    if (!o.state_dir.empty()) {  // rolled back: never offer it again (a re-run of the round retrains)
      std::error_code ec;
      std::filesystem::remove(KeptMeta(o.state_dir), ec);
    }
    ++rep->rounds_abandoned;
    return absl::OkStatus();
  }
  FT_RETURN_IF_ERROR(FromGrpc(fin, absl::StrCat("upload of round ", task.round())));
  if (!resp.accepted()) {
    discard();
    FT_LOG_WARN("round {}: the coordinator refused the update: {}", task.round(), resp.reason());
    if (!o.state_dir.empty()) {  // never offer a refused update again
      std::error_code ec;
      std::filesystem::remove(KeptMeta(o.state_dir), ec);
    }
    return absl::OkStatus();
  }
  ++rep->rounds_trained;
  if (reused) ++rep->rounds_reused;
  if (!o.quiet) FT_LOG_INFO("round {}: update accepted ({} bytes)", task.round(), kept->payload.size());
  return absl::OkStatus();
}

}  // namespace

TaskRunner ModelTaskRunner(const model::LlamaModel& model, const std::vector<model::Example>& data, const std::string& model_path,
                     int activation_budget_mib, kernels::Backend* backend, const std::string& privacy_path, double memory_mib,
                     bool report_peak, std::shared_ptr<BaseModels> shared_bases, double device_memory_mib, const std::string& residual_path) {
  struct State {
    State(std::shared_ptr<BaseModels> b, const std::string& ledger) : bases(std::move(b)), privacy(ledger) {}
    std::shared_ptr<BaseModels> bases;
    LocalPrivacy privacy;  // record-level epsilon across every round this worker trained
    ErrorFeedback feedback;  // compressed uploads: error feedback, kept in residual_path when given (one task at a time)
  };
  if (!shared_bases) shared_bases = std::make_shared<BaseModels>(model, model_path, /*keep_one=*/true);
  auto state = std::make_shared<State>(std::move(shared_bases), privacy_path);
  state->feedback = ErrorFeedback(residual_path);
  state->bases->SetCalibration(data);
  return [&data, state, activation_budget_mib, backend, memory_mib, report_peak, device_memory_mib](const protocol::TrainTask& task, const aggregation::TensorMap& global,
                                                                    const std::function<void(double)>& progress) -> absl::StatusOr<LocalResult> {
    if (!task.plan.explanation.empty()) FT_LOG_INFO("round {} plan: {}", task.round, task.plan.explanation);
    ClientEnv env;
    env.activation_budget_mib = activation_budget_mib;
    env.memory_mib = memory_mib;
    env.adapter_copies = 2;  // the downloaded global adapter and the update, besides the trainer's
    env.backend = backend;
    // A GPU backend: plans and activations within its free memory (Backend::DeviceMemoryBytes).
    const bool on_device = backend != nullptr && !backend->HostMemoryBuffers() && backend->DeviceMemoryBytes() > 0;
    if (on_device) {
      env.device_memory_mib = static_cast<double>(backend->DeviceMemoryBytes()) / (1 << 20);
      if (device_memory_mib > 0) env.device_memory_mib = std::min(env.device_memory_mib, device_memory_mib);
    }
    env.progress = progress;
    const bool feedback = !task.compression.empty() && task.compression != "none" && task.error_feedback;
    aggregation::TensorMap residual, start;
    if (feedback) {
      residual = state->feedback.For(task.run_id, task.round);
      start = residual;
      env.error_feedback = &residual;
    }
    // Free heap pages kept from the previous round (or the profile's measuring steps) go back
    // to the system first, so the round starts from what is live; then the round's own peak of
    // this process (the memory model predicts a process's peak).
    // Not under AddressSanitizer: its allocator owns the heap, so trimming glibc's arenas frees
    // nothing there, and glibc aborted once at a worker thread's exit (arena bookkeeping,
    // "__malloc_arena_thread_freeres: a->attached_threads > 0") with trims from several
    // in-process workers racing thread exits in an ASan test run.
    kernels::ReleaseThreadCaches();  // per-thread bf16 copies and primitives of earlier tasks' shapes
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__)
    malloc_trim(0);
#endif
    // A plan on a re-quantized copy does not read the stored model's file pages (BaseModels::For
    // drops them too; here before the peak is reset, in case an evaluation touched them again).
    if (!task.plan.base_type.empty()) state->bases->stored().ReleaseMappedPages();
    const bool reset = ResetPeakRss();
    const double rss_start = CurrentRssMiB();
    if (on_device) {
      backend->ReleaseDeviceCaches();  // what the profile, base-speed runs or an earlier plan cached
      backend->ResetPeakDeviceBytes();
    }
    absl::StatusOr<LocalResult> r = RunTrainTask(*state->bases, data, task, global, env, &state->privacy);
    if (r.ok() && feedback) {
      // Not writing the file loses the residual at the next restart, not this round's update.
      if (absl::Status st = state->feedback.Save(task.run_id, task.round, std::move(start), std::move(residual)); !st.ok())
        FT_LOG_WARN("round {}: error-feedback residual not kept: {}", task.round, st.ToString());
      r->discard = [state, run = task.run_id, round = task.round] {
        if (absl::Status st = state->feedback.Discard(run, round); !st.ok())
          FT_LOG_WARN("round {}: error-feedback residual not rolled back: {}", round, st.ToString());
      };
    }
    if (r.ok() && reset && report_peak && task.local_dp_clip <= 0) {
      r->update.metrics["peak_rss_mib"] = PeakRssSinceResetMiB();
      r->update.metrics["rss_start_mib"] = rss_start;  // resident before the round's training
    }
    // The device's peak is the backend's own count: exact whatever else shares the process.
    if (r.ok() && on_device && task.local_dp_clip <= 0)
      r->update.metrics["peak_device_mib"] = static_cast<double>(backend->PeakDeviceBytes()) / (1 << 20);
    return r;
  };
}

TaskEvaluator ModelTaskEvaluator(const model::LlamaModel& model, const std::vector<model::Example>& eval, const std::string& model_path,
                                 const std::vector<model::Example>* train, std::shared_ptr<BaseModels> bases) {
  if (!bases) bases = std::make_shared<BaseModels>(model, model_path, /*keep_one=*/true);
  if (train != nullptr) bases->SetCalibration(*train);
  return [&eval, bases](const protocol::TrainTask& task, const aggregation::TensorMap& global) {
    return RunEvalTask(*bases, eval, task, global, nullptr);
  };
}

TaskRunner StandInTaskRunner(int64_t num_examples, double seconds) {
  return [num_examples, seconds](const protocol::TrainTask& task, const aggregation::TensorMap& global,
                                 const std::function<void(double)>& progress) -> absl::StatusOr<LocalResult> {
    if (seconds > 0) std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    progress(1.0);
    aggregation::TensorMap own = global;  // a lower-rank task updates the global's first components (its blocks)
    if (protocol::TrainsPart(task.plan)) {
      FT_ASSIGN_OR_RETURN(own, aggregation::TruncateRank(global, protocol::FullShare(task.plan), task.plan.train_rank,
                                                          protocol::FirstBlock(task.plan, task.round)));
    }
    LocalResult r = StandInUpdate(own, task.client, num_examples, task.send_fisher, protocol::TrainingSeed(task.client, task.round));
    r.update.metrics["train_seconds"] = seconds;
    return r;
  };
}

rpc::v1::Profile MeasureProfile(const model::LlamaModel* model, const std::vector<model::Example>* data, int64_t memory_budget_mib,
                                kernels::Backend* backend, int64_t device_memory_budget_mib) {
  rpc::v1::Profile p;
  if (backend != nullptr && std::string_view(backend->Name()) == "cuda") p.set_gpu(backend->Describe());
  if (backend != nullptr && !backend->HostMemoryBuffers()) {
    int64_t device = backend->DeviceMemoryBytes();
    if (device_memory_budget_mib > 0) device = std::min(device, device_memory_budget_mib << 20);
    p.set_device_memory_bytes(device);
    p.set_device_bf16_gemm(backend->Describe().find("bf16 GEMM") != std::string::npos);
  }
  p.set_kernels(backend != nullptr ? backend->Name() : kernels::CpuFastBackend().Name());
  p.set_cores(static_cast<int>(std::thread::hardware_concurrency()));
  p.set_version(FEDTUNE_VERSION);
  int64_t avail = 0;
  std::ifstream mi("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (mi >> key >> kb >> unit)
    if (key == "MemAvailable:") avail = kb * 1024;
  if (memory_budget_mib > 0) avail = avail > 0 ? std::min(avail, memory_budget_mib << 20) : memory_budget_mib << 20;
  p.set_memory_bytes(avail);
  if (data) p.set_num_examples(static_cast<int64_t>(data->size()));
  if (model && data && !data->empty()) {
    auto set = model::MakeAdapters<float>(model->adapter_dims(), {model::AdapterKind::kLora, 4, 8.0f, false, 1}, {model::Module::kQ, model::Module::kV}, 1);
    if (set.ok()) {
      model::FinetuneOptions ft;
      ft.steps = 2;
      ft.batch = 1;
      ft.log_every = 0;
      ft.backend = backend;
      model::AdamW opt(model::OptimizerConfig{});
      // Finetune continues from the optimizer's step count and stops at ft.steps: each call
      // below runs the steps up to its own target (1 warm-up, then 2 timed, then 2 timed).
      ft.steps = 1;  // warm-up (first touches of the weights), not timed
      (void)model::Finetune(*model, *data, ft, &*set, &opt);
      ft.steps = 3;
      if (auto r = model::Finetune(*model, *data, ft, &*set, &opt); r.ok() && r->seconds > 0)
        p.set_train_tokens_per_second(static_cast<double>(r->tokens) / r->seconds);
      ft.recompute = false;
      ft.steps = 5;
      if (auto r = model::Finetune(*model, *data, ft, &*set, &opt); r.ok() && r->seconds > 0 && p.train_tokens_per_second() > 0)
        p.set_keep_speedup(static_cast<double>(r->tokens) / r->seconds / p.train_tokens_per_second());
      ft.recompute = true;  // batch 4 (2 steps): how much a larger batch speeds each token up
      ft.batch = 4;
      ft.steps = 7;
      if (auto r = model::Finetune(*model, *data, ft, &*set, &opt); r.ok() && r->seconds > 0 && p.train_tokens_per_second() > 0)
        p.set_batch4_speedup(static_cast<double>(r->tokens) / r->seconds / p.train_tokens_per_second());
    }
  }
  return p;
}

std::function<absl::StatusOr<std::map<std::string, double>>(const std::vector<std::string>&)> BaseSpeedMeasurer(
    const model::LlamaModel& model, const std::string& model_path, const std::vector<model::Example>& data, kernels::Backend* backend,
    const std::string& cache_path, double memory_mib, const std::atomic<bool>* stop) {
  auto memo = std::make_shared<std::string>();  // the last figures as JSON, when there is no cache file
  return [&model, model_path, &data, backend, cache_path, memory_mib, stop,
          memo](const std::vector<std::string>& names) -> absl::StatusOr<std::map<std::string, double>> {
    std::vector<kernels::GgmlType> types;
    for (const std::string& n : names) {
      const auto t = kernels::GgmlTypeFromName(n);
      if (!t || !kernels::CanQuantize(*t)) return absl::InvalidArgumentError(absl::StrCat("the coordinator asks for an unknown base type '", n, "'"));
      types.push_back(*t);
    }
    std::error_code ec;
    const auto size = std::filesystem::file_size(model_path, ec);
    const auto mtime = ec ? std::filesystem::file_time_type() : std::filesystem::last_write_time(model_path, ec);
    const std::string key = absl::StrCat(model_path, "|", ec ? 0 : size, "|", mtime.time_since_epoch().count(), "|",
                                         backend != nullptr ? backend->Name() : "cpu-fast", "|", std::thread::hardware_concurrency(), "|",
                                         static_cast<int64_t>(memory_mib));  // (skipped types depend on the memory)
    const std::string stored_name = kernels::TypeTraits(model.layer(0).wq.type).name;
    std::map<std::string, double> out;
    // The cache (a file, else the last figures in memory) answers when it holds every type asked
    // for; else all are measured again in one pass (their ratios come from one pass).
    if ((!cache_path.empty() && std::filesystem::exists(cache_path)) || (cache_path.empty() && !memo->empty())) {  // a damaged cache: measured again
      try {
        std::string text = *memo;
        if (!cache_path.empty()) {
          std::ifstream in(cache_path);
          std::stringstream ss;
          ss << in.rdbuf();
          text = ss.str();
        }
        const nlohmann::json j = nlohmann::json::parse(text);
        if (j.at("key").get<std::string>() == key) {
          for (const auto& [n, v] : j.at("tokens_per_second").items()) out[n] = v.get<double>();
          const std::set<std::string> skipped = j.value("skipped", std::set<std::string>{});  // over the memory budget
          bool all = out.count(stored_name) > 0;
          for (kernels::GgmlType t : types) all = all && (out.count(kernels::TypeTraits(t).name) > 0 || skipped.count(kernels::TypeTraits(t).name) > 0);
          if (all) return out;
        }
      } catch (const std::exception& e) {
        FT_LOG_WARN("base speed cache {} unreadable ({}); measuring again", cache_path, e.what());
      }
      out.clear();
    }
    SpeedProbe probe;
    probe.backend = backend;
    const auto t0 = std::chrono::steady_clock::now();
    FT_ASSIGN_OR_RETURN(auto tps, MeasureBaseSpeeds(model, model_path, types, data, probe, memory_mib, stop));
    for (const auto& [t, v] : tps) out[kernels::TypeTraits(t).name] = v;
    std::vector<std::string> said;
    for (const auto& [n, v] : out) said.push_back(absl::StrFormat("%s %.0f", n, v));
    FT_LOG_INFO("training tokens/s per base type: {} (measured in {:.1f} s)", absl::StrJoin(said, ", "),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    nlohmann::json j;
    j["key"] = key;
    j["tokens_per_second"] = out;
    std::set<std::string> skipped;
    for (kernels::GgmlType t : types)
      if (!out.count(kernels::TypeTraits(t).name)) skipped.insert(kernels::TypeTraits(t).name);
    j["skipped"] = skipped;
    if (cache_path.empty()) {
      *memo = j.dump();
    } else if (absl::Status st = WriteFileAtomic(cache_path, j.dump(1)); !st.ok()) {
      FT_LOG_WARN("base speed cache not written: {}", st.ToString());
    }
    return out;
  };
}

absl::StatusOr<DaemonReport> RunDaemon(const DaemonOptions& options, const TaskRunner& trainer, const std::atomic<bool>& stop,
                                       const TaskEvaluator& evaluator) {
  DaemonOptions o = options;  // the profile gains the base speeds measured after a preflight join
  FT_ASSIGN_OR_RETURN(std::string ca, ReadFileToString(o.ca_pem));
  FT_ASSIGN_OR_RETURN(std::string cert, ReadFileToString(o.cert_pem));
  FT_ASSIGN_OR_RETURN(std::string key, ReadFileToString(o.key_pem));
  if (!o.state_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(o.state_dir, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("worker: cannot create state directory ", o.state_dir, ": ", ec.message()));
  }
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ca;
  ssl.pem_cert_chain = cert;
  ssl.pem_private_key = key;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(4 << 20);
  // Client keepalive: a coordinator that vanished (half-open TCP, a NAT that dropped the flow) is
  // noticed within ~40 s, also during a long-poll or a transfer, instead of waiting for a
  // deadline. The coordinator permits pings every 10 s (server.cc).
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  auto channel = grpc::CreateCustomChannel(o.address, grpc::SslCredentials(ssl), args);
  auto stub = rpc::v1::Coordinator::NewStub(channel);
  DaemonReport rep;

  // Outer loop: (re)join with exponential backoff; inner loop: tasks. A coordinator that went
  // away (UNAVAILABLE) or restarted and no longer knows us (FAILED_PRECONDITION) sends us back to
  // joining; the task in hand is retried (from the state directory when it was trained).
  auto transient = [](const absl::Status& s) {
    return absl::IsUnavailable(s) || absl::IsFailedPrecondition(s) || absl::IsCancelled(s) || absl::IsDeadlineExceeded(s) ||
           absl::IsAborted(s) || absl::IsResourceExhausted(s) || absl::IsDataLoss(s);  // DataLoss: a corrupted download, fetched again
  };
  int failed_joins = 0;
  std::chrono::steady_clock::time_point last_join_warning;
  while (!stop) {
    std::string me;
    int heartbeat_ms = 5000;
    // Every (re)join asks first what the run wants measured (a restarted coordinator may plan
    // other base types); the measurer answers from its cache when it holds every type asked for.
    bool preflight = static_cast<bool>(o.measure_bases);
    for (int backoff = 100; !stop; backoff = std::min(o.max_backoff_ms, backoff * 2)) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      rpc::v1::JoinRequest req;
      req.set_token(o.token);
      *req.mutable_profile() = o.profile;
      req.set_preflight(preflight);
      rpc::v1::JoinResponse resp;
      grpc::Status s = stub->Join(&ctx, req, &resp);
      if (s.ok() && preflight) {  // measure what the run's planner may choose, then join for real
        preflight = false;
        if (resp.base_types_size() > 0) {
          const std::vector<std::string> types(resp.base_types().begin(), resp.base_types().end());
          if (auto m = o.measure_bases(types); m.ok()) {
            o.profile.clear_base_tokens_per_second();
            for (const auto& [n, v] : *m) (*o.profile.mutable_base_tokens_per_second())[n] = v;
          } else if (!o.quiet) {
            FT_LOG_WARN("base speeds not measured ({}); the planner assumes the stored type's speed", m.status().ToString());
          }
        }
        backoff = 50;
        continue;
      }
      if (s.ok()) {
        if (failed_joins > 0 && !o.quiet) FT_LOG_INFO("joined the coordinator at {} after {} failed attempts", o.address, failed_joins);
        failed_joins = 0;
        me = resp.worker_id();
        if (resp.heartbeat_ms() > 0) heartbeat_ms = resp.heartbeat_ms();
        break;
      }
      if (s.error_code() != grpc::StatusCode::UNAVAILABLE && s.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) return FromGrpc(s, "join");
      // Say why we wait: the first failure, then about once a minute (the backoff caps at
      // max_backoff_ms), so a wrong address or a firewall shows in the log.
      const auto now = std::chrono::steady_clock::now();
      if (failed_joins++ == 0 || now - last_join_warning > std::chrono::seconds(60)) {
        if (!o.quiet)
          FT_LOG_WARN("cannot join the coordinator at {} ({} attempt{}): {}; retrying", o.address, failed_joins,
                      failed_joins == 1 ? "" : "s", FromGrpc(s, "join").ToString());
        last_join_warning = now;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(backoff));
    }
    if (stop) break;
    bool finished = false;
    while (!stop) {
      const absl::Status r = OneTask(*stub, me, heartbeat_ms, o, trainer, evaluator, &rep);
      if (r.ok()) continue;
      if (absl::IsOutOfRange(r)) {  // the run is over
        finished = true;
        break;
      }
      if (!transient(r)) return r;
      FT_LOG_WARN("worker {}: {}; reconnecting", me, r.ToString());
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      break;
    }
    if (finished) break;
  }
  return rep;
}

}  // namespace fedtune::worker

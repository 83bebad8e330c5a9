#include "coordinator/server.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <semaphore>
#include <atomic>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "aggregation/hetero_rank.h"
#include "common/fault.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/progress.h"
#include "common/rng.h"
#include "kernels/backend.h"
#include "coordinator/dashboard.h"
#include "coordinator/http_status.h"
#include "nlohmann/json.hpp"
#include "proto/service.grpc.pb.h"
#include "protocol/secagg_wire.h"
#include "protocol/task.h"
#include "protocol/update_codec.h"

namespace fedtune::coordinator {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
constexpr size_t kChunk = 1 << 20;

// A worker's self-description is shown on the status page, logged and fed to the planner: keep
// its strings short and printable and its numbers finite and non-negative, whatever it sent.
rpc::v1::Profile SanitizedProfile(const rpc::v1::Profile& in) {
  rpc::v1::Profile p = in;
  auto text = [](std::string* s) {
    if (s->size() > 128) s->resize(128);
    for (char& c : *s)
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
  };
  text(p.mutable_gpu());
  text(p.mutable_version());
  text(p.mutable_kernels());
  auto num = [](double v) { return std::isfinite(v) && v > 0 ? std::min(v, 1e12) : 0.0; };
  p.set_train_tokens_per_second(num(p.train_tokens_per_second()));
  p.set_link_mbps(num(p.link_mbps()));
  p.set_keep_speedup(std::clamp(num(p.keep_speedup()), 1.0, 4.0));
  p.set_batch4_speedup(p.batch4_speedup() > 0 ? std::clamp(num(p.batch4_speedup()), 0.25, 4.0) : 0.0);
  p.set_cores(std::max(p.cores(), 0));
  p.set_memory_bytes(std::max<int64_t>(p.memory_bytes(), 0));
  p.set_device_memory_bytes(std::max<int64_t>(p.device_memory_bytes(), 0));
  p.set_num_examples(std::max<int64_t>(p.num_examples(), 0));
  p.set_eval_examples(std::max<int64_t>(p.eval_examples(), 0));
  // Base speeds: known type names only (canonical spelling: one entry per type, so bounded),
  // finite and positive.
  std::map<std::string, double> speeds;
  for (const auto& [name, v] : in.base_tokens_per_second()) {
    const auto t = kernels::GgmlTypeFromName(name);
    if (t && std::isfinite(v) && v > 0) speeds.emplace(kernels::TypeTraits(*t).name, std::min(v, 1e12));
  }
  p.clear_base_tokens_per_second();
  for (const auto& [name, v] : speeds) (*p.mutable_base_tokens_per_second())[name] = v;
  return p;
}

std::string PeerCn(grpc::ServerContext* ctx) {
  auto auth = ctx->auth_context();
  if (!auth) return "";
  auto v = auth->FindPropertyValues("x509_common_name");
  return v.empty() ? "" : std::string(v[0].data(), v[0].size());
}

// SHA-256 of the peer's certificate (PEM as presented): binds a session to the certificate that
// joined, not just to a name.
std::string PeerCertSha(grpc::ServerContext* ctx) {
  auto auth = ctx->auth_context();
  if (!auth) return "";
  auto v = auth->FindPropertyValues("x509_pem_cert");
  if (v.empty()) return "";
  return protocol::Sha256Hex(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(v[0].data()), v[0].size()));
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

struct CoordinatorServer::Impl : public rpc::v1::Coordinator::Service, public federation::Transport {
  ServerOptions o;
  std::unique_ptr<federation::RoundEngine> engine;
  std::unique_ptr<grpc::Server> server;
  // Credentials, re-read when their files change (at most once a second): join tokens
  // (worker -> sha256 hex) and revoked workers (`fedtune provision --revoke`), checked on every RPC.
  std::map<std::string, std::string> token_hash;
  std::set<std::string> revoked;
  std::string revoked_path;
  int64_t creds_checked_ms = 0;
  fs::file_time_type tokens_mtime{}, revoked_mtime{};
  std::thread rounds_thread;
  int port = 0;
  std::unique_ptr<std::counting_semaphore<>> upload_slots, download_slots;

  struct WorkerInfo {
    rpc::v1::Profile profile;
    std::string cert_sha;   // the certificate it joined with
    int transfers = 0;      // uploads + downloads in progress (one at a time)
    int polls = 0;          // GetTask long polls in progress
    int64_t last_seen_ms = 0;
    int round = 0;          // round in hand (fetched, not yet received)
    double progress = 0;
    int updates_accepted = 0;
  };

  mutable std::mutex mu;
  std::condition_variable cv;
  bool done = false, shutdown = false;
  absl::Status status;
  std::map<std::string, WorkerInfo> workers;  // joined
  int round = 0, committed = 0;
  bool closed = false;  // the current round takes no more updates
  aggregation::TensorMap global;
  std::shared_ptr<const std::vector<uint8_t>> global_bytes;
  std::string global_sha;
  std::map<std::string, rpc::v1::Task> assigned;  // this round
  struct Declined {
    std::string worker, reason;
    double needed_mib = 0, budget_mib = 0;
    bool device = false;
  };
  std::vector<Declined> declined;  // this round: tasks declined over a worker's memory budget
  std::map<std::string, std::string> plan_notes;  // worker -> the planner's explanation (or why left out)
  std::set<std::string> fetched, received;
  std::set<std::string> told_over;  // workers answered SHUTDOWN (the run is over)
  // Accepted uploads waiting for the engine's thread: a plain update, or (secure rounds) a
  // masked input with the update's clear metadata (client, num_examples, metrics).
  struct Incoming {
    aggregation::ClientUpdate u;
    std::optional<std::vector<uint32_t>> masked;
  };
  std::deque<Incoming> inbox;
  bool evaluating = false;  // the assigned tasks are EVALUATE tasks (uploads refused)
  std::set<std::string> secure_out;  // secure round: selected workers that missed the key agreement
  std::deque<aggregation::EvalReport> eval_inbox;
  // Secure aggregation of the current round: the engine's thread opens and closes the stages
  // (and talks to the SecureServer); handlers deposit what workers send and wait for the answer.
  struct SecureStages {
    bool active = false;
    int stage = 0;  // 0 keys, 1 shares, 2 masked inputs, 3 unmask, 4 closed
    int64_t stage_deadline_ms = 0;
    size_t vector_length = 0;
    std::map<std::string, privacy::secagg::PublicKeys> keys;
    std::map<std::string, rpc::v1::SecAggKeys> signed_keys;  // as received (signature, certificate)
    std::map<int, std::string> owner_of;                     // id -> worker, once its keys are accepted
    std::map<std::string, std::vector<privacy::secagg::EncryptedShare>> shares;
    std::map<std::string, privacy::secagg::UnmaskReply> unmask;
    std::map<std::string, std::vector<privacy::secagg::PublicKeys>> keys_for;
    std::map<std::string, std::vector<privacy::secagg::EncryptedShare>> shares_for;
    std::vector<int> dropped, survivors;
  } sa;
  std::vector<aggregation::ClientFailure> rejected;
  // What became of each worker's upload in the training round `round` (true: accepted, false:
  // refused), kept through its evaluation and commit until the next round starts: a retry whose
  // answer was lost is told it (EvaluateOn reuses `received` and `assigned`).
  std::map<std::string, bool> upload_outcome;
  // Uploads of this round that broke off, kept for a resume (at most max_concurrent_uploads).
  struct Partial {
    int round = 0;
    std::string sha256;
    int64_t total = 0;
    std::vector<uint8_t> bytes;
    int64_t kept_ms = 0;  // eviction: the oldest goes first
  };
  std::map<std::string, Partial> partials;
  int64_t deadline_unix_ms = 0;
  int64_t bytes_in = 0, bytes_out = 0;  // this round
  size_t round_upload_limit = 0;        // bytes an upload of this round may have
  std::map<int, std::map<std::string, double>> history;  // committed rounds (from the ledger on restart)
  int64_t updates_accepted = 0, updates_rejected = 0;
  std::string phase = "waiting for workers";
  std::unique_ptr<HttpStatusServer> http;
  // Transfers past their deadline are cancelled (a stalled upload would hold its slot forever:
  // a blocking Read only returns when the peer sends or the connection dies).
  std::mutex watch_mu;
  std::map<grpc::ServerContext*, int64_t> watched;  // context -> deadline (unix ms)
  std::thread watchdog;
  std::atomic<bool> watchdog_stop{false};
  struct Watch {
    Impl* im;
    grpc::ServerContext* ctx;
    Watch(Impl* i, grpc::ServerContext* c, int64_t deadline_ms) : im(i), ctx(c) {
      std::lock_guard<std::mutex> l(im->watch_mu);
      im->watched[ctx] = deadline_ms;
    }
    ~Watch() {
      std::lock_guard<std::mutex> l(im->watch_mu);
      im->watched.erase(ctx);
    }
  };
  void WatchdogLoop() {
    while (!watchdog_stop) {
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      const int64_t now = UnixMs();
      std::lock_guard<std::mutex> l(watch_mu);
      for (auto& [ctx, deadline] : watched)
        if (now > deadline) ctx->TryCancel();
    }
  }

  void Seen(const std::string& cn) {
    if (auto it = workers.find(cn); it != workers.end()) it->second.last_seen_ms = UnixMs();
  }
  bool Online(const WorkerInfo& w, int64_t now) const { return now - w.last_seen_ms < o.offline_after_ms; }
  std::string StateOf(const std::string& id, const WorkerInfo& w, int64_t now) const {
    if (!Online(w, now)) return "offline";
    if (fetched.count(id) && !received.count(id) && !closed) return "training";
    return "idle";
  }
  std::vector<std::string> OnlineWorkers() const {
    std::vector<std::string> v;
    const int64_t now = UnixMs();
    for (const auto& [id, w] : workers)
      if (Online(w, now)) v.push_back(id);
    return v;
  }

  std::string MetricsText() {
    std::lock_guard<std::mutex> l(mu);
    std::string t;
    auto gauge = [&](const char* name, const char* help, double v) {
      absl::StrAppend(&t, "# HELP ", name, " ", help, "\n# TYPE ", name, " gauge\n", name, " ", v, "\n");
    };
    const int64_t now = UnixMs();
    gauge("fedtune_round", "Round in progress (or last committed).", round);
    gauge("fedtune_rounds_committed", "Rounds committed to the ledger.", committed);
    gauge("fedtune_rounds_total", "Rounds configured.", o.engine.settings.rounds);
    gauge("fedtune_workers_joined", "Workers that joined.", static_cast<double>(workers.size()));
    gauge("fedtune_workers_online", "Workers seen within the offline timeout.", static_cast<double>(OnlineWorkers().size()));
    gauge("fedtune_process_resident_bytes", "Coordinator resident memory.", CurrentRssMiB() * 1048576.0);
    gauge("fedtune_process_peak_resident_bytes", "Coordinator peak resident memory.", PeakRssMiB() * 1048576.0);
    absl::StrAppend(&t, "# HELP fedtune_updates_total Updates received, by outcome.\n# TYPE fedtune_updates_total counter\n");
    absl::StrAppend(&t, "fedtune_updates_total{outcome=\"accepted\"} ", updates_accepted, "\n");
    absl::StrAppend(&t, "fedtune_updates_total{outcome=\"rejected\"} ", updates_rejected, "\n");
    absl::StrAppend(&t, "# HELP fedtune_worker_last_seen_seconds Seconds since each worker's last request.\n# TYPE fedtune_worker_last_seen_seconds gauge\n");
    for (const auto& [id, w] : workers) absl::StrAppend(&t, "fedtune_worker_last_seen_seconds{worker=\"", id, "\"} ", (now - w.last_seen_ms) / 1000.0, "\n");
    absl::StrAppend(&t, "# HELP fedtune_worker_progress Fraction of the local steps done in the round in hand.\n# TYPE fedtune_worker_progress gauge\n");
    for (const auto& [id, w] : workers) absl::StrAppend(&t, "fedtune_worker_progress{worker=\"", id, "\"} ", w.round ? w.progress : 0.0, "\n");
    if (!history.empty()) {
      absl::StrAppend(&t, "# HELP fedtune_last_round Metrics of the last committed round.\n# TYPE fedtune_last_round gauge\n");
      for (const auto& [k, v] : history.rbegin()->second) absl::StrAppend(&t, "fedtune_last_round{metric=\"", k, "\"} ", v, "\n");
    }
    return t;
  }

  std::string StatusJson() {
    std::lock_guard<std::mutex> l(mu);
    nlohmann::json j;
    j["round"] = round;
    j["committed"] = committed;
    j["rounds_total"] = o.engine.settings.rounds;
    j["phase"] = done ? "done" : phase;
    j["updates_accepted"] = updates_accepted;
    j["updates_rejected"] = updates_rejected;
    j["rss_mib"] = CurrentRssMiB();
    j["workers"] = nlohmann::json::array();
    const int64_t now = UnixMs();
    for (const auto& [id, w] : workers)
      j["workers"].push_back({{"id", id},
                              {"state", StateOf(id, w, now)},
                              {"round", w.round},
                              {"progress", w.progress},
                              {"cores", w.profile.cores()},
                              {"version", w.profile.version()},
                              {"memory_bytes", w.profile.memory_bytes()},
                              {"train_tokens_per_second", w.profile.train_tokens_per_second()},
                              {"kernels", w.profile.kernels()},
                              {"link_mbps", w.profile.link_mbps()},
                              {"keep_speedup", w.profile.keep_speedup()},
                              {"batch4_speedup", w.profile.batch4_speedup()},
                              {"gpu", w.profile.gpu()},
                              {"device_memory_bytes", w.profile.device_memory_bytes()},
                              {"base_tokens_per_second", std::map<std::string, double>(w.profile.base_tokens_per_second().begin(),
                                                                                       w.profile.base_tokens_per_second().end())},
                              {"last_seen_seconds", (now - w.last_seen_ms) / 1000.0},
                              {"updates_accepted", w.updates_accepted},
                              {"plan", plan_notes.count(id) ? plan_notes.at(id) : std::string()}});
    j["rounds"] = nlohmann::json::array();
    for (const auto& [r, m] : history) {
      nlohmann::json row = m;
      row["round"] = r;
      j["rounds"].push_back(row);
    }
    return j.dump();
  }

  // Re-reads the token and revocation files when they changed (under `mu`).
  void RefreshCredentials() {
    const int64_t now = UnixMs();
    if (now - creds_checked_ms < 1000) return;
    creds_checked_ms = now;
    std::error_code ec;
    const auto tm = fs::last_write_time(o.tokens_path, ec);
    if (!ec && tm != tokens_mtime) {
      if (auto text = ReadFileToString(o.tokens_path); text.ok()) {
        std::map<std::string, std::string> fresh;
        std::istringstream ts(*text);
        std::string name, hash;
        while (ts >> name >> hash) fresh[name] = hash;
        token_hash = std::move(fresh);
        tokens_mtime = tm;
      }
    }
    const auto rm = fs::last_write_time(revoked_path, ec);
    if (!ec && rm != revoked_mtime) {
      if (auto text = ReadFileToString(revoked_path); text.ok()) {
        std::set<std::string> fresh;
        std::istringstream ts(*text);
        std::string name;
        while (ts >> name) fresh.insert(name);
        revoked = std::move(fresh);
        revoked_mtime = rm;
      }
    }
  }

  // Every RPC but Join (under `mu`): the caller joined, with this very certificate, and is
  // neither revoked nor without a token any more.
  grpc::Status Authorize(grpc::ServerContext* ctx, std::string* cn) {
    *cn = PeerCn(ctx);
    RefreshCredentials();
    if (cn->empty() || revoked.count(*cn) || !token_hash.count(*cn)) {
      workers.erase(*cn);
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "certificate revoked or unknown");
    }
    auto it = workers.find(*cn);
    if (it == workers.end()) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "join first");
    if (it->second.cert_sha != PeerCertSha(ctx))
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "not the certificate this worker joined with; join again");
    return grpc::Status::OK;
  }

  // One upload or download per worker at a time (released by the guard).
  struct TransferGuard {
    Impl* im = nullptr;
    std::string cn;
    ~TransferGuard() {
      if (!im) return;
      std::lock_guard<std::mutex> l(im->mu);
      if (auto it = im->workers.find(cn); it != im->workers.end()) --it->second.transfers;
    }
  };
  grpc::Status BeginTransfer(const std::string& cn, TransferGuard* g) {
    WorkerInfo& w = workers[cn];
    if (w.transfers >= 1) return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "a transfer for this worker is already in progress");
    ++w.transfers;
    g->im = this;
    g->cn = cn;
    return grpc::Status::OK;
  }

  // Calls that wait (GetTask long polls, secure-aggregation stages): two per worker at a time
  // (one, plus one while a reconnect overlaps); more would let one certificate tie up the
  // server's threads. The guard is released under `mu` (it lives inside the handler's lock).
  struct PollGuard {
    Impl* im = nullptr;
    std::string cn;
    ~PollGuard() {
      if (!im) return;
      if (auto it = im->workers.find(cn); it != im->workers.end()) --it->second.polls;
    }
  };
  grpc::Status BeginPoll(const std::string& cn, PollGuard* g) {
    WorkerInfo& w = workers[cn];
    if (w.polls >= 2) return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "too many concurrent waiting calls from this worker");
    ++w.polls;
    g->im = this;
    g->cn = cn;
    return grpc::Status::OK;
  }

  // ---- RPC handlers: validate, convert, hand over ----

  grpc::Status Join(grpc::ServerContext* ctx, const rpc::v1::JoinRequest* req, rpc::v1::JoinResponse* resp) override {
    const std::string cn = PeerCn(ctx);
    const std::vector<uint8_t> tok(req->token().begin(), req->token().end());
    const rpc::v1::Profile p = SanitizedProfile(req->profile());
    {
      std::lock_guard<std::mutex> l(mu);
      // Stopping without having finished the run (SIGTERM, an error): come back later; the
      // worker's join backoff applies.
      if (shutdown || (done && !status.ok())) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
      RefreshCredentials();
      auto it = token_hash.find(cn);
      if (cn.empty() || it == token_hash.end() || revoked.count(cn) || req->token().size() > 256 || protocol::Sha256Hex(tok) != it->second) {
        FT_LOG_WARN("join refused: worker '{}' (bad or missing token, or revoked)", cn);
        return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "unknown worker or bad join token");
      }
      if (req->preflight()) {  // what to measure before joining; not registered
        if (o.engine.planning)
          for (kernels::GgmlType t : o.engine.planning->options.base_types) resp->add_base_types(kernels::TypeTraits(t).name);
        resp->set_run_id(fs::path(o.engine.state_dir).filename().string());
        resp->set_worker_id(cn);
        return grpc::Status::OK;
      }
      WorkerInfo& w = workers[cn];
      w.profile = p;
      w.last_seen_ms = UnixMs();
      w.cert_sha = PeerCertSha(ctx);
    }
    cv.notify_all();
    FT_LOG_INFO("worker '{}' joined ({} cores, {:.1f} GiB, {:.0f} training tokens/s, kernels {})", cn, p.cores(),
                static_cast<double>(p.memory_bytes()) / (1 << 30), p.train_tokens_per_second(), p.kernels());
    resp->set_run_id(fs::path(o.engine.state_dir).filename().string());
    resp->set_worker_id(cn);
    resp->set_heartbeat_ms(o.heartbeat_ms);
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext* ctx, const rpc::v1::HeartbeatRequest* req, rpc::v1::HeartbeatResponse* resp) override {
    std::lock_guard<std::mutex> l(mu);
    std::string cn;
    if (grpc::Status a = Authorize(ctx, &cn); !a.ok()) return a;
    Seen(cn);
    WorkerInfo& w = workers[cn];
    if (req->has_profile()) w.profile = SanitizedProfile(req->profile());
    w.round = req->round();
    w.progress = std::isfinite(req->progress()) ? std::clamp(req->progress(), 0.0, 1.0) : 0.0;
    resp->set_shutdown(done || shutdown);
    if (auto p = partials.find(cn); p != partials.end() && p->second.round == req->round()) {
      resp->set_upload_resume_offset(static_cast<int64_t>(p->second.bytes.size()));
      resp->set_upload_sha256(p->second.sha256);
    }
    // Abandon a round that is over, closed early, or not (any more) this worker's.
    resp->set_abandon_round(req->round() != 0 && (req->round() != round || closed || evaluating || !assigned.count(cn) || received.count(cn) ||
                                                  secure_out.count(cn)));
    return grpc::Status::OK;
  }

  grpc::Status GetTask(grpc::ServerContext* ctx, const rpc::v1::GetTaskRequest* req, rpc::v1::Task* task) override {
    std::unique_lock<std::mutex> l(mu);
    std::string cn;
    if (grpc::Status a = Authorize(ctx, &cn); !a.ok()) return a;
    PollGuard poll;  // destroyed while `l` still holds mu
    if (grpc::Status p = BeginPoll(cn, &poll); !p.ok()) return p;
    Seen(cn);
    workers[cn].round = 0;
    const auto until = Clock::now() + std::chrono::milliseconds(std::clamp(req->wait_ms(), 0, 60000));
    // A worker asks only when it holds no task, so a task it fetched before (and lost to a
    // restart or a failed transfer) is handed out again until its update is in.
    auto has_task = [&] {
      return !closed && UnixMs() < deadline_unix_ms && assigned.count(cn) && !received.count(cn) && !secure_out.count(cn);
    };
    cv.wait_until(l, until, [&] { return done || shutdown || has_task(); });
    if (!workers.count(cn)) return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "certificate revoked");
    Seen(cn);
    if (done && status.ok()) {  // every round committed: the worker may stop
      task->set_kind(rpc::v1::Task::SHUTDOWN);
      told_over.insert(cn);
      cv.notify_all();
    } else if (done || shutdown) {
      // The coordinator stops before the run is over (SIGTERM for a restart or an upgrade, an
      // error): the worker keeps its state and rejoins when the coordinator is back, instead of
      // ending as if the run were finished.
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down; the run continues when it is back");
    } else if (has_task()) {
      *task = assigned[cn];
      fetched.insert(cn);
      workers[cn].round = round;
      workers[cn].progress = 0;
    } else {
      task->set_kind(rpc::v1::Task::NO_TASK);
    }
    return grpc::Status::OK;
  }

  grpc::Status DownloadAdapter(grpc::ServerContext* ctx, const rpc::v1::DownloadRequest* req, grpc::ServerWriter<rpc::v1::Chunk>* w) override {
    std::string cn;
    TransferGuard transfer;
    std::shared_ptr<const std::vector<uint8_t>> bytes;
    std::string sha;
    {
      std::lock_guard<std::mutex> l(mu);
      if (grpc::Status a = Authorize(ctx, &cn); !a.ok()) return a;
      if (req->round() != round) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("round ", req->round(), " is not current (", round, ")"));
      if (grpc::Status t = BeginTransfer(cn, &transfer); !t.ok()) return t;
      bytes = global_bytes;  // shared, never copied per download
      sha = global_sha;
    }
    if (!bytes) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "no adapter is published yet");
    if (req->offset() < 0 || static_cast<size_t>(req->offset()) > bytes->size()) return grpc::Status(grpc::StatusCode::OUT_OF_RANGE, "bad offset");
    // Bounded wait: a slot held by a dead peer (until keepalive notices) must not stall everyone.
    if (!download_slots->try_acquire_for(std::chrono::seconds(60))) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator busy; retry");
    struct Release {
      std::counting_semaphore<>& s;
      ~Release() { s.release(); }
    } release{*download_slots};
    const Watch watch(this, ctx, UnixMs() + o.deadline_ms);  // a download that stalls is cancelled too
    int64_t sent = 0, seen_ms = UnixMs();
    for (size_t off = static_cast<size_t>(req->offset()); off < bytes->size() || (off == 0 && bytes->empty()); off += kChunk) {
      rpc::v1::Chunk c;
      c.set_offset(static_cast<int64_t>(off));
      const size_t n = std::min(kChunk, bytes->size() - off);
      c.set_data(bytes->data() + off, n);
      c.set_total_bytes(static_cast<int64_t>(bytes->size()));
      if (off + n == bytes->size()) c.set_sha256(sha);
      if (!w->Write(c)) return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      sent += static_cast<int64_t>(n);
      if (UnixMs() - seen_ms > 1000) {  // a slow download keeps the worker online
        seen_ms = UnixMs();
        std::lock_guard<std::mutex> l(mu);
        Seen(cn);
      }
      if (bytes->empty()) break;
    }
    std::lock_guard<std::mutex> l(mu);
    if (req->round() == round) bytes_out += sent;
    return grpc::Status::OK;
  }

  // Refusal of an upload as a status the worker can act on, under `mu`.
  std::optional<grpc::Status> UploadRefusal(const std::string& cn, int r) const {
    if (!workers.count(cn)) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "join first");
    // A retry (its answer was lost) is told what became of the update, also while the round
    // evaluates or after it was committed: refused (it does not count: the worker rolls back what
    // training changed) or received (it counts: the worker keeps it).
    if (auto oc = upload_outcome.find(cn); r == round && oc != upload_outcome.end()) {
      if (oc->second) return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "update already received for this round");
      for (const auto& f : rejected)
        if (f.client == cn) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("update refused for this round: ", f.status.message()));
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "update refused for this round");
    }
    if (r != round || !assigned.count(cn)) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("no task for '", cn, "' in round ", r));
    if (received.count(cn)) return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "already received for this round");
    // From here on the worker's update was never received: "closed" means it will not count.
    if (evaluating) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("round ", r, " is closed"));
    if (closed) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("round ", r, " is closed"));
    // Secure rounds: only after the key agreement, and only from the workers that completed it.
    if (sa.active && (sa.stage != 2 || !sa.shares_for.count(cn)))
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "no masked input expected from this worker now");
    // (FAILED_PRECONDITION, not DEADLINE_EXCEEDED, which a worker cannot tell from its own RPC
    // timing out: the update will not count, and the worker rolls back.)
    if (UnixMs() > deadline_unix_ms) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("round ", r, " is closed: its deadline has passed"));
    return std::nullopt;
  }

  grpc::Status UploadUpdate(grpc::ServerContext* ctx, grpc::ServerReader<rpc::v1::UploadMessage>* r, rpc::v1::UploadResponse* resp) override {
    const std::string cn = PeerCn(ctx);
    {
      std::lock_guard<std::mutex> l(mu);
      std::string who;
      if (grpc::Status a = Authorize(ctx, &who); !a.ok()) return a;
    }
    rpc::v1::UploadMessage m;
    {
      const Watch header_watch(this, ctx, UnixMs() + 30000);  // a stream that never sends its header
      if (!r->Read(&m) || !m.has_header()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "upload must start with a header");
    }
    const rpc::v1::UpdateHeader h = m.header();
    if (!h.declined().empty()) {  // the worker declines its task (over its memory budget): recorded for re-planning
      std::lock_guard<std::mutex> l(mu);
      std::string who;
      if (grpc::Status a = Authorize(ctx, &who); !a.ok()) return a;
      if (auto refusal = UploadRefusal(cn, h.round())) return *refusal;
      if (h.secure() || h.total_bytes() != 0 || !std::isfinite(h.declined_needed_mib()) || !std::isfinite(h.declined_budget_mib()) ||
          h.declined_needed_mib() < 0 || h.declined_budget_mib() < 0)
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "a declined task carries no payload and finite figures");
      FT_LOG_WARN("worker '{}' declined round {}: {}", cn, h.round(), h.declined().substr(0, 300));
      received.insert(cn);
      declined.push_back({cn, h.declined().substr(0, 300), h.declined_needed_mib(), h.declined_budget_mib(), h.declined_device()});
      workers[cn].round = 0;
      Seen(cn);
      cv.notify_all();
      resp->set_accepted(false);
      resp->set_reason("declined: recorded");
      return grpc::Status::OK;
    }
    int64_t round_deadline_ms = 0;
    size_t limit = 0;
    TransferGuard transfer;
    {
      std::lock_guard<std::mutex> l(mu);
      std::string who;
      if (grpc::Status a = Authorize(ctx, &who); !a.ok()) return a;
      if (auto refusal = UploadRefusal(cn, h.round())) return *refusal;
      if (grpc::Status t = BeginTransfer(cn, &transfer); !t.ok()) return t;
      round_deadline_ms = deadline_unix_ms;
      limit = std::min(o.max_update_bytes, round_upload_limit);
    }
    // Limits derived from the adapter: an update is at most its deltas and Fisher (plus a small
    // header), a masked input exactly its words.
    if (h.total_bytes() < 0 || static_cast<size_t>(h.total_bytes()) > limit)
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("update of ", h.total_bytes(), " bytes exceeds the limit of ", limit));
    if (h.num_examples() < 0) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "negative num_examples");
    const Watch watch(this, ctx, round_deadline_ms + 5000);
    // Memory bound: only a few uploads are buffered and decoded at a time; the others wait here
    // with their data held back by gRPC's flow control.
    const auto slot_deadline = std::chrono::system_clock::time_point(std::chrono::milliseconds(round_deadline_ms));
    if (!upload_slots->try_acquire_until(slot_deadline)) return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the round's deadline passed while waiting");
    struct Release {
      std::counting_semaphore<>& s;
      ~Release() { s.release(); }
    } release{*upload_slots};
    aggregation::TensorMap snapshot;
    int rank = 0, train_rank = 0;
    int64_t first_block = 0;
    {
      std::lock_guard<std::mutex> l(mu);
      if (auto refusal = UploadRefusal(cn, h.round())) return *refusal;
      snapshot = global;  // shapes to check against
      if (auto a = assigned.find(cn); a != assigned.end()) {
        rank = a->second.plan().kind() == "diablo" ? a->second.plan().blocks() : a->second.plan().rank();  // what train_rank is out of
        train_rank = a->second.plan().train_rank();
        if (a->second.plan().kind() == "diablo") first_block = protocol::FirstBlock(rank, train_rank, h.round(), a->second.plan().block_offset());
      }
    }
    // A worker given a lower rank sends a rank-r update (aggregation/hetero_rank.h; DiaBlo: r
    // blocks of this round's window): check it against those components; the round engine pads it.
    if (train_rank > 0 && train_rank < rank) {
      auto cut = aggregation::TruncateRank(snapshot, rank, train_rank, first_block);
      if (!cut.ok()) return grpc::Status(grpc::StatusCode::INTERNAL, std::string(cut.status().message()));
      snapshot = std::move(*cut);
    }
    std::vector<uint8_t> bytes;
    {
      std::lock_guard<std::mutex> l(mu);
      auto p = partials.find(cn);
      if (h.resume_offset() != 0) {  // continue an upload that broke off, from where it stopped
        if (p == partials.end() || p->second.round != h.round() || p->second.sha256 != h.sha256() || p->second.total != h.total_bytes() ||
            static_cast<int64_t>(p->second.bytes.size()) != h.resume_offset())
          return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("no interrupted upload to resume at offset ", h.resume_offset()));
        bytes = std::move(p->second.bytes);
      }
      if (p != partials.end()) partials.erase(p);
    }
    bytes.reserve(static_cast<size_t>(h.total_bytes()));
    int64_t seen_ms = UnixMs();
    while (r->Read(&m)) {
      if (!m.has_chunk() || m.chunk().offset() != static_cast<int64_t>(bytes.size()) ||
          bytes.size() + m.chunk().data().size() > static_cast<size_t>(h.total_bytes()))
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "chunk out of order or beyond the announced size");
      bytes.insert(bytes.end(), m.chunk().data().begin(), m.chunk().data().end());
      if (UnixMs() - seen_ms > 1000) {  // the transfer is the worker's heartbeat: a slow link is not offline
        seen_ms = UnixMs();
        std::lock_guard<std::mutex> l(mu);
        Seen(cn);
      }
    }
    resp->set_received_bytes(static_cast<int64_t>(bytes.size()));
    if (bytes.size() != static_cast<size_t>(h.total_bytes())) {
      const size_t got = bytes.size();
      std::lock_guard<std::mutex> l(mu);
      if (got > 0 && !shutdown && !UploadRefusal(cn, h.round())) {  // keep what came for a resume
        // At most max_concurrent_uploads kept (memory: as many again as the upload slots buffer).
        if (partials.size() >= static_cast<size_t>(std::max(1, o.max_concurrent_uploads)))
          partials.erase(std::min_element(partials.begin(), partials.end(),
                                          [](const auto& a, const auto& b) { return a.second.kept_ms < b.second.kept_ms; }));
        partials[cn] = {h.round(), h.sha256(), h.total_bytes(), std::move(bytes), UnixMs()};
      }
      return grpc::Status(grpc::StatusCode::DATA_LOSS, absl::StrCat("upload truncated at ", got, " of ", h.total_bytes(), " bytes"));
    }
    if (protocol::Sha256Hex(bytes) != h.sha256()) return grpc::Status(grpc::StatusCode::DATA_LOSS, "upload checksum mismatch");
    Incoming in;
    absl::StatusOr<aggregation::ClientUpdate> u = absl::InternalError("unset");
    if (h.secure()) {  // a masked input: only its length can be checked here
      size_t words = 0;
      {
        std::lock_guard<std::mutex> l(mu);
        words = sa.active ? sa.vector_length : 0;
      }
      auto y = words ? protocol::DecodeMasked(bytes, words) : absl::FailedPreconditionError("not a secure-aggregation round");
      if (y.ok() && h.num_examples() < 0) y = absl::InvalidArgumentError("negative num_examples");
      if (y.ok()) {
        in.masked = std::move(*y);
        aggregation::ClientUpdate cu;
        cu.client = cn;
        cu.num_examples = h.num_examples();
        u = std::move(cu);
      } else {
        u = y.status();
      }
    } else {
      u = protocol::DecodeUpdate(bytes, snapshot, o.max_update_bytes, cn);
    }
    snapshot.clear();
    std::unique_lock<std::mutex> l(mu);
    if (auto refusal = UploadRefusal(cn, h.round())) return *refusal;
    bytes_in += static_cast<int64_t>(bytes.size());
    if (!u.ok()) {
      FT_LOG_WARN("rejected update from '{}' in round {}: {}", cn, h.round(), u.status().ToString());
      received.insert(cn);
      rejected.push_back({cn, u.status()});
      upload_outcome[cn] = false;
      ++updates_rejected;
      cv.notify_all();
      resp->set_accepted(false);
      resp->set_reason(std::string(u.status().message()));
      return grpc::Status::OK;
    }
    for (const auto& [k, v] : h.metrics())
      if (std::isfinite(v)) u->metrics[k] = v;  // client-reported figures, for the ledger only
    // Back-pressure: wait while the aggregator has enough decoded updates queued.
    cv.wait(l, [&] { return shutdown || inbox.size() < static_cast<size_t>(o.max_concurrent_uploads) || h.round() != round || closed; });
    if (auto refusal = UploadRefusal(cn, h.round())) return *refusal;
    received.insert(cn);
    upload_outcome[cn] = true;
    in.u = std::move(*u);
    inbox.push_back(std::move(in));
    ++updates_accepted;
    ++workers[cn].updates_accepted;
    workers[cn].round = 0;
    Seen(cn);
    l.unlock();
    cv.notify_all();
    resp->set_accepted(true);
    return grpc::Status::OK;
  }

  // ReportEvaluation: a worker's scores for its EVALUATE task, checked and handed to the engine.
  grpc::Status ReportEvaluation(grpc::ServerContext* ctx, const rpc::v1::EvalReport* req, rpc::v1::EvalAck* ack) override {
    std::lock_guard<std::mutex> l(mu);
    std::string cn;
    if (grpc::Status a = Authorize(ctx, &cn); !a.ok()) return a;
    Seen(cn);
    if (!evaluating || closed || req->round() != round || !assigned.count(cn))
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("no evaluation for '", cn, "' in round ", req->round()));
    if (received.count(cn)) return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "evaluation already reported");
    auto refuse = [&](const std::string& why) {
      ack->set_accepted(false);
      ack->set_reason(why);
      received.insert(cn);
      return grpc::Status::OK;
    };
    // Limits: a report can weigh at most as much as the examples the worker said it holds.
    const int64_t held = workers[cn].profile.eval_examples();
    if (req->num_examples() < 1 || req->num_examples() > std::max<int64_t>(held, 1)) return refuse("num_examples outside [1, eval_examples]");
    aggregation::EvalReport rep;
    rep.client = cn;
    rep.num_examples = req->num_examples();
    for (const auto& [k, v] : req->metrics()) {
      if (k != "eval_loss" && k != "eval_ppl" && k != "accuracy") return refuse("unknown metric " + k);
      if (!std::isfinite(v) || v < 0 || (k == "accuracy" && v > 1)) return refuse("metric " + k + " out of range");
      rep.metrics[k] = v;
    }
    received.insert(cn);
    eval_inbox.push_back(std::move(rep));
    cv.notify_all();
    ack->set_accepted(true);
    return grpc::Status::OK;
  }

  // SecureAggregation: deposit the worker's message for the stage, then wait (bounded) until the
  // engine's thread closes the stage and answer with what the worker needs next.
  grpc::Status SecureAggregation(grpc::ServerContext* ctx, const rpc::v1::SecAggRequest* req, rpc::v1::SecAggResponse* resp) override {
    std::unique_lock<std::mutex> l(mu);
    std::string cn;
    if (grpc::Status a = Authorize(ctx, &cn); !a.ok()) return a;
    PollGuard poll;  // destroyed while `l` still holds mu
    if (grpc::Status p = BeginPoll(cn, &poll); !p.ok()) return p;
    Seen(cn);
    if (!sa.active || req->round() != round || !assigned.count(cn))
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("no secure aggregation for '", cn, "' in round ", req->round()));
    auto wait_for_stage = [&](int stage) {
      cv.wait_until(l, std::chrono::system_clock::time_point(std::chrono::milliseconds(sa.stage_deadline_ms + 1000)),
                    [&] { return shutdown || !sa.active || sa.stage >= stage; });
      return !shutdown && sa.active && sa.stage >= stage;
    };
    switch (req->step()) {
      case rpc::v1::SecAggRequest::ADVERTISE_KEYS: {
        if (sa.stage != 0 || sa.keys.count(cn)) {
          resp->set_dropped_from_round(true);
          return grpc::Status::OK;
        }
        auto k = protocol::FromProto(req->keys());
        if (!k.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(k.status().message()));
        if (req->keys().certificate().size() > (16u << 10) || req->keys().signature().size() > 1024)
          return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "oversized certificate or signature in the key advertisement");
        sa.keys[cn] = *k;
        sa.signed_keys[cn] = req->keys();  // relayed as is: the neighbours check the signature
        cv.notify_all();
        const int my_stage = 1;
        if (!wait_for_stage(my_stage) || !sa.keys_for.count(cn)) {
          resp->set_dropped_from_round(true);
          return grpc::Status::OK;
        }
        for (const auto& pk : sa.keys_for[cn]) {
          auto owner = sa.owner_of.find(pk.id);
          *resp->add_keys() = owner != sa.owner_of.end() ? sa.signed_keys[owner->second] : protocol::ToProto(pk);
        }
        return grpc::Status::OK;
      }
      case rpc::v1::SecAggRequest::SHARE_KEYS: {
        if (sa.stage != 1 || !sa.keys_for.count(cn) || sa.shares.count(cn)) {
          resp->set_dropped_from_round(true);
          return grpc::Status::OK;
        }
        if (req->shares_size() > static_cast<int>(assigned.size()))
          return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "more shares than clients in the round");
        std::vector<privacy::secagg::EncryptedShare> shares;
        for (const auto& sh : req->shares()) shares.push_back(protocol::FromProto(sh));
        sa.shares[cn] = std::move(shares);
        cv.notify_all();
        if (!wait_for_stage(2) || !sa.shares_for.count(cn)) {
          resp->set_dropped_from_round(true);
          return grpc::Status::OK;
        }
        for (const auto& sh : sa.shares_for[cn]) *resp->add_shares() = protocol::ToProto(sh);
        return grpc::Status::OK;
      }
      case rpc::v1::SecAggRequest::MASKED_INPUT: {
        if (!received.count(cn)) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "upload the masked input first");
        // The masked-input stage lasts until the round's deadline (or every input is in).
        cv.wait_until(l, std::chrono::system_clock::time_point(std::chrono::milliseconds(deadline_unix_ms + o.secure_stage_ms)),
                      [&] { return shutdown || !sa.active || sa.stage >= 3; });
        if (shutdown || !sa.active || sa.stage < 3) {
          resp->set_dropped_from_round(true);
          return grpc::Status::OK;
        }
        for (int d : sa.dropped) resp->add_dropped(d);
        for (int v : sa.survivors) resp->add_survivors(v);
        return grpc::Status::OK;
      }
      case rpc::v1::SecAggRequest::UNMASK: {
        if (sa.stage != 3 || sa.unmask.count(cn)) {
          resp->set_dropped_from_round(true);
          return grpc::Status::OK;
        }
        auto reply = protocol::FromProto(req->unmask());
        if (!reply.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(reply.status().message()));
        sa.unmask[cn] = std::move(*reply);
        cv.notify_all();
        return grpc::Status::OK;
      }
      default:
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "unknown secure-aggregation step");
    }
  }

  // Engine thread: waits until `complete()` or the stage deadline (or shutdown).
  bool WaitStage(std::unique_lock<std::mutex>& l, int64_t deadline_ms, const std::function<bool()>& complete) {
    cv.wait_until(l, std::chrono::system_clock::time_point(std::chrono::milliseconds(deadline_ms)), [&] { return shutdown || complete(); });
    return !shutdown;
  }

  // The key-agreement stages of a secure round, before training: keys, then encrypted shares;
  // the SecureServer checks every message against its sender.
  absl::Status SecureSetup(federation::SecureServer& sec, federation::Collector& col) {
    std::unique_lock<std::mutex> l(mu);
    const size_t n = assigned.size();
    if (!WaitStage(l, sa.stage_deadline_ms, [&] { return sa.keys.size() == n; })) return absl::CancelledError("coordinator shut down");
    for (const auto& [name, k] : sa.keys) {
      if (absl::Status st = sec.Keys(name, k); !st.ok()) {
        FT_LOG_WARN("secure aggregation: keys of '{}' refused: {}", name, st.ToString());
      } else {
        sa.owner_of[k.id] = name;
      }
    }
    for (const auto& [name, k] : sa.keys) sa.keys_for[name] = sec.KeysFor(name);
    sa.stage = 1;
    sa.stage_deadline_ms = UnixMs() + o.secure_stage_ms;
    cv.notify_all();
    if (!WaitStage(l, sa.stage_deadline_ms, [&] { return sa.shares.size() == sa.keys_for.size(); })) return absl::CancelledError("coordinator shut down");
    for (const auto& [name, sh] : sa.shares)
      if (absl::Status st = sec.Shares(name, sh); !st.ok()) FT_LOG_WARN("secure aggregation: shares of '{}' refused: {}", name, st.ToString());
    for (const auto& [name, sh] : sa.shares) sa.shares_for[name] = sec.SharesFor(name);
    for (const auto& [name, t] : assigned)
      if (!sa.shares_for.count(name)) {
        secure_out.insert(name);  // no task for it any more this round (it would fetch the adapter again and again)
        col.Fail(name, absl::DeadlineExceededError("missed the key agreement"), "dropped (key agreement)");
      }
    sa.stage = 2;
    sa.stage_deadline_ms = deadline_unix_ms;
    cv.notify_all();
    return absl::OkStatus();
  }

  // After the masked inputs: the unmask request, then the survivors' replies.
  absl::Status SecureUnmask(federation::SecureServer& sec) {
    std::unique_lock<std::mutex> l(mu);
    sa.dropped = sec.Dropped();
    sa.survivors = sec.Survivors();
    sa.stage = 3;
    sa.stage_deadline_ms = UnixMs() + o.secure_stage_ms;
    cv.notify_all();
    MaybeCrash("during-unmask", round);
    std::set<std::string> alive;
    for (int id : sa.survivors) alive.insert(sec.clients()[static_cast<size_t>(id)]);
    if (!WaitStage(l, sa.stage_deadline_ms, [&] {
          for (const std::string& a : alive)
            if (!sa.unmask.count(a)) return false;
          return true;
        }))
      return absl::CancelledError("coordinator shut down");
    for (const auto& [name, reply] : sa.unmask)
      if (absl::Status st = sec.Unmask(name, reply); !st.ok()) FT_LOG_WARN("secure aggregation: unmask reply of '{}' refused: {}", name, st.ToString());
    sa.stage = 4;
    cv.notify_all();
    return absl::OkStatus();
  }

  grpc::Status GetStatus(grpc::ServerContext* ctx, const rpc::v1::StatusRequest*, rpc::v1::StatusResponse* resp) override {
    std::lock_guard<std::mutex> l(mu);
    std::string cn;
    if (grpc::Status a = Authorize(ctx, &cn); !a.ok()) return a;
    resp->set_run_id(fs::path(o.engine.state_dir).filename().string());
    resp->set_round(round);
    resp->set_rounds_total(o.engine.settings.rounds);
    resp->set_phase(done ? "done" : phase);
    const int64_t now = UnixMs();
    for (const auto& [id, w] : workers) {
      auto* ws = resp->add_workers();
      ws->set_worker_id(id);
      *ws->mutable_profile() = w.profile;
      ws->set_state(StateOf(id, w, now));
      ws->set_last_seen_unix_ms(w.last_seen_ms);
      ws->set_rounds_completed(w.updates_accepted);
      ws->set_round(w.round);
      ws->set_progress(w.progress);
    }
    if (!history.empty())
      for (const auto& [k, v] : history.rbegin()->second) (*resp->mutable_last_metrics())[k] = v;
    return grpc::Status::OK;
  }

  // ---- federation::Transport: the engine's rounds over the service (the engine's thread) ----

  absl::Status PublishGlobal(int r, const aggregation::TensorMap& g) {
    FT_ASSIGN_OR_RETURN(std::vector<uint8_t> b, protocol::EncodeTensors(g, r - 1));
    global_sha = protocol::Sha256Hex(b);
    global_bytes = std::make_shared<const std::vector<uint8_t>>(std::move(b));
    global = g;
    return absl::OkStatus();
  }

  void Phase(int r, const std::string& p) override {
    std::lock_guard<std::mutex> l(mu);
    if (r > 0) round = r;
    phase = p;
  }

  absl::StatusOr<std::vector<federation::ClientInfo>> Available(int, int min, int attempt) override {
    std::unique_lock<std::mutex> l(mu);
    if (attempt > 0)  // a retried round: back off a little; shutdown interrupts
      cv.wait_for(l, std::chrono::milliseconds(std::min(10000, 500 * attempt)), [&] { return shutdown; });
    // Re-check every second: workers that stop talking turn offline without an event.
    while (!shutdown && static_cast<int>(OnlineWorkers().size()) < min) cv.wait_for(l, std::chrono::seconds(1));
    if (shutdown) return absl::CancelledError("coordinator shut down");
    std::vector<federation::ClientInfo> v;
    for (const std::string& id : OnlineWorkers()) {
      const rpc::v1::Profile& p = workers[id].profile;
      federation::ClientInfo c;
      c.name = id;
      c.num_examples = std::max<int64_t>(0, p.num_examples());
      c.profile = planner::WorkerProfile{id, p.memory_bytes() > 0 ? static_cast<double>(p.memory_bytes()) / (1 << 20) : 1e12,
                                         p.train_tokens_per_second() > 0 ? p.train_tokens_per_second() : 100.0,
                                         p.link_mbps() > 0 ? p.link_mbps() : 100.0, 20, p.keep_speedup(),
                                         kernels::IsCpuBf16Name(p.kernels())};
      c.profile->examples = static_cast<double>(c.num_examples);
      c.profile->batch4_speedup = p.batch4_speedup() > 0 ? p.batch4_speedup() : 1.0;
      c.profile->device_memory_mib = static_cast<double>(p.device_memory_bytes()) / (1 << 20);
      c.profile->device_bf16_gemm = p.device_bf16_gemm();
      if (o.engine.planning) {
        std::map<kernels::GgmlType, double> tps;
        for (const auto& [name, speed] : p.base_tokens_per_second()) tps[*kernels::GgmlTypeFromName(name)] = speed;  // names checked on arrival
        c.profile->base_speed = planner::RelativeBaseSpeeds(tps, o.engine.planning->shape.stored);
      }
      v.push_back(std::move(c));
    }
    return v;
  }

  absl::Status Planned(int, const planner::Plan& plan) override {
    std::lock_guard<std::mutex> l(mu);
    plan_notes.clear();
    for (const planner::WorkerPlan& wp : plan.workers) plan_notes[wp.worker] = wp.excluded ? wp.reason : wp.explanation;
    return absl::OkStatus();
  }

  absl::Status Train(int r, const aggregation::TensorMap& g, const std::vector<protocol::TrainTask>& tasks, federation::Collector& col,
                     std::map<std::string, double>& metrics) override {
    {
      std::unique_lock<std::mutex> l(mu);
      round = r;
      FT_RETURN_IF_ERROR(PublishGlobal(r, g));
      deadline_unix_ms = UnixMs() + o.deadline_ms;
      assigned.clear();
      fetched.clear();
      received.clear();
      rejected.clear();
      upload_outcome.clear();
      declined.clear();
      partials.clear();
      inbox.clear();
      closed = false;
      bytes_in = bytes_out = 0;
      for (protocol::TrainTask t : tasks) {
        t.adapter_sha256 = global_sha;
        t.adapter_bytes = static_cast<int64_t>(global_bytes->size());
        t.deadline_unix_ms = deadline_unix_ms;
        assigned[t.client] = protocol::ToProto(t);
      }
      evaluating = false;
      secure_out.clear();
      round_upload_limit = 2 * static_cast<size_t>(global_bytes->size()) + (1u << 20);
      sa = SecureStages();
      if (col.secure()) {
        sa.active = true;
        sa.vector_length = col.secure()->vector_length();
        sa.stage_deadline_ms = std::min(deadline_unix_ms, UnixMs() + o.secure_stage_ms);
      }
    }
    cv.notify_all();
    FT_LOG_INFO("round {}/{}: {} workers selected{}", r, o.engine.settings.rounds, tasks.size(), col.secure() ? " (secure aggregation)" : "");
    MaybeCrash("after-dispatch", r);
    if (col.secure()) FT_RETURN_IF_ERROR(SecureSetup(*col.secure(), col));
    // Collect until every selected worker has answered, the round has enough updates, or the
    // deadline passes; updates are folded in on this thread as they arrive (streaming).
    double rss_peak = CurrentRssMiB();
    // The same deadline the workers were told (secure rounds: key agreement came out of it).
    const auto deadline = std::chrono::system_clock::time_point(std::chrono::milliseconds(deadline_unix_ms));
    auto fold = [&](std::deque<Incoming>& batch) {
      for (auto& in : batch) {  // a refusal is recorded by the collector
        if (in.masked) {
          (void)col.AddMasked(in.u.client, std::move(*in.masked), in.u.num_examples, in.u.metrics);
        } else {
          (void)col.Add(std::move(in.u));
        }
        rss_peak = std::max(rss_peak, CurrentRssMiB());
      }
    };
    for (;;) {
      std::deque<Incoming> batch;
      bool complete = false;
      {
        std::unique_lock<std::mutex> l(mu);
        // Secure rounds: only the workers that completed the key agreement can send an input.
        const size_t expected = sa.active ? sa.shares_for.size() : assigned.size();
        cv.wait_until(l, deadline, [&] { return shutdown || !inbox.empty() || received.size() >= expected; });
        if (shutdown) return absl::CancelledError("coordinator shut down");
        batch.swap(inbox);
        complete = received.size() >= expected;
      }
      cv.notify_all();  // room in the inbox
      fold(batch);
      if (complete || std::chrono::system_clock::now() >= deadline || col.enough()) break;
    }
    // Close the round; updates accepted on upload meanwhile are still folded in.
    std::deque<Incoming> rest;
    std::vector<aggregation::ClientFailure> refused;
    std::vector<Declined> declines;
    std::vector<std::string> missing;
    {
      std::lock_guard<std::mutex> l(mu);
      closed = true;  // late workers are told to abandon; their uploads are refused
      rest.swap(inbox);
      refused = rejected;
      declines = declined;
      for (const auto& [w, t] : assigned)
        if (!received.count(w) && (!sa.active || sa.shares_for.count(w))) missing.push_back(w);
      metrics["bytes_up"] = static_cast<double>(bytes_in);
      metrics["bytes_down"] = static_cast<double>(bytes_out);
    }
    cv.notify_all();
    fold(rest);
    for (const auto& f : refused) col.Fail(f.client, f.status, absl::StrCat("rejected: ", f.status.message()));
    for (const auto& d : declines) col.Decline(d.worker, d.reason, d.needed_mib, d.budget_mib, d.device);
    const bool early = col.enough();
    for (const std::string& w : missing)
      col.Fail(w, absl::DeadlineExceededError(early ? "round closed after the target number of updates" : "no update before the deadline"),
               early ? "not needed (round closed)" : "missed deadline");
    if (col.secure()) FT_RETURN_IF_ERROR(SecureUnmask(*col.secure()));
    {
      std::lock_guard<std::mutex> l(mu);
      sa.active = false;
    }
    cv.notify_all();
    metrics["rss_peak_mib"] = rss_peak;
    return absl::OkStatus();
  }

  absl::Status Evaluate(int, const aggregation::TensorMap& g, std::map<std::string, double>& metrics) override {
    if (!o.evaluate) return absl::OkStatus();
    return o.evaluate(g, metrics);
  }

  std::vector<std::string> EvaluationClients(int) override {
    std::lock_guard<std::mutex> l(mu);
    std::vector<std::string> v;
    for (const std::string& id : OnlineWorkers())
      if (workers[id].profile.eval_examples() > 0) v.push_back(id);
    return v;
  }

  // EVALUATE tasks through the same long poll as training; the reports that arrive before the
  // deadline count.
  absl::StatusOr<std::vector<aggregation::EvalReport>> EvaluateOn(int r, const aggregation::TensorMap& g,
                                                                  const std::vector<protocol::TrainTask>& tasks) override {
    std::vector<aggregation::EvalReport> out;
    if (tasks.empty()) return out;
    {
      std::lock_guard<std::mutex> l(mu);
      round = r;
      FT_RETURN_IF_ERROR(PublishGlobal(r + 1, g));  // the adapter after round r
      deadline_unix_ms = UnixMs() + o.deadline_ms;
      assigned.clear();
      fetched.clear();
      received.clear();
      eval_inbox.clear();
      evaluating = true;
      closed = false;
      for (protocol::TrainTask t : tasks) {
        t.adapter_sha256 = global_sha;
        t.adapter_bytes = static_cast<int64_t>(global_bytes->size());
        t.deadline_unix_ms = deadline_unix_ms;
        assigned[t.client] = protocol::ToProto(t);
      }
    }
    cv.notify_all();
    std::unique_lock<std::mutex> l(mu);
    cv.wait_until(l, std::chrono::system_clock::time_point(std::chrono::milliseconds(deadline_unix_ms)),
                  [&] { return shutdown || received.size() >= assigned.size(); });
    if (shutdown) return absl::CancelledError("coordinator shut down");
    out.assign(eval_inbox.begin(), eval_inbox.end());
    eval_inbox.clear();
    evaluating = false;
    closed = true;
    assigned.clear();
    l.unlock();
    cv.notify_all();
    return out;
  }

  absl::Status Committed(const federation::RoundRecord& rec, const aggregation::TensorMap& g) override {
    {
      std::lock_guard<std::mutex> l(mu);
      global = g;
      if (rec.round > 0) committed = rec.round;
      assigned.clear();
      history[rec.round] = rec.metrics;
      phase = rec.round == o.engine.settings.rounds ? "done" : "waiting for workers";
    }
    const auto m = [&rec](const char* k) { return rec.metrics.count(k) ? rec.metrics.at(k) : 0.0; };
    if (rec.round > 0)
      FT_LOG_INFO("round {}/{} committed: {} accepted, {} failed; {:.2f} s ({:.2f} s outside training), {:.1f} MiB in, {:.1f} MiB out, peak RSS {:.0f} MiB",
                  rec.round, o.engine.settings.rounds, m("accepted"), m("failures"), m("wall_seconds"), m("overhead_seconds"), m("bytes_up") / 1048576.0,
                  m("bytes_down") / 1048576.0, m("rss_peak_mib"));
    return absl::OkStatus();
  }
};

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(ServerOptions o) {
  std::unique_ptr<CoordinatorServer> s(new CoordinatorServer());
  s->impl_ = std::make_unique<Impl>();
  Impl& im = *s->impl_;
  if (o.engine.state_dir.empty()) return absl::InvalidArgumentError("coordinator: state_dir is required");
  if (o.engine.quorum < 1) return absl::InvalidArgumentError("coordinator: quorum must be >= 1");
  if (o.engine.target_updates > 0 && o.engine.quorum > o.engine.target_updates)
    return absl::InvalidArgumentError(absl::StrCat("coordinator: quorum (", o.engine.quorum, ") exceeds target_updates (", o.engine.target_updates,
                                                   "): no round could commit"));
  FT_ASSIGN_OR_RETURN(std::string ca, ReadFileToString(o.ca_pem));
  FT_ASSIGN_OR_RETURN(std::string cert, ReadFileToString(o.cert_pem));
  FT_ASSIGN_OR_RETURN(std::string key, ReadFileToString(o.key_pem));
  FT_RETURN_IF_ERROR(ReadFileToString(o.tokens_path).status());
  im.revoked_path = (fs::path(o.tokens_path).parent_path() / "revoked.txt").string();
  o.engine.run_id = fs::path(o.engine.state_dir).filename().string();
  o.engine.evaluate_start = static_cast<bool>(o.evaluate);
  if (!o.engine.say) o.engine.say = [](const std::string& line) { FT_LOG_INFO("{}", line); };
  FT_ASSIGN_OR_RETURN(im.engine, federation::RoundEngine::Open(o.engine, o.initial_global));
  im.committed = im.engine->last_committed();
  im.global = im.engine->global();
  FT_ASSIGN_OR_RETURN(im.history, im.engine->ledger().AllMetrics());
  if (im.committed > 0) FT_LOG_INFO("resuming after committed round {}", im.committed);
  FT_LOG_INFO("strategy: {}", im.engine->strategy_summary());
  im.o = std::move(o);
  {
    std::lock_guard<std::mutex> l(im.mu);
    im.RefreshCredentials();
  }
  im.upload_slots = std::make_unique<std::counting_semaphore<>>(std::max(1, im.o.max_concurrent_uploads));
  im.download_slots = std::make_unique<std::counting_semaphore<>>(std::max(1, im.o.max_concurrent_downloads));
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = ca;
  ssl.pem_key_cert_pairs.push_back({key, cert});
  grpc::ServerBuilder b;
  b.AddListeningPort(im.o.address, grpc::SslServerCredentials(ssl), &im.port);
  b.RegisterService(&im);
  b.SetMaxReceiveMessageSize(4 << 20);
  // Keepalive pings find peers that vanished mid-transfer (half-open TCP), so their streams end.
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // The workers' keepalive pings (every 30 s) are welcome, idle or not; faster ones are strikes.
  b.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  b.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 2);
  // Memory bound for the transport: without it, every pending upload's data is buffered up to
  // its (BDP-grown) flow-control window, i.e. memory grows with the number of workers sending.
  // Under the quota's pressure gRPC shrinks its windows (bench/run_load.sh: 200 workers, 4 MB
  // updates: 2.2 GB peak without it, ~220 MiB with it and the allocator settings of
  // `fedtune coordinator`).
  grpc::ResourceQuota quota("fedtune-coordinator");
  quota.Resize(static_cast<size_t>(std::max(16, im.o.transport_memory_mib)) << 20);
  // Bounded threads and streams: a peer cannot make the server spawn without limit.
  quota.SetMaxThreads(std::max(64, im.o.max_threads));
  b.SetResourceQuota(quota);
  b.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, 32);
  im.server = b.BuildAndStart();
  if (!im.server || im.port == 0) return absl::UnavailableError(absl::StrCat("coordinator: cannot listen on ", im.o.address));
  if (!im.o.http_address.empty()) {
    FT_ASSIGN_OR_RETURN(im.http, HttpStatusServer::Start(im.o.http_address, {[&im] { return im.MetricsText(); }, [&im] { return DashboardHtml(im.StatusJson()); },
                                                                            [&im] { return im.StatusJson(); }},
                                                             HttpStatusOptions{im.o.http_token, im.o.http_allow_remote}));
  }
  im.watchdog = std::thread([&im] { im.WatchdogLoop(); });
  im.rounds_thread = std::thread([&im] {
    absl::Status st = im.engine->Run(im).status();
    {
      std::lock_guard<std::mutex> l(im.mu);
      im.status = st;
      im.done = true;
    }
    im.cv.notify_all();
  });
  return s;
}

CoordinatorServer::~CoordinatorServer() {
  if (!impl_) return;
  Shutdown();
  if (impl_->rounds_thread.joinable()) impl_->rounds_thread.join();
  if (impl_->server) impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->watchdog_stop = true;
  if (impl_->watchdog.joinable()) impl_->watchdog.join();
  impl_->http.reset();
}

int CoordinatorServer::port() const { return impl_->port; }

int CoordinatorServer::http_port() const { return impl_->http ? impl_->http->port() : 0; }

absl::Status CoordinatorServer::Wait() {
  std::unique_lock<std::mutex> l(impl_->mu);
  impl_->cv.wait(l, [&] { return impl_->done; });
  return impl_->status;
}

void CoordinatorServer::Shutdown() {
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    impl_->shutdown = true;
  }
  impl_->cv.notify_all();
}

int CoordinatorServer::TellWorkersTheRunIsOver(std::chrono::milliseconds max_wait) {
  Impl& im = *impl_;
  const auto until = std::chrono::steady_clock::now() + max_wait;
  std::unique_lock<std::mutex> l(im.mu);
  auto untold = [&] {
    const int64_t now = UnixMs();
    int n = 0;
    for (const auto& [cn, w] : im.workers)
      if (im.Online(w, now) && !im.told_over.count(cn)) ++n;
    return n;
  };
  // Re-checked on every SHUTDOWN answer and every 200 ms (workers also go offline meanwhile).
  while (!im.shutdown && untold() > 0 && std::chrono::steady_clock::now() < until)
    im.cv.wait_for(l, std::chrono::milliseconds(200));
  return untold();
}

aggregation::TensorMap CoordinatorServer::global() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return impl_->global;
}

int CoordinatorServer::last_committed_round() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return impl_->committed;
}

}  // namespace fedtune::coordinator

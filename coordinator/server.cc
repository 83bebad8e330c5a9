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
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/progress.h"
#include "common/rng.h"
#include "coordinator/dashboard.h"
#include "coordinator/http_status.h"
#include "coordinator/run_ledger.h"
#include "nlohmann/json.hpp"
#include "coordinator/update_codec.h"
#include "proto/service.grpc.pb.h"

namespace fedtune::coordinator {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
constexpr size_t kChunk = 1 << 20;

std::string PeerCn(grpc::ServerContext* ctx) {
  auto auth = ctx->auth_context();
  if (!auth) return "";
  auto v = auth->FindPropertyValues("x509_common_name");
  return v.empty() ? "" : std::string(v[0].data(), v[0].size());
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

struct CoordinatorServer::Impl : public rpc::v1::Coordinator::Service {
  ServerOptions o;
  std::unique_ptr<aggregation::Strategy> strategy;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<RunLedger> ledger;
  std::map<std::string, std::string> token_hash;  // worker -> sha256(token) hex
  std::thread rounds_thread;
  int port = 0;
  std::unique_ptr<std::counting_semaphore<>> upload_slots, download_slots;

  struct WorkerInfo {
    rpc::v1::Profile profile;
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
  std::map<std::string, std::string> plan_notes;  // worker -> the planner's explanation (or why left out)
  std::map<model::Module, double> importance;     // planner: where merged updates move
  std::set<std::string> fetched, received;
  std::deque<aggregation::ClientUpdate> inbox;
  std::vector<aggregation::ClientFailure> rejected;
  int64_t deadline_unix_ms = 0;
  int64_t bytes_in = 0, bytes_out = 0;  // this round
  std::map<int, std::map<std::string, double>> history;  // committed rounds (from the ledger on restart)
  int64_t updates_accepted = 0, updates_rejected = 0;
  std::string phase = "waiting for workers";
  std::unique_ptr<HttpStatusServer> http;

  void Seen(const std::string& cn) { workers[cn].last_seen_ms = UnixMs(); }
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
    gauge("fedtune_rounds_total", "Rounds configured.", o.rounds);
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
    j["rounds_total"] = o.rounds;
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
                              {"memory_bytes", w.profile.memory_bytes()},
                              {"train_tokens_per_second", w.profile.train_tokens_per_second()},
                              {"link_mbps", w.profile.link_mbps()},
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

  // ---- RPC handlers: validate, convert, hand over ----

  grpc::Status Join(grpc::ServerContext* ctx, const rpc::v1::JoinRequest* req, rpc::v1::JoinResponse* resp) override {
    const std::string cn = PeerCn(ctx);
    auto it = token_hash.find(cn);
    const std::vector<uint8_t> tok(req->token().begin(), req->token().end());
    if (cn.empty() || it == token_hash.end() || Sha256Hex(tok) != it->second) {
      FT_LOG_WARN("join refused: worker '{}' (bad or missing token)", cn);
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "unknown worker or bad join token");
    }
    {
      std::lock_guard<std::mutex> l(mu);
      WorkerInfo& w = workers[cn];
      w.profile = req->profile();
      w.last_seen_ms = UnixMs();
    }
    cv.notify_all();
    const auto& p = req->profile();
    FT_LOG_INFO("worker '{}' joined ({} cores, {:.1f} GiB, {:.0f} training tokens/s)", cn, p.cores(), static_cast<double>(p.memory_bytes()) / (1 << 30),
                p.train_tokens_per_second());
    resp->set_run_id(fs::path(o.state_dir).filename().string());
    resp->set_worker_id(cn);
    resp->set_heartbeat_ms(o.heartbeat_ms);
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext* ctx, const rpc::v1::HeartbeatRequest* req, rpc::v1::HeartbeatResponse* resp) override {
    std::lock_guard<std::mutex> l(mu);
    const std::string cn = PeerCn(ctx);
    auto it = workers.find(cn);
    if (it == workers.end()) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "join first");
    Seen(cn);
    WorkerInfo& w = it->second;
    if (req->has_profile()) w.profile = req->profile();
    w.round = req->round();
    w.progress = std::isfinite(req->progress()) ? std::clamp(req->progress(), 0.0, 1.0) : 0.0;
    resp->set_shutdown(done || shutdown);
    // Abandon a round that is over, closed early, or not (any more) this worker's.
    resp->set_abandon_round(req->round() != 0 && (req->round() != round || closed || !assigned.count(cn) || received.count(cn)));
    return grpc::Status::OK;
  }

  grpc::Status GetTask(grpc::ServerContext* ctx, const rpc::v1::GetTaskRequest* req, rpc::v1::Task* task) override {
    const std::string cn = PeerCn(ctx);
    std::unique_lock<std::mutex> l(mu);
    if (!workers.count(cn)) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "join first");
    Seen(cn);
    workers[cn].round = 0;
    const auto until = Clock::now() + std::chrono::milliseconds(std::clamp(req->wait_ms(), 0, 60000));
    // A worker asks only when it holds no task, so a task it fetched before (and lost to a
    // restart or a failed transfer) is handed out again until its update is in.
    auto has_task = [&] { return !closed && UnixMs() < deadline_unix_ms && assigned.count(cn) && !received.count(cn); };
    cv.wait_until(l, until, [&] { return done || shutdown || has_task(); });
    Seen(cn);
    if (done || shutdown) {
      task->set_kind(rpc::v1::Task::SHUTDOWN);
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
    std::shared_ptr<const std::vector<uint8_t>> bytes;
    std::string sha;
    {
      std::lock_guard<std::mutex> l(mu);
      if (!workers.count(PeerCn(ctx))) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "join first");
      if (req->round() != round) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("round ", req->round(), " is not current (", round, ")"));
      bytes = global_bytes;  // shared, never copied per download
      sha = global_sha;
    }
    if (req->offset() < 0 || static_cast<size_t>(req->offset()) > bytes->size()) return grpc::Status(grpc::StatusCode::OUT_OF_RANGE, "bad offset");
    // Bounded wait: a slot held by a dead peer (until keepalive notices) must not stall everyone.
    if (!download_slots->try_acquire_for(std::chrono::seconds(60))) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator busy; retry");
    struct Release {
      std::counting_semaphore<>& s;
      ~Release() { s.release(); }
    } release{*download_slots};
    int64_t sent = 0;
    for (size_t off = static_cast<size_t>(req->offset()); off < bytes->size() || (off == 0 && bytes->empty()); off += kChunk) {
      rpc::v1::Chunk c;
      c.set_offset(static_cast<int64_t>(off));
      const size_t n = std::min(kChunk, bytes->size() - off);
      c.set_data(bytes->data() + off, n);
      c.set_total_bytes(static_cast<int64_t>(bytes->size()));
      if (off + n == bytes->size()) c.set_sha256(sha);
      if (!w->Write(c)) return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      sent += static_cast<int64_t>(n);
      if (bytes->empty()) break;
    }
    std::lock_guard<std::mutex> l(mu);
    if (req->round() == round) bytes_out += sent;
    return grpc::Status::OK;
  }

  // Refusal of an upload as a status the worker can act on, under `mu`.
  std::optional<grpc::Status> UploadRefusal(const std::string& cn, int r) const {
    if (!workers.count(cn)) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "join first");
    if (r != round || !assigned.count(cn)) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("no task for '", cn, "' in round ", r));
    if (closed) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("round ", r, " is closed"));
    if (received.count(cn)) return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "update already received for this round");
    if (UnixMs() > deadline_unix_ms) return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the round's deadline has passed");
    return std::nullopt;
  }

  grpc::Status UploadUpdate(grpc::ServerContext* ctx, grpc::ServerReader<rpc::v1::UploadMessage>* r, rpc::v1::UploadResponse* resp) override {
    const std::string cn = PeerCn(ctx);
    rpc::v1::UploadMessage m;
    if (!r->Read(&m) || !m.has_header()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "upload must start with a header");
    const rpc::v1::UpdateHeader h = m.header();
    int64_t round_deadline_ms = 0;
    {
      std::lock_guard<std::mutex> l(mu);
      if (auto refusal = UploadRefusal(cn, h.round())) return *refusal;
      round_deadline_ms = deadline_unix_ms;
    }
    if (h.total_bytes() < 0 || static_cast<size_t>(h.total_bytes()) > o.max_update_bytes)
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("update of ", h.total_bytes(), " bytes exceeds the limit of ", o.max_update_bytes));
    // Memory bound: only a few uploads are buffered and decoded at a time; the others wait here
    // with their data held back by gRPC's flow control.
    const auto slot_deadline = std::chrono::system_clock::time_point(std::chrono::milliseconds(round_deadline_ms));
    if (!upload_slots->try_acquire_until(slot_deadline)) return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the round's deadline passed while waiting");
    struct Release {
      std::counting_semaphore<>& s;
      ~Release() { s.release(); }
    } release{*upload_slots};
    aggregation::TensorMap snapshot;
    {
      std::lock_guard<std::mutex> l(mu);
      if (auto refusal = UploadRefusal(cn, h.round())) return *refusal;
      snapshot = global;  // shapes to check against
    }
    std::vector<uint8_t> bytes;
    bytes.reserve(static_cast<size_t>(h.total_bytes()));
    while (r->Read(&m)) {
      if (!m.has_chunk() || m.chunk().offset() != static_cast<int64_t>(bytes.size()) ||
          bytes.size() + m.chunk().data().size() > static_cast<size_t>(h.total_bytes()))
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "chunk out of order or beyond the announced size");
      bytes.insert(bytes.end(), m.chunk().data().begin(), m.chunk().data().end());
    }
    resp->set_received_bytes(static_cast<int64_t>(bytes.size()));
    if (bytes.size() != static_cast<size_t>(h.total_bytes())) return grpc::Status(grpc::StatusCode::DATA_LOSS, "upload truncated");
    if (Sha256Hex(bytes) != h.sha256()) return grpc::Status(grpc::StatusCode::DATA_LOSS, "upload checksum mismatch");
    auto u = DecodeUpdate(bytes, snapshot, o.max_update_bytes, cn);
    snapshot.clear();
    std::unique_lock<std::mutex> l(mu);
    if (auto refusal = UploadRefusal(cn, h.round())) return *refusal;
    bytes_in += static_cast<int64_t>(bytes.size());
    if (!u.ok()) {
      FT_LOG_WARN("rejected update from '{}' in round {}: {}", cn, h.round(), u.status().ToString());
      received.insert(cn);
      rejected.push_back({cn, u.status()});
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
    inbox.push_back(std::move(*u));
    ++updates_accepted;
    ++workers[cn].updates_accepted;
    workers[cn].round = 0;
    Seen(cn);
    l.unlock();
    cv.notify_all();
    resp->set_accepted(true);
    return grpc::Status::OK;
  }

  grpc::Status GetStatus(grpc::ServerContext*, const rpc::v1::StatusRequest*, rpc::v1::StatusResponse* resp) override {
    std::lock_guard<std::mutex> l(mu);
    resp->set_run_id(fs::path(o.state_dir).filename().string());
    resp->set_round(round);
    resp->set_rounds_total(o.rounds);
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

  // ---- the round loop (its own thread) ----

  absl::Status PublishGlobal(int r) {
    FT_ASSIGN_OR_RETURN(std::vector<uint8_t> b, EncodeTensors(global, r - 1));
    global_sha = Sha256Hex(b);
    global_bytes = std::make_shared<const std::vector<uint8_t>>(std::move(b));
    return absl::OkStatus();
  }

  absl::Status RunRounds() {
    int attempt = 0;  // of the current round (quorum retries)
    for (int r = committed + 1; r <= o.rounds; ++r) {
      const auto t_round = Clock::now();
      std::vector<std::string> available;
      std::vector<planner::WorkerProfile> profiles;
      {
        std::unique_lock<std::mutex> l(mu);
        phase = "waiting for workers";
        // Re-check every second: workers that stop talking turn offline without an event.
        while (!shutdown && static_cast<int>(OnlineWorkers().size()) < o.min_workers) cv.wait_for(l, std::chrono::seconds(1));
        if (shutdown) return absl::CancelledError("coordinator shut down");
        available = OnlineWorkers();
        if (o.planning) {
          phase = "plan";
          for (const std::string& id : available) {
            const rpc::v1::Profile& p = workers[id].profile;
            profiles.push_back({id, p.memory_bytes() > 0 ? static_cast<double>(p.memory_bytes()) / (1 << 20) : 1e12,
                                p.train_tokens_per_second() > 0 ? p.train_tokens_per_second() : 100.0, p.link_mbps() > 0 ? p.link_mbps() : 100.0, 20});
          }
        }
      }
      // Planning runs without the lock (it can take seconds with hundreds of workers): RPCs and
      // heartbeats keep being served meanwhile. If it fails, everyone gets the configured training.
      std::map<std::string, planner::WorkerPlan> plans;
      if (o.planning) {
        auto made = planner::MakePlan(o.planning->shape, importance, profiles, o.planning->options);
        if (made.ok()) {
          for (const planner::WorkerPlan& wp : made->workers) {
            plans[wp.worker] = wp;
            FT_LOG_INFO("round {} plan: {} {}", r, wp.worker, wp.excluded ? wp.reason : wp.explanation);
          }
          FT_LOG_INFO("round {} plan: {}", r, made->summary);
        } else {
          FT_LOG_WARN("round {}: planner: {}; every worker gets the configured training", r, made.status().ToString());
        }
      }
      {
        std::unique_lock<std::mutex> l(mu);
        for (const auto& [id, wp] : plans) plan_notes[id] = wp.excluded ? wp.reason : wp.explanation;
        round = r;
        phase = "collect";
        FT_RETURN_IF_ERROR(PublishGlobal(r));
        Rng rng(o.seed * 1000003 + static_cast<uint64_t>(r) + 7919 * static_cast<uint64_t>(attempt));  // a retry selects anew
        deadline_unix_ms = UnixMs() + o.deadline_ms;
        assigned.clear();
        fetched.clear();
        received.clear();
        rejected.clear();
        inbox.clear();
        closed = false;
        bytes_in = bytes_out = 0;
        std::vector<std::string> selectable;
        for (const std::string& id : available)
          if (!plans.count(id) || !plans[id].excluded) selectable.push_back(id);
        for (const aggregation::ClientTask& t : strategy->ConfigureTrain(r, selectable, rng)) {
          rpc::v1::Task task;
          task.set_kind(rpc::v1::Task::TRAIN);
          task.set_run_id(fs::path(o.state_dir).filename().string());
          task.set_round(r);
          *task.mutable_plan() = o.plan;
          task.set_local_steps(o.local_steps);
          task.set_batch(o.batch);
          task.set_learning_rate(o.learning_rate);
          for (const auto& [k, v] : t.config) (*task.mutable_config())[k] = v;
          task.set_adapter_sha256(global_sha);
          task.set_adapter_bytes(static_cast<int64_t>(global_bytes->size()));
          task.set_deadline_unix_ms(deadline_unix_ms);
          task.set_send_fisher(o.send_fisher);
          if (auto pit = plans.find(t.client); pit != plans.end()) {
            const planner::Candidate& pc = pit->second.c;
            for (auto m : pc.modules) task.mutable_plan()->add_train_modules(model::ModuleName(m));
            task.mutable_plan()->set_base_type(kernels::TypeTraits(pc.base).name);
            task.mutable_plan()->set_explanation(pit->second.explanation);
            task.set_batch(pc.batch);
            task.set_local_steps(pc.local_steps);
          }
          assigned[t.client] = task;
        }
      }
      cv.notify_all();
      FT_LOG_INFO("round {}/{}: {} workers selected", r, o.rounds, assigned.size());
      // Collect until every selected worker has answered, the target is reached, or the deadline
      // passes; updates are folded in on this thread as they arrive (streaming).
      std::unique_ptr<aggregation::Aggregation> agg = strategy->BeginAggregate(r, global);
      std::vector<aggregation::ClientFailure> failures;
      std::vector<ClientRoundRecord> recs;
      double rss_peak = CurrentRssMiB(), train_max = 0, loss_sum = 0;
      int accepted = 0;
      const auto deadline = Clock::now() + std::chrono::milliseconds(o.deadline_ms);
      auto fold = [&](std::deque<aggregation::ClientUpdate>& batch) {
        for (auto& u : batch) {
          auto metric = [&u](const char* k) { return u.metrics.count(k) ? u.metrics.at(k) : 0.0; };
          ClientRoundRecord rec{u.client, "ok", u.num_examples, metric("train_loss"), metric("train_seconds"), 0};
          const std::string who = u.client;
          if (absl::Status st = agg->Add(std::move(u)); !st.ok()) {
            rec.status = absl::StrCat("rejected: ", st.message());
            failures.push_back({who, st});
          } else {
            ++accepted;
            train_max = std::max(train_max, rec.train_seconds);
            loss_sum += rec.train_loss;
          }
          recs.push_back(rec);
          rss_peak = std::max(rss_peak, CurrentRssMiB());
        }
      };
      for (;;) {
        std::deque<aggregation::ClientUpdate> batch;
        bool complete = false;
        {
          std::unique_lock<std::mutex> l(mu);
          cv.wait_until(l, deadline, [&] { return shutdown || !inbox.empty() || received.size() == assigned.size(); });
          if (shutdown) return absl::CancelledError("coordinator shut down");
          batch.swap(inbox);
          complete = received.size() == assigned.size();
        }
        cv.notify_all();  // room in the inbox
        fold(batch);
        if (complete || Clock::now() >= deadline) break;
        if (o.target_updates > 0 && accepted >= o.target_updates) {
          std::deque<aggregation::ClientUpdate> rest;
          {
            std::lock_guard<std::mutex> l(mu);
            closed = true;  // late workers are told to abandon; their uploads are refused
            rest.swap(inbox);
          }
          cv.notify_all();
          fold(rest);  // already accepted on upload: folded in too
          break;
        }
      }
      {
        // Updates accepted while the last batch was being folded in (the deadline may have
        // passed meanwhile) are still in the inbox: close the round and fold them in too.
        std::deque<aggregation::ClientUpdate> rest;
        {
          std::lock_guard<std::mutex> l(mu);
          closed = true;
          rest.swap(inbox);
        }
        cv.notify_all();
        fold(rest);
      }
      const auto t_collected = Clock::now();
      {
        std::lock_guard<std::mutex> l(mu);
        closed = true;
        for (const auto& f : rejected) {
          failures.push_back(f);
          recs.push_back({f.client, absl::StrCat("rejected: ", f.status.message()), 0, 0, 0, 0});
        }
        for (const auto& [w, t] : assigned)
          if (!received.count(w)) {
            const bool early = o.target_updates > 0 && accepted >= o.target_updates;
            failures.push_back({w, absl::DeadlineExceededError(early ? "round closed after the target number of updates" : "no update before the deadline")});
            recs.push_back({w, early ? "not needed (round closed)" : "missed deadline", 0, 0, 0, 0});
          }
        phase = "aggregate";
      }
      cv.notify_all();
      if (accepted < o.quorum) {
        ++attempt;
        FT_LOG_WARN("round {}: {} updates accepted, quorum is {}; the round starts again (attempt {})", r, accepted, o.quorum, attempt + 1);
        std::unique_lock<std::mutex> l(mu);  // back off a little; shutdown interrupts
        cv.wait_for(l, std::chrono::milliseconds(std::min(10000, 500 * attempt)), [&] { return shutdown; });
        --r;
        continue;
      }
      attempt = 0;
      FT_ASSIGN_OR_RETURN(aggregation::Merged merged, agg->Merge());
      FT_ASSIGN_OR_RETURN(aggregation::RoundResult res, strategy->Commit(r, global, std::move(merged), failures));
      aggregation::TensorMap next = res.global ? std::move(*res.global) : global;
      // Commit: the adapter file first (atomic), then the ledger row; a crash between the two
      // leaves round r uncommitted and its file ignored on restart.
      FT_ASSIGN_OR_RETURN(auto bytes, EncodeTensors(next, r));
      FT_RETURN_IF_ERROR(WriteFileAtomic(absl::StrCat(o.state_dir, "/global-", r, ".safetensors"), std::string(bytes.begin(), bytes.end())));
      rss_peak = std::max(rss_peak, CurrentRssMiB());
      const double round_s = std::chrono::duration<double>(Clock::now() - t_round).count();
      {
        std::lock_guard<std::mutex> l(mu);
        res.metrics["bytes_in"] = static_cast<double>(bytes_in);
        res.metrics["bytes_out"] = static_cast<double>(bytes_out);
      }
      res.metrics["round_seconds"] = round_s;
      res.metrics["collect_seconds"] = std::chrono::duration<double>(t_collected - t_round).count();
      res.metrics["train_seconds_max"] = train_max;
      res.metrics["overhead_seconds"] = round_s - train_max;
      res.metrics["rss_peak_mib"] = rss_peak;
      if (accepted > 0) res.metrics["train_loss"] = loss_sum / accepted;
      FT_RETURN_IF_ERROR(ledger->CommitRound(r, res.metrics, recs));
      std::error_code ec;
      fs::remove(absl::StrCat(o.state_dir, "/global-", r - 2, ".safetensors"), ec);
      if (o.planning)  // module importance: blend with where this round's merged update moved
        planner::BlendImportance(importance, planner::UpdateEnergy(global, next, o.planning->options.adapted));
      {
        std::lock_guard<std::mutex> l(mu);
        global = std::move(next);
        committed = r;
        assigned.clear();
        history[r] = res.metrics;
        phase = r == o.rounds ? "done" : "waiting for workers";
      }
      FT_LOG_INFO("round {}/{} committed: {} accepted, {} failed; {:.2f} s ({:.2f} s outside training), {:.1f} MiB in, {:.1f} MiB out, peak RSS {:.0f} MiB",
                  r, o.rounds, accepted, failures.size(), round_s, round_s - train_max, res.metrics["bytes_in"] / 1048576.0,
                  res.metrics["bytes_out"] / 1048576.0, rss_peak);
    }
    return absl::OkStatus();
  }
};

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(ServerOptions o, std::unique_ptr<aggregation::Strategy> strategy) {
  std::unique_ptr<CoordinatorServer> s(new CoordinatorServer());
  s->impl_ = std::make_unique<Impl>();
  Impl& im = *s->impl_;
  if (o.state_dir.empty()) return absl::InvalidArgumentError("coordinator: state_dir is required");
  if (o.quorum < 1) return absl::InvalidArgumentError("coordinator: quorum must be >= 1");
  if (o.target_updates > 0 && o.quorum > o.target_updates)
    return absl::InvalidArgumentError(absl::StrCat("coordinator: quorum (", o.quorum, ") exceeds target_updates (", o.target_updates, "): no round could commit"));
  std::error_code ec;
  fs::create_directories(o.state_dir, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("coordinator: cannot create ", o.state_dir, ": ", ec.message()));
  FT_ASSIGN_OR_RETURN(std::string ca, ReadFileToString(o.ca_pem));
  FT_ASSIGN_OR_RETURN(std::string cert, ReadFileToString(o.cert_pem));
  FT_ASSIGN_OR_RETURN(std::string key, ReadFileToString(o.key_pem));
  FT_ASSIGN_OR_RETURN(std::string tokens, ReadFileToString(o.tokens_path));
  std::istringstream ts(tokens);
  std::string name, hash;
  while (ts >> name >> hash) im.token_hash[name] = hash;
  FT_ASSIGN_OR_RETURN(im.ledger, RunLedger::Open(o.state_dir + "/ledger.sqlite"));
  FT_ASSIGN_OR_RETURN(im.committed, im.ledger->LastRound());
  FT_ASSIGN_OR_RETURN(im.history, im.ledger->AllMetrics());
  im.global = o.initial_global;
  if (im.committed > 0) {  // resume from the last committed round
    FT_ASSIGN_OR_RETURN(std::string b, ReadFileToString(absl::StrCat(o.state_dir, "/global-", im.committed, ".safetensors")));
    int r = 0;
    FT_ASSIGN_OR_RETURN(im.global, DecodeTensors({reinterpret_cast<const uint8_t*>(b.data()), b.size()}, &r));
    if (r != im.committed) return absl::DataLossError(absl::StrCat("coordinator: checkpoint holds round ", r, ", ledger says ", im.committed));
    FT_LOG_INFO("resuming after committed round {}", im.committed);
  }
  im.o = std::move(o);
  if (im.o.planning)
    for (model::Module m : im.o.planning->options.adapted) im.importance[m] = 1.0 / static_cast<double>(im.o.planning->options.adapted.size());
  im.upload_slots = std::make_unique<std::counting_semaphore<>>(std::max(1, im.o.max_concurrent_uploads));
  im.download_slots = std::make_unique<std::counting_semaphore<>>(std::max(1, im.o.max_concurrent_downloads));
  im.strategy = std::move(strategy);
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
  // Memory bound for the transport: without it, every pending upload's data is buffered up to
  // its (BDP-grown) flow-control window, i.e. memory grows with the number of workers sending.
  // Under the quota's pressure gRPC shrinks its windows (bench/run_load.sh: 200 workers, 4 MB
  // updates: 2.2 GB peak without it, ~220 MiB with it and the allocator settings of
  // `fedtune coordinator`).
  grpc::ResourceQuota quota("fedtune-coordinator");
  quota.Resize(static_cast<size_t>(std::max(16, im.o.transport_memory_mib)) << 20);
  b.SetResourceQuota(quota);
  im.server = b.BuildAndStart();
  if (!im.server || im.port == 0) return absl::UnavailableError(absl::StrCat("coordinator: cannot listen on ", im.o.address));
  if (!im.o.http_address.empty()) {
    FT_ASSIGN_OR_RETURN(im.http, HttpStatusServer::Start(im.o.http_address, {[&im] { return im.MetricsText(); }, [&im] { return DashboardHtml(im.StatusJson()); },
                                                                            [&im] { return im.StatusJson(); }}));
  }
  im.rounds_thread = std::thread([&im] {
    absl::Status st = im.RunRounds();
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

aggregation::TensorMap CoordinatorServer::global() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return impl_->global;
}

int CoordinatorServer::last_committed_round() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return impl_->committed;
}

}  // namespace fedtune::coordinator

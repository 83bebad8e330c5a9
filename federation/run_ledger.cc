#include "federation/run_ledger.h"

#include <sqlite3.h>

#include <vector>

#include "absl/strings/str_cat.h"

namespace fedtune::federation {
namespace {

// RAII for prepared statements.
struct Stmt {
  sqlite3_stmt* s = nullptr;
  ~Stmt() { sqlite3_finalize(s); }
};

}  // namespace

absl::StatusOr<std::unique_ptr<RunLedger>> RunLedger::Open(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open(path.c_str(), &db) != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::UnavailableError(absl::StrCat("cannot open ledger ", path, ": ", msg));
  }
  // Another process (a status reader, a backup) may hold the lock for a moment: wait for it.
  sqlite3_busy_timeout(db, 5000);
  std::unique_ptr<RunLedger> l(new RunLedger(db));
  FT_RETURN_IF_ERROR(l->Exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                             "CREATE TABLE IF NOT EXISTS run(key TEXT PRIMARY KEY, value TEXT);"
                             "CREATE TABLE IF NOT EXISTS rounds(round INTEGER PRIMARY KEY, committed_at TEXT DEFAULT CURRENT_TIMESTAMP);"
                             "CREATE TABLE IF NOT EXISTS metrics(round INTEGER, name TEXT, value REAL, PRIMARY KEY(round, name));"
                             "CREATE TABLE IF NOT EXISTS client_rounds(round INTEGER, client TEXT, status TEXT, num_examples INTEGER,"
                             " train_loss REAL, train_seconds REAL, bytes_up INTEGER, PRIMARY KEY(round, client));"));
  return l;
}

RunLedger::~RunLedger() { sqlite3_close(db_); }

absl::Status RunLedger::Exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "?";
    sqlite3_free(err);
    return absl::InternalError(absl::StrCat("ledger: ", msg));
  }
  return absl::OkStatus();
}

absl::Status RunLedger::SetRunInfo(const std::string& key, const std::string& value) {
  Stmt st;
  if (sqlite3_prepare_v2(db_, "INSERT OR REPLACE INTO run(key, value) VALUES(?, ?)", -1, &st.s, nullptr) != SQLITE_OK)
    return absl::InternalError(sqlite3_errmsg(db_));
  sqlite3_bind_text(st.s, 1, key.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(st.s, 2, value.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st.s) != SQLITE_DONE) return absl::InternalError(absl::StrCat("ledger: ", sqlite3_errmsg(db_)));
  return absl::OkStatus();
}

absl::Status RunLedger::CommitRound(int round, const std::map<std::string, double>& metrics, const std::vector<ClientRoundRecord>& clients) {
  FT_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  auto fail = [&](const std::string& what) {
    const std::string msg = absl::StrCat("ledger: round ", round, ": ", what, ": ", sqlite3_errmsg(db_));
    (void)Exec("ROLLBACK");
    return absl::InternalError(msg);
  };
  {
    Stmt st;
    if (sqlite3_prepare_v2(db_, "INSERT INTO rounds(round) VALUES(?)", -1, &st.s, nullptr) != SQLITE_OK) return fail("prepare");
    sqlite3_bind_int(st.s, 1, round);
    if (sqlite3_step(st.s) != SQLITE_DONE) return fail("round already committed");
  }
  {
    Stmt st;
    if (sqlite3_prepare_v2(db_, "INSERT INTO metrics(round, name, value) VALUES(?, ?, ?)", -1, &st.s, nullptr) != SQLITE_OK) return fail("prepare");
    for (const auto& [name, v] : metrics) {
      sqlite3_reset(st.s);
      sqlite3_bind_int(st.s, 1, round);
      sqlite3_bind_text(st.s, 2, name.c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_double(st.s, 3, v);
      if (sqlite3_step(st.s) != SQLITE_DONE) return fail("metric " + name);
    }
  }
  {
    Stmt st;
    if (sqlite3_prepare_v2(db_, "INSERT INTO client_rounds VALUES(?, ?, ?, ?, ?, ?, ?)", -1, &st.s, nullptr) != SQLITE_OK) return fail("prepare");
    for (const ClientRoundRecord& c : clients) {
      sqlite3_reset(st.s);
      sqlite3_bind_int(st.s, 1, round);
      sqlite3_bind_text(st.s, 2, c.client.c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_text(st.s, 3, c.status.c_str(), -1, SQLITE_TRANSIENT);
      if (c.num_examples < 0) {  // withheld (under DP): NULL
        sqlite3_bind_null(st.s, 4);
      } else {
        sqlite3_bind_int64(st.s, 4, c.num_examples);
      }
      if (c.train_loss < 0) {
        sqlite3_bind_null(st.s, 5);
      } else {
        sqlite3_bind_double(st.s, 5, c.train_loss);
      }
      sqlite3_bind_double(st.s, 6, c.train_seconds);
      sqlite3_bind_int64(st.s, 7, c.bytes_up);
      if (sqlite3_step(st.s) != SQLITE_DONE) return fail("client " + c.client);
    }
  }
  return Exec("COMMIT");
}

absl::StatusOr<int> RunLedger::LastRound() const {
  Stmt st;
  if (sqlite3_prepare_v2(db_, "SELECT COALESCE(MAX(round), 0) FROM rounds", -1, &st.s, nullptr) != SQLITE_OK ||
      sqlite3_step(st.s) != SQLITE_ROW)
    return absl::InternalError(absl::StrCat("ledger: ", sqlite3_errmsg(db_)));
  return sqlite3_column_int(st.s, 0);
}

absl::StatusOr<double> RunLedger::Metric(int round, const std::string& name) const {
  Stmt st;
  if (sqlite3_prepare_v2(db_, "SELECT value FROM metrics WHERE round = ? AND name = ?", -1, &st.s, nullptr) != SQLITE_OK)
    return absl::InternalError(sqlite3_errmsg(db_));
  sqlite3_bind_int(st.s, 1, round);
  sqlite3_bind_text(st.s, 2, name.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st.s) != SQLITE_ROW) return absl::NotFoundError(absl::StrCat("ledger: no metric ", name, " for round ", round));
  return sqlite3_column_double(st.s, 0);
}

absl::StatusOr<std::map<int, std::map<std::string, double>>> RunLedger::AllMetrics() const {
  Stmt st;
  if (sqlite3_prepare_v2(db_, "SELECT m.round, m.name, m.value FROM metrics m JOIN rounds r ON r.round = m.round ORDER BY m.round", -1, &st.s,
                         nullptr) != SQLITE_OK)
    return absl::InternalError(sqlite3_errmsg(db_));
  std::map<int, std::map<std::string, double>> out;
  int rc;
  while ((rc = sqlite3_step(st.s)) == SQLITE_ROW)
    out[sqlite3_column_int(st.s, 0)][reinterpret_cast<const char*>(sqlite3_column_text(st.s, 1))] = sqlite3_column_double(st.s, 2);
  if (rc != SQLITE_DONE) return absl::InternalError(sqlite3_errmsg(db_));
  return out;
}

}  // namespace fedtune::federation

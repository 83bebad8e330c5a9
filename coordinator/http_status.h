// Observability over plain HTTP (Boost.Beast), separate from the gRPC port: GET /metrics gives
// Prometheus text, GET / a live HTML dashboard (auto-refreshing), GET /status.json the same data
// as JSON. Several clients at once (a thread each, at most 16; more are closed at once), 5 s
// read/write timeouts (an idle client cannot stall it or its shutdown). Binds to loopback unless
// a bearer token is required (`Authorization: Bearer TOKEN` on every request but /chart.js) or
// remote access without one is allowed explicitly.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "common/status.h"

namespace fedtune::coordinator {

struct HttpStatusOptions {
  std::string token;          // non-empty: required as a bearer token ([A-Za-z0-9._-], >= 16 chars)
  bool allow_remote = false;  // a non-loopback address without a token
};

class HttpStatusServer {
 public:
  struct Pages {
    std::function<std::string()> metrics;  // text/plain; version=0.0.4
    std::function<std::string()> html;
    std::function<std::string()> json;
  };
  // address "host:port" (port 0: any free port).
  static absl::StatusOr<std::unique_ptr<HttpStatusServer>> Start(const std::string& address, Pages pages, HttpStatusOptions options = HttpStatusOptions());
  ~HttpStatusServer();
  int port() const;

 private:
  HttpStatusServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A minimal HTTP GET for tests and `fedtune status --http`: returns the body.
absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& target, const std::string& token = "");

}  // namespace fedtune::coordinator

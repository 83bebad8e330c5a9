// Observability over plain HTTP (Boost.Beast), separate from the gRPC port: GET /metrics gives
// Prometheus text, GET / a live HTML dashboard (auto-refreshing), GET /status.json the same data
// as JSON. Bind it to localhost or an internal interface: it has no authentication.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "common/status.h"

namespace fedtune::coordinator {

class HttpStatusServer {
 public:
  struct Pages {
    std::function<std::string()> metrics;  // text/plain; version=0.0.4
    std::function<std::string()> html;
    std::function<std::string()> json;
  };
  // address "host:port" (port 0: any free port).
  static absl::StatusOr<std::unique_ptr<HttpStatusServer>> Start(const std::string& address, Pages pages);
  ~HttpStatusServer();
  int port() const;

 private:
  HttpStatusServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A minimal HTTP GET for tests and `fedtune status --http`: returns the body.
absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& target);

}  // namespace fedtune::coordinator

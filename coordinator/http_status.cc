#include "coordinator/http_status.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cctype>
#include <list>
#include <mutex>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/html.h"
#include "common/mapped_file.h"

namespace fedtune::coordinator {

namespace asio = boost::asio;
namespace http = boost::beast::http;
using tcp = asio::ip::tcp;

constexpr int kMaxConnections = 16;
constexpr int kTimeoutSeconds = 5;

bool SameSecret(const std::string& a, const std::string& b) {  // constant time in the length of a
  unsigned diff = a.size() != b.size();
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned>(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

struct HttpStatusServer::Impl {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  Pages pages;
  HttpStatusOptions options;
  std::string chartjs;  // served at /chart.js for the dashboard (empty: 404, the page shows tables only)
  std::thread thread;
  std::atomic<bool> stop{false};
  std::mutex mu;
  struct Conn {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::list<Conn> conns;  // connection threads (finished ones joined by the accept loop)
  std::atomic<int> active{0};

  // One request on its own io_context, so the read and the write carry deadlines (a blocking
  // socket with SO_RCVTIMEO would wait forever in asio's poll fallback).
  void Serve(tcp::socket& accepted) {
    asio::io_context cio;
    boost::beast::tcp_stream stream(cio);
    boost::system::error_code aec;
    const auto proto = accepted.local_endpoint(aec).protocol();
    if (aec) return;
    stream.socket().assign(proto, accepted.release(aec), aec);
    if (aec) return;
    boost::beast::flat_buffer buf;
    http::request_parser<http::string_body> parser;
    parser.header_limit(8192);
    parser.body_limit(4096);
    boost::beast::error_code ec;
    stream.expires_after(std::chrono::seconds(kTimeoutSeconds));
    http::async_read(stream, buf, parser, [&ec](boost::beast::error_code e, size_t) { ec = e; });
    cio.run();
    if (ec) return;
    const auto& req = parser.get();
    http::response<http::string_body> res;
    res.version(req.version());
    res.set(http::field::server, "fedtune");
    std::string target(req.target());
    if (const size_t q = target.find('?'); q != std::string::npos) target.resize(q);
    // Health probes (Kubernetes liveness/readiness, load balancers) answer without the token and
    // say nothing but "ok": the process serves HTTP, and the gRPC server was started before it.
    const bool probe = target == "/healthz" || target == "/readyz";
    const bool authorized = options.token.empty() || target == "/chart.js" || probe ||
                            SameSecret(std::string(req[http::field::authorization]), "Bearer " + options.token);
    if (!authorized) {
      res.result(http::status::unauthorized);
      res.set(http::field::www_authenticate, "Bearer");
      res.body() = "bearer token required\n";
    } else if (req.method() != http::verb::get) {
      res.result(http::status::method_not_allowed);
      res.body() = "GET only\n";
    } else if (probe) {
      res.set(http::field::content_type, "text/plain");
      res.body() = "ok\n";
    } else if (target == "/metrics") {
      res.set(http::field::content_type, "text/plain; version=0.0.4");
      res.body() = pages.metrics();
    } else if (target == "/status.json") {
      res.set(http::field::content_type, "application/json");
      res.body() = pages.json();
    } else if (target == "/chart.js" && !chartjs.empty()) {
      res.set(http::field::content_type, "application/javascript");
      res.set(http::field::cache_control, "max-age=86400");
      res.body() = chartjs;
    } else if (target == "/" || target == "/index.html") {
      res.set(http::field::content_type, "text/html; charset=utf-8");
      res.body() = pages.html();
      if (!options.token.empty())  // the page asked with the token: its refreshes use it too
        if (const size_t at = res.body().find("</head>"); at != std::string::npos)
          res.body().insert(at, "<script>const TOKEN = \"" + options.token + "\";</script>");
    } else {
      res.result(http::status::not_found);
      res.body() = "not found\n";
    }
    res.keep_alive(false);
    res.prepare_payload();
    stream.expires_after(std::chrono::seconds(kTimeoutSeconds));
    http::async_write(stream, res, [&ec](boost::beast::error_code e, size_t) { ec = e; });
    cio.restart();
    cio.run();
    stream.socket().shutdown(tcp::socket::shutdown_both, ec);
  }
};

absl::StatusOr<std::unique_ptr<HttpStatusServer>> HttpStatusServer::Start(const std::string& address, Pages pages, HttpStatusOptions options) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535)
    return absl::InvalidArgumentError(absl::StrCat("http address '", address, "' is not host:port"));
  std::unique_ptr<HttpStatusServer> s(new HttpStatusServer());
  s->impl_ = std::make_unique<Impl>();
  Impl& im = *s->impl_;
  im.pages = std::move(pages);
  if (!options.token.empty()) {
    if (options.token.size() < 16) return absl::InvalidArgumentError("http token: at least 16 characters");
    for (char ch : options.token)
      if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '.' && ch != '_' && ch != '-')
        return absl::InvalidArgumentError("http token: letters, digits, '.', '_' and '-' only");
  }
  im.options = options;
  if (auto js = ReadFileToString(ChartJsPath()); js.ok()) im.chartjs = std::move(*js);
  boost::system::error_code ec;
  const auto ip = asio::ip::make_address(address.substr(0, colon) == "localhost" ? "127.0.0.1" : address.substr(0, colon), ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("http address '", address, "': ", ec.message()));
  if (!ip.is_loopback() && options.token.empty() && !options.allow_remote)
    return absl::InvalidArgumentError(absl::StrCat("http address '", address,
                                                   "' is not loopback: the status server shows run state without authentication; set a "
                                                   "bearer token (http_token_file) or allow it explicitly (http_allow_remote)"));
  tcp::endpoint ep(ip, static_cast<unsigned short>(port));
  im.acceptor.open(ep.protocol(), ec);
  if (!ec) im.acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) im.acceptor.bind(ep, ec);
  if (!ec) im.acceptor.listen(16, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot serve HTTP on ", address, ": ", ec.message()));
  im.thread = std::thread([&im] {
    while (!im.stop) {
      tcp::socket sock(im.io);
      boost::system::error_code aec;
      im.acceptor.accept(sock, aec);
      if (aec || im.stop) continue;
      if (im.active >= kMaxConnections) continue;  // closed at once: the others keep being served
      ++im.active;
      std::lock_guard<std::mutex> l(im.mu);
      for (auto it = im.conns.begin(); it != im.conns.end();) {  // join finished connections
        if (*it->done) {
          it->thread.join();
          it = im.conns.erase(it);
        } else {
          ++it;
        }
      }
      auto done = std::make_shared<std::atomic<bool>>(false);
      im.conns.push_back({std::thread([&im, done, s = std::move(sock)]() mutable {
                            im.Serve(s);
                            boost::system::error_code cec;
                            s.close(cec);
                            --im.active;
                            *done = true;
                          }),
                          done});
    }
  });
  return s;
}

HttpStatusServer::~HttpStatusServer() {
  if (!impl_ || !impl_->thread.joinable()) return;  // never started (Start refused the address)
  impl_->stop = true;
  boost::system::error_code ec;
  // Wake the blocking accept with a connection of our own, then close.
  tcp::socket poke(impl_->io);
  auto bound = impl_->acceptor.local_endpoint(ec).address();
  if (ec || bound.is_unspecified()) bound = asio::ip::make_address("127.0.0.1");
  poke.connect(tcp::endpoint(bound, static_cast<unsigned short>(port())), ec);
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_->acceptor.close(ec);
  std::lock_guard<std::mutex> l(impl_->mu);
  for (auto& c : impl_->conns)  // each finishes within the socket timeouts
    if (c.thread.joinable()) c.thread.join();
}

int HttpStatusServer::port() const {
  boost::system::error_code ec;
  const auto ep = impl_->acceptor.local_endpoint(ec);
  return ec ? 0 : ep.port();
}

absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& target, const std::string& token) {
  asio::io_context io;
  tcp::resolver resolver(io);
  boost::beast::tcp_stream stream(io);
  boost::beast::error_code ec;
  auto results = resolver.resolve(host, std::to_string(port), ec);
  if (!ec) stream.connect(results, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot connect to ", host, ":", port, ": ", ec.message()));
  http::request<http::empty_body> req{http::verb::get, target, 11};
  req.set(http::field::host, host);
  if (!token.empty()) req.set(http::field::authorization, "Bearer " + token);
  http::write(stream, req, ec);
  boost::beast::flat_buffer buf;
  http::response<http::string_body> res;
  if (!ec) http::read(stream, buf, res, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("HTTP GET ", target, ": ", ec.message()));
  if (res.result() != http::status::ok) return absl::NotFoundError(absl::StrCat("HTTP GET ", target, ": ", res.result_int()));
  return res.body();
}

}  // namespace fedtune::coordinator

#include "coordinator/http_status.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/html.h"
#include "common/mapped_file.h"

namespace fedtune::coordinator {

namespace asio = boost::asio;
namespace http = boost::beast::http;
using tcp = asio::ip::tcp;

struct HttpStatusServer::Impl {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  Pages pages;
  std::string chartjs;  // served at /chart.js for the dashboard (empty: 404, the page shows tables only)
  std::thread thread;
  std::atomic<bool> stop{false};

  void Serve(tcp::socket& sock) {
    boost::beast::flat_buffer buf;
    http::request<http::string_body> req;
    boost::beast::error_code ec;
    http::read(sock, buf, req, ec);
    if (ec) return;
    http::response<http::string_body> res;
    res.version(req.version());
    res.set(http::field::server, "fedtune");
    std::string target(req.target());
    if (const size_t q = target.find('?'); q != std::string::npos) target.resize(q);
    if (req.method() != http::verb::get) {
      res.result(http::status::method_not_allowed);
      res.body() = "GET only\n";
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
    } else {
      res.result(http::status::not_found);
      res.body() = "not found\n";
    }
    res.keep_alive(false);
    res.prepare_payload();
    http::write(sock, res, ec);
    sock.shutdown(tcp::socket::shutdown_both, ec);
  }
};

absl::StatusOr<std::unique_ptr<HttpStatusServer>> HttpStatusServer::Start(const std::string& address, Pages pages) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535)
    return absl::InvalidArgumentError(absl::StrCat("http address '", address, "' is not host:port"));
  std::unique_ptr<HttpStatusServer> s(new HttpStatusServer());
  s->impl_ = std::make_unique<Impl>();
  Impl& im = *s->impl_;
  im.pages = std::move(pages);
  if (auto js = ReadFileToString(ChartJsPath()); js.ok()) im.chartjs = std::move(*js);
  boost::system::error_code ec;
  const auto ip = asio::ip::make_address(address.substr(0, colon) == "localhost" ? "127.0.0.1" : address.substr(0, colon), ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("http address '", address, "': ", ec.message()));
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
      im.Serve(sock);
    }
  });
  return s;
}

HttpStatusServer::~HttpStatusServer() {
  if (!impl_) return;
  impl_->stop = true;
  boost::system::error_code ec;
  // Wake the blocking accept with a connection of our own, then close.
  tcp::socket poke(impl_->io);
  poke.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port())), ec);
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_->acceptor.close(ec);
}

int HttpStatusServer::port() const { return impl_->acceptor.local_endpoint().port(); }

absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& target) {
  asio::io_context io;
  tcp::resolver resolver(io);
  boost::beast::tcp_stream stream(io);
  boost::beast::error_code ec;
  auto results = resolver.resolve(host, std::to_string(port), ec);
  if (!ec) stream.connect(results, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot connect to ", host, ":", port, ": ", ec.message()));
  http::request<http::empty_body> req{http::verb::get, target, 11};
  req.set(http::field::host, host);
  http::write(stream, req, ec);
  boost::beast::flat_buffer buf;
  http::response<http::string_body> res;
  if (!ec) http::read(stream, buf, res, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("HTTP GET ", target, ": ", ec.message()));
  if (res.result() != http::status::ok) return absl::NotFoundError(absl::StrCat("HTTP GET ", target, ": ", res.result_int()));
  return res.body();
}

}  // namespace fedtune::coordinator

// Load generator for the coordinator (issue 5, criterion 4): N worker daemons in one process,
// each with its own certificate, join token and TLS connection, running the stand-in trainer
// (random updates of the global adapter's shape) so the coordinator's cost is what is measured.
// Run by bench/run_load.sh against a `fedtune coordinator` process.
//   bench_load_workers --address localhost:PORT --pki DIR --workers 200 [--train-seconds 0]
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/mapped_file.h"
#include "worker/daemon.h"

int main(int argc, char** argv) {
  CLI::App app{"N stand-in worker daemons against a coordinator"};
  std::string address, pki;
  int workers = 200;
  double train_seconds = 0;
  app.add_option("--address", address, "host:port of the coordinator")->required();
  app.add_option("--pki", pki, "directory from `fedtune provision` (workers/worker-NNN.*)")->required();
  app.add_option("--workers", workers, "number of daemons (worker-001 ..)");
  app.add_option("--train-seconds", train_seconds, "pretend training time per round");
  CLI11_PARSE(app, argc, argv);

  std::atomic<bool> stop{false};
  std::atomic<int> failed{0};
  std::vector<fedtune::worker::DaemonReport> reports(static_cast<size_t>(workers));
  std::vector<std::thread> threads;
  const auto t0 = std::chrono::steady_clock::now();
  const fedtune::worker::TaskRunner trainer = fedtune::worker::StandInTaskRunner(100, train_seconds);
  for (int i = 0; i < workers; ++i)
    threads.emplace_back([&, i] {
      const std::string w = absl::StrFormat("%s/workers/worker-%03d", pki, i + 1);
      fedtune::worker::DaemonOptions o;
      o.address = address;
      o.ca_pem = pki + "/ca.pem";
      o.cert_pem = w + ".pem";
      o.key_pem = w + ".key";
      auto token = fedtune::ReadFileToString(w + ".token");
      if (!token.ok()) {
        std::fprintf(stderr, "%s\n", token.status().ToString().c_str());
        ++failed;
        return;
      }
      o.token = std::string(absl::StripAsciiWhitespace(*token));
      o.poll_ms = 5000;
      o.quiet = true;
      o.profile.set_cores(1);
      auto r = fedtune::worker::RunDaemon(o, trainer, stop);
      if (!r.ok()) {
        std::fprintf(stderr, "worker-%03d: %s\n", i + 1, r.status().ToString().c_str());
        ++failed;
        return;
      }
      reports[static_cast<size_t>(i)] = *r;
    });
  for (auto& t : threads) t.join();
  int accepted = 0, abandoned = 0;
  for (const auto& r : reports) {
    accepted += r.rounds_trained;
    abandoned += r.rounds_abandoned;
  }
  std::printf("%d stand-in workers: %d updates accepted, %d abandoned, %d daemons failed, %.1f s\n", workers, accepted, abandoned, failed.load(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return failed == 0 ? 0 : 1;
}

#include "common/progress.h"

#include <sys/resource.h>

#include <unistd.h>

#include <cstdio>

namespace fedtune {

Progress::Progress(std::string what, int64_t total, std::string unit, bool enabled)
    : what_(std::move(what)),
      unit_(std::move(unit)),
      total_(total),
      enabled_(enabled),
      tty_(::isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()),
      last_print_(start_) {}

double Progress::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::Update(int64_t done) {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  // Terminals get a live line; logs (CI) get a line every 10 s so they stay readable.
  const double every = tty_ ? 0.25 : 10.0;
  if (std::chrono::duration<double>(now - last_print_).count() < every && done < total_) return;
  last_print_ = now;
  const double t = elapsed_seconds();
  const double rate = t > 0 ? static_cast<double>(done) / t : 0.0;
  const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0.0;
  std::fprintf(stderr, "%s%s: %lld/%lld %s, %.1f %s/s, ETA %.0f s%s", tty_ ? "\r" : "",
               what_.c_str(), static_cast<long long>(done), static_cast<long long>(total_),
               unit_.c_str(), rate, unit_.c_str(), eta, tty_ ? "   " : "\n");
  std::fflush(stderr);
}

void Progress::Finish() {
  if (!enabled_) return;
  if (tty_) std::fprintf(stderr, "\n");
}

double PeakRssMiB() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

bool ResetPeakRss() {
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (!f) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

double PeakRssSinceResetMiB() {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return 0;
  char line[256];
  double kib = 0;
  while (std::fgets(line, sizeof line, f))
    if (std::sscanf(line, "VmHWM: %lf kB", &kib) == 1) break;
  std::fclose(f);
  return kib / 1024.0;
}

double CurrentRssMiB() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  long size = 0, resident = 0;
  const int n = std::fscanf(f, "%ld %ld", &size, &resident);
  std::fclose(f);
  return n == 2 ? static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0) : 0;
}

}  // namespace fedtune

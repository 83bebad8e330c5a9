// Progress lines on stderr for long work: done/total, rate and ETA, at most a few per second.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace fedtune {

// Peak resident set size of this process so far, MiB.
double PeakRssMiB();
// Resident set size now (/proc/self/statm; 0 where unavailable).
double CurrentRssMiB();
// Starts a new peak: resets the kernel's high-water mark of this process's resident set
// (/proc/self/clear_refs, Linux >= 4.0); false where that is not possible.
bool ResetPeakRss();
// The high-water mark since the last ResetPeakRss (or the start): VmHWM, MiB; 0 where unavailable.
double PeakRssSinceResetMiB();

class Progress {
 public:
  Progress(std::string what, int64_t total, std::string unit, bool enabled = true);
  void Update(int64_t done);
  void Finish();
  double elapsed_seconds() const;

 private:
  std::string what_, unit_;
  int64_t total_;
  bool enabled_;
  bool tty_;
  std::chrono::steady_clock::time_point start_, last_print_;
};

}  // namespace fedtune

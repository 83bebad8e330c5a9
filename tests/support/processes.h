// Helpers for tests that drive other programs: headless Chromium (page rendering checks) and
// child processes (the fedtune binary as coordinator and workers).
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fedtune::testing {

// Path of an installed headless Chromium, or "" (setup.sh installs chromium-headless-shell).
std::string FindHeadlessChromium();

struct RenderedPage {
  std::string dom;  // after scripts ran (--dump-dom)
  std::string png;  // screenshot bytes
};
// Loads `url` (file:// or http://) twice, for the DOM and for a 1200x2000 screenshot, with a
// virtual time budget so scripts and charts finish.
absl::StatusOr<RenderedPage> RenderPage(const std::string& browser, const std::string& url, const std::string& scratch_dir);

// Starts `argv` with stdout and stderr appended to `log`; returns its pid.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log);
// Waits up to `seconds` for `pid`; its exit status, or DeadlineExceeded (the process is killed).
absl::StatusOr<int> WaitFor(pid_t pid, double seconds);
// Polls `file` until it contains `text` (true) or `seconds` pass (false).
bool WaitForText(const std::string& file, const std::string& text, double seconds);

}  // namespace fedtune::testing

#include "tests/support/processes.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"

extern char** environ;

namespace fedtune::testing {
namespace {

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

std::string FindHeadlessChromium() {
  for (const char* b : {"/usr/bin/chromium-headless-shell", "/usr/bin/chromium"})
    if (std::filesystem::exists(b)) return b;
  return "";
}

absl::StatusOr<RenderedPage> RenderPage(const std::string& browser, const std::string& url, const std::string& scratch_dir) {
  const std::string flags = " --no-sandbox --disable-gpu --virtual-time-budget=5000 --window-size=1200,2000 ";
  const std::string dom = scratch_dir + "/dom.html", png = scratch_dir + "/page.png";
  if (std::system((browser + flags + "--dump-dom '" + url + "' > " + dom + " 2>/dev/null").c_str()) != 0)
    return absl::InternalError(absl::StrCat(browser, " --dump-dom ", url, " failed"));
  if (std::system((browser + flags + "--screenshot=" + png + " '" + url + "' > /dev/null 2>&1").c_str()) != 0)
    return absl::InternalError(absl::StrCat(browser, " --screenshot ", url, " failed"));
  return RenderedPage{Slurp(dom), Slurp(png)};
}

absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return absl::InternalError(absl::StrCat("cannot start ", argv[0], ": error ", rc));
  return pid;
}

absl::StatusOr<int> WaitFor(pid_t pid, double seconds) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (;;) {
    int status = 0;
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (r < 0) return absl::InternalError(absl::StrCat("waitpid ", pid, " failed"));
    if (std::chrono::steady_clock::now() > until) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return absl::DeadlineExceededError(absl::StrCat("process ", pid, " did not finish in ", seconds, " s"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

bool WaitForText(const std::string& file, const std::string& text, double seconds) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < until) {
    if (Slurp(file).find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace fedtune::testing

#include "common/fault.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace fedtune {

void MaybeCrash(const char* point, int round) {
  static const std::string spec = [] {
    const char* v = std::getenv("FEDTUNE_FAULT");
    return std::string(v ? v : "");
  }();
  if (spec.empty() || spec != std::string(point) + ":" + std::to_string(round)) return;
  std::fprintf(stderr, "FEDTUNE_FAULT: killing this process at %s of round %d\n", point, round);
  std::fflush(stderr);
  std::raise(SIGKILL);
}

}  // namespace fedtune

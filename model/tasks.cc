#include "model/tasks.h"

#include <cstdio>

#include "common/rng.h"
#include "nlohmann/json.hpp"

namespace fedtune::model {
namespace {

const char* kFirst[] = {"Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena",
                        "Mateo", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yusuf"};
const char* kLast[] = {"Smith", "Garcia", "Novak", "Okafor", "Tanaka", "Rossi", "Dubois", "Kowalski", "Haddad", "Larsen",
                       "Silva", "Meyer", "Ivanova", "Murphy", "Costa", "Nguyen", "Fischer", "Moreau", "Jensen", "Ali"};
const char* kCity[] = {"Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Turin", "Leeds", "Perth", "Hanoi", "Graz",
                       "Porto", "Dakar", "Cusco", "Bergen", "Austin", "Kyoto"};

template <size_t N>
const char* Pick(const char* (&a)[N], Rng& rng) { return a[rng.Below(N)]; }

}  // namespace

absl::StatusOr<std::vector<std::string>> GenerateTask(const std::string& name, int n, uint64_t seed) {
  if (name != "record") return absl::InvalidArgumentError(absl::StrCat("unknown task '", name, "' (available: record)"));
  if (n < 1) return absl::InvalidArgumentError("task size must be >= 1");
  Rng rng(seed);
  std::vector<std::string> lines;
  for (int i = 0; i < n; ++i) {
    const std::string first = Pick(kFirst, rng), last = Pick(kLast, rng), city = Pick(kCity, rng);
    const int y = 1940 + static_cast<int>(rng.Below(70)), m = 1 + static_cast<int>(rng.Below(12)), d = 1 + static_cast<int>(rng.Below(28));
    char date_in[48], date_out[48];  // room for any int, so no truncation is possible
    std::snprintf(date_in, sizeof date_in, "%04d-%02d-%02d", y, m, d);
    std::snprintf(date_out, sizeof date_out, "%02d.%02d.%04d", d, m, y);
    nlohmann::json j;
    j["prompt"] = "Convert to a record line: first=" + first + " last=" + last + " born=" + date_in + " city=" + city;
    j["response"] = last + ", " + first + " (" + date_out + ") @ " + city;
    lines.push_back(j.dump());
  }
  return lines;
}

}  // namespace fedtune::model

#include "model/tasks.h"

#include <algorithm>
#include <cctype>
#include <cstdio>

#include "absl/strings/str_join.h"

#include "common/rng.h"
#include "model/text_sources.h"
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

const std::vector<std::string>& TaskNames() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n = {"record", "date", "sum", "sentiment", "extract"};
    n.insert(n.end(), TextSourceNames().begin(), TextSourceNames().end());
    return n;
  }();
  return names;
}

absl::StatusOr<std::vector<std::string>> GenerateTask(const std::string& name, int n, uint64_t seed) {
  if (IsTextSource(name)) return GenerateTextSourceTask(name, n, seed);
  const auto& names = TaskNames();
  if (std::find(names.begin(), names.end(), name) == names.end())
    return absl::InvalidArgumentError(absl::StrCat("unknown task '", name, "' (available: ", absl::StrJoin(names, ", "), ")"));
  if (n < 1) return absl::InvalidArgumentError("task size must be >= 1");
  static const char* kMonth[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  static const char* kGood[] = {"delicious", "friendly", "spotless", "quick", "charming", "generous", "cozy", "fresh"};
  static const char* kBad[] = {"cold", "rude", "dirty", "slow", "noisy", "stale", "cramped", "overpriced"};
  static const char* kThing[] = {"soup", "staff", "room", "service", "bread", "terrace", "coffee", "view"};
  Rng rng(seed);
  std::vector<std::string> lines;
  for (int i = 0; i < n; ++i) {
    nlohmann::json j;
    char a[96], b[96];  // room for any ints, so no truncation is possible
    if (name == "record") {
      const std::string first = Pick(kFirst, rng), last = Pick(kLast, rng), city = Pick(kCity, rng);
      const int y = 1940 + static_cast<int>(rng.Below(70)), m = 1 + static_cast<int>(rng.Below(12)), d = 1 + static_cast<int>(rng.Below(28));
      std::snprintf(a, sizeof a, "%04d-%02d-%02d", y, m, d);
      std::snprintf(b, sizeof b, "%02d.%02d.%04d", d, m, y);
      j["prompt"] = "Convert to a record line: first=" + first + " last=" + last + " born=" + a + " city=" + city;
      j["response"] = last + ", " + first + " (" + b + ") @ " + city;
    } else if (name == "date") {  // ISO date -> day/MON/year with upper-case month
      const int y = 1900 + static_cast<int>(rng.Below(200)), m = static_cast<int>(rng.Below(12)), d = 1 + static_cast<int>(rng.Below(28));
      std::snprintf(a, sizeof a, "%04d-%02d-%02d", y, m + 1, d);
      std::string mon = kMonth[m];
      for (char& c : mon) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      std::snprintf(b, sizeof b, "%d/%s/%d", d, mon.c_str(), y);
      j["prompt"] = std::string("Rewrite the date in ledger style: ") + a;
      j["response"] = b;
    } else if (name == "sum") {  // three-digit addition, answer as a bare number
      const int x = 100 + static_cast<int>(rng.Below(900)), y = 100 + static_cast<int>(rng.Below(900));
      j["prompt"] = "Add " + std::to_string(x) + " and " + std::to_string(y) + ". Reply with the number only.";
      j["response"] = std::to_string(x + y);
    } else if (name == "sentiment") {  // review -> one of two made-up labels
      const bool good = rng.Below(2) == 0;
      const std::string t1 = Pick(kThing, rng), t2 = Pick(kThing, rng);
      const std::string w1 = good ? Pick(kGood, rng) : Pick(kBad, rng), w2 = good ? Pick(kGood, rng) : Pick(kBad, rng);
      j["prompt"] = "Label the review as GLAD or GRUMPY: The " + t1 + " was " + w1 + " and the " + t2 + " was " + w2 + ".";
      j["response"] = good ? "GLAD" : "GRUMPY";
    } else {  // extract: the order code from a sentence
      std::snprintf(a, sizeof a, "%c%c-%04d", 'A' + static_cast<int>(rng.Below(26)), 'A' + static_cast<int>(rng.Below(26)),
                    static_cast<int>(rng.Below(10000)));
      const std::string who = Pick(kFirst, rng), city = Pick(kCity, rng);
      j["prompt"] = "Give only the order code: " + who + " from " + city + " wrote about order " + a + " arriving late.";
      j["response"] = a;
    }
    lines.push_back(j.dump());
  }
  return lines;
}

}  // namespace fedtune::model

// report.html: a self-contained page (Chart.js from Debian's libjs-chart.js inlined; tables only
// when it is missing) with loss, accuracy, epsilon, bytes and simulated time per round, and
// per-client views.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"
#include "sim/simulation.h"

namespace fedtune::sim {

struct ClientSummary {
  std::string name;
  std::string profile;
  int64_t examples = 0;
  std::string task_mix;  // e.g. "record 60%, sum 40%"
  int rounds_trained = 0, rounds_dropped = 0;
  double accuracy_after = 0;  // task-mix-weighted held-out accuracy of the final global adapter
};

struct ReportInput {
  std::string title;
  std::string config_text;
  std::vector<std::string> summary_lines;
  std::vector<RoundRecord> rounds;
  std::vector<ClientSummary> clients;
  // The planner's decisions (issue 8): summary and, per client, what it got and why.
  std::string plan_summary;
  std::vector<std::pair<std::string, std::string>> plan;
};

absl::Status WriteReport(const std::string& path, const ReportInput& in);

}  // namespace fedtune::sim

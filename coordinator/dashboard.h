// The coordinator's live dashboard (GET / on its status server): workers with their profiles,
// state and progress; per-round charts of accepted/failed updates, client loss, round time
// (with the overhead outside training), traffic, memory and privacy spent. The page carries the
// status at the time it was served and then refreshes itself from /status.json every few
// seconds; Chart.js comes from /chart.js (Debian's libjs-chart.js), so nothing is fetched from
// the internet. Without Chart.js the tables still show everything.
#pragma once

#include <string>

namespace fedtune::coordinator {

// `status_json`: the body of /status.json.
std::string DashboardHtml(const std::string& status_json);

}  // namespace fedtune::coordinator

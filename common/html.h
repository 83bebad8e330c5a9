// Small helpers for the HTML pages fedtune writes (simulation report, coordinator dashboard).
#pragma once

#include <string>

namespace fedtune {

// Escapes & < > " for text and attribute values.
std::string HtmlEscape(const std::string& s);
// JSON text made safe inside <script>: every '<' becomes \u003c, so "</script>" cannot appear.
std::string ScriptSafeJson(const std::string& json_text);
// Chart.js from Debian's libjs-chart.js (FEDTUNE_CHARTJS overrides the path).
std::string ChartJsPath();

}  // namespace fedtune

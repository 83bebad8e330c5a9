#include "common/html.h"

#include <cstdlib>

namespace fedtune {

std::string HtmlEscape(const std::string& s) {
  std::string o;
  o.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '&': o += "&amp;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

std::string ScriptSafeJson(const std::string& json_text) {
  std::string o;
  o.reserve(json_text.size());
  for (char c : json_text) {
    if (c == '<') {
      o += "\\u003c";
    } else {
      o += c;
    }
  }
  return o;
}

std::string ChartJsPath() {
  if (const char* p = std::getenv("FEDTUNE_CHARTJS")) return p;
  return "/usr/share/javascript/chart.js/chart.min.js";
}

}  // namespace fedtune

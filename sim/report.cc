#include "sim/report.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/html.h"
#include "common/mapped_file.h"
#include "nlohmann/json.hpp"

namespace fedtune::sim {
namespace {

const char* kScript = R"JS(
const R = DATA.rounds, C = DATA.clients;
const rounds = R.map(r => r.round);
function series(key, evalOnly) { return R.map(r => (r[key] === undefined || (evalOnly && !r.evaluated)) ? null : r[key]); }
const palette = ['#1f77b4','#d62728','#2ca02c','#ff7f0e','#9467bd','#8c564b','#e377c2','#17becf'];
function line(id, title, sets, yTitle) {
  const el = document.getElementById(id);
  if (typeof Chart === 'undefined') { el.parentNode.insertAdjacentHTML('beforeend', '<p>(Chart.js not available: see the tables)</p>'); return; }
  new Chart(el, {type: 'line', data: {labels: rounds, datasets: sets.map((s, i) => ({label: s[0], data: s[1], borderColor: palette[i % 8],
    backgroundColor: palette[i % 8], spanGaps: true, tension: 0.1}))}, options: {animation: false, plugins: {title: {display: true, text: title}},
    scales: {x: {title: {display: true, text: 'round'}}, y: {title: {display: true, text: yTitle}}}}});
}
line('loss', 'Loss', [['train (clients, mean)', series('train_loss')], ['held-out', series('eval_loss', true)]], 'mean NLL per token');
const accSets = [['all tasks', series('accuracy', true).map(v => v === null ? null : 100 * v)]];
Object.keys(R[0]).filter(k => k.startsWith('acc_')).forEach(k => accSets.push([k.substring(4), series(k, true).map(v => v === null ? null : 100 * v)]));
line('accuracy', 'Held-out exact-match accuracy', accSets, '%');
const pplKeys = Object.keys(R[0]).filter(k => k.startsWith('ppl_'));
if (pplKeys.length) line('ppl', 'Held-out perplexity (text domains)', pplKeys.map(k => [k.substring(4), series(k, true)]), 'perplexity');
else document.getElementById('ppl').parentNode.style.display = 'none';
line('bytes', 'Traffic per round', [['up (MiB)', series('bytes_up').map(v => v === null ? null : v / 1048576)],
  ['down (MiB)', series('bytes_down').map(v => v === null ? null : v / 1048576)]], 'MiB');
line('time', 'Round time', [['simulated (slowest client incl. links)', series('sim_round_seconds')], ['wall, this machine', series('wall_seconds')]]
  .concat(R.some(r => r.planned_round_seconds !== undefined) ? [['planner prediction', series('planned_round_seconds')]] : []), 's');
if (R.some(r => r.epsilon !== undefined || r.local_epsilon !== undefined))
  line('epsilon', 'Privacy spent', [['central epsilon', series('epsilon')], ['local epsilon (worst client)', series('local_epsilon')]], 'epsilon');
else document.getElementById('epsilon').parentNode.style.display = 'none';
if (typeof Chart !== 'undefined') new Chart(document.getElementById('clients'), {type: 'bar', data: {labels: C.map(c => c.name),
  datasets: [{label: 'final accuracy on its task mix (%)', data: C.map(c => 100 * c.accuracy_after), backgroundColor: '#1f77b4', yAxisID: 'y'},
             {label: 'training examples', data: C.map(c => c.examples), backgroundColor: '#ff7f0e', yAxisID: 'y1'}]},
  options: {animation: false, plugins: {title: {display: true, text: 'Per client'}}, scales: {y: {position: 'left', max: 100}, y1: {position: 'right', grid: {drawOnChartArea: false}}}}});
document.body.setAttribute('data-charts-ready', typeof Chart === 'undefined' ? 'no' : 'yes');
)JS";

}  // namespace

absl::Status WriteReport(const std::string& path, const ReportInput& in) {
  nlohmann::json data;
  data["rounds"] = nlohmann::json::array();
  for (const RoundRecord& r : in.rounds) {
    nlohmann::json j;
    j["round"] = r.round;
    j["evaluated"] = r.evaluated;
    for (const auto& [k, v] : r.metrics) j[k] = v;
    data["rounds"].push_back(j);
  }
  data["clients"] = nlohmann::json::array();
  for (const ClientSummary& c : in.clients)
    data["clients"].push_back({{"name", c.name}, {"profile", c.profile}, {"examples", c.examples}, {"accuracy_after", c.accuracy_after}});
  std::string chartjs;
  if (auto js = ReadFileToString(ChartJsPath()); js.ok()) chartjs = *js;

  std::string h = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + HtmlEscape(in.title) + "</title>\n<style>"
                  "body{font-family:sans-serif;margin:2em;max-width:1200px}.grid{display:grid;grid-template-columns:1fr 1fr;gap:1.5em}"
                  "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
                  "th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;overflow:auto}</style>\n";
  if (!chartjs.empty()) h += "<script>" + chartjs + "</script>\n";
  h += "</head><body>\n<h1>" + HtmlEscape(in.title) + "</h1>\n<ul>";
  for (const auto& l : in.summary_lines) h += "<li>" + HtmlEscape(l) + "</li>";
  h += "</ul>\n<div class=\"grid\">";
  for (const char* id : {"accuracy", "loss", "ppl", "epsilon", "bytes", "time", "clients"}) h += absl::StrCat("<div><canvas id=\"", id, "\"></canvas></div>");
  h += "</div>\n<h2>Rounds</h2><table><tr><th>round</th><th>train loss</th><th>eval loss</th><th>accuracy %</th><th>accepted</th>"
       "<th>dropped</th><th>epsilon</th><th>MiB up</th><th>simulated s</th><th>wall s</th></tr>";
  for (const RoundRecord& r : in.rounds) {
    auto get = [&](const char* k, double scale, const char* fmt) -> std::string {
      auto it = r.metrics.find(k);
      if (it == r.metrics.end()) return "";
      char buf[64];
      std::snprintf(buf, sizeof buf, fmt, it->second * scale);
      return std::string(buf);
    };
    h += absl::StrCat("<tr><td>", r.round, "</td><td>", get("train_loss", 1, "%.4f"), "</td><td>", get("eval_loss", 1, "%.4f"), "</td><td>",
                      get("accuracy", 100, "%.1f"), "</td><td>", get("accepted", 1, "%.0f"), "</td><td>", get("dropped", 1, "%.0f"), "</td><td>",
                      get("epsilon", 1, "%.3f"), "</td><td>", get("bytes_up", 1.0 / 1048576, "%.2f"), "</td><td>", get("sim_round_seconds", 1, "%.1f"),
                      "</td><td>", get("wall_seconds", 1, "%.1f"), "</td></tr>");
  }
  h += "</table>\n<h2>Clients</h2><table><tr><th>client</th><th>profile</th><th>examples</th><th>task mix</th><th>rounds trained</th>"
       "<th>dropped</th><th>final accuracy %</th></tr>";
  for (const ClientSummary& c : in.clients)
    h += absl::StrCat("<tr><td>", HtmlEscape(c.name), "</td><td>", HtmlEscape(c.profile), "</td><td>", c.examples, "</td><td>", HtmlEscape(c.task_mix), "</td><td>",
                      c.rounds_trained, "</td><td>", c.rounds_dropped, "</td><td>", absl::StrFormat("%.1f", 100 * c.accuracy_after), "</td></tr>");
  h += "</table>\n";
  if (!in.plan.empty()) {
    h += "<h2>Plan</h2><p>" + HtmlEscape(in.plan_summary) + "</p><table><tr><th>client</th><th>what it trains and why</th></tr>";
    for (const auto& [client, why] : in.plan) h += "<tr><td>" + HtmlEscape(client) + "</td><td style=\"text-align:left\">" + HtmlEscape(why) + "</td></tr>";
    h += "</table>\n";
  }
  h += "<h2>Configuration</h2><pre>" + HtmlEscape(in.config_text) + "</pre>\n";
  h += "<script>const DATA = " + ScriptSafeJson(data.dump()) + ";\n" + kScript + "</script>\n</body></html>\n";
  return WriteFileAtomic(path, h);
}

}  // namespace fedtune::sim

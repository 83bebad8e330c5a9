#include "coordinator/dashboard.h"

#include "common/html.h"

namespace fedtune::coordinator {
namespace {

const char* kHead = R"HTML(<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedtune coordinator</title>
<style>body{font-family:sans-serif;margin:1.5em;max-width:1300px}.grid{display:grid;grid-template-columns:1fr 1fr;gap:1.2em}
table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child{text-align:left}.offline{color:#999}.training{color:#1f77b4}</style>
<script src="/chart.js"></script>
</head><body>
<h1>fedtune coordinator</h1>
<p id="summary"></p>
<div class="grid">
<div><canvas id="updates"></canvas></div><div><canvas id="loss"></canvas></div>
<div><canvas id="time"></canvas></div><div><canvas id="traffic"></canvas></div>
<div><canvas id="memory"></canvas></div><div><canvas id="epsilon"></canvas></div>
<div><canvas id="accuracy"></canvas></div>
</div>
<h2>Workers</h2><table id="workers"></table>
<h2>Rounds</h2><table id="rounds"></table>
)HTML";

const char* kScript = R"JS(
const palette = ['#1f77b4','#d62728','#2ca02c','#ff7f0e','#9467bd','#8c564b'];
const charts = {};
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c])); }
function num(v, d) { return (v === undefined || v === null || v < 0) ? '-' : Number(v).toFixed(d); }
function draw(id, type, title, labels, sets, yTitle) {
  if (typeof Chart === 'undefined') return;
  if (charts[id]) charts[id].destroy();
  charts[id] = new Chart(document.getElementById(id), {type: type, data: {labels: labels, datasets: sets.map((s, i) => ({label: s[0], data: s[1],
    borderColor: palette[i % 6], backgroundColor: palette[i % 6], spanGaps: true}))}, options: {animation: false,
    plugins: {title: {display: true, text: title}}, scales: {x: {title: {display: true, text: 'round'}}, y: {beginAtZero: true, title: {display: true, text: yTitle}}}}});
}
function render(D) {
  const R = D.rounds || [], W = D.workers || [];
  const labels = R.map(r => r.round), s = k => R.map(r => r[k] === undefined ? null : r[k]);
  const online = W.filter(w => w.state !== 'offline').length;
  document.getElementById('summary').textContent = `round ${D.round} of ${D.rounds_total} (${D.committed} committed), phase: ${D.phase}; ` +
    `${online} of ${W.length} workers online; updates accepted ${D.updates_accepted}, rejected ${D.updates_rejected}; RSS ${num(D.rss_mib, 0)} MiB`;
  draw('updates', 'bar', 'Updates per round', labels, [['accepted', s('accepted')], ['failed', s('failures')]], 'updates');
  draw('loss', 'line', 'Client training loss (mean)', labels, [['train loss', s('train_loss')]], 'loss');
  draw('time', 'line', 'Round time', labels, [['round', s('wall_seconds')], ['slowest training', s('train_seconds_max')],
    ['overhead (outside training)', s('overhead_seconds')]], 's');
  draw('traffic', 'bar', 'Traffic per round', labels, [['updates in (MiB)', s('bytes_up').map(v => v === null ? null : v / 1048576)],
    ['adapters out (MiB)', s('bytes_down').map(v => v === null ? null : v / 1048576)]], 'MiB');
  draw('memory', 'line', 'Coordinator memory', labels, [['peak RSS in round (MiB)', s('rss_peak_mib')]], 'MiB');
  draw('epsilon', 'line', 'Privacy spent', labels, [['central epsilon', s('epsilon')], ['local epsilon (worst worker)', s('local_epsilon')]], 'epsilon');
  draw('accuracy', 'line', 'Held-out evaluation', labels, [['exact match (%)', s('accuracy').map(v => v === null ? null : 100 * v)],
    ['loss', s('eval_loss')]], '% / loss');
  let w = '<tr><th>worker</th><th>state</th><th>round</th><th>progress</th><th>cores</th><th>memory GiB</th><th>train tok/s</th>' +
          '<th>link Mbit/s</th><th>last seen s</th><th>updates accepted</th><th>plan (why)</th></tr>';
  for (const x of W) w += `<tr class="${esc(x.state)}"><td>${esc(x.id)}</td><td>${esc(x.state)}</td><td>${x.round || '-'}</td>` +
    `<td>${x.round ? (100 * x.progress).toFixed(0) + '%' : '-'}</td><td>${x.cores}</td><td>${num(x.memory_bytes / 1073741824, 1)}</td>` +
    `<td>${num(x.train_tokens_per_second, 0)}</td><td>${num(x.link_mbps, 0)}</td><td>${num(x.last_seen_seconds, 1)}</td><td>${x.updates_accepted}</td>` +
    `<td style="text-align:left;font-size:85%">${esc(x.plan || '')}</td></tr>`;
  document.getElementById('workers').innerHTML = w;
  let t = '<tr><th>round</th><th>accepted</th><th>failed</th><th>train loss</th><th>round s</th><th>overhead s</th><th>MiB in</th>' +
          '<th>MiB out</th><th>peak RSS MiB</th><th>update norm</th><th>eval loss</th><th>accuracy</th><th>epsilon</th></tr>';
  for (const r of R) t += `<tr><td>${r.round}</td><td>${num(r.accepted, 0)}</td><td>${num(r.failures, 0)}</td><td>${num(r.train_loss, 4)}</td>` +
    `<td>${num(r.wall_seconds, 2)}</td><td>${num(r.overhead_seconds, 2)}</td><td>${num(r.bytes_up / 1048576, 1)}</td><td>${num(r.bytes_down / 1048576, 1)}</td>` +
    `<td>${num(r.rss_peak_mib, 0)}</td><td>${num(r.update_norm, 4)}</td><td>${num(r.eval_loss, 4)}</td><td>${r.accuracy === undefined ? '-' : (100 * r.accuracy).toFixed(1) + '%'}</td><td>${num(r.epsilon, 3)}</td></tr>`;
  document.getElementById('rounds').innerHTML = t;
  document.body.setAttribute('data-charts-ready', typeof Chart === 'undefined' ? 'no' : 'yes');
}
render(DATA);
setInterval(() => fetch('/status.json', typeof TOKEN === 'undefined' ? {} : {headers: {Authorization: 'Bearer ' + TOKEN}})
  .then(r => r.json()).then(render).catch(() => {}), 5000);
)JS";

}  // namespace

std::string DashboardHtml(const std::string& status_json) {
  std::string h = kHead;
  h += "<script>const DATA = " + ScriptSafeJson(status_json) + ";\n";
  h += kScript;
  h += "</script>\n</body></html>\n";
  return h;
}

}  // namespace fedtune::coordinator

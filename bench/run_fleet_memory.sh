#!/usr/bin/env bash
# Issue 22 fleet validation: a planned deployment on the real model (coordinator + three worker
# processes over mutual TLS on loopback, memory budgets 2400 / 800 / 420 MiB, per-worker ranks
# 4/8/16 of a rank-16 LoRA adapter, real definition data from Debian dictionaries). Each worker
# resets its process's peak RSS before training (/proc/self/clear_refs) and reports the round's
# peak beside its own prediction; the ledger keeps them with the planner's prediction
# ("planned_mib/<worker>", "predicted_peak_mib/<worker>", "peak_rss_mib/<worker>").
# Workers time their training on each planner base type before joining (preflight); the second
# table compares each worker's planned training time with its measured one (train_seconds; the
# three workers share this machine's 2 cores, so their speeds interfere).
#   bash bench/run_fleet_memory.sh            (~8 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/bench/fleet
rm -rf "$out"
mkdir -p "$out"
fedtune=build/tools/fedtune
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
port=$((17000 + RANDOM % 2000))
$fedtune provision -o "$out/pki" --host localhost --workers 3 > /dev/null
sources=(wordnet gcide foldoc)
budgets=(2400 800 420)
for k in 1 2 3; do
  $fedtune make-task "${sources[$((k - 1))]}" -n 300 --seed "$k" -o "$out/w$k.jsonl" > /dev/null
done
cat > "$out/coordinator.yaml" <<YAML
listen: 127.0.0.1:$port
tls: {ca: $out/pki/ca.pem, cert: $out/pki/coordinator.pem, key: $out/pki/coordinator.key}
tokens: $out/pki/tokens.sha256
state_dir: $out/state
model: {path: $model}
adapter: {kind: LORA, rank: 16, alpha: 32}
rounds: 3
min_workers: 3
deadline_seconds: 900
train: {local_steps: 4, batch: 4, learning_rate: 2.0e-3}
planner: {enabled: true, ranks: [4, 8, 16], base_types: [q4_1, q8_0, nf4], replan_every_round: true, seq: 96}
seed: 1
YAML
pids=()
$fedtune coordinator --config "$out/coordinator.yaml" > "$out/coordinator.log" 2>&1 &
coord=$!
trap 'kill $coord ${pids[@]+"${pids[@]}"} 2>/dev/null || true' EXIT  # nothing left running on failure
sleep 2
for k in 1 2 3; do
  w=worker-00$k
  cat > "$out/$w.yaml" <<YAML
coordinator: localhost:$port
tls: {ca: $out/pki/ca.pem, cert: $out/pki/workers/$w.pem, key: $out/pki/workers/$w.key}
token_file: $out/pki/workers/$w.token
model: {path: $model}
data: $out/w$k.jsonl
max_len: 96
memory_budget_mib: ${budgets[$((k - 1))]}
YAML
  $fedtune worker --config "$out/$w.yaml" > "$out/$w.log" 2>&1 &
  pids+=($!)
done
wait "$coord"
sleep 20  # the workers are told the run is over; any still running after that are stopped (trap)
python3 - "$out/state/ledger.sqlite" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = db.execute("select round, name, value from metrics").fetchall()
m = {}
for r, name, v in rows:
    if "/" in name:
        k, w = name.split("/", 1)
        m.setdefault((r, w), {})[k] = v
print("| round | worker | planner's prediction (MiB) | worker's prediction (MiB) | measured peak RSS (MiB) | measured vs planner |")
print("|---|---|---|---|---|---|")
worst = 0
for (r, w), x in sorted(m.items()):
    p, q, g = x.get("planned_mib", 0), x.get("predicted_peak_mib", 0), x.get("peak_rss_mib", 0)
    e = (g - p) / p if p and g else float("nan")
    if p and g: worst = max(worst, abs(e))
    print(f"| {r} | {w} | {p:.1f} | {q:.1f} | {g:.1f} | {100*e:+.1f}% |")
print(f"worst |error| over the fleet: {100*worst:.1f}%")
secs = {(r, c): t for r, c, t in db.execute("select round, client, train_seconds from client_rounds where status = 'ok'")}
print()
print("| round | worker | planned training time (s) | measured (s) | measured vs planned |")
print("|---|---|---|---|---|")
for (r, w), x in sorted(m.items()):
    p, g = x.get("planned_train_seconds", 0), secs.get((r, w), 0)
    if p and g: print(f"| {r} | {w} | {p:.1f} | {g:.1f} | {100*(g-p)/p:+.1f}% |")
PY
grep -h "planner: round" "$out/coordinator.log" | cut -c1-400 | head -12 || true

#!/usr/bin/env bash
# issue 5, criterion 2 (real model, loopback, mutual TLS):
#  A. kill -9 of a worker mid-round: the round completes with the quorum after the deadline and
#     the restarted worker rejoins and trains the next rounds;
#  B. kill -9 of the coordinator mid-round: after a restart the run finishes with the same final
#     adapter as an uninterrupted run with the same seeds, and no round is committed twice.
#   tests/cli/federated_faults.sh FEDTUNE_BINARY MODEL
set -euo pipefail
bin="$1"; model="$2"
dir="$(mktemp -d)"
trap 'echo "FAILED at line $LINENO"; for f in "$dir"/*.log; do echo "== $f"; tail -n 25 "$f"; done' ERR
trap 'kill -9 $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
"$bin" provision -o "$dir/pki" --workers 3 > /dev/null
"$bin" make-task sentiment -n 60 -o "$dir/data.jsonl" > /dev/null

coordinator_config() {  # state_dir deadline
  cat > "$dir/coord-$1.yaml" <<YAML
listen: 127.0.0.1:0
tls: {ca: $dir/pki/ca.pem, cert: $dir/pki/coordinator.pem, key: $dir/pki/coordinator.key}
tokens: $dir/pki/tokens.sha256
state_dir: $dir/$1
model: {path: $model}
adapter: {kind: FFA_LORA, rank: 2, alpha: 4, target_modules: [q, v]}
rounds: 3
min_workers: 3
deadline_seconds: $2
train: {local_steps: 3, batch: 2, learning_rate: 5.0e-3}
strategy: {min_clients: 2}
seed: 5
YAML
}
start_coordinator() {  # name [nth start] -> sets $port, $coord
  "$bin" coordinator --config "$dir/coord-$1.yaml" >> "$dir/$1.log" 2>&1 &
  coord=$!
  port=""
  local n=0
  for _ in $(seq 600); do
    # Count first, then read the port: the other order races with the line being written.
    n="$(grep -c 'listening on port' "$dir/$1.log" || true)"
    if [ "$n" -ge "${2:-1}" ]; then
      port="$(sed -n 's/.*listening on port \([0-9]*\).*/\1/p' "$dir/$1.log" | tail -1)"
      break
    fi
    sleep 0.1
  done
  [ -n "$port" ] || { echo "coordinator $1 did not start"; cat "$dir/$1.log"; exit 1; }
}
start_worker() {  # index port
  local w="worker-00$1"
  cat > "$dir/$w-$2.yaml" <<YAML
coordinator: localhost:$2
tls: {ca: $dir/pki/ca.pem, cert: $dir/pki/workers/$w.pem, key: $dir/pki/workers/$w.key}
token_file: $dir/pki/workers/$w.token
model: {path: $model}
data: $dir/data.jsonl
max_len: 64
state_dir: $dir/state-$w
YAML
  "$bin" worker --config "$dir/$w-$2.yaml" >> "$dir/$w.log" 2>&1 &
  last_pid=$!
}
rounds_in_ledger() { python3 -c "import sqlite3,sys; print(','.join(str(r[0]) for r in sqlite3.connect(sys.argv[1]).execute('select round from rounds order by round')))" "$1"; }

# ---- A: a worker is killed mid-round ----
coordinator_config a 20
start_coordinator a
start_worker 1 "$port"; w1=$last_pid; start_worker 2 "$port"; w2=$last_pid; start_worker 3 "$port"; w3=$last_pid
for _ in $(seq 300); do grep -q 'round 1/3: 3 workers selected' "$dir/a.log" && break; sleep 0.1; done
sleep 0.3; kill -9 "$w3"; echo "A: killed worker-003 during round 1"
for _ in $(seq 600); do grep -q 'round 1/3 committed' "$dir/a.log" && break; sleep 0.1; done
start_worker 3 "$port"; w3=$last_pid; echo "A: restarted worker-003"
wait "$coord"
grep -E 'committed' "$dir/a.log"
grep -q 'round 1/3 committed: 2 accepted, 1 failed' "$dir/a.log"
grep -q 'round 3/3 committed: 3 accepted' "$dir/a.log"
[ "$(rounds_in_ledger "$dir/a/ledger.sqlite")" = "1,2,3" ]
wait "$w1" "$w2" "$w3"
echo "A: OK"

# ---- B: the coordinator is killed mid-round, then restarted ----
coordinator_config ref 120
start_coordinator ref
pids=(); for i in 1 2 3; do start_worker "$i" "$port"; pids+=("$last_pid"); done
wait "$coord" "${pids[@]}"
coordinator_config b 120
start_coordinator b 1
pids=(); for i in 1 2 3; do start_worker "$i" "$port"; pids+=("$last_pid"); done
for _ in $(seq 600); do grep -q 'round 2/3: 3 workers selected' "$dir/b.log" && break; sleep 0.1; done
sleep 0.5; kill -9 "$coord"; echo "B: killed the coordinator during round 2"
# Same address is not guaranteed (port 0): workers are restarted against the new port.
for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
start_coordinator b 2
pids=(); for i in 1 2 3; do start_worker "$i" "$port"; pids+=("$last_pid"); done
wait "$coord" "${pids[@]}"
grep -E 'resuming|committed' "$dir/b.log"
[ "$(rounds_in_ledger "$dir/b/ledger.sqlite")" = "1,2,3" ]
python3 "$(dirname "${BASH_SOURCE[0]}")/../support/compare_states.py" "$dir/ref/state-3.safetensors" "$dir/b/state-3.safetensors" "B: final adapter after restart vs uninterrupted"
echo "B: OK"

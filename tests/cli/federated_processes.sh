#!/usr/bin/env bash
# issue 5: a coordinator and 3 worker PROCESSES over mutual TLS on loopback, real model, 2 rounds;
# issue 16: with central DP and server-side evaluation, epsilon and accuracy per round in
# `fedtune status` and in the ledger.
#   tests/cli/federated_processes.sh FEDTUNE_BINARY MODEL
set -euo pipefail
bin="$1"; model="$2"
dir="$(mktemp -d)"
trap 'echo "FAILED at line $LINENO"; for f in "$dir"/*.log; do echo "== $f"; tail -n 25 "$f"; done' ERR
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
"$bin" provision -o "$dir/pki" --workers 3 > /dev/null
"$bin" make-task sentiment -n 60 -o "$dir/data.jsonl" > /dev/null
"$bin" make-task sentiment -n 6 --seed 99 -o "$dir/heldout.jsonl" > /dev/null
cat > "$dir/coordinator.yaml" <<YAML
listen: 127.0.0.1:0
tls: {ca: $dir/pki/ca.pem, cert: $dir/pki/coordinator.pem, key: $dir/pki/coordinator.key}
tokens: $dir/pki/tokens.sha256
state_dir: $dir/state
model: {path: $model}
adapter: {kind: FFA_LORA, rank: 2, alpha: 4, target_modules: [q, v]}
rounds: 2
min_workers: 3
deadline_seconds: 300
train: {local_steps: 1, batch: 2, learning_rate: 5.0e-3}
strategy: {merge: uncertainty}
dp: {enabled: true, noise_multiplier: 1.0, clip_norm: 0.5}
eval: {data: $dir/heldout.jsonl, max_new_tokens: 8}
http: 127.0.0.1:0
YAML
"$bin" coordinator --config "$dir/coordinator.yaml" > "$dir/coordinator.log" 2>&1 &
coord=$!
for _ in $(seq 100); do grep -q 'listening on port' "$dir/coordinator.log" && break; sleep 0.1; done
port="$(sed -n 's/.*listening on port \([0-9]*\).*/\1/p' "$dir/coordinator.log")"
[ -n "$port" ] || { cat "$dir/coordinator.log"; exit 1; }
pids=()
for i in 1 2 3; do
  w="worker-00$i"
  cat > "$dir/$w.yaml" <<YAML
coordinator: localhost:$port
tls: {ca: $dir/pki/ca.pem, cert: $dir/pki/workers/$w.pem, key: $dir/pki/workers/$w.key}
token_file: $dir/pki/workers/$w.token
model: {path: $model}
data: $dir/data.jsonl
max_len: 64
YAML
  "$bin" worker --config "$dir/$w.yaml" > "$dir/$w.log" 2>&1 &
  pids+=($!)
done
hport="$(sed -n 's/.*status server on port \([0-9]*\).*/\1/p' "$dir/coordinator.log")"
"$bin" status "127.0.0.1:$hport" | tee "$dir/status.txt"
grep -q 'round .* of 2' "$dir/status.txt"
# Once round 1 is committed the status shows its held-out accuracy and epsilon (under DP no
# train loss: a per-client figure, withheld).
for _ in $(seq 600); do
  "$bin" status "127.0.0.1:$hport" > "$dir/status.txt" 2>/dev/null || true
  grep -qE '^1 +[0-9]+ +[0-9]+ +([0-9.]+|-) +[0-9.]+ +[0-9.]+% +[0-9.]+ ' "$dir/status.txt" && break
  sleep 0.2
done
cat "$dir/status.txt"
grep -qE '^1 +[0-9]+ +[0-9]+ +([0-9.]+|-) +[0-9.]+ +[0-9.]+% +[0-9.]+ ' "$dir/status.txt"
wait "$coord"
for p in "${pids[@]}"; do wait "$p"; done
cat "$dir/coordinator.log" | grep -E 'committed|joined'
grep -q '2 rounds committed' "$dir/coordinator.log"
for i in 1 2 3; do grep -q 'trained 2 rounds' "$dir/worker-00$i.log" || { cat "$dir/worker-00$i.log"; exit 1; }; done
python3 - "$dir/state/ledger.sqlite" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
m = {(r, k): v for r, k, v in db.execute("select round, name, value from metrics")}
for r in (1, 2):
    assert (r, "epsilon") in m and m[(r, "epsilon")] > 0, f"round {r}: no epsilon"
    assert (r, "accuracy") in m and (r, "eval_loss") in m, f"round {r}: no evaluation"
assert m[(2, "epsilon")] > m[(1, "epsilon")]
# Under DP nothing per client that depends on data is kept: no train loss, example counts NULL.
assert (1, "train_loss") not in m, "train loss published under DP"
rows = list(db.execute("select num_examples, train_loss from client_rounds where status = 'ok'"))
assert rows and all(n is None and l is None for n, l in rows), rows
print(f"ledger: epsilon {m[(1, 'epsilon')]:.3f} -> {m[(2, 'epsilon')]:.3f}, accuracy {m[(1, 'accuracy')]:.2f} -> {m[(2, 'accuracy')]:.2f}")
PY
echo "federated run over mutual TLS with 3 worker processes: OK"

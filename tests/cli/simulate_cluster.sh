#!/usr/bin/env bash
# issue 20: `fedtune simulate CONFIG` across processes: `--serve` (the coordinator) and one
# `--client K` process per simulated client (as a Slurm array task or a Kubernetes Indexed Job pod
# would run them), real model, mutual TLS on loopback. The final adapter equals the one-process
# `fedtune simulate CONFIG` (same config, same seeds): max |diff| <= 1e-6, and the coordinator's
# held-out losses per round are the simulation's.
#   tests/cli/simulate_cluster.sh FEDTUNE_BINARY MODEL
set -euo pipefail
bin="$1"; model="$2"
dir="$(mktemp -d)"
trap 'kill -9 $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
trap 'echo "FAILED at line $LINENO"; for f in "$dir"/*.log; do echo "== $f"; tail -n 20 "$f"; done' ERR
cat > "$dir/sim.yaml" <<YAML
model: {path: $model}
adapter: {kind: FFA_LORA, rank: 2, alpha: 4, target_modules: [q, v]}
clients: 3
rounds: 2
data: {tasks: [sentiment, record], examples_per_task: 30, eval_examples: 4, max_len: 64, partition: DIRICHLET, dirichlet_alpha: 1.0}
train: {local_steps: 2, batch: 2, learning_rate: 5.0e-3}
strategy: {merge: uncertainty}
seed: 4
YAML
"$bin" simulate "$dir/sim.yaml" --serve --check | grep -q 'valid for --serve'
# What only a one-machine simulation can do is refused by --serve, with exit status 78 (EX_CONFIG).
sed 's/^seed: 4/seed: 4\ncentralized_baseline: true/' "$dir/sim.yaml" > "$dir/bad.yaml"
rc=0; "$bin" simulate "$dir/bad.yaml" --serve --check > "$dir/bad.log" 2>&1 || rc=$?
[ "$rc" = 78 ] && grep -q 'centralized_baseline: run it with `fedtune simulate` on one machine' "$dir/bad.log"
"$bin" simulate "$dir/sim.yaml" -o "$dir/local" > "$dir/local.log" 2>&1
"$bin" provision -o "$dir/pki" --clients 3 > /dev/null
"$bin" simulate "$dir/sim.yaml" --serve --pki "$dir/pki" --listen 127.0.0.1:0 --state "$dir/cluster" --deadline 300 > "$dir/serve.log" 2>&1 &
serve=$!
port=""
for _ in $(seq 600); do
  port="$(sed -n 's/.*listening on port \([0-9]*\).*/\1/p' "$dir/serve.log" | tail -1)"
  [ -n "$port" ] && break; sleep 0.1
done
[ -n "$port" ] || { echo "the --serve process did not start"; cat "$dir/serve.log"; exit 1; }
pids=()
for k in 0 1 2; do
  "$bin" simulate "$dir/sim.yaml" --client "$k" --coordinator "localhost:$port" --pki "$dir/pki" --state "$dir/client-$k" \
    > "$dir/client-$k.log" 2>&1 &
  pids+=($!)
done
for p in "$serve" "${pids[@]}"; do wait "$p"; done   # each exit status checked (set -e)
grep -E 'committed:' "$dir/serve.log"
# The coordinator scores the global adapter on the simulation's held-out split, as the simulation does.
# The coordinator scores the global adapter on the simulation's held-out split: the same held-out
# losses, round 0 to 2, as the one-process simulation.
local_eval="$(grep -o 'eval loss [0-9][0-9.]*' "$dir/local.log" | tr '\n' ' ')"
cluster_eval="$(grep -o 'eval loss [0-9][0-9.]*' "$dir/serve.log" | tr '\n' ' ')"
echo "held-out losses: one process [$local_eval], across processes [$cluster_eval]"
[ -n "$local_eval" ] && [ "$local_eval" = "$cluster_eval" ]
grep -h 'training examples of the config' "$dir"/client-*.log
python3 "$(dirname "${BASH_SOURCE[0]}")/../support/compare_states.py" "$dir/local/state-2.safetensors" "$dir/cluster/state-2.safetensors" "across processes vs one process"
echo OK

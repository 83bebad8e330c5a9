#!/usr/bin/env bash
# Coordinator load test (issue 5, criterion 4): a `fedtune coordinator` process over mutual TLS on
# loopback against N stand-in worker daemons (bench_load_workers: one process, N threads, N
# certificates and TLS connections), LoRA r=18 on q,v of the real model = 1,036,800 parameters
# (4.1 MB) per update, 3 rounds, every worker selected every round. Reports per round the time
# outside training (all of it: stand-ins train in 0 s), the traffic, and the coordinator's RSS,
# for N = 50, 100, 200 so the memory trend shows.
#   bash bench/run_load.sh [N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
sizes=("${@:-50 100 200}"); [ $# -gt 0 ] || sizes=(50 100 200)
dir=runs/bench/load; rm -rf "$dir"; mkdir -p "$dir"
max=0; for n in "${sizes[@]}"; do [ "$n" -gt "$max" ] && max=$n; done
build/tools/fedtune provision -o "$dir/pki" --workers "$max" > /dev/null
for n in "${sizes[@]}"; do
  cat > "$dir/coord-$n.yaml" <<YAML
listen: 127.0.0.1:0
tls: {ca: $dir/pki/ca.pem, cert: $dir/pki/coordinator.pem, key: $dir/pki/coordinator.key}
tokens: $dir/pki/tokens.sha256
state_dir: $dir/state-$n
model: {path: $model}
adapter: {kind: LORA, rank: 18, alpha: 36, target_modules: [q, v]}
rounds: ${ROUNDS:-3}
min_workers: $n
deadline_seconds: 600
offline_after_seconds: 120
http: 127.0.0.1:0
YAML
  /usr/bin/time -v build/tools/fedtune coordinator --config "$dir/coord-$n.yaml" > "$dir/coord-$n.log" 2> "$dir/coord-$n.err" &
  coord=$!
  port=""
  for _ in $(seq 300); do port="$(sed -n 's/.*listening on port \([0-9]*\).*/\1/p' "$dir/coord-$n.log")"; [ -n "$port" ] && break; sleep 0.1; done
  [ -n "$port" ] || { cat "$dir/coord-$n.log" "$dir/coord-$n.err"; exit 1; }
  hport="$(sed -n 's/.*status server on port \([0-9]*\).*/\1/p' "$dir/coord-$n.log")"
  build/bench/bench_load_workers --address "localhost:$port" --pki "$dir/pki" --workers "$n" > "$dir/workers-$n.log" 2>&1 &
  wpid=$!
  # Sample the coordinator's RSS from its /metrics while it runs.
  ( peak=0; while kill -0 "$coord" 2>/dev/null; do
      # The coordinator's own /metrics on loopback (python3's urllib: no extra tool needed).
      v="$(python3 -c "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())" \
             "http://127.0.0.1:$hport/metrics" 2>/dev/null | sed -n 's/^fedtune_process_resident_bytes \(.*\)/\1/p')"
      [ -n "$v" ] && echo "$v" >> "$dir/rss-$n.txt"; sleep 0.5; done ) &
  wait "$wpid" "$coord"
  echo "[load] $n workers: $(cat "$dir/workers-$n.log" | tail -1)"
  grep -E 'committed:' "$dir/coord-$n.err" "$dir/coord-$n.log" | sed 's/.*\(round [0-9]*\/3 committed.*\)/\1/' | sed "s/^/[load] $n workers: /"
  echo "[load] $n workers: coordinator process peak RSS (incl. loading the base for the adapter layout): $(grep 'Maximum resident' "$dir/coord-$n.err" | awk '{printf "%.0f MiB", $NF/1024}')"
  [ -s "$dir/rss-$n.txt" ] && echo "[load] $n workers: coordinator RSS sampled during the rounds: max $(sort -g "$dir/rss-$n.txt" | tail -1 | awk '{printf "%.0f MiB", $1/1048576}')"
done

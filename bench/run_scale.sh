#!/usr/bin/env bash
# Simulation scaling: peak RSS with 4 vs 100 virtual clients on the real model, and the
# coordinator's per-round overhead with 1,000 stand-in clients. Prints the figures for README.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/bench
for c in clients4 clients100 standin1000; do
  rm -rf "runs/bench/$c"
  echo "[scale] $c"
  /usr/bin/time -v build/tools/fedtune simulate "configs/bench/$c.yaml" > "runs/bench/$c.log" 2> "runs/bench/$c.err"
  grep -E 'Maximum resident|Elapsed' "runs/bench/$c.err" | sed "s/^/[scale] $c: /"
done
python3 - <<'PY'
import csv, re
def rss(name):
    for line in open(f"runs/bench/{name}.err"):
        if "Maximum resident" in line:
            return int(line.split()[-1]) / 1024
r4, r100 = rss("clients4"), rss("clients100")
print(f"peak RSS: 4 clients {r4:.0f} MiB, 100 clients {r100:.0f} MiB -> {(r100 - r4) * 1024 / 96:.0f} KiB per extra client")
import json
rows = [json.loads(l) for l in open("runs/bench/standin1000/metrics.jsonl")]
for r in rows[1:]:
    print(f"stand-in round {r['round']}: 1000 updates, server overhead {float(r['overhead_seconds']):.1f} s "
          f"(merge+commit {float(r['server_merge_seconds']):.1f} s, client stand-ins {float(r['client_seconds']):.1f} s), "
          f"{float(r['bytes_up']) / 2**30:.2f} GiB received")
print(f"stand-in peak RSS {rss('standin1000'):.0f} MiB")
PY

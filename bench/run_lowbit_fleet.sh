#!/usr/bin/env bash
# Issue 23's federated comparison (configs/lowbit/fleet-*.yaml): every cell at SEEDS (default
# 1 2 3), then the final round's server-side held-out loss and exact match (the global adapter
# on the coordinator's Q4_1 base) as mean +- std. Runs in runs/lowbit/fleet-<cell>-seed<N>
# (a finished run is kept unless FORCE=1).   bash bench/run_lowbit_fleet.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/lowbit
for c in fleet-q41 fleet-mixed fleet-mixed-cloq; do
  for s in ${SEEDS:-1 2 3}; do
    out="runs/lowbit/$c-seed$s"
    if [ -e "$out.done" ] && [ -z "${FORCE:-}" ]; then continue; fi
    rm -rf "$out"
    sed "s/^seed: .*/seed: $s/" "configs/lowbit/$c.yaml" > "$out.yaml"
    echo "[fleet] $c seed $s"
    build/tools/fedtune simulate "$out.yaml" -o "$out" > "$out.log" 2>&1 && touch "$out.done"
  done
done
python3 - <<'PY'
import json, os, statistics
for c in ("fleet-q41", "fleet-mixed", "fleet-mixed-cloq"):
    loss, acc = [], []
    for s in range(1, 10):
        p = f"runs/lowbit/{c}-seed{s}/metrics.jsonl"
        if not os.path.exists(f"runs/lowbit/{c}-seed{s}.done"):
            continue
        last = [json.loads(l) for l in open(p)][-1]
        loss.append(last["eval_loss"]); acc.append(100 * last["accuracy"])
    if not loss:
        continue
    sd = lambda v, f: (" ± " + f % statistics.stdev(v)) if len(v) > 1 else ""
    print(f"| {c} | {len(loss)} | {statistics.mean(loss):.3f}{sd(loss, '%.3f')} | {statistics.mean(acc):.1f}%{sd(acc, '%.1f')} |")
PY

#!/usr/bin/env bash
# Issue 22 experiment: per-worker LoRA ranks chosen by the planner (configs/hetero/planned.yaml:
# ranks 4/8/16 of a rank-16 global adapter, nested merging) against every client at the highest
# rank the weakest worker holds (configs/hetero/uniform.yaml: rank 8), on real non-IID definition
# writing (one Debian dictionary per client), seeds 1-3, the same fleet and rounds. Prints per
# seed and the mean +- std of ROUGE-L, eval loss, median simulated round time and upload, then the
# planner's decision per worker (seed 1) with its predicted time beside the simulated one.
#   bash bench/run_hetero_rank.sh            (~15 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/bench
seeds=${SEEDS:-1 2 3}
for s in $seeds; do
  for c in uniform planned; do
    out="runs/bench/hetero-$c-s$s"
    rm -rf "$out"
    sed -e "s|^seed: 1|seed: $s\noutput_dir: $out|" "configs/hetero/$c.yaml" > "$out.yaml"
    echo "[hetero] $c seed $s"
    build/tools/fedtune simulate "$out.yaml" > "$out.log" 2>&1
  done
done
SEEDS="$seeds" python3 - <<'PY'
import json, os, sqlite3, statistics
seeds = os.environ["SEEDS"].split()
def last(c, s):
    rows = [json.loads(l) for l in open(f"runs/bench/hetero-{c}-s{s}/metrics.jsonl")]
    r = [x for x in rows if x["round"] > 0]
    return r[-1], statistics.median(x["sim_round_seconds"] for x in r), statistics.mean(x["bytes_up"] for x in r) / 2**20
def ms(v): return f"{statistics.mean(v):.4f} +- {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"
print("| run | seed | ROUGE-L | eval loss | median simulated round (s) | MiB up per round |")
print("|---|---|---|---|---|---|")
agg = {}
for c in ("uniform", "planned"):
    for s in seeds:
        l, t, up = last(c, s)
        agg.setdefault(c, []).append((l.get("rouge_l", 0), l["eval_loss"], t, up))
        print(f"| {c} | {s} | {l.get('rouge_l', 0):.4f} | {l['eval_loss']:.4f} | {t:.1f} | {up:.2f} |")
for c, v in agg.items():
    print(f"| {c} | mean +- std | " + " | ".join(ms([x[i] for x in v]) for i in range(4)) + " |")
p = json.load(open(f"runs/bench/hetero-planned-s{seeds[0]}/plan.json"))
db = sqlite3.connect(f"runs/bench/hetero-planned-s{seeds[0]}/ledger.sqlite")
print(f"\nplanner (seed {seeds[0]}, round 1): {p['summary']}")
print("| worker | rank | modules | batch x steps | predicted MiB | predicted s | measured train s (round 1, this machine) |")
print("|---|---|---|---|---|---|---|")
for w in p["workers"]:
    if w["excluded"]:
        print(f"| {w['worker']} | left out | | | | | |"); continue
    row = db.execute("select train_seconds, status from client_rounds where round = 1 and client = ?", (w["worker"],)).fetchone()
    print(f"| {w['worker']} | {w['rank']} | {w['modules']} | {w['batch']} x {w['local_steps']} | {w['predicted_mib']:.0f} | "
          f"{w['predicted_seconds']:.1f} | {row[0]:.1f} ({row[1]}) |")
PY

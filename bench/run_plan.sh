#!/usr/bin/env bash
# Issue 8 experiment: the same heterogeneous fleet (8x in speed and memory) trained 5 rounds with a
# uniform configuration that fits the weakest worker (configs/plan/uniform.yaml) and with the
# planner (configs/plan/planned.yaml); then every distinct planned configuration is run with
# `fedtune train` at the plan's longest sequence (full-length text) to compare its measured peak
# RSS with the memory model's prediction. Prints the figures for README.
#   bash bench/run_plan.sh            (~25 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p runs/bench
# planned-w15: the planner asked for 1.5x the uniform configuration's training work per round.
for c in uniform planned planned-w15; do
  rm -rf "runs/bench/plan-$c"
  src="configs/plan/${c%-w15}.yaml"
  sed "s|^seed: 11|seed: 11\noutput_dir: runs/bench/plan-$c|" "$src" > "runs/bench/plan-$c.yaml"
  [ "$c" = planned-w15 ] && sed -i 's/replan_every_round: true}/replan_every_round: true, work_factor: 1.5}/' "runs/bench/plan-$c.yaml"
  echo "[plan] $c"
  build/tools/fedtune simulate "runs/bench/plan-$c.yaml" > "runs/bench/plan-$c.log" 2>&1
done
python3 - <<'PY'
import json, statistics
def rows(c): return [json.loads(l) for l in open(f"runs/bench/plan-{c}/metrics.jsonl")]
out = {}
for c in ("uniform", "planned", "planned-w15"):
    r = [x for x in rows(c) if x["round"] > 0]
    med = statistics.median(x["sim_round_seconds"] for x in r)
    out[c] = med
    last = r[-1]
    print(f"[plan] {c}: median simulated round {med:.1f} s (rounds: " + ", ".join(f"{x['sim_round_seconds']:.1f}" for x in r) +
          f"); held-out accuracy after {len(r)} rounds {100*last['accuracy']:.1f}%, eval loss {last['eval_loss']:.4f}; "
          f"MiB up per round {statistics.mean(x['bytes_up'] for x in r)/2**20:.1f}")
for c in ("planned", "planned-w15"):
    print(f"[plan] median round time, {c}: {100*(1 - out[c]/out['uniform']):.0f}% shorter than uniform")
p = json.load(open("runs/bench/plan-planned/plan.json"))
print(f"[plan] planner: {p['summary']}; predicted round {p['round_seconds']:.1f} s")
PY
# Measured peaks of the planned configurations (distinct ones), full-length sequences.
python3 - "$model" <<'PY' > runs/bench/plan-memory.txt
import json, subprocess, sys, re
model = sys.argv[1]
p = json.load(open("runs/bench/plan-planned/plan.json"))
seen = {}
for w in p["workers"]:
    if w["excluded"]: continue
    key = (w["modules"], w["base"], w["batch"])
    if key in seen: continue
    cmd = ["/usr/bin/time", "-v", "build/tools/fedtune", "train", model, "-d", "/usr/share/common-licenses/GPL-3", "-o", "runs/bench/plan-memtmp",
           "--adapter", "ffa_lora", "--rank", "8", "--alpha", "16", "--modules", w["modules"], "--batch", str(w["batch"]),
           "--max-len", str(p["seq"]), "--steps", "2", "--eval-examples", "0", "--holdout", "0", "--base-type", w["base"].lower()]
    r = subprocess.run(cmd, capture_output=True, text=True)
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
    seen[key] = (peak, w["predicted_mib"])
    err = (peak - w["predicted_mib"]) / w["predicted_mib"]
    print(f"[plan] memory {w['worker']}: modules {w['modules']}, base {w['base']}, batch {w['batch']}, seq {p['seq']}: "
          f"measured {peak:.0f} MiB, predicted {w['predicted_mib']:.0f} MiB ({100*err:+.1f}%)")
PY
cat runs/bench/plan-memory.txt
rm -rf runs/bench/plan-memtmp

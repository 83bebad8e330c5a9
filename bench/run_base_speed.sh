#!/usr/bin/env bash
# Issue 22: training speed per base precision, as the planner sees it. For each kernel backend
# (cpu-fast, cpu-bf16 where the CPU has it): the simulation's planner calibration (probe adapter on
# all seven modules, batch 4, 4 timed steps per type: plan.json base_speed, relative to the stored
# Q4_1), three repetitions; then `fedtune train` for 12 steps per base type, whose tokens/s ratio to
# Q4_1 is what the calibration should predict. Prints one table per backend.
#   bash bench/run_base_speed.sh          (~6 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
out=runs/bench/base-speed
mkdir -p "$out"
types="q8_0 q4_0 nf4 q3_k q2_k"
build/tools/fedtune make-task wordnet -o "$out/wordnet.jsonl" -n 200 > /dev/null
devices="cpu-fast"
grep -q avx512_bf16 /proc/cpuinfo && devices="cpu-fast cpu-bf16"
for dev in $devices; do
  for rep in 1 2 3; do
    cat > "$out/cal-$dev-$rep.yaml" <<YAML
model: {path: $model}
adapter: {kind: LORA, rank: 8, alpha: 16}
clients: 1
rounds: 1
data: {tasks: [wordnet], examples_per_task: 40, eval_examples: 2, max_len: 96}
train: {local_steps: 1, batch: 4, device: $dev}
eval: {max_new_tokens: 4}
planner: {enabled: true, calibration_steps: 4, base_types: [q4_1, $(echo $types | sed 's/ /, /g')]}
seed: $rep
output_dir: $out/cal-$dev-$rep
YAML
    rm -rf "$out/cal-$dev-$rep"
    build/tools/fedtune simulate "$out/cal-$dev-$rep.yaml" > "$out/cal-$dev-$rep.log" 2>&1
  done
  for t in q4_1 $types; do
    build/tools/fedtune --log-level warn train "$model" -d "$out/wordnet.jsonl" --steps 12 --batch 4 --max-len 96 --base-type "$t" \
      --device "$dev" --eval-examples 0 -o "$out/train-$dev-$t" > "$out/train-$dev-$t.log" 2>&1
  done
done
python3 - "$out" $devices <<'PY'
import json, re, statistics, sys
out, devices = sys.argv[1], sys.argv[2:]
types = ["Q8_0", "Q4_0", "NF4", "Q3_K", "Q2_K"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"[base-speed] {cpu}, SmolLM2-135M-Instruct Q4_1 stored; speed relative to Q4_1")
for dev in devices:
    cal = {t: [] for t in types}
    for rep in (1, 2, 3):
        bs = json.load(open(f"{out}/cal-{dev}-{rep}/plan.json")).get("base_speed", {})
        for t in types:
            cal[t].append(bs.get(t, float("nan")))
    tps = {}
    for t in ["Q4_1"] + types:
        m = re.search(r"\(([0-9.]+) tok/s incl", open(f"{out}/train-{dev}-{t.lower()}.log").read())
        tps[t] = float(m.group(1))
    print(f"[base-speed] {dev}: fedtune train Q4_1 {tps['Q4_1']:.0f} tokens/s")
    print("| base | calibration (3 runs, mean +- std) | fedtune train 12 steps | error |")
    print("|---|---|---|---|")
    for t in types:
        mu, sd = statistics.mean(cal[t]), statistics.stdev(cal[t])
        tr = tps[t] / tps["Q4_1"]
        print(f"| {t} | x{mu:.2f} +- {sd:.2f} | x{tr:.2f} ({tps[t]:.0f} tokens/s) | {100*(mu/tr-1):+.0f}% |")
PY

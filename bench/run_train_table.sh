#!/usr/bin/env bash
# The README's training-speed table: fedtune's memory modes and backends, then PyTorch + PEFT
# (fp32) on the same model, batch and sequence length, one after the other in one session.
#   bench/run_train_table.sh [MODEL] [EXTRA bench_train ARGS...]   (after scripts/setup.sh and a build)
# PyTorch comes from the oracle environment (scripts/setup.sh --oracles; $FEDTUNE_ORACLES or
# ~/.cache/fedtune-oracles).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
model="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
shift || true
b=(build/bench/bench_train "$model" --adapter lora --rank 16 --seq 256 --batch 8 --steps 2 -t 2 "$@")
# --device cpu is cpu-bf16 where the CPU has a bf16 unit, else the same as cpu-fast (each row names
# the kernels it ran).
for dev in cpu cpu-fast; do
  "${b[@]}" --device $dev --activation-budget 1024 2>/dev/null
  "${b[@]}" --device $dev --no-recompute --micro-batch 2 2>/dev/null
  "${b[@]}" --device $dev --no-recompute 2>/dev/null
  "${b[@]}" --device $dev --activation-budget 0 2>/dev/null
done
"${b[@]}" --device cpu-ref --activation-budget 0 2>/dev/null
py="${FEDTUNE_ORACLES:-$HOME/.cache/fedtune-oracles}/bin/python"
"$py" bench/peft_train_bench.py "$model" --steps 2 --threads 2 2>&1 | tail -1
"$py" bench/peft_train_bench.py "$model" --steps 2 --threads 2 --bf16 2>&1 | tail -1

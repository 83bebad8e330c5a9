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
"${b[@]}" --activation-budget 1024 2>/dev/null
"${b[@]}" --no-recompute --micro-batch 2 2>/dev/null
"${b[@]}" --no-recompute 2>/dev/null
"${b[@]}" 2>/dev/null
"${b[@]}" --device cpu-ref 2>/dev/null
"${FEDTUNE_ORACLES:-$HOME/.cache/fedtune-oracles}/bin/python" bench/peft_train_bench.py "$model" --steps 2 --threads 2 2>&1 | tail -1

#!/usr/bin/env bash
# Side-by-side inference benchmark: fedtune vs llama.cpp on the same model, same machine, same
# run. Needs `scripts/setup.sh --oracles` for llama.cpp (llama-cpp-python). Prints a Markdown table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
threads="${THREADS:-$(nproc)}"
py="${FEDTUNE_ORACLES:-$HOME/.cache/fedtune-oracles}/bin/python"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; model: $model; threads: $threads"
echo "| implementation | threads | test | tokens/s |"
echo "|---|---|---|---|"
# Greedy answers to 48 WordNet prompts (evaluation's decoding): one by one vs batched.
answers="$(mktemp --suffix=.jsonl)"
trap 'rm -f "$answers"' EXIT
if build/tools/fedtune make-task wordnet -o "$answers" -n 48 >/dev/null 2>&1; then
  build/bench/bench_inference "$model" -t "$threads" --batch 4 8 16 32 --answers "$answers" --n-answers 48 --max-new 40
else
  build/bench/bench_inference "$model" -t "$threads" --batch 4 8 16 32
fi
# A round's evaluation (200 held-out prompts, <= 32 new tokens, decoded 16 at a time) beside one
# local round of the real-data table (8 steps of 8 sequences of <= 128 tokens, LoRA r=8, --device cpu).
evalset="$(mktemp --suffix=.jsonl)"
trap 'rm -f "$answers" "$evalset"' EXIT
if build/tools/fedtune make-task wordnet -o "$evalset" -n 200 >/dev/null 2>&1; then
  build/bench/bench_inference "$model" -t "$threads" --answers "$evalset" --n-answers 200 --max-new 32 --evaluation-only
  build/bench/bench_train "$model" --adapter lora --rank 8 --seq 128 --batch 8 --steps 8 -t "$threads" --device cpu --activation-budget 1024 2>&1 |
    awk -v t="$threads" '/^step [0-9]+:/ {s += $3} /^\| fedtune/ {split($0, c, "|"); d = c[2]}
         END {printf "| one local round:%s, 8 steps of 8 x 128 tokens, LoRA r=8 (bench_train) | %s | training | %.1f s |\n", d, t, s}'
fi
# The same single-sequence and 16-sequence decoding with f32 activations (no 8-bit quantization).
build/bench/bench_inference "$model" -t "$threads" --batch 16 --f32-decoding | grep -v "peak RSS"
if [ -x "$py" ] && "$py" -c "import llama_cpp" 2>/dev/null; then
  "$py" bench/llamacpp_bench.py "$model" --threads "$threads"
else
  echo "(llama.cpp not installed: run scripts/setup.sh --oracles)"
fi

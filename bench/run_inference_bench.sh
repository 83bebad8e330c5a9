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
# The same single-sequence and 16-sequence decoding with f32 activations (no 8-bit quantization).
build/bench/bench_inference "$model" -t "$threads" --batch 16 --f32-decoding | grep -v "peak RSS"
if [ -x "$py" ] && "$py" -c "import llama_cpp" 2>/dev/null; then
  "$py" bench/llamacpp_bench.py "$model" --threads "$threads"
else
  echo "(llama.cpp not installed: run scripts/setup.sh --oracles)"
fi

#!/usr/bin/env bash
# Issue 23's perplexity table: the real model re-quantized to each base type, without and with
# quantization-error compensation (rank 16), on two texts: GPL-3 (the license family the cloq
# calibration text, Apache-2.0, comes from) and perldiag.pod (another domain). One log per cell
# in runs/lowbit/ (kept: a finished cell is not rerun unless FORCE=1); bench/lowbit_table.py
# prints the markdown table.   bash bench/run_lowbit_table.sh [MAX_TOKENS (default 4096)]
set -euo pipefail
cd "$(dirname "$0")/.."
max_tokens="${1:-4096}"
out=runs/lowbit
mkdir -p "$out"
texts=(-f /usr/share/common-licenses/GPL-3 -f /usr/share/perl/5.36.0/pod/perldiag.pod)
cells=("stored none" "q8_0 none" "nf4 none" "nf4 svd" "nf4 cloq" "nf4 gptq-cloq" "q3_k none" "q3_k svd" "q3_k loftq" "q3_k cloq"
       "q3_k gptq" "q3_k gptq-cloq" "nf3 none" "nf3 cloq" "q2_k none" "q2_k svd" "q2_k cloq" "q2_k gptq-cloq" "nf2 none" "nf2 cloq")
for cell in "${cells[@]}"; do
  read -r type method <<< "$cell"
  log="$out/$type-$method.log"
  if [ -s "$log" ] && grep -q "perldiag.pod: perplexity" "$log" && [ -z "${FORCE:-}" ]; then continue; fi
  args=()
  [ "$type" != stored ] && args+=(--base-type "$type")
  [ "$method" != none ] && args+=(--compensate "$method" --compensate-rank 16)
  echo "[lowbit] $type $method"
  /usr/bin/time -f "wall %e s, peak RSS %M KB" build/tools/fedtune perplexity models/SmolLM2-135M-Instruct.Q4_1.gguf "${texts[@]}" \
    --max-tokens "$max_tokens" "${args[@]}" 2>&1 | grep -v "tok/s, ETA" > "$log.part"
  mv "$log.part" "$log"
done
python3 bench/lowbit_table.py "$out"

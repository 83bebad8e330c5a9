#!/usr/bin/env bash
# Issue 23's fine-tuning rows: LoRA r=8 on every module of the real model, trained on a built-in
# task at each base precision, without and with a rank-16 correction (cloq calibrates on the
# training examples' inputs); held-out loss and exact match. SEEDS="1 2 3" (default), one log
# per cell and seed in runs/lowbit/ft-<base>-<method>-seed<N>.log (kept unless FORCE=1).
#   bash bench/run_lowbit_finetune.sh [TASK (default record)] [STEPS (default 24)]
set -euo pipefail
cd "$(dirname "$0")/.."
task="${1:-record}"
steps="${2:-24}"
out=runs/lowbit
mkdir -p "$out"
cells=("stored none" "q3_k none" "q3_k cloq" "q2_k none" "q2_k cloq")
for s in ${SEEDS:-1 2 3}; do
  data="$out/$task-seed$s.jsonl"
  [ -s "$data" ] || build/tools/fedtune make-task "$task" -o "$data" -n 600 --seed "$s" > /dev/null
  for cell in "${cells[@]}"; do
    read -r type method <<< "$cell"
    log="$out/ft-$task-$type-$method-seed$s.log"
    if [ -s "$log" ] && grep -q "\[after\]" "$log" && [ -z "${FORCE:-}" ]; then continue; fi
    args=()
    [ "$type" != stored ] && args+=(--base-type "$type")
    [ "$method" != none ] && args+=(--compensate "$method" --compensate-rank 16)
    echo "[lowbit-ft] $task $type $method seed $s"
    build/tools/fedtune train models/SmolLM2-135M-Instruct.Q4_1.gguf -d "$data" -o "$out/ft-$task-$type-$method-seed$s" \
      --adapter lora --rank 8 --steps "$steps" --batch 8 --lr 5e-3 --eval-examples 60 --max-new-tokens 24 --seed "$s" \
      "${args[@]}" 2>&1 | grep -v "ETA" > "$log.part"
    mv "$log.part" "$log"
  done
done
python3 bench/lowbit_table.py "$out" --finetune "$task"

#!/usr/bin/env bash
# Measures the peak RSS of `fedtune train` on the real model over a grid of batch, sequence
# length, adapter size, module set and base precision (2 optimizer steps each, plain text so
# every sequence is full length). Output: runs/bench/memory/peaks.csv, the data the planner's
# memory model (planner/planner.h) was fitted to and is checked against (bench_memory_fit). The
# last field: 1 recomputation, 0 every activation kept, kN N sequences' activations kept per pass.
#   bash bench/memory_model.sh [CONFIG_LIST]   (default: the grid below)
# MODEL and OUT override the model file and the output folder (another shape: see
# bench/make_shape_model.py and docs/guide.md "Memory model").
set -euo pipefail
cd "$(dirname "$0")/.."
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
out="${OUT:-runs/bench/memory}"; mkdir -p "$out"
text=/usr/share/common-licenses/GPL-3
csv="$out/peaks.csv"
echo "batch,seq,kind,rank,modules,base,recompute,peak_mib,seconds" > "$csv"
grid="${1:-}"
if [ -z "$grid" ]; then
  grid="1,64,ffa_lora,4,q:v,q4_1,1 2,128,ffa_lora,8,all,q4_1,1 4,256,ffa_lora,8,all,q4_1,1 8,256,lora,16,all,q4_1,1
8,128,ffa_lora,8,q:v,q4_1,1 1,256,lora,16,all,q4_1,1 4,128,lora,8,attn,q8_0,1 2,256,ffa_lora,16,all,nf4,1
8,256,ffa_lora,8,all,nf4,1 4,64,lora,4,mlp,q8_0,1 2,64,ffa_lora,8,all,q4_1,0 4,128,ffa_lora,8,all,q4_1,0"
fi
for cfg in $grid; do
  IFS=, read -r b s kind r mods base rec <<< "$cfg"
  flags=(--adapter "$kind" --rank "$r" --modules "${mods//:/,}" --batch "$b" --max-len "$s" --steps 2 --eval-examples 0 --holdout 0 --base-type "$base")
  case "$rec" in
    1) flags+=(--activation-budget 0) ;;
    0) flags+=(--no-recompute) ;;
    k*) flags+=(--no-recompute --micro-batch "${rec#k}") ;;
  esac
  /usr/bin/time -v build/tools/fedtune train "$model" -d "$text" -o "$out/tmp" "${flags[@]}" > "$out/run.log" 2> "$out/time.log" \
    || { cat "$out/run.log" "$out/time.log"; exit 1; }
  peak=$(awk '/Maximum resident/ {printf "%.1f", $NF/1024}' "$out/time.log")
  secs=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); t=0; for(i=1;i<=n;i++) t=t*60+a[i]; print t}' "$out/time.log")
  echo "$b,$s,$kind,$r,$mods,$base,$rec,$peak,$secs" | tee -a "$csv"
done
rm -rf "$out/tmp"

#!/usr/bin/env bash
# Runs every results-table cell (configs/table/*.yaml) on the real model and prints the table.
#   bash bench/run_sim_table.sh [cell-name ...]   (default: all; ~5 min per cell on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
cells=("$@")
if [ ${#cells[@]} -eq 0 ]; then for f in configs/table/*.yaml; do cells+=("$(basename "$f" .yaml)"); done; fi
for c in "${cells[@]}"; do
  if [ -s "runs/table/$c/metrics.csv" ] && [ -z "${FORCE:-}" ]; then echo "[table] $c: done already (FORCE=1 to rerun)"; continue; fi
  rm -rf "runs/table/$c"
  echo "[table] $c"
  build/tools/fedtune simulate "configs/table/$c.yaml" > "runs/table-$c.log" 2>&1 || { echo "[table] $c failed: see runs/table-$c.log"; tail -3 "runs/table-$c.log"; }
done
python3 bench/sim_table.py runs/table

#!/usr/bin/env bash
# Issue 21's results table on real text: every configs/real/*.yaml (or the named ones) at seeds
# 1 2 3 (SEEDS="..." to change), then bench/real_table.py prints mean +- std per cell.
#   bash bench/run_real_table.sh [definitions definitions-scarce ...]
# A finished run (runs/real/<cell>-seed<N>.done) is not rerun unless FORCE=1. Needs the Debian
# dictionary packages (scripts/setup.sh installs them) and build/tools/fedtune.
set -euo pipefail
cd "$(dirname "$0")/.."
cells=("$@")
if [ ${#cells[@]} -eq 0 ]; then for f in configs/real/*.yaml; do cells+=("$(basename "$f" .yaml)"); done; fi
mkdir -p runs/real
for c in "${cells[@]}"; do
  for s in ${SEEDS:-1 2 3}; do
    out="runs/real/$c-seed$s"
    if [ -e "$out.done" ] && [ -z "${FORCE:-}" ]; then echo "[real] $c seed $s: done already (FORCE=1 to rerun)"; continue; fi
    rm -rf "$out"
    grep -q '^seed: ' "configs/real/$c.yaml" || { echo "[real] configs/real/$c.yaml has no top-level 'seed:' line" >&2; exit 2; }
    sed "s/^seed: .*/seed: $s/" "configs/real/$c.yaml" > "runs/real/$c-seed$s.yaml"
    echo "[real] $c seed $s"
    rm -f "$out.done"
    if build/tools/fedtune simulate "runs/real/$c-seed$s.yaml" -o "$out" > "runs/real/$c-seed$s.log" 2>&1; then
      touch "$out.done"
    else
      echo "[real] $c seed $s failed: see runs/real/$c-seed$s.log"; tail -3 "runs/real/$c-seed$s.log"
    fi
  done
done
python3 bench/real_table.py runs/real

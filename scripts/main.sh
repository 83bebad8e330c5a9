#!/usr/bin/env bash
# The README's main command: set-up, build, then the main job: a simulated federated fine-tune
# of the real SmolLM2-135M-Instruct Q4_1 (configs/quickstart.yaml: 4 heterogeneous clients,
# FFA-LoRA, uncertainty-aware merging), showing held-out accuracy before and after.
# Another config can be passed: bash scripts/main.sh configs/other.yaml
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j "${FEDTUNE_JOBS:-$(nproc)}"
config="${1:-configs/quickstart.yaml}"
build/tools/fedtune simulate "$config"

#!/usr/bin/env bash
# The README's main command: set-up, build, then the main job. Until the simulation lands
# (issue 7) the main job is chat generation with the real SmolLM2-135M-Instruct Q4_1 model.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j "${FEDTUNE_JOBS:-$(nproc)}"
prompt="${1:-What is the capital of France?}"
build/tools/fedtune generate models/SmolLM2-135M-Instruct.Q4_1.gguf --chat -p "$prompt" -n 128

#!/usr/bin/env bash
# Set-up, build and tests in one command (README "Run the tests"; .ci/run calls exactly this).
#   scripts/test.sh            unit + real-model + deployment tests (what CI runs)
#   scripts/test.sh --asan     also the unit tests under ASan/UBSan in build-asan/ and the
#                              file-format fuzz targets for 30 s each (clang, build-fuzz/;
#                              scripts/fuzz.sh alone runs all four, the RPC fuzzer too, longer)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
jobs="${FEDTUNE_JOBS:-$(nproc)}"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$jobs"
(cd build && ctest -L 'unit|model|deploy' --output-on-failure -j "$jobs" --timeout 1500)
if [[ "${1:-}" == "--asan" ]]; then
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DFEDTUNE_SANITIZE=ON -DFEDTUNE_CUDA=OFF -DFEDTUNE_BENCH=OFF
  cmake --build build-asan -j "$jobs"
  (cd build-asan && ctest -L unit --output-on-failure -j "$jobs")
  # The CI budget (45 min on 2 cores): the RPC fuzzer's build (the whole coordinator under clang)
  # is left to scripts/fuzz.sh; the RPC handlers' hostile inputs are also HostileTest's, under ASan.
  FEDTUNE_FUZZ_TARGETS="${FEDTUNE_FUZZ_TARGETS:-update_fuzzer safetensors_fuzzer gguf_fuzzer}" bash scripts/fuzz.sh "${FEDTUNE_FUZZ_SECONDS:-30}"
fi

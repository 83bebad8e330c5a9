#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) in build-fuzz/ and runs each for a
# bounded time; a crash fails the script and leaves the input in build-fuzz/artifacts/.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60; scripts/test.sh --asan runs this)
#   FEDTUNE_FUZZ_TARGETS="gguf_fuzzer ..."  a subset (default: all four; CI leaves out
#                                            rpc_fuzzer, whose build is most of the fuzz build's time)
# Corpora are kept in build-fuzz/corpus/<target> between runs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
seconds="${1:-${FEDTUNE_FUZZ_SECONDS:-60}}"
jobs="${FEDTUNE_JOBS:-$(nproc)}"
# -O1 with line tables (libFuzzer's recommended level; symbolized stack traces; ~20% faster to
# build than -O2 -g).
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only -DNDEBUG" \
  -DFEDTUNE_FUZZ=ON -DFEDTUNE_CUDA=OFF -DFEDTUNE_BENCH=OFF > /dev/null
read -r -a targets <<< "${FEDTUNE_FUZZ_TARGETS:-update_fuzzer safetensors_fuzzer gguf_fuzzer rpc_fuzzer}"
cmake --build build-fuzz -j "$jobs" --target "${targets[@]}"
mkdir -p build-fuzz/artifacts
for t in "${targets[@]}"; do
  mkdir -p "build-fuzz/corpus/$t"
  echo "[fuzz] $t for ${seconds}s"
  rc=0
  extra=()
  # rpc_fuzzer: live gRPC servers and their threads outlive each input (no per-input leak checks;
  # at exit c-ares' resolver state is suppressed as in the tests); a handler that hangs past
  # 60 s is a finding.
  if [ "$t" = rpc_fuzzer ]; then extra=(-detect_leaks=0 -timeout=60); fi
  LSAN_OPTIONS="suppressions=$here/tests/lsan.supp" build-fuzz/fuzz/$t -max_total_time="$seconds" -rss_limit_mb=4096 -artifact_prefix=build-fuzz/artifacts/ \
    -print_final_stats=1 "${extra[@]}" "build-fuzz/corpus/$t" > "build-fuzz/$t.log" 2>&1 || rc=$?
  grep -E "stat::number_of_executed_units|stat::peak_rss|^Done" "build-fuzz/$t.log" || true
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "build-fuzz/$t.log"
    echo "[fuzz] $t found a failure (input in build-fuzz/artifacts/)"
    exit 1
  fi
done
echo "[fuzz] no failures"

#!/usr/bin/env bash
# ARM64 (aarch64) build of fedtune, reproducible on an x86-64 Debian 12 machine as root:
#   1. a Debian bookworm root made with mmdebstrap (amd64 + arm64 multiarch) holding Debian's
#      cross toolchain (crossbuild-essential-arm64), the arm64 -dev packages fedtune links and
#      qemu-user (the host stays untouched: arm64 -dev packages would replace the amd64 ones);
#   2. a cross build in that root (cmake/aarch64-linux-gnu.cmake, Release, no CUDA);
#   3. the unit tests run under qemu-aarch64 (ctest -L unit; CMAKE_CROSSCOMPILING_EMULATOR).
#   scripts/arm64-cross.sh [--no-tests|--root-only]      root: $FEDTUNE_ARM64_ROOT (default /var/tmp/fedtune-arm64-root)
# Times and results of the last run: README "Deploy" / docs/deploy.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${FEDTUNE_ARM64_ROOT:-/var/tmp/fedtune-arm64-root}"
run_tests=1
root_only=0
for a in "$@"; do
  case "$a" in
    --no-tests) run_tests=0 ;;
    --root-only) root_only=1 ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "arm64-cross.sh: unknown argument '$a'" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "arm64-cross.sh: needs root (mmdebstrap, chroot)" >&2; exit 1; }
command -v mmdebstrap > /dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap
start=$(date +%s)
pkgs=(crossbuild-essential-arm64 cmake ninja-build pkg-config qemu-user python3
  protobuf-compiler protobuf-compiler-grpc libeigen3-dev nlohmann-json3-dev libcli11-dev
  libgrpc++-dev:arm64 libprotobuf-dev:arm64 libabsl-dev:arm64 libssl-dev:arm64 libyaml-cpp-dev:arm64
  libspdlog-dev:arm64 libfmt-dev:arm64 libsqlite3-dev:arm64 libgtest-dev:arm64 libgmock-dev:arm64
  libbenchmark-dev:arm64 libopenblas-dev:arm64 libboost-dev:arm64)
if [ ! -f "$root/.fedtune-ready" ]; then
  echo "[arm64] creating $root with mmdebstrap (Debian bookworm, amd64 + arm64)"
  rm -rf "$root"
  mmdebstrap --variant=apt --architectures=amd64,arm64 --include="$(IFS=,; echo "${pkgs[*]}")" bookworm "$root" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main"
  touch "$root/.fedtune-ready"
fi
echo "[arm64] root ready after $(( $(date +%s) - start )) s"
((root_only)) && exit 0
# The sources (tracked and untracked-but-not-ignored files; no build folders) into the root.
rm -rf "$root/src" && mkdir -p "$root/src"
(cd "$here" && git ls-files -co --exclude-standard -z | tar -cf - --null --no-recursion -T -) | tar -xf - -C "$root/src"
cleanup=""  # undone at exit: only what this script set up
trap 'eval "$cleanup"' EXIT
if ! mountpoint -q "$root/proc"; then
  mount -t proc proc "$root/proc"
  cleanup+='umount "$root/proc" 2>/dev/null || true;'
fi
jobs="${FEDTUNE_JOBS:-$(nproc)}"
b=$(date +%s)
chroot "$root" /bin/bash -c "cd /src && cmake -S . -B /build-arm64 -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE=/src/cmake/aarch64-linux-gnu.cmake -DFEDTUNE_CUDA=OFF > /build-arm64.configure.log \
  && cmake --build /build-arm64 -j $jobs"
echo "[arm64] cross build: $(( $(date +%s) - b )) s"
chroot "$root" /bin/bash -c "file /build-arm64/tools/fedtune 2>/dev/null || head -c 20 /build-arm64/tools/fedtune | od -c | head -2"
# The arm64 Debian package, checked by lintian when the host has it.
chroot "$root" /bin/bash -c "cd /build-arm64 && cpack -G DEB -B /build-arm64/debs > /build-arm64/cpack.log 2>&1" \
  && echo "[arm64] package: $(ls "$root"/build-arm64/debs/*.deb | xargs -n1 basename | tr '\n' ' ')"
if command -v lintian > /dev/null && ls "$root"/build-arm64/debs/fedtune_*_arm64.deb > /dev/null 2>&1; then
  lintian "$root"/build-arm64/debs/fedtune_*_arm64.deb 2>&1 | grep -v 'running with root privileges' || true
  echo "[arm64] lintian done (no output: no tags)"
fi
if ((run_tests)); then
  # Tests that start fedtune processes (coordinator + workers) exec aarch64 binaries from an
  # emulated test: the kernel runs them through qemu-aarch64 when binfmt_misc knows the format.
  # Registered here for the run (flag F: the interpreter is opened now, usable in the root) and
  # removed afterwards, unless the host already has an aarch64 handler.
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
  binfmt=/proc/sys/fs/binfmt_misc
  mountpoint -q "$binfmt" || mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null || true
  if [ -w "$binfmt/register" ] && ! grep -qs 'magic 7f454c460201010000000000000000000200b700' "$binfmt"/*; then
    printf '%s' ':fedtune-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$root"'/usr/bin/qemu-aarch64:F' > "$binfmt/register"
    cleanup+='echo -1 > "$binfmt/fedtune-aarch64" 2>/dev/null || true;'
    echo "[arm64] binfmt_misc: aarch64 binaries run through qemu-aarch64 for this run"
  fi
  t=$(date +%s)
  chroot "$root" /bin/bash -c "cd /build-arm64 && qemu-aarch64 tools/fedtune --version && ctest -L unit -j $jobs --timeout 3000 --output-on-failure"
  echo "[arm64] unit tests under qemu-aarch64: $(( $(date +%s) - t )) s"
fi
echo "[arm64] total: $(( $(date +%s) - start )) s"

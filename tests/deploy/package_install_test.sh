#!/usr/bin/env bash
# issue 20: the Debian packages, installed on a clean Debian system and run by systemd.
#  1. `cpack` builds fedtune_<v>_<arch>.deb from BUILD_DIR; lintian reports no errors;
#  2. a fresh Debian bookworm root (mmdebstrap, Debian packages only) gets systemd and the package
#     (apt resolves its dependencies from Debian); `systemd-analyze verify` passes on the units;
#  3. the root boots with systemd-nspawn (own network namespace); credentials from
#     `fedtune provision`, the real model and a built-in task are put where the shipped
#     /etc/fedtune/*.yaml expect them (only rounds and the local work are made smaller);
#  4. `systemctl start fedtune-coordinator fedtune-worker`: round 1 commits; `systemctl stop
#     fedtune-coordinator` (SIGTERM) during round 2 exits cleanly with round 2 not committed;
#     `systemctl stop fedtune-worker` (SIGTERM) exits cleanly too; restarted, the coordinator
#     resumes and commits round 2 with the update the worker kept; both services end with result "success", the state
#     belongs to the fedtune user.
#   tests/deploy/package_install_test.sh BUILD_DIR MODEL      (root; exit 77 = skipped with the reason)
set -euo pipefail
build="$(cd "$1" && pwd)"; model="$(realpath "$2")"
skip() { echo "SKIPPED: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "needs root (mmdebstrap, systemd-nspawn)"
for t in mmdebstrap systemd-nspawn lintian cpack nsenter; do
  command -v "$t" > /dev/null || skip "$t is not installed (scripts/setup.sh installs mmdebstrap, systemd-container, lintian)"
done
[ -s "$model" ] || skip "no model at $model"
dir="$(mktemp -d /var/tmp/fedtune-pkgtest.XXXXXX)"
root="$dir/root"; nspawn_pid=""
cleanup() {
  [ -n "$nspawn_pid" ] && kill "$nspawn_pid" 2>/dev/null && wait "$nspawn_pid" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
fail() { echo "FAILED: $*"; [ -n "${leader:-}" ] && nsenter -t "$leader" -a journalctl --no-pager -n 60 -u 'fedtune-*' || true; exit 1; }
t0=$(date +%s)

# ---- 1. packages + lintian ----
(cd "$build" && cpack -G DEB -B "$dir/debs" > "$dir/cpack.log") || { cat "$dir/cpack.log"; fail "cpack"; }
deb="$(ls "$dir"/debs/fedtune_*.deb)"
echo "packages: $(cd "$dir/debs" && ls ./*.deb | xargs -n1 basename | tr '\n' ' ')"
lintian "$dir"/debs/*.deb 2>&1 | grep -v "running with root privileges" > "$dir/lintian.log" || true
cat "$dir/lintian.log"
if grep -q '^E:' "$dir/lintian.log"; then fail "lintian reports errors"; fi
echo "lintian: no errors ($(grep -c '^[WIP]:' "$dir/lintian.log" || true) other tags)"

# ---- 2. a fresh root with the package ----
mkdir "$dir/install" && cp "$dir"/debs/*.deb "$dir/install/"   # fedtune and, when built, fedtune-cuda
mmdebstrap --variant=apt --include=systemd,systemd-sysv,dbus,adduser \
  --customize-hook="copy-in $dir/install /tmp" \
  --customize-hook='chroot "$1" sh -c "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends /tmp/install/*.deb && rm -r /tmp/install"' \
  bookworm "$root" "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian-security bookworm-security main" > "$dir/mmdebstrap.log" 2>&1 \
  || { tail -30 "$dir/mmdebstrap.log"; fail "mmdebstrap (needs deb.debian.org)"; }
echo "fresh root with the package: $(( $(date +%s) - t0 )) s"
chroot "$root" systemd-analyze verify --man=no /lib/systemd/system/fedtune-coordinator.service \
  /lib/systemd/system/fedtune-worker.service || fail "systemd-analyze verify"
cp "$root/lib/systemd/system/fedtune-worker@.service" "$root/etc/systemd/system/fedtune-worker@check.service"
chroot "$root" systemd-analyze verify --man=no /etc/systemd/system/fedtune-worker@check.service || fail "systemd-analyze verify (template)"
rm "$root/etc/systemd/system/fedtune-worker@check.service"
echo "systemd-analyze verify: OK"

# ---- 3. what an operator puts in place ----
# A Debian installer writes /etc/hosts (mmdebstrap does not); the worker's address is localhost.
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
chroot "$root" fedtune provision -o /etc/fedtune/pki --host localhost --workers 1 > /dev/null
chroot "$root" sh -c 'chgrp -R fedtune /etc/fedtune/pki && chmod -R g+rX /etc/fedtune/pki'
mkdir -p "$root/var/lib/fedtune/models" "$root/var/lib/fedtune/data"
cp "$model" "$root/var/lib/fedtune/models/SmolLM2-135M-Instruct.Q4_1.gguf"
chroot "$root" fedtune make-task sentiment -n 40 -o /var/lib/fedtune/data/train.jsonl > /dev/null
sed -i -e 's/^rounds: 5/rounds: 2/' -e 's/^train: .*/train: {local_steps: 2, batch: 2, learning_rate: 5.0e-3}/' \
  -e 's/^deadline_seconds: 600/deadline_seconds: 300/' "$root/etc/fedtune/coordinator.yaml"
sed -i 's/^max_len: 256/max_len: 64/' "$root/etc/fedtune/worker.yaml"

# ---- 4. boot, start the services ----
systemd-nspawn -q -D "$root" --boot --register=no --keep-unit --private-network -M fedtune-pkgtest \
  > "$dir/nspawn.log" 2>&1 &
nspawn_pid=$!
leader=""
for _ in $(seq 300); do
  leader="$(pgrep -P "$nspawn_pid" -x systemd || true)"
  [ -n "$leader" ] && nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded' && break
  sleep 0.2
done
[ -n "$leader" ] || { cat "$dir/nspawn.log"; fail "the container did not boot"; }
in_ct() { nsenter -t "$leader" -a "$@"; }
journal() { in_ct journalctl --no-pager -o cat -u "$1"; }
wait_for() {  # unit pattern seconds
  for _ in $(seq $(( $3 * 5 ))); do
    journal "$1" | grep -q "$2" && return 0
    for u in fedtune-coordinator.service fedtune-worker.service; do
      [ "$(in_ct systemctl show -P NRestarts $u)" = 0 ] || fail "$u failed and was restarted"
    done
    sleep 0.2
  done
  fail "waited $3 s for '$2' in $1"
}
echo "booted: $(in_ct systemctl is-system-running || true)"
if [ -f "$root/usr/lib/fedtune/libfedtune_cuda.so" ]; then
  # fedtune-cuda: the binary finds the installed module (this root has no CUDA runtime, so
  # loading it must fail on libcudart, not on the module's path).
  msg="$(in_ct fedtune train /var/lib/fedtune/models/SmolLM2-135M-Instruct.Q4_1.gguf -d /var/lib/fedtune/data/train.jsonl \
    --steps 1 --eval-examples 0 --device cuda -o /tmp/x 2>&1 || true)"
  echo "$msg" | grep -q "/usr/lib/fedtune/libfedtune_cuda.so: libcudart" || fail "the CUDA module was not looked for where fedtune-cuda installs it: $msg"
  echo "fedtune-cuda: the installed module is found ($(echo "$msg" | grep -o 'cannot load the CUDA module[^;]*' | head -1 | cut -c1-110))"
fi
# What an operator runs before enabling the services: the configurations and the files they
# name, checked as the services' user.
in_ct runuser -u fedtune -- fedtune coordinator --config /etc/fedtune/coordinator.yaml --check
in_ct runuser -u fedtune -- fedtune worker --config /etc/fedtune/worker.yaml --check
in_ct systemctl start fedtune-coordinator.service fedtune-worker.service
wait_for fedtune-coordinator.service 'round 1/2 committed' 240
wait_for fedtune-coordinator.service 'round 2/2: 1 workers selected' 60
in_ct systemctl stop fedtune-coordinator.service   # SIGTERM during round 2
[ "$(in_ct systemctl show -P Result fedtune-coordinator.service)" = success ] || fail "coordinator stop did not end in success"
[ "$(in_ct systemctl show -P ExecMainStatus fedtune-coordinator.service)" = 0 ] || fail "coordinator exit status after SIGTERM"
journal fedtune-coordinator.service | grep -q 'round 2/2 committed' && fail "round 2 committed although stopped"
sleep 2
# The worker does not take a coordinator's SIGTERM for the end of the run: it waits to rejoin.
[ "$(in_ct systemctl is-active fedtune-worker.service || true)" = active ] || fail "the worker ended when the coordinator stopped"
echo "SIGTERM to the coordinator during round 2: clean exit, round 2 not committed, the worker waits to rejoin"
t_stop=$(date +%s)
in_ct systemctl stop fedtune-worker.service   # SIGTERM to the worker while it waits to rejoin
[ "$(in_ct systemctl show -P Result fedtune-worker.service)" = success ] || fail "worker stop did not end in success"
[ "$(in_ct systemctl show -P ExecMainStatus fedtune-worker.service)" = 0 ] || fail "worker exit status after SIGTERM"
echo "SIGTERM to the worker: clean exit in $(( $(date +%s) - t_stop )) s"
in_ct systemctl start fedtune-coordinator.service fedtune-worker.service
for _ in $(seq 1200); do
  [ "$(in_ct systemctl is-active fedtune-coordinator.service || true)" = inactive ] && \
    [ "$(in_ct systemctl is-active fedtune-worker.service || true)" = inactive ] && break
  sleep 0.2
done
journal fedtune-coordinator.service | grep -E 'resuming|committed'
journal fedtune-worker.service | tail -n 3
journal fedtune-coordinator.service | grep -q 'round 2/2 committed' || fail "round 2 was not committed after the restart"
for u in fedtune-coordinator.service fedtune-worker.service; do
  [ "$(in_ct systemctl show -P Result $u)" = success ] || fail "$u result $(in_ct systemctl show -P Result $u)"
done
# A configuration error (exit 78, EX_CONFIG) is not restarted: a template instance whose
# configuration names a missing model fails once and stays failed.
sed 's|^model: .*|model: {path: /var/lib/fedtune/models/missing.gguf}|' "$root/etc/fedtune/worker.yaml" > "$root/etc/fedtune/worker-bad.yaml"
in_ct systemctl start fedtune-worker@bad.service || true
sleep 12   # longer than RestartSec=10s
[ "$(in_ct systemctl show -P ExecMainStatus fedtune-worker@bad.service)" = 78 ] || fail "a bad configuration did not exit with 78"
[ "$(in_ct systemctl show -P NRestarts fedtune-worker@bad.service)" = 0 ] || fail "a bad configuration was restarted"
echo "bad configuration: exit status 78, not restarted ($(journal fedtune-worker@bad.service | grep -o 'error: .*' | head -1))"
python3 - "$root/var/lib/fedtune/coordinator/ledger.sqlite" <<'PY'
import sqlite3, sys
rounds = [r[0] for r in sqlite3.connect(sys.argv[1]).execute("select round from rounds order by round")]
print("ledger rounds:", rounds)
assert rounds == [1, 2], rounds
PY
owner="$(stat -c %U "$root/var/lib/fedtune/coordinator/state-2.safetensors" 2>/dev/null || true)"
[ -n "$owner" ] && [ "$(chroot "$root" id -un "$(stat -c %u "$root/var/lib/fedtune/coordinator/state-2.safetensors")")" = fedtune ] \
  || fail "state-2.safetensors missing or not owned by fedtune"
echo "OK: packaged services ran 2 rounds under systemd in a fresh Debian root ($(( $(date +%s) - t0 )) s)"

#!/usr/bin/env bash
# issue 20: the container image built from Debian packages (scripts/container.sh) holds a working
# fedtune: the root file system has the binary and its libraries, the podman image has the
# entrypoint, user and ports, the OCI archive is a valid OCI layout, and the image's fedtune runs
# (`podman run` where this machine can run containers; otherwise in a chroot of the same root
# file system as user 10001, which the test says).
#   tests/deploy/container_test.sh BUILD_DIR MODEL      (root; exit 77 = skipped with the reason)
set -euo pipefail
build="$(cd "$1" && pwd)"; model="$(realpath "$2")"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
skip() { echo "SKIPPED: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "needs root (mmdebstrap)"
command -v mmdebstrap > /dev/null || skip "mmdebstrap is not installed (scripts/setup.sh installs it)"
out="$(mktemp -d /var/tmp/fedtune-image.XXXXXX)"; trap 'rm -rf "$out"' EXIT
bash "$here/scripts/container.sh" "$build" "$out" | grep -v '^CPack'
tar -tf "$out/rootfs.tar" > "$out/list"
for f in ./usr/bin/fedtune ./etc/fedtune/coordinator.yaml ./usr/share/doc/fedtune/copyright; do
  grep -qx "$f" "$out/list" || { echo "FAILED: $f missing from the root file system"; exit 1; }
done
if grep -q '^./usr/share/man/man1/.' "$out/list"; then echo "FAILED: manual pages were not left out"; exit 1; fi
version="$(sed -n 's/^CMAKE_PROJECT_VERSION:STATIC=//p' "$build/CMakeCache.txt")"
if command -v podman > /dev/null; then
  podman image inspect "fedtune:$version" --format '{{json .Config}}' > "$out/config.json"
  python3 - "$out/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
assert c["Entrypoint"] == ["/usr/bin/fedtune"], c
assert c["User"] == "10001:10001", c
assert set(c["ExposedPorts"]) == {"7443/tcp", "9090/tcp"}, c
assert c["WorkingDir"] == "/var/lib/fedtune", c
print("image config:", {k: c[k] for k in ("Entrypoint", "Cmd", "User", "WorkingDir")})
PY
  tar -xOf "$out/fedtune-$version.oci.tar" oci-layout | grep -q imageLayoutVersion
  tar -xOf "$out/fedtune-$version.oci.tar" index.json | python3 -c "import json,sys; m = json.load(sys.stdin)['manifests']; assert m and m[0]['mediaType'].endswith('manifest.v1+json'), m; print('OCI archive: index with', len(m), 'manifest')"
fi
ran=0
if command -v podman > /dev/null && podman run --rm --network none "fedtune:$version" --version > "$out/run.log" 2>&1; then
  cat "$out/run.log"
  podman run --rm --read-only --network none -v "$(dirname "$model"):/models:ro" "fedtune:$version" \
    info "/models/$(basename "$model")" | grep 'parameters: 134515008'
  echo "ran the image with podman"; ran=1
fi
if ((! ran)); then
  [ -s "$out/run.log" ] && echo "podman cannot run containers here: $(tail -1 "$out/run.log")"
  mkdir "$out/root" && tar -xf "$out/rootfs.tar" -C "$out/root"
  mkdir -p "$out/root/models" && cp "$model" "$out/root/models/m.gguf"
  chroot --userspec=10001:10001 "$out/root" /usr/bin/fedtune --version
  chroot --userspec=10001:10001 "$out/root" /usr/bin/fedtune info /models/m.gguf | grep 'parameters: 134515008'
  echo "ran the image's root file system in a chroot as user 10001 (not as a container)"
fi
echo OK

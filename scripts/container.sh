#!/usr/bin/env bash
# The fedtune container image, built from Debian packages only (no registry, no Dockerfile base):
#   1. the Debian packages (cpack in BUILD_DIR, default build/);
#   2. a Debian bookworm root made by mmdebstrap with fedtune_<v>_<arch>.deb installed (apt
#      resolves its dependencies from Debian); documentation and locales left out;
#   3. imported with podman as fedtune:<version> (entrypoint /usr/bin/fedtune, user 10001,
#      working directory /var/lib/fedtune, ports 7443 and 9090) and saved as an OCI archive that
#      containerd (`ctr -n k8s.io images import`), podman (`podman load`) or skopeo read.
#   scripts/container.sh [BUILD_DIR] [OUT_DIR]      (root; OUT_DIR default BUILD_DIR/image)
# Without podman, the root file system tarball (OUT_DIR/rootfs.tar) is still built.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(cd "${1:-$here/build}" && pwd)"
out="${2:-$build/image}"
[ "$(id -u)" -eq 0 ] || { echo "container.sh: needs root (mmdebstrap)" >&2; exit 1; }
command -v mmdebstrap > /dev/null || { echo "container.sh: apt-get install mmdebstrap" >&2; exit 1; }
version="$(sed -n 's/^CMAKE_PROJECT_VERSION:STATIC=//p' "$build/CMakeCache.txt")"
mkdir -p "$out"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
(cd "$build" && cpack -G DEB -B "$work/debs" > "$work/cpack.log")
deb="$(ls "$work"/debs/fedtune_*.deb)"; cp "$deb" "$work/fedtune.deb"
arch="$(dpkg-deb -f "$deb" Architecture)"
t0=$(date +%s)
mmdebstrap --variant=apt --architectures="$arch" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook="copy-in $work/fedtune.deb /tmp" \
  --customize-hook='chroot "$1" sh -c "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends /tmp/fedtune.deb && rm /tmp/fedtune.deb"' \
  --customize-hook='chroot "$1" sh -c "mkdir -p /var/lib/fedtune /models && chown 10001:10001 /var/lib/fedtune"' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  bookworm "$out/rootfs.tar" "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian-security bookworm-security main" > "$work/mmdebstrap.log" 2>&1 \
  || { tail -30 "$work/mmdebstrap.log"; exit 1; }
echo "[container] root file system: $out/rootfs.tar ($(du -h "$out/rootfs.tar" | cut -f1), $(( $(date +%s) - t0 )) s)"
if ! command -v podman > /dev/null; then
  echo "[container] podman not installed (apt-get install podman): rootfs.tar only"
  exit 0
fi
image="fedtune:$version"
podman rmi -f "$image" > /dev/null 2>&1 || true
podman import --quiet \
  --change 'ENTRYPOINT ["/usr/bin/fedtune"]' --change 'CMD ["--help"]' --change 'USER 10001:10001' \
  --change 'WORKDIR /var/lib/fedtune' --change 'EXPOSE 7443/tcp' --change 'EXPOSE 9090/tcp' \
  --change "LABEL org.opencontainers.image.title=fedtune org.opencontainers.image.version=$version" \
  "$out/rootfs.tar" "$image" > /dev/null
rm -f "$out/fedtune-$version.oci.tar"
podman save --quiet --format oci-archive -o "$out/fedtune-$version.oci.tar" "$image"
echo "[container] image $image; OCI archive $out/fedtune-$version.oci.tar ($(du -h "$out/fedtune-$version.oci.tar" | cut -f1))"

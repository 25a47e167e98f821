#!/usr/bin/env bash
# Build cnnpipe's image with podman, from scratch where no registry is reachable:
#   1. a Debian bookworm base with Python (debootstrap from this host's Debian mirror, `podman import`),
#      unless BASE_IMAGE names another base (e.g. docker.io/library/python:3.11-slim-bookworm);
#   2. the project's Dockerfile on it, pip inside the build seeing what this host's pip sees
#      (its index settings, CA bundle and local package folders, mounted read-only).
# Env: CNNPIPE_IMAGE (default localhost/cnnpipe:<version>), EXTRAS (default all; serve,mlflow for a serving
# image), BASE_IMAGE, DEBIAN_MIRROR, CONTAINERS_CONF.
# Needs podman, runc and debootstrap (Debian: apt-get install podman runc debootstrap) and root.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/cnnpipe/__init__.py")"
IMAGE="${CNNPIPE_IMAGE:-localhost/cnnpipe:$VERSION}"
LOCAL_BASE=localhost/debian-python:bookworm
BASE_IMAGE="${BASE_IMAGE:-$LOCAL_BASE}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/container/containers.conf}"

for tool in podman runc; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install podman runc debootstrap)" >&2; exit 2; }
done

start=$(date +%s)
if [[ "$BASE_IMAGE" == "$LOCAL_BASE" ]] && ! podman image exists "$LOCAL_BASE"; then
  command -v debootstrap >/dev/null || { echo "build.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 2; }
  # the mirror this host's apt uses (deb822 or one-line sources), else Debian's CDN
  mirror="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}"
  mirror="${mirror:-$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}"
  mirror="${mirror:-http://deb.debian.org/debian}"
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  echo "build.sh: debootstrap bookworm from $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  echo "build.sh: base $LOCAL_BASE in $(( $(date +%s) - start )) s"
fi

# pip in the build sees this host's pip settings: a pip.conf with the same index options, this
# host's CA bundle (it may trust a proxy's CA), and local package folders at the same paths
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mounts=(-v "$ctx/pip.conf:/etc/pip.conf:ro" -v "/etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro")
{
  echo "[global]"
  echo "cert = /run/host-ca.crt"
  pip3 config list 2>/dev/null | sed -n "s/^global\.\(index-url\|extra-index-url\|find-links\|trusted-host\)='\(.*\)'$/\1 = \2/p"
} > "$ctx/pip.conf"
for dir in $(grep -oE '(file://)?/[^ ]+' "$ctx/pip.conf" | sed 's|^file://||' | grep -v '^/run/host-ca.crt$'); do
  dir="${dir%/simple}"; dir="${dir%/}"
  [[ -d "$dir" ]] && mounts+=(-v "$dir:$dir:ro")
done

# (pip's "Location ... is ignored" lines: index folders without the package, as on the host)
podman build --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "EXTRAS=${EXTRAS:-all}" "${mounts[@]}" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" 2>&1 \
  | grep -v "^WARNING: Location '.*' is ignored"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "build.sh: built $IMAGE on $BASE_IMAGE in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"

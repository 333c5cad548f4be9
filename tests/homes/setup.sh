#!/usr/bin/env bash
# What `make test-homes` runs on, made when missing (idempotent):
# - Debian's debootstrap, systemd-container (systemd-nspawn), podman and runc;
# - two Debian roots with systemd, for booting under systemd-nspawn: trixie (systemd 257) and
#   bookworm (systemd 252), cached under HOMES;
# - the stand-in for the official Envoy image (standin/Containerfile), in podman's storage.
# Usage: setup.sh HOMES ENVOY_BIN
set -euo pipefail
homes=$1
envoy=$2
here=$(cd "$(dirname "$0")" && pwd)
mirror=http://deb.debian.org/debian

missing=()
for need in debootstrap:debootstrap systemd-nspawn:systemd-container podman:podman runc:runc; do
    command -v "${need%%:*}" >/dev/null || missing+=("${need#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

root() {
    local suite=$1 dir=$homes/$1
    [ -e "$dir/.complete" ] && return 0
    rm -rf "$dir" "$dir.partial"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$suite" "$dir.partial" "$mirror" \
        >"$homes/$suite.debootstrap.log" 2>&1 || { echo "setup: debootstrap $suite failed, see $homes/$suite.debootstrap.log" >&2; return 1; }
    touch "$dir.partial/.complete"
    mv "$dir.partial" "$dir"
}
mkdir -p "$homes"
root trixie & trixie=$!
root bookworm & bookworm=$!
wait $trixie
wait $bookworm

standin=localhost/sesame-standin-envoy:v1.40.0
if ! podman image exists "$standin"; then
    podman image exists localhost/sesame-homes-bookworm:latest \
        || tar -C "$homes/bookworm" --exclude=./.complete -c . | podman import --quiet - localhost/sesame-homes-bookworm:latest >/dev/null
    context=$(mktemp -d)
    trap 'rm -rf "$context"' EXIT
    cp -L "$envoy" "$context/envoy"
    cp "$here/standin/envoy.yaml" "$context/"
    podman build --quiet --runtime runc --format docker -t "$standin" -f "$here/standin/Containerfile" "$context" >/dev/null
fi
echo "setup: roots under $homes, stand-in image $standin"

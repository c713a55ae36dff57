#!/usr/bin/env bash
# Makes the local base image the container tests build on (no registry is reachable):
# a minimal Debian bookworm from debootstrap, imported into podman as NAME (default
# localhost/opb-bookworm:3). Reused when it exists already.
set -euo pipefail
name="${1:-localhost/opb-bookworm:3}"
podman() { command podman --runtime runc --cgroup-manager cgroupfs "$@"; }

# One maker at a time (several test runs may share this machine).
exec 9>/var/lock/opb-base-image.lock
flock 9
if podman image exists "$name"; then
    exit 0
fi
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' "$f" | grep -v security | head -n1)"
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror="$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' /etc/apt/sources.list | grep -v security | head -n1)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d /var/tmp/opb-debootstrap.XXXXXX)"
trap 'rm -rf "$root"' EXIT
# python3 runs the fake op and the fake Connect server; procps gives ps for the
# zombie check.
debootstrap --variant=minbase --include=python3,procps bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -n 30 "$root.log" >&2
    rm -f "$root.log"
    exit 1
}
rm -f "$root.log"
# The application user of the images (OpenClaw's is node, uid 1000).
chroot "$root" groupadd -g 1000 node
chroot "$root" useradd -u 1000 -g 1000 -m -d /home/node -s /bin/sh node
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# An imported image has no PATH; `podman kube play` does not add one.
tar -C "$root" -c . | podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$name" >/dev/null

#!/usr/bin/env bash
# Installs the container engine the container tests drive (podman + runc + debootstrap, and a
# Compose implementation), all from Debian's packages, and configures podman for this sandbox.
# Idempotent: quick when everything is already there. Runs as root.
set -euo pipefail
# One installer at a time (several test runs may share this machine; apt refuses to wait).
exec 9>/var/lock/opb-container-setup.lock
flock 9

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if ! command -v docker-compose >/dev/null 2>&1 && ! command -v podman-compose >/dev/null 2>&1; then
    need+=(docker-compose)
fi
if [ "${#need[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" \
        uidmap slirp4netns netavark aardvark-dns containernetworking-plugins fuse-overlayfs conmon catatonit >/dev/null
fi

# This sandbox refuses raising NOFILE/NPROC, which podman's default ulimits ask for.
conf=/etc/containers/containers.conf
mkdir -p /etc/containers
if ! grep -Eq '^[[:space:]]*default_ulimits[[:space:]]*=[[:space:]]*\[\]' "$conf" 2>/dev/null; then
    if [ -f "$conf" ] && grep -q '^\[containers\]' "$conf"; then
        sed -i '/^\[containers\]/a default_ulimits = []' "$conf"
    else
        printf '[containers]\ndefault_ulimits = []\n' >>"$conf"
    fi
fi

#!/usr/bin/env bash
# Install everything blockyard needs on Debian 12 (as root): system packages, a virtualenv in
# .venv and the package with its development tools. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real components the tests and the demo drive: libiscsi's tools (iscsi-test-cu, iscsi-ls, ...),
# qemu-img/qemu-io with iscsi://, tgtd as the performance peer, FUSE, filesystems and loop devices,
# etcd for the HA master's store (the tests start their own; the system service is not used).
APT_PACKAGES=(
  python3 python3-venv python3-dev gcc
  libiscsi-bin qemu-utils qemu-block-extra tgt
  fuse3 e2fsprogs xfsprogs util-linux iproute2 procps fio
  etcd-server
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'

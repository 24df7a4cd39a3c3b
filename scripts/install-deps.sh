#!/usr/bin/env bash
# Installs every system and Python package roam needs. Idempotent; fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils        # hypervisor and image tools
  libfuse3-dev fuse3 pkg-config     # pyfuse3 build and runtime
  nbdkit libnbd-bin fio             # NBD interop peers used by tests and benchmarks
  mmdebstrap busybox-static e2fsprogs zstd  # guest blueprint build
  iproute2 redis-tools              # network namespaces, demo client tools
  nftables                          # VM NAT and port forwards (roam.network)
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing apt packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || { echo "error: apt package $pkg did not install" >&2; exit 1; }
done

# Python packages go into the project's own virtualenv so the host's packages never
# conflict with our pins.
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$VENV/.installed"
fi
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -c 'import roam, pyfuse3, xxhash, blake3, zstandard, lz4, uvloop, typer, qemu.qmp'

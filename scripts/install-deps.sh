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
  etcd-server etcd-client           # the replicated control-plane store and its tests
  chromium                          # the dashboard's browser tests (Playwright drives it)
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
# conflict with ours: exactly the versions of requirements.lock, checked against its
# hashes, then roam itself (editable, without resolving anything again). The stamp holds
# the hash of the lock and pyproject.toml, so any change to either installs again, and a
# package the lock no longer names is removed.
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$stamp" ]; then
  echo "installing Python packages from requirements.lock"
  "${PIP[@]}" install -q --require-hashes -r requirements.lock
  "${PIP[@]}" install -q --no-deps -e .
  normalise() { sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' | tr 'A-Z_.' 'a-z--' | sort -u; }
  stale=$(comm -13 <(normalise < requirements.lock) \
                   <("${PIP[@]}" freeze --exclude-editable | normalise))
  if [ -n "$stale" ]; then
    echo "removing Python packages no longer locked: $stale"
    # shellcheck disable=SC2086  # one package name per word
    "${PIP[@]}" uninstall -q -y $stale
  fi
  echo "$stamp" > "$VENV/.installed"
fi
"${PIP[@]}" check
"$VENV/bin/python" -c 'import roam, pyfuse3, xxhash, blake3, zstandard, lz4, uvloop, typer, qemu.qmp
import fastapi, uvicorn, httpx, httpx_sse, numpy, prometheus_client, obstore, cryptography'

#!/usr/bin/env bash
# Regenerates requirements.lock from pyproject.toml: the newest versions inside its ranges,
# every package (transitive too) pinned with the hashes of its files. Run after changing a
# range, or to take up new releases; then `make deps` installs the new lock.
#
# pip-compile runs from a throwaway virtualenv, so the lock never depends on what the
# project's .venv holds. Index settings come from this machine's pip configuration and are
# kept out of the lock, which therefore installs from whatever index the installing
# machine is configured for. Packages already in the lock keep their versions unless
# their range excludes them; pass --upgrade (or --upgrade-package NAME) to move them.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP_TOOLS_VERSION=7.6.2
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool"
"$tool/bin/python" -m pip install -q --disable-pip-version-check "pip-tools==$PIP_TOOLS_VERSION"
CUSTOM_COMPILE_COMMAND="make lock" "$tool/bin/pip-compile" --quiet \
  --extra dev --strip-extras --generate-hashes --allow-unsafe \
  --no-emit-index-url --no-emit-trusted-host --no-emit-find-links \
  --output-file requirements.lock "$@" pyproject.toml
echo "requirements.lock: $(grep -c '^[a-z0-9]' requirements.lock) packages pinned"

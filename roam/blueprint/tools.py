"""Running the external tools the build needs, with errors that say what to install."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from roam.blueprint.spec import BlueprintError

log = logging.getLogger("roam.blueprint")

# Tool -> Debian package that provides it (all in scripts/install-deps.sh).
PACKAGE_OF = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "cp": "coreutils",
}


def which(tool: str) -> str:
    """Absolute path of tool; sbin directories count even when PATH lacks them."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    found = shutil.which(tool, path=path)
    if found is None:
        package = PACKAGE_OF.get(tool, tool)
        raise BlueprintError(f"{tool} not found: install the Debian package {package} "
                             "(scripts/install-deps.sh installs everything roam needs)")
    return found


def run(argv: list[str], cwd: Path | None = None) -> str:
    """Run a tool to completion; its stdout, or BlueprintError with the end of its output."""
    argv = [which(argv[0]), *argv[1:]]
    log.debug("running %s", " ".join(argv))
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise BlueprintError(f"{Path(argv[0]).name} failed (exit {done.returncode}):\n{tail}")
    return done.stdout

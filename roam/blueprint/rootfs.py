"""The root disk: a minbase Debian with the workload and our agent, as an ext4 image."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import roam.guest.agent
import roam.guest.init
from roam.blueprint.spec import BlueprintError
from roam.blueprint.tools import run

log = logging.getLogger("roam.blueprint")

# python3, not python3-minimal: the agent needs json, which python3-minimal lacks.
DEFAULT_PACKAGES = ("python3", "redis-server", "iproute2")
# Documentation is dead weight in every snapshot and package of this disk.
EXCLUDED_PATHS = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*",
                  "/usr/share/locale/*", "/usr/share/lintian/*")
SOURCES_FILES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
AGENT_PATH = "usr/lib/roam/agent.py"
INIT_PATH = "sbin/roam-init"
# Redis listens on every address (the guest is reached through roam's NAT / forwards) and
# stays in the foreground under roam-init.
INIT_CONFIG: dict[str, Any] = {
    "hostname": "roam",
    "services": [
        {"name": "redis", "user": "redis",
         "argv": ["redis-server", "/etc/redis/redis.conf", "--daemonize", "no",
                  "--supervised", "no", "--pidfile", "", "--bind", "0.0.0.0",
                  "--protected-mode", "no"]},
        {"name": "agent", "argv": ["/usr/bin/python3", f"/{AGENT_PATH}"]},
    ],
}
AGENT_CONFIG: dict[str, Any] = {
    "ready_command": ["redis-cli", "ping"],
    "ready_expect": "PONG",
    "before_suspend": [["sync"]],
    "after_resume": [],
}


def guest_sources() -> dict[str, str]:
    """Files copied into the guest, by guest path: part of the blueprint's inputs."""
    return {
        AGENT_PATH: Path(roam.guest.agent.__file__).read_text(),
        INIT_PATH: Path(roam.guest.init.__file__).read_text(),
        "etc/roam/init.json": json.dumps(INIT_CONFIG, indent=2) + "\n",
        "etc/roam/agent.json": json.dumps(AGENT_CONFIG, indent=2) + "\n",
        "etc/hostname": f"{INIT_CONFIG['hostname']}\n",
        "etc/hosts": f"127.0.0.1 localhost {INIT_CONFIG['hostname']}\n",
    }


def host_sources_file() -> Path:
    """The host's apt sources, handed to mmdebstrap as its mirror: no address in our code."""
    for candidate in SOURCES_FILES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise BlueprintError(f"no apt sources file found (looked for {', '.join(SOURCES_FILES)})")


def host_suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.partition("=")[2].strip('"')
    raise BlueprintError("/etc/os-release has no VERSION_CODENAME: cannot pick a suite")


def bootstrap(tree: Path, suite: str, packages: list[str]) -> None:
    """mmdebstrap --variant=minbase into tree (root mode: device nodes and owners kept)."""
    if os.geteuid() != 0:
        raise BlueprintError("building the root disk needs root (mmdebstrap --mode=root); "
                             "run as root or pass your own disk with --rootfs")
    log.info("bootstrapping Debian %s with %s (mmdebstrap, about 20 s)", suite,
             ", ".join(packages))
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
            f"--include={','.join(packages)}"]
    argv += [f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDED_PATHS]
    run([*argv, suite, str(tree), str(host_sources_file())])


def install_guest_files(tree: Path) -> None:
    for guest_path, text in guest_sources().items():
        target = tree / guest_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755 if guest_path in (AGENT_PATH, INIT_PATH) else 0o644)


def tree_bytes(tree: Path) -> int:
    return sum(p.lstat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())


def make_image(tree: Path, image: Path, size_mib: int) -> None:
    """ext4 straight from the directory (mkfs.ext4 -d): no loop device, no mount."""
    needed_mib = tree_bytes(tree) * 3 // 2 // (1 << 20) + 64
    if size_mib < needed_mib:
        raise BlueprintError(f"disk size {size_mib} MiB is too small: the files need "
                             f"about {needed_mib} MiB")
    log.info("making a %d MiB ext4 image", size_mib)
    # Initialise inode tables and journal now, or the guest kernel does it after every
    # boot: writes that dirty the disk and slow a TCG guest.
    run(["mkfs.ext4", "-q", "-F", "-L", "roam-root", "-d", str(tree),
         "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image), f"{size_mib}M"])


def build_rootfs(workdir: Path, image: Path, suite: str, packages: list[str],
                 size_mib: int) -> None:
    tree = workdir / "rootfs"
    bootstrap(tree, suite, packages)
    install_guest_files(tree)
    make_image(tree, image, size_mib)
    shutil.rmtree(tree)

"""`roam doctor`: one line per check, --json for scripts, exit 1 when a check fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROAM = [sys.executable, "-m", "roam.cli.main"]
CHECKS = ["arch", "root", "fuse", "kvm", "qemu", "nftables", "tun", "vxlan", "memory", "disk"]


def _doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ROAM, "doctor", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_json_names_every_check_and_the_exit_status_follows_it() -> None:
    done = _doctor("--json")
    report = json.loads(done.stdout)
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["status"] in ("ok", "warn", "fail") and c["detail"] for c in report["checks"])
    assert all(c["fix"] for c in report["checks"] if c["status"] != "ok")
    failed = any(c["status"] == "fail" for c in report["checks"])
    assert report["ok"] is not failed
    assert done.returncode == (1 if failed else 0), done.stderr


def test_a_missing_tool_fails_with_what_to_do(tmp_path: Path) -> None:
    """Without QEMU and nft on the PATH, those checks fail and say what to install."""
    env = {**os.environ, "PATH": str(tmp_path)}
    done = _doctor(env=env)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == len(CHECKS)
    qemu = next(line for line in lines if line.split()[1] == "qemu")
    assert qemu.startswith("fail") and "apt-get install qemu-system-x86" in qemu
    report = json.loads(_doctor("--json", env=env).stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["qemu"] == statuses["nftables"] == "fail" and report["ok"] is False

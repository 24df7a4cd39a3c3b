"""One snapshot per session, copied for each test that changes it; `roam run` helpers.

Every VM command runs as a `roam` subprocess: pyfuse3 serves one mount per process, and
a crash in a VM's daemon must not take the test session down.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roam.blueprint import Blueprint
from roam.vm import control
from tests.blueprint.boot import short_dir

ROAM = [sys.executable, "-m", "roam.cli.main"]
RUN_TIMEOUT = 120.0


def roam(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*ROAM, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"roam {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done


@pytest.fixture(scope="session", autouse=True)
def run_dir() -> Iterator[Path]:
    """Control sockets in a short directory of this session (ROAM_RUN_DIR)."""
    with short_dir() as path:
        os.environ["ROAM_RUN_DIR"] = str(path)
        yield path
        os.environ.pop("ROAM_RUN_DIR", None)


@pytest.fixture(scope="session")
def snapshot(blueprint: Blueprint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256 MiB snapshot of the blueprint with redis up; never run: copy it first."""
    out = tmp_path_factory.mktemp("snapshot") / "pkg"
    started = time.monotonic()
    done = roam("snapshot", "--blueprint", str(blueprint.directory), "--out", str(out),
                "--memory", "256M", "--json")
    times = json.loads(done.stdout)
    print(f"\npackage {out}: ready in {times['boot_to_ready_seconds']:.1f} s, "
          f"{times['state_bytes']} bytes of state ({time.monotonic() - started:.1f} s)")
    return out


@pytest.fixture
def package(snapshot: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "pkg"
    subprocess.run(["cp", "-a", "--sparse=always", str(snapshot), str(copy)], check=True)
    return copy


class RunningVM:
    """`roam run PKG --name NAME` in the background, until stop() or kill."""

    def __init__(self, package: Path, name: str, *extra: str) -> None:
        self.name = name
        self.process = subprocess.Popen([*ROAM, "run", str(package), "--name", name, *extra],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.info = self._wait_running()

    def _wait_running(self) -> dict[str, Any]:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"roam run exited ({self.process.returncode}):\n"
                            + self.process.communicate()[1])
            try:
                return asyncio.run(control.call(self.name, "info", timeout=2))
            except control.ControlError:
                time.sleep(0.1)
        self.process.kill()
        pytest.fail(f"{self.name} not running after {RUN_TIMEOUT} s")

    def sh(self, command: str) -> str:
        """Run a shell command in the guest; its stdout (fails the test on non-zero exit)."""
        result = asyncio.run(control.call(self.name, "exec",
                                          {"argv": ["sh", "-c", command], "timeout": 30}))
        assert result["exit_code"] == 0, result
        return str(result["stdout"])

    def stop(self) -> str:
        """SIGTERM: suspend and write back; returns roam run's stderr."""
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=RUN_TIMEOUT)
        assert self.process.returncode == 0, stderr
        return stderr

"""Long-running commands that wait for a migration end cleanly on SIGINT or SIGTERM:
at once, with their listening socket removed and nothing left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROAM = [sys.executable, "-m", "roam.cli.main"]


def _started(args: list[str], sock: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([*ROAM, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "never listened"
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_mount_listen_ends_on_a_signal_before_a_migration(sig: signal.Signals,
                                                          tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    (tmp_path / "fuse").mkdir()
    process = _started(["mount", "memory", "--listen", f"unix://{sock}", "--file",
                        str(tmp_path / "fuse")], sock)
    process.send_signal(sig)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "stopped before a migration arrived" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fuse"]  # socket gone


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_terminate_ends_on_a_signal_before_a_migration(sig: signal.Signals,
                                                       tmp_path: Path) -> None:
    sock = tmp_path / "t.sock"
    process = _started(["terminate", "--listen", f"unix://{sock}", "--out",
                        str(tmp_path / "backup")], sock)
    process.send_signal(sig)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 1
    assert err.splitlines() == [
        f"error: stopped by a signal before a backup was written ({tmp_path / 'backup'})"]
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_device_serve_ends_on_a_signal_before_a_receiver(sig: signal.Signals,
                                                         tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    (tmp_path / "disk.img").write_bytes(bytes(65536))
    process = _started(["device", "serve", "--listen", f"unix://{sock}",
                        f"disk={tmp_path / 'disk.img'}"], sock)
    process.send_signal(sig)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 1
    assert err.splitlines()[-1] == (
        f"error: stopped by a signal before the devices were sent (unix://{sock})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]

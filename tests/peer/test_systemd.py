"""`roam peer serve` under systemd: the unit `roam peer unit` writes passes
`systemd-analyze verify`, and the peer speaks sd_notify's readiness protocol to the
NOTIFY_SOCKET it is given (no systemd runs here: the test is the service manager)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from roam.peer import systemd
from roam.peer.client import PEER_SOCKET
from tests.blueprint.boot import short_dir
from tests.peer.conftest import Peer
from tests.vm.conftest import ROAM


def _messages(sock: socket.socket) -> dict[str, str]:
    """One notification, as its KEY=VALUE lines."""
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_peer_notifies_ready_then_stopping(monkeypatch: pytest.MonkeyPatch) -> None:
    with short_dir() as root, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(root / "notify"))
        manager.settimeout(30)
        monkeypatch.setenv(systemd.NOTIFY_SOCKET, str(root / "notify"))
        peer = Peer("n", root)  # inherits NOTIFY_SOCKET
        try:
            ready = _messages(manager)
            assert ready["READY"] == "1" and ready["STATUS"].startswith("serving ")
            assert (peer.dir / PEER_SOCKET).exists()  # ready means serving
            peer.process.send_signal(signal.SIGTERM)
            assert _messages(manager) == {"STOPPING": "1"}
            assert peer.process.wait(timeout=30) == 0
        finally:
            peer.close()


def test_notify_abstract_socket_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"roam-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        manager.settimeout(5)
        monkeypatch.setenv(systemd.NOTIFY_SOCKET, "@" + name)
        assert systemd.notify("READY=1")
        assert manager.recv(64) == b"READY=1"
    monkeypatch.delenv(systemd.NOTIFY_SOCKET)
    assert not systemd.notify("READY=1")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies(tmp_path: Path) -> None:
    made = subprocess.run([*ROAM, "peer", "unit", "--state-dir", "/var/lib/roam/a", "--",
                           "--underlay", "10.0.0.5"], capture_output=True, text=True,
                          check=True)
    unit = tmp_path / "roam-peer.service"
    unit.write_text(made.stdout)
    lines = made.stdout.splitlines()
    assert "Type=notify" in lines and "KillMode=mixed" in lines
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start.endswith(" peer serve --listen tcp://127.0.0.1:7200 --state-dir "
                               "/var/lib/roam/a --underlay 10.0.0.5")
    assert os.access(exec_start.removeprefix("ExecStart=").split()[0], os.X_OK)
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)],
                              capture_output=True, text=True)
    # verify exits 0 even for settings it ignores: they only show on its stderr.
    assert (verified.returncode, verified.stderr, verified.stdout) == (0, "", "")

"""A peer's state directory: one peer at a time, no stale sockets, and a peer killed with
SIGKILL (its workers and their QEMUs with it) starts again on it without hand cleanup."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roam.exposure.fuse.mount import mounted
from roam.network import ns
from roam.peer import statedir
from roam.peer.client import PEER_SOCKET
from roam.peer.network import NetConfig
from tests.blueprint.boot import short_dir
from tests.peer.conftest import Peer
from tests.vm.conftest import ROAM


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (a QEMU is in a session of its own, still a child)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def test_second_peer_refused_and_sockets_removed() -> None:
    with short_dir() as root:
        first = Peer("a", root)
        try:
            second = subprocess.run(
                [*ROAM, "peer", "serve", "--listen", f"unix://{root}/b.mig", "--state-dir",
                 str(first.dir)], capture_output=True, text=True, timeout=60)
            assert second.returncode == 1, second.stderr
            assert second.stderr.splitlines() == [
                f"error: another roam peer serves this state directory ({first.dir})"]
            assert first.api(lambda c: c.peer()).vms == 0  # the first serves on
            assert not (root / "b.mig").exists()
        finally:
            first.close()
        assert first.process.returncode == 0
        assert not (first.dir / PEER_SOCKET).exists()
        assert not (root / "a.mig").exists()


@pytest.mark.slow
def test_restart_after_sigkill(snapshot: Path) -> None:
    with short_dir() as root:
        peer = Peer("k", root)
        try:
            peer.run(snapshot, "web")
            netns = f"{NetConfig.default_prefix(peer.dir)}-web"
            mounts = [p / "fuse" for p in (peer.dir / "vms").iterdir()]
            assert ns.exists(netns) and any(mounted(m) for m in mounts)
            # The host's process group dies at once: peer, worker and QEMU by SIGKILL.
            victims = [peer.process.pid, *_descendants(peer.process.pid)]
            assert len(victims) >= 3, victims
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            peer.process.wait(timeout=10)
        finally:
            peer.close()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in victims[1:]):
            assert time.monotonic() < deadline, "a killed process is still there"
            time.sleep(0.05)
        # What they left: a FUSE mount whose daemon is dead, the VM's network, sockets.
        assert any(mounted(m) for m in mounts) and ns.exists(netns)
        assert (peer.dir / PEER_SOCKET).exists()

        again = Peer("k", root)
        try:
            assert not any(mounted(m) for m in mounts)
            assert not ns.exists(netns)
            assert again.vms() == {}
            again.run(snapshot, "web")
            assert again.sh("web", "echo alive") == "alive\n"
        finally:
            again.close()
        log = (root / "k.log").read_text()
        assert "unmounting" in log and "removing the network" in log, log


def test_clean_kills_what_runs_from_a_dead_peers_vms(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A QEMU (or worker) that outlived its peer has lost its supervisor: killed, so that
    the VM runs in one place only, the one the new peer starts."""
    vms = tmp_path / "vms"
    (vms / "1").mkdir(parents=True)
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                                 f"mem-path={vms}/1/fuse/memory"])
    # Another state directory whose path ends like ours: not ours.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                                  f"--workdir=/elsewhere{vms}/1"])
    for process, arg in ((survivor, b"mem-path"), (bystander, b"--workdir")):
        while arg not in Path(f"/proc/{process.pid}/cmdline").read_bytes():  # exec'd?
            time.sleep(0.01)
    try:
        asyncio.run(statedir.clean(vms))
        assert survivor.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        survivor.kill()
        bystander.kill()
        bystander.wait()
    assert not vms.exists()
    assert f"(pid {survivor.pid})" in caplog.text

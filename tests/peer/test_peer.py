"""Live migration of running VMs between peers (issue 5's acceptance tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from roam.network import ns
from roam.peer.network import NetConfig
from roam.vm import control
from tests.exposure.helpers import mounted
from tests.peer.conftest import Peer, serve_in_background
from tests.vm.conftest import ROAM, roam

pytestmark = pytest.mark.slow

BUSY = (Path(__file__).parent / "busy_guest.py").read_text()


def start_busy(p: Peer, name: str) -> None:
    result = p.exec(name, ["sh", "-c", 'nohup python3 -c "$0" > /tmp/busy.log 2>&1 &',
                           BUSY], timeout=30)
    assert result.exit_code == 0, result
    wait_passes(p, name, 1)


def wait_passes(p: Peer, name: str, after: int) -> int:
    """Wait until the in-guest verifier completed a pass numbered above `after`."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = p.sh(name, "cat /tmp/busy.log").split()
        assert "FAIL" not in lines, lines
        if len(lines) >= 3 and lines[-3] == "ok" and int(lines[-2]) > after:
            return int(lines[-2])
        time.sleep(0.5)
    pytest.fail("the in-guest verifier made no progress")


def _gone(peer: Peer, name: str) -> None:
    """The source's worker answers for a moment after `roam migrate` returned (it is
    shutting down): wait for it to leave."""
    deadline = time.monotonic() + 30
    while (vm := peer.vms().get(name)) is not None:
        assert vm["state"] == "migrated" and time.monotonic() < deadline
        time.sleep(0.1)


def test_idle_chain_a_b_c_a(peers: dict[str, Peer], snapshot: Path) -> None:
    a, b, c = peers["a"], peers["b"], peers["c"]
    a.run(snapshot, "chain")
    a.sh("chain", "redis-cli set hop a >/dev/null")
    for src, dst in ((a, b), (b, c), (c, a)):
        result = json.loads(src.migrate("chain", dst).stdout)
        assert result["outcome"] == "completed"
        _gone(src, "chain")
        moved = dst.vms()["chain"]
        assert moved["state"] == "running" and moved["downtime_ms"] > 0
        # The guest's first answer came after its resume, and the source heard of it.
        assert result["first_response_ms"] == moved["first_response_ms"]
        assert moved["first_response_ms"] >= moved["downtime_ms"]
        assert dst.sh("chain", "redis-cli get hop").strip() == src.name
        dst.sh("chain", f"redis-cli set hop {dst.name} >/dev/null")
    a.stop("chain")


def test_busy_guest_postcopy_verifier(peers: dict[str, Peer], snapshot: Path) -> None:
    a, b = peers["a"], peers["b"]
    a.run(snapshot, "busy")
    start_busy(a, "busy")
    seq_before = int(a.sh("busy", "cat /tmp/busy.log").split()[-1])
    result = json.loads(a.migrate("busy", b, "--max-cycles", "4", "--pause-send-kib", "0"
                                  ).stdout)
    assert result["outcome"] == "completed" and result["final_dirty"] > 0
    passes = wait_passes(b, "busy", 0)
    # The verifier kept its history across the hop: a later pass on B checked every page
    # against what it had seen on A, and the writer went on from its sequence.
    wait_passes(b, "busy", passes)
    assert int(b.sh("busy", "cat /tmp/busy.log").split()[-1]) > seq_before
    b.stop("busy")


def test_no_postcopy_memory_equal_at_suspend(peers: dict[str, Peer], snapshot: Path) -> None:
    a, b = peers["a"], peers["b"]
    a.run(snapshot, "exact")
    start_busy(a, "exact")
    result = json.loads(a.migrate("exact", b, "--no-postcopy", "--check-memory",
                                  "--max-cycles", "3").stdout)
    assert result["outcome"] == "completed"
    moved = b.vms()["exact"]
    assert moved["memory_checked"] is True and moved["state"] == "running"
    wait_passes(b, "exact", 0)
    b.stop("exact")


def test_destination_killed_before_authority(peers: dict[str, Peer], snapshot: Path) -> None:
    a, b = peers["a"], peers["b"]
    a.run(snapshot, "survivor")
    a.sh("survivor", "redis-cli set alive yes >/dev/null")
    # Pre-copy that cannot converge for a while: the destination dies in the middle.
    migration = a.migrate_background("survivor", b, "--max-dirty-blocks", "0",
                                     "--max-cycles", "1000", "--cycle-throttle", "0.2")
    deadline = time.monotonic() + 60
    while "survivor" not in b.vms():
        assert time.monotonic() < deadline, "the destination never received the VM"
        time.sleep(0.1)
    os.kill(b.vms()["survivor"]["pid"], signal.SIGKILL)
    _, stderr = migration.communicate(timeout=60)
    assert migration.returncode == 1, stderr
    assert a.vms()["survivor"]["state"] == "running"
    assert a.sh("survivor", "redis-cli get alive").strip() == "yes"
    assert "survivor" not in b.vms()
    a.stop("survivor")
    # The killed worker's network on B goes once B's peer has reaped it.
    leftover = ns.path(f"{NetConfig.default_prefix(b.dir)}-survivor")
    deadline = time.monotonic() + 30
    mounts = [b.dir / "vms" / d.name / "fuse" for d in (b.dir / "vms").iterdir()]
    while leftover.exists() or any(mounted(m) for m in mounts):
        assert time.monotonic() < deadline, f"{leftover} or a FUSE mount was left behind"
        time.sleep(0.1)


def test_terminate_live_backup_then_run(peers: dict[str, Peer], snapshot: Path,
                                        tmp_path: Path) -> None:
    a, b = peers["a"], peers["b"]
    a.run(snapshot, "backed")
    a.sh("backed", "redis-cli set saved before >/dev/null")
    out = tmp_path / "backup"
    listen = f"unix://{a.dir.parent}/term.sock"
    terminator = subprocess.Popen([*ROAM, "terminate", "--listen", listen, "--out", str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not Path(listen.removeprefix("unix://")).exists():
        assert terminator.poll() is None and time.monotonic() < deadline, terminator.stderr
        time.sleep(0.05)
    result = json.loads(roam("migrate", "backed", "--to", listen, "--via", str(a.dir), "--json",
                             "--no-postcopy").stdout)
    assert result["outcome"] == "declined"
    stdout, stderr = terminator.communicate(timeout=60)
    assert terminator.returncode == 0, stderr
    assert stdout.startswith(f"live backup of backed in {out}: "), stdout  # --json: below
    # The source runs on; the backup is a package of the VM at the pause.
    a.sh("backed", "redis-cli set saved after >/dev/null")
    assert a.vms()["backed"]["state"] == "running"
    _listed_with_dirty_rate(a, "backed")
    follower = _logs_followed(a, "backed")
    b.run(out, "restored")
    assert b.sh("restored", "redis-cli get saved").strip() == "before"
    a.stop("backed")
    b.stop("restored")
    # `roam logs -f` ends when the VM leaves its peer, with everything it was written.
    stdout, stderr = follower.communicate(timeout=30)
    assert follower.returncode == 0, stderr
    assert "roam-log-marker" in stdout


def _listed_with_dirty_rate(peer: Peer, name: str) -> None:
    """`roam peer ls`: uptime, memory, CPUs and (after a migration out measured it) the
    dirty rate, in the table and in --json."""
    listed = json.loads(roam("peer", "ls", "--via", str(peer.dir), "--json").stdout)
    vm = next(v for v in listed["vms"] if v["name"] == name)
    assert vm["dirty_rate"] >= 0 and vm["uptime_s"] > 0, vm
    assert (vm["memory_mib"], vm["cpus"]) == (256, 1), vm
    table = subprocess.run([*ROAM, "peer", "ls", "--via", str(peer.dir)], check=True,
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    header = [cell.strip() for cell in table.stdout.splitlines()[1].split("┃") if cell.strip()]
    assert header[:6] == ["NAME", "STATE", "UP", "MEMORY", "CPUS", "DIRTY"], table.stdout
    row = next(line for line in table.stdout.splitlines() if f" {name} " in line)
    assert "256 MiB" in row and "MiB/s" in row and " running " in row, table.stdout
    assert "DIRTY" not in roam("peer", "ls", "--via", str(peer.dir), "--json").stdout


def _logs_followed(peer: Peer, name: str) -> subprocess.Popen[str]:
    """`roam logs` of the console and the worker through the peer's API; and a
    `roam logs -f`, left running."""
    peer.sh(name, "echo roam-log-marker > /dev/ttyS0")
    deadline = time.monotonic() + 30
    while "roam-log-marker" not in roam("logs", name, "--via", str(peer.dir)).stdout:
        assert time.monotonic() < deadline, "the console line never reached the log"
        time.sleep(0.2)
    worker = roam("logs", name, "--via", str(peer.dir), "--log", "worker").stdout
    # The workers log in the CLI's one format (roam.logs).
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) roam[.\w]*: ",
                     worker, re.MULTILINE), worker
    return subprocess.Popen([*ROAM, "logs", name, "-f", "--via", str(peer.dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_registry_lazy_start_then_migrate(peers: dict[str, Peer], snapshot: Path) -> None:
    a, b = peers["a"], peers["b"]
    socket = a.dir.parent / "registry.sock"
    registry = serve_in_background("registry", "serve", str(snapshot), "--listen",
                                   f"unix://{socket}", socket=socket)
    try:
        info = a.run_from(f"unix://{socket}", "lazy")
        assert info.state == "running"
        assert a.sh("lazy", "redis-cli ping").strip() == "PONG"
        # The rest of the package streams in behind the running VM; then it can move on.
        result = json.loads(a.migrate("lazy", b).stdout)
        assert result["outcome"] == "completed"
        assert b.sh("lazy", "redis-cli ping").strip() == "PONG"
        b.stop("lazy")
    finally:
        registry.send_signal(signal.SIGTERM)
        registry.communicate(timeout=30)


def test_mount_registry_device_as_nbd(peers: dict[str, Peer], snapshot: Path,
                                      tmp_path: Path) -> None:
    socket = peers["a"].dir.parent / "registry2.sock"
    nbd = peers["a"].dir.parent / "disk.nbd"
    registry = serve_in_background("registry", "serve", str(snapshot), "--listen",
                                   f"unix://{socket}", socket=socket)
    mounter = serve_in_background("mount", "disk", "--from", f"unix://{socket}", "--nbd",
                                  str(nbd), "--cache", str(tmp_path / "cache"), socket=nbd)
    try:
        copy = tmp_path / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw",
                        f"nbd+unix:///disk?socket={nbd}", str(copy)], check=True)
        with copy.open("rb") as got, (snapshot / "disk.img").open("rb") as want:
            while block := want.read(1 << 20):
                assert got.read(1 << 20) == block
    finally:
        for process in (mounter, registry):
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)


def test_roam_run_from_registry(peers: dict[str, Peer], snapshot: Path) -> None:
    socket = peers["a"].dir.parent / "registry3.sock"
    registry = serve_in_background("registry", "serve", str(snapshot), "--listen",
                                   f"unix://{socket}", socket=socket)
    vm = subprocess.Popen([*ROAM, "run", "--from", f"unix://{socket}", "--name", "fromreg"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert vm.poll() is None and time.monotonic() < deadline, vm.communicate()
            with contextlib.suppress(control.ControlError):
                if asyncio.run(control.call("fromreg", "info", timeout=2))["ready"]:
                    break
            time.sleep(0.2)
        assert roam("exec", "fromreg", "--", "redis-cli", "ping").stdout.strip() == "PONG"
        assert "fromreg" in roam("ls").stdout
        vm.send_signal(signal.SIGTERM)
        _, stderr = vm.communicate(timeout=60)
        assert vm.returncode == 0, stderr
    finally:
        if vm.poll() is None:
            vm.kill()
        registry.send_signal(signal.SIGTERM)
        registry.communicate(timeout=30)

"""The peer API with VMs: the event stream during a real migration, and the exit codes of
`roam migrate` when the destination declines or the handover is left in doubt (a
terminator declining on purpose exits 0: test_peer.test_terminate_live_backup_then_run)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from roam.cli.exits import Exit
from roam.peer.client import PeerClient
from roam.peer.models import (
    Event,
    MigrateRequest,
    MigrateResult,
    OutcomeEvent,
    ProgressEvent,
    SnapshotEvent,
    VMEvent,
    VMInfo,
)
from tests.peer.conftest import Peer

pytestmark = pytest.mark.slow


async def _collect(stream: AsyncIterator[Event], into: list[Event],
                   until: Callable[[Event], bool]) -> None:
    async for event in stream:
        into.append(event)
        if until(event):
            return


def _states(events: list[Event], name: str) -> list[str]:
    """The VM's states in the order the events gave them, repeats folded."""
    states: list[str] = []
    for e in events:
        if isinstance(e, VMEvent) and e.vm.name == name and e.vm.state not in states[-1:]:
            states.append(e.vm.state)
    return states


def test_events_during_a_migration(peers: dict[str, Peer], snapshot: Path) -> None:
    a, b = peers["a"], peers["b"]
    a.run(snapshot, "watched")

    async def watch() -> tuple[MigrateResult, list[Event], list[Event]]:
        async with PeerClient(a.dir) as src, PeerClient(b.dir) as dst, \
                src.events() as src_events, dst.events() as dst_events:
            sent: list[Event] = []
            received: list[Event] = []
            watching = asyncio.gather(
                _collect(src_events, sent, lambda e: isinstance(e, OutcomeEvent)),
                _collect(dst_events, received, lambda e: isinstance(e, VMEvent)
                         and e.vm.state == "running" and e.vm.ready))
            result = await src.migrate("watched", MigrateRequest(to=b.address))
            await asyncio.wait_for(watching, 60)
            return result, sent, received

    result, sent, received = asyncio.run(watch())
    assert isinstance(sent[0], SnapshotEvent)
    assert [vm.state for vm in sent[0].vms if vm.name == "watched"] == ["running"]
    assert _states(sent, "watched") == ["migrating", "paused", "migrated"]
    progress = [e for e in sent if isinstance(e, ProgressEvent)]
    phases = [p.phase for p in progress]
    assert phases[0] == "copy" and "cycle" in phases and phases[-1] == "handover"
    assert all(p.vm == "watched" and 0 <= p.bytes_sent <= p.bytes_expected for p in progress)
    outcome = sent[-1]
    assert isinstance(outcome, OutcomeEvent)
    assert (outcome.outcome, outcome.code, outcome.to) == ("completed", None, b.address)
    assert outcome.bytes_sent == result.bytes_sent and outcome.downtime_ms == result.downtime_ms
    assert outcome.duration_ms >= result.total_ms > 0
    assert (outcome.first_pass_ms, outcome.first_pass_payload_bytes, outcome.have_bytes) == (
        result.first_pass_ms, result.first_pass_payload_bytes, result.have_bytes)
    assert outcome.first_pass_ms is not None and outcome.first_pass_ms > 0
    assert _states(received, "watched") == ["incoming", "running"]
    arrived = received[-1]
    assert isinstance(arrived, VMEvent) and (arrived.vm.downtime_ms or 0) > 0
    b.stop("watched")


def _slow_migration(src: Peer, dst: Peer, name: str) -> tuple[subprocess.Popen[str], VMInfo]:
    """`roam migrate` that cycles for several seconds after the destination has started
    QEMU and sent PREPARED (its VM then shows QEMU's pid); returns it and that VM."""
    deadline = time.monotonic() + 30
    while name in dst.vms():  # the worker of an earlier attempt is still leaving
        assert time.monotonic() < deadline, dst.vms()[name]
        time.sleep(0.1)
    migration = src.migrate_background(name, dst, "--max-dirty-blocks", "0",
                                       "--max-cycles", "24", "--cycle-throttle", "0.25")
    deadline = time.monotonic() + 60
    while True:
        arrived = [v for v in dst.api(lambda c: c.vms()) if v.name == name and v.qemu_pid]
        assert migration.poll() is None, migration.communicate()
        if arrived:
            return migration, arrived[0]
        assert time.monotonic() < deadline, "the destination never started QEMU"
        time.sleep(0.1)


def test_migrate_exit_codes_declined_and_in_doubt(peers: dict[str, Peer],
                                                  snapshot: Path) -> None:
    a, b = peers["a"], peers["b"]
    a.run(snapshot, "refused")
    a.sh("refused", "redis-cli set kept yes >/dev/null")

    # Declined: the destination's QEMU dies before the handover; it cannot load the
    # state, declines, and the source resumes.
    migration, arrived = _slow_migration(a, b, "refused")
    assert arrived.qemu_pid is not None
    os.kill(arrived.qemu_pid, signal.SIGKILL)
    _, stderr = migration.communicate(timeout=120)
    assert migration.returncode == Exit.DECLINED, stderr
    assert "declined" in stderr
    assert a.vms()["refused"]["state"] == "running"
    assert a.sh("refused", "redis-cli get kept").strip() == "yes"

    # In doubt: the destination's QEMU hangs at the handover (no acknowledgement), then
    # the destination dies: the source stays paused until an operator settles it.
    migration, arrived = _slow_migration(a, b, "refused")
    assert arrived.qemu_pid is not None and arrived.pid is not None
    os.kill(arrived.qemu_pid, signal.SIGSTOP)
    deadline = time.monotonic() + 120
    while a.vms()["refused"]["state"] != "paused":
        assert migration.poll() is None and time.monotonic() < deadline, \
            migration.communicate()
        time.sleep(0.05)
    time.sleep(2.0)  # authority goes out within milliseconds of the pause
    for pid in (arrived.pid, arrived.qemu_pid):
        os.kill(pid, signal.SIGKILL)
    _, stderr = migration.communicate(timeout=120)
    assert migration.returncode == Exit.IN_DOUBT, stderr
    assert a.vms()["refused"]["state"] == "in-doubt"
    assert a.api(lambda c: c.resume("refused")).state == "running"
    assert a.sh("refused", "redis-cli get kept").strip() == "yes"
    a.stop("refused")

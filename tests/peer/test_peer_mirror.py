"""Standby mirrors between real peers: a VM mirrored with checkpoints, a migration to the
standby that sends only what changed, and the source's host lost (SIGKILL) with the VM
restored on the standby from its last checkpoint, under a new epoch that refuses the old
copy."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.blueprint.boot import short_dir
from tests.peer.conftest import Peer
from tests.vm.conftest import roam, run_dir, snapshot

__all__ = ["run_dir", "snapshot"]

pytestmark = pytest.mark.slow


@pytest.fixture
def pair() -> Iterator[tuple[Peer, Peer]]:
    with short_dir() as root:
        a, b = Peer("ma", root), Peer("mb", root)
        try:
            yield a, b
        finally:
            for p in (a, b):
                p.close()  # a lost peer too: its VM networks are removed


def mirror_of(peer: Peer, name: str) -> dict[str, Any]:
    """The VM's mirror as `roam peer ls --json` shows it on `peer`."""
    listed = json.loads(roam("peer", "ls", "--via", str(peer.dir), "--json").stdout)
    found = [v for v in listed["vms"] if v["name"] == name and v["mirror"] is not None]
    assert found, listed
    mirror: dict[str, Any] = found[0]["mirror"]
    return mirror


def wait_mirror(peer: Peer, name: str, done: Callable[[dict[str, Any]], bool],
                what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while not done(mirror := mirror_of(peer, name)):
        assert time.monotonic() < deadline, f"{what}: {mirror}"
        time.sleep(0.3)
    return mirror


def after(when: float) -> Callable[[dict[str, Any]], bool]:
    """A checkpoint taken after `when` (wall clock)."""
    return lambda m: m["checkpoint"] is not None and m["checkpoint"]["at"] > when


def test_mirror_then_migrate_sends_what_changed(pair: tuple[Peer, Peer],
                                                snapshot: Path) -> None:
    a, b = pair
    a.run(snapshot, "warm")
    a.sh("warm", "head -c 4194304 /dev/urandom > /root/blob && sync")
    roam("peer", "mirror", "warm", "--to", b.address, "--via", str(a.dir),
         "--checkpoint-every", "1")
    # Both ends show the mirror and its lag; the standby sealed a checkpoint.
    standby = wait_mirror(b, "warm", lambda m: m["checkpoints"] >= 1, "no checkpoint")
    assert standby["role"] == "standby" and standby["state"] == "running"
    assert standby["lag_seconds"] >= 0 and standby["sent_bytes"] > 4 << 20
    source = wait_mirror(a, "warm", lambda m: m["checkpoint"] is not None, "no ack")
    assert source["role"] == "source" and source["peer"] == b.address
    assert source["checkpoint"]["pause_ms"] > 0 and source["error"] is None
    assert b.vms()["warm"]["state"] == "mirror"  # a copy, not a running VM
    digest = a.sh("warm", "sha256sum /root/blob").split()[0]
    a.sh("warm", "echo late > /root/late && sync")
    wait_mirror(b, "warm", after(time.time()), "no later checkpoint")

    result = json.loads(a.migrate("warm", b).stdout)
    assert result["outcome"] == "completed"
    # The standby's checkpoint was offered by digest: most of the VM was named, not sent.
    assert result["have_bytes"] > result["bytes_sent"], result
    assert b.sh("warm", "sha256sum /root/blob").split()[0] == digest
    assert b.sh("warm", "cat /root/late").strip() == "late"
    b.stop("warm")


def test_source_lost_vm_restored_on_the_standby(pair: tuple[Peer, Peer],
                                                snapshot: Path) -> None:
    a, b = pair
    a.run(snapshot, "kept")
    roam("peer", "mirror", "kept", "--to", b.address, "--via", str(a.dir),
         "--checkpoint-every", "1")
    wait_mirror(b, "kept", lambda m: m["checkpoints"] >= 1, "no checkpoint")
    # A counter on disk and in memory only (tmpfs), then a checkpoint after it.
    a.sh("kept", "echo 41 > /root/counter && sync && mkdir -p /run/ct && echo 42 > /run/ct/n")
    written = time.time()
    wait_mirror(b, "kept", after(written), "no checkpoint after the counter")

    # The source's host is lost: its worker (and QEMU with it) and its peer, SIGKILL.
    a.lose("kept")
    deadline = time.monotonic() + 60  # the standby hears that its source is gone
    while b.vms().get("kept", {}).get("state") == "mirror":
        assert time.monotonic() < deadline, b.vms()
        time.sleep(0.3)

    promoted = json.loads(roam("peer", "promote", "kept", "--via", str(b.dir)).stdout)
    assert promoted["state"] == "running" and promoted["epoch"] == 1
    assert b.sh("kept", "cat /root/counter /run/ct/n").split() == ["41", "42"]

    # The old source comes back with its copy (epoch 0): the standby refuses it.
    old = Peer("mc", a.dir.parent)
    try:
        old.run(snapshot, "kept")
        refused = roam("peer", "mirror", "kept", "--to", b.address, "--via", str(old.dir),
                       "--checkpoint-every", "1", check=False)
        assert refused.returncode != 0 and "epoch 0 must not run" in refused.stderr, (
            refused.stderr)
        old.stop("kept")
    finally:
        old.close()
    assert b.sh("kept", "cat /run/ct/n").strip() == "42"  # the restored VM runs on
    b.stop("kept")

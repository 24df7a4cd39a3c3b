"""A real VM on a peer syncing to moto's S3 server, moved by `roam migrate` to a second
peer that takes what the bucket holds from there, syncing on (after a first attempt
whose destination is killed while it pulls: the source runs on); then the bucket's
server stops: the VM runs on, its lag grows, and the next migration relies on the peer
alone."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.blueprint.boot import short_dir
from tests.peer.conftest import Peer
from tests.sync.s3 import CREDENTIALS, MotoServer
from tests.vm.conftest import roam, run_dir, snapshot

__all__ = ["run_dir", "snapshot"]

pytestmark = pytest.mark.slow

# 8 MiB the guest writes to its disk (and holds in its page cache, i.e. memory).
WRITE = ("head -c 8388608 /dev/urandom > /root/blob && sync && "
         "sha256sum /root/blob | cut -d' ' -f1")


@pytest.fixture(scope="module")
def store() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Peer, Peer]]:
    """Two peers whose environment holds the S3 credentials (as a peer's would)."""
    with short_dir() as root:
        a, b = Peer("sa", root, env=CREDENTIALS), Peer("sb", root, env=CREDENTIALS)
        try:
            yield a, b
        finally:
            a.close()
            b.close()


def sync_of(peer: Peer, name: str) -> dict[str, Any]:
    """The VM's sync as `roam peer ls --json` shows it (and its table too)."""
    table = roam("peer", "ls", "--via", str(peer.dir)).stdout
    assert "SYNC" in table, table  # its column (80 characters wide: cells wrap)
    listed = json.loads(roam("peer", "ls", "--via", str(peer.dir), "--json").stdout)
    (vm,) = [v for v in listed["vms"] if v["name"] == name]
    assert vm["sync"] is not None, vm
    sync: dict[str, Any] = vm["sync"]
    return sync


def wait_sync(peer: Peer, name: str, done: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while not done(sync := sync_of(peer, name)):
        assert time.monotonic() < deadline, f"{what}: {sync}"
        time.sleep(0.5)
    return sync


def test_vm_syncs_moves_hybrid_and_falls_back_to_the_peer(
        pair: tuple[Peer, Peer], snapshot: Path, store: MotoServer) -> None:
    a, b = pair
    bucket = store.bucket("roam-e2e")
    endpoint = ("--endpoint-url", store.endpoint)
    # A bucket that does not exist: one clear error, and no VM.
    refused = roam("peer", "run", str(snapshot), "--name", "synced", "--via", str(a.dir),
                   "--sync-to", "s3://roam-nowhere/fleet", *endpoint, check=False)
    assert refused.returncode != 0 and "no bucket 'roam-nowhere'" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "synced" not in a.vms()

    roam("peer", "run", str(snapshot), "--name", "synced", "--via", str(a.dir),
         "--sync-to", f"s3://{bucket}/fleet", *endpoint)
    digest = a.sh("synced", WRITE).strip()
    # Caught up once: every chunk uploaded (a running guest's kernel keeps a few chunks
    # dirty all the time, so the lag itself rarely stays at zero).
    synced = wait_sync(a, "synced", lambda s: s["state"] == "running"
                       and s["sync_point"] is not None, "never caught up")
    assert synced["to"] == f"s3://{bucket}/fleet/synced" and synced["objects_put"] > 20
    assert synced["error"] is None
    a.sh("synced", "echo after-sync > /root/late && sync")  # changed since

    # The destination is killed while it pulls from the bucket: the source runs on. (The
    # options keep the source cycling, never pausing, for minutes.)
    doomed = a.migrate_background("synced", b, "--max-dirty-blocks", "0", "--max-cycles",
                                  "1000", "--cycle-throttle", "0.2")
    deadline = time.monotonic() + 60
    while "synced" not in b.vms():
        assert time.monotonic() < deadline, "the destination never received the VM"
        time.sleep(0.05)
    os.kill(b.vms()["synced"]["pid"], signal.SIGKILL)
    _, stderr = doomed.communicate(timeout=120)
    assert doomed.returncode == 1, stderr
    assert a.vms()["synced"]["state"] == "running"
    assert a.sh("synced", "sha256sum /root/blob | cut -d' ' -f1").strip() == digest
    deadline = time.monotonic() + 30
    while "synced" in b.vms():  # B's peer reaps the killed worker
        assert time.monotonic() < deadline
        time.sleep(0.1)

    result = json.loads(a.migrate("synced", b).stdout)
    assert result["outcome"] == "completed"
    # The destination took what the bucket held (the guest's 8 MiB among it) from
    # there; the source sent what changed.
    assert result["store_offered_bytes"] > 8 << 20
    assert result["bytes_sent"] < result["store_offered_bytes"]
    assert b.sh("synced", "sha256sum /root/blob | cut -d' ' -f1").strip() == digest
    assert b.sh("synced", "cat /root/late").strip() == "after-sync"
    # It syncs on from B, to the same place, with what is there already.
    moved = wait_sync(b, "synced", lambda s: s["state"] == "running",
                      "B's sync never caught up")
    assert moved["to"] == f"s3://{bucket}/fleet/synced" and moved["dedup_hits"] > 20
    # Retention: the old sync points go, and the objects only they named (chunks the
    # guest's kernel rewrote since); what the newest point and the running sync name
    # stays, and the VM runs on.
    collected = json.loads(roam("peer", "sync", "synced", "--via", str(b.dir), "--gc",
                                "--keep", "1", "--grace", "0").stdout)
    assert collected["manifests_deleted"] > 0 and collected["objects_deleted"] > 0
    assert b.sh("synced", "sha256sum /root/blob | cut -d' ' -f1").strip() == digest

    # The bucket's server stops: the VM runs on, the sync retries, its lag grows.
    store.stop()
    b.sh("synced", "head -c 1048576 /dev/urandom > /root/more && sync")
    down = wait_sync(b, "synced", lambda s: s["state"] == "retrying" and s["lag_bytes"] > 0,
                     "B's sync did not notice the store was down")
    assert down["error"]
    later = wait_sync(b, "synced", lambda s: s["lag_seconds"] > down["lag_seconds"] + 1,
                      "the lag did not grow")
    assert later["lag_bytes"] >= down["lag_bytes"]
    # A migration now relies on the peer alone.
    more = b.sh("synced", "sha256sum /root/more | cut -d' ' -f1").strip()
    back = json.loads(b.migrate("synced", a).stdout)
    assert back["outcome"] == "completed" and back["store_offered_bytes"] == 0
    assert a.sh("synced", "sha256sum /root/more /root/blob | cut -d' ' -f1").split() == [
        more, digest]
    a.stop("synced")

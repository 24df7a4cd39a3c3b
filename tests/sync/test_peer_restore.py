"""Consistent points in a bucket (moto's S3 server): a VM syncing with checkpoints loses
its host (SIGKILL) and is restored on another peer from its last sealed point, under a
new epoch; it hibernates there and resumes again; the old copy, come back, may not seal
a point any more."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roam.sync.crypto import KEY_FILE
from tests.blueprint.boot import short_dir
from tests.peer.conftest import Peer
from tests.sync.s3 import CREDENTIALS, MotoServer
from tests.sync.test_peer_sync import sync_of
from tests.vm.conftest import roam, run_dir, snapshot

__all__ = ["run_dir", "snapshot"]

pytestmark = pytest.mark.slow


@pytest.fixture
def store() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


def test_lost_host_restore_hibernate_and_fence(snapshot: Path, store: MotoServer) -> None:
    bucket = store.bucket("roam-restore")
    endpoint = ("--endpoint-url", store.endpoint)
    url = f"s3://{bucket}/fleet"
    with short_dir() as root:
        a, b = Peer("ra", root, env=CREDENTIALS), Peer("rb", root, env=CREDENTIALS)
        try:
            a.run(snapshot, "h")
            roam("peer", "sync", "h", "--via", str(a.dir), "--to", url, *endpoint,
                 "--checkpoint-every", "1")
            a.sh("h", "echo 7 > /root/counter && sync && mkdir -p /run/ct && "
                      "echo 8 > /run/ct/n")
            written = time.time()
            deadline = time.monotonic() + 180
            while (point := sync_of(a, "h")["checkpoint"]) is None or point["at"] < written:
                assert time.monotonic() < deadline, sync_of(a, "h")
                time.sleep(0.5)
            assert point["epoch"] == 0 and point["pause_ms"] > 0
            assert a.vms()["h"]["last_pause_ms"] > 0

            # A's host is lost. B restores from the bucket with A's sync key.
            a.lose("h")
            shutil.copy(a.dir / KEY_FILE, b.dir / KEY_FILE)
            restored = json.loads(roam("peer", "run", "--name", "h", "--via", str(b.dir),
                                       "--from", f"{url}/h", *endpoint).stdout)
            assert restored["state"] == "running" and restored["epoch"] == 1
            assert b.sh("h", "cat /root/counter /run/ct/n").split() == ["7", "8"]

            # Hibernate on B, resume from the bucket: a new epoch again.
            b.sh("h", "echo 9 > /run/ct/n")
            sealed = json.loads(roam("peer", "hibernate", "h", "--via", str(b.dir),
                                     "--to", url, *endpoint).stdout)
            assert sealed["epoch"] == 1
            deadline = time.monotonic() + 30
            while "h" in b.vms():  # stopped for good: its worker leaves
                assert time.monotonic() < deadline, b.vms()
                time.sleep(0.2)
            again = json.loads(roam("peer", "run", "--name", "h", "--via", str(b.dir),
                                    "--from", f"{url}/h", *endpoint).stdout)
            assert again["epoch"] == 2
            assert b.sh("h", "cat /root/counter /run/ct/n").split() == ["7", "9"]

            # The old copy (epoch 0) comes back: it may not seal a point over the new one.
            old = Peer("rc", root, env=CREDENTIALS)
            try:
                shutil.copy(a.dir / KEY_FILE, old.dir / KEY_FILE)  # the old host's key
                old.run(snapshot, "h")
                refused = roam("peer", "hibernate", "h", "--via", str(old.dir), "--to", url,
                               *endpoint, check=False)
                assert refused.returncode != 0, refused.stdout
                assert "epoch 0 must not seal" in refused.stderr, refused.stderr
            finally:
                old.close()
            assert b.sh("h", "cat /run/ct/n").strip() == "9"
            b.stop("h")
        finally:
            for p in (a, b):
                p.close()  # a lost peer too: its VM networks are removed

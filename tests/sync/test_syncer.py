"""The sync of devices to moto's S3 server: read back, dedup, encryption, verification,
Silo's knobs, faults of the store, retention."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import blake3
import pytest

from roam.storage.dirty import DirtyTracker
from roam.storage.sources import MemorySource
from roam.sync import gc
from roam.sync.crypto import SyncKey
from roam.sync.errors import CorruptObject, MissingObject, StoreRefused, SyncError
from roam.sync.manifest import object_key
from roam.sync.reader import ChunkReader
from roam.sync.store import ObjectStore, StoreURL
from roam.sync.syncer import SyncDevice, Syncer, SyncPolicy, SyncState
from tests.sync.s3 import MotoServer

MiB = 1 << 20
NOW = SyncPolicy(check_period=0.05, max_age=0.0)  # every change goes at the next check


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store_at(moto: MotoServer, bucket: str, prefix: str = "fleet") -> ObjectStore:
    return ObjectStore(StoreURL.parse(f"s3://{bucket}/{prefix}"), moto.endpoint)


async def device(size: int, block_size: int, content: bytes = b"") -> DirtyTracker:
    tracker = DirtyTracker(MemorySource(size), block_size)
    if content:
        await tracker.write_at(0, content)
    return tracker


async def restored(reader: ChunkReader, vm: str, name: str, size: int) -> bytes:
    into = MemorySource(size)
    await reader.restore(await reader.latest(vm), name, into)
    return bytes(await into.read_at(0, size))


async def contents(tracker: DirtyTracker) -> bytes:
    return bytes(await tracker.read_at(0, tracker.size()))


async def test_devices_synced_read_back_byte_identical(moto: MotoServer, s3_env: None,
                                                       tmp_path: Path) -> None:
    store = store_at(moto, moto.bucket("roam-roundtrip"))
    key = SyncKey.load_or_create(tmp_path / "sync.key")
    assert (tmp_path / "sync.key").stat().st_mode & 0o777 == 0o600
    mem_size = 8 * MiB + 3 * 4096 + 100  # the last chunk and block are short
    memory = await device(mem_size, 4096, os.urandom(3 * MiB) + bytes(2 * MiB)
                          + os.urandom(MiB))
    disk = await device(3 * MiB, 65536, os.urandom(MiB))
    syncer = Syncer("vm1", [SyncDevice("memory", memory), SyncDevice("disk", disk)],
                    store, key, NOW)
    await syncer.start()
    await syncer.cycle()
    status = syncer.status()
    assert status.state == SyncState.FIRST_PASS and status.lag_bytes == 0
    assert status.sync_point == 0 and status.to == "s3://roam-roundtrip/fleet/vm1"
    reader = ChunkReader(store, key)
    assert await restored(reader, "vm1", "memory", mem_size) == await contents(memory)
    assert await restored(reader, "vm1", "disk", 3 * MiB) == await contents(disk)

    # Changes after the first pass: a page here and there, and the short last block.
    for offset in (5, 4096 * 700, mem_size - 50):
        await memory.write_at(offset, os.urandom(40))
    assert syncer.status().lag_bytes == 3 * MiB  # three chunks to go
    await syncer.cycle()
    assert syncer.status().lag_bytes == 0 and syncer.seq == 1
    assert await restored(reader, "vm1", "memory", mem_size) == await contents(memory)


async def test_a_sealed_sync_point_holds_every_change(moto: MotoServer, s3_env: None,
                                                     tmp_path: Path) -> None:
    """What a consistent checkpoint builds on: with the VM paused, seal() uploads all
    that is pending, whatever the knobs say, and marks the point sealed."""
    store = store_at(moto, moto.bucket("roam-seal"))
    key = SyncKey.load_or_create(tmp_path / "sync.key")
    memory = await device(4 * MiB, 4096, os.urandom(4 * MiB))
    syncer = Syncer("vm", [SyncDevice("memory", memory)], store, key,
                    SyncPolicy(max_age=3600, min_changes=1000))
    await syncer.start()
    await syncer.cycle()
    await memory.write_at(MiB + 5, b"one page")
    await syncer.cycle()  # the knobs hold it back
    assert syncer.status().lag_bytes == MiB
    seq = await syncer.seal(epoch=7)
    reader = ChunkReader(store, key)
    point = await reader.latest("vm")
    assert (point.seq, point.sealed, point.epoch) == (seq, True, 7)
    assert syncer.status().lag_bytes == 0
    assert await restored(reader, "vm", "memory", 4 * MiB) == await contents(memory)


async def test_identical_data_is_stored_once(moto: MotoServer, s3_env: None,
                                             tmp_path: Path) -> None:
    bucket = moto.bucket("roam-dedup")
    key = SyncKey.load_or_create(tmp_path / "sync.key")
    run = os.urandom(MiB)
    image = run + bytes(MiB) + run + os.urandom(MiB)  # two identical runs, one zero run
    first = Syncer("a", [SyncDevice("disk", await device(4 * MiB, 65536, image))],
                   store_at(moto, bucket), key, NOW)
    await first.start()
    await first.cycle()
    assert (first.totals.objects_put, first.totals.dedup_hits, first.totals.zero_chunks) \
        == (2, 1, 1)
    # A second VM from the same image (one base image, many VMs) uploads nothing.
    second = Syncer("b", [SyncDevice("disk", await device(4 * MiB, 65536, image))],
                    store_at(moto, bucket), key, NOW)
    await second.start()
    await second.cycle()
    assert second.totals.objects_put == 0 and second.totals.dedup_hits == 3
    assert len(moto.keys(bucket, "fleet/objects/")) == 2


async def test_objects_are_encrypted_and_named_by_a_keyed_hash(moto: MotoServer, s3_env: None,
                                                               tmp_path: Path) -> None:
    bucket = moto.bucket("roam-crypto")
    secret = b"guest memory holds secrets!!" * (MiB // 28) + b"x" * (MiB % 28)
    key = SyncKey.load_or_create(tmp_path / "sync.key")
    syncer = Syncer("vm", [SyncDevice("memory", await device(MiB, 4096, secret))],
                    store_at(moto, bucket), key, NOW)
    await syncer.start()
    await syncer.cycle()
    (name,) = moto.keys(bucket, "fleet/objects/")
    blob = moto.client().get_object(Bucket=bucket, Key=name)["Body"].read()
    assert b"holds secrets" not in blob and len(blob) >= MiB
    # The name is not the plain hash, and another tenant's key names the same data
    # differently: names tell nobody without the key that two tenants hold the same.
    assert blake3.blake3(secret).hexdigest() not in name
    assert key.address(secret).hex() in name
    assert SyncKey(os.urandom(32)).address(secret) != key.address(secret)
    manifests = moto.keys(bucket, "fleet/vm/manifests/")
    manifest = moto.client().get_object(Bucket=bucket, Key=manifests[0])["Body"].read()
    assert b"memory" not in manifest  # manifests are sealed too


async def test_an_object_altered_or_deleted_behind_roams_back_is_never_used(
        moto: MotoServer, s3_env: None, tmp_path: Path) -> None:
    bucket = moto.bucket("roam-tamper")
    key = SyncKey.load_or_create(tmp_path / "sync.key")
    store = store_at(moto, bucket)
    a, b = os.urandom(MiB), os.urandom(MiB)
    syncer = Syncer("vm", [SyncDevice("disk", await device(2 * MiB, 65536, a + b))],
                    store, key, NOW)
    await syncer.start()
    await syncer.cycle()
    reader = ChunkReader(store, key)
    assert await reader.fetch(key.address(a)) == a
    s3 = moto.client()
    path_a = "fleet/" + object_key(key.address(a))
    path_b = "fleet/" + object_key(key.address(b))
    blob = bytearray(s3.get_object(Bucket=bucket, Key=path_a)["Body"].read())
    blob[1000] ^= 1
    s3.put_object(Bucket=bucket, Key=path_a, Body=bytes(blob))
    with pytest.raises(CorruptObject):
        await reader.fetch(key.address(a))
    # A valid object copied under another name does not pass for it either.
    s3.copy_object(Bucket=bucket, Key=path_a, CopySource={"Bucket": bucket, "Key": path_b})
    with pytest.raises(CorruptObject):
        await reader.fetch(key.address(a))
    with pytest.raises(CorruptObject):
        await restored(reader, "vm", "disk", 2 * MiB)
    s3.delete_object(Bucket=bucket, Key=path_b)
    with pytest.raises(MissingObject):
        await reader.fetch(key.address(b))


async def test_silo_knobs_pick_the_busiest_chunks_and_the_oldest(
        moto: MotoServer, s3_env: None, tmp_path: Path) -> None:
    clock = Clock()
    key = SyncKey.load_or_create(tmp_path / "sync.key")
    memory = await device(4 * MiB, 4096, os.urandom(4 * MiB))
    policy = SyncPolicy(max_age=10.0, min_changes=4, limit=1)
    syncer = Syncer("vm", [SyncDevice("memory", memory)], store_at(moto, moto.bucket(
        "roam-knobs")), key, policy, clock=clock)
    await syncer.start()
    await syncer.cycle()  # the first pass is not limited
    assert syncer.status().lag_bytes == 0
    for chunk, pages in ((0, 1), (1, 5), (2, 6)):
        for page in range(pages):
            await memory.write_at(chunk * MiB + page * 4096, b"x")
    await syncer.cycle()  # limit 1: the most changed chunk (2)
    assert syncer.status().lag_bytes == 2 * MiB
    await syncer.cycle()  # then chunk 1; chunk 0 has fewer than min_changes
    await syncer.cycle()
    assert syncer.status().lag_bytes == MiB
    clock.now += 5
    assert syncer.status().lag_seconds == 5.0
    clock.now += 6  # older than max_age: it goes whatever its changes
    await syncer.cycle()
    assert syncer.status().lag_bytes == 0


async def test_wrong_credentials_or_missing_bucket_fail_at_start_with_one_error(
        moto: MotoServer, s3_env: None, tmp_path: Path) -> None:
    key = SyncKey.load_or_create(tmp_path / "sync.key")
    tracker = await device(MiB, 4096)
    missing = Syncer("vm", [SyncDevice("memory", tracker)],
                     store_at(moto, "roam-no-such-bucket"), key, NOW)
    with pytest.raises(StoreRefused, match="no bucket 'roam-no-such-bucket'") as err:
        await missing.start()
    assert "\n" not in str(err.value)
    locked = MotoServer(auth=True)  # checks credentials: ours are valid nowhere
    try:
        wrong = Syncer("vm", [SyncDevice("memory", tracker)], ObjectStore(
            StoreURL.parse("s3://roam-any/fleet"), locked.endpoint), key, NOW)
        with pytest.raises(StoreRefused, match="AWS_ACCESS_KEY_ID") as err:
            await wrong.start()
        assert "\n" not in str(err.value)
    finally:
        locked.stop()
    await tracker.write_at(0, b"the device works on")
    assert bytes(await tracker.read_at(0, 19)) == b"the device works on"


async def test_store_down_the_sync_retries_and_its_lag_grows(s3_env: None,
                                                             tmp_path: Path) -> None:
    server = MotoServer()
    try:
        key = SyncKey.load_or_create(tmp_path / "sync.key")
        memory = await device(4 * MiB, 4096, os.urandom(4 * MiB))
        syncer = Syncer("vm", [SyncDevice("memory", memory)],
                        store_at(server, server.bucket("roam-down")), key, NOW)
        await syncer.start()
        await syncer.cycle()
        assert syncer.safe() is not None
        server.stop()
        running = asyncio.create_task(syncer.run())
        await memory.write_at(0, os.urandom(100))
        async with asyncio.timeout(60):
            await syncer.retrying.wait()
        first = syncer.status()
        assert first.lag_bytes == MiB and first.error
        await memory.write_at(2 * MiB, os.urandom(100))  # the VM writes on
        await asyncio.sleep(0.6)
        later = syncer.status()
        assert later.lag_bytes == 2 * MiB and later.lag_seconds > first.lag_seconds
        assert syncer.safe() is None  # a migration now relies on its peer alone
        assert not running.done()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    finally:
        server.stop()


async def test_gc_keeps_the_newest_sync_points_and_deletes_what_nothing_names(
        moto: MotoServer, s3_env: None, tmp_path: Path) -> None:
    bucket = moto.bucket("roam-gc")
    key = SyncKey.load_or_create(tmp_path / "sync.key")
    store = store_at(moto, bucket)
    disk = await device(2 * MiB, 65536, os.urandom(2 * MiB))
    syncer = Syncer("vm", [SyncDevice("disk", disk)], store, key,
                    SyncPolicy(max_age=0.0, keep=5))
    await syncer.start()
    for point in range(3):  # three sync points; chunk 0 changes for each
        if point:
            await disk.write_at(0, os.urandom(64))
        await syncer.cycle()
    assert len(moto.keys(bucket, "fleet/objects/")) == 4
    done = await gc.collect(store, key, "vm", keep=1, grace=0)
    assert (done.manifests_deleted, done.objects_deleted, done.objects_kept) == (2, 2, 2)
    assert await restored(ChunkReader(store, key), "vm", "disk", 2 * MiB) == \
        await contents(disk)
    # A sync point this key cannot read stops the collection before any deletion.
    other = Syncer("other", [SyncDevice("disk", await device(MiB, 65536, os.urandom(MiB)))],
                   store, SyncKey(os.urandom(32)), NOW)
    await other.start()
    await other.cycle()
    with pytest.raises(SyncError, match="nothing was deleted"):
        await gc.collect(store, key, "vm", keep=1, grace=0)
    assert len(moto.keys(bucket, "fleet/objects/")) == 3

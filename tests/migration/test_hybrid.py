"""Hybrid migration in the engine: a source whose devices sync to moto's S3 server hands
the destination what the store holds; the destination takes it from there, in parallel,
verified, and from the source whatever the store cannot give."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from roam.migration.channel import Channel
from roam.migration.destination import Destination
from roam.migration.errors import MigrationError
from roam.migration.source import Policy, Source, SourceDevice, SourceHooks
from roam.peer.syncing import open_store, store_offer
from roam.storage.sources import MemorySource
from roam.sync.crypto import SyncKey
from roam.sync.manifest import object_key
from roam.sync.store import ObjectStore, StoreURL
from roam.sync.syncer import SyncDevice, Syncer, SyncPolicy
from tests.migration.conftest import memory_device
from tests.sync.s3 import MotoServer, moto, s3_env

__all__ = ["moto", "s3_env"]

Pair = Callable[[], Awaitable[tuple[Channel, Channel]]]
MiB = 1 << 20
SIZES = {"memory": (16 * MiB, 4096), "disk": (8 * MiB + 5000, 65536)}


async def synced_group(server: MotoServer, bucket: str, tmp_path: Path
                       ) -> tuple[list[SourceDevice], Syncer]:
    """Two devices, synced once, then partly written again (those parts are not safe)."""
    devices = []
    for name, (size, bs) in SIZES.items():
        source = MemorySource(size)
        await source.write_at(0, os.urandom(size * 3 // 4))
        devices.append(SourceDevice.stack(name, source, bs))
    syncer = Syncer("vm", [SyncDevice(d.name, d.tracker) for d in devices],
                    ObjectStore(StoreURL.parse(f"s3://{server.bucket(bucket)}/fleet"),
                                server.endpoint),
                    SyncKey.load_or_create(tmp_path / "sync.key"), SyncPolicy(max_age=0))
    await syncer.start()
    await syncer.cycle()
    for offset in (0, 5 * MiB + 3, 9 * MiB):  # dirtied since the sync
        await devices[0].tracker.write_at(offset, os.urandom(70_000))
    return devices, syncer


async def migrate(pair: Pair, devices: list[SourceDevice], syncer: Syncer,
                  writes: bool = True) -> tuple[Source, Destination]:
    rng = random.Random(5)
    stop = asyncio.Event()

    async def writer() -> None:  # the workload writes to memory during the migration
        memory = devices[0].tracker
        for _ in range(300 if writes else 0):
            if stop.is_set():
                return
            await memory.write_at(rng.randrange(memory.size() - 5000), rng.randbytes(5000))
            await asyncio.sleep(0.002)

    async def suspend() -> None:
        stop.set()
        await writing

    src_ch, dst_ch = await pair()
    writing = asyncio.create_task(writer())
    source = Source(src_ch, devices, SourceHooks(suspend=suspend,
                                                 store_offer=lambda: store_offer(syncer)),
                    Policy(max_dirty_blocks=4, min_cycles=2, max_cycles=5, verify=True,
                           await_prepared=True))
    dest = Destination(dst_ch, memory_device, store=open_store)
    await asyncio.gather(source.run(), dest.run())
    return source, dest


async def identical(devices: list[SourceDevice], dest: Destination) -> None:
    for dev in devices:
        size = dev.tracker.size()
        assert bytes(await dest.devices[dev.name].read_at(0, size)) == \
            bytes(await dev.tracker.read_at(0, size)), dev.name


async def test_destination_takes_safe_chunks_from_the_store_and_the_rest_from_the_source(
        socket_pair: Pair, moto: MotoServer, s3_env: None, tmp_path: Path) -> None:
    devices, syncer = await synced_group(moto, "roam-hybrid", tmp_path)
    source, dest = await migrate(socket_pair, devices, syncer)
    await identical(devices, dest)
    data = sum(size * 3 // 4 for size, _ in SIZES.values())
    # What was uploaded and not written since (by the test, or by the workload before
    # the offer) came from the store...
    offered = source.result.store_offered_bytes
    uploaded = 16 * MiB  # 12 chunks of memory, 7 of disk (its last one short), 3 dirtied
    assert 8 * MiB <= offered <= uploaded
    assert dest.result.store_bytes >= offered - MiB  # (the disk's last chunk is short)
    assert dest.result.store_fallback_chunks == 0 and dest.result.integrity_errors == 0
    # ...and the source sent what changed (the three chunks, what the workload wrote:
    # at most 300 writes of two pages), not the devices.
    assert source.result.payload_bytes < 3 * MiB + (uploaded - offered) + 300 * 2 * 4096
    assert source.result.payload_bytes < data / 2


async def test_a_chunk_altered_or_missing_in_the_store_comes_from_the_source(
        socket_pair: Pair, moto: MotoServer, s3_env: None, tmp_path: Path) -> None:
    devices, syncer = await synced_group(moto, "roam-hybrid-tamper", tmp_path)
    s3 = moto.client()
    safe = syncer.safe()
    assert safe is not None
    altered, deleted = safe[0].addresses[0].tobytes(), safe[1].addresses[0].tobytes()
    path = "fleet/" + object_key(altered)
    blob = bytearray(s3.get_object(Bucket="roam-hybrid-tamper", Key=path)["Body"].read())
    blob[-1] ^= 0x40
    s3.put_object(Bucket="roam-hybrid-tamper", Key=path, Body=bytes(blob))
    s3.delete_object(Bucket="roam-hybrid-tamper", Key="fleet/" + object_key(deleted))
    _, dest = await migrate(socket_pair, devices, syncer, writes=False)
    await identical(devices, dest)
    assert dest.result.store_fallback_chunks >= 2  # more if a chunk's content recurs
    assert dest.result.store_chunks > 0


async def test_store_down_the_destination_takes_everything_from_the_source(
        socket_pair: Pair, s3_env: None, tmp_path: Path) -> None:
    server = MotoServer()
    try:
        devices, syncer = await synced_group(server, "roam-hybrid-down", tmp_path)
    finally:
        server.stop()
    source, dest = await migrate(socket_pair, devices, syncer)
    await identical(devices, dest)
    assert dest.result.store_chunks == 0
    assert dest.result.store_fallback_chunks * MiB >= source.result.store_offered_bytes > 0


async def test_destination_killed_while_pulling_leaves_the_source_running(
        socket_pair: Pair, moto: MotoServer, s3_env: None, tmp_path: Path) -> None:
    devices, syncer = await synced_group(moto, "roam-hybrid-kill", tmp_path)
    before = [bytes(await d.tracker.read_at(0, d.tracker.size())) for d in devices]
    src_ch, dst_ch = await socket_pair()
    suspended = asyncio.Event()

    async def suspend() -> None:
        suspended.set()

    source = Source(src_ch, devices, SourceHooks(suspend=suspend,
                                                 store_offer=lambda: store_offer(syncer)),
                    Policy(await_prepared=True))
    dest = Destination(dst_ch, memory_device, store=open_store)
    receiving = asyncio.create_task(dest.run())
    sending = asyncio.create_task(source.run())
    async with asyncio.timeout(60):
        while dest.result.store_chunks == 0:  # noqa: ASYNC110 (the engine has no event)
            await asyncio.sleep(0.01)
    receiving.cancel()  # the destination dies mid-pull: its connection goes with it
    await dst_ch.close()
    with pytest.raises(MigrationError):
        await sending
    assert not suspended.is_set()  # never paused: the workload ran on throughout
    assert [bytes(await d.tracker.read_at(0, d.tracker.size())) for d in devices] == before
    await devices[1].tracker.write_at(0, b"still writable")
    with pytest.raises(asyncio.CancelledError):
        await receiving

"""What happens when things go wrong, or race: priority, late blocks, corruption, lost peers,
and the authority rule."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest

from roam.migration.channel import Channel
from roam.migration.destination import Destination
from roam.migration.errors import Decline, InDoubt, MigrationError, RemoteError
from roam.migration.source import Policy, Source, SourceDevice, SourceHooks
from roam.migration.wire import HEADER, MsgType
from roam.storage.provider import Buffer, StorageError
from roam.storage.sources import MemorySource
from roam.storage.waiting import WaitingCache
from tests.migration.conftest import memory_device

Pair = Callable[[], Awaitable[tuple[Channel, Channel]]]
BS = 64 * 1024


class SlowSource(MemorySource):
    """A source whose reads take a while (5 ms per 64 KiB block, whatever the size of the
    read), so the bulk copy is slow enough to overtake."""

    async def read_at(self, offset: int, length: int) -> Buffer:
        await asyncio.sleep(0.005 * max(1, length // BS))
        return await super().read_at(offset, length)


class Corrupting:
    """Wraps a channel and flips one payload byte in the first `times` block frames."""

    def __init__(self, inner: Channel, times: int) -> None:
        self.inner = inner
        self.times = times

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    def send(self, *parts: Buffer) -> None:
        frame = bytearray(b"".join(parts))
        if frame[0] == MsgType.BLOCKS and frame[HEADER.size + 3] == 0 and self.times:
            self.times -= 1
            frame[-1] ^= 0xFF  # RAW run: the last byte is block data
        self.inner.send(frame)

    async def drain(self) -> None:
        await self.inner.drain()

    async def recv(self) -> tuple[MsgType, memoryview]:
        return await self.inner.recv()

    def limit_queue(self, nbytes: int) -> None:
        self.inner.limit_queue(nbytes)

    async def close(self) -> None:
        await self.inner.close()


async def _random_device(size: int, source: MemorySource | None = None) -> SourceDevice:
    src = source or MemorySource(size)
    await src.write_at(0, os.urandom(size))
    return SourceDevice.stack("d", src, BS)


async def test_priority_request_overtakes_the_bulk_copy(socket_pair: Pair) -> None:
    size = 32 * 1024 * 1024
    dev = await _random_device(size, SlowSource(size))
    src_ch, dst_ch = await socket_pair()
    dest = Destination(dst_ch, memory_device)
    got: list[tuple[bytes, int]] = []

    async def read_last_block() -> None:
        await dest.ready.wait()
        cache = dest.devices["d"]
        data = bytes(await cache.read_at(size - BS, BS))
        got.append((data, cache.present_count))

    result, _, _ = await asyncio.gather(Source(src_ch, [dev]).run(), dest.run(),
                                        read_last_block())
    data, present_then = got[0]
    assert data == bytes(await dev.tracker.read_at(size - BS, BS))
    assert present_then < size // BS // 2  # served long before the bulk got there
    assert result.priority_blocks >= 1


async def test_local_writes_after_handover_beat_late_remote_blocks(socket_pair: Pair) -> None:
    size = 4 * 1024 * 1024
    dev = await _random_device(size)
    local = b"L" * BS

    async def suspend() -> None:
        # Change blocks 3 and 5 at the pause: both are in the final dirty list.
        await dev.tracker.write_at(3 * BS, b"S" * BS)
        await dev.tracker.write_at(5 * BS, b"S" * BS)

    async def resumed_vm(payload: bytes, devices: dict[str, WaitingCache]) -> None:
        cache = devices["d"]
        await cache.write_at(3 * BS, local)  # whole block: no need to wait for it
        await cache.write_at(5 * BS + 10, b"patch")  # partial: merges with the new copy

    src_ch, dst_ch = await socket_pair()
    dest = Destination(dst_ch, memory_device, resumed_vm)
    result, _ = await asyncio.gather(
        Source(src_ch, [dev], SourceHooks(suspend=suspend),
               Policy(postcopy=True, pause_send_bytes=0)).run(),
        dest.run(),
    )
    assert result.final_dirty >= 2
    cache = dest.devices["d"]
    assert bytes(await cache.read_at(3 * BS, BS)) == local
    assert bytes(await cache.read_at(5 * BS, BS)) == b"S" * 10 + b"patch" + b"S" * (BS - 15)
    untouched = bytes(await dev.tracker.read_at(0, 3 * BS))
    assert bytes(await cache.read_at(0, 3 * BS)) == untouched


async def test_a_corrupted_block_is_detected_and_fetched_again(socket_pair: Pair) -> None:
    dev = await _random_device(2 * 1024 * 1024)
    src_ch, dst_ch = await socket_pair()
    dest = Destination(dst_ch, memory_device)
    await asyncio.gather(Source(Corrupting(src_ch, times=1), [dev]).run(), dest.run())
    assert dest.result.integrity_errors == 1
    assert bytes(await dest.devices["d"].read_at(0, 2 * 1024 * 1024)) == bytes(
        await dev.tracker.read_at(0, 2 * 1024 * 1024))


async def test_persistent_corruption_fails_the_migration(socket_pair: Pair) -> None:
    dev = await _random_device(BS)
    src_ch, dst_ch = await socket_pair()
    dest = Destination(dst_ch, memory_device)
    results = await asyncio.gather(Source(Corrupting(src_ch, times=100), [dev]).run(),
                                   dest.run(), return_exceptions=True)
    assert isinstance(results[1], MigrationError)
    assert "failed verification" in str(results[1])
    assert isinstance(results[0], MigrationError)  # the source hears why


async def test_destination_lost_mid_migration_leaves_source_running(socket_pair: Pair) -> None:
    size = 16 * 1024 * 1024
    dev = await _random_device(size, SlowSource(size))
    before = bytes(await dev.tracker.read_at(0, size))
    src_ch, dst_ch = await socket_pair()
    suspended = []

    async def suspend() -> None:
        suspended.append(True)

    async def kill_destination_soon() -> None:
        await asyncio.sleep(0.05)
        await dst_ch.close()

    results = await asyncio.gather(
        Source(src_ch, [dev], SourceHooks(suspend=suspend)).run(),
        Destination(dst_ch, memory_device).run(),
        kill_destination_soon(),
        return_exceptions=True,
    )
    assert isinstance(results[0], MigrationError) and not isinstance(results[0], InDoubt)
    assert "lost the destination" in str(results[0])
    assert not suspended  # the workload never stopped
    assert bytes(await dev.tracker.read_at(0, size)) == before
    await dev.tracker.write_at(0, b"still usable")
    assert bytes(await dev.tracker.read_at(0, 12)) == b"still usable"


async def test_source_lost_mid_migration_fails_readers_on_destination(socket_pair: Pair) -> None:
    size = 16 * 1024 * 1024
    dev = await _random_device(size, SlowSource(size))
    src_ch, dst_ch = await socket_pair()
    dest = Destination(dst_ch, memory_device)
    read_error: list[BaseException] = []

    async def reader_then_kill() -> None:
        await dest.ready.wait()
        await src_ch.close()
        try:
            await dest.devices["d"].read_at(size - BS, BS)
        except StorageError as e:
            read_error.append(e)

    results = await asyncio.gather(Source(src_ch, [dev]).run(), dest.run(), reader_then_kill(),
                                   return_exceptions=True)
    assert isinstance(results[1], MigrationError)
    assert "lost the source" in str(results[1])
    assert read_error and "not available" in str(read_error[0])


async def test_authority_declined_resumes_the_source(socket_pair: Pair) -> None:
    dev = await _random_device(BS * 4)
    calls: list[str] = []

    async def suspend() -> None:
        calls.append("suspend")

    async def resume() -> None:
        calls.append("resume")

    async def refuse(payload: bytes, devices: dict[str, WaitingCache]) -> None:
        raise Decline("no room here")

    src_ch, dst_ch = await socket_pair()
    hooks = SourceHooks(suspend=suspend, resume=resume)
    result, _ = await asyncio.gather(Source(src_ch, [dev], hooks).run(),
                                       Destination(dst_ch, memory_device, refuse).run(),
                                       return_exceptions=True)
    assert not isinstance(result, BaseException) and result.outcome == "declined"
    assert calls == ["suspend", "resume"]


async def test_lost_acknowledgement_leaves_source_paused_in_doubt(socket_pair: Pair) -> None:
    dev = await _random_device(BS * 4)
    calls: list[str] = []

    async def suspend() -> None:
        calls.append("suspend")

    async def resume() -> None:
        calls.append("resume")

    async def vanish(payload: bytes, devices: dict[str, WaitingCache]) -> None:
        assert payload == b"state"
        await dst_ch.close()  # took authority, then the link died before the ack
        raise ConnectionError("gone")

    async def authority() -> bytes:
        return b"state"

    src_ch, dst_ch = await socket_pair()
    hooks = SourceHooks(suspend=suspend, resume=resume, authority=authority)
    results = await asyncio.gather(Source(src_ch, [dev], hooks).run(),
                                   Destination(dst_ch, memory_device, vanish).run(),
                                   return_exceptions=True)
    assert isinstance(results[0], InDoubt)
    assert calls == ["suspend"]  # never resumed: it may be running over there


@pytest.mark.parametrize("failing", ["suspend", "authority", "before_collect"])
async def test_failing_hook_aborts_and_keeps_the_source(socket_pair: Pair, failing: str) -> None:
    dev = await _random_device(BS * 4)
    calls: list[str] = []

    async def boom() -> None:
        raise RuntimeError(f"{failing} failed")

    async def resume() -> None:
        calls.append("resume")

    hooks = SourceHooks(resume=resume)
    setattr(hooks, failing, boom)
    src_ch, dst_ch = await socket_pair()
    dest = Destination(dst_ch, memory_device)
    results = await asyncio.gather(Source(src_ch, [dev], hooks).run(), dest.run(),
                                   return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert isinstance(results[1], RemoteError)
    assert dest.result.payload == b""  # authority never sent
    if failing != "before_collect":
        assert calls == ["resume"]



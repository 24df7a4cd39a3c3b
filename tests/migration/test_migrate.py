"""End-to-end migration of devices between two ends over a UNIX socket."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from roam.migration import destination as destination_module
from roam.migration.channel import Channel, StreamChannel
from roam.migration.destination import Destination, NewDevice
from roam.migration.source import Policy, Source, SourceDevice, SourceHooks
from roam.migration.wire import ALL_CAPS, Caps, DeviceSpec, Encoding, MsgType
from roam.storage.bitmap import block_runs
from roam.storage.provider import Buffer
from roam.storage.sources import MemorySource
from roam.storage.waiting import WaitingCache
from tests.migration.conftest import memory_device

Pair = Callable[[], Awaitable[tuple[Channel, Channel]]]
BS = 64 * 1024


async def _read_all(provider: object, size: int) -> bytes:
    return bytes(await provider.read_at(0, size))  # type: ignore[attr-defined]


async def test_devices_written_during_migration_end_identical(socket_pair: Pair) -> None:
    rng = random.Random(1)
    sizes = {"mem": 8 * 1024 * 1024 + 12345, "disk": 4 * 1024 * 1024}
    devices = []
    for name, size in sizes.items():
        src = MemorySource(size)
        await src.write_at(0, os.urandom(size // 2))
        devices.append(SourceDevice.stack(name, src, BS))
    stop = asyncio.Event()
    writes = 0

    async def writer() -> None:
        nonlocal writes
        while not stop.is_set():
            dev = rng.choice(devices)
            size = dev.tracker.size()
            off = rng.randrange(size)
            n = min(size - off, rng.randrange(1, 200_000))
            await dev.tracker.write_at(off, rng.randbytes(n))
            writes += 1
            await asyncio.sleep(0)

    async def suspend() -> None:
        stop.set()
        await writer_task

    src_ch, dst_ch = await socket_pair()
    writer_task = asyncio.create_task(writer())
    source = Source(src_ch, devices, SourceHooks(suspend=suspend),
                    Policy(max_dirty_blocks=4, min_cycles=3, max_cycles=6, verify=True))
    dest = Destination(dst_ch, memory_device)
    src_result, dst_result = await asyncio.gather(source.run(), dest.run())

    assert writes > 10
    assert src_result.outcome == "completed"
    assert src_result.cycles >= 3
    assert dst_result.integrity_errors == 0
    for dev in devices:
        want = await _read_all(dev.tracker, dev.tracker.size())
        got = await _read_all(dest.devices[dev.name], dev.tracker.size())
        assert got == want, dev.name
    assert dst_result.verified_blocks == sum(
        (s + BS - 1) // BS for s in sizes.values()
    )


async def test_compressed_and_zero_blocks(socket_pair: Pair) -> None:
    src = MemorySource(2 * 1024 * 1024)
    await src.write_at(100_000, b"roam " * 50_000)
    dev = SourceDevice.stack("d", src, BS)
    for encoding in (Encoding.ZSTD, Encoding.LZ4):
        src_ch, dst_ch = await socket_pair()
        dest = Destination(dst_ch, memory_device)
        result, _ = await asyncio.gather(
            Source(src_ch, [dev], policy=Policy(compression=encoding)).run(), dest.run()
        )
        want = bytes(await src.read_at(0, src.size()))
        assert await _read_all(dest.devices["d"], src.size()) == want
        assert result.bytes_sent < 200_000, result.bytes_sent  # zeroes and text shrink


async def test_any_pair_of_asyncio_streams_carries_a_migration(tmp_path: Path) -> None:
    """StreamChannel: the protocol over plain asyncio streams, post-copy included."""
    size = 3 * 1024 * 1024
    src = MemorySource(size)
    await src.write_at(0, os.urandom(size))
    dev = SourceDevice.stack("d", src, BS)
    accepted: asyncio.Queue[StreamChannel] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(StreamChannel(reader, writer))

    server = await asyncio.start_unix_server(on_client, str(tmp_path / "s.sock"))
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
    src_ch = StreamChannel(reader, writer)
    dst_ch = await accepted.get()

    async def suspend() -> None:
        await dev.tracker.write_at(BS * 7, b"changed at the pause")

    async def resumed(payload: bytes, devices: dict[str, WaitingCache]) -> None:
        assert payload == b"config"
        # A post-copy read: block 7 is in the final dirty list and may not be here yet.
        assert bytes(await devices["d"].read_at(BS * 7, 20)) == b"changed at the pause"

    async def authority() -> bytes:
        return b"config"

    dest = Destination(dst_ch, memory_device, resumed)
    result, _ = await asyncio.gather(
        Source(src_ch, [dev], SourceHooks(suspend=suspend, authority=authority),
               Policy(pause_send_bytes=0)).run(),
        dest.run())
    assert result.outcome == "completed" and result.final_dirty == 1
    assert await _read_all(dest.devices["d"], size) == await _read_all(src, size)
    await src_ch.close()
    await dst_ch.close()
    server.close()


async def test_a_small_final_set_arrives_before_authority(socket_pair: Pair) -> None:
    """Post-copy on, but a final dirty set within `pause_send_bytes` goes inside the
    pause: the resumed workload never waits for it. DONE carries what the destination's
    `done_payload` said once the workload ran."""
    size = 2 * 1024 * 1024
    src = MemorySource(size)
    await src.write_at(0, os.urandom(size))
    dev = SourceDevice.stack("d", src, BS)
    seen: list[bool] = []

    async def suspend() -> None:
        await dev.tracker.write_at(BS * 3, b"changed at the pause")

    async def resumed(payload: bytes, devices: dict[str, WaitingCache]) -> None:
        seen.append(devices["d"].is_present(3))

    async def liveness() -> bytes:
        return b"it answered"

    src_ch, dst_ch = await socket_pair()
    dest = Destination(dst_ch, memory_device, resumed, done_payload=liveness)
    result, _ = await asyncio.gather(
        Source(src_ch, [dev], SourceHooks(suspend=suspend), Policy(postcopy=True)).run(),
        dest.run())
    assert result.final_dirty == 1 and seen == [True]
    assert result.done == b"it answered"
    assert await _read_all(dest.devices["d"], size) == await _read_all(src, size)


async def test_destination_that_has_older_content_receives_only_what_differs(
        socket_pair: Pair) -> None:
    """A way back (A to B, then B to A): A still holds most blocks; only changed blocks
    move, the rest are confirmed by blake3 ("you already have this")."""
    size = 4 * 1024 * 1024
    content = os.urandom(size)
    src = MemorySource(size)
    await src.write_at(0, content)
    await src.write_at(BS * 10, os.urandom(BS * 3))  # changed since A had it
    old = MemorySource(size)
    await old.write_at(0, content)

    async def existing(spec: DeviceSpec) -> NewDevice:
        return NewDevice(old, fresh=False, existing=True)

    src_ch, dst_ch = await socket_pair()
    dest = Destination(dst_ch, existing)
    result, _ = await asyncio.gather(Source(src_ch, [SourceDevice.stack("d", src, BS)]).run(),
                                     dest.run())
    assert await _read_all(dest.devices["d"], size) == await _read_all(src, size)
    assert result.bytes_sent < 4 * BS  # three changed blocks plus hashes, not 4 MiB
    assert result.have_bytes == size - 3 * BS  # the rest was named, not sent
    assert dest.result.integrity_errors == 0


async def test_zero_blocks_over_older_content(socket_pair: Pair) -> None:
    """Blocks the source has zero and the destination's older copy has not: zeroed there
    (the rest of its zero blocks, zero on both sides, need no write)."""
    size = 64 * BS
    src = MemorySource(size)
    await src.write_at(0, os.urandom(8 * BS))  # the rest is zero
    old = MemorySource(size)
    await old.write_at(32 * BS, os.urandom(8 * BS))  # zero at the source

    async def existing(spec: DeviceSpec) -> NewDevice:
        return NewDevice(old, fresh=False)

    src_ch, dst_ch = await socket_pair()
    dest = Destination(dst_ch, existing)
    await asyncio.gather(Source(src_ch, [SourceDevice.stack("d", src, BS)]).run(), dest.run())
    assert await _read_all(old, size) == await _read_all(src, size)


async def test_source_suspends_only_once_the_destination_is_prepared(socket_pair: Pair) -> None:
    """With await_prepared the workload keeps running (and dirtying) until PREPARED comes,
    and the suspend hook sees the destination's payload."""
    size = 4 * 1024 * 1024
    src = MemorySource(size)
    await src.write_at(0, os.urandom(size))
    device = SourceDevice.stack("mem", src, BS)
    seen_at_suspend: list[bytes] = []
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            await device.tracker.write_at(random.randrange(size - 10), b"x" * 10)
            await asyncio.sleep(0.001)

    async def suspend() -> None:
        seen_at_suspend.append(source.result.prepared)
        stop.set()
        await writer_task

    src_ch, dst_ch = await socket_pair()
    writer_task = asyncio.create_task(writer())
    source = Source(src_ch, [device], SourceHooks(suspend=suspend),
                    Policy(max_dirty_blocks=1000, min_cycles=1, await_prepared=True))
    dest = Destination(dst_ch, memory_device, prepares=True)

    async def prepare_late() -> None:
        await dest.ready.wait()
        await asyncio.sleep(0.3)
        assert not seen_at_suspend  # still running: not prepared yet
        dest.prepared(b'{"underlay": "192.0.2.7"}')

    src_result, _, _ = await asyncio.gather(source.run(), dest.run(), prepare_late())
    assert seen_at_suspend == [b'{"underlay": "192.0.2.7"}']
    assert src_result.cycles >= 2  # it went on collecting while it waited
    assert await _read_all(dest.devices["mem"], size) == await _read_all(src, size)


@pytest.mark.parametrize("peer_scatters", [True, False])
async def test_a_scattered_final_set_goes_in_few_frames(
        socket_pair: Pair, monkeypatch: pytest.MonkeyPatch, peer_scatters: bool) -> None:
    """Pages dirtied at the pause, scattered over the device (as a busy guest's are), go
    together in SCATTER frames of up to 4 MiB when the destination reads them (zero pages without
    payload); an older destination, without the capability, gets one RAW frame per run."""
    page, size = 4096, 32 * 1024 * 1024
    src = MemorySource(size)
    await src.write_at(0, os.urandom(size))
    dev = SourceDevice.stack("mem", src, page)
    rng = random.Random(7)
    pages = sorted(rng.sample(range(size // page), 3000))  # 4 MiB a frame: 3 frames
    zeroed = set(pages[::15])
    if not peer_scatters:
        monkeypatch.setattr(destination_module, "ALL_CAPS", ALL_CAPS & ~Caps.SCATTER)
    src_ch, dst_ch = await socket_pair()
    after_pause: list[int] = []  # encoding of each BLOCKS frame sent inside the pause
    send = src_ch.send

    def record(*parts: Buffer) -> None:
        head = bytes(parts[0][:11])
        if suspended and head[0] == MsgType.BLOCKS:
            after_pause.append(head[10])
        send(*parts)

    suspended = False

    async def suspend() -> None:
        nonlocal suspended
        for p in pages:
            await dev.tracker.write_at(p * page, bytes(page) if p in zeroed
                                       else rng.randbytes(page))
        suspended = True

    monkeypatch.setattr(src_ch, "send", record)
    dest = Destination(dst_ch, memory_device)
    result, dst_result = await asyncio.gather(
        Source(src_ch, [dev], SourceHooks(suspend=suspend),
               Policy(pause_send_bytes=16 << 20, verify=True)).run(),
        dest.run())
    assert result.final_dirty == len(pages) and dst_result.integrity_errors == 0
    assert await _read_all(dest.devices["mem"], size) == await _read_all(src, size)
    if peer_scatters:
        assert after_pause == [Encoding.SCATTER] * 3
    else:
        runs = len(block_runs(np.array(pages)))
        assert Encoding.SCATTER not in after_pause and len(after_pause) >= runs > 1500

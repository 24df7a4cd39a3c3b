"""Waiting cache: the destination's view of a device whose blocks are still arriving."""

from __future__ import annotations

import asyncio
import os

import pytest

from roam.storage.combinator import WriteCombinator
from roam.storage.provider import StorageError
from roam.storage.sources import MemorySource
from roam.storage.waiting import WaitingCache, block_runs

BS = 4096
N = 8
SIZE = N * BS - 100  # a short last block


class Cache:
    """A waiting cache over a memory device, recording what it asks for."""

    def __init__(self, size: int = SIZE) -> None:
        self.source = MemorySource(size)
        comb = WriteCombinator(self.source, BS)
        self.cache = WaitingCache(comb.input(1), comb.input(0), BS)
        self.needed: list[int] = []
        self.dont_need: list[int] = []
        self.cache.on_need = self.needed.extend
        self.cache.on_dont_need = self.dont_need.extend


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def _block(i: int, fill: bytes = b"") -> bytes:
    size = min(BS, SIZE - i * BS)
    return (fill or bytes([65 + i])) * size


async def test_read_of_missing_block_waits_and_asks_once() -> None:
    c = Cache()
    readers = [asyncio.create_task(c.cache.read_at(BS - 1, 2)) for _ in range(3)]
    await _settle()
    assert not any(r.done() for r in readers)
    assert c.needed == [0, 1]  # once per block, for three readers
    assert await c.cache.write_remote(0, _block(0))
    await _settle()
    assert not any(r.done() for r in readers)  # block 1 still missing
    assert await c.cache.write_remote(1, _block(1))
    for r in readers:
        assert bytes(await r) == b"AB"
    assert c.needed == [0, 1]
    assert bytes(await c.cache.read_at(0, 2)) == b"AA"  # present: no wait, no ask
    assert c.needed == [0, 1]


async def test_whole_block_local_write_marks_present() -> None:
    c = Cache()
    data = os.urandom(2 * BS)
    await c.cache.write_at(2 * BS, data)  # blocks 2 and 3, whole: no wait
    assert c.needed == []
    assert c.dont_need == [2, 3]
    assert c.cache.is_present(2) and c.cache.is_present(3)
    assert bytes(await c.cache.read_at(2 * BS, 2 * BS)) == data
    # The remote copy arrives late: the VM's write wins.
    assert not await c.cache.write_remote(2, _block(2))
    assert bytes(await c.cache.read_at(2 * BS, 2 * BS)) == data
    # The last, short block counts as whole when written to its end.
    await c.cache.write_at((N - 1) * BS, b"z" * (SIZE - (N - 1) * BS))
    assert c.dont_need == [2, 3, N - 1]


async def test_partial_local_write_waits_for_the_block() -> None:
    c = Cache()
    writer = asyncio.create_task(c.cache.write_at(BS + 10, b"vm"))
    await _settle()
    assert not writer.done()
    assert c.needed == [1]
    await c.cache.write_remote(1, _block(1))
    await writer
    want = bytearray(_block(1))
    want[10:12] = b"vm"
    assert bytes(await c.cache.read_at(BS, BS)) == bytes(want)
    assert c.dont_need == []  # the block came from the source
    # A later remote copy must not undo the VM's merge.
    assert not await c.cache.write_remote(1, _block(1, b"R"))
    assert bytes(await c.cache.read_at(BS, BS)) == bytes(want)


async def test_mark_absent_makes_reads_wait_again() -> None:
    c = Cache()
    await c.cache.write_remote(4, _block(4))
    assert bytes(await c.cache.read_at(4 * BS, 1)) == b"E"
    c.cache.mark_absent([4])
    assert not c.cache.is_present(4)
    reader = asyncio.create_task(c.cache.read_at(4 * BS, 1))
    await _settle()
    assert not reader.done()
    assert c.needed == [4]  # asked again, since the old request was answered
    await c.cache.write_remote(4, _block(4, b"e"))
    assert bytes(await reader) == b"e"


async def test_mark_absent_while_woken_reader_is_pending_asks_again() -> None:
    c = Cache()
    reader = asyncio.create_task(c.cache.read_at(0, 1))
    await _settle()
    assert c.needed == [0]
    await c.cache.write_remote(0, _block(0))  # wakes the reader...
    c.cache.mark_absent([0])  # ...but before it runs, the source changed the block
    await _settle()
    assert not reader.done()
    assert c.needed == [0, 0]  # the reader asks for the new copy instead of hanging
    await c.cache.write_remote(0, _block(0, b"n"))
    assert bytes(await reader) == b"n"


async def test_mark_absent_ignores_local_blocks() -> None:
    c = Cache()
    await c.cache.write_at(0, b"L" * BS)
    c.cache.mark_absent([0])
    assert c.cache.is_present(0)
    assert bytes(await c.cache.read_at(0, 1)) == b"L"


async def test_fail_wakes_waiters_with_storage_error() -> None:
    c = Cache()
    await c.cache.write_remote(0, _block(0))
    readers = [asyncio.create_task(c.cache.read_at(BS * i, 1)) for i in (1, 2)]
    writer = asyncio.create_task(c.cache.write_at(3 * BS + 1, b"x"))
    completer = asyncio.create_task(c.cache.wait_complete())
    await _settle()
    c.cache.fail(ConnectionError("source gone"))
    for task in [*readers, writer, completer]:
        with pytest.raises(StorageError, match="source gone"):
            await task
    with pytest.raises(StorageError, match="not available"):
        await c.cache.read_at(5 * BS, 1)  # future reads of missing blocks fail at once
    assert bytes(await c.cache.read_at(0, 1)) == b"A"  # present blocks still read


async def test_wait_complete() -> None:
    c = Cache()
    done = asyncio.create_task(c.cache.wait_complete())
    for i in range(N - 1):
        await c.cache.write_remote(i, _block(i))
    await _settle()
    assert not done.done()
    assert c.cache.missing() == [N - 1]
    assert c.cache.present_count == N - 1
    c.cache.mark_present([N - 1])  # e.g. verified by content hash
    await done
    assert c.cache.missing() == []
    c.cache.mark_absent([3])
    again = asyncio.create_task(c.cache.wait_complete())
    await _settle()
    assert not again.done()
    await c.cache.write_remote(3, _block(3))
    await again


async def test_present_from_the_start_and_bad_priorities() -> None:
    source = MemorySource(SIZE)
    comb = WriteCombinator(source, BS)
    cache = WaitingCache(comb.input(1), comb.input(0), BS, present=True)
    await cache.wait_complete()
    assert bytes(await cache.read_at(0, 3)) == bytes(3)
    with pytest.raises(ValueError):
        WaitingCache(comb.input(0), comb.input(1), BS)
    with pytest.raises(StorageError):
        await cache.read_at(SIZE, 1)


async def test_close_fails_waiters() -> None:
    c = Cache()
    reader = asyncio.create_task(c.cache.read_at(0, 1))
    await _settle()
    await c.cache.close()
    with pytest.raises(StorageError, match="closed"):
        await reader


async def test_observers_hear_of_remote_data_and_stale_blocks() -> None:
    """What a page cache above the device needs: where new data landed, what turned
    stale (only blocks that were present and not the VM's own)."""
    c = Cache()
    arrived: list[tuple[int, bytes]] = []
    stale: list[list[int]] = []
    c.cache.on_arrived = lambda offset, data: arrived.append((offset, bytes(data)))
    c.cache.on_stale = stale.append
    await c.cache.write_remote(1, _block(1) + _block(2))
    assert arrived == [(BS, _block(1) + _block(2))]
    await c.cache.write_at(3 * BS, b"L" * BS)  # the VM's own block: never stale
    c.cache.mark_absent([1, 3, 5])  # 5 never arrived
    assert stale == [[1]]
    assert await c.cache.write_remote(3, _block(3)) is False  # kept local: not announced
    assert len(arrived) == 1
    assert block_runs([7, 1, 2, 4, 5, 6]) == [(1, 2), (4, 4)]

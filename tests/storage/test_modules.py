"""Modules stacked on a source: dirty tracker, volatility monitor, gate, metrics,
write combinator."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from roam.storage.combinator import WriteCombinator
from roam.storage.dirty import DirtyTracker
from roam.storage.gate import Gate
from roam.storage.metrics import Metrics
from roam.storage.provider import StorageError
from roam.storage.sources import MemorySource
from roam.storage.volatility import VolatilityMonitor

BS = 4096


# -- dirty tracker ---------------------------------------------------------------------


async def test_each_reader_sees_every_change_after_its_own_read() -> None:
    """A migration (the tracker's own view) and a sync (a watched view) read at their own
    pace: each hears of every write after its own read, and taking one's dirty set
    leaves the other's."""
    dev = DirtyTracker(MemorySource(8 * BS), BS)
    sync = dev.watch()
    await dev.read_tracked(0, 4 * BS)  # the migration read blocks 0-3
    await sync.read_tracked(2 * BS, 6 * BS)  # the sync read blocks 2-7
    await dev.write_at(BS, b"y" * (5 * BS))  # blocks 1-5
    assert dev.sync() == [1, 2, 3]
    assert sync.take_dirty().tolist() == [2, 3, 4, 5]
    # Blocks a reader knows by other means (a store holds them) are tracked unread.
    offered = np.zeros(8, dtype=np.bool_)
    offered[6:] = True
    dev.view.track(offered)
    await dev.write_at(7 * BS, b"z")
    assert dev.sync() == [7] and sync.dirty_mask().tolist() == [False] * 7 + [True]
    sync.mark_dirty(np.array([2]))  # its upload failed: report it again
    assert sync.take_dirty().tolist() == [2, 7]
    sync.close()  # stops tracking: writes no longer reach it
    await dev.write_at(2 * BS, b"w")
    assert sync.dirty_count() == 0 and dev.sync() == [2]


async def test_dirty_only_tracked_blocks_become_dirty() -> None:
    dev = DirtyTracker(MemorySource(10 * BS), BS)
    await dev.write_at(0, b"x" * (10 * BS))  # nothing tracked yet: nothing to report
    assert dev.sync() == []
    await dev.read_tracked(2 * BS, 2 * BS)  # tracks blocks 2, 3
    await dev.read_at(5 * BS, BS)  # a plain read tracks nothing
    for block in (1, 2, 3, 5, 9):
        await dev.write_at(block * BS + 10, b"y")
    assert dev.dirty_count() == 2
    assert dev.sync() == [2, 3]
    assert dev.sync() == []  # sync clears


async def test_dirty_write_spanning_blocks_and_sorted_sync() -> None:
    dev = DirtyTracker(MemorySource(10 * BS + 100), BS)
    await dev.read_tracked(0, dev.size())
    await dev.write_at(7 * BS - 1, b"ab")  # blocks 6 and 7
    await dev.write_at(10 * BS + 50, b"tail")  # the short last block
    await dev.write_at(BS, b"")  # an empty write touches nothing
    await dev.write_at(3 * BS - 1, b"x" * (BS + 2))  # blocks 2, 3, 4
    assert dev.sync() == [2, 3, 4, 6, 7, 10]
    # Repeated writes to a dirty block report it once.
    await dev.write_at(5, b"1")
    await dev.write_at(6, b"2")
    assert dev.sync() == [0]


async def test_dirty_read_tracked_unaligned_and_data() -> None:
    src = MemorySource(4 * BS)
    dev = DirtyTracker(src, BS)
    data = os.urandom(4 * BS)
    await dev.write_at(0, data)
    assert bytes(await dev.read_tracked(BS - 1, 2)) == data[BS - 1 : BS + 1]  # 0 and 1
    await dev.write_at(0, b"z")
    await dev.write_at(BS, b"z")
    await dev.write_at(2 * BS, b"z")
    assert dev.sync() == [0, 1]


async def test_dirty_bad_ranges_raise_storage_error() -> None:
    dev = DirtyTracker(MemorySource(2 * BS), BS)
    for offset, length in [(2 * BS, 1), (-BS, 10), (BS, BS + 1)]:
        with pytest.raises(StorageError):
            await dev.read_tracked(offset, length)
    with pytest.raises(StorageError):
        await dev.write_at(2 * BS - 1, b"xx")
    await dev.write_at(0, b"x" * (2 * BS))
    assert dev.sync() == []  # failed calls tracked nothing


async def test_dirty_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError):
        DirtyTracker(MemorySource(BS), 1000)
    with pytest.raises(ValueError):
        DirtyTracker(MemorySource(BS), 2048)


# -- volatility monitor ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_volatility_orders_least_written_first() -> None:
    clock = Clock()
    dev = VolatilityMonitor(MemorySource(8 * BS), BS, clock=clock)
    for block, times in [(3, 5), (1, 2), (6, 1)]:
        for _ in range(times):
            await dev.write_at(block * BS, b"x")
    assert dev.order(range(8)) == [0, 2, 4, 5, 7, 6, 1, 3]  # ties keep their order
    assert dev.order([3, 1]) == [1, 3]
    await dev.write_at(4 * BS - 1, b"ab")  # spans 3 and 4
    assert dev.volatility(3) == 6 and dev.volatility(4) == 1


async def test_volatility_decays_with_injected_clock() -> None:
    clock = Clock()
    dev = VolatilityMonitor(MemorySource(4 * BS), BS, half_life=5.0, clock=clock)
    for _ in range(8):
        await dev.write_at(0, b"x")
    await dev.write_at(BS, b"x")
    clock.now += 4.9
    assert dev.volatility(0) == 8  # less than one half-life: no decay
    clock.now += 0.2
    assert dev.volatility(0) == 4
    clock.now += 10
    assert dev.volatility(0) == 1
    assert dev.volatility(1) == 0.125
    clock.now += 10
    assert dev.volatility(1) == 0  # 1/32: below the threshold, forgotten
    assert dev.volatility(0) == 0.25
    # A block written now is more volatile than one whose burst was long ago.
    for _ in range(2):
        await dev.write_at(2 * BS, b"x")
    assert dev.order([2, 0, 3]) == [3, 0, 2]  # 0 has a quarter write left
    clock.now += 100
    assert dev.order([2, 0, 3]) == [2, 0, 3]  # all forgotten: original order


async def test_volatility_passes_data_through() -> None:
    src = MemorySource(2 * BS)
    dev = VolatilityMonitor(src, BS)
    await dev.write_at(10, b"hello")
    assert bytes(await dev.read_at(10, 5)) == b"hello"
    assert bytes(await src.read_at(10, 5)) == b"hello"
    with pytest.raises(StorageError):
        await dev.write_at(2 * BS, b"x")
    assert dev.volatility(2) == 0


# -- gate ------------------------------------------------------------------------------


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_gate_writes_wait_while_locked() -> None:
    src = MemorySource(BS)
    gate = Gate(src)
    await gate.lock()
    assert gate.locked
    writer = asyncio.create_task(gate.write_at(0, b"w"))
    await _settle()
    assert not writer.done()
    assert bytes(await src.read_at(0, 1)) == b"\0"
    assert bytes(await gate.read_at(0, 1)) == b"\0"  # reads pass a write-only lock
    gate.unlock()
    await writer
    assert bytes(await src.read_at(0, 1)) == b"w"


async def test_gate_lock_waits_for_in_flight_writes() -> None:
    inner_gate = Gate(MemorySource(BS))  # a provider whose writes we can hold up
    gate = Gate(inner_gate)
    await inner_gate.lock()
    writer = asyncio.create_task(gate.write_at(0, b"w"))  # passes gate, stuck below
    await _settle()
    locker = asyncio.create_task(gate.lock())
    await _settle()
    assert not locker.done()  # a write is still in flight
    inner_gate.unlock()
    await writer
    await locker
    assert gate.locked
    late = asyncio.create_task(gate.write_at(1, b"l"))
    await _settle()
    assert not late.done()
    gate.unlock()
    await late
    assert bytes(await gate.read_at(0, 2)) == b"wl"


async def test_gate_reads_blocked_only_with_reads_true() -> None:
    gate = Gate(MemorySource(BS))
    await gate.lock(reads=True)
    reader = asyncio.create_task(gate.read_at(0, 4))
    await _settle()
    assert not reader.done()
    gate.unlock()
    assert bytes(await reader) == bytes(4)
    await gate.lock()  # writes only, this time
    assert bytes(await gate.read_at(0, 4)) == bytes(4)
    gate.unlock()


async def test_gate_closed_again_before_waiting_writer_runs() -> None:
    """unlock then lock in one go: the woken writer must not slip through."""
    src = MemorySource(BS)
    gate = Gate(src)
    await gate.lock(reads=True)
    writer = asyncio.create_task(gate.write_at(0, b"w"))
    reader = asyncio.create_task(gate.read_at(0, 1))
    await _settle()
    gate.unlock()
    await gate.lock(reads=True)  # returns at once: nothing is in flight
    await _settle()
    assert not writer.done() and not reader.done()
    assert bytes(await src.read_at(0, 1)) == b"\0"
    gate.unlock()
    await writer
    assert bytes(await reader) in (b"\0", b"w")
    assert bytes(await src.read_at(0, 1)) == b"w"


async def test_gate_close_releases_waiters() -> None:
    gate = Gate(MemorySource(BS))
    await gate.lock()
    writer = asyncio.create_task(gate.write_at(0, b"w"))
    await _settle()
    await gate.close()
    await writer


# -- metrics ---------------------------------------------------------------------------


async def test_metrics_counts_ops_and_bytes() -> None:
    dev = Metrics(MemorySource(4 * BS))
    await dev.write_at(0, b"x" * 1000)
    await dev.write_at(BS - 1, b"y" * 3)
    assert bytes(await dev.read_at(BS - 1, 3)) == b"yyy"
    await dev.read_at(0, 0)
    await dev.flush()
    snap = dev.snapshot()
    assert snap["writes"]["ops"] == 2 and snap["writes"]["bytes"] == 1003
    assert snap["reads"]["ops"] == 2 and snap["reads"]["bytes"] == 3
    assert snap["flushes"]["ops"] == 1
    for kind in ("reads", "writes", "flushes"):
        assert snap[kind]["seconds"] >= 0
        assert snap[kind]["max_seconds"] <= snap[kind]["seconds"]
    with pytest.raises(StorageError):
        await dev.write_at(4 * BS, b"x")
    assert dev.snapshot()["writes"]["ops"] == 2  # failed operations are not counted


# -- write combinator ------------------------------------------------------------------


async def test_combinator_lower_priority_never_overwrites_higher() -> None:
    comb = WriteCombinator(MemorySource(4 * BS), BS)
    low, high = comb.input(0), comb.input(5)
    assert await low.write_checked(0, b"L" * (4 * BS))
    assert comb.owner(0) == 0
    await high.write_at(BS + 10, b"H" * 10)  # partial write: the whole block is high's
    assert comb.owner(1) == 5
    assert not await low.write_checked(0, b"l" * (4 * BS))  # block 1 kept
    got = bytes(await low.read_at(0, 4 * BS))
    want = bytearray(b"l" * (4 * BS))
    want[BS : 2 * BS] = b"L" * BS
    want[BS + 10 : BS + 20] = b"H" * 10
    assert got == bytes(want)
    # The same priority overwrites; a higher one too.
    assert await high.write_checked(BS, b"h")
    assert await comb.input(9).write_checked(BS, b"9")
    assert not await high.write_checked(BS, b"h")
    assert bytes(await high.read_at(BS, 1)) == b"9"


async def test_combinator_partial_overlap_writes_only_free_parts() -> None:
    comb = WriteCombinator(MemorySource(3 * BS + 100), BS)
    low, high = comb.input(1), comb.input(2)
    await high.write_at(BS, b"H" * BS)  # block 1
    data = os.urandom(3 * BS + 100 - 50)
    assert not await low.write_checked(50, data)  # spans 0..3, block 1 owned by high
    got = bytes(await low.read_at(0, comb.size()))
    assert got[:50] == bytes(50)
    assert got[50:BS] == data[: BS - 50]
    assert got[BS : 2 * BS] == b"H" * BS
    assert got[2 * BS :] == data[2 * BS - 50 :]
    assert [comb.owner(b) for b in range(4)] == [1, 2, 1, 1]


async def test_combinator_bad_input() -> None:
    comb = WriteCombinator(MemorySource(BS), BS)
    with pytest.raises(ValueError):
        comb.input(-1)
    with pytest.raises(StorageError):
        await comb.input(0).write_at(BS, b"x")
    assert comb.owner(0) == -1

"""Waiting cache: on a destination, a read of a block that has not arrived waits for it.

The first read (or partial write) of a missing block asks the source for it once, with
priority, through `on_need`. Blocks arrive through `write_remote`; the VM writes through
`write_at`. Remote and local writes go to two inputs of a write combinator, so a block
that the VM wrote after the handover is never overwritten by a late remote copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import numpy as np

from roam.storage.bitmap import Blocks
from roam.storage.combinator import CombinatorInput
from roam.storage.provider import (
    Buffer,
    StorageError,
    block_count,
    blocks_spanning,
    check_range,
)


def block_runs(blocks: list[int]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive block numbers, in order."""
    runs: list[tuple[int, int]] = []
    for block in sorted(blocks):
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


class WaitingCache:
    """Per-block state (present, written here, asked for) is kept in boolean arrays and
    updated a run at a time: a run of 1024 memory pages from the source is one array
    operation, not 1024 Python steps."""

    def __init__(self, local: CombinatorInput, remote: CombinatorInput, block_size: int,
                 *, present: bool = False) -> None:
        if local.priority <= remote.priority:
            raise ValueError("local writes must have a higher priority than remote ones")
        self.local = local
        self.remote = remote
        self.block_size = block_size
        self.nblocks = block_count(local.size(), block_size)
        self._present = np.full(self.nblocks, present, dtype=np.bool_)
        self._present_count = self.nblocks if present else 0
        self._local_written = np.zeros(self.nblocks, dtype=np.bool_)
        self._requested = np.zeros(self.nblocks, dtype=np.bool_)
        self._waiters: dict[int, asyncio.Event] = {}
        self._complete = asyncio.Event()
        if self._present_count == self.nblocks:
            self._complete.set()
        self._error: BaseException | None = None
        self.on_need: Callable[[list[int]], None] | None = None
        self.on_dont_need: Callable[[list[int]], None] | None = None
        # For whoever caches what readers saw (a page cache above this device): new data
        # from the source at a byte offset, and blocks that turned stale.
        self.on_arrived: Callable[[int, Buffer], None] | None = None
        self.on_stale: Callable[[list[int]], None] | None = None

    def size(self) -> int:
        return self.local.size()

    # -- the device as the VM sees it -------------------------------------------------

    async def read_at(self, offset: int, length: int) -> Buffer:
        check_range(self, offset, length)
        await self._wait_for(blocks_spanning(offset, length, self.block_size))
        return await self.local.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        check_range(self, offset, len(data))
        if not len(data):
            await self.local.write_at(offset, data)
            return
        bs = self.block_size
        end = offset + len(data)
        span = blocks_spanning(offset, len(data), bs)
        # Blocks the write covers whole; the (at most two) others are partial.
        first_whole = -(-offset // bs)
        end_whole = self.nblocks if end == self.size() else end // bs
        whole = range(first_whole, max(first_whole, end_whole))
        partial = [b for b in (span.start, span.stop - 1) if b not in whole]
        # A partial write merges with the block's remote content, so that must be here.
        await self._wait_for(sorted(set(partial)))
        await self.local.write_at(offset, data)
        newly = np.flatnonzero(~self._present[whole.start : whole.stop]) + whole.start
        self._local_written[span.start : span.stop] = True
        self._mark_present(newly)
        if len(newly) and self.on_dont_need is not None:
            self.on_dont_need(newly.tolist())

    async def flush(self) -> None:
        await self.local.flush()

    async def close(self) -> None:
        self.fail(StorageError("device closed"))
        await self.local.close()

    # -- the migration side ------------------------------------------------------------

    async def write_remote(self, block: int, data: Buffer,
                           via: CombinatorInput | None = None) -> bool:
        """Store blocks from the source, from `block` on (data may span several: one
        write for a run). False if the VM's own writes kept any of them. `via`: another
        remote input than the source's (an object store, below the source)."""
        bs = self.block_size
        end = block + (len(data) + bs - 1) // bs
        if self._local_written[block:end].any():
            if end - block > 1:  # rare: split so the VM's blocks are skipped one by one
                view = memoryview(data)
                results = [await self.write_remote(b, view[(b - block) * bs :
                                                            (b - block + 1) * bs], via)
                           for b in range(block, end)]
                return all(results)
            return False
        accepted = await (via or self.remote).write_checked(block * bs, data)
        self._mark_range(block, end)
        if accepted and self.on_arrived is not None:
            self.on_arrived(block * bs, data)
        return accepted

    async def write_remote_blocks(self, blocks: Blocks, data: Buffer) -> int:
        """Store blocks from the source that are not consecutive: `blocks` ascending,
        `data` their contents concatenated (the device's last block may be short). One
        write per block below, but the present map is updated once for all of them.
        Returns how many were accepted (the VM's own writes keep the others)."""
        bs = self.block_size
        view = memoryview(data).cast("B")
        keep = ~self._local_written[blocks]
        accepted = 0
        for i in np.flatnonzero(keep).tolist():
            block = int(blocks[i])
            part = view[i * bs : (i + 1) * bs]
            if await self.remote.write_checked(block * bs, part):
                accepted += 1
                if self.on_arrived is not None:
                    self.on_arrived(block * bs, part)
        self._mark_present(blocks[keep])
        return accepted

    def mark_absent(self, blocks: Iterable[int] | Blocks) -> None:
        """The source changed these blocks: reads wait until the new copy arrives."""
        wanted = np.unique(np.asarray(blocks if isinstance(blocks, np.ndarray)
                                      else list(blocks), dtype=np.int64))
        stale = wanted[self._present[wanted] & ~self._local_written[wanted]]
        self._present[stale] = False
        self._requested[stale] = False
        self._present_count -= len(stale)
        if self._present_count < self.nblocks:
            self._complete.clear()
        if len(stale) and self.on_stale is not None:
            self.on_stale(stale.tolist())

    def mark_present(self, blocks: Iterable[int] | Blocks) -> None:
        """These blocks are already right locally (verified by content hash)."""
        self._mark_present(np.asarray(blocks if isinstance(blocks, np.ndarray)
                                      else list(blocks), dtype=np.int64))

    def mark_range_present(self, first: int, count: int) -> None:
        """`mark_present` for the run of `count` blocks from `first`."""
        self._mark_range(first, first + count)

    def present_mask(self) -> np.ndarray:
        """Which blocks are present, as a read-only view (valid until the next await)."""
        view = self._present.view()
        view.flags.writeable = False
        return view

    def is_present(self, block: int) -> bool:
        return bool(self._present[block])

    def missing(self) -> list[int]:
        missing: list[int] = np.flatnonzero(~self._present).tolist()
        return missing

    @property
    def present_count(self) -> int:
        return self._present_count

    async def wait_complete(self) -> None:
        await self._complete.wait()
        if self._error is not None:
            raise StorageError(str(self._error)) from self._error

    def fail(self, error: BaseException) -> None:
        """The source is gone: every waiting and future read of a missing block fails."""
        if self._error is None:
            self._error = error
        for event in self._waiters.values():
            event.set()
        self._waiters.clear()
        self._complete.set()

    # -- internals ---------------------------------------------------------------------

    def _mark_range(self, lo: int, hi: int) -> None:
        present = self._present[lo:hi]
        if present.all():
            return
        self._mark_present(np.flatnonzero(~present) + lo)

    def _mark_present(self, blocks: Blocks) -> None:
        newly = np.unique(blocks[~self._present[blocks]])
        if not len(newly):
            return
        self._present[newly] = True
        self._present_count += len(newly)
        if self._waiters:
            for b in newly.tolist():
                event = self._waiters.pop(b, None)
                if event is not None:
                    event.set()
        if self._present_count == self.nblocks:
            self._complete.set()

    async def _wait_for(self, blocks: range | list[int]) -> None:
        if isinstance(blocks, range):
            absent = np.flatnonzero(~self._present[blocks.start : blocks.stop]) + blocks.start
        else:
            absent = np.asarray(blocks, dtype=np.int64)
            absent = absent[~self._present[absent]]
        if not len(absent):
            return
        missing: list[int] = absent.tolist()
        if self._error is not None:
            raise StorageError(f"block {missing[0]} is not available: {self._error}")
        ask = [b for b in missing if not self._requested[b]]
        self._requested[ask] = True
        if ask and self.on_need is not None:
            self.on_need(ask)
        for b in missing:
            while not self._present[b]:
                if not self._requested[b]:  # it arrived, then was marked absent again
                    self._requested[b] = True
                    if self.on_need is not None:
                        self.on_need([b])
                event = self._waiters.get(b)
                if event is None:
                    event = self._waiters[b] = asyncio.Event()
                await event.wait()
                if self._error is not None and not self._present[b]:
                    raise StorageError(f"block {b} is not available: {self._error}")

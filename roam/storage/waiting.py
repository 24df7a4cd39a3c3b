"""Waiting cache: on a destination, a read of a block that has not arrived waits for it.

The first read (or partial write) of a missing block asks the source for it once, with
priority, through `on_need`. Blocks arrive through `write_remote`; the VM writes through
`write_at`. Remote and local writes go to two inputs of a write combinator, so a block
that the VM wrote after the handover is never overwritten by a late remote copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

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
    def __init__(self, local: CombinatorInput, remote: CombinatorInput, block_size: int,
                 *, present: bool = False) -> None:
        if local.priority <= remote.priority:
            raise ValueError("local writes must have a higher priority than remote ones")
        self.local = local
        self.remote = remote
        self.block_size = block_size
        self.nblocks = block_count(local.size(), block_size)
        self._present = bytearray(b"\x01" * self.nblocks if present else self.nblocks)
        self._present_count = self.nblocks if present else 0
        self._local_written = bytearray(self.nblocks)
        self._requested = bytearray(self.nblocks)
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
        bs = self.block_size
        end = offset + len(data)
        whole: list[int] = []
        partial: list[int] = []
        for b in blocks_spanning(offset, len(data), bs):
            if offset <= b * bs and end >= min((b + 1) * bs, self.size()):
                whole.append(b)
            else:
                partial.append(b)
        # A partial write merges with the block's remote content, so that must be here.
        await self._wait_for(partial)
        await self.local.write_at(offset, data)
        newly: list[int] = []
        for b in whole:
            if not self._present[b]:
                newly.append(b)
            self._local_written[b] = 1
        for b in partial:
            self._local_written[b] = 1
        self._mark_present(newly)
        if newly and self.on_dont_need is not None:
            self.on_dont_need(newly)

    async def flush(self) -> None:
        await self.local.flush()

    async def close(self) -> None:
        self.fail(StorageError("device closed"))
        await self.local.close()

    # -- the migration side ------------------------------------------------------------

    async def write_remote(self, block: int, data: Buffer) -> bool:
        """Store blocks from the source, from `block` on (data may span several: one
        write for a run). False if the VM's own writes kept any of them."""
        blocks = range(block, block + (len(data) + self.block_size - 1) // self.block_size)
        if any(self._local_written[b] for b in blocks):
            if len(blocks) > 1:  # rare: split so the VM's blocks are skipped one by one
                view = memoryview(data)
                results = [await self.write_remote(b, view[i * self.block_size :
                                                            (i + 1) * self.block_size])
                           for i, b in enumerate(blocks)]
                return all(results)
            return False
        accepted = await self.remote.write_checked(block * self.block_size, data)
        self._mark_present(blocks)
        if accepted and self.on_arrived is not None:
            self.on_arrived(block * self.block_size, data)
        return accepted

    def mark_absent(self, blocks: Iterable[int]) -> None:
        """The source changed these blocks: reads wait until the new copy arrives."""
        stale = []
        for b in blocks:
            if self._local_written[b] or not self._present[b]:
                continue
            self._present[b] = 0
            self._requested[b] = 0
            self._present_count -= 1
            stale.append(b)
        if self._present_count < self.nblocks:
            self._complete.clear()
        if stale and self.on_stale is not None:
            self.on_stale(stale)

    def mark_present(self, blocks: Iterable[int]) -> None:
        """These blocks are already right locally (verified by content hash)."""
        self._mark_present(blocks)

    def is_present(self, block: int) -> bool:
        return bool(self._present[block])

    def missing(self) -> list[int]:
        return [b for b in range(self.nblocks) if not self._present[b]]

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

    def _mark_present(self, blocks: Iterable[int]) -> None:
        present = self._present
        for b in blocks:
            if not present[b]:
                present[b] = 1
                self._present_count += 1
                event = self._waiters.pop(b, None)
                if event is not None:
                    event.set()
        if self._present_count == self.nblocks:
            self._complete.set()

    async def _wait_for(self, blocks: Iterable[int]) -> None:
        missing = [b for b in blocks if not self._present[b]]
        if not missing:
            return
        if self._error is not None:
            raise StorageError(f"block {missing[0]} is not available: {self._error}")
        ask = [b for b in missing if not self._requested[b]]
        for b in ask:
            self._requested[b] = 1
        if ask and self.on_need is not None:
            self.on_need(ask)
        for b in missing:
            while not self._present[b]:
                if not self._requested[b]:  # it arrived, then was marked absent again
                    self._requested[b] = 1
                    if self.on_need is not None:
                        self.on_need([b])
                event = self._waiters.get(b)
                if event is None:
                    event = self._waiters[b] = asyncio.Event()
                await event.wait()
                if self._error is not None and not self._present[b]:
                    raise StorageError(f"block {b} is not available: {self._error}")

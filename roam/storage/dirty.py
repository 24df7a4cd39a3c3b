"""Dirty tracker: which blocks changed since the migrator last read them."""

from __future__ import annotations

from roam.storage.provider import (
    Buffer,
    Provider,
    blocks_spanning,
    check_block_size,
    check_range,
)


class DirtyTracker:
    """Tracks writes to blocks that the migrator has already read.

    A block becomes *tracked* when the migrator reads it with `read_tracked`; from then on
    a write to it marks it dirty. `sync` hands the dirty set over and clears it, so each
    change is reported exactly once. Writes to untracked blocks need no report: the
    migrator has not sent them yet and will read the new data when it does.
    """

    def __init__(self, inner: Provider, block_size: int) -> None:
        check_block_size(block_size)
        self.inner = inner
        self.block_size = block_size
        nblocks = (inner.size() + block_size - 1) // block_size
        self._tracked = bytearray(nblocks)
        self._dirty: set[int] = set()

    def size(self) -> int:
        return self.inner.size()

    async def read_at(self, offset: int, length: int) -> Buffer:
        return await self.inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        await self.inner.write_at(offset, data)
        # Mark after the write lands: a migrator reading in between sees the new data
        # and the block is still reported, which is safe (sent twice, never stale).
        tracked = self._tracked
        for block in blocks_spanning(offset, len(data), self.block_size):
            if tracked[block]:
                self._dirty.add(block)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()

    async def read_tracked(self, offset: int, length: int) -> Buffer:
        """Read for migration: the blocks read are tracked from now on."""
        check_range(self, offset, length)
        for block in blocks_spanning(offset, length, self.block_size):
            self._tracked[block] = 1
        return await self.inner.read_at(offset, length)

    def sync(self) -> list[int]:
        """Return the dirty blocks (ascending) and start a new dirty set."""
        dirty = sorted(self._dirty)
        self._dirty = set()
        return dirty

    def dirty_count(self) -> int:
        return len(self._dirty)

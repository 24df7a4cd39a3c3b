"""Dirty tracker: which blocks changed since the migrator last read them."""

from __future__ import annotations

import numpy as np

from roam.storage.bitmap import Blocks
from roam.storage.provider import (
    Buffer,
    Provider,
    block_count,
    check_block_size,
    check_range,
)


class DirtyTracker:
    """Tracks writes to blocks that the migrator has already read.

    A block becomes *tracked* when the migrator reads it with `read_tracked`; from then on
    a write to it marks it dirty. `sync` hands the dirty set over and clears it, so each
    change is reported exactly once. Writes to untracked blocks need no report: the
    migrator has not sent them yet and will read the new data when it does.

    Both sets are boolean arrays: a 1 MiB write to guest memory spans 256 blocks of
    4 KiB, and marking them is one array operation, not 256 Python steps.
    """

    def __init__(self, inner: Provider, block_size: int) -> None:
        check_block_size(block_size)
        self.inner = inner
        self.block_size = block_size
        nblocks = block_count(inner.size(), block_size)
        self._tracked = np.zeros(nblocks, dtype=np.bool_)
        self._dirty = np.zeros(nblocks, dtype=np.bool_)

    def size(self) -> int:
        return self.inner.size()

    async def read_at(self, offset: int, length: int) -> Buffer:
        return await self.inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        await self.inner.write_at(offset, data)
        # Mark after the write lands: a migrator reading in between sees the new data
        # and the block is still reported, which is safe (sent twice, never stale).
        if len(data):
            lo, hi = offset // self.block_size, (offset + len(data) - 1) // self.block_size + 1
            self._dirty[lo:hi] |= self._tracked[lo:hi]

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()

    async def read_tracked(self, offset: int, length: int) -> Buffer:
        """Read for migration: the blocks read are tracked from now on."""
        check_range(self, offset, length)
        if length:
            self._tracked[offset // self.block_size :
                          (offset + length - 1) // self.block_size + 1] = True
        return await self.inner.read_at(offset, length)

    def take_dirty(self) -> Blocks:
        """The dirty blocks (ascending, as an array) and start a new dirty set."""
        dirty = np.flatnonzero(self._dirty)
        self._dirty[dirty] = False
        return dirty

    def sync(self) -> list[int]:
        """Return the dirty blocks (ascending) and start a new dirty set."""
        dirty: list[int] = self.take_dirty().tolist()
        return dirty

    def dirty_count(self) -> int:
        return int(np.count_nonzero(self._dirty))

"""Write combinator: several writers share one device; a higher priority always wins.

On a migration destination the local VM writes with high priority and blocks arriving
from the source with low priority: a late remote block never overwrites what the VM
wrote after the handover.
"""

from __future__ import annotations

import numpy as np

from roam.storage.bitmap import runs
from roam.storage.provider import (
    Buffer,
    Provider,
    block_count,
    blocks_spanning,
    check_block_size,
    check_range,
)


class WriteCombinator:
    def __init__(self, inner: Provider, block_size: int) -> None:
        check_block_size(block_size)
        self.inner = inner
        self.block_size = block_size
        # Owner priority + 1 per block (0: nobody wrote it), one byte per block; checked
        # and set a whole write's range at a time.
        self._owner = np.zeros(block_count(inner.size(), block_size), dtype=np.uint8)

    def size(self) -> int:
        return self.inner.size()

    def input(self, priority: int) -> CombinatorInput:
        if not 0 <= priority < 255:
            raise ValueError("priority must be in 0..254")
        return CombinatorInput(self, priority)

    def owner(self, block: int) -> int:
        """Highest priority that wrote the block, or -1."""
        return int(self._owner[block]) - 1

    async def _write(self, priority: int, offset: int, data: Buffer) -> bool:
        """Write the parts of data whose blocks no higher priority owns. True if all."""
        check_range(self, offset, len(data))
        bs = self.block_size
        owner = self._owner
        rank = priority + 1
        blocks = blocks_spanning(offset, len(data), bs)
        mine = owner[blocks.start : blocks.stop]
        if not (mine > rank).any():
            mine[:] = rank
            await self.inner.write_at(offset, data)
            return True
        view = memoryview(data)
        end = offset + len(data)
        for first, count in runs(mine <= rank):  # the runs of blocks this writer may write
            mine[first : first + count] = rank
            lo = max(offset, (blocks.start + first) * bs)
            hi = min(end, (blocks.start + first + count) * bs)
            await self.inner.write_at(lo, view[lo - offset : hi - offset])
        return False


class CombinatorInput:
    """One writer's view of the combined device; reads see the combined result."""

    def __init__(self, combinator: WriteCombinator, priority: int) -> None:
        self.combinator = combinator
        self.priority = priority

    def size(self) -> int:
        return self.combinator.size()

    async def read_at(self, offset: int, length: int) -> Buffer:
        return await self.combinator.inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        await self.combinator._write(self.priority, offset, data)

    async def write_checked(self, offset: int, data: Buffer) -> bool:
        """Like write_at; returns False if a higher priority kept any block."""
        return await self.combinator._write(self.priority, offset, data)

    async def flush(self) -> None:
        await self.combinator.inner.flush()

    async def close(self) -> None:
        await self.combinator.inner.close()

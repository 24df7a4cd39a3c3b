"""Volatility monitor: counts recent writes per block so migration sends calm blocks first.

Blocks that are written often will probably be written again; sending them early is
wasted bandwidth. Counts halve every `half_life` seconds, so old bursts are forgotten.
The counts are one float32 array (4 bytes a block): a write adds to a slice of it and
ordering a million blocks is one stable argsort, with no Python step per block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from roam.storage.bitmap import Blocks
from roam.storage.provider import Buffer, Provider, block_count

FORGET_BELOW = 0.05  # a count decayed under this is forgotten (about 4 half-lives of one write)


class VolatilityMonitor:
    def __init__(self, inner: Provider, block_size: int, *, half_life: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.block_size = block_size
        if half_life <= 0:
            raise ValueError("half_life must be positive")
        self.half_life = half_life
        self._clock = clock
        self._counts = np.zeros(block_count(inner.size(), block_size), dtype=np.float32)
        self._any = False  # no write since the counts were last all zero: nothing to decay
        self._decayed_at = clock()

    def size(self) -> int:
        return self.inner.size()

    async def read_at(self, offset: int, length: int) -> Buffer:
        return await self.inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        await self.inner.write_at(offset, data)
        if len(data):
            bs = self.block_size
            self._counts[offset // bs : (offset + len(data) - 1) // bs + 1] += 1.0
            self._any = True

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()

    def volatility(self, block: int) -> float:
        self._decay()
        return float(self._counts[block]) if 0 <= block < len(self._counts) else 0.0

    def order(self, blocks: Iterable[int]) -> list[int]:
        """The given blocks, least written first (stable: ties keep their order)."""
        ordered: list[int] = self.order_array(np.fromiter(blocks, dtype=np.int64)).tolist()
        return ordered

    def order_array(self, blocks: Blocks) -> Blocks:
        """`order` for an array of block numbers."""
        self._decay()
        if not self._any:
            return blocks
        return blocks[np.argsort(self._counts[blocks], kind="stable")]

    def _decay(self) -> None:
        now = self._clock()
        halvings = (now - self._decayed_at) / self.half_life
        if halvings < 1:
            return
        self._decayed_at += int(halvings) * self.half_life
        if not self._any:
            return
        counts = self._counts
        counts *= np.float32(0.5 ** min(int(halvings), 200))
        counts[counts < FORGET_BELOW] = 0.0
        self._any = bool(counts.any())

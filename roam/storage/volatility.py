"""Volatility monitor: counts recent writes per block so migration sends calm blocks first.

Blocks that are written often will probably be written again; sending them early is
wasted bandwidth. Counts halve every `half_life` seconds, so old bursts are forgotten.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from roam.storage.provider import Buffer, Provider, blocks_spanning


class VolatilityMonitor:
    def __init__(self, inner: Provider, block_size: int, *, half_life: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.block_size = block_size
        if half_life <= 0:
            raise ValueError("half_life must be positive")
        self.half_life = half_life
        self._clock = clock
        self._counts: dict[int, float] = {}
        self._decayed_at = clock()

    def size(self) -> int:
        return self.inner.size()

    async def read_at(self, offset: int, length: int) -> Buffer:
        return await self.inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        await self.inner.write_at(offset, data)
        counts = self._counts
        for block in blocks_spanning(offset, len(data), self.block_size):
            counts[block] = counts.get(block, 0.0) + 1.0

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()

    def volatility(self, block: int) -> float:
        self._decay()
        return self._counts.get(block, 0.0)

    def order(self, blocks: Iterable[int]) -> list[int]:
        """The given blocks, least written first (stable: ties keep their order)."""
        self._decay()
        counts = self._counts
        return sorted(blocks, key=lambda b: counts.get(b, 0.0))

    def _decay(self) -> None:
        now = self._clock()
        halvings = (now - self._decayed_at) / self.half_life
        if halvings < 1:
            return
        factor = 0.5 ** int(halvings)
        self._decayed_at += int(halvings) * self.half_life
        self._counts = {b: c * factor for b, c in self._counts.items() if c * factor >= 0.05}

"""Metrics: operation counts, bytes and latency of whatever provider it wraps."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from roam.storage.provider import Buffer, Provider


@dataclass
class OpStats:
    ops: int = 0
    bytes: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self.ops += 1
        self.bytes += nbytes
        self.seconds += seconds
        self.max_seconds = max(self.max_seconds, seconds)


@dataclass
class DeviceStats:
    reads: OpStats = field(default_factory=OpStats)
    writes: OpStats = field(default_factory=OpStats)
    flushes: OpStats = field(default_factory=OpStats)


class Metrics:
    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.stats = DeviceStats()

    def size(self) -> int:
        return self.inner.size()

    async def read_at(self, offset: int, length: int) -> Buffer:
        start = time.perf_counter()
        data = await self.inner.read_at(offset, length)
        self.stats.reads.add(length, time.perf_counter() - start)
        return data

    async def write_at(self, offset: int, data: Buffer) -> None:
        start = time.perf_counter()
        await self.inner.write_at(offset, data)
        self.stats.writes.add(len(data), time.perf_counter() - start)

    async def flush(self) -> None:
        start = time.perf_counter()
        await self.inner.flush()
        self.stats.flushes.add(0, time.perf_counter() - start)

    async def close(self) -> None:
        await self.inner.close()

    def snapshot(self) -> dict[str, dict[str, float]]:
        return asdict(self.stats)

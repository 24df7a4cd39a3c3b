"""Lockable gate: hold writes (and optionally reads) while the device must not change."""

from __future__ import annotations

import asyncio

from roam.storage.provider import Buffer, Provider


class Gate:
    """While locked, writes wait at the gate; with `reads=True` so do reads.

    Used at handover so nothing changes a device between the final dirty collection and
    the authority transfer, and on a destination to hold I/O until authority arrives.
    """

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self._open = asyncio.Event()
        self._open.set()
        self._block_reads = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def size(self) -> int:
        return self.inner.size()

    @property
    def locked(self) -> bool:
        return not self._open.is_set()

    async def lock(self, *, reads: bool = False) -> None:
        """Close the gate and wait until writes already past it have finished."""
        self._block_reads = reads
        self._open.clear()
        await self._idle.wait()

    def unlock(self) -> None:
        self._open.set()

    async def read_at(self, offset: int, length: int) -> Buffer:
        # Loop: the gate may close again between the unlock that woke us and our turn.
        while self._block_reads and not self._open.is_set():
            await self._open.wait()
        return await self.inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            await self.inner.write_at(offset, data)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        self._open.set()
        await self.inner.close()

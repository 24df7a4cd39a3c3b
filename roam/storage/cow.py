"""Copy-on-write overlay: writes go to an upper device, unwritten blocks read the base.

The map of written blocks is saved beside the upper device on flush and close, so an
overlay can be reopened later (a VM disk over a shared read-only base image).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np

from roam.storage.bitmap import runs
from roam.storage.provider import (
    Buffer,
    Provider,
    StorageError,
    block_count,
    blocks_spanning,
    check_block_size,
    check_range,
)


class CopyOnWrite:
    def __init__(self, base: Provider, upper: Provider, map_path: str | Path,
                 block_size: int) -> None:
        check_block_size(block_size)
        if base.size() != upper.size():
            raise StorageError(f"base is {base.size()} bytes, upper {upper.size()}")
        self.base = base
        self.upper = upper
        self.block_size = block_size
        self.map_path = Path(map_path)
        n = block_count(base.size(), block_size)
        # One flag per block (a byte each, as saved): which blocks live in the upper layer.
        self._written = np.zeros(n, dtype=np.bool_)
        if self.map_path.exists():
            saved = self.map_path.read_bytes()
            if len(saved) != n:
                raise StorageError(
                    f"overlay map {self.map_path} has {len(saved)} blocks, device has {n}"
                )
            self._written[:] = np.frombuffer(saved, dtype=np.uint8) != 0
        self._map_changed = False
        self._copy_up = asyncio.Lock()

    def size(self) -> int:
        return self.base.size()

    def written_blocks(self) -> int:
        return int(np.count_nonzero(self._written))

    async def read_at(self, offset: int, length: int) -> Buffer:
        check_range(self, offset, length)
        bs = self.block_size
        span = blocks_spanning(offset, length, bs)
        layers = self._written[span.start : span.stop]
        if not len(layers) or layers.all() or not layers.any():  # one layer: no copy
            return await (self.upper if len(layers) and layers[0] else self.base).read_at(
                offset, length)
        out = bytearray(length)
        end = offset + length
        # One read per run of blocks that come from the same layer.
        for first, count in runs(layers):
            await self._read_into(out, offset, end, self.upper, span.start + first, count)
        for first, count in runs(~layers):
            await self._read_into(out, offset, end, self.base, span.start + first, count)
        return out

    async def _read_into(self, out: bytearray, offset: int, end: int, src: Provider,
                         first: int, count: int) -> None:
        lo = max(offset, first * self.block_size)
        hi = min(end, (first + count) * self.block_size)
        out[lo - offset : hi - offset] = await src.read_at(lo, hi - lo)

    async def write_at(self, offset: int, data: Buffer) -> None:
        check_range(self, offset, len(data))
        span = blocks_spanning(offset, len(data), self.block_size)
        if self._written[span.start : span.stop].all():
            await self.upper.write_at(offset, data)
            return
        # Writes that copy up or mark blocks go one at a time: a copy-up that waits for the
        # base must not land on top of a write that finished meanwhile.
        async with self._copy_up:
            await self._write_new(offset, data)

    async def _write_new(self, offset: int, data: Buffer) -> None:
        bs = self.block_size
        span = blocks_spanning(offset, len(data), bs)
        # A partial write (only the first and last block can be) to a block still in the
        # base copies the block up first.
        for block in sorted({span.start, span.stop - 1}):
            if not len(span) or self._written[block]:
                continue
            start = block * bs
            stop = min(start + bs, self.size())
            if not (offset <= start and offset + len(data) >= stop):
                base = await self.base.read_at(start, stop - start)
                await self.upper.write_at(start, bytes(base))
        await self.upper.write_at(offset, data)
        if not self._written[span.start : span.stop].all():
            self._written[span.start : span.stop] = True
            self._map_changed = True

    async def flush(self) -> None:
        await self.upper.flush()
        self._save_map()

    async def close(self) -> None:
        await self.flush()
        await self.upper.close()
        await self.base.close()

    def _save_map(self) -> None:
        if not self._map_changed:
            return
        tmp = self.map_path.with_suffix(self.map_path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self._written.view(np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.map_path)
        self._map_changed = False

"""Copy-on-write overlay: writes go to an upper device, unwritten blocks read the base.

The map of written blocks is saved beside the upper device on flush and close, so an
overlay can be reopened later (a VM disk over a shared read-only base image).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

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
        self._written = bytearray(n)
        if self.map_path.exists():
            saved = self.map_path.read_bytes()
            if len(saved) != n:
                raise StorageError(
                    f"overlay map {self.map_path} has {len(saved)} blocks, device has {n}"
                )
            self._written[:] = saved
        self._map_changed = False
        self._copy_up = asyncio.Lock()

    def size(self) -> int:
        return self.base.size()

    def written_blocks(self) -> int:
        return sum(self._written)

    async def read_at(self, offset: int, length: int) -> Buffer:
        check_range(self, offset, length)
        bs = self.block_size
        out = bytearray(length)
        # Read runs of blocks that come from the same layer in one call each.
        pos = offset
        end = offset + length
        while pos < end:
            layer = self._written[pos // bs]
            run_end = min(end, (pos // bs + 1) * bs)
            while run_end < end and self._written[run_end // bs] == layer:
                run_end = min(end, run_end + bs)
            src = self.upper if layer else self.base
            out[pos - offset : run_end - offset] = await src.read_at(pos, run_end - pos)
            pos = run_end
        return out

    async def write_at(self, offset: int, data: Buffer) -> None:
        check_range(self, offset, len(data))
        blocks = blocks_spanning(offset, len(data), self.block_size)
        if all(self._written[b] for b in blocks):
            await self.upper.write_at(offset, data)
            return
        # Writes that copy up or mark blocks go one at a time: a copy-up that waits for the
        # base must not land on top of a write that finished meanwhile.
        async with self._copy_up:
            await self._write_new(offset, data)

    async def _write_new(self, offset: int, data: Buffer) -> None:
        bs = self.block_size
        # A partial write to a block still in the base copies the block up first.
        for block in blocks_spanning(offset, len(data), bs):
            if self._written[block]:
                continue
            start = block * bs
            stop = min(start + bs, self.size())
            if not (offset <= start and offset + len(data) >= stop):
                base = await self.base.read_at(start, stop - start)
                await self.upper.write_at(start, bytes(base))
        await self.upper.write_at(offset, data)
        for block in blocks_spanning(offset, len(data), bs):
            if not self._written[block]:
                self._written[block] = 1
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
            f.write(self._written)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.map_path)
        self._map_changed = False

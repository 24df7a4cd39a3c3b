"""Copy between files and NBD exports, skipping holes, with several requests in flight."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from roam.exposure.nbd import protocol as p
from roam.exposure.nbd.client import NBDClient
from roam.storage.provider import Buffer, is_zero

CHUNK = 4 * 1024 * 1024
DEPTH = 8
GRANULE = 64 * 1024
"""Zero runs this large and aligned are skipped (left as holes), not written."""


class Endpoint(Protocol):
    size: int
    known_zero: bool
    """The destination reads as zeroes already, so zero ranges need no writing."""

    async def is_hole(self, offset: int, length: int) -> bool: ...
    async def read(self, offset: int, length: int) -> Buffer: ...
    async def write(self, offset: int, data: Buffer) -> None: ...
    async def zero(self, offset: int, length: int) -> None: ...
    async def finish(self) -> None: ...


class FileEndpoint:
    """A local file or block device; a regular destination file is truncated first."""

    def __init__(self, path: str | Path, *, dest_size: int | None = None) -> None:
        self.path = Path(path)
        if dest_size is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        else:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self.known_zero = False
        if dest_size is not None and regular:
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, dest_size)
            self.known_zero = True
        self.size = os.lseek(self._fd, 0, os.SEEK_END)

    async def is_hole(self, offset: int, length: int) -> bool:
        try:
            return os.lseek(self._fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as e:  # ENXIO: only a hole after offset; others: no SEEK_DATA
            return e.errno == errno.ENXIO

    async def read(self, offset: int, length: int) -> Buffer:
        return os.pread(self._fd, length, offset)

    async def write(self, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    async def zero(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            await self.write(offset, memoryview(zeroes)[:n])
            offset += n

    async def finish(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)


class NBDEndpoint:
    """An NBD export; holes come from base:allocation when the server offers it."""

    known_zero = False

    def __init__(self, client: NBDClient) -> None:
        self.client = client
        self.size = client.size

    async def is_hole(self, offset: int, length: int) -> bool:
        if self.client.context_id is None:
            return False
        extents = await self.client.block_status(offset, length)
        covered = 0
        for extent in extents:
            if not extent.zero:
                return False
            covered += extent.length
            if covered >= length:
                return True
        return False

    async def read(self, offset: int, length: int) -> Buffer:
        return await self.client.read(offset, length)

    async def write(self, offset: int, data: Buffer) -> None:
        await self.client.write(offset, data)

    async def zero(self, offset: int, length: int) -> None:
        if self.client.can(p.TF_SEND_WRITE_ZEROES):
            await self.client.write_zeroes(offset, length)
        else:
            await self.client.write(offset, bytes(length))

    async def finish(self) -> None:
        try:
            if self.client.can(p.TF_SEND_FLUSH):
                await self.client.flush()
        finally:
            await self.client.disconnect()


async def copy(src: Endpoint, dst: Endpoint, *, chunk: int = CHUNK, depth: int = DEPTH,
               progress: Callable[[int], None] | None = None) -> int:
    """Copy all of src to the start of dst; return the bytes of data (not holes) written."""
    if dst.size < src.size:
        raise ValueError(f"destination ({dst.size} bytes) is smaller than source "
                         f"({src.size} bytes)")
    chunks: Iterator[int] = iter(range(0, src.size, chunk))
    written = 0

    async def worker() -> None:
        nonlocal written
        for offset in chunks:
            n = min(chunk, src.size - offset)
            if await src.is_hole(offset, n):
                if not dst.known_zero:
                    await dst.zero(offset, n)
            else:
                data = memoryview(await src.read(offset, n))
                for start, stop, zero in _runs(data):
                    if not zero:
                        await dst.write(offset + start, data[start:stop])
                        written += stop - start
                    elif not dst.known_zero:
                        await dst.zero(offset + start, stop - start)
            if progress is not None:
                progress(n)

    await asyncio.gather(*(worker() for _ in range(depth)))
    return written


def _runs(data: memoryview, granule: int = GRANULE) -> list[tuple[int, int, bool]]:
    """Split data into maximal runs of all-zero and not-all-zero granules."""
    runs: list[tuple[int, int, bool]] = []
    for start in range(0, len(data), granule):
        stop = min(start + granule, len(data))
        zero = is_zero(data[start:stop])
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], stop, zero)
        else:
            runs.append((start, stop, zero))
    return runs


async def open_endpoint(spec: str, *, dest_size: int | None = None) -> Endpoint:
    """A file path or an NBD URI; `dest_size` opens it as a copy destination of that size."""
    if spec.startswith(("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")):
        return NBDEndpoint(await NBDClient.connect(spec))
    return FileEndpoint(spec, dest_size=dest_size)

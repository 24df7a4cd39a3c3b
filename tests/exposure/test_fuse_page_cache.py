"""PageCacheFeeder: the page cache of a mounted device filled and invalidated by the
daemon, as a migration destination does before its VM resumes.

The provider holds one content and the feeder stores another: what a reader then sees
tells whether the read was served from the page cache or by the daemon. A child process
holds the file open, as QEMU does; the test's own reads happen in a worker thread (the
loop thread must serve them).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from roam.exposure.fuse import FuseMount
from roam.storage.provider import Buffer
from roam.storage.sources import MemorySource

SIZE = 4 << 20
CHUNK = 1 << 20


class CountingSource(MemorySource):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads = 0

    async def read_at(self, offset: int, length: int) -> Buffer:
        self.reads += 1
        return await super().read_at(offset, length)


def read_file(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


@contextmanager
def held_open(path: Path) -> Iterator[None]:
    """A child that opens `path` and keeps it open until we are done."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'rb'); print('open', "
         "flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "open\n"
        yield
    finally:
        child.communicate(timeout=10)


async def test_stored_ranges_come_from_the_cache_until_invalidated(mnt: Path) -> None:
    device = CountingSource(SIZE)
    await device.write_at(0, b"D" * SIZE)  # what the daemon serves
    async with FuseMount(mnt, {"memory": device}) as mount:
        path = mount.path("memory")
        feeder = mount.page_cache("memory")
        feeder.store(0, b"S" * CHUNK)  # no one holds the file: nothing to fill
        await feeder.close(drop_stores=False)
        assert feeder.skipped == CHUNK and feeder.stored == 0

        holder = held_open(path)
        await asyncio.to_thread(holder.__enter__)
        try:
            feeder = mount.page_cache("memory")
            for offset in range(0, SIZE, CHUNK):
                feeder.store(offset, b"S" * CHUNK)
            feeder.invalidate(CHUNK, CHUNK)  # the second MiB turned stale
            await feeder.close(drop_stores=False)
            assert feeder.stored == SIZE and feeder.invalidated == CHUNK

            reads = device.reads
            got = await asyncio.to_thread(read_file, path, 0, CHUNK)
            assert got == b"S" * CHUNK and device.reads == reads  # no request reached us
            got = await asyncio.to_thread(read_file, path, CHUNK, CHUNK)
            assert got == b"D" * CHUNK and device.reads > reads  # fetched again
            reads = device.reads
            got = await asyncio.to_thread(read_file, path, 2 * CHUNK, 2 * CHUNK)
            assert got == b"S" * 2 * CHUNK and device.reads == reads
        finally:
            await asyncio.to_thread(holder.__exit__, None, None, None)

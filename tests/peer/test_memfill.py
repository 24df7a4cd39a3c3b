"""MemoryFill: an incoming VM's memory resident before it runs, and never stale.

A real FUSE mount serves a destination's memory device (a WaitingCache, as the peer
makes it) while a child process holds the file, as QEMU does. Blocks arrive before and
after the file is held, zero blocks are marked present without data, and a block the
source sends again is invalidated while the filler runs; stored pages dropped from the
page cache (as reclaim does) are stored again. After `finish`, every present block is
read without a request to the daemon and holds the newest content; a block still
missing is read through the daemon once it arrives (post-copy), never as it was.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from roam.exposure.fuse import FuseMount
from roam.exposure.fuse.mount import mounted
from roam.peer.memfill import MemoryFill
from roam.storage.combinator import WriteCombinator
from roam.storage.provider import Buffer
from roam.storage.sources import MemorySource
from roam.storage.waiting import WaitingCache
from tests.exposure.test_fuse_page_cache import held_open

PAGE = 4096
PAGES = 1024  # 4 MiB


class CountingSource(MemorySource):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads = 0

    async def read_at(self, offset: int, length: int) -> Buffer:
        self.reads += 1
        return await super().read_at(offset, length)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=False)
        pytest.fail(f"{path} was left mounted")


async def read_file(path: Path, offset: int, length: int) -> bytes:
    """Read as QEMU would: from another process (a daemon that reads its own mount
    deadlocks if it is killed meanwhile)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; f = open(sys.argv[1], 'rb'); f.seek(int(sys.argv[2]))"
        "; sys.stdout.buffer.write(f.read(int(sys.argv[3])))", str(path), str(offset),
        str(length), stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(child.communicate(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    return out


async def eventually(check: Callable[[], bool]) -> None:
    for _ in range(3000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 30 s")


async def drop_cache(path: Path, offset: int, length: int) -> None:
    """What reclaim does to clean pages, from another process: POSIX_FADV_DONTNEED."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "os.posix_fadvise(fd, int(sys.argv[2]), int(sys.argv[3]), os.POSIX_FADV_DONTNEED)",
        str(path), str(offset), str(length))
    assert await asyncio.wait_for(child.wait(), 30) == 0


def page(tag: int) -> bytes:
    return tag.to_bytes(2, "little") * (PAGE // 2)


async def test_present_pages_resident_none_stale(mnt: Path) -> None:
    below = CountingSource(PAGES * PAGE)
    combinator = WriteCombinator(below, PAGE)
    cache = WaitingCache(combinator.input(1), combinator.input(0), PAGE)
    async with FuseMount(mnt, {"memory": cache}) as mount:
        path = mount.path("memory")
        fill = MemoryFill(mount.page_cache("memory"), cache)
        cache.on_arrived, cache.on_stale = fill.arrived, fill.stale
        # Before anyone holds the file: stores are dropped by the kernel.
        for p in range(0, 100):
            await cache.write_remote(p, page(p + 1))
        cache.mark_range_present(100, 300)  # zero pages of a fresh device
        holder = held_open(path)
        await asyncio.to_thread(holder.__enter__)
        try:
            filler = asyncio.create_task(fill.run())
            await eventually(lambda: fill.filled >= 400 * PAGE)  # early data, zero pages
            # The kernel reclaims stored pages (clean, never referenced) when it needs
            # memory: they are stored again.
            await drop_cache(path, 100 * PAGE, 200 * PAGE)
            await eventually(lambda: fill.dropped > 0)
            await cache.write_remote(400, b"".join(page(p + 1) for p in range(400, 500)))
            cache.mark_range_present(500, PAGES - 500)
            await asyncio.sleep(0)
            cache.mark_absent([7, 450])  # sent again by the source
            await cache.write_remote(7, page(7000))
            cache.mark_absent([1000])  # left for post-copy
            await fill.finish(filler)
            assert fill.filled >= 100 * PAGE + 800 * PAGE  # early data and zero pages

            expected = bytearray(PAGES * PAGE)
            for p in [*range(0, 100), *range(400, 500)]:
                expected[p * PAGE : (p + 1) * PAGE] = page(p + 1)
            expected[7 * PAGE : 8 * PAGE] = page(7000)
            reads = below.reads
            got = await read_file(path, 0, 450 * PAGE)
            assert got == bytes(expected[: 450 * PAGE])
            got = await read_file(path, 451 * PAGE, 549 * PAGE)
            assert got == bytes(expected[451 * PAGE : 1000 * PAGE])
            assert below.reads == reads  # every present page came from the page cache

            # Missing pages are read through the daemon, with their new content.
            waiting = asyncio.create_task(read_file(path, 450 * PAGE, PAGE))
            late = asyncio.create_task(read_file(path, 1000 * PAGE, PAGE))
            await asyncio.sleep(0.1)
            assert not waiting.done() and not late.done()
            await cache.write_remote(450, page(4500))
            await cache.write_remote(1000, page(10000))
            assert await waiting == page(4500) and await late == page(10000)
            assert below.reads > reads
        finally:
            await asyncio.to_thread(holder.__exit__, None, None, None)

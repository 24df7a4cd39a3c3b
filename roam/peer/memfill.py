"""An incoming VM's memory made resident before the guest runs.

The machine maps guest memory through the driver's exposure (QEMU: a FUSE file), whose
page cache starts empty on every arrival. A page the resumed guest touches that is not
resident costs a round trip through the daemon, and a guest that has just resumed touches
thousands (issue 14's breakdown: 50 to 120 MiB of FUSE reads in the first 300 ms after
`cont`, the client waiting all along). So every block the destination holds goes into
the machine's memory before `cont`, zero blocks included:

- blocks that arrive with data are stored as they arrive (`arrived`);
- blocks the source sends again are dropped at once (`stale`), before any later store;
- a filler (`run`) stores what is present but not resident: blocks that arrived before
  the machine held its memory (the feeder can store nothing until then), and zero blocks,
  which a fresh device marks present without writing them;
- `finish`, at authority, stores the last few and waits until every store is done.

A store of data read back from the device must not overwrite newer data: each block
carries a version, bumped by every arrival and every invalidation, and a store read
under one version is dropped if the version moved while it was read. Blocks still
missing at authority are not stored: the guest faults on them and waits (post-copy).
After `finish` nothing is stored again: the running guest owns its pages, and its writes
reach the memory device through the exposure, which is the dirty set of the next move.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from roam.hypervisor import MemoryFeeder
from roam.storage.bitmap import block_runs, runs
from roam.storage.provider import Buffer
from roam.storage.waiting import WaitingCache

log = logging.getLogger(__name__)

RUN_BYTES = 4 << 20  # one store at most: the feeder copies it once
PAGE = 4096  # the feeder's residency is per page
POLL = 0.02  # seconds between two looks for blocks present but not resident


class MemoryFill:
    """Keeps `feeder` (the machine's memory) equal to the present blocks of `cache`."""

    def __init__(self, feeder: MemoryFeeder, cache: WaitingCache) -> None:
        self.feeder = feeder
        self.cache = cache
        self.block_size = cache.block_size
        self._resident = np.zeros(cache.nblocks, dtype=np.bool_)
        self._version = np.zeros(cache.nblocks, dtype=np.uint32)
        self._passes = 0  # filler passes so far
        self._since = np.zeros(cache.nblocks, dtype=np.int64)  # pass a block was stored in
        self._holding = False  # the machine holds its memory: stores take effect
        self._finished = False
        self.filled = 0  # bytes stored by the filler (not as they arrived)
        self.dropped = 0  # bytes stored, then reclaimed by the kernel, then stored again

    # -- observers of the waiting cache ------------------------------------------------

    def arrived(self, offset: int, data: Buffer) -> None:
        first = offset // self.block_size
        end = first + -(-len(data) // self.block_size)
        self._version[first:end] += 1
        if self._finished:
            return
        self.feeder.store(offset, data)
        self._resident[first:end] = self._holding
        self._since[first:end] = self._passes

    def stale(self, blocks: list[int]) -> None:
        index = np.asarray(blocks, dtype=np.int64)
        self._version[index] += 1
        self._resident[index] = False
        for first, count in block_runs(index):
            self.feeder.invalidate(first * self.block_size, count * self.block_size)

    # -- the filler --------------------------------------------------------------------

    async def run(self) -> None:
        """From now on the machine holds its memory: store every present block, and go on
        storing what turns present without data, until `finish`."""
        await self.feeder.watch()
        self._resident[:] = False  # stores before now were dropped by the feeder
        self._holding = True
        started = time.perf_counter()
        await self.fill()
        log.info("memory resident: %.0f MiB stored by the filler in %.3f s",
                 self.filled / 2**20, time.perf_counter() - started)
        while not self._finished:
            await asyncio.sleep(POLL)
            await self.fill()

    async def fill(self) -> None:
        """Store every block present now and not resident yet (or any more)."""
        self._passes += 1
        self._forget_reclaimed()
        todo = self.cache.present_mask() & ~self._resident
        if not todo.any():
            return
        bs = self.block_size
        per_run = RUN_BYTES // bs
        for lo, n in runs(todo):
            for first in range(lo, lo + n, per_run):
                count = min(per_run, lo + n - first)
                await self._store_back(first, count)
                await asyncio.sleep(0)  # a read of the page cache's size must not hold
                if self._finished:      # the loop that receives the migration
                    return

    async def _store_back(self, first: int, count: int) -> None:
        bs = self.block_size
        end = first + count
        seen = self._version[first:end].copy()
        offset = first * bs
        length = min(self.cache.size(), end * bs) - offset
        data = memoryview(await self.cache.local.read_at(offset, length))
        # Only what is present and unchanged since the read; the rest waits for its
        # arrival's own store or the next pass.
        keep = (self._version[first:end] == seen) & self.cache.present_mask()[first:end]
        for lo, n in runs(keep):
            start = lo * bs
            stop = min(length, (lo + n) * bs)
            self.feeder.store(offset + start, data[start:stop])  # copied now
            self._resident[first + lo : first + lo + n] = True
            self._since[first + lo : first + lo + n] = self._passes
            self.filled += stop - start

    def _forget_reclaimed(self) -> None:
        """Blocks stored at least a pass ago that are no longer in place: the kernel
        reclaimed them (stored pages are clean and never referenced). Only asked while
        no store is queued, so a store still on its way is not taken for a loss."""
        if self.feeder.busy():
            return
        pages = self.feeder.resident()
        if pages is None:
            return
        per_block = max(1, self.block_size // PAGE)
        padded = np.zeros(self.cache.nblocks * per_block, dtype=np.bool_)
        padded[: len(pages)] = pages[: len(padded)]
        there = padded.reshape(-1, per_block).all(axis=1)
        lost = self._resident & ~there & (self._since < self._passes - 1)
        if lost.any():
            self._resident[lost] = False
            self.dropped += int(np.count_nonzero(lost)) * self.block_size

    async def finish(self, filler: asyncio.Task[None] | None) -> None:
        """Before the guest runs: the last blocks, then wait for every store. A filler
        that failed only leaves pages to be read through the exposure (logged); a failed
        invalidation is raised by the feeder's close (stale pages may be left)."""
        try:
            if filler is not None:
                self._finished = True
                filler.cancel()
                try:
                    await filler
                except asyncio.CancelledError:
                    pass
                except Exception as exc:  # a filler's failure costs reads only
                    log.warning("memory filler failed, the guest reads the rest: %s", exc)
                    self._holding = False
                self._finished = False
                if self._holding:
                    await self.fill()
        finally:
            self._finished = True
            await self.feeder.close()
        log.info("memory resident at authority: %.0f MiB stored by the filler, %.0f MiB of "
                 "them again after the kernel reclaimed them", self.filled / 2**20,
                 self.dropped / 2**20)


"""Dirty tracker: which blocks changed since a reader (the migrator, the sync) last read them."""

from __future__ import annotations

import numpy as np

from roam.storage.bitmap import Blocks, Mask
from roam.storage.provider import (
    Buffer,
    Provider,
    block_count,
    check_block_size,
    check_range,
)


class DirtyView:
    """One reader's dirty set: the blocks it read (tracked) and those written since.

    A migration and a continuous sync each read the same device at their own pace, and
    each must learn of every change after its own read: each holds a view, and every
    write marks the written blocks dirty in every view that tracks them.
    """

    def __init__(self, tracker: DirtyTracker) -> None:
        self.tracker = tracker
        nblocks = block_count(tracker.size(), tracker.block_size)
        self._tracked = np.zeros(nblocks, dtype=np.bool_)
        self._dirty = np.zeros(nblocks, dtype=np.bool_)

    def _mark(self, lo: int, hi: int) -> None:
        self._dirty[lo:hi] |= self._tracked[lo:hi]

    async def read_tracked(self, offset: int, length: int) -> Buffer:
        """Read for this view: the blocks read are tracked from now on."""
        check_range(self.tracker, offset, length)
        if length:
            bs = self.tracker.block_size
            self._tracked[offset // bs : (offset + length - 1) // bs + 1] = True
        return await self.tracker.inner.read_at(offset, length)

    def track(self, blocks: Mask) -> None:
        """Track these blocks without reading them: the reader knows their content by
        other means (a store holds it), and must hear of any write from now on."""
        self._tracked |= blocks

    def mark_dirty(self, blocks: Blocks) -> None:
        """Report these blocks again at the next `take_dirty` (a reader that failed to
        use what it read, e.g. an upload that failed)."""
        self._dirty[blocks] |= self._tracked[blocks]

    def take_dirty(self) -> Blocks:
        """The dirty blocks (ascending, as an array) and start a new dirty set."""
        dirty = np.flatnonzero(self._dirty)
        self._dirty[dirty] = False
        return dirty

    def dirty_mask(self) -> Mask:
        """Which blocks are dirty now (a copy; the set is not cleared)."""
        return self._dirty.copy()

    def dirty_count(self) -> int:
        return int(np.count_nonzero(self._dirty))

    def close(self) -> None:
        """Stop tracking for this reader."""
        self.tracker.unwatch(self)


class DirtyTracker:
    """Tracks writes to blocks that a reader has already read.

    A block becomes *tracked* when a reader reads it with `read_tracked`; from then on a
    write to it marks it dirty. `take_dirty` hands the dirty set over and clears it, so
    each change is reported exactly once. Writes to untracked blocks need no report: the
    reader has not read them yet and will read the new data when it does.

    The tracker's own methods are the migrator's view; `watch()` adds a view for another
    reader (the continuous sync). Both sets are boolean arrays: a 1 MiB write to guest
    memory spans 256 blocks of 4 KiB, and marking them is one array operation per view,
    not 256 Python steps.
    """

    def __init__(self, inner: Provider, block_size: int) -> None:
        check_block_size(block_size)
        self.inner = inner
        self.block_size = block_size
        self.view = DirtyView(self)
        self._views = [self.view]

    def size(self) -> int:
        return self.inner.size()

    async def read_at(self, offset: int, length: int) -> Buffer:
        return await self.inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        await self.inner.write_at(offset, data)
        # Mark after the write lands: a reader reading in between sees the new data and
        # the block is still reported, which is safe (sent twice, never stale).
        if len(data):
            lo, hi = offset // self.block_size, (offset + len(data) - 1) // self.block_size + 1
            for view in self._views:
                view._mark(lo, hi)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()

    def watch(self) -> DirtyView:
        """A new view, tracking nothing yet."""
        view = DirtyView(self)
        self._views.append(view)
        return view

    def unwatch(self, view: DirtyView) -> None:
        if view is not self.view and view in self._views:
            self._views.remove(view)

    # -- the migrator's view ----------------------------------------------------------

    async def read_tracked(self, offset: int, length: int) -> Buffer:
        """Read for migration: the blocks read are tracked from now on."""
        return await self.view.read_tracked(offset, length)

    def take_dirty(self) -> Blocks:
        """The dirty blocks (ascending, as an array) and start a new dirty set."""
        return self.view.take_dirty()

    def sync(self) -> list[int]:
        """Return the dirty blocks (ascending) and start a new dirty set."""
        dirty: list[int] = self.take_dirty().tolist()
        return dirty

    def dirty_count(self) -> int:
        return self.view.dirty_count()

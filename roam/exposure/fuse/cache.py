"""Filling and invalidating the kernel's page cache of a mounted device from the daemon.

A destination receives a VM's memory seconds before the VM resumes there. Storing each
range in the page cache as it arrives (FUSE_NOTIFY_STORE) spares the resumed guest a FUSE
read per page fault (the kernel reads 4 MiB around each fault of a huge-page mapping such
as QEMU's), and with it most of the pause after the resume. A range the source changes
again is invalidated (FUSE_NOTIFY_INVAL_INODE for its byte range, which libfuse has but
pyfuse3 does not expose), so that no reader ever sees the old copy.

Stores and invalidations run on one thread of their own, in the order they were asked
for: a store and a later invalidation of the same range cannot swap, and a store that
waits on a page a reader holds locked (the reader waits for this daemon) cannot stall
the event loop that must answer that reader. Nothing here keeps the file open: a daemon
holding a descriptor of its own mount deadlocks when it spawns a process (the child's
close of the descriptor at exec waits for a FLUSH reply that the daemon, waiting for the
exec, cannot send). So the kernel must hold the inode for another reason (QEMU has the
file mapped); until then a store or invalidation finds nothing and is skipped.
Use it only while nothing writes to the file through a mapping (a VM that has not
resumed): a store replaces the page's content.

Stored pages are ordinary page cache: clean, never referenced, the first the kernel
reclaims when it needs memory. `watch` maps the file (no descriptor is kept: a mapping
holds the file, and a child's exec drops a mapping without a FLUSH) so that `resident`
can tell, with mincore, which pages are still there; a caller stores again what was
dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyfuse3

from roam.errors import RoamError
from roam.storage.provider import Buffer

log = logging.getLogger(__name__)

FUSE_NOTIFY_INVAL_INODE = 2
# struct fuse_out_header {u32 len; s32 error (the notification code); u64 unique (0)}, then
# struct fuse_notify_inval_inode_out {u64 ino; s64 off; s64 len}: the kernel's stable ABI.
_INVAL = struct.Struct("=IiQQqq")
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value


class PageCacheError(RoamError):
    """The page cache could not be kept right: the file must not be used by a VM."""


def fuse_device_fd() -> int:
    """The process's /dev/fuse descriptor (pyfuse3 keeps it to itself; one per process)."""
    found = []
    for entry in os.scandir("/proc/self/fd"):
        try:
            if os.readlink(entry.path) == "/dev/fuse":
                found.append(int(entry.name))
        except OSError:
            continue  # closed meanwhile
    if len(found) != 1:
        raise PageCacheError(f"expected one /dev/fuse descriptor, found {len(found)}")
    return found[0]


class PageCacheFeeder:
    """Fills and invalidates the page cache of `path`, inode `inode` of this process's
    mount (FuseMount.page_cache)."""

    def __init__(self, inode: int, path: Path) -> None:
        self.inode = inode
        self.path = path
        self._fuse = fuse_device_fd()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagecache")
        self._loop = asyncio.get_running_loop()
        self._last: asyncio.Future[None] | None = None
        self._error: OSError | None = None  # an invalidation failed: fatal
        self._store_error: OSError | None = None  # stores stopped; reads still work
        self._closing = False
        self.stored = 0  # bytes
        self.skipped = 0  # bytes offered while the kernel held no inode
        self.invalidated = 0  # bytes
        self._map: tuple[int, int] | None = None  # (address, length) of our mapping

    async def watch(self) -> None:
        """Map the file read-only, so that `resident` can answer (and stores find an
        inode from now on). The open and close run in a thread: this loop serves them."""
        def mapping() -> tuple[int, int]:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                length = os.fstat(fd).st_size
                address = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if address in (None, MAP_FAILED):
                    raise OSError(ctypes.get_errno(), f"mmap of {self.path} failed")
                return int(address), length
            finally:
                os.close(fd)
        if self._map is None:
            self._map = await asyncio.to_thread(mapping)

    def resident(self) -> np.ndarray | None:
        """Per page of the file: in the page cache now (None before `watch`)."""
        if self._map is None:
            return None
        address, length = self._map
        vector = np.zeros(-(-length // PAGE), dtype=np.uint8)
        if _libc.mincore(address, length, vector.ctypes.data) != 0:
            raise OSError(ctypes.get_errno(), f"mincore of {self.path} failed")
        return (vector & 1).astype(np.bool_)

    def busy(self) -> bool:
        """Stores or invalidations are still queued."""
        return self._last is not None and not self._last.done()

    def store(self, offset: int, data: Buffer) -> None:
        """Put `data` at `offset` (copied now: the caller may reuse its buffer)."""
        self._submit(self._store, offset, bytes(data))

    def invalidate(self, offset: int, length: int) -> None:
        """Drop [offset, offset + length) from the page cache."""
        self._submit(self._invalidate, offset, length)

    async def close(self, *, drop_stores: bool = False) -> None:
        """Wait until every invalidation and every store asked for is done (with
        `drop_stores`, stores still queued are left to readers instead); PageCacheError
        if an invalidation failed (stale pages may be left behind)."""
        self._closing = drop_stores
        if self._last is not None:
            await asyncio.wait([self._last])
        await asyncio.to_thread(self._thread.shutdown)
        if self._map is not None:
            _libc.munmap(*self._map)  # no request to the daemon (only a close sends one)
            self._map = None
        log.info("page cache of %s: %.0f MiB stored (%.0f MiB before anyone held the file), "
                 "%.1f MiB invalidated", self.path, self.stored / 2**20, self.skipped / 2**20,
                 self.invalidated / 2**20)
        if self._error is not None:
            raise PageCacheError(f"page cache of {self.path}: {self._error}") from self._error

    def _submit(self, function: Callable[..., None], *args: object) -> None:
        self._last = self._loop.run_in_executor(self._thread, function, *args)

    def _store(self, offset: int, data: bytes) -> None:
        if self._closing or self._error is not None or self._store_error is not None:
            return
        try:
            pyfuse3.notify_store(self.inode, offset, data)
        except FileNotFoundError:
            self.skipped += len(data)  # no one holds the file yet: nothing to fill
            return
        except OSError as exc:  # what was stored is right; readers fetch the rest
            self._store_error = exc
            log.warning("page cache of %s: stores stopped (%s); reads go to the daemon",
                        self.path, exc)
            return
        self.stored += len(data)

    def _invalidate(self, offset: int, length: int) -> None:
        if self._error is not None:
            return
        message = _INVAL.pack(_INVAL.size, FUSE_NOTIFY_INVAL_INODE, 0, self.inode, offset,
                              length)
        try:
            os.write(self._fuse, message)
        except FileNotFoundError:
            return  # the kernel holds no inode for the file: nothing is cached
        except OSError as exc:
            self._error = exc
            return
        self.invalidated += length

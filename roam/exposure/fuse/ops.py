"""The FUSE file system: a flat directory with one fixed-size file per roam device.

read and write are the hot path (every guest page fault and every written-back page goes
through them), so they do as little Python as possible: a list index, a bounds check, one
provider call. Everything else is rare and kept simple.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Mapping
from typing import Any

import pyfuse3
from pyfuse3 import (
    EntryAttributes,
    FileInfo,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
)

from roam.storage.provider import Buffer, Provider

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 3600.0
"""Seconds the kernel may cache names and attributes: devices never change size or name."""

_FILE_MODE = stat.S_IFREG | 0o600
_DIR_MODE = stat.S_IFDIR | 0o755


class DeviceFS(pyfuse3.Operations):
    """Serves each provider as a regular file named after it, in the mount's root.

    Inode numbers are fixed at construction: the root is pyfuse3.ROOT_INODE (1) and the
    devices follow in the mapping's order. The file handle of an open file is its inode, so
    read/write find the device with one list index.
    """

    enable_writeback_cache = False
    """Off, as measured: mmap writes go through the page cache and write-back either way,
    and the write-back cache changed neither dirtying speed nor fsync cost; without it a
    write(2) is written through at once, which is the simpler contract."""

    def __init__(self, devices: Mapping[str, Provider]) -> None:
        super().__init__()
        self.names = list(devices)
        # Index = inode; slots 0 and 1 (no inode 0, root) hold None.
        self._providers: list[Provider | None] = [None, None, *devices.values()]
        self._sizes = [0, 0, *(p.size() for p in devices.values())]
        self._inodes = {os.fsencode(name): i + 2 for i, name in enumerate(self.names)}
        self._now_ns = time.time_ns()
        self._busy: set[asyncio.Task[Any]] = set()
        self.closing = False

    def inode_of(self, name: str) -> int:
        return self._inodes[os.fsencode(name)]

    def cancel_busy(self) -> int:
        """Fail the requests still waiting on a provider (called at shutdown only)."""
        self.closing = True
        for task in self._busy:
            task.cancel()
        return len(self._busy)

    # -- hot path ---------------------------------------------------------------------

    # Returns the provider's buffer as is (pyfuse3 takes any buffer, its stub says bytes).
    async def read(self, fh: int, off: int, size: int) -> Buffer:  # type: ignore[override]
        end = min(off + size, self._sizes[fh])
        if off >= end:
            return b""
        provider = self._providers[fh]
        assert provider is not None
        task = asyncio.current_task()
        assert task is not None
        self._busy.add(task)
        try:
            # A view is fine: pyfuse3 copies it into the reply before the next await.
            return await provider.read_at(off, end - off)
        except BaseException as e:
            raise self._as_fuse_error("read", e) from e
        finally:
            self._busy.discard(task)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        end = min(off + len(buf), self._sizes[fh])
        if off >= end:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        provider = self._providers[fh]
        assert provider is not None
        task = asyncio.current_task()
        assert task is not None
        self._busy.add(task)
        try:
            await provider.write_at(off, buf if end - off == len(buf) else buf[: end - off])
        except BaseException as e:
            raise self._as_fuse_error("write", e) from e
        finally:
            self._busy.discard(task)
        return end - off

    def _as_fuse_error(self, op: str, e: BaseException) -> BaseException:
        """Map a provider failure to an errno reply.

        pyfuse3 only replies to FUSEError; anything else would kill its worker task and
        leave the kernel request (and the faulting guest vCPU) waiting forever.
        A cancellation becomes EIO only while the mount is closing (that is how shutdown
        fails requests stuck on a provider); otherwise it propagates.
        """
        if isinstance(e, pyfuse3.FUSEError):
            return e
        if isinstance(e, asyncio.CancelledError):
            if not self.closing:
                return e
            log.warning("%s failed: the mount is closing", op)
        elif isinstance(e, Exception):
            log.error("%s failed: %s", op, e, exc_info=not isinstance(e, OSError))
        else:
            return e
        return pyfuse3.FUSEError(errno.EIO)

    # -- files ------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        if not 2 <= inode < len(self._providers):
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        # keep_cache: only the kernel changes the file, so its page cache stays valid across
        # opens; without it every open (QEMU's, or a flush's fsync) would drop the guest's
        # cached pages. direct_io stays off: MAP_SHARED needs the page cache.
        return FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def fsync(self, fh: int, datasync: bool) -> None:
        # The kernel has written back (and we have stored) every dirty page of the file
        # before it sends FSYNC; what remains is the provider's own durability.
        provider = self._providers[fh]
        assert provider is not None
        try:
            await provider.flush()
        except BaseException as e:
            raise self._as_fuse_error("fsync", e) from e

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    # -- names and attributes ---------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext
                     ) -> EntryAttributes:
        inode = self._inodes.get(name) if parent_inode == pyfuse3.ROOT_INODE else None
        if inode is None:
            if name == b"." or name == b"..":
                return self._attrs(pyfuse3.ROOT_INODE)
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        if not 1 <= inode < len(self._providers):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def setattr(self, inode: int, attr: EntryAttributes, fields: SetattrFields,
                      fh: int | None, ctx: RequestContext) -> EntryAttributes:
        # Devices have a fixed size; QEMU only truncates a file whose size is 0. Time
        # updates are accepted and forgotten.
        if fields.update_size and attr.st_size != self._sizes[inode]:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._attrs(inode)

    def _attrs(self, inode: int) -> EntryAttributes:
        entry = EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = ATTR_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_mode = _DIR_MODE if inode == pyfuse3.ROOT_INODE else _FILE_MODE
        entry.st_nlink = 2 if inode == pyfuse3.ROOT_INODE else 1
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_size = self._sizes[inode]
        entry.st_blksize = 4096
        entry.st_blocks = (self._sizes[inode] + 511) // 512
        # Constant times: a changed mtime would make the kernel drop its page cache.
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self._now_ns
        return entry

    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: ReaddirToken) -> None:
        # start_id is the index of the next entry to list, so a resumed listing continues.
        for index in range(start_id, len(self.names)):
            inode = index + 2
            if not pyfuse3.readdir_reply(token, os.fsencode(self.names[index]),
                                         self._attrs(inode), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        stats = StatvfsData()
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_blocks = sum(self._sizes) // 4096
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = len(self._providers) - 1
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats

"""A FUSE mount of roam devices, run by pyfuse3 inside the caller's asyncio loop.

pyfuse3 keeps its session in module globals, so a process serves at most one mount at a
time; a second FuseMount raises until the first has exited.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import pyfuse3
import pyfuse3.asyncio

from roam.exposure.fuse import tuning
from roam.exposure.fuse.cache import PageCacheFeeder
from roam.exposure.fuse.ops import DeviceFS
from roam.storage.provider import Provider

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 2.0
"""Seconds requests already being served get to finish at unmount before they fail."""

DEFAULT_TUNING = tuning.Tuning()

_active: FuseMount | None = None


class FuseMount:
    """`async with FuseMount(mountpoint, {"memory": provider}) as mount:` serves each
    provider as `mountpoint/NAME` until the block exits, then flushes and unmounts.

    On exit with an exception the files are unmounted without flushing (the daemon may be
    what failed). The providers stay open: they belong to the caller.
    """

    def __init__(self, mountpoint: str | Path, devices: Mapping[str, Provider], *,
                 tuning: tuning.Tuning = DEFAULT_TUNING,
                 fsname: str = "roam") -> None:
        for name in devices:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"bad device name {name!r}")
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.tuning = tuning
        self.tuned: dict[str, str] = {}
        self._fs = DeviceFS(devices)
        self._options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=roam"}
        self._main: asyncio.Task[None] | None = None

    def path(self, name: str) -> Path:
        """Where device `name` appears: the file QEMU maps as mem-path."""
        self._fs.inode_of(name)  # KeyError for an unknown device
        return self.mountpoint / name

    def page_cache(self, name: str) -> PageCacheFeeder:
        """What fills and invalidates the page cache of device `name` (see cache.py)."""
        self._check_serving()
        return PageCacheFeeder(self._fs.inode_of(name), self.path(name))

    async def flush(self, name: str) -> None:
        """Return once every page of `name` written before this call has reached its
        provider (and the provider has been flushed).

        fsync makes the kernel write back the file's dirty pages as write requests to this
        daemon and wait for their replies. It runs in a worker thread: called from the
        thread that runs this loop it would wait on requests that the loop must serve.
        """
        path = self.path(name)
        self._check_serving()
        await asyncio.to_thread(_fsync, path)

    async def __aenter__(self) -> FuseMount:
        global _active
        if _active is not None:
            raise RuntimeError(f"pyfuse3 already serves {_active.mountpoint} in this process")
        _enable_asyncio()
        pyfuse3.init(self._fs, str(self.mountpoint), self._options)
        _active = self
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()  # procfs: never blocks
            device = tuning.mount_device(self.mountpoint, mountinfo)
            self.tuned = tuning.apply(device, self.tuning)
            self._main = asyncio.create_task(pyfuse3.main(), name=f"fuse {self.mountpoint}")
            # The kernel's INIT handshake is served by the loop: once a stat of the root
            # returns, the session is ready (notifications before it fail with ENOSYS).
            await asyncio.to_thread(os.stat, self.mountpoint)
        except BaseException:
            self._close()
            raise
        log.info("serving %s at %s", ", ".join(self._fs.names), self.mountpoint)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                for name in self._fs.names:
                    await self.flush(name)
        finally:
            await self._stop()

    def _check_serving(self) -> None:
        if self._main is None or self._main.done():
            raise RuntimeError(f"FUSE mount {self.mountpoint} is not serving")

    async def _stop(self) -> None:
        """End the FUSE loop, failing requests that do not finish in time, then unmount."""
        main = self._main
        try:
            if main is not None and not main.done():
                pyfuse3.terminate()
                done, _ = await asyncio.wait([main], timeout=SHUTDOWN_GRACE)
                if not done:
                    failed = self._fs.cancel_busy()
                    log.warning("unmounting %s: failed %d waiting requests",
                                self.mountpoint, failed)
                    await asyncio.shield(main)
            if main is not None and main.done() and not main.cancelled() and main.exception():
                log.error("FUSE loop of %s failed", self.mountpoint, exc_info=main.exception())
        finally:
            self._close()

    def _close(self) -> None:
        global _active
        pyfuse3.close(unmount=True)
        _active = None
        log.info("unmounted %s", self.mountpoint)


def mounted(path: Path) -> bool:
    """Whether `path` is a mount point, from /proc (a stat of a dead daemon's mount fails
    with ENOTCONN)."""
    return any(line.split()[1] == str(path)
               for line in Path("/proc/self/mounts").read_text().splitlines())


def _enable_asyncio() -> None:
    """Switch pyfuse3 to asyncio mode, with a race in its shutdown fixed.

    pyfuse3.terminate() fails each worker's wait for the FUSE fd with set_exception. A
    worker whose wait has just completed (a request is pending, as is usual at unmount)
    makes that raise InvalidStateError halfway; the session would then be destroyed under
    workers that are still running, and the next one to read from it crashes the process.
    """
    pyfuse3.asyncio.enable()
    futures = pyfuse3.asyncio._read_futures

    def notify_closing(fd: int) -> None:
        for future in futures[fd]:
            if not future.done():
                future.set_exception(pyfuse3.asyncio.ClosedResourceError())

    pyfuse3.asyncio.notify_closing = notify_closing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


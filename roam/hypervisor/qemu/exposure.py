"""Exposing a VM's engine devices to QEMU: memory as a FUSE file, the disk over NBD.

pyfuse3 serves one mount per process, so the process's one mount carries every file
device (today: the memory) of its one VM.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from roam.exposure.fuse import FuseMount
from roam.exposure.nbd.server import Export, NBDServer
from roam.hypervisor.qemu.cmdline import NbdDisk
from roam.storage.provider import Provider

MEMORY_FILE = "memory"
MOUNT_DIR = "fuse"
DISK_EXPORT = "disk"


@dataclass
class Exposed:
    mount: FuseMount
    mem_path: Path  # QEMU's memory-backend-file mem-path
    disk: NbdDisk  # QEMU's NBD client connects here

    async def flush_memory(self) -> None:
        """Every guest page written so far reaches the memory provider (fsync on FUSE)."""
        await self.mount.flush(MEMORY_FILE)


@contextlib.asynccontextmanager
async def exposed(workdir: Path, memory: Provider, disk: Provider) -> AsyncIterator[Exposed]:
    """Serve `memory` at workdir/fuse/memory and `disk` on workdir/nbd.sock.

    QEMU must have ended before the block exits: the exit unmounts and, unless the block
    raised, flushes first. The providers stay open (they belong to the caller).
    """
    mountpoint = workdir / MOUNT_DIR
    mountpoint.mkdir(exist_ok=True)
    server = NBDServer([Export(DISK_EXPORT, disk)])
    socket = workdir / "nbd.sock"
    await server.serve_unix(socket)
    try:
        async with FuseMount(mountpoint, {MEMORY_FILE: memory}) as mount:
            yield Exposed(mount, mount.path(MEMORY_FILE), NbdDisk(socket, DISK_EXPORT))
    finally:
        await server.close()

"""The QEMU driver (Debian's qemu-system-x86): see roam.hypervisor.driver for the contract.

Modules: `cmdline` (the qemu-system-x86_64 command line), `process` (one QEMU under QMP),
`exposure` (memory on FUSE, disk over NBD), `machine` (the two together as a Machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from pathlib import Path

from roam.exposure.fuse.mount import mounted
from roam.hypervisor.driver import Capabilities, Machine, MachineSpec
from roam.hypervisor.qemu.exposure import MOUNT_DIR
from roam.hypervisor.qemu.machine import qemu_machine, qemu_version
from roam.storage.provider import Provider

__all__ = ["QemuDriver"]

log = logging.getLogger(__name__)


class QemuDriver:
    """roam.hypervisor.driver.Driver for QEMU."""

    name = "qemu"
    capabilities = Capabilities(accelerators=("kvm", "tcg"), incoming_state=True,
                                announce=True, memory_feeder=True)

    def version(self) -> str:
        return _version()

    def machine(self, spec: MachineSpec, workdir: Path, memory: Provider,
                disk: Provider) -> contextlib.AbstractAsyncContextManager[Machine]:
        return qemu_machine(spec, workdir, memory, disk)

    async def sweep(self, workdir: Path) -> None:
        mountpoint = (workdir / MOUNT_DIR).absolute()
        if not mounted(mountpoint):
            return
        log.warning("unmounting %s, left by a process that died", mountpoint)
        await unmount_lazily(mountpoint)


@functools.cache
def _version() -> str:
    return qemu_version()  # the binary does not change under a running process


async def unmount_lazily(mountpoint: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        "umount", "--lazy", str(mountpoint), stderr=asyncio.subprocess.PIPE)
    _, err = await process.communicate()
    if process.returncode:
        log.error("cannot unmount %s: %s", mountpoint, err.decode().strip())

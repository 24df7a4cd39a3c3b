"""The terminator: a migration that ends in a package directory instead of a running VM.

It takes a VM's device group like a destination peer, waits at the authority transfer
until every block has arrived, writes the devices out as a package (the VM as it was at
its pause on the source: memory, disk and device state of one instant), then declines
authority, so the source resumes the VM: a live backup. `roam run DIR` or `roam peer run
DIR` starts a VM from it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from roam.migration.channel import Channel
from roam.migration.destination import Destination, NewDevice
from roam.migration.errors import Decline, MigrationError
from roam.migration.wire import DeviceSpec
from roam.peer.instance import DISK, INITRAMFS, KERNEL, MEMORY, SPEC, STATE, VMSpec
from roam.peer.models import BACKUP
from roam.storage.sources import SparseFileSource
from roam.storage.waiting import WaitingCache
from roam.vm.package import Package

log = logging.getLogger(__name__)

PARTIAL = ".partial"


@dataclass
class Backup:
    name: str
    directory: Path
    bytes_received: int
    seconds: float


async def terminate(channel: Channel, out: Path) -> Backup:
    """Receive one VM into the package directory `out` (created; must not hold one)."""
    if (out / "config.json").exists():
        raise MigrationError(f"{out} already holds a package")
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, SparseFileSource] = {}
    written: list[VMSpec] = []

    async def make(spec: DeviceSpec) -> NewDevice:
        if spec.name not in (SPEC, KERNEL, INITRAMFS, MEMORY, DISK, STATE):
            raise MigrationError(f"unknown device {spec.name!r} in a VM group")
        device = SparseFileSource(out / (spec.name + PARTIAL), spec.size)
        made[spec.name] = device
        return NewDevice(device)

    async def on_authority(_: bytes, devices: dict[str, WaitingCache]) -> None:
        for cache in devices.values():
            await cache.wait_complete()  # the source streams the rest while it waits
        spec_cache = devices[SPEC]
        vm = VMSpec.from_device(bytes(await spec_cache.read_at(0, spec_cache.size())))
        for source in made.values():
            await source.flush()
        names = vm.config.files
        targets = {KERNEL: names.kernel, INITRAMFS: names.initramfs, MEMORY: names.memory,
                   DISK: names.disk, STATE: names.state}
        for device, file in targets.items():
            if device in made and file is not None:
                os.replace(out / (device + PARTIAL), out / file)
        (out / (SPEC + PARTIAL)).unlink()
        Package(out, vm.config).save_config()  # last: only now is it a package
        written.append(vm)
        raise Decline(f"live backup of {vm.name} written to {out}; keep running")

    destination = Destination(channel, make, on_authority, prepared_payload=BACKUP)
    try:
        result = await destination.run()
    finally:
        for source in made.values():
            await source.close()
        for partial in out.glob("*" + PARTIAL):
            partial.unlink()
    if not written:
        raise MigrationError("the source ended the migration before its handover")
    Package.load(out)  # sizes and files as config.json says
    return Backup(written[0].name, out, result.bytes_received, result.total_seconds)

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
from roam.peer.models import BACKUP
from roam.storage.sources import SparseFileSource
from roam.storage.waiting import WaitingCache
from roam.vm import group
from roam.vm.group import Device
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
    written: list[group.VMSpec] = []

    async def make(spec: DeviceSpec) -> NewDevice:
        group.device(spec.name)  # a VM's device, or the group is refused
        device = SparseFileSource(out / (spec.name + PARTIAL), spec.size)
        made[spec.name] = device
        return NewDevice(device)

    async def on_authority(payload: bytes, devices: dict[str, WaitingCache]) -> None:
        handover = group.read_authority(payload)
        for cache in devices.values():
            await cache.wait_complete()  # the source streams the rest while it waits
        await group.store_state(handover, devices[Device.STATE])  # the state at its pause
        vm = await group.read_spec(devices[Device.SPEC])
        for source in made.values():
            await source.flush()
        for device, file in group.package_files(vm.config).items():
            if device in made:
                os.replace(out / (device + PARTIAL), out / file)
        (out / (Device.SPEC + PARTIAL)).unlink()
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

"""The registry: serves a package over the migration protocol, for lazy starts.

Each connection gets the package as a VM device group (roam.vm.group) and authority at
once (no pre-copy): the receiver starts the VM right away and the blocks it touches are
sent first, the rest streams behind them. The package is only read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from roam.migration.channel import Channel
from roam.migration.source import Policy, Source, SourceDevice, SourceHooks, SourceResult
from roam.peer.packages import package_id
from roam.storage.provider import Provider
from roam.storage.sources import MemorySource, SparseFileSource
from roam.vm import group
from roam.vm.group import Authority, Device, VMSpec
from roam.vm.package import Package

log = logging.getLogger(__name__)


async def _authority() -> bytes:
    # Nothing runs anywhere: the device state is the package's own, in the state device.
    return await group.write_authority(Authority(live=False), None)


async def serve_package(package_dir: Path, channel: Channel) -> SourceResult:
    """Send the package at `package_dir` to the receiver on `channel`."""
    package = Package.load(package_dir)
    spec = VMSpec(name=package_dir.resolve().name, config=package.config).device_bytes()
    spec_device = MemorySource(len(spec))
    await spec_device.write_at(0, spec)
    paths = group.package_paths(package)
    providers: dict[str, Provider] = {}
    for dev in group.ORDER:
        if dev == Device.SPEC:
            providers[dev] = spec_device
        elif dev in paths:
            providers[dev] = SparseFileSource(paths[dev], paths[dev].stat().st_size,
                                              create=False)
    devices = [SourceDevice.stack(name, provider, group.block_size(name))
               for name, provider in providers.items()]
    try:
        return await Source(channel, devices, SourceHooks(authority=_authority),
                            Policy(precopy=False), group_name=package_dir.resolve().name,
                            package=package_id(package.config)).run()
    finally:
        for device in devices:
            await device.tracker.close()

"""The registry: serves a package over the migration protocol, for lazy starts.

Each connection gets the package as a VM device group and authority at once (no
pre-copy): the receiver starts the VM right away and the blocks it touches are sent
first, the rest streams behind them. The package is only read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from roam.migration.channel import Channel
from roam.migration.source import Policy, Source, SourceDevice, SourceHooks, SourceResult
from roam.peer.instance import DISK, INITRAMFS, KERNEL, MEMORY, SPEC, STATE, VMSpec
from roam.storage.provider import Provider
from roam.storage.sources import MemorySource, SparseFileSource
from roam.vm.package import Package

log = logging.getLogger(__name__)


async def _authority() -> bytes:
    return b"{}"


async def serve_package(package_dir: Path, channel: Channel) -> SourceResult:
    """Send the package at `package_dir` to the receiver on `channel`."""
    package = Package.load(package_dir)
    config = package.config
    spec = VMSpec(name=package_dir.resolve().name, config=config).device_bytes()
    spec_device = MemorySource(len(spec))
    await spec_device.write_at(0, spec)
    files = config.files
    providers: dict[str, Provider] = {SPEC: spec_device}
    named = {KERNEL: files.kernel, INITRAMFS: files.initramfs, STATE: files.state,
             MEMORY: files.memory, DISK: files.disk}  # send order: see roam.peer.instance
    for name, file in named.items():
        if file is not None:
            path = package.path(file)
            providers[name] = SparseFileSource(path, path.stat().st_size, create=False)
    devices = [SourceDevice.stack(n, provider) for n, provider in providers.items()]
    try:
        return await Source(channel, devices, SourceHooks(authority=_authority),
                            Policy(precopy=False), group_name=package_dir.resolve().name).run()
    finally:
        for device in devices:
            await device.tracker.close()


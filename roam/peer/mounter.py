"""The mounter: one device of a remote package or VM, served locally without a VM.

From a registry (`--from`) the device is there at once: a read of a block that has not
arrived waits for it and asks for it first, the rest streams behind. From a running VM
(`roam migrate NAME --to` the mounter's `--listen` address) the mounter takes the VM's
state at its pause, waits for every block and declines authority, so the VM runs on at
its source; the mount then shows that instant.

The device is exposed as a file on a FUSE mount or as an NBD export on a UNIX socket.
Writes are kept locally (in the cache directory) and never go back to the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from roam.exposure.fuse import FuseMount
from roam.exposure.nbd.server import Export, NBDServer
from roam.migration.channel import Channel
from roam.migration.destination import Destination, NewDevice
from roam.migration.errors import Decline, MigrationError
from roam.migration.wire import DeviceSpec
from roam.peer.models import BACKUP
from roam.storage.sources import SparseFileSource
from roam.storage.waiting import WaitingCache
from roam.vm import group
from roam.vm.group import Device

log = logging.getLogger(__name__)


async def mount(channel: Channel, device: str, cache_dir: Path, stop: asyncio.Event, *,
                fuse_dir: Path | None = None, nbd_socket: Path | None = None) -> None:
    """Serve `device` of the group on `channel` until `stop` is set."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    made: list[SparseFileSource] = []

    async def make(spec: DeviceSpec) -> NewDevice:
        source = SparseFileSource(cache_dir / f"{spec.name}.img", spec.size)
        made.append(source)
        return NewDevice(source)

    async def on_authority(payload: bytes, devices: dict[str, WaitingCache]) -> None:
        if not payload:
            return  # a plain device group (`roam device serve`): nothing runs anywhere
        handover = group.read_authority(payload)
        if not handover.authority.live:
            return  # a registry: nothing runs anywhere, take it
        for cache in devices.values():  # a live VM: copy its pause, then give it back
            await cache.wait_complete()
        if Device.STATE in devices:
            await group.store_state(handover, devices[Device.STATE])
        raise Decline("mounted a copy; the VM runs on at its source")

    destination = Destination(channel, make, on_authority, prepared_payload=BACKUP)
    received = asyncio.create_task(destination.run())
    try:
        ready = asyncio.create_task(destination.ready.wait())
        await asyncio.wait([ready, received], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            received.result()
            raise MigrationError("the source ended before announcing its devices")
        if device not in destination.devices:
            raise MigrationError(f"no device {device!r}; the source has "
                                 f"{', '.join(destination.devices)}")
        await _serve(destination.devices[device], device, stop, fuse_dir, nbd_socket)
    finally:
        if not received.done():
            received.cancel()
        with contextlib.suppress(BaseException):
            await received
        for cache in destination.devices.values():
            await cache.close()
        for source in made:
            await source.close()


async def _serve(cache: WaitingCache, name: str, stop: asyncio.Event,
                 fuse_dir: Path | None, nbd_socket: Path | None) -> None:
    if fuse_dir is not None:
        fuse_dir.mkdir(parents=True, exist_ok=True)
        async with FuseMount(fuse_dir, {name: cache}) as mounted:
            log.info("%s is at %s", name, mounted.path(name))
            await stop.wait()
    elif nbd_socket is not None:
        server = NBDServer([Export(name, cache)])
        await server.serve_unix(nbd_socket)
        log.info("%s is exported as %r on %s", name, name, nbd_socket)
        try:
            await stop.wait()
        finally:
            await server.close()
    else:
        raise ValueError("give a FUSE directory or an NBD socket")

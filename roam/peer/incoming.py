"""Migration in: receive a VM's device group, start its machine early, take authority.

The devices are WaitingCaches as soon as the group is announced; once `vm.json` is
readable the instance exists (its control socket answers), the kernel files are read
out, and the machine starts waiting for its device state (`prepare`, after which the
destination sends PREPARED so the source may pause). Until the guest runs, memory blocks
go straight into the memory the machine will map (the driver's memory feeder). At
authority the device state from the payload is written into the state device, loaded,
and the guest runs; the rest streams in behind it (post-copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from roam.errors import ErrorCode, RoamError
from roam.hypervisor import HypervisorError
from roam.migration.channel import Channel
from roam.migration.destination import Destination, NewDevice
from roam.migration.errors import Decline
from roam.migration.wire import DeviceSpec
from roam.peer import syncing
from roam.peer.errors import PeerError
from roam.peer.instance import Instance, stacks
from roam.peer.memfill import MemoryFill
from roam.peer.models import Done, Prepared
from roam.peer.network import NetConfig
from roam.peer.outgoing import memory_digest
from roam.peer.packages import HeldPackages
from roam.storage.cow import CopyOnWrite
from roam.storage.provider import Provider
from roam.storage.sources import SparseFileSource
from roam.storage.waiting import WaitingCache
from roam.sync.crypto import SyncKey
from roam.sync.store import StoreURL
from roam.vm import group
from roam.vm.group import COW_BLOCK, Device
from roam.vm.states import VMState

log = logging.getLogger(__name__)

LIVENESS_TIMEOUT = 10.0  # seconds after authority for the guest's first answer


class Incoming:
    """Receive a VM into `workdir`. `name` and `publish` replace the sender's (a
    registry's package has neither). `held`: the packages this peer holds."""

    def __init__(self, channel: Channel, workdir: Path, netconf: NetConfig,
                 name: str | None = None, publish: list[str] | None = None,
                 held: HeldPackages | None = None) -> None:
        self.workdir = workdir
        self.held = held  # the packages this peer holds (their content is not sent)
        self.netconf = netconf
        self.overrides: dict[str, Any] = {}
        if name is not None:
            self.overrides["name"] = name
        if publish is not None:
            self.overrides["publish"] = publish
        self.destination = Destination(channel, self._make, self._authority, prepares=True,
                                       store=syncing.open_store,
                                       done_payload=self._liveness)
        self.instance: Instance | None = None
        self.prepared: asyncio.Task[None] | None = None
        self.started = asyncio.Event()  # `prepared` exists
        self.resumed = asyncio.Event()
        self._fill: MemoryFill | None = None
        self._filler: asyncio.Task[None] | None = None

    def fill_memory(self) -> None:
        """Until the VM resumes, every memory block the destination holds goes into the
        memory the machine maps, zero blocks included, and blocks the source sends again
        are dropped there (roam.peer.memfill): the resumed guest faults only on the
        blocks still missing at authority."""
        assert self.instance is not None
        feeder = self.instance.vm.machine.memory_feeder()
        if feeder is None:
            return
        cache = self.destination.devices[Device.MEMORY]
        self._fill = MemoryFill(feeder, cache)
        cache.on_arrived = self._fill.arrived
        cache.on_stale = self._fill.stale

    async def _stop_filling(self) -> None:
        """Before the guest runs: the last blocks in, then no more stores (the guest's
        own pages must not be replaced)."""
        if self._fill is None:
            return
        fill, self._fill = self._fill, None
        filler, self._filler = self._filler, None
        try:
            await fill.finish(filler)
        finally:
            cache = self.destination.devices[Device.MEMORY]
            cache.on_arrived = cache.on_stale = None

    async def close(self) -> None:
        """Whatever ended the incoming VM: no filler outlives it, and the feeder lets go
        of the memory file before the mount goes."""
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(BaseException):
                await self._filler
            self._filler = None
        if self._fill is not None:
            fill, self._fill = self._fill, None
            with contextlib.suppress(Exception):  # what failed was reported already
                await fill.feeder.close()

    async def _liveness(self) -> bytes:
        """DONE's payload: when the guest first answered here (Done), once it has, or
        nothing after LIVENESS_TIMEOUT (DONE, and the source's `roam migrate`, wait)."""
        assert self.instance is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.instance.agent_ready.wait(), LIVENESS_TIMEOUT)
        return Done(first_response_ms=self.instance.info.get("first_response_ms")
                    ).model_dump_json().encode()

    async def _make(self, spec: DeviceSpec) -> NewDevice:
        """A sparse file per device; memory and disk of a VM made from a package this
        peer holds are copy-on-write over the package's files instead, offered to the
        source by digest (it sends only what differs from them)."""
        device = group.device(spec.name)  # a VM's device, or the group is refused
        sent = self.destination.result.group
        if (self.held is not None and sent is not None and sent.package
                and device in (Device.MEMORY, Device.DISK)):
            held = await self.held.offer(sent.package, device, spec.size)
            if held is not None:
                log.info("%s: copy-on-write over the held package's %s", device, held.path)
                return NewDevice(CopyOnWrite(
                    SparseFileSource(held.path, spec.size, create=False),
                    SparseFileSource(self.workdir / f"{device}.upper", spec.size),
                    self.workdir / f"{device}.map", COW_BLOCK),
                    fresh=False, existing=True, digests=held.digests)
        return NewDevice(SparseFileSource(self.workdir / f"{spec.name}.img", spec.size))

    async def setup(self) -> Instance:
        """Once the devices exist: stacks over the waiting caches (with dirty trackers from
        the start, so the VM can move on later) and the vm.json spec."""
        caches = self.destination.devices
        spec = await group.read_spec(caches[Device.SPEC])  # asks first for missing blocks
        providers: dict[str, Provider] = dict(caches)
        self.instance = Instance(self.workdir, spec, self.workdir / "files", stacks(providers),
                                 self.netconf, VMState.INCOMING)
        if self.overrides:
            spec = spec.model_copy(update=self.overrides)
            self.instance.spec = spec
            await self.instance.tracker(Device.SPEC).write_at(0, spec.device_bytes())
        return self.instance

    async def prepare(self) -> None:
        """Kernel files out of their devices, then the network and the machine waiting for
        the state; then the source may pause the VM (PREPARED names our overlay address)."""
        assert self.instance is not None
        files = self.instance.files
        files.mkdir(exist_ok=True)
        names = group.package_files(self.instance.spec.config)
        for dev in (Device.KERNEL, Device.INITRAMFS):
            if dev in names:
                cache = self.destination.devices[dev]
                (files / names[dev]).write_bytes(bytes(await cache.read_at(0, cache.size())))
        await self.instance.start_machine()
        if self._fill is not None:  # the machine holds its memory now: fill it
            self._filler = asyncio.create_task(self._fill.run(), name="memory-fill")
        self.destination.prepared(Prepared(underlay=self.netconf.underlay).model_dump_json().encode())

    async def sync_on(self) -> None:
        """A VM whose source synced to an object store syncs there from here too, with
        the source's key (its objects are already there: unchanged chunks cost no PUT).
        A store that refuses us now is logged; the VM runs on without a sync."""
        descriptor = self.destination.store_descriptor
        if descriptor is None or self.instance is None:
            return
        try:
            await self.instance.start_sync(
                StoreURL.parse(descriptor.url), descriptor.endpoint_url,
                SyncKey(bytes.fromhex(descriptor.key)), syncing.SyncPolicy())
        except RoamError as exc:
            log.warning("%s does not sync on from here: %s", self.instance.spec.name, exc)

    async def _authority(self, payload: bytes, _: dict[str, WaitingCache]) -> None:
        await self.started.wait()
        instance = self.instance
        assert instance is not None and self.prepared is not None
        try:
            handover = group.read_authority(payload)
            await self.prepared
            await self._stop_filling()
            await group.store_state(handover, instance.tracker(Device.STATE))
            expected = handover.authority.memory_blake3
            if expected is not None:
                if await memory_digest(self.destination.devices[Device.MEMORY]) != expected:
                    raise PeerError("memory differs from the source's at its pause",
                                    code=ErrorCode.INTEGRITY)
                instance.info["memory_checked"] = True
            resumed = await instance.load_and_resume()
        except Exception as exc:
            log.warning("cannot resume the incoming VM: %s", exc, exc_info=True)
            raise Decline(f"destination cannot resume the VM: {exc}") from exc
        try:
            await instance.vm.machine.announce()
        except HypervisorError as exc:  # the guest runs; others learn its place when it talks
            log.warning("announce failed: %s", exc)
        stop_wall = handover.authority.stop_wall
        instance.paused_wall = stop_wall or None
        instance.info["downtime_ms"] = (resumed.wall - stop_wall) * 1000 if stop_wall else None
        instance.info["resumed_at"] = resumed.wall
        self.resumed.set()

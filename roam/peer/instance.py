"""One VM under a peer: its device stacks, its machine, its network and its state.

Each instance runs in a worker process of its own (pyfuse3 serves one mount per
process), which also gives every incoming VM a fresh FUSE mount: no page cache of an
earlier visit of the same VM can be read back. Migration out is roam.peer.outgoing,
migration in roam.peer.incoming; the device group is roam.vm.group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from roam import hypervisor
from roam.errors import ErrorCode
from roam.hypervisor import Machine, Nic
from roam.migration.channel import PeerLost, TLSFiles
from roam.migration.errors import LostPeer
from roam.migration.source import SourceDevice
from roam.network.overlay import OverlaySpec
from roam.network.vmnet import VmNetwork
from roam.peer import events, sealing, syncing
from roam.peer.errors import PeerError
from roam.peer.mirroring import MirrorJob
from roam.peer.models import ExecRequest, GcRequest, MigrateRequest, MirrorRequest, SyncRequest
from roam.peer.network import NetConfig
from roam.peer.outgoing import Outgoing, policy_from
from roam.storage.cow import CopyOnWrite
from roam.storage.provider import Provider
from roam.storage.sources import SparseFileSource
from roam.sync.crypto import SyncKey
from roam.sync.store import StoreURL
from roam.sync.syncer import SyncState
from roam.vm import control, group
from roam.vm.group import COW_BLOCK, Device, VMSpec
from roam.vm.lifecycle import VM, Resumed
from roam.vm.package import Package
from roam.vm.states import VMState, check_transition

log = logging.getLogger(__name__)

AGENT_TIMEOUT = 120.0


class Instance:
    """A VM in `workdir`; `devices` in group order, memory/disk/state written by it."""

    def __init__(self, workdir: Path, spec: VMSpec, files: Path,
                 devices: list[SourceDevice], netconf: NetConfig,
                 state: VMState = VMState.STARTING) -> None:
        self.workdir = workdir
        self.spec = spec
        self.netconf = netconf
        self.net: VmNetwork | None = None
        self.files = files  # directory with the kernel files the machine boots
        self.devices = {d.name: d for d in devices}
        self.order = [d.name for d in devices]
        self.state = state
        self.events = events.Hub()  # the peer follows the VM here (roam.peer.events)
        self.finished = asyncio.Event()  # set when this host no longer runs the VM
        self.incoming: asyncio.Task[Any] | None = None
        self.info: dict[str, Any] = {"pid": os.getpid(), "workdir": str(workdir)}
        self._vm: VM | None = None
        self.tls: TLSFiles | None = None  # the peer's files: outgoing migrations use them
        self.migrating = False
        self.fenced = False  # paused by its node's agent (handle_pause), not a migration
        self.agent_ready = asyncio.Event()
        self.sync: syncing.SyncJob | None = None  # its continuous sync (roam.peer.syncing)
        self.mirror: MirrorJob | None = None  # its standby mirror (roam.peer.mirroring)
        self.paused_wall: float | None = None  # time.time() of the pause before arriving

    @property
    def vm(self) -> VM:
        if self._vm is None:
            raise PeerError(f"{self.spec.name} has no machine yet")
        return self._vm

    def set_state(self, new: VMState) -> None:
        check_transition(self.state, new)
        log.info("%s: %s -> %s", self.spec.name, self.state, new)
        self.state = new
        events.changed(self)  # the peer's VM table and /events learn it at once

    def tracker(self, name: str) -> Provider:
        return self.devices[name].tracker

    def below_tracker(self, name: str) -> Provider:
        """Device `name` under its dirty tracker: reads and writes here are not migrating
        (the device state saved at a handover travels in the payload, not as blocks)."""
        return self.devices[name].tracker.inner

    @contextlib.asynccontextmanager
    async def exposure(self) -> AsyncIterator[Machine]:
        """The machine on this VM's devices, not started yet (the driver the package was
        made with exposes them its own way)."""
        config = self.spec.config
        driver = hypervisor.driver(config.driver().name)
        async with driver.machine(config.machine_spec(self.files), self.workdir,
                                  self.tracker(Device.MEMORY),
                                  self.tracker(Device.DISK)) as machine:
            self._vm = VM(machine)
            yield machine

    async def start_machine(self) -> None:
        """The VM's network on this host, then the machine on its tap, waiting for its
        device state."""
        config = self.spec.config
        self.net = await self.netconf.vm_network(self.spec.name, self.spec.overlay,
                                                 self.spec.forwards())
        assert self.net.tap_fd is not None  # local and runner networks have a tap
        self.info["netns"] = self.net.netns
        self.info.update(accel=config.accel, memory_mib=config.memory_mib, cpus=config.cpus,
                         hypervisor=config.driver().name)
        await self.vm.machine.start_incoming(Nic.tap(self.net.tap_fd))
        self.info["qemu_pid"] = self.vm.machine.pid

    async def load_and_resume(self) -> Resumed:
        """Load the state device into the started machine and run it."""
        resumed = await self.vm.load_and_run(self.tracker(Device.STATE))
        self.info["load_state_ms"] = resumed.load_state_ms
        self.info["resumed_at"] = resumed.wall
        self.info["cont_ms"] = resumed.cont_ms
        self.set_state(VMState.RUNNING)
        return resumed

    async def after_resume(self) -> None:
        answered = await self.vm.attach_agent()
        if self.paused_wall is not None:  # arrived by migration: its liveness
            self.info["first_response_ms"] = (answered - self.paused_wall) * 1000
            log.info("%s answered %.1f ms after its pause on the source", self.spec.name,
                     self.info["first_response_ms"])
        self.agent_ready.set()

    # -- control requests --------------------------------------------------------------

    async def handle_info(self, _: control.Json) -> control.Json:
        return events.describe(self).model_dump(mode="json")

    async def handle_exec(self, params: control.Json) -> control.Json:
        request = ExecRequest.model_validate(params)
        if self.state in (VMState.STARTING, VMState.INCOMING, VMState.RUNNING):
            await asyncio.wait_for(self.agent_ready.wait(), AGENT_TIMEOUT)
        if self.state != VMState.RUNNING:
            raise PeerError(f"{self.spec.name} is {self.state}", code=ErrorCode.CONFLICT)
        return asdict(await self.vm.exec(request.argv, request.timeout))

    async def handle_stop(self, _: control.Json) -> control.Json:
        if self.migrating:
            raise PeerError(f"{self.spec.name} is migrating", code=ErrorCode.BUSY)
        self.set_state(VMState.STOPPED)
        self.finished.set()
        return {}

    async def handle_resume(self, _: control.Json) -> control.Json:
        """Settle an in-doubt migration in favour of this host (only once the operator
        knows that the destination does not run the VM), or run a VM its node paused."""
        if self.state != VMState.IN_DOUBT and not (self.state == VMState.PAUSED
                                                   and self.fenced):
            raise PeerError(f"{self.spec.name} is {self.state}, neither in doubt nor "
                            "paused by its node", code=ErrorCode.CONFLICT)
        await self.vm.resume_paused()
        self.fenced = False
        self.set_state(VMState.RUNNING)
        return events.describe(self).model_dump(mode="json")

    async def handle_pause(self, _: control.Json) -> control.Json:
        """Pause a running VM until `resume`: its node's agent fences it when it can no
        longer renew its lease, since the control plane may then run it elsewhere
        (roam.control.fence)."""
        if self.migrating or self.state != VMState.RUNNING:
            raise PeerError(f"{self.spec.name} is {self.state}"
                            f"{' and migrating' if self.migrating else ''}, not running",
                            code=ErrorCode.CONFLICT)
        await self.vm.machine.pause()
        self.fenced = True
        self.set_state(VMState.PAUSED)
        return events.describe(self).model_dump(mode="json")

    async def handle_sync(self, params: control.Json) -> control.Json:
        """Start syncing to an object store (params: the SyncRequest and the peer's key
        file). A store that refuses us is this request's error; the VM runs on."""
        request = SyncRequest.model_validate(params.get("request"))
        if self.state not in (VMState.RUNNING, VMState.MIGRATING):
            raise PeerError(f"{self.spec.name} is {self.state}, not running",
                            code=ErrorCode.CONFLICT)
        if self.sync is not None and self.sync.task is not None and not self.sync.task.done():
            raise PeerError(f"{self.spec.name} syncs to {self.sync.info().to} already "
                            "(stop that first)", code=ErrorCode.CONFLICT)
        key = SyncKey.load(Path(str(params.get("key_file"))))
        await self.start_sync(StoreURL.parse(request.to), request.endpoint_url, key,
                              syncing.policy_of(request))
        assert self.sync is not None
        if request.checkpoint_every is not None:
            self.sync.checkpointer = asyncio.create_task(
                sealing.checkpoints(self, self.sync, request.checkpoint_every))
        return self.sync.info().model_dump(mode="json")

    async def start_sync(self, url: StoreURL, endpoint_url: str | None, key: SyncKey,
                         policy: syncing.SyncPolicy) -> None:
        self.sync = await syncing.start(self, url, endpoint_url, key, policy)
        events.changed(self)

    async def handle_sync_stop(self, _: control.Json) -> control.Json:
        if self.sync is None:
            raise PeerError(f"{self.spec.name} does not sync", code=ErrorCode.CONFLICT)
        job, self.sync = self.sync, None
        await job.stop()
        events.changed(self)
        return {}

    async def handle_sync_gc(self, params: control.Json) -> control.Json:
        if self.sync is None:
            raise PeerError(f"{self.spec.name} does not sync: start its sync to collect "
                            "garbage where it syncs", code=ErrorCode.CONFLICT)
        result = await syncing.collect(self.sync, GcRequest.model_validate(params))
        return result.model_dump(mode="json")

    async def handle_hibernate(self, _: control.Json) -> control.Json:
        """Once the sync caught up: a final sealed point, and the VM stops (for good
        here: `roam peer run --from` resumes it from the bucket)."""
        job = self.sync
        if job is None or job.task is None or job.task.done():
            raise PeerError(f"{self.spec.name} does not sync: nothing to hibernate to",
                            code=ErrorCode.CONFLICT)
        while job.syncer.state != SyncState.RUNNING:  # the first pass is not over
            if job.task.done():
                raise PeerError(f"{self.spec.name}'s sync stopped: {job.info().error}",
                                code=ErrorCode.CONFLICT)
            await asyncio.sleep(0.2)
        point = await sealing.seal(self, job, stop=True)
        self.set_state(VMState.STOPPED)
        self.finished.set()
        return point.model_dump(mode="json")

    async def handle_mirror(self, params: control.Json) -> control.Json:
        """Start mirroring to a standby peer (params: a MirrorRequest)."""
        request = MirrorRequest.model_validate(params)
        if self.state != VMState.RUNNING:
            raise PeerError(f"{self.spec.name} is {self.state}, not running",
                            code=ErrorCode.CONFLICT)
        if self.mirror is not None and self.mirror.task is not None \
                and not self.mirror.task.done():
            raise PeerError(f"{self.spec.name} mirrors to {self.mirror.request.to} already "
                            "(stop that first)", code=ErrorCode.CONFLICT)
        job = MirrorJob(self, request)
        try:
            await job.start()
        except PeerLost as exc:
            raise LostPeer(str(exc)) from exc
        self.mirror = job
        events.changed(self)
        return job.info().model_dump(mode="json")

    async def handle_mirror_stop(self, _: control.Json) -> control.Json:
        if self.mirror is None:
            raise PeerError(f"{self.spec.name} has no mirror", code=ErrorCode.CONFLICT)
        job, self.mirror = self.mirror, None
        await job.stop()
        events.changed(self)
        return {}

    async def handle_migrate(self, params: control.Json) -> control.Json:
        request = MigrateRequest.model_validate(params)
        if self.state in (VMState.STARTING, VMState.INCOMING):
            await self.agent_ready.wait()  # a VM that just arrived can move on at once
        if self.migrating:
            raise PeerError(f"{self.spec.name} is migrating already", code=ErrorCode.BUSY)
        if self.state != VMState.RUNNING:
            raise PeerError(f"{self.spec.name} is {self.state}, not running",
                            code=ErrorCode.CONFLICT)
        started = time.perf_counter()
        try:
            result = await Outgoing(self, policy_from(request.model_dump()),
                                    request.check_memory).run(request.to)
        except PeerLost as exc:  # connecting failed: the engine never ran
            error = LostPeer(str(exc))
            events.migration_ended(self, request.to, started, error)
            raise error from exc
        except BaseException as exc:
            events.migration_ended(self, request.to, started, exc)
            raise
        events.migration_ended(self, request.to, started, result)
        return asdict(result)

    async def close(self) -> None:
        if self.mirror is not None:
            mirror, self.mirror = self.mirror, None
            await mirror.stop()
        if self.sync is not None:
            job, self.sync = self.sync, None
            await job.stop()
        if self._vm is not None:
            await self._vm.close()
        if self.net is not None:
            await self.netconf.host().down(self.net)
            self.net = None


# -- building instances ------------------------------------------------------------------


def stacks(providers: dict[str, Provider]) -> list[SourceDevice]:
    """Each device under a dirty tracker (so the VM can move on), in the given order."""
    return [SourceDevice.stack(name, provider, group.block_size(name))
            for name, provider in providers.items()]


def from_package(package_dir: Path, name: str, publish: list[str], workdir: Path,
                 netconf: NetConfig, overlay_spec: OverlaySpec | None = None) -> Instance:
    """A VM resumed from a package, copy-on-write: the package itself is never changed."""
    package = Package.load(package_dir)
    spec = VMSpec(name=name, config=package.config, publish=publish, overlay=overlay_spec)
    (workdir / Device.SPEC).write_bytes(spec.device_bytes())
    paths = group.package_paths(package)
    sizes = group.device_sizes(package)
    providers: dict[str, Provider] = {}
    for dev in group.ORDER:
        if dev == Device.SPEC:
            providers[dev] = _file(workdir / Device.SPEC)
        elif dev in sizes:
            providers[dev] = CopyOnWrite(
                SparseFileSource(paths[dev], sizes[dev], create=False),
                SparseFileSource(workdir / f"{dev}.upper", sizes[dev]),
                workdir / f"{dev}.map", COW_BLOCK)
        elif dev in paths:
            providers[dev] = _file(paths[dev])
    instance = Instance(workdir, spec, package_dir, stacks(providers), netconf)
    instance.info["package"] = str(package_dir.resolve())
    return instance


def _file(path: Path) -> SparseFileSource:
    return SparseFileSource(path, path.stat().st_size, create=False)

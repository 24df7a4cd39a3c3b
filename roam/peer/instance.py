"""One VM under a peer: its device stacks, its QEMU, and its migrations in and out.

Each instance runs in a worker process of its own (pyfuse3 serves one mount per
process), which also gives every incoming VM a fresh FUSE mount: no page cache of an
earlier visit of the same VM can be read back.

The group sent to a destination: `vm.json` (what QEMU needs to be started the same way),
kernel, initramfs, state, memory and disk. The engine sends devices in group order, so
the small static devices go first (the destination starts QEMU, waiting for incoming
state, while memory still streams) and after the handover the device state streams
before the last memory blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import blake3
from pydantic import BaseModel

from roam.errors import ErrorCode, RoamError
from roam.exposure.fuse.cache import PageCacheFeeder
from roam.guest.client import GuestAgentError, GuestClient
from roam.migration.channel import Address, Channel, PeerLost, TLSFiles, connect
from roam.migration.destination import Destination, NewDevice
from roam.migration.errors import (
    Decline,
    Declined,
    InDoubt,
    LostPeer,
    MigrationError,
    PostcopyFailed,
)
from roam.migration.source import Policy, Source, SourceDevice, SourceHooks
from roam.migration.wire import DeviceSpec, Encoding
from roam.network import overlay
from roam.network.forward import PortForward
from roam.network.vmnet import VmNetwork
from roam.peer import events
from roam.peer.models import ExecRequest, MigrateRequest, Prepared
from roam.peer.network import NetConfig, OverlaySpec
from roam.storage.overlay import CowOverlay
from roam.storage.provider import DEFAULT_BLOCK_SIZE, Provider
from roam.storage.sources import MemorySource, SparseFileSource
from roam.storage.waiting import WaitingCache, block_runs
from roam.vm import control, state
from roam.vm.accel import Accel
from roam.vm.devices import MEMORY_FILE, Exposed, exposed
from roam.vm.machine import Netdev, qemu_config
from roam.vm.package import Package, PackageConfig
from roam.vm.qemu import QemuError, QemuVM
from roam.vm.runner import OVERLAY_BLOCK, connect_agent

log = logging.getLogger(__name__)

SPEC, KERNEL, INITRAMFS, MEMORY, DISK, STATE = (
    "vm.json", "kernel", "initramfs", "memory", "disk", "state")
STATIC = (SPEC, KERNEL, INITRAMFS)
DIGEST_CHUNK = 4 << 20
SPEC_SIZE = 64 << 10
AGENT_TIMEOUT = 120.0
MEMORY_BLOCK = 4096
"""Memory is tracked and sent per guest page: a guest writing scattered pages would cost
a whole 64 KiB block each (several times the bytes, and a final dirty list as large)."""
COMPRESSIONS = {"none": Encoding.RAW, "zstd": Encoding.ZSTD, "lz4": Encoding.LZ4}


class VMSpec(BaseModel):
    """vm.json: the package config plus what this run added (name, port forwards, or the
    overlay segment whose gateway publishes its ports)."""

    name: str
    config: PackageConfig
    publish: list[str] = []
    overlay: OverlaySpec | None = None

    def forwards(self) -> list[PortForward]:
        return [PortForward.parse(p) for p in self.publish]

    def device_bytes(self) -> bytes:
        """The `vm.json` device: fixed size, so that a receiver can rewrite it (a new name
        or new port forwards) and pass that on at the next hop."""
        data = self.model_dump_json().encode()
        if len(data) > SPEC_SIZE:
            raise PeerError(f"vm.json is {len(data)} bytes, more than {SPEC_SIZE}")
        return data.ljust(SPEC_SIZE, b"\0")

    @classmethod
    def from_device(cls, data: bytes) -> VMSpec:
        return cls.model_validate_json(data.rstrip(b"\0"))


class PeerError(Exception):
    """A peer request failed; the message says why."""


@dataclass
class Migrated:
    """What the source learns from one migration out."""

    outcome: str
    bytes_sent: int
    total_ms: float
    cycles: int
    dirty_per_cycle: list[int]
    final_dirty: int
    handover_ms: float  # QMP stop to authority sent
    state_save_ms: float  # QMP stop to the device state saved and memory flushed
    downtime_ms: float  # QMP stop to the destination's acknowledgement (an upper bound)
    priority_blocks: int


def policy_from(params: dict[str, Any]) -> Policy:
    defaults = Policy()
    return Policy(
        max_dirty_blocks=int(params.get("max_dirty_blocks", defaults.max_dirty_blocks)),
        min_cycles=int(params.get("min_cycles", defaults.min_cycles)),
        max_cycles=int(params.get("max_cycles", defaults.max_cycles)),
        cycle_throttle=float(params.get("cycle_throttle", defaults.cycle_throttle)),
        postcopy=bool(params.get("postcopy", defaults.postcopy)),
        compression=COMPRESSIONS[str(params.get("compression", "none"))],
        verify=bool(params.get("verify", defaults.verify)),
    )


class Instance:
    """A VM in `workdir`; `devices` in group order, memory/disk/state written by QEMU."""

    def __init__(self, workdir: Path, spec: VMSpec, files: Path,
                 devices: list[SourceDevice], netconf: NetConfig) -> None:
        self.workdir = workdir
        self.spec = spec
        self.netconf = netconf
        self.net: VmNetwork | None = None
        self.files = files  # directory with the kernel files QEMU boots
        self.devices = {d.name: d for d in devices}
        self.order = [d.name for d in devices]
        self.events = events.Hub()  # the peer follows the VM here (roam.peer.events)
        self.state = "starting"
        self.finished = asyncio.Event()  # set when this host no longer runs the VM
        self.incoming: asyncio.Task[Any] | None = None
        self.info: dict[str, Any] = {"pid": os.getpid(),
                                     "workdir": str(workdir)}
        self._vm: QemuVM | None = None
        self._agent: GuestClient | None = None
        self._exposed: Exposed | None = None
        self.tls: TLSFiles | None = None  # the peer's files: outgoing migrations use them
        self._migrating = False
        self.agent_ready = asyncio.Event()

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        """Every change reaches the peer (its VM table, /events) as it happens."""
        self._state = value
        events.changed(self)

    @property
    def vm(self) -> QemuVM:
        assert self._vm is not None
        return self._vm

    def tracker(self, name: str) -> Provider:
        return self.devices[name].tracker

    @contextlib.asynccontextmanager
    async def exposure(self) -> AsyncIterator[Exposed]:
        async with exposed(self.workdir, self.tracker(MEMORY), self.tracker(DISK)) as exp:
            self._exposed = exp
            yield exp

    async def start_qemu(self) -> None:
        """The VM's network on this host, then QEMU on its tap, waiting for incoming device
        state, on the exposed devices."""
        assert self._exposed is not None
        config = self.spec.config
        accel = Accel(config.accel, "the VM was snapshotted under it")
        self.net = await self.netconf.vm_network(self.spec.name, self.spec.overlay,
                                                 self.spec.forwards())
        assert self.net.tap_fd is not None  # local and runner networks have a tap
        self.info["netns"] = self.net.netns
        self._vm = QemuVM(qemu_config(config, self.files, self.workdir, self._exposed, accel,
                                      Netdev.tap(self.net.tap_fd)),
                          self.workdir / "qemu.log")
        self.info.update(accel=accel.name, memory_mib=config.memory_mib, cpus=config.cpus)
        await self._vm.start(incoming=True)
        self.info["qemu_pid"] = self._vm.pid

    async def load_and_resume(self, saved: Provider | None = None) -> float:
        """Load the saved state (from `saved`, else the state device), cont; returns the
        wall clock time at which cont returned."""
        started = time.perf_counter()
        await self.vm.load_state(saved or self.tracker(STATE))
        loaded = time.perf_counter()
        await self.vm.resume()
        resumed = time.time()
        self.info["load_state_ms"] = (loaded - started) * 1000
        self.info["cont_ms"] = (time.perf_counter() - loaded) * 1000
        self.state = "running"
        return resumed

    async def after_resume(self) -> None:
        self._agent = await self.vm.guard(connect_agent(self.workdir / "agent.sock"))
        await self.vm.guard(self._agent.after_resume())
        self.agent_ready.set()

    # -- control requests --------------------------------------------------------------

    async def handle_info(self, _: control.Json) -> control.Json:
        return events.describe(self).model_dump(mode="json")

    async def handle_exec(self, params: control.Json) -> control.Json:
        request = ExecRequest.model_validate(params)
        if self.state in ("starting", "incoming", "running"):
            await asyncio.wait_for(self.agent_ready.wait(), AGENT_TIMEOUT)
        if self._agent is None or self.state != "running":
            raise RoamError(f"{self.spec.name} is {self.state}", code=ErrorCode.CONFLICT)
        return asdict(await self._agent.exec(request.argv, timeout=request.timeout))

    async def handle_stop(self, _: control.Json) -> control.Json:
        if self._migrating:
            raise RoamError(f"{self.spec.name} is migrating", code=ErrorCode.BUSY)
        self.state = "stopped"
        self.finished.set()
        return {}

    async def handle_resume(self, _: control.Json) -> control.Json:
        """Settle an in-doubt migration in favour of this host: only once the operator
        knows that the destination does not run the VM."""
        if self.state != "in-doubt":
            raise RoamError(f"{self.spec.name} is {self.state}, not in doubt",
                            code=ErrorCode.CONFLICT)
        await self.vm.resume()
        self.state = "running"
        if self._agent is not None:
            await self.vm.guard(self._agent.after_resume())
        return events.describe(self).model_dump(mode="json")

    async def handle_migrate(self, params: control.Json) -> control.Json:
        request = MigrateRequest.model_validate(params)
        if self.state in ("starting", "incoming"):
            await self.agent_ready.wait()  # a VM that just arrived can move on at once
        if self._migrating:
            raise RoamError(f"{self.spec.name} is migrating already", code=ErrorCode.BUSY)
        if self.state != "running" or self._agent is None:
            raise RoamError(f"{self.spec.name} is {self.state}, not running",
                            code=ErrorCode.CONFLICT)
        self._migrating = True
        started = time.perf_counter()
        try:
            result = await self.migrate_out(Address.parse(request.to),
                                            policy_from(request.model_dump()),
                                            request.check_memory)
        except PeerLost as exc:  # connecting failed: the engine never ran
            error = LostPeer(str(exc))
            events.migration_ended(self, request.to, started, error)
            raise error from exc
        except BaseException as exc:
            events.migration_ended(self, request.to, started, exc)
            raise
        finally:
            self._migrating = False
        events.migration_ended(self, request.to, started, result)
        return asdict(result)

    # -- migration out -----------------------------------------------------------------

    async def migrate_out(self, to: Address, policy: Policy,
                          check_memory: bool = False) -> Migrated:
        """Move the VM to the peer at `to`. With `check_memory` the destination compares
        its memory device with ours at the pause before it resumes (and declines if they
        differ); that costs a full read of memory on both sides inside the downtime."""
        if self.incoming is not None:
            await self.incoming  # post-copy of the previous hop must be over
        channel = await connect(to, self.tls)
        marks: dict[str, float] = {}
        exp = self._exposed
        assert exp is not None and self._agent is not None
        agent = self._agent
        redirected = False

        async def before_suspend() -> None:
            try:
                await self.vm.guard(agent.before_suspend())
            except GuestAgentError as exc:
                log.warning("before_suspend failed, suspending anyway: %s", exc)

        async def suspend() -> None:
            nonlocal redirected
            # Write back what the guest dirtied during the last cycle while it still runs:
            # the flush after the pause then carries only the last few milliseconds.
            await exp.flush_memory()
            if self.spec.overlay is not None:
                # Frames still reaching this host go on to the destination's tap, which
                # its paused QEMU holds open: they wait there instead of being lost.
                assert self.net is not None
                prepared = json.loads(source.result.prepared or b"{}")
                if not prepared.get("underlay"):
                    raise PeerError("the destination peer is not on the VM's overlay "
                                    "(no --underlay)")
                redirected = True
                await overlay.redirect(self.net, self.spec.config.mac, prepared["underlay"])
            marks["stop_wall"] = time.time()
            marks["stop"] = time.perf_counter()
            await self.vm.pause()
            self.state = "paused"
            # The memory flush overlaps QEMU's state save; the engine's flush after this
            # hook then finds (almost) nothing left.
            await asyncio.gather(self.vm.save_state(self.tracker(STATE)), exp.flush_memory())
            marks["saved"] = time.perf_counter()

        async def authority() -> bytes:
            payload: dict[str, Any] = {"stop_wall": marks["stop_wall"]}
            # Below the trackers: reading for the payload is not migrating.
            if check_memory:
                payload["memory_blake3"] = await digest(self.devices[MEMORY].tracker.inner)
            saved = self.devices[STATE].tracker.inner
            blob = await saved.read_at(0, state.HEADER_SIZE + await state.state_length(saved))
            marks["authority"] = time.perf_counter()
            return b"".join((json.dumps(payload).encode(), b"\0", blob))

        async def resume() -> None:
            if redirected:
                assert self.net is not None
                await overlay.restore(self.net, self.spec.config.mac)
            if self.state == "paused":
                await self.vm.resume()
                self.state = "running"
                await self.vm.guard(agent.after_resume())

        self.state = "migrating"
        hooks = SourceHooks(before_collect=exp.flush_memory, before_suspend=before_suspend,
                            suspend=suspend, authority=authority, resume=resume,
                            progress=events.progress(self))
        source = Source(channel, [self.devices[n] for n in self.order], hooks,
                        replace(policy, await_prepared=True), group_name=self.spec.name)
        try:
            result = await source.run()
        except InDoubt:
            self.state = "in-doubt"  # paused here; an operator decides
            raise
        except PostcopyFailed:
            self.state = "handed-over"  # the destination owns it: never resume here
            raise
        except Exception:
            if self.state == "migrating":  # never paused: nothing to undo
                self.state = "running"
            raise
        finally:
            await channel.close()
        if result.outcome == "completed":
            self.state = "migrated"
            self.finished.set()
        elif not Prepared.model_validate_json(result.prepared or b"{}").backup:
            raise Declined(f"the destination declined the VM ({result.decline_reason}); "
                           "it runs on here")
        return Migrated(
            outcome=result.outcome, bytes_sent=result.bytes_sent,
            total_ms=result.total_seconds * 1000, cycles=result.cycles,
            dirty_per_cycle=result.dirty_per_cycle, final_dirty=result.final_dirty,
            handover_ms=(marks["authority"] - marks["stop"]) * 1000 if marks else 0.0,
            state_save_ms=(marks["saved"] - marks["stop"]) * 1000 if marks else 0.0,
            downtime_ms=_ack_downtime(marks, result.suspended_seconds,
                                      result.handover_seconds),
            priority_blocks=result.priority_blocks)

    async def close(self) -> None:
        if self._agent is not None:
            await self._agent.close()
        if self._vm is not None:
            await self._vm.stop()
        if self.net is not None:
            await self.netconf.host().down(self.net)
            self.net = None


async def digest(device: Provider) -> str:
    """blake3 of a whole device, for comparing two copies."""
    hasher = blake3.blake3()
    size = device.size()
    for offset in range(0, size, DIGEST_CHUNK):
        hasher.update(await device.read_at(offset, min(DIGEST_CHUNK, size - offset)))
    return hasher.hexdigest()


def _ack_downtime(marks: dict[str, float], suspended: float, handover: float) -> float:
    """QMP stop to the acknowledgement, from the source's clock: the suspend hook started
    `handover` seconds before authority was sent and `suspended` before the answer."""
    if "stop" not in marks:
        return 0.0
    hook_started = marks["authority"] - handover
    return (hook_started + suspended - marks["stop"]) * 1000


# -- building instances ------------------------------------------------------------------


def _stacks(providers: dict[str, Provider]) -> list[SourceDevice]:
    return [SourceDevice.stack(name, provider, MEMORY_BLOCK if name == MEMORY else
                               DEFAULT_BLOCK_SIZE) for name, provider in providers.items()]


def from_package(package_dir: Path, name: str, publish: list[str], workdir: Path,
                 netconf: NetConfig, overlay_spec: OverlaySpec | None = None) -> Instance:
    """A VM resumed from a package, copy-on-write: the package itself is never changed."""
    package = Package.load(package_dir)
    config = package.config
    spec = VMSpec(name=name, config=config, publish=publish, overlay=overlay_spec)
    (workdir / SPEC).write_bytes(spec.device_bytes())
    files = config.files
    static: dict[str, Provider] = {
        SPEC: _file(workdir / SPEC),
        KERNEL: _file(package.path(files.kernel)),
    }
    if files.initramfs is not None:
        static[INITRAMFS] = _file(package.path(files.initramfs))
    # Group order is send order: the device state (needed first at the handover), memory,
    # then the disk.
    sizes = {STATE: (files.state, config.state_size), MEMORY: (files.memory, package.memory_size),
             DISK: (files.disk, config.disk_size)}
    written = {
        dev: CowOverlay(SparseFileSource(package.path(file), size, create=False),
                        SparseFileSource(workdir / f"{dev}.upper", size),
                        workdir / f"{dev}.map", OVERLAY_BLOCK)
        for dev, (file, size) in sizes.items()}
    instance = Instance(workdir, spec, package_dir, _stacks({**static, **written}), netconf)
    instance.info["package"] = str(package_dir.resolve())
    return instance


def _file(path: Path) -> SparseFileSource:
    return SparseFileSource(path, path.stat().st_size, create=False)


class Incoming:
    """Receive a VM: devices as they arrive, QEMU started early, authority taken at once."""

    def __init__(self, channel: Channel, workdir: Path, netconf: NetConfig,
                 name: str | None = None, publish: list[str] | None = None) -> None:
        self.workdir = workdir
        self.netconf = netconf
        self.overrides: dict[str, Any] = {}
        if name is not None:
            self.overrides["name"] = name
        if publish is not None:
            self.overrides["publish"] = publish
        self.destination = Destination(channel, self._make, self._authority, prepares=True)
        self.instance: Instance | None = None
        self.prepared: asyncio.Task[None] | None = None
        self.started = asyncio.Event()  # `prepared` exists
        self.resumed = asyncio.Event()
        self._feeder: PageCacheFeeder | None = None

    def fill_page_cache(self, exp: Exposed) -> None:
        """Until the VM resumes, memory blocks go into the page cache of the file QEMU maps
        as they arrive, and blocks the source sends again are invalidated there
        (roam.exposure.fuse.cache): the resumed guest then faults on almost nothing."""
        cache = self.destination.devices[MEMORY]
        size = cache.block_size
        feeder = exp.mount.page_cache(MEMORY_FILE)

        def stale(blocks: list[int]) -> None:
            for first, count in block_runs(blocks):
                feeder.invalidate(first * size, count * size)

        cache.on_arrived = feeder.store
        cache.on_stale = stale
        self._feeder = feeder

    async def _stop_filling(self) -> None:
        """Before the guest runs: after that, its own pages must not be replaced."""
        if self._feeder is None:
            return
        cache = self.destination.devices[MEMORY]
        cache.on_arrived = cache.on_stale = None
        feeder, self._feeder = self._feeder, None
        await feeder.close()
        log.info("page cache before the resume: %.0f MiB stored (%.0f MiB before QEMU held "
                 "the file), %.1f MiB invalidated", feeder.stored / 2**20,
                 feeder.skipped / 2**20, feeder.invalidated / 2**20)

    async def _make(self, spec: DeviceSpec) -> NewDevice:
        if spec.name not in (*STATIC, MEMORY, DISK, STATE):
            raise MigrationError(f"unknown device {spec.name!r} in a VM group")
        return NewDevice(SparseFileSource(self.workdir / f"{spec.name}.img", spec.size))

    async def setup(self) -> Instance:
        """Once the devices exist: stacks over the waiting caches (with dirty trackers from
        the start, so the VM can move on later) and the vm.json spec."""
        caches = self.destination.devices
        spec_cache = caches[SPEC]  # reads ask for missing blocks first (lazy starts)
        spec = VMSpec.from_device(bytes(await spec_cache.read_at(0, spec_cache.size())))
        providers: dict[str, Provider] = dict(caches)
        self.instance = Instance(self.workdir, spec, self.workdir / "files", _stacks(providers),
                                 self.netconf)
        self.instance.state = "incoming"
        if self.overrides:
            spec = spec.model_copy(update=self.overrides)
            self.instance.spec = spec
            await self.instance.tracker(SPEC).write_at(0, spec.device_bytes())
        return self.instance

    async def prepare(self) -> None:
        """Kernel files out of their devices, then the network and QEMU waiting for the
        state; then the source may pause the VM (PREPARED names our overlay address)."""
        assert self.instance is not None
        files = self.instance.files
        files.mkdir(exist_ok=True)
        names = self.instance.spec.config.files
        wanted = {KERNEL: names.kernel}
        if names.initramfs is not None:
            wanted[INITRAMFS] = names.initramfs
        for device, file in wanted.items():
            cache = self.destination.devices[device]
            (files / file).write_bytes(bytes(await cache.read_at(0, cache.size())))
        await self.instance.start_qemu()
        self.destination.prepared(json.dumps({"underlay": self.netconf.underlay}).encode())

    async def _authority(self, payload: bytes, __: dict[str, WaitingCache]) -> None:
        await self.started.wait()
        assert self.instance is not None and self.prepared is not None
        # The device state rides in the payload: the destination loads it at once instead
        # of fetching the state device's last blocks (which still arrive, unused).
        head, _, blob = payload.partition(b"\0")
        meta = json.loads(head or b"{}")
        saved: Provider | None = None
        if blob:
            saved = MemorySource(len(blob))
            await saved.write_at(0, blob)
        try:
            await self.prepared
            await self._stop_filling()
            if "memory_blake3" in meta:
                if await digest(self.destination.devices[MEMORY]) != meta["memory_blake3"]:
                    raise PeerError("memory differs from the source's at its pause")
                self.instance.info["memory_checked"] = True
            resumed = await self.instance.load_and_resume(saved)
        except Exception as exc:
            log.warning("cannot resume the incoming VM: %s", exc, exc_info=True)
            raise Decline(f"destination cannot resume the VM: {exc}") from exc
        try:
            await overlay.announce(self.instance.vm)
        except QemuError as exc:  # the guest runs; others learn its place when it talks
            log.warning("announce-self failed: %s", exc)
        stop_wall = float(meta.get("stop_wall", 0.0))
        self.instance.info["downtime_ms"] = (resumed - stop_wall) * 1000 if stop_wall else None
        self.instance.info["resumed_at"] = resumed
        self.resumed.set()

"""`roam peer serve`: the per-host supervisor of VM workers.

It accepts migration connections on its listen address and hands each one, as a file
descriptor, to a new worker process that receives the VM; it starts workers for runs; it
keeps a table of its VMs from the events its workers send (roam.peer.events,
roam.peer.table); it serves the HTTP API (roam.peer.api) on `STATE_DIR/peer.sock` and,
with `api_listen`, on TCP with mutual TLS, forwarding requests for a VM to the worker
that runs it. It holds the overlay gateways of this host itself: they outlive the VMs'
visits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import roam
from roam import hypervisor
from roam.errors import ErrorCode, RoamError
from roam.migration.channel import Address, TLSFiles
from roam.network.forward import PortForward
from roam.network.overlay import OverlaySpec
from roam.network.vmnet import VmNetwork
from roam.peer import api, host, mirrored, sealing, statedir, syncing, systemd
from roam.peer.client import PEER_SOCKET
from roam.peer.events import Hub
from roam.peer.models import (
    Checkpoint,
    Event,
    EventEnvelope,
    ExecRequest,
    ExecResult,
    GatewayInfo,
    GatewayRequest,
    GcRequest,
    GcResult,
    HibernateRequest,
    LogChunk,
    LogName,
    MigrateRequest,
    MigrateResult,
    MirrorInfo,
    MirrorRequest,
    PeerInfo,
    ProgressEvent,
    PromoteRequest,
    RestoreRequest,
    RunRequest,
    SnapshotEvent,
    SyncInfo,
    SyncRequest,
    VMEvent,
    VMInfo,
    VMRemovedEvent,
)
from roam.peer.network import NetConfig
from roam.peer.packages import HeldPackages
from roam.peer.table import VMTable, Worker
from roam.sync.crypto import SyncKey
from roam.sync.reader import ChunkReader
from roam.sync.store import ObjectStore, StoreURL
from roam.vm import control
from roam.vm.package import Package, PackageError

log = logging.getLogger("roam.peer")

START_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 3600.0
STOP_TIMEOUT = 30.0


@dataclass
class Gateway:
    overlay: OverlaySpec
    forwards: list[PortForward]
    net: VmNetwork

    def info(self, name: str) -> GatewayInfo:
        return GatewayInfo.model_validate({
            "name": name, **self.overlay.model_dump(), "netns": self.net.netns,
            "publish": [asdict(f) for f in self.forwards]})


class Peer:
    """The peer: its workers and their VMs, its gateways, and the API over them
    (it implements roam.peer.api.PeerService)."""

    def __init__(self, state_dir: Path, listen: Address, tls: TLSFiles | None = None,
                 netconf: NetConfig | None = None, api_listen: Address | None = None,
                 packages: list[Path] | None = None) -> None:
        """`packages`: package directories this peer holds from the start (besides those
        it runs VMs from): VMs made from them arrive without their content being sent."""
        if api_listen is not None and tls is None:
            raise ValueError("the TCP API needs the peer's TLS files (mutual TLS)")
        self.state_dir = state_dir
        self.listen = listen
        self.api_listen = api_listen
        self.netconf = netconf or NetConfig(directory=state_dir / "net",
                                            prefix=NetConfig.default_prefix(state_dir))
        self.gateways_here: dict[str, Gateway] = {}
        self.tls = tls  # migrations in and out use mutual TLS with these files
        self.vms_dir = state_dir / "vms"
        self.held = HeldPackages(state_dir / "packages")
        self.mirrors_dir = state_dir / "mirrors"  # standby mirrors (roam.peer.mirrored)
        self.restores_dir = state_dir / "restores"  # VMs restored from a bucket (sealing)
        self.given = packages or []
        self.table = VMTable()
        self.events = Hub()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; StateDirBusy at once if another peer serves the
        state directory. What a killed peer left there is removed first."""
        with statedir.claim(self.state_dir):
            await statedir.clean(self.vms_dir)
            self.vms_dir.mkdir()
            await self._sweep()
            for directory in self.given:
                self._hold(directory)
            await self._serve(stop)

    async def _serve(self, stop: asyncio.Event) -> None:
        sockets = [self.state_dir / PEER_SOCKET]
        if self.listen.scheme == "unix":
            sockets.append(Path(self.listen.path))
        listener = _listening_socket(self.listen)
        app = api.create_app(self)
        servers = [(api.server(app), _listening_socket(Address(
            "unix", path=str(self.state_dir / PEER_SOCKET)), mode=0o600))]
        if self.api_listen is not None:
            assert self.tls is not None
            servers.append((api.server(app, self.tls.server_context()),
                            _listening_socket(self.api_listen)))
        serving = [asyncio.create_task(server.serve(sockets=[sock]))
                   for server, sock in servers]
        accepting = asyncio.create_task(self._accept(listener))
        log.info("peer serving %s, API on %s%s", self.listen, self.state_dir / PEER_SOCKET,
                 f" and {self.api_listen} (mutual TLS)" if self.api_listen else "")
        systemd.notify(f"READY=1\nSTATUS=serving {self.listen}")
        try:
            await stop.wait()
        finally:
            systemd.notify("STOPPING=1")
            accepting.cancel()
            listener.close()
            for worker in list(self.table.workers.values()):
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
            self.events.close()  # ends every /events stream
            for server, _ in servers:
                server.should_exit = True
            await asyncio.wait(serving, timeout=api.GRACE + 5)
            for path in sockets:  # no stale sockets: a client finds no peer, not a dead one
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=30)
            for name in list(self.gateways_here):
                await self._remove_gateway(name)

    def _hold(self, directory: Path) -> None:
        """Record a held package and index it in the background (VMs arriving before
        that is done index it themselves: the cache keeps whichever finishes)."""
        try:
            ident = self.held.hold(directory)
        except (OSError, PackageError) as exc:  # changed since it was checked: not held
            log.warning("cannot hold the package in %s: %s", directory, exc)
            return
        log.info("holding package %s (%s)", ident, directory)
        self._task(self.held.warm(directory))

    def _task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, peer = await loop.sock_accept(listener)
            log.info("incoming migration from %s", peer or "a local peer")
            try:
                tls = ["--incoming-tls"] if self.tls else []
                await self._spawn(["--incoming-fd", str(conn.fileno()), *tls,
                                   "--mirrors", str(self.mirrors_dir)], conn.fileno())
            except OSError as exc:
                log.error("cannot start a worker for an incoming migration: %s", exc)
            finally:
                conn.close()

    async def _spawn(self, args: list[str], fd: int | None = None,
                     name: str | None = None) -> Worker:
        workdir = self.vms_dir / str(next(self._ids))
        workdir.mkdir()
        level = logging.getLevelName(logging.getLogger("roam").getEffectiveLevel())
        args = [*args, "--net", self.netconf.model_dump_json(), "--log-level", level,
                "--packages", str(self.held.root)]
        if self.tls:
            args = [*args, "--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key),
                    "--tls-ca", str(self.tls.ca)]
        with (workdir / "worker.log").open("ab") as out:
            # Dies with the peer, and QEMU with the worker (see QemuVM.start).
            process = await asyncio.create_subprocess_exec(
                "setpriv", "--pdeathsig", "TERM", sys.executable, "-m", "roam.peer.worker",
                "--workdir", str(workdir), *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out, pass_fds=() if fd is None else (fd,))
        worker = Worker(workdir, process, name)
        self.table.add(worker)
        self._task(self._reap(worker, asyncio.create_task(self._follow(worker))))
        return worker

    async def _follow(self, worker: Worker) -> None:
        """Take the worker's events from the moment its control socket answers (it
        exists once the worker has an instance) until the worker ends the stream."""
        while not worker.exited:
            try:
                async for raw in control.stream(worker.socket, "events"):
                    event = EventEnvelope.model_validate({"event": raw}).event
                    if isinstance(event, VMEvent):
                        worker.update(event.vm)
                    elif isinstance(event, ProgressEvent) and worker.info is not None:
                        worker.info = worker.info.model_copy(
                            update={"dirty_rate": event.dirty_rate})
                    self.events.publish(event)
                return
            except control.ControlError as exc:
                if exc.code != ErrorCode.NOT_FOUND:  # not only "no socket yet"
                    log.warning("events of worker %s: %s", worker.workdir.name, exc)
            except (OSError, ValidationError) as exc:
                log.warning("events of worker %s: %s", worker.workdir.name, exc)
            await asyncio.sleep(0.05)

    async def _reap(self, worker: Worker, following: asyncio.Task[None]) -> None:
        code = await worker.process.wait()
        worker.notify()
        # Its last events (stopped, migrated) come before it leaves the table.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(following, 2.0)
        self.table.remove(worker)
        if worker.name is not None:
            self.events.publish(VMRemovedEvent(name=worker.name, exit_code=code))
        # A worker that was killed left its FUSE mount (the kernel keeps a dead daemon's
        # mount until it is unmounted) and its VM's network behind: remove them now.
        await hypervisor.driver().sweep(worker.workdir)
        await self._sweep()
        if code == 0:
            shutil.rmtree(worker.workdir, ignore_errors=True)
        else:
            log.warning("worker %s exited with %d (files kept):\n%s", worker.workdir.name,
                        code, worker.log_tail())

    async def _sweep(self) -> None:
        """Remove the VM networks whose owners (a worker, an earlier peer) are dead."""
        swept = await self.netconf.host().sweep()
        if swept:
            log.warning("removed the networks a dead process left for %s", ", ".join(swept))

    # -- the API (roam.peer.api.PeerService) -------------------------------------------

    def info(self) -> PeerInfo:
        return PeerInfo(version=roam.__version__, listen=str(self.listen),
                        api_listen=None if self.api_listen is None else str(self.api_listen),
                        underlay=self.netconf.underlay, tls=self.tls is not None,
                        capacity=host.capacity(), accelerator=host.accelerator(),
                        cpu_model=host.cpu_model(), vms=len(self.table.vms()))

    def vms(self) -> list[VMInfo]:
        return self.table.vms()

    def vm(self, name: str) -> VMInfo:
        worker = self.table.find(name)
        if worker.info is None:  # a run that has not reported yet
            return VMInfo(name=name, state="starting")
        return worker.info

    async def run(self, request: RunRequest, epoch: int = 0) -> VMInfo:
        """Start a VM; `epoch`: the authority epoch it runs under (a promotion's)."""
        name = request.name
        if self.table.taken(name):
            raise RoamError(f"a VM called {name!r} already runs on this peer",
                            code=ErrorCode.CONFLICT)
        if request.sync is not None:  # a store that refuses us: no VM is started
            await ObjectStore(StoreURL.parse(request.sync.to),
                              request.sync.endpoint_url).check()
        args = ["--name", name, *(["--epoch", str(epoch)] if epoch else [])]
        for spec in request.publish:
            args += ["--publish", spec]
        if request.gateway is not None and request.vni is not None:
            overlay = OverlaySpec(vni=request.vni, gateway=request.gateway)
            self.netconf.segment(overlay)  # this peer must be on the overlay (conflict)
            args += ["--overlay", overlay.model_dump_json()]
        if request.from_ is not None:  # lazy start from a registry (our TLS files, if any)
            worker = await self._spawn([*args, "--from", request.from_], name=name)
        else:
            assert request.package is not None
            package = Path(request.package)
            if not package.is_dir():
                raise RoamError(f"no package directory {package} on this peer's host",
                                code=ErrorCode.NOT_FOUND)
            try:
                Package.load(package)
            except PackageError as exc:
                raise RoamError(str(exc), code=ErrorCode.BAD_REQUEST) from None
            worker = await self._spawn([*args, "--package", str(package.resolve())],
                                       name=name)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await worker.wait_for(_started)
        except TimeoutError:
            raise RoamError(f"{name} not running after {START_TIMEOUT} s",
                            code=ErrorCode.TIMEOUT) from None
        if worker.info is None or worker.exited or worker.info.state != "running":
            raise RoamError(f"{name} did not start:\n{worker.log_tail()}")
        if request.package is not None:  # indexed once the VM runs, not during its boot
            self._hold(Path(request.package))  # a VM from it coming back sends changes only
        if request.sync is not None:
            await self.sync(name, request.sync)
            return self.vm(name)
        return worker.info

    async def exec(self, name: str, request: ExecRequest) -> ExecResult:
        worker = self.table.find_live(name)
        return ExecResult.model_validate(
            await worker.call("exec", request.model_dump(), request.timeout + 30))

    async def stop(self, name: str) -> None:
        worker = self.table.find_live(name)
        await worker.call("stop")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await worker.wait_for(lambda w: w.exited)

    async def resume(self, name: str) -> VMInfo:
        worker = self.table.find_live(name)
        return VMInfo.model_validate(await worker.call("resume", timeout=60.0))

    async def pause(self, name: str) -> VMInfo:
        worker = self.table.find_live(name)
        return VMInfo.model_validate(await worker.call("pause", timeout=60.0))

    async def migrate(self, name: str, request: MigrateRequest) -> MigrateResult:
        worker = self.table.find_live(name)
        return MigrateResult.model_validate(
            await worker.call("migrate", request.model_dump(), MIGRATE_TIMEOUT))

    async def sync(self, name: str, request: SyncRequest) -> SyncInfo:
        worker = self.table.find_live(name)
        self.state_dir.chmod(0o700)
        key = syncing.key_file(self.state_dir)
        SyncKey.load_or_create(key)
        info = SyncInfo.model_validate(await worker.call("sync", {
            "request": request.model_dump(), "key_file": str(key)}, timeout=120.0))
        # The table learns it from the worker's event; wait for it so that a list right
        # after this shows the sync.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await worker.wait_for(lambda w: w.info is not None and w.info.sync is not None)
        return info

    async def sync_stop(self, name: str) -> None:
        worker = self.table.find_live(name)
        await worker.call("sync_stop", timeout=60.0)

    async def sync_gc(self, name: str, request: GcRequest) -> GcResult:
        worker = self.table.find_live(name)
        return GcResult.model_validate(await worker.call("sync_gc", request.model_dump(),
                                                         timeout=600.0))

    async def mirror(self, name: str, request: MirrorRequest) -> MirrorInfo:
        worker = self.table.find_live(name)
        info = MirrorInfo.model_validate(await worker.call("mirror", request.model_dump(),
                                                           timeout=60.0))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await worker.wait_for(lambda w: w.info is not None and w.info.mirror is not None)
        return info

    async def mirror_stop(self, name: str) -> None:
        worker = self.table.find(name)
        await worker.call("mirror_stop" if worker.live else "stop", timeout=60.0)

    async def restore(self, request: RestoreRequest) -> VMInfo:
        """Run a VM from its newest sealed sync point (after a host loss, or a
        hibernation), under a new epoch recorded in the bucket first. The bucket's
        objects open with this peer's sync key (STATE_DIR/sync.key): the source's."""
        name = request.name
        if self.table.taken(name):
            raise RoamError(f"a VM called {name!r} already runs on this peer",
                            code=ErrorCode.CONFLICT)
        url = StoreURL.parse(request.from_)
        parent, _, vm = url.prefix.rpartition("/")
        if not vm:
            raise RoamError(f"{url} names no VM: give s3://BUCKET/PREFIX/NAME",
                            code=ErrorCode.BAD_REQUEST)
        key_path = syncing.key_file(self.state_dir)
        if not key_path.exists():
            raise RoamError(f"no sync key in {key_path}: copy the source peer's there",
                            code=ErrorCode.NOT_FOUND)
        store = ObjectStore(StoreURL(url.bucket, parent), request.endpoint_url)
        reader = ChunkReader(store, SyncKey.load(key_path))
        self.restores_dir.mkdir(mode=0o700, exist_ok=True)
        package, epoch = await sealing.restore(reader, vm, self.restores_dir / name)
        return await self.run(RunRequest(name=name, package=str(package),
                                         publish=request.publish), epoch=epoch)

    async def hibernate(self, name: str, request: HibernateRequest) -> Checkpoint:
        """Seal a final point in the bucket (syncing there first if the VM does not
        yet: the whole VM goes up) and stop the VM."""
        worker = self.table.find_live(name)
        if worker.info is None or worker.info.sync is None or worker.info.sync.state == "stopped":
            await self.sync(name, SyncRequest(to=request.to, endpoint_url=request.endpoint_url))
        return Checkpoint.model_validate(await worker.call("hibernate", timeout=MIGRATE_TIMEOUT))

    async def promote(self, name: str, request: PromoteRequest) -> VMInfo:
        """Run a standby mirror's VM from its newest checkpoint, under a new epoch. Its
        source must be gone: a mirror still receiving is stopped first."""
        control.check_name(name)
        if self.table.taken(name):
            raise RoamError(f"a VM called {name!r} already runs on this peer",
                            code=ErrorCode.CONFLICT)
        for worker in list(self.table.workers.values()):
            if worker.name == name and worker.info is not None and not worker.exited \
                    and worker.info.state == "mirror":
                with contextlib.suppress(RoamError, OSError):
                    await worker.call("stop", timeout=30.0)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await worker.wait_for(lambda w: w.exited)
        checkpoint, epoch = mirrored.promote(self.mirrors_dir / name)
        log.info("promoting the mirror of %s: checkpoint %s under epoch %d", name,
                 checkpoint, epoch)
        return await self.run(RunRequest(name=name, package=str(checkpoint),
                                         publish=request.publish), epoch=epoch)

    def log(self, name: str, log: LogName, offset: int, limit: int) -> LogChunk:
        """Up to `limit` bytes of the VM's `log` from `offset` (its worker's directory)."""
        path = self.table.find(name).workdir / f"{log}.log"
        try:
            with path.open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                file.seek(min(offset, size))
                data = file.read(limit)
        except FileNotFoundError:  # not written yet (QEMU not started)
            size, data = 0, b""
        start = min(offset, size)
        return LogChunk(vm=name, log=log, offset=start, next_offset=start + len(data),
                        size=size, text=data.decode(errors="replace"))

    def gateways(self) -> list[GatewayInfo]:
        return [g.info(name) for name, g in self.gateways_here.items()]

    def gateway(self, name: str) -> GatewayInfo:
        if name not in self.gateways_here:
            raise RoamError(f"no gateway for {name!r} on this peer", code=ErrorCode.NOT_FOUND)
        return self.gateways_here[name].info(name)

    async def add_gateway(self, request: GatewayRequest) -> GatewayInfo:
        """Make this host the gateway of overlay VM `request.name`."""
        name = request.name
        if name in self.gateways_here:
            raise RoamError(f"this peer already is the gateway of {name!r}",
                            code=ErrorCode.CONFLICT)
        if self.netconf.underlay is None:
            raise RoamError("a gateway needs this peer's --underlay address",
                            code=ErrorCode.CONFLICT)
        overlay = OverlaySpec(vni=request.vni, gateway=self.netconf.underlay)
        if any(g.overlay.vni == overlay.vni for g in self.gateways_here.values()):
            raise RoamError(f"segment {overlay.vni} already has a gateway here",
                            code=ErrorCode.CONFLICT)
        forwards = [PortForward.parse(p) for p in request.publish]
        net = await self.netconf.gateway(name, overlay, forwards)  # NetworkConfigError
        self.gateways_here[name] = Gateway(overlay, forwards, net)
        log.info("gateway of %s (segment %d) up; publishing %s", name, overlay.vni,
                 ", ".join(request.publish) or "nothing")
        return self.gateways_here[name].info(name)

    async def remove_gateway(self, name: str) -> None:
        self.gateway(name)  # not found?
        await self._remove_gateway(name)

    async def _remove_gateway(self, name: str) -> None:
        gateway = self.gateways_here.pop(name)
        await self.netconf.host().down(gateway.net)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[Event]]:
        """A snapshot of every VM, then every event from the moment of the snapshot."""
        async with self.events.subscribe() as changes:
            snapshot = SnapshotEvent(vms=self.table.vms())

            async def stream() -> AsyncIterator[Event]:
                yield snapshot
                async for event in changes:
                    yield event

            yield stream()


def _started(worker: Worker) -> bool:
    """Running with its agent answering, or never going to be."""
    info = worker.info
    return worker.exited or (info is not None and (
        (info.state == "running" and info.ready)
        or info.state not in ("starting", "incoming", "running")))


def _listening_socket(address: Address, mode: int | None = None) -> socket.socket:
    sock: socket.socket
    if address.scheme == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if mode is None:
            sock.bind(address.path)
        else:  # never reachable with looser permissions, not even for a moment
            umask = os.umask(0o777 & ~mode)
            try:
                sock.bind(address.path)
            finally:
                os.umask(umask)
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    sock.listen(16)
    sock.setblocking(False)
    return sock

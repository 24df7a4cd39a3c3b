"""The node agent of `roam node join`: registers the host, heartbeats, does its work.

It talks to the control plane as a client (roam.control.client) and to its own peer
through the peer's API socket (roam.peer.client), and pulls: each heartbeat renews the
node's lease, reports what the peer runs and how finished work ended, and brings back
the node's whole work list (roam.control.nodes). Acting on that list is idempotent: a VM
is started only if the peer does not have it, migrated only if it runs here, stopped
only if it is here, each at most once at a time. The peer's events are relayed to the
control plane as they come (its GET /events shows them) and counted in the node's own
metrics.

While the control plane cannot be reached, the agent keeps trying; after a lease TTL
without a heartbeat it pauses its VMs (roam.control.fence) until the control plane
answers again. If the control plane forgot its lease (it expired), it registers again.
With a cloud to watch, a spot watch (roam.control.watch) relays the cloud's notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from roam.control.client import ControlAPIError, ControlClient
from roam.control.fence import Fence
from roam.control.metrics import Migrations
from roam.control.models import (
    Cpu,
    GatewayWork,
    Heartbeat,
    NodeWork,
    PeerEvents,
    Registered,
    Registration,
    Report,
    SyncWork,
    Work,
)
from roam.control.watch import SpotWatch
from roam.errors import ErrorCode, RoamError
from roam.peer import host
from roam.peer.client import PeerClient
from roam.peer.models import (
    LIVE_STATES,
    GatewayRequest,
    HibernateRequest,
    MigrateRequest,
    OutcomeEvent,
    RestoreRequest,
    RunRequest,
    SnapshotEvent,
    SyncRequest,
    VMInfo,
)
from roam.peer.models import (
    Event as PeerEvent,
)
from roam.spot import Cloud, WatchConfig

log = logging.getLogger("roam.node")

RETRY = 1.0
"""Seconds between attempts to reach the control plane."""
RELAY_BATCH = 0.2
"""Seconds of peer events gathered into one relay."""
RELAY_MAX = 500
RELAY_BACKLOG = 4096
"""Peer events held while the control plane cannot take them; more are dropped."""


class NodeAgent:
    def __init__(self, control: ControlClient, peer_dir: Path, name: str,
                 labels: dict[str, str], cpu_model: str | None = None,
                 spot: WatchConfig | None = None) -> None:
        self.control = control
        self.peer_dir = peer_dir
        self.name = name
        self.labels = labels
        self.cpu_model = cpu_model
        self.spot = spot  # the cloud to watch for notices, if any
        self._fence: Fence | None = None
        self.registry = CollectorRegistry()
        self.migrations = Migrations(self.registry)
        self._busy: set[str] = set()  # VMs with work under way
        self._reports: list[Report] = []
        self._gateways: set[str] = set()  # the gateways this agent made
        self._sealing: set[str] = set()  # VMs it started syncing with checkpoints here
        self._nudge = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        """Serve the node until cancelled."""
        async with PeerClient(self.peer_dir) as peer, asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            self._fence = Fence(peer, self.control, self.name)
            tasks.create_task(self._fence.watch())
            tasks.create_task(self._relay(peer))
            if self.spot is not None and self.spot.cloud != Cloud.NONE:
                tasks.create_task(SpotWatch(self.spot, self.control, self.name).run())
            await self._beat(peer)

    async def _registration(self, peer: PeerClient) -> Registration:
        info = await peer.peer()
        return Registration(
            name=self.name, peer=info.listen, underlay=info.underlay, version=info.version,
            capacity=info.capacity, accelerator=info.accelerator,
            cpu=Cpu(model=self.cpu_model or info.cpu_model, flags=host.cpu_flags()),
            labels=self.labels)

    async def _register(self, peer: PeerClient) -> Registered:
        while True:
            try:
                registered = await self.control.register(await self._registration(peer))
            except RoamError as exc:
                if exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNAUTHORIZED):
                    raise  # our fault: trying again changes nothing
                log.warning("cannot register with the control plane: %s", exc.message)
                await asyncio.sleep(RETRY)
                continue
            log.info("registered as node %s (lease %x, TTL %.0f s)", self.name,
                     registered.lease, registered.ttl)
            assert self._fence is not None
            self._fence.alive(registered.ttl)
            return registered

    async def _beat(self, peer: PeerClient) -> None:
        registered = await self._register(peer)
        while True:
            reports, self._reports = self._reports, []
            try:
                vms = await peer.vms()
                beat = Heartbeat(lease=registered.lease, vms=vms, reports=reports,
                                 gateways=[g.name for g in await peer.gateways()])
                work = await self.control.heartbeat(self.name, beat)
            except RoamError as exc:
                self._reports = reports + self._reports
                if exc.code == ErrorCode.NOT_FOUND and isinstance(exc, ControlAPIError):
                    log.warning("the control plane forgot this node's lease: %s",
                                exc.message)
                    registered = await self._register(peer)
                    continue
                if exc.code == ErrorCode.UNAUTHORIZED:
                    raise
                log.warning("heartbeat: %s", exc.message)
                await asyncio.sleep(RETRY)
                continue
            assert self._fence is not None
            self._fence.alive(registered.ttl)
            if self._fence.paused:
                await self._fence.restore()
            await self._act(peer, work, {vm.name: vm for vm in vms})
            self._nudge.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(registered.heartbeat):
                    await self._nudge.wait()

    async def _act(self, peer: PeerClient, work: NodeWork, here: dict[str, VMInfo]) -> None:
        for item in work.work:
            name = item.vm.name
            if name in self._busy:
                continue
            vm = here.get(name)
            if item.action == "run" and vm is None:
                self._start(name, self._run(peer, item))
            elif item.action == "migrate" and vm is not None and vm.state == "running":
                self._start(name, self._migrate(peer, item))
            elif item.action == "stop" and vm is not None and vm.state in LIVE_STATES \
                    and vm.state != "migrating":
                self._start(name, self._stop(peer, item))
            elif item.action == "hibernate" and vm is not None and vm.state == "running":
                self._start(name, self._hibernate(peer, item))
        await self._hold_gateways(peer, work.gateways)
        await self._seal(peer, work.syncs, here)

    def _start(self, name: str, work: Coroutine[Any, Any, Report]) -> None:
        assert self._tasks is not None
        self._busy.add(name)

        async def doing() -> None:
            try:
                report = await work
            finally:
                self._busy.discard(name)
            self._reports.append(report)
            self._nudge.set()

        self._tasks.create_task(doing())

    async def _run(self, peer: PeerClient, item: Work) -> Report:
        spec = item.vm
        publish = [] if spec.gateway else spec.publish
        store = spec.store()
        if item.restore and store is not None:
            log.info("restoring %s from %s (epoch %d)", spec.name, store, item.epoch)
            report = await _done("run", item, peer.restore(RestoreRequest.model_validate({
                "name": spec.name, "from": store, "endpoint_url": _endpoint(),
                "publish": publish})))
        else:
            log.info("starting %s (epoch %d)", spec.name, item.epoch)
            request = RunRequest.model_validate({
                "name": spec.name, "package": spec.package, "from": spec.from_,
                "publish": publish, "gateway": spec.gateway, "vni": spec.vni})
            report = await _done("run", item, peer.run(request))
        if not report.ok:  # e.g. a timeout: it must not start later, unknown to anyone
            with contextlib.suppress(RoamError):
                await peer.stop(spec.name)
        return report

    async def _migrate(self, peer: PeerClient, item: Work) -> Report:
        to = item.to
        assert to is not None
        log.info("migrating %s to %s (%s)", item.vm.name, item.to_node, to)

        async def migrate() -> None:
            result = await peer.migrate(item.vm.name, MigrateRequest(to=to))
            if result.outcome != "completed":
                raise RoamError(f"{item.to_node} declined {item.vm.name}",
                                code=ErrorCode.DECLINED)
        return await _done("migrate", item, migrate())

    async def _hibernate(self, peer: PeerClient, item: Work) -> Report:
        to = item.vm.sync_to
        assert to is not None
        log.info("hibernating %s to %s", item.vm.name, to)
        self._sealing.discard(item.vm.name)
        return await _done("hibernate", item, peer.hibernate(
            item.vm.name, HibernateRequest(to=to, endpoint_url=_endpoint())))

    async def _seal(self, peer: PeerClient, syncs: list[SyncWork],
                    here: dict[str, VMInfo]) -> None:
        """Make every VM in `syncs` that runs here sync with checkpoints. One that
        arrived by a migration syncs on already, without them: its sync starts again
        with them (what the bucket holds costs no upload)."""
        wanted = {s.vm for s in syncs}
        self._sealing &= {n for n, vm in here.items() if vm.state in LIVE_STATES} & wanted
        for sync in syncs:
            vm = here.get(sync.vm)
            if sync.vm in self._sealing or sync.vm in self._busy or vm is None \
                    or vm.state != "running":
                continue
            try:
                if vm.sync is not None:
                    await peer.sync_stop(sync.vm)
                await peer.sync(sync.vm, SyncRequest(
                    to=sync.to, endpoint_url=_endpoint(),
                    checkpoint_every=sync.checkpoint_every))
            except RoamError as exc:
                log.warning("sync of %s to %s: %s", sync.vm, sync.to, exc.message)
                continue
            self._sealing.add(sync.vm)
            log.info("%s syncs to %s with a checkpoint every %.0f s", sync.vm, sync.to,
                     sync.checkpoint_every)

    async def _stop(self, peer: PeerClient, item: Work) -> Report:
        log.info("stopping %s", item.vm.name)
        return await _done("stop", item, peer.stop(item.vm.name))

    async def _hold_gateways(self, peer: PeerClient, wanted: list[GatewayWork]) -> None:
        held = {g.name for g in await peer.gateways()}
        for gateway in wanted:
            if gateway.name in held:
                continue
            try:
                await peer.add_gateway(GatewayRequest(name=gateway.name, vni=gateway.vni,
                                                      publish=gateway.publish))
                self._gateways.add(gateway.name)
                log.info("holding the gateway of %s (segment %d)", gateway.name, gateway.vni)
            except RoamError as exc:
                log.warning("gateway of %s: %s", gateway.name, exc.message)
        for name in self._gateways - {g.name for g in wanted}:
            with contextlib.suppress(RoamError):
                await peer.remove_gateway(name)
            self._gateways.discard(name)
            log.info("released the gateway of %s", name)

    async def _relay(self, peer: PeerClient) -> None:
        """Forward the peer's events (all but its snapshots) to the control plane, in
        batches of what came within RELAY_BATCH seconds."""
        queue: asyncio.Queue[PeerEvent] = asyncio.Queue(RELAY_BACKLOG)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._forward(queue))
            while True:
                try:
                    async with peer.events() as stream:
                        async for event in stream:
                            if isinstance(event, SnapshotEvent):
                                continue
                            if isinstance(event, OutcomeEvent):
                                self.migrations.count(event)
                            try:
                                queue.put_nowait(event)
                            except asyncio.QueueFull:
                                log.warning("the control plane is %d events behind; "
                                            "dropping one", RELAY_BACKLOG)
                except RoamError as exc:
                    log.debug("peer events: %s", exc.message)
                await asyncio.sleep(RETRY)

    async def _forward(self, queue: asyncio.Queue[PeerEvent]) -> None:
        while True:
            batch = [await queue.get()]
            await asyncio.sleep(RELAY_BATCH)
            while not queue.empty() and len(batch) < RELAY_MAX:
                batch.append(queue.get_nowait())
            try:
                await self.control.relay(self.name, PeerEvents(events=batch))
            except RoamError as exc:
                log.debug("relaying %d events: %s", len(batch), exc.message)


def _endpoint() -> str | None:
    """The S3 endpoint of this node's environment (AWS_ENDPOINT_URL), as its peer's;
    credentials stay in the peer's environment and never travel through the API."""
    return os.environ.get("AWS_ENDPOINT_URL") or None


async def _done(action: str, item: Work, work: Coroutine[Any, Any, object]) -> Report:
    """Run `work` and say how it ended."""
    try:
        await work
    except RoamError as exc:
        log.warning("%s %s failed: %s", action, item.vm.name, exc.message)
        return Report(vm=item.vm.name, action=action,  # type: ignore[arg-type]
                      ok=False, code=exc.code, detail=exc.message, epoch=item.epoch)
    return Report(vm=item.vm.name, action=action, ok=True,  # type: ignore[arg-type]
                  epoch=item.epoch)

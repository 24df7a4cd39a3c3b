"""The control plane's HTTP API (docs/CONTROL.md): FastAPI over the fleet's store.

Every route but /healthz, /openapi.json and /problems needs a token
(`Authorization: Bearer TOKEN`); the dashboard's (roam.control.dashboard) take its
session cookie instead. Errors are problem documents with a stable code, as the
peer's API answers them (roam.peer.problems): a request that does not parse is
`bad_request` (422) and changes nothing; an unknown VM or node is `not_found`; a request
the current state refuses is `conflict` (or `busy` while the VM moves); a missing or
wrong token is `unauthorized`.

Writes only change records (the user's wishes, `desired`); the leader's reconciler and
the nodes carry them out, so a write returns at once (202 where the work is yet to be
done) and its progress is on GET /events.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent

import roam
from roam.control import auth, dashboard, evacuation, nodes
from roam.control.election import Election
from roam.control.fleet import Fleet, vm_view
from roam.control.metrics import CONTENT_TYPE, FleetMetrics
from roam.control.models import (
    ControlKind,
    Drain,
    DrainRequest,
    FleetEventEnvelope,
    FleetSnapshot,
    Health,
    Heartbeat,
    Keys,
    Move,
    MoveRequest,
    NodeChanged,
    NodeRecord,
    NodeView,
    NodeWork,
    PeerEvents,
    Registered,
    Registration,
    RelayedEvent,
    VMChanged,
    VMPhase,
    VMRecord,
    VMRemoved,
    VMSpec,
    VMView,
)
from roam.control.store import Compacted, StoreError, WatchKind
from roam.errors import ErrorCode, RoamError
from roam.peer import problems
from roam.peer.api import PROBLEM, answer_problems
from roam.peer.models import OutcomeEvent

log = logging.getLogger(__name__)

VMName = Annotated[str, Path(description="the VM's name", max_length=40)]
NodeName = Annotated[str, Path(description="the node's name", max_length=40)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(
    auto_error=False, description="a token of `roam control token create`"))]


@dataclass
class Plane:
    """What the API serves: the fleet, the node lease TTL, the election (for health),
    the metrics."""

    fleet: Fleet
    ttl: float
    election: Election
    metrics: FleetMetrics


def create_app(plane: Plane) -> FastAPI:
    fleet = plane.fleet

    async def authorized(credentials: Credentials) -> None:
        await auth.check(fleet, None if credentials is None else credentials.credentials)

    app = FastAPI(title="roam control plane", version=roam.__version__, responses=PROBLEM,
                  description="Places, moves and watches the VMs of a fleet of roam "
                              "nodes (docs/CONTROL.md).")
    answer_problems(app)
    api = APIRouter(dependencies=[Depends(authorized)])
    api.route_class = app.router.route_class

    @app.get("/healthz", summary="Whether this instance serves, and whether it leads",
             responses={503: {"model": Health, "description": "The store fails (a "
                              "replicated store lost its quorum): `detail` says why"}})
    async def health(response: Response) -> Health:
        try:
            revision = (await fleet.store.range(Keys.LEADER)).revision
        except StoreError as exc:  # the API serves on; nothing changes until it is back
            response.status_code = 503
            return Health(ok=False, leader=plane.election.leading, revision=0,
                          detail=exc.message)
        return Health(ok=True, leader=plane.election.leading, revision=revision)

    @app.get("/problems/{code}", summary="What a problem code means")
    async def problem_type(code: ErrorCode) -> problems.ProblemType:
        return problems.describe(code)

    # -- nodes -------------------------------------------------------------------------

    @api.get("/nodes", summary="Every node, its state, labels and use")
    async def list_nodes() -> list[NodeView]:
        view = await fleet.view()
        return [view.node_view(n) for n in sorted(view.nodes)]

    @api.get("/nodes/{name}", summary="One node")
    async def get_node(name: NodeName) -> NodeView:
        return await _node_view(fleet, name)

    @api.post("/nodes", status_code=201, summary="Register a node (roam node join)")
    async def register(registration: Registration) -> Registered:
        return await nodes.register(fleet, registration, plane.ttl)

    @api.post("/nodes/{name}/heartbeat", summary="A node renews its lease, reports, and "
                                                 "gets its work")
    async def heartbeat(name: NodeName, beat: Heartbeat) -> NodeWork:
        return await nodes.heartbeat(fleet, name, beat)

    @api.post("/nodes/{name}/events", status_code=204,
              summary="A node relays its peer's events")
    async def relay(name: NodeName, batch: PeerEvents) -> None:
        await fleet.node(name)
        for event in batch.events:
            if isinstance(event, OutcomeEvent):
                plane.metrics.migrations.count(event)
                await evacuation.measure(fleet, event)
            await fleet.append(RelayedEvent(node=name, at=time.time(), event=event))

    @api.post("/nodes/{name}/cordon", summary="Place no new VM on the node")
    async def cordon(name: NodeName) -> NodeView:
        await _cordon(fleet, name, True)
        return await _node_view(fleet, name)

    @api.post("/nodes/{name}/uncordon", summary="Place VMs on the node again (ends a "
                                                "drain; moves under way finish)")
    async def uncordon(name: NodeName) -> NodeView:
        await _cordon(fleet, name, False)
        await fleet.store.delete(Keys.drain(name))
        return await _node_view(fleet, name)

    @api.post("/nodes/{name}/drain", status_code=202,
              summary="Cordon the node and move every VM off it, max_parallel at once")
    async def drain(name: NodeName, request: DrainRequest) -> NodeView:
        await _cordon(fleet, name, True)
        await fleet.store.put(Keys.drain(name), Drain(
            max_parallel=request.max_parallel, started=time.time()).model_dump_json().encode())
        await fleet.event(ControlKind.DRAIN_STARTED, node=name,
                          detail=f"at most {request.max_parallel} at once")
        return await _node_view(fleet, name)

    # -- VMs ---------------------------------------------------------------------------

    @api.get("/vms", summary="Every VM: its spec, what is wanted of it, where it is")
    async def list_vms() -> list[VMView]:
        view = await fleet.view()
        return [vm_view(v.value) for _, v in sorted(view.vms.items())]

    @api.post("/vms", status_code=201, summary="Create a VM: the scheduler places it, its "
                                               "node starts it")
    async def create_vm(spec: VMSpec) -> VMView:
        record = VMRecord(spec=spec, created=time.time())
        if not await fleet.create(Keys.vm(spec.name), record):
            raise RoamError(f"a VM called {spec.name!r} exists", code=ErrorCode.CONFLICT)
        return vm_view(record)

    @api.get("/vms/{name}", summary="One VM")
    async def get_vm(name: VMName) -> VMView:
        return vm_view((await fleet.vm(name)).value)

    @api.post("/vms/{name}/migrate", status_code=202,
              summary="Move the VM live: to a node, or where the scheduler picks")
    async def migrate_vm(name: VMName, request: MoveRequest) -> VMView:
        if request.to is not None:
            await fleet.node(request.to)

        def move(r: VMRecord) -> VMRecord:
            if r.desired.move is not None or r.status.target is not None:
                raise RoamError(f"{name} is moving already", code=ErrorCode.BUSY)
            if r.status.phase != VMPhase.RUNNING or not r.desired.running:
                raise RoamError(f"{name} is {r.status.phase.value}: only a running VM "
                                "moves", code=ErrorCode.CONFLICT)
            if request.to == r.status.node:
                raise RoamError(f"{name} runs on {request.to} already",
                                code=ErrorCode.CONFLICT)
            r.desired.move = Move(to=request.to, cheapest=request.cheapest)
            return r
        return await _update_vm(fleet, name, move)

    @api.post("/vms/{name}/stop", status_code=202,
              summary="Stop the VM (its memory is discarded; start runs its package again)")
    async def stop_vm(name: VMName) -> VMView:
        return await _update_vm(fleet, name, _stop)

    @api.post("/vms/{name}/start", status_code=202, summary="Start a stopped or failed VM")
    async def start_vm(name: VMName) -> VMView:
        def start(r: VMRecord) -> VMRecord | None:
            if r.desired.deleted:
                raise RoamError(f"{name} is being deleted", code=ErrorCode.CONFLICT)
            if r.status.phase == VMPhase.LOST:
                raise RoamError(f"{name} is on a lost node where it may still run",
                                code=ErrorCode.CONFLICT)
            if r.status.phase == VMPhase.STOPPING:
                raise RoamError(f"{name} is stopping", code=ErrorCode.BUSY)
            r.desired.running = True
            if r.status.phase in (VMPhase.STOPPED, VMPhase.FAILED):
                r.status.phase, r.status.node, r.status.detail = VMPhase.PENDING, None, None
                r.status.peer, r.status.restore = None, False  # afresh, from its package
            return r
        return await _update_vm(fleet, name, start)

    @api.delete("/vms/{name}", status_code=202, summary="Stop the VM and forget it")
    async def delete_vm(name: VMName) -> VMView:
        def delete(r: VMRecord) -> VMRecord:
            r.desired.deleted = True
            return _stop(r)
        return await _update_vm(fleet, name, delete)

    # -- events and metrics ------------------------------------------------------------

    @api.get("/events", response_class=EventSourceResponse,
             summary="Server-sent events: a snapshot of the fleet, then every change, the "
                     "control plane's decisions and the nodes' peer events")
    async def events() -> AsyncIterator[ServerSentEvent]:
        start = (await fleet.store.range(Keys.LEADER)).revision
        view = await fleet.view()
        yield _sse(FleetSnapshot(nodes=[view.node_view(n) for n in sorted(view.nodes)],
                                 vms=[vm_view(v.value) for _, v in sorted(view.vms.items())]))
        try:
            async with fleet.store.watch("/", start) as changes:
                async for change in changes:
                    for event in await _translate(fleet, change.key, change.kind,
                                                  None if change.record is None
                                                  else change.record.value):
                        yield _sse(event)
        except Compacted:
            return  # fell behind the log: the client connects again for a new snapshot

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(plane.metrics.render(await fleet.view()), media_type=CONTENT_TYPE)

    evacuation.add_routes(api, fleet, plane.metrics.evacuation)
    app.include_router(api)
    dashboard.mount(app, fleet)  # the page at /, on the same server (docs/DASHBOARD.md)
    return app


def _sse(event: Any) -> ServerSentEvent:
    return ServerSentEvent(data=event, event=event.type)


async def _translate(fleet: Fleet, key: str, kind: WatchKind, value: bytes | None
                     ) -> list[Any]:
    """A store change as the events a client sees."""
    if key.startswith(Keys.EVENTS):
        if value is None:
            return []
        return [FleetEventEnvelope.model_validate({"event": json.loads(value)}).event]
    if key.startswith(Keys.VMS):
        if value is None:
            return [VMRemoved(name=key.removeprefix(Keys.VMS))]
        return [VMChanged(vm=vm_view(VMRecord.model_validate_json(value)))]
    for prefix in (Keys.NODES, Keys.ALIVE, Keys.DRAINS):
        if key.startswith(prefix):
            name = key.removeprefix(prefix)
            view = await fleet.view()
            return [NodeChanged(node=view.node_view(name))] if name in view.nodes else []
    return []


async def _node_view(fleet: Fleet, name: str) -> NodeView:
    view = await fleet.view()
    if name not in view.nodes:
        raise RoamError(f"no node called {name!r}", code=ErrorCode.NOT_FOUND)
    return view.node_view(name)


async def _cordon(fleet: Fleet, name: str, cordoned: bool) -> None:
    await fleet.node(name)

    def set_(record: NodeRecord) -> NodeRecord | None:
        if record.cordoned == cordoned:
            return None
        record.cordoned = cordoned
        return record
    await fleet.update(Keys.node(name), NodeRecord, set_)


async def _update_vm(fleet: Fleet, name: str,
                     change: Callable[[VMRecord], VMRecord | None]) -> VMView:
    await fleet.vm(name)  # not found?
    updated = await fleet.update(Keys.vm(name), VMRecord, change)
    assert updated is not None
    return vm_view(updated)


def _stop(record: VMRecord) -> VMRecord:
    record.desired.running = False
    record.desired.move = None if record.status.target is None else record.desired.move
    if record.status.node is None:
        if record.status.phase in (VMPhase.PENDING, VMPhase.FAILED):
            record.status.phase = VMPhase.STOPPED
    elif record.status.phase not in (VMPhase.STOPPED, VMPhase.LOST):
        record.status.phase = VMPhase.STOPPING
    return record

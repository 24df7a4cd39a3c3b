"""Evacuation: on a spot notice, move every VM off the node before the deadline.

A notice reaches the control plane from the node's agent (its spot watcher saw the
cloud's notice) or from an operator (`roam control node notice NODE --deadline 30s`), as
POST /nodes/{name}/notice. The API cordons the node and stores a `NoticeRecord` under
/notices/NODE listing the VMs on it; the leader's reconciler then calls
`Evacuation.step` at every pass, which

- orders the VMs still to move by priority (highest first, then name) and estimates
  when each would resume elsewhere if moved in that order: the migrations share the
  node's link and CPUs, so memory adds up (the memory of the VMs before it and its own,
  over the measured throughput: `measure`, from the outcomes nodes relay, memory moved
  per second beyond `OVERHEAD`; `DEFAULT_MIB_S` until one is measured), while the fixed
  `OVERHEAD` of connecting and starting the destination is paid once per round of
  `max_parallel` moves. Memory is the VM's whole size, which over-estimates a guest
  that touched little of it;
- says at once which VMs cannot make it: no node has room for them, or their estimate
  ends after the deadline. One with a checkpoint store (`spec.sync_to`) is hibernated
  (a `hibernating` event; its node seals a last checkpoint there and stops it; then
  `hibernated`): the reconciler restores it from there on a node that fits, as soon as
  one does (`restoring`). One without gets a `will_be_lost` event; if it has room but
  not (estimated) time it is still moved, after every VM that can make it. A VM whose
  hibernation fails is moved like the others if it can be;
- starts moves (`Move(reason="evacuation")`, given a target by the reconciler's usual
  move step) up to the notice's `max_parallel` at once;
- records each VM's margin once it runs elsewhere: the deadline minus the moment it
  resumed there (its new peer's `resumed_at`), as an `evacuated` event and in the
  margin histogram;
- at the deadline, marks every VM not yet resumed elsewhere lost (`vm_lost`): the cloud
  takes the machine then, whatever is in flight;
- ends the evacuation (`evacuation_finished`) when every VM is evacuated or lost. The
  node agent polls GET /nodes/{name}/notice for that and, on Azure, acknowledges the
  Scheduled Event only then (at once if there was nothing to move).

Everything is in the store, so a control plane restarted mid-evacuation goes on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel

from roam.control import scheduler
from roam.control.fleet import Fleet, Versioned, View, move_off
from roam.control.models import (
    ControlEvent,
    ControlKind,
    Keys,
    NodeRecord,
    VMPhase,
    VMRecord,
)
from roam.control.notice import (
    NOTICES,
    Leaving,
    NoticeRecord,
    NoticeRequest,
    VMEvacuation,
    notice_key,
    order,
    summary,
)
from roam.errors import ErrorCode, RoamError
from roam.peer.models import OutcomeEvent

log = logging.getLogger(__name__)

MEASURED = "/measured/migration"
DEFAULT_MIB_S = 100.0
"""Migration throughput assumed before one is measured (MiB/s; a TCG guest here
migrates at 100 to 400: docs/BENCHMARKS.md)."""
OVERHEAD = 2.0
"""Seconds a migration takes besides its memory: connecting, the device state, the
destination's start and resume."""
WEIGHT = 0.3
"""Weight of the newest migration in the measured throughput (a moving average)."""
MARGIN_BUCKETS = (-30.0, -5.0, 0.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
MAX_FAILURES = 3
NodeName = Annotated[str, Path(description="the node's name", max_length=40)]


class Measured(BaseModel):
    mib_per_s: float
    samples: int


class EvacuationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notices = Counter("roam_notices", "Spot notices received, by cloud "
                               "(none: given through the API)", ["cloud"],
                               registry=registry)
        self.margin = Histogram("roam_evacuation_margin_seconds",
                                "Deadline minus the moment an evacuated VM resumed "
                                "elsewhere", buckets=MARGIN_BUCKETS, registry=registry)
        self.lost = Counter("roam_vms_lost", "VMs lost: a deadline passed before they "
                            "left, or their lost node stayed lost (no checkpoint)",
                            ["reason"], registry=registry)


async def event(fleet: Fleet, kind: ControlKind, **fields: object) -> None:
    """A control event with the evacuation's fields (deadline, margin)."""
    happened = ControlEvent.model_validate({"kind": kind, "at": time.time(), **fields})
    log.info("%s %s", kind.value, " ".join(f"{k}={v}" for k, v in fields.items()))
    await fleet.append(happened)


# -- receiving a notice -----------------------------------------------------------------


async def receive(fleet: Fleet, metrics: EvacuationMetrics, node: str,
                  request: NoticeRequest) -> NoticeRecord:
    """Cordon `node` and record its notice (the same notice again changes nothing; of
    two notices the earlier deadline stands, and an evacuation under way goes on)."""
    await fleet.node(node)
    now = time.time()
    deadline = request.deadline if request.deadline is not None else \
        now + (request.deadline_seconds or 0.0)
    existing = await fleet.get(notice_key(node), NoticeRecord)
    under_way: dict[str, VMEvacuation] = {}
    if existing is not None and existing.value.finished is None:
        same = bool(request.event_id) and existing.value.event_id == request.event_id
        if same or existing.value.deadline <= deadline:
            return existing.value
        under_way = existing.value.vms

    def cordon(record: NodeRecord) -> NodeRecord | None:
        if record.cordoned:
            return None
        record.cordoned = True
        return record
    await fleet.update(Keys.node(node), NodeRecord, cordon)
    view = await fleet.view()
    vms = {name: under_way.get(name) or VMEvacuation(priority=vm.value.spec.priority,
                                                     memory_mib=vm.value.spec.memory_mib)
           for name, vm in view.vms.items()
           if vm.value.status.node == node and not vm.value.desired.deleted}
    record = NoticeRecord(node=node, cloud=request.cloud, action=request.action,
                          event_id=request.event_id, deadline=deadline, received=now,
                          max_parallel=request.max_parallel, vms=vms)
    if existing is None:
        written = await fleet.create(notice_key(node), record)
    else:
        written = await fleet.replace(notice_key(node), existing, record)
    if not written:  # another notice won meanwhile: that one stands
        found = await fleet.get(notice_key(node), NoticeRecord)
        assert found is not None
        return found.value
    metrics.notices.labels(request.cloud.value).inc()
    await event(fleet, ControlKind.NOTICE, node=node, deadline=deadline,
                detail=f"{request.cloud.value} {request.action.value} in "
                       f"{deadline - now:.0f} s; {len(vms)} VM(s) to move")
    return record


async def notice(fleet: Fleet, node: str) -> NoticeRecord:
    found = await fleet.get(notice_key(node), NoticeRecord)
    if found is None:
        raise RoamError(f"node {node!r} has had no notice", code=ErrorCode.NOT_FOUND)
    return found.value


def add_routes(api: APIRouter, fleet: Fleet, metrics: EvacuationMetrics) -> None:
    """POST and GET /nodes/{name}/notice."""

    @api.post("/nodes/{name}/notice", status_code=202,
              summary="A spot notice: cordon the node and move every VM off it before "
                      "the deadline (its agent sends the cloud's; operators may too)")
    async def give_notice(name: NodeName, request: NoticeRequest) -> NoticeRecord:
        return await receive(fleet, metrics, name, request)

    @api.get("/nodes/{name}/notice", summary="The node's last notice and its evacuation")
    async def get_notice(name: NodeName) -> NoticeRecord:
        return await notice(fleet, name)


# -- measuring --------------------------------------------------------------------------


async def measure(fleet: Fleet, outcome: OutcomeEvent) -> None:
    """Fold a completed migration's throughput (its VM's memory per second beyond
    OVERHEAD) into the moving average."""
    if outcome.outcome != "completed":
        return
    vm = await fleet.get(Keys.vm(outcome.vm), VMRecord)
    if vm is None:
        return
    seconds = max(outcome.duration_ms / 1000 - OVERHEAD, 0.5)
    sample = vm.value.spec.memory_mib / seconds
    key = MEASURED
    if await fleet.create(key, Measured(mib_per_s=sample, samples=1)):
        return

    def fold(old: Measured) -> Measured:
        return Measured(mib_per_s=(1 - WEIGHT) * old.mib_per_s + WEIGHT * sample,
                        samples=old.samples + 1)
    await fleet.update(key, Measured, fold)


async def throughput(fleet: Fleet) -> float:
    found = await fleet.get(MEASURED, Measured)
    return DEFAULT_MIB_S if found is None else found.value.mib_per_s


# -- the leader's step ------------------------------------------------------------------


class Evacuation:
    """The reconciler's evacuation step (roam.control.reconciler calls `step`)."""

    def __init__(self, fleet: Fleet, metrics: EvacuationMetrics) -> None:
        self.fleet = fleet
        self.metrics = metrics
        self._counted: list[Callable[[], None]] = []  # metrics of the pass, once written

    async def step(self) -> None:
        found = await self.fleet.store.range(NOTICES)
        for item in found.records:
            record = NoticeRecord.model_validate_json(item.value)
            if record.finished is None:
                await self._evacuate(record, item.mod_revision)

    async def _evacuate(self, record: NoticeRecord, revision: int) -> None:
        view = await self.fleet.view()
        now = time.time()
        self._counted = []
        before = record.model_copy(deep=True)
        said: list[tuple[ControlKind, dict[str, object]]] = []
        for name, leaving in record.vms.items():
            if not leaving.state.final:
                found = view.vms.get(name)
                said += self._observe(record, name, leaving,
                                      None if found is None else found.value, now)
        rate = await throughput(self.fleet)
        planned, stuck = self._plan(record, view, now, rate)
        said += planned
        starting = self._starts(record, view, stuck)
        if all(v.state.final for v in record.vms.values()):
            record.finished = now
            said.append((ControlKind.EVACUATION_FINISHED, {
                "node": record.node, "deadline": record.deadline,
                "detail": summary(record)}))
        if record != before:
            if not await self.fleet.replace(notice_key(record.node),
                                            Versioned(before, revision), record):
                return  # changed meanwhile (a new notice): the next pass sees it
        for count in self._counted:
            count()
        for name in starting:
            await self.fleet.update(Keys.vm(name), VMRecord, move_off("evacuation"))
        for name, leaving in record.vms.items():
            if leaving.state == Leaving.HIBERNATING and before.vms[name].state == Leaving.WAITING:
                await self.fleet.update(Keys.vm(name), VMRecord, _hibernate(record.node))
        for kind, fields in said:
            await event(self.fleet, kind, **fields)

    def _observe(self, record: NoticeRecord, name: str, leaving: VMEvacuation,
                 vm: VMRecord | None, now: float
                 ) -> list[tuple[ControlKind, dict[str, object]]]:
        """Move `leaving` on by what `vm`'s record says; the events that says."""
        node = record.node
        if vm is None or vm.desired.deleted:
            leaving.state = Leaving.GONE
            return []
        status = vm.status
        if status.node not in (None, node) and status.phase == VMPhase.RUNNING:
            resumed = now
            if status.peer is not None and status.peer.resumed_at is not None:
                resumed = status.peer.resumed_at
            leaving.state, leaving.to, leaving.resumed_at = Leaving.EVACUATED, status.node, resumed
            leaving.margin_ms = round((record.deadline - resumed) * 1000, 1)
            self._counted.append(functools.partial(self.metrics.margin.observe,
                                                   leaving.margin_ms / 1000))
            return [(ControlKind.EVACUATED, {
                "vm": name, "node": node, "to": status.node, "deadline": record.deadline,
                "margin_ms": leaving.margin_ms,
                "detail": f"resumed {leaving.margin_ms / 1000:.1f} s before the deadline"})]
        if leaving.state == Leaving.HIBERNATING:
            if status.phase == VMPhase.HIBERNATED or (status.node != node and status.restore):
                leaving.state = Leaving.HIBERNATED
                return []  # the node's report said so (a `hibernated` event)
            if status.phase == VMPhase.RUNNING and status.node == node:
                leaving.state = Leaving.WAITING  # it failed: moved if it can make it
        if now >= record.deadline:
            return self._lose(record, name, leaving, "the deadline passed before it "
                              "resumed elsewhere", "deadline")
        if status.node != node or status.phase in (VMPhase.STOPPED, VMPhase.STOPPING,
                                                   VMPhase.FAILED, VMPhase.LOST):
            return self._lose(record, name, leaving, f"it is {status.phase.value}",
                              status.phase.value)
        if leaving.state == Leaving.MOVING and status.target is None \
                and vm.desired.move is None:
            leaving.state = Leaving.WAITING  # its migration failed: it may try again
            leaving.detail = status.detail
        return []

    def _lose(self, record: NoticeRecord, name: str, leaving: VMEvacuation, why: str,
              reason: str) -> list[tuple[ControlKind, dict[str, object]]]:
        leaving.state, leaving.detail = Leaving.LOST, why
        self._counted.append(self.metrics.lost.labels(reason).inc)
        return [(ControlKind.VM_LOST, {"vm": name, "node": record.node,
                                       "deadline": record.deadline, "detail": why})]

    def _plan(self, record: NoticeRecord, view: View, now: float, rate: float
              ) -> tuple[list[tuple[ControlKind, dict[str, object]]], set[str]]:
        """Estimates, and will_be_lost for every VM that cannot make it. In priority
        order, each VM that has somewhere to go is estimated after those before it that
        make it; one that would not make it goes last, so it delays none of them.
        Also the VMs that have nowhere to go now (not to be started)."""
        said: list[tuple[ControlKind, dict[str, object]]] = []
        stuck: set[str] = set()
        memory = 0  # of the VMs that move before this one, and this one
        rounds = 0  # of max_parallel moves
        for name in order(record):
            leaving = record.vms[name]
            if leaving.state.final or leaving.state == Leaving.HIBERNATING:
                continue
            vm = view.vms.get(name)
            why = None
            if leaving.state == Leaving.WAITING and vm is not None:
                try:
                    scheduler.place(vm.value, view, exclude=[record.node])
                except scheduler.Unschedulable as exc:
                    why = f"nowhere to go ({exc.message})"
                    stuck.add(name)
            if why is None:
                finish = now + OVERHEAD * (rounds // record.max_parallel + 1) \
                    + (memory + leaving.memory_mib) / rate
                leaving.estimate = round(finish, 3)
                if finish <= record.deadline or leaving.state == Leaving.MOVING:
                    memory += leaving.memory_mib
                    rounds += 1
                else:
                    why = (f"it would resume about {finish - now:.0f} s from now "
                           f"({leaving.memory_mib} MiB at {rate:.0f} MiB/s after the VMs "
                           f"before it), {record.deadline - now:.0f} s before the deadline")
            if why is not None and vm is not None and vm.value.spec.sync_to is not None \
                    and leaving.state == Leaving.WAITING and not leaving.warned:
                leaving.warned = True
                leaving.state, leaving.detail = Leaving.HIBERNATING, why
                said.append((ControlKind.HIBERNATING, {
                    "vm": name, "node": record.node, "deadline": record.deadline,
                    "detail": f"{why}; it hibernates to {vm.value.spec.store()} and is "
                              "restored where a node fits"}))
            elif why is not None and not leaving.warned:
                leaving.warned = True
                leaving.detail = why
                said.append((ControlKind.WILL_BE_LOST, {
                    "vm": name, "node": record.node, "deadline": record.deadline,
                    "detail": f"{why}; it has no checkpoint store to hibernate to, so it "
                              "will be lost"}))
        return said, stuck

    def _starts(self, record: NoticeRecord, view: View, stuck: set[str]) -> list[str]:
        """The VMs whose moves start now: those that can make it first, by priority,
        then the others that have somewhere to go; at most max_parallel moving."""
        moving = sum(1 for v in record.vms.values() if v.state == Leaving.MOVING)
        waiting = [n for n in order(record)
                   if record.vms[n].state == Leaving.WAITING and n not in stuck]
        ranked = [n for n in waiting if not record.vms[n].warned] + \
                 [n for n in waiting if record.vms[n].warned]
        starting: list[str] = []
        for name in ranked:
            if moving + len(starting) >= record.max_parallel:
                break
            vm = view.vms.get(name)
            if vm is None or vm.value.status.phase != VMPhase.RUNNING \
                    or vm.value.status.failures >= MAX_FAILURES:
                continue
            record.vms[name].state = Leaving.MOVING
            starting.append(name)
        return starting



def _hibernate(node: str) -> Callable[[VMRecord], VMRecord | None]:
    """The change that tells `node` to hibernate a VM that runs there (not moving)."""
    def update(record: VMRecord) -> VMRecord | None:
        status = record.status
        if status.node != node or status.phase != VMPhase.RUNNING \
                or status.target is not None or record.desired.move is not None:
            return None
        status.phase = VMPhase.HIBERNATING
        return record
    return update

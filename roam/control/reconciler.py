"""The leader's loop: make the fleet's records converge on what users asked for.

Each pass reads the fleet and takes the decisions that only one instance may take, each
a compare-and-swap on the record it read: mark nodes lost (their VMs `lost`, never
started elsewhere before roam.control.lost allows it) and back; place pending VMs;
restore hibernated VMs where they fit; give drains their next moves (at most
`max_parallel` in flight per drained node, highest priority first);
evacuate nodes under a spot notice (roam.control.evacuation); give moves a target;
delete records of deleted VMs that run nowhere. Nodes carry the decisions out
(roam.control.nodes). A pass runs after every change in the store and at least once
a second; since everything it needs is in the store, a control plane restarted in the
middle of a drain picks it up where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from roam.control import scheduler
from roam.control.evacuation import Evacuation
from roam.control.fleet import Fleet, View, move_off
from roam.control.lost import LostNodes
from roam.control.models import (
    ControlKind,
    Keys,
    NodeRecord,
    VMPhase,
    VMRecord,
)
from roam.control.store import Compacted, Compare, Delete, Txn
from roam.errors import RoamError

log = logging.getLogger(__name__)

PERIOD = 1.0
"""Seconds between passes when nothing changes."""
PRUNE_PERIOD = 30.0
MAX_FAILURES = 3
"""Failed migrations after which a drain leaves the VM where it is (and says so)."""
_LIVE = (VMPhase.RUNNING, VMPhase.MIGRATING, VMPhase.PLACED, VMPhase.STOPPING)


class Reconciler:
    def __init__(self, fleet: Fleet, evacuation: Evacuation | None = None,
                 lost: LostNodes | None = None) -> None:
        self.fleet = fleet
        self.evacuation = evacuation  # spot notices (roam.control.evacuation)
        self.lost = lost  # lost nodes' VMs after 2 TTL (roam.control.lost)
        self._stuck: dict[str, str] = {}  # drained node -> what was said last
        self._pruned = 0.0

    async def run(self) -> None:
        """Pass after pass until cancelled (the leadership ended)."""
        wake = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            watching = tasks.create_task(self._watch(wake))
            try:
                while True:
                    wake.clear()
                    try:
                        await self.reconcile()
                    except RoamError as exc:
                        log.warning("reconciling: %s", exc.message)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(PERIOD):
                            await wake.wait()
            finally:
                watching.cancel()

    async def _watch(self, wake: asyncio.Event) -> None:
        """Set `wake` whenever a record other than an event changes."""
        while True:
            start = (await self.fleet.store.range(Keys.LEADER)).revision
            try:
                async with self.fleet.store.watch("/", start) as changes:
                    async for change in changes:
                        if not change.key.startswith(Keys.EVENTS):
                            wake.set()
            except Compacted:
                wake.set()

    async def reconcile(self) -> None:
        await self._liveness(await self.fleet.view())
        await self._placements()
        await self._drains()
        if self.evacuation is not None:
            await self.evacuation.step()
        if self.lost is not None:
            await self.lost.step()
        await self._moves()
        await self._deletions()
        if time.monotonic() - self._pruned > PRUNE_PERIOD:
            self._pruned = time.monotonic()
            await self.fleet.prune_events()

    async def _liveness(self, view: View) -> None:
        now = time.time()
        for name, node in view.nodes.items():
            lost = name not in view.alive
            if lost == (node.value.lost_since is not None):
                continue
            since = now if lost else None

            def mark(record: NodeRecord, since: float | None = since) -> NodeRecord:
                record.lost_since = since
                return record
            await self.fleet.update(Keys.node(name), NodeRecord, mark)
            if lost:
                await self.fleet.event(ControlKind.NODE_LOST, node=name,
                                       detail="its lease expired; its VMs stay there")
                for vm_name, vm in view.vms.items():
                    if vm.value.status.node == name and vm.value.status.phase in _LIVE:
                        await self.fleet.update(Keys.vm(vm_name), VMRecord, _lost)
            else:
                await self.fleet.event(ControlKind.NODE_BACK, node=name)

    async def _placements(self) -> None:
        view = await self.fleet.view()
        for name, vm in sorted(view.vms.items()):
            record = vm.value
            if record.status.phase not in (VMPhase.PENDING, VMPhase.HIBERNATED) \
                    or not record.desired.running or record.desired.deleted:
                continue
            try:
                node = scheduler.place(record, view)
            except scheduler.Unschedulable as exc:
                await self._say(name, exc.message, ControlKind.UNSCHEDULABLE)
                continue
            cpu = view.nodes[node].value.registration.cpu.model

            def placed(r: VMRecord, node: str = node, cpu: str = cpu) -> VMRecord | None:
                if r.status.phase not in (VMPhase.PENDING, VMPhase.HIBERNATED):
                    return None
                r.status.phase, r.status.node, r.status.detail = VMPhase.PLACED, node, None
                r.status.epoch += 1
                r.status.started = False
                r.status.cpu_model = r.spec.cpu_model or r.status.cpu_model or cpu
                return r
            updated = await self.fleet.update(Keys.vm(name), VMRecord, placed)
            await self.fleet.event(ControlKind.PLACED, vm=name, node=node)
            if updated is not None and updated.status.restore:
                await self.fleet.event(
                    ControlKind.RESTORING, vm=name, node=node,
                    detail=f"from its last checkpoint in {record.spec.store()}, "
                           f"epoch {updated.status.epoch}")
            view = await self.fleet.view()  # the next placement counts this one

    async def _drains(self) -> None:
        view = await self.fleet.view()
        for node, drain in view.drains.items():
            here = {n: v.value for n, v in view.vms.items() if v.value.status.node == node}
            if not here:
                await self.fleet.store.txn(Txn([Compare(Keys.drain(node), drain.revision)],
                                               [Delete(Keys.drain(node))]))
                self._stuck.pop(node, None)
                await self.fleet.event(ControlKind.DRAIN_FINISHED, node=node)
                continue
            moving = [n for n, v in here.items()
                      if v.status.target is not None or v.desired.move is not None]
            ready = sorted((n for n, v in here.items()
                            if n not in moving and v.status.phase == VMPhase.RUNNING
                            and v.status.failures < MAX_FAILURES),
                           key=lambda n: (-here[n].spec.priority, n))  # highest first
            for name in ready[:max(0, drain.value.max_parallel - len(moving))]:
                await self.fleet.update(Keys.vm(name), VMRecord, move_off("drain"))
            if not moving and not ready:
                left = ", ".join(f"{n} ({v.status.phase.value}"
                                 f"{', ' + v.status.detail if v.status.detail else ''})"
                                 for n, v in sorted(here.items()))
                if self._stuck.get(node) != left:
                    self._stuck[node] = left
                    await self.fleet.event(ControlKind.DRAIN_STUCK, node=node,
                                           detail=f"cannot move {left}")

    async def _moves(self) -> None:
        view = await self.fleet.view()
        for name, vm in sorted(view.vms.items()):
            record = vm.value
            move = record.desired.move
            if move is None or record.status.target is not None \
                    or record.status.node is None:
                continue
            if record.status.phase != VMPhase.RUNNING:
                if record.status.phase not in (VMPhase.PLACED, VMPhase.MIGRATING):
                    await self._drop_move(name, f"it is {record.status.phase.value}")
                continue
            try:
                target = scheduler.place(record, view, exclude=[record.status.node],
                                         to=move.to, cheapest=move.cheapest)
            except scheduler.Unschedulable as exc:
                if move.reason == "user":
                    await self._drop_move(name, exc.message)
                else:
                    await self._say(name, exc.message, ControlKind.DRAIN_STUCK)
                continue

            def aim(r: VMRecord, target: str = target) -> VMRecord | None:
                if r.status.target is not None or r.desired.move is None \
                        or r.status.phase != VMPhase.RUNNING:
                    return None
                r.status.target, r.status.detail = target, None
                return r
            updated = await self.fleet.update(Keys.vm(name), VMRecord, aim)
            if updated is not None and updated.status.target == target:
                await self.fleet.event(ControlKind.MIGRATION_STARTED, vm=name,
                                       node=record.status.node, to=target,
                                       detail=f"{move.reason} move")
            view = await self.fleet.view()

    async def _drop_move(self, name: str, why: str) -> None:
        def drop(r: VMRecord) -> VMRecord | None:
            if r.desired.move is None:
                return None
            r.desired.move, r.status.detail = None, f"not moved: {why}"
            return r
        await self.fleet.update(Keys.vm(name), VMRecord, drop)
        await self.fleet.event(ControlKind.MIGRATION_FAILED, vm=name, detail=why)

    async def _say(self, name: str, detail: str, kind: ControlKind) -> None:
        """Record why `name` waits, with an event the first time it is said."""
        def note(r: VMRecord) -> VMRecord | None:
            if r.status.detail == detail:
                return None
            r.status.detail = detail
            return r
        before = (await self.fleet.vm(name)).value.status.detail
        await self.fleet.update(Keys.vm(name), VMRecord, note)
        if before != detail:
            await self.fleet.event(kind, vm=name, detail=detail)

    async def _deletions(self) -> None:
        view = await self.fleet.view()
        for name, vm in view.vms.items():
            status = vm.value.status
            if vm.value.desired.deleted and status.node is None and status.target is None:
                result = await self.fleet.store.txn(Txn([Compare(Keys.vm(name), vm.revision)],
                                                        [Delete(Keys.vm(name))]))
                if result.succeeded:
                    await self.fleet.event(ControlKind.VM_DELETED, vm=name)


def _lost(record: VMRecord) -> VMRecord | None:
    if record.status.phase not in _LIVE:
        return None
    record.status.phase = VMPhase.LOST
    record.status.detail = f"node {record.status.node} missed its lease"
    return record



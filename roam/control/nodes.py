"""The control plane's side of the node protocol: registration, heartbeats, work.

Nodes pull (docs/DESIGN.md says why): `roam node join` registers (POST /nodes) and gets
a lease; every heartbeat renews it, reports what its peer runs and how the work it was
given ended, and gets back everything the node should be doing now (`NodeWork`). The
node acts idempotently on that list, so a lost answer or a restarted control plane only
repeats a request that is already satisfied.

What a heartbeat reports is merged into the VM records here (`observe`): the control
plane learns that a VM runs, that a migration settled (the target reports the VM
running: the authority moved, the epoch grows), that a VM stopped or died.
"""

from __future__ import annotations

import logging
import time

from roam.control.fleet import Fleet, View
from roam.control.models import (
    ControlKind,
    GatewayWork,
    Heartbeat,
    Keys,
    NodeRecord,
    NodeWork,
    Registered,
    Registration,
    Report,
    SyncWork,
    VMPhase,
    VMRecord,
    Work,
)
from roam.control.store import LeaseExpired, Put
from roam.errors import ErrorCode, RoamError
from roam.peer.models import VMInfo as PeerVM

log = logging.getLogger(__name__)

GONE = ("migrated", "stopped")
"""Peer states of a VM whose worker is leaving: the VM no longer runs there."""
_PHASES = {"running": VMPhase.RUNNING, "starting": VMPhase.PLACED,
           "incoming": VMPhase.PLACED, "migrating": VMPhase.MIGRATING,
           "paused": VMPhase.MIGRATING, "handed-over": VMPhase.MIGRATING,
           "in-doubt": VMPhase.IN_DOUBT}


async def register(fleet: Fleet, registration: Registration, ttl: float) -> Registered:
    name = registration.name
    lease = await fleet.store.grant(ttl)
    now = time.time()
    existing = await fleet.get(Keys.node(name), NodeRecord)
    if existing is None:
        record = NodeRecord(registration=registration, joined=now)
        if not await fleet.create(Keys.node(name), record,
                                  Put(Keys.alive(name), b"", lease.id)):
            return await register(fleet, registration, ttl)  # joined meanwhile
        await fleet.event(ControlKind.NODE_JOINED, node=name, detail=registration.peer)
    else:
        def renew(record: NodeRecord) -> NodeRecord:
            record.registration = registration
            return record
        await fleet.update(Keys.node(name), NodeRecord, renew)
        await fleet.store.put(Keys.alive(name), b"", lease.id)
        log.info("node %s registered again (lease %x)", name, lease.id)
    return Registered(lease=lease.id, ttl=ttl, heartbeat=heartbeat_interval(ttl))


def heartbeat_interval(ttl: float) -> float:
    """A node misses two heartbeats before its lease runs out."""
    return max(0.2, ttl / 4)


async def heartbeat(fleet: Fleet, name: str, beat: Heartbeat) -> NodeWork:
    """Renew the node's lease, merge its report, answer its work. LeaseExpired (the
    node must register again) if its lease is gone or not the one it registered."""
    alive = await fleet.store.get(Keys.alive(name))
    if alive is None or alive.lease != beat.lease:
        raise LeaseExpired(f"node {name} holds no live lease: register again")
    await fleet.store.keepalive(beat.lease)
    node = await fleet.node(name)
    cpu = node.value.registration.cpu.model
    for report in beat.reports:
        await _report(fleet, name, report)
    seen = {vm.name: vm for vm in beat.vms if vm.state not in GONE}
    view = await fleet.view()
    for vm_name, vm in view.vms.items():
        if name not in (vm.value.status.node, vm.value.status.target):
            continue
        before = vm.value
        try:
            after = await fleet.update(Keys.vm(vm_name), VMRecord, lambda r: observe(
                r, name, seen.get(r.spec.name), cpu))
        except RoamError as exc:  # deleted since the view was read
            if exc.code != ErrorCode.NOT_FOUND:
                raise
            continue
        if after is not None and after.status != before.status:
            await _announce(fleet, before, after)
    return work(await fleet.view(), name, [vm for vm in beat.vms if vm.state in ELSEWHERE])


def observe(vm: VMRecord, node: str, seen: PeerVM | None, cpu_model: str) -> VMRecord | None:
    """`vm` after node `node` reported it as `seen` (None: not there), or None if
    nothing changed."""
    new = vm.model_copy(deep=True)
    status = new.status
    if status.target == node:
        if seen is None or seen.state != "running":
            return None  # still arriving
        status.node, status.target = node, None  # the authority moved here
        status.epoch += 1
        status.phase = VMPhase.RUNNING
        status.failures = 0
        status.detail = None
        status.peer = seen
        new.desired.move = None
    elif status.node == node:
        if seen is not None:
            status.peer = seen
            if status.phase not in (VMPhase.STOPPING, VMPhase.HIBERNATING):
                status.phase = _PHASES.get(seen.state, status.phase)
            if seen.state == "running":
                status.started = True
                status.restore = False
                status.cpu_model = status.cpu_model or cpu_model
                if status.phase == VMPhase.RUNNING:
                    status.detail = None
        elif status.target is not None or status.phase == VMPhase.HIBERNATING:
            return None  # migrating or hibernating: it settles by the report
        elif status.phase == VMPhase.STOPPING or not new.desired.running:
            status.phase, status.node, status.peer = VMPhase.STOPPED, None, None
        elif status.phase == VMPhase.PLACED and not status.started:
            return None  # its start is under way
        elif status.phase in (VMPhase.RUNNING, VMPhase.MIGRATING, VMPhase.LOST,
                              VMPhase.IN_DOUBT):
            status.phase = VMPhase.FAILED
            status.detail = f"no longer on node {node} (its worker exited)"
            status.peer = None
    else:
        return None
    return None if new == vm else new


async def _report(fleet: Fleet, node: str, report: Report) -> None:
    def apply(vm: VMRecord) -> VMRecord | None:
        status = vm.status
        if status.node != node:
            return None
        if report.action == "hibernate" and status.phase == VMPhase.HIBERNATING:
            if report.ok:  # its last checkpoint is sealed: it waits for a node there
                status.phase, status.node, status.peer = VMPhase.HIBERNATED, None, None
                status.restore, status.detail = True, f"hibernated to {vm.spec.store()}"
            else:  # it runs on where it was
                status.phase, status.detail = VMPhase.RUNNING, report.detail
            return vm
        if report.ok:
            return None
        if report.action == "run" and status.phase == VMPhase.PLACED:
            status.phase, status.detail = VMPhase.FAILED, report.detail
        elif report.action == "migrate" and status.target is not None:
            if report.code == ErrorCode.POSTCOPY_FAILED:
                status.detail = report.detail  # the target owns it: it settles there
                return vm
            status.target = None
            vm.desired.move = None
            status.failures += 1
            status.detail = report.detail
            status.phase = (VMPhase.IN_DOUBT if report.code == ErrorCode.IN_DOUBT
                            else VMPhase.RUNNING)
        else:
            status.detail = report.detail
        return vm

    try:
        before = await fleet.vm(report.vm)
        after = await fleet.update(Keys.vm(report.vm), VMRecord, apply)
    except RoamError as exc:  # a VM deleted meanwhile: its report no longer matters
        if exc.code != ErrorCode.NOT_FOUND:
            raise
        return
    if report.action == "hibernate":
        if after is not None and after.status.phase == VMPhase.HIBERNATED:
            await fleet.event(ControlKind.HIBERNATED, vm=report.vm, node=node,
                              detail=after.status.detail)
        elif after is not None:
            await fleet.event(ControlKind.VM_FAILED, vm=report.vm, node=node,
                              detail=f"not hibernated: {report.code}: {report.detail}")
        return
    if not report.ok:
        kind = (ControlKind.MIGRATION_FAILED if report.action == "migrate"
                else ControlKind.VM_FAILED)
        if after is not None and after != before.value:
            await fleet.event(kind, vm=report.vm, node=node,
                              detail=f"{report.code or 'failed'}: {report.detail}")


async def _announce(fleet: Fleet, before: VMRecord, after: VMRecord) -> None:
    """Events for the changes an observation made."""
    name = after.spec.name
    if after.status.node != before.status.node and before.status.target is not None \
            and after.status.node == before.status.target:
        await fleet.event(ControlKind.MIGRATION_ENDED, vm=name, node=before.status.node,
                          to=after.status.node, detail=f"epoch {after.status.epoch}")
    elif after.status.phase != before.status.phase:
        if after.status.phase == VMPhase.FAILED:
            await fleet.event(ControlKind.VM_FAILED, vm=name, node=before.status.node,
                              detail=after.status.detail)
        elif after.status.phase == VMPhase.STOPPED:
            await fleet.event(ControlKind.VM_STOPPED, vm=name, node=before.status.node)


ELSEWHERE = ("running", "paused")
"""Peer states of a copy that must stop if its VM is placed on another node."""


def work(view: View, name: str, reported: list[PeerVM] | None = None) -> NodeWork:
    """What node `name` should be doing, by the records in `view`. A copy it `reported`
    (running or paused) of a VM placed on another node is stopped: e.g. this node was
    lost, and the VM restarted elsewhere from its checkpoint under a newer epoch."""
    items: list[Work] = []
    for seen in reported or []:
        found = view.vms.get(seen.name)
        if found is None:
            continue
        status = found.value.status
        if status.node is not None and name not in (status.node, status.target):
            items.append(Work(action="stop", vm=found.value.spec, epoch=status.epoch))
    for vm in (v.value for v in view.vms.values()):
        status = vm.status
        if status.node != name:
            continue
        if not vm.desired.running or vm.desired.deleted:
            if status.phase != VMPhase.STOPPED:
                items.append(Work(action="stop", vm=vm.spec, epoch=status.epoch))
        elif status.target is not None and status.target in view.nodes:
            target = view.nodes[status.target].value.registration
            items.append(Work(action="migrate", vm=vm.spec, epoch=status.epoch,
                              to=target.peer, to_node=status.target))
        elif status.phase == VMPhase.HIBERNATING:
            items.append(Work(action="hibernate", vm=vm.spec, epoch=status.epoch))
        elif status.phase == VMPhase.PLACED and not status.started:
            items.append(Work(action="run", vm=vm.spec, epoch=status.epoch,
                              restore=status.restore))
    underlay = view.nodes[name].value.registration.underlay if name in view.nodes else None
    gateways = [GatewayWork(name=v.value.spec.name, vni=v.value.spec.vni,
                            publish=v.value.spec.publish)
                for v in view.vms.values()
                if underlay is not None and v.value.spec.gateway == underlay
                and v.value.spec.vni is not None]
    syncs = [SyncWork(vm=v.spec.name, to=v.spec.sync_to,
                      checkpoint_every=v.spec.checkpoint_every)
             for v in (r.value for r in view.vms.values())
             if v.spec.sync_to is not None and v.status.node == name
             and v.status.target is None and v.status.phase == VMPhase.RUNNING]
    return NodeWork(work=items, gateways=gateways, syncs=syncs)

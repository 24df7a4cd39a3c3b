"""When a lost node's VMs may run elsewhere: not before it has surely paused them.

A node that cannot renew its lease cannot know whether the control plane still counts
it alive; the control plane cannot know whether the node still runs its VMs. The rule
that keeps a VM in one place:

- the node's agent pauses its own running VMs once it has gone a lease TTL without a
  successful heartbeat (roam.control.fence): by then the lease has expired, or is
  about to;
- the control plane marks the node lost when its lease expires (roam.control.reconciler)
  and may start its VMs elsewhere only 2 TTL after that, three TTL after the node's last
  heartbeat: a whole TTL after the node paused them, for clocks that run at different
  rates and a pause that takes a while. A restart elsewhere would be a placement with a
  new authority epoch (the node's copy, if it comes back, is then stopped, as any copy
  whose epoch is behind).

A restart needs the VM's memory and disks as they were: its last sealed checkpoint, in
its checkpoint store (`vm create --sync-to s3://BUCKET/PREFIX`: its node syncs it there
with checkpoints). After 2 TTL `LostNodes` makes such a VM pending again with `restore`
set (a `restoring` event when it is placed): the reconciler places it on a node that
fits, with a new epoch, and that node restores it (the peer's restore, which writes the
next authority epoch to the bucket, so the old copy can no longer seal a point there).
The old node, if it comes back, finds it placed elsewhere and stops its paused copy
(roam.control.fence). A VM without a store cannot be restarted with its state: `LostNodes`
says, once per VM, that it stays lost (a `vm_lost` event,
roam_vms_lost_total{reason="node_lost"}); it stays assigned to its node and runs again
there if the node comes back (its agent resumes it once the control plane confirms it is
still the VM's node).
"""

from __future__ import annotations

import time

from roam.control.evacuation import EvacuationMetrics, event
from roam.control.fleet import Fleet
from roam.control.models import ControlKind, Keys, VMPhase, VMRecord

STAYS_LOST = ("its node has been lost for 2 lease TTLs and it has no checkpoint store to "
              "restart from elsewhere: it stays lost until its node comes back")
RESTARTS = "its node has been lost for 2 lease TTLs: it restarts from its last checkpoint"


class LostNodes:
    """The reconciler's step for lost nodes' VMs."""

    def __init__(self, fleet: Fleet, ttl: float, metrics: EvacuationMetrics) -> None:
        self.fleet = fleet
        self.ttl = ttl
        self.metrics = metrics

    async def step(self) -> None:
        view = await self.fleet.view()
        now = time.time()
        for name, node in view.nodes.items():
            since = node.value.lost_since
            if since is None or now - since < 2 * self.ttl:
                continue
            for vm_name, vm in view.vms.items():
                status = vm.value.status
                if status.node != name or status.phase != VMPhase.LOST \
                        or status.detail == STAYS_LOST:
                    continue

                if vm.value.spec.sync_to is not None:
                    await self._restart(vm_name, name)
                    continue

                def stays(record: VMRecord) -> VMRecord | None:
                    if record.status.phase != VMPhase.LOST or record.status.detail == STAYS_LOST:
                        return None
                    record.status.detail = STAYS_LOST
                    return record
                updated = await self.fleet.update(Keys.vm(vm_name), VMRecord, stays)
                if updated is not None and updated.status.detail == STAYS_LOST:
                    self.metrics.lost.labels("node_lost").inc()
                    await event(self.fleet, ControlKind.VM_LOST, vm=vm_name, node=name,
                                detail=STAYS_LOST)

    async def _restart(self, vm_name: str, node: str) -> None:
        """Make `vm_name` pending, to be restored from its store where it fits."""
        def pending(record: VMRecord) -> VMRecord | None:
            if record.status.phase != VMPhase.LOST or record.status.node != node:
                return None
            status = record.status
            status.phase, status.node, status.target, status.peer = \
                VMPhase.PENDING, None, None, None
            status.restore, status.started, status.detail = True, False, RESTARTS
            record.desired.move = None
            return record
        updated = await self.fleet.update(Keys.vm(vm_name), VMRecord, pending)
        if updated is not None and updated.status.detail == RESTARTS \
                and updated.status.phase == VMPhase.PENDING:
            await event(self.fleet, ControlKind.RESTORING, vm=vm_name, node=node,
                        detail=f"{RESTARTS} in {updated.spec.store()}")

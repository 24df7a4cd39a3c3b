"""Where a VM goes: a pure function of the fleet as read (roam.control.fleet.View).

A node is a candidate when it is ready (not cordoned, draining or lost), is not excluded
(the node a VM moves off), matches the VM's CPU model (the one it asked for, else the one
it runs under since its first start: its saved device state names CPU features), and has
room: memory and CPUs of the VMs it holds, and of those migrating to it, plus this one,
within its capacity. Among candidates the scheduler spreads VMs over the values of the
labels the VM names (`spread`: fewest VMs of its group on nodes with the same value),
then prefers the cheapest (label `price`, per hour; a node without one is dearest), then
the node with fewest VMs. `cheapest` ranks by price alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from roam.control.fleet import View
from roam.control.models import NodeState, VMRecord
from roam.errors import ErrorCode, RoamError


class Unschedulable(RoamError):
    """No node can take the VM now; `detail` says why not, node by node."""

    code = ErrorCode.CONFLICT


@dataclass(frozen=True)
class Use:
    memory_mib: int = 0
    cpus: int = 0
    vms: int = 0


def usage(vms: Iterable[VMRecord]) -> dict[str, Use]:
    """What each node holds or is about to receive (a migration's target counts at both
    ends until it settles)."""
    used: dict[str, Use] = {}
    for vm in vms:
        for node in {vm.status.node, vm.status.target} - {None}:
            assert node is not None
            u = used.get(node, Use())
            used[node] = Use(u.memory_mib + vm.spec.memory_mib, u.cpus + vm.spec.cpus,
                             u.vms + 1)
    return used


def required_cpu(vm: VMRecord) -> str | None:
    return vm.spec.cpu_model or vm.status.cpu_model


def place(vm: VMRecord, view: View, *, exclude: Iterable[str] = (),
          to: str | None = None, cheapest: bool = False) -> str:
    """The node `vm` should run on (or move to), or Unschedulable."""
    others = [v.value for name, v in view.vms.items() if name != vm.spec.name]
    used = usage(others)
    excluded = set(exclude)
    why: list[str] = []
    fits: list[str] = []
    names = [to] if to is not None else sorted(view.nodes)
    for name in names:
        if name not in view.nodes:
            raise Unschedulable(f"no node called {name!r}", code=ErrorCode.NOT_FOUND)
        reason = _unfit(vm, view, name, used.get(name, Use()), excluded)
        if reason is None:
            fits.append(name)
        else:
            why.append(f"{name}: {reason}")
    if not fits:
        raise Unschedulable(f"no node fits {vm.spec.name} ({'; '.join(why) or 'no nodes'})")
    return min(fits, key=lambda n: _rank(vm, view, n, used, others, cheapest))


def _unfit(vm: VMRecord, view: View, name: str, use: Use, excluded: set[str]) -> str | None:
    if name in excluded:
        return "it is the node the VM leaves"
    state = view.node_state(name)
    if state != NodeState.READY:
        return state.value
    node = view.nodes[name].value.registration
    cpu = required_cpu(vm)
    if cpu is not None and node.cpu.model != cpu:
        return f"CPU model {node.cpu.model!r}, not {cpu!r}"
    capacity_mib = node.capacity.memory_bytes >> 20
    if use.memory_mib + vm.spec.memory_mib > capacity_mib:
        return (f"memory: {use.memory_mib} MiB used of {capacity_mib}, "
                f"{vm.spec.memory_mib} more needed")
    if use.cpus + vm.spec.cpus > node.capacity.cpus:
        return f"CPUs: {use.cpus} used of {node.capacity.cpus}, {vm.spec.cpus} more needed"
    return None


def _rank(vm: VMRecord, view: View, name: str, used: dict[str, Use],
          others: list[VMRecord], cheapest: bool) -> tuple[float, ...]:
    price = view.nodes[name].value.price()
    if cheapest:
        return (price,)
    labels = view.nodes[name].value.registration.labels
    peers = [o for o in others if o.spec.group == vm.spec.group]
    crowd = 0
    for key in vm.spec.spread:
        value = labels.get(key)
        crowd += sum(1 for o in peers for n in {o.status.node, o.status.target} - {None}
                     if n in view.nodes
                     and view.nodes[n].value.registration.labels.get(key) == value)
    return (crowd, price, used.get(name, Use()).vms)

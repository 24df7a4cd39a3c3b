"""Acceptance: a spot notice evacuates a node of the fleet; a node cut off from the
control plane pauses its VMs, which start nowhere else.

This is `make demo` (roam.demo.fleet) with two redis VMs, each with a client writing over
one connection: both are created (on A), moved to B through the API, then B's metadata
service (a fake one in B's namespace, polled by B's real watcher) gives a spot notice
with each cloud's documented deadline (AWS two minutes, GCP and Azure 30 s: the machine
is shared, and two moves at once under TCG take most of 30 s). Both must run elsewhere
before the deadline, each client must keep its connection and no acknowledged write may
be lost; the demo's JSON line says so.

Then the node holding them is cut off from the control plane (a blackhole route to P in
its namespace): its agent must pause both VMs after the lease TTL (not before), the
control plane marks them lost and, 2 TTL later, says they stay lost (no checkpoints),
and no other node runs them meanwhile. Once the route is back the node resumes them and
every acknowledged write is still there.

The default run watches AWS's form of notice; ROAM_SPOT_CLOUDS=aws,gcp,azure runs the
fleet once per cloud (GCP's and Azure's forms also reach the control plane in
tests/control/test_spot_watch.py, without VMs).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from roam.demo.fleet import NET, NODES, ROLES, FleetDemo, summary, tour
from roam.network import ns
from roam.network.lab import lab
from roam.spot import Cloud
from tests.blueprint.boot import short_dir
from tests.vm.conftest import snapshot

__all__ = ["snapshot"]

TTL = 4.0
VMS = {"r1": (101, 6379), "r2": (102, 6380)}
CLOUDS = os.environ.get("ROAM_SPOT_CLOUDS", "aws").split(",")
DEADLINES = {Cloud.AWS: 120.0, Cloud.GCP: 30.0, Cloud.AZURE: 30.0}


async def cut_off(fleet: FleetDemo) -> dict[str, Any]:
    """Cut the VMs' node off P; what was seen until it is back and has resumed them."""
    assert fleet.control is not None
    await fleet.until(lambda: _phases(fleet), "the VMs settled")
    nodes = {vm.status.node for vm in await fleet.control.vms()}
    assert len(nodes) == 1, nodes  # both went to the cheapest node
    node = nodes.pop()
    assert node is not None
    others = [r for r in NODES if r != node]
    route = ["ip", "route", "add", "blackhole", f"{fleet.addr['p']}/32"]
    ns.run(fleet.hosts.nodes[node], route)
    cut = time.monotonic()
    seen: dict[str, Any] = {"node": node, "early": await fleet.peer_vms(node)}
    try:
        while time.monotonic() - cut < TTL / 2:  # never paused before a TTL went by
            states = await fleet.peer_vms(node)
            assert set(states.values()) == {"running"}, states
            await asyncio.sleep(0.2)
        await fleet.until(lambda: _all(fleet, node, "paused"), "the VMs paused", 6 * TTL)
        seen["paused_after"] = time.monotonic() - cut

        async def stays_lost() -> bool:
            for other in others:  # nothing runs them anywhere else, at any moment
                assert await fleet.peer_vms(other) == {}
            return len(fleet.control_events("vm_lost")) == len(VMS)
        await fleet.until(stays_lost, "the control plane to say they stay lost", 8 * TTL)
        seen["vms"] = {vm.name: (vm.status.phase.value, vm.status.node)
                       for vm in await fleet.control.vms()}
    finally:
        ns.run(fleet.hosts.nodes[node], ["ip", "route", "del", "blackhole",
                                         f"{fleet.addr['p']}/32"])
    await fleet.until(lambda: _all(fleet, node, "running"), "the VMs resumed", 6 * TTL)
    seen["phases"] = await fleet.until(lambda: _phases(fleet), "the VMs running again")
    return seen


async def _all(fleet: FleetDemo, node: str, state: str) -> bool:
    return set((await fleet.peer_vms(node)).values()) == {state}


async def _phases(fleet: FleetDemo) -> dict[str, tuple[str, str | None]] | None:
    assert fleet.control is not None
    vms = {vm.name: (vm.status.phase.value, vm.status.node)
           for vm in await fleet.control.vms()}
    return vms if {phase for phase, _ in vms.values()} == {"running"} else None


async def scenario(work: Path, hosts: Any, package: Path, cloud: Cloud) -> dict[str, Any]:
    async with FleetDemo(work, hosts, package, cloud=cloud, ttl=TTL) as fleet:
        report = await tour(fleet, VMS, deadline=DEADLINES[cloud])
        report["cut"] = await cut_off(fleet)
        report["after"] = {name: await fleet.verify(name) for name in VMS}
        if cloud == Cloud.AZURE:
            report["acknowledged"] = fleet.metadata_state("b")["acknowledged"]
        report["events"] = {kind: len(fleet.control_events(kind)) for kind in (
            "notice", "evacuated", "evacuation_finished", "will_be_lost")}
        return report


@pytest.mark.timeout(900)
@pytest.mark.parametrize("cloud", [Cloud(c) for c in CLOUDS])
def test_a_spot_notice_evacuates_both_vms_and_a_cut_off_node_pauses_its_own(
        snapshot: Path, cloud: Cloud) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with short_dir() as work, lab(*ROLES, net=NET) as hosts:
        report = ns.call_in(hosts.nodes["p"], lambda: asyncio.run(
            scenario(work, hosts, snapshot, cloud)))
    line = summary(report)
    print(f"\n{cloud.value}: evacuated {line['evacuation_ms'] / 1000:.1f} s after the "
          f"notice, smallest margin {line['margin_ms'] / 1000:.1f} s of "
          f"{line['deadline_ms'] / 1000:.0f} s; {line['acked_writes']} writes; paused "
          f"{report['cut']['paused_after']:.1f} s after the cut (TTL {TTL} s)")
    record = report["notice"]
    assert record.cloud == cloud
    assert line["evacuated"] and sorted(record.evacuated) == sorted(VMS)
    assert all(v.to in ("a", "c") and v.margin_ms is not None and v.margin_ms > 0
               for v in record.vms.values())
    assert line["margin_ms"] > 0 and line["evacuation_ms"] < line["deadline_ms"]
    assert line["connection_kept"] and line["lost_writes"] == 0
    assert all(c["acked"] > 100 for c in report["clients"].values())
    assert [(h["from"], h["to"]) for h in line["hops"]][:2] == [("A", "B"), ("B", "A")]
    events = report["events"]
    assert (events["notice"], events["evacuated"], events["evacuation_finished"]) == (1, 2, 1)
    if cloud == Cloud.AZURE:  # acknowledged once the evacuation was over
        assert len(report["acknowledged"]) == 1

    cut = report["cut"]
    assert set(cut["early"].values()) == {"running"}
    assert cut["vms"] == {name: ("lost", cut["node"]) for name in VMS}
    assert cut["phases"] == {name: ("running", cut["node"]) for name in VMS}
    assert all(r["lost"] == 0 and r["acked"] > 100 for r in report["after"].values())

"""The scheduler (roam.control.scheduler): fit, CPU model, spread, price, exclusions."""

from __future__ import annotations

import pytest

from roam.control import scheduler
from roam.control.fleet import Versioned, View
from roam.control.models import (
    Cpu,
    Drain,
    NodeRecord,
    Registration,
    Status,
    VMPhase,
    VMRecord,
    VMSpec,
)
from roam.errors import ErrorCode
from roam.peer.models import Accelerator, Capacity

GIB = 1 << 30


def node(name: str, *, memory_gib: int = 4, cpus: int = 4, price: str | None = None,
         model: str = "EPYC", cordoned: bool = False, **labels: str) -> NodeRecord:
    if price is not None:
        labels["price"] = price
    return NodeRecord(registration=Registration(
        name=name, peer=f"tcp://10.0.0.1:{7000 + len(name)}", version="0",
        capacity=Capacity(memory_bytes=memory_gib * GIB, memory_available_bytes=0,
                          cpus=cpus),
        accelerator=Accelerator(kvm=False, reason=""), cpu=Cpu(model=model),
        labels=labels), cordoned=cordoned, joined=0)


def vm(name: str, memory: int = 1024, cpus: int = 1, on: str | None = None,
       target: str | None = None, **spec: object) -> VMRecord:
    return VMRecord(spec=VMSpec.model_validate({"name": name, "package": "/p",
                                                "memory_mib": memory, "cpus": cpus, **spec}),
                    status=Status(node=on, target=target,
                                  phase=VMPhase.RUNNING if on else VMPhase.PENDING),
                    created=0)


def view(nodes: list[NodeRecord], vms: list[VMRecord] = (),  # type: ignore[assignment]
         lost: tuple[str, ...] = (), draining: tuple[str, ...] = ()) -> View:
    return View(
        nodes={n.registration.name: Versioned(n, 1) for n in nodes},
        alive={n.registration.name for n in nodes} - set(lost),
        vms={v.spec.name: Versioned(v, 1) for v in vms},
        drains={d: Versioned(Drain(max_parallel=2, started=0), 1) for d in draining})


def test_prefers_the_cheapest_node_that_fits() -> None:
    fleet = view([node("dear", price="0.5"), node("cheap", price="0.1"),
                  node("unpriced")])
    assert scheduler.place(vm("x"), fleet) == "cheap"


def test_memory_and_cpus_count_what_a_node_holds_and_receives() -> None:
    nodes = [node("small", memory_gib=2, price="0.1"), node("big", memory_gib=8, price="0.2")]
    # 1 GiB on small and 512 MiB arriving there by migration: 1.5 GiB of 2 used.
    held = [vm("a", on="small"), vm("b", memory=512, on="big", target="small")]
    assert scheduler.place(vm("x", memory=512), view(nodes, held)) == "small"
    assert scheduler.place(vm("x", memory=1024), view(nodes, held)) == "big"
    busy = [vm("c", cpus=4, on="small")]
    assert scheduler.place(vm("x", memory=1), view(nodes, busy)) == "big"


def test_nothing_fits_says_why_node_by_node() -> None:
    fleet = view([node("n1", memory_gib=1), node("n2", cordoned=True), node("n3"),
                  node("n4")], lost=("n3",), draining=("n4",))
    with pytest.raises(scheduler.Unschedulable) as caught:
        scheduler.place(vm("x", memory=2048), fleet)
    message = caught.value.message
    assert "n1: memory" in message and "n2: cordoned" in message
    assert "n3: lost" in message and "n4: draining" in message
    assert caught.value.code == ErrorCode.CONFLICT


def test_cpu_model_of_the_spec_or_of_the_first_node() -> None:
    fleet = view([node("intel", model="Xeon", price="0.1"), node("amd", price="0.2")])
    assert scheduler.place(vm("x", cpu_model="EPYC"), fleet) == "amd"
    learned = vm("y", on="amd")
    learned.status.cpu_model = "EPYC"
    three = view([node("intel", model="Xeon", price="0.1"), node("amd", price="0.2"),
                  node("amd2", price="0.3")])
    assert scheduler.place(learned, three, exclude=["amd"]) == "amd2"
    with pytest.raises(scheduler.Unschedulable, match="CPU model"):
        scheduler.place(learned, view([node("intel", model="Xeon"), node("amd")]),
                        exclude=["amd"])


def test_spread_over_a_label_before_price() -> None:
    nodes = [node("z1a", price="0.1", zone="z1"), node("z1b", price="0.1", zone="z1"),
             node("z2", price="0.9", zone="z2")]
    placed = [vm("web-1", on="z1a", spread=["zone"], group="web")]
    assert scheduler.place(vm("web-2", spread=["zone"], group="web"),
                           view(nodes, placed)) == "z2"
    # another group does not count; without spread, price wins
    assert scheduler.place(vm("db-1", spread=["zone"], group="db"),
                           view(nodes, placed)) == "z1b"
    assert scheduler.place(vm("other"), view(nodes, placed)) == "z1b"


def test_equal_price_goes_to_the_emptier_node() -> None:
    nodes = [node("n1", price="0.1"), node("n2", price="0.1")]
    assert scheduler.place(vm("x"), view(nodes, [vm("a", on="n1")])) == "n2"


def test_moves_exclude_the_source_and_honour_to_and_cheapest() -> None:
    nodes = [node("src", price="0.01"), node("mid", price="0.2", zone="z"),
             node("low", price="0.1", zone="z")]
    moving = vm("x", on="src", spread=["zone"])
    fleet = view(nodes, [moving, vm("y", on="low")])
    assert scheduler.place(moving, fleet, exclude=["src"], cheapest=True) == "low"
    assert scheduler.place(moving, fleet, exclude=["src"], to="mid") == "mid"
    with pytest.raises(scheduler.Unschedulable, match="leaves"):
        scheduler.place(moving, fleet, exclude=["src"], to="src")
    with pytest.raises(scheduler.Unschedulable) as caught:
        scheduler.place(moving, fleet, to="nowhere")
    assert caught.value.code == ErrorCode.NOT_FOUND


def test_a_vm_does_not_count_against_itself() -> None:
    only = node("n1", memory_gib=1)
    me = vm("x", memory=1024, on="n1")
    assert scheduler.place(me, view([only], [me])) == "n1"

"""VMs with a checkpoint store (`sync_to`) in the control plane: the API and the
reconciler in process on a real SQLite store, driven by the node protocol as
tests/control/test_evacuation.py does.

- A node is told to sync such a VM with checkpoints while it runs there.
- On a notice, one that cannot leave in time (here: nowhere to go) is hibernated: its node
  is told to, reports it done, and the VM waits in its store until a node fits, where
  it is restored; the events say so. One without a store is said to be lost.
- A lost node's VM with a store is placed elsewhere 2 TTL after the lease expired, to be
  restored from its last checkpoint under a new epoch; the old node, back, is told to
  stop its copy.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from roam.control.lost import RESTARTS
from tests.control.test_evacuation import GIB, Control

STORE = "s3://fleet-bucket/vms"


async def create(control: Control, name: str, memory: int, store: str | None) -> None:
    body: dict[str, Any] = {"name": name, "package": "/pkg", "memory_mib": memory}
    if store is not None:
        body |= {"sync_to": store, "checkpoint_every": 5}
    await control.call("POST", "/vms", body, expect=201)


async def beat(control: Control, node: str, lease: int, running: list[str],
               reports: list[dict[str, Any]] | None = None, state: str = "running"
               ) -> dict[str, Any]:
    """A heartbeat with reports; the whole answer (work, gateways, syncs)."""
    answer = await control.call("POST", f"/nodes/{node}/heartbeat", {
        "lease": lease, "reports": reports or [],
        "vms": [{"name": n, "state": state, "ready": True} for n in running]},
        expect=200)
    return answer  # type: ignore[no-any-return]


def actions(answer: dict[str, Any]) -> list[tuple[str, str, bool]]:
    return sorted((w["action"], w["vm"]["name"], w["restore"]) for w in answer["work"])


async def test_a_vm_that_cannot_leave_hibernates_and_is_restored_where_it_fits(
        tmp_path: Path) -> None:
    control = await Control.open(tmp_path / "data")
    src = await control.join("src", "0.01", memory=64 * GIB)
    await control.join("dst", "0.5", memory=8 * GIB)
    await create(control, "huge", 20000, STORE)
    await create(control, "bare", 20000, None)
    await control.reconciler.reconcile()
    answer = await beat(control, "src", src, ["huge", "bare"])
    assert answer["syncs"] == [{"vm": "huge", "to": STORE, "checkpoint_every": 5.0}]

    await control.call("POST", "/nodes/src/notice", {"deadline_seconds": 60}, expect=202)
    await control.reconciler.reconcile()
    hibernating = await control.events("hibernating")
    assert [e["vm"] for e in hibernating] == ["huge"]
    assert hibernating[0]["detail"].startswith("nowhere to go")
    assert f"hibernates to {STORE}/huge" in hibernating[0]["detail"]
    assert [e["vm"] for e in await control.events("will_be_lost")] == ["bare"]
    vm = await control.call("GET", "/vms/huge")
    assert vm["status"]["phase"] == "hibernating"
    answer = await beat(control, "src", src, ["huge", "bare"])
    assert actions(answer) == [("hibernate", "huge", False)]
    assert answer["syncs"] == []  # not while it hibernates

    epoch = vm["status"]["epoch"]
    await beat(control, "src", src, ["bare"], reports=[
        {"vm": "huge", "action": "hibernate", "ok": True, "epoch": epoch}])
    vm = await control.call("GET", "/vms/huge")
    assert (vm["status"]["phase"], vm["status"]["node"], vm["status"]["restore"]) == (
        "hibernated", None, True)
    assert [e["vm"] for e in await control.events("hibernated")] == ["huge"]
    await control.reconciler.reconcile()
    record = await control.call("GET", "/nodes/src/notice")
    assert record["vms"]["huge"]["state"] == "hibernated"
    assert (await control.call("GET", "/vms/huge"))["status"]["phase"] == "hibernated"

    big = await control.join("big", "0.3", memory=64 * GIB)  # now a node fits
    await control.reconciler.reconcile()
    vm = await control.call("GET", "/vms/huge")
    assert (vm["status"]["phase"], vm["status"]["node"]) == ("placed", "big")
    assert vm["status"]["epoch"] == epoch + 1
    assert actions(await beat(control, "big", big, [])) == [("run", "huge", True)]
    restoring = await control.events("restoring")
    assert [(e["vm"], e["node"]) for e in restoring] == [("huge", "big")]
    answer = await beat(control, "big", big, ["huge"])
    vm = await control.call("GET", "/vms/huge")
    assert (vm["status"]["phase"], vm["status"]["restore"]) == ("running", False)
    assert answer["syncs"] == [{"vm": "huge", "to": STORE, "checkpoint_every": 5.0}]
    await control.close()


async def test_a_failed_hibernation_leaves_the_vm_running_where_it_was(
        tmp_path: Path) -> None:
    control = await Control.open(tmp_path / "data")
    src = await control.join("src", "0.01", memory=64 * GIB)
    await create(control, "huge", 20000, STORE)
    await control.reconciler.reconcile()
    await beat(control, "src", src, ["huge"])
    await control.call("POST", "/nodes/src/notice", {"deadline_seconds": 60}, expect=202)
    await control.reconciler.reconcile()
    await beat(control, "src", src, ["huge"], reports=[
        {"vm": "huge", "action": "hibernate", "ok": False, "code": "conflict",
         "detail": "the store refused"}])
    vm = await control.call("GET", "/vms/huge")
    assert (vm["status"]["phase"], vm["status"]["node"]) == ("running", "src")
    await control.reconciler.reconcile()
    record = await control.call("GET", "/nodes/src/notice")
    assert record["vms"]["huge"]["state"] == "waiting"
    assert actions(await beat(control, "src", src, ["huge"])) == []  # not again
    await control.close()


async def test_a_lost_nodes_vm_restarts_elsewhere_from_its_store_after_2_ttl(
        tmp_path: Path) -> None:
    ttl = 0.5
    control = await Control.open(tmp_path / "data", ttl=ttl)
    n1 = await control.join("n1", "0.1")
    n2 = await control.join("n2", "0.2")
    await create(control, "web", 256, STORE)
    await create(control, "bare", 256, None)
    await control.reconciler.reconcile()
    assert actions(await beat(control, "n1", n1, [])) == [
        ("run", "bare", False), ("run", "web", False)]
    await beat(control, "n1", n1, ["web", "bare"])
    epoch = (await control.call("GET", "/vms/web"))["status"]["epoch"]

    quiet = time.monotonic()
    given: list[tuple[str, str, bool]] = []
    while not given:  # n1 goes quiet; n2 keeps beating until it is given web
        assert time.monotonic() - quiet < 20 * ttl, "web was never restarted"
        await asyncio.sleep(0.1)
        await control.reconciler.reconcile()
        given = actions(await beat(control, "n2", n2, []))
    assert given == [("run", "web", True)]
    since = (await control.fleet.node("n1")).value.lost_since
    restoring = await control.events("restoring")
    assert since is not None and restoring[0]["at"] - since >= 2 * ttl
    assert restoring[0]["detail"] == f"{RESTARTS} in {STORE}/web"
    vm = await control.call("GET", "/vms/web")
    assert (vm["status"]["node"], vm["status"]["epoch"]) == ("n2", epoch + 1)
    bare = await control.call("GET", "/vms/bare")
    assert (bare["status"]["phase"], bare["status"]["node"]) == ("lost", "n1")
    await beat(control, "n2", n2, ["web"])

    n1 = await control.join("n1", "0.1")  # back: its copy is paused by its fence
    answer = await beat(control, "n1", n1, ["web", "bare"], state="paused")
    # Its copy of web (placed on n2 now) is stopped; bare, still n1's, stays.
    assert actions(answer) == [("stop", "web", False)]
    assert answer["syncs"] == []
    vm = await control.call("GET", "/vms/web")
    assert (vm["status"]["phase"], vm["status"]["node"]) == ("running", "n2")
    await control.close()


async def test_a_vm_without_time_to_move_hibernates_instead(tmp_path: Path) -> None:
    control = await Control.open(tmp_path / "data")
    src = await control.join("src", "0.01", memory=64 * GIB)
    await control.join("dst", "0.5", memory=8 * GIB)
    await create(control, "slow", 6000, STORE)  # 6000 MiB at 100 MiB/s: past 8 s
    await create(control, "small", 256, STORE)
    await control.reconciler.reconcile()
    await beat(control, "src", src, ["slow", "small"])
    await control.call("POST", "/nodes/src/notice", {"deadline_seconds": 8}, expect=202)
    await control.reconciler.reconcile()
    hibernating = await control.events("hibernating")
    assert [e["vm"] for e in hibernating] == ["slow"]
    assert "would resume about" in hibernating[0]["detail"]
    assert await control.events("will_be_lost") == []
    answer = await beat(control, "src", src, ["slow", "small"])
    assert sorted((w["action"], w["vm"]["name"]) for w in answer["work"]) == [
        ("hibernate", "slow"), ("migrate", "small")]
    await control.close()

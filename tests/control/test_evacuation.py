"""Evacuation on a spot notice, and lost nodes' VMs, in the control plane: the API and the
reconciler in process on a real SQLite store, driven by the node protocol itself (the
test heartbeats as nodes would, as tests/control/test_api.py does).

- A notice cordons the node; its VMs move highest priority first, at most max_parallel
  at once; each one's margin (deadline minus its resume elsewhere) is an event and a
  histogram sample; the evacuation ends with a summary.
- A VM that has nowhere to go, or (by the estimate from memory and throughput) no time,
  is said to be lost at the first pass, not at the deadline; one with room but no time
  still moves, after those that can make it; at the deadline what has not left is lost.
- Notices are fuzzed: bad ones are bad requests and change nothing.
- A lost node's VMs are never started elsewhere; after 2 TTL the control plane says they
  stay lost when they have no checkpoint store (test_checkpoint_store.py: with one).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roam.control import auth
from roam.control.api import Plane, create_app
from roam.control.election import Election
from roam.control.evacuation import Evacuation
from roam.control.fleet import Fleet
from roam.control.lost import STAYS_LOST, LostNodes
from roam.control.metrics import FleetMetrics
from roam.control.models import Keys
from roam.control.reconciler import Reconciler
from roam.control.sqlite import SqliteStore
from roam.errors import ErrorCode
from tests.control.test_api import problem

GIB = 1 << 30


class Control:
    """The API and the leader's reconciler (with its evacuation and lost-node steps)
    over a store, and a client of the API with a valid token."""

    def __init__(self, store: SqliteStore, token: str, ttl: float) -> None:
        self.store = store
        self.fleet = Fleet(store)
        metrics = FleetMetrics()
        plane = Plane(self.fleet, ttl, Election(store, "test", ttl), metrics)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(plane)),
                                      base_url="http://control",
                                      headers={"Authorization": f"Bearer {token}"})
        self.reconciler = Reconciler(self.fleet, Evacuation(self.fleet, metrics.evacuation),
                                     LostNodes(self.fleet, ttl, metrics.evacuation))

    @classmethod
    async def open(cls, data: Path, ttl: float = 60.0) -> Control:
        store = await SqliteStore.open(data)
        return cls(store, await auth.create(Fleet(store), "test"), ttl)

    async def close(self) -> None:
        await self.http.aclose()
        await self.store.close()

    async def call(self, method: str, path: str, body: Any = None,
                   expect: int | None = None) -> Any:
        response = await self.http.request(method, path, json=body)
        if expect is not None:
            assert response.status_code == expect, response.text
        return response.json() if response.content else None

    async def join(self, name: str, price: str, memory: int = 8 * GIB) -> int:
        registered = await self.call("POST", "/nodes", {
            "name": name, "peer": f"tcp://10.9.0.{len(name)}:7000", "version": "test",
            "capacity": {"memory_bytes": memory, "memory_available_bytes": memory,
                         "cpus": 16},
            "accelerator": {"kvm": False, "reason": "test"}, "cpu": {"model": "EPYC"},
            "labels": {"price": price}}, expect=201)
        return int(registered["lease"])

    async def beat(self, name: str, lease: int, running: list[str],
                   resumed_at: float | None = None) -> list[dict[str, Any]]:
        """A heartbeat of node `name` whose peer runs `running`; its work."""
        work = await self.call("POST", f"/nodes/{name}/heartbeat", {
            "lease": lease, "vms": [{"name": n, "state": "running", "ready": True,
                                     "resumed_at": resumed_at} for n in running]},
            expect=200)
        return work["work"]  # type: ignore[no-any-return]

    async def events(self, kind: str) -> list[dict[str, Any]]:
        found = (await self.store.range(Keys.EVENTS)).records
        return [e for e in (json.loads(r.value) for r in found) if e.get("kind") == kind]

    async def metrics(self) -> str:
        return (await self.http.get("/metrics")).text


async def started(control: Control, node: str, lease: int,
                  vms: list[tuple[str, int, int]]) -> None:
    """VMs (name, MiB, priority) created and running on `node`."""
    for name, memory, priority in vms:
        await control.call("POST", "/vms", {"name": name, "package": "/pkg",
                                            "memory_mib": memory, "priority": priority},
                           expect=201)
    await control.reconciler.reconcile()
    await control.beat(node, lease, [name for name, _, _ in vms])


def moving(work: list[dict[str, Any]]) -> list[str]:
    return sorted(w["vm"]["name"] for w in work if w["action"] == "migrate")


async def test_a_notice_moves_every_vm_highest_priority_first(tmp_path: Path) -> None:
    control = await Control.open(tmp_path / "data")
    src = await control.join("src", "0.01")
    dst = await control.join("dst", "0.5")
    vms = [("low", 256, 0), ("mid", 256, 5), ("high", 256, 10)]
    await started(control, "src", src, vms)
    here = ["high", "low", "mid"]

    record = await control.call("POST", "/nodes/src/notice", {
        "deadline_seconds": 60, "max_parallel": 1, "cloud": "aws",
        "event_id": "terminate-1"}, expect=202)
    assert sorted(record["vms"]) == here and record["finished"] is None
    again = await control.call("POST", "/nodes/src/notice", {  # the same notice again
        "deadline_seconds": 30, "cloud": "aws", "event_id": "terminate-1"}, expect=202)
    assert again["deadline"] == record["deadline"]
    assert len(await control.events("notice")) == 1
    later = await control.call("POST", "/nodes/src/notice", {  # a later deadline: ignored
        "deadline_seconds": 90, "event_id": "other"}, expect=202)
    assert later["deadline"] == record["deadline"]
    assert (await control.call("GET", "/nodes/src"))["state"] == "cordoned"

    evacuated = []
    for expected in ("high", "mid", "low"):  # one at a time, by priority
        await control.reconciler.reconcile()
        assert moving(await control.beat("src", src, here)) == [expected]
        resumed = time.time()
        here.remove(expected)
        evacuated.append(expected)
        await control.beat("dst", dst, evacuated, resumed_at=resumed)
        await control.beat("src", src, here)
        await control.reconciler.reconcile()
        event = (await control.events("evacuated"))[-1]
        assert (event["vm"], event["node"], event["to"]) == (expected, "src", "dst")
        assert event["margin_ms"] == round((record["deadline"] - resumed) * 1000, 1)
    record = await control.call("GET", "/nodes/src/notice")
    assert record["finished"] is not None
    assert {n: v["state"] for n, v in record["vms"].items()} == dict.fromkeys(
        ("high", "mid", "low"), "evacuated")
    finished = await control.events("evacuation_finished")
    assert len(finished) == 1 and finished[0]["detail"].startswith("3 evacuated, 0 lost")
    metrics = await control.metrics()
    assert 'roam_notices_total{cloud="aws"} 1.0' in metrics
    assert "roam_evacuation_margin_seconds_count 3.0" in metrics
    await control.close()


async def test_vms_that_cannot_make_it_are_said_lost_at_once(tmp_path: Path) -> None:
    control = await Control.open(tmp_path / "data")
    src = await control.join("src", "0.01", memory=64 * GIB)
    dst = await control.join("dst", "0.5", memory=8 * GIB)
    vms = [("huge", 20000, 9), ("slow", 6000, 5), ("small", 256, 0)]
    await started(control, "src", src, vms)
    here = ["huge", "slow", "small"]
    await control.call("POST", "/nodes/src/notice", {"deadline_seconds": 8,
                                                      "max_parallel": 1}, expect=202)
    await control.reconciler.reconcile()
    warned = {e["vm"]: e["detail"] for e in await control.events("will_be_lost")}
    assert sorted(warned) == ["huge", "slow"]  # at the first pass
    assert warned["huge"].startswith("nowhere to go")
    assert "would resume about" in warned["slow"]  # 6000 MiB at 100 MiB/s: past 8 s
    assert all("no checkpoint store" in d for d in warned.values())
    # The one that can make it goes first, whatever its priority.
    assert moving(await control.beat("src", src, here)) == ["small"]
    await control.beat("dst", dst, ["small"], resumed_at=time.time())
    here.remove("small")
    await control.beat("src", src, here)
    await control.reconciler.reconcile()
    assert moving(await control.beat("src", src, here)) == ["slow"]  # tried anyway

    await asyncio.sleep(8)  # the deadline passes with slow still in flight
    await control.reconciler.reconcile()
    record = await control.call("GET", "/nodes/src/notice")
    assert {n: v["state"] for n, v in record["vms"].items()} == {
        "huge": "lost", "slow": "lost", "small": "evacuated"}
    assert record["finished"] is not None
    assert sorted(e["vm"] for e in await control.events("vm_lost")) == ["huge", "slow"]
    assert 'roam_vms_lost_total{reason="deadline"} 2.0' in await control.metrics()
    await control.close()


async def test_a_lost_nodes_vms_stay_lost_without_checkpoints(tmp_path: Path) -> None:
    ttl = 0.5
    control = await Control.open(tmp_path / "data", ttl=ttl)
    n1 = await control.join("n1", "0.1")
    n2 = await control.join("n2", "0.2")
    await started(control, "n1", n1, [("web", 256, 0)])
    quiet = time.monotonic()
    while time.monotonic() - quiet < 5 * ttl:  # n1 goes quiet; n2 keeps beating
        await asyncio.sleep(0.1)
        assert await control.beat("n2", n2, []) == []  # never given web to start
        await control.reconciler.reconcile()
    vm = await control.call("GET", "/vms/web")
    assert (vm["status"]["phase"], vm["status"]["node"]) == ("lost", "n1")
    assert vm["status"]["detail"] == STAYS_LOST
    lost = await control.events("vm_lost")
    assert [(e["vm"], e["node"]) for e in lost] == [("web", "n1")]
    node = await control.call("GET", "/nodes/n1")
    since = (await control.fleet.node("n1")).value.lost_since
    assert since is not None and lost[0]["at"] - since >= 2 * ttl
    assert node["state"] == "lost"
    assert 'roam_vms_lost_total{reason="node_lost"} 1.0' in await control.metrics()
    await control.close()


# -- bad notices ------------------------------------------------------------------------


def test_bad_notices_are_bad_requests(tmp_path: Path) -> None:
    async def check() -> None:
        control = await Control.open(tmp_path / "data")
        await control.join("n1", "0.1")
        for body in ({}, {"deadline_seconds": 0}, {"deadline_seconds": 30, "deadline": 1e9},
                     {"deadline_seconds": 30, "cloud": "ibm"},
                     {"deadline_seconds": 30, "max_parallel": 0},
                     {"deadline_seconds": 30, "extra": 1}):
            problem(await control.call("POST", "/nodes/n1/notice", body, expect=422),
                    ErrorCode.BAD_REQUEST)
        problem(await control.call("POST", "/nodes/n9/notice", {"deadline_seconds": 30},
                                   expect=404), ErrorCode.NOT_FOUND)
        problem(await control.call("GET", "/nodes/n1/notice", expect=404),
                ErrorCode.NOT_FOUND)
        assert (await control.call("GET", "/nodes/n1"))["state"] == "ready"
        await control.close()
    asyncio.run(check())


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=3), max_leaves=8)
notice_like = st.fixed_dictionaries({}, optional={
    "deadline_seconds": json_values | st.floats(-1, 4000),
    "deadline": json_values | st.floats(-1, 2e9),
    "cloud": json_values | st.sampled_from(["aws", "gcp", "azure", "none"]),
    "action": json_values, "event_id": json_values, "max_parallel": json_values,
    "extra": json_values})


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[asyncio.AbstractEventLoop, Control]]:
    loop = asyncio.new_event_loop()
    control = loop.run_until_complete(Control.open(tmp_path_factory.mktemp("fuzz")))
    loop.run_until_complete(control.join("n1", "0.1"))
    yield loop, control
    loop.run_until_complete(control.close())
    loop.close()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values | notice_like, raw=st.none() | st.binary(max_size=64))
def test_fuzzed_notices_are_refused_or_taken_whole(
        fuzz_target: tuple[asyncio.AbstractEventLoop, Control], body: Any,
        raw: bytes | None) -> None:
    loop, control = fuzz_target

    async def attempt() -> None:
        before = (await control.store.range(Keys.LEADER)).revision
        if raw is not None:
            response = await control.http.post("/nodes/n1/notice", content=raw,
                                               headers={"content-type": "application/json"})
        else:
            response = await control.http.post("/nodes/n1/notice", json=body)
        assert response.status_code in (202, 400, 422), response.text
        if response.status_code != 202:
            assert response.json()["code"] == "bad_request"
            assert (await control.store.range(Keys.LEADER)).revision == before
        else:  # taken: the node is cordoned and a notice recorded
            assert (await control.call("GET", "/nodes/n1"))["state"] == "cordoned"
            assert (await control.call("GET", "/nodes/n1/notice"))["node"] == "n1"
    loop.run_until_complete(attempt())

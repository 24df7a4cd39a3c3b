"""The control plane's API on a real SQLite store, in process: bad input gets typed errors
and changes nothing (fuzzed with hypothesis); the reconciler, driven by the node protocol
itself (the test heartbeats as nodes would), places VMs, drains at most max_parallel at
once across a restart of the control plane, and never starts a lost node's VMs elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roam.control import auth
from roam.control.api import Plane, create_app
from roam.control.election import Election
from roam.control.fleet import Fleet
from roam.control.metrics import FleetMetrics
from roam.control.models import Keys
from roam.control.reconciler import Reconciler
from roam.control.sqlite import SqliteStore
from roam.errors import ErrorCode

MIB = 1 << 20


class Control:
    """An API over a store in `data`, and a client of it with a valid token."""

    def __init__(self, store: SqliteStore, token: str, ttl: float = 60.0) -> None:
        self.store = store
        self.fleet = Fleet(store)
        self.token = token
        plane = Plane(self.fleet, ttl, Election(store, "test", ttl), FleetMetrics())
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(plane)),
                                      base_url="http://control",
                                      headers={"Authorization": f"Bearer {token}"})
        self.reconciler = Reconciler(self.fleet)

    @classmethod
    async def open(cls, data: Path, token: str | None = None, ttl: float = 60.0) -> Control:
        store = await SqliteStore.open(data)
        token = token or await auth.create(Fleet(store), "test")
        return cls(store, token, ttl)

    async def close(self) -> None:
        await self.http.aclose()
        await self.store.close()

    async def revision(self) -> int:
        return (await self.store.range(Keys.LEADER)).revision

    async def call(self, method: str, path: str, body: Any = None,
                   expect: int | None = None) -> Any:
        response = await self.http.request(method, path, json=body)
        if expect is not None:
            assert response.status_code == expect, response.text
        return response.json() if response.content else None

    async def join(self, name: str, price: str, cpus: int = 8) -> int:
        registered = await self.call("POST", "/nodes", {
            "name": name, "peer": f"tcp://10.9.0.{len(name)}:7000", "version": "test",
            "capacity": {"memory_bytes": 8 << 30, "memory_available_bytes": 8 << 30,
                         "cpus": cpus},
            "accelerator": {"kvm": False, "reason": "test"}, "cpu": {"model": "EPYC"},
            "labels": {"price": price}}, expect=201)
        return int(registered["lease"])

    async def beat(self, name: str, lease: int, running: list[str],
                   reports: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        """A heartbeat of node `name` whose peer runs `running`; its work."""
        return await self.call("POST", f"/nodes/{name}/heartbeat", {  # type: ignore[no-any-return]
            "lease": lease, "vms": [{"name": n, "state": "running", "ready": True}
                                    for n in running], "reports": list(reports)},
            expect=200)


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    opened = await Control.open(tmp_path / "data")
    try:
        yield opened
    finally:
        await opened.close()


def problem(body: Any, code: ErrorCode) -> None:
    assert body["code"] == code.value, body
    assert body["type"] == f"/problems/{code.value}"
    assert body["detail"]


VALID_VM = {"name": "web", "package": "/pkg", "memory_mib": 256}


async def test_a_missing_or_wrong_token_is_unauthorized_and_changes_nothing(
        control: Control) -> None:
    before = await control.revision()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic eDp5"}):
        for method, path, body in (("GET", "/vms", None), ("POST", "/vms", VALID_VM),
                                   ("POST", "/nodes/x/drain", {}), ("GET", "/metrics", None),
                                   ("GET", "/events", None)):
            control.http.headers.pop("Authorization", None)
            response = await control.http.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (path, response.text)
            problem(response.json(), ErrorCode.UNAUTHORIZED)
    assert await control.revision() == before
    health = await control.http.get("/healthz")  # needs no token
    assert health.status_code == 200 and health.json()["ok"]


@pytest.mark.parametrize(("body", "where"), [
    ({**VALID_VM, "memory_mib": 0}, "memory_mib"),
    ({**VALID_VM, "colour": "red"}, "colour"),
    ({**VALID_VM, "name": "../etc"}, "name"),
    ({**VALID_VM, "package": "relative/path"}, "package"),
    ({**VALID_VM, "from": "tcp://h:1"}, "package or from"),
    ({**VALID_VM, "gateway": "10.0.0.1"}, "gateway and vni"),
    ({**VALID_VM, "publish": ["nonsense"]}, "publish"),
    ({**VALID_VM, "spread": ["Not A Label"]}, "spread"),
    ("not an object", "body"),
])
async def test_malformed_vms_are_bad_requests_and_change_nothing(
        control: Control, body: Any, where: str) -> None:
    before = await control.revision()
    response = await control.http.post("/vms", json=body)
    assert response.status_code == 422
    problem(response.json(), ErrorCode.BAD_REQUEST)
    assert where in response.json()["detail"]
    assert await control.revision() == before


async def test_bad_json_and_bad_labels(control: Control) -> None:
    before = await control.revision()
    response = await control.http.post("/vms", content=b"{not json",
                                       headers={"content-type": "application/json"})
    assert response.status_code == 422
    for labels in ({"price": "cheap"}, {"price": "-1"}, {"lifecycle": "sometimes"},
                   {"UPPER": "x"}):
        body = await control.call("POST", "/nodes", {
            "name": "n", "peer": "tcp://10.0.0.1:7000", "version": "t",
            "capacity": {"memory_bytes": 1, "memory_available_bytes": 1, "cpus": 1},
            "accelerator": {"kvm": False, "reason": ""}, "cpu": {"model": "m"},
            "labels": labels}, expect=422)
        problem(body, ErrorCode.BAD_REQUEST)
    assert await control.revision() == before


async def test_unknown_names_are_not_found_and_change_nothing(control: Control) -> None:
    await control.call("POST", "/vms", VALID_VM, expect=201)
    lease = await control.join("n1", "0.1")
    before = await control.revision()
    for method, path, body in (("GET", "/vms/nope", None), ("POST", "/vms/nope/stop", None),
                               ("POST", "/vms/nope/migrate", {}),
                               ("DELETE", "/vms/nope", None), ("GET", "/nodes/nope", None),
                               ("POST", "/nodes/nope/drain", {}),
                               ("POST", "/nodes/nope/cordon", None),
                               ("POST", "/vms/web/migrate", {"to": "nope"}),
                               ("POST", "/nodes/nope/heartbeat", {"lease": lease}),
                               ("POST", "/nodes/nope/events", {"events": []}),
                               ("GET", "/no/such/path", None)):
        problem(await control.call(method, path, body, expect=404), ErrorCode.NOT_FOUND)
    assert await control.revision() == before


async def test_conflicts(control: Control) -> None:
    await control.call("POST", "/vms", VALID_VM, expect=201)
    problem(await control.call("POST", "/vms", VALID_VM, expect=409), ErrorCode.CONFLICT)
    # pending (no node yet): it cannot move
    problem(await control.call("POST", "/vms/web/migrate", {}, expect=409),
            ErrorCode.CONFLICT)
    body = await control.call("POST", "/nodes/x/drain", {"max_parallel": 0}, expect=422)
    problem(body, ErrorCode.BAD_REQUEST)


async def test_openapi_describes_the_api(control: Control) -> None:
    spec = await control.call("GET", "/openapi.json", expect=200)
    assert {"/vms", "/vms/{name}/migrate", "/nodes/{name}/drain", "/events",
            "/metrics"} <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


# -- fuzzing ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=6),
    max_leaves=20)
vm_like = st.fixed_dictionaries({}, optional={
    "name": st.text(max_size=45), "package": st.text(max_size=20), "from": st.text(),
    "memory_mib": st.integers(-5, 2**40) | st.text(), "cpus": json_values,
    "publish": st.lists(st.text(max_size=20), max_size=3), "gateway": st.text(max_size=16),
    "vni": st.integers(-1, 2**25), "spread": json_values, "extra": json_values})
ROUTES = [("POST", "/vms"), ("POST", "/vms/web/migrate"), ("POST", "/nodes"),
          ("POST", "/nodes/n1/heartbeat"), ("POST", "/nodes/n1/events"),
          ("POST", "/nodes/n1/drain")]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[asyncio.AbstractEventLoop, Control]]:
    loop = asyncio.new_event_loop()
    control = loop.run_until_complete(Control.open(tmp_path_factory.mktemp("fuzz")))
    loop.run_until_complete(control.call("POST", "/vms", VALID_VM, expect=201))
    loop.run_until_complete(control.join("n1", "0.1"))
    yield loop, control
    loop.run_until_complete(control.close())
    loop.close()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=json_values | vm_like,
       raw=st.none() | st.binary(max_size=64))
def test_fuzzed_requests_get_problems_and_change_nothing(
        fuzz_target: tuple[asyncio.AbstractEventLoop, Control], route: tuple[str, str],
        body: Any, raw: bytes | None) -> None:
    loop, control = fuzz_target

    async def attempt() -> None:
        before = await control.revision()
        method, path = route
        if raw is not None:
            response = await control.http.request(
                method, path, content=raw, headers={"content-type": "application/json"})
        else:
            response = await control.http.request(method, path, json=body)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            document = response.json()
            assert ErrorCode(document["code"])  # a known code
            assert await control.revision() == before, (route, body, response.text)

    loop.run_until_complete(attempt())


# -- the reconciler through the node protocol ------------------------------------------


async def test_drain_moves_at_most_max_parallel_and_survives_a_restart(
        tmp_path: Path) -> None:
    control = await Control.open(tmp_path / "data")
    leases = {"src": await control.join("src", "0.01"), "dst": await control.join("dst", "0.5")}
    names = [f"vm{i}" for i in range(5)]
    for name in names:
        await control.call("POST", "/vms", {**VALID_VM, "name": name}, expect=201)
    await control.reconciler.reconcile()
    work = await control.beat("src", leases["src"], [])
    assert sorted(w["vm"]["name"] for w in work["work"] if w["action"] == "run") == names
    await control.beat("src", leases["src"], names)  # they run
    assert {v["status"]["phase"] for v in await control.call("GET", "/vms")} == {"running"}

    await control.call("POST", "/nodes/src/drain", {"max_parallel": 2}, expect=202)
    await control.reconciler.reconcile()
    moving = [w for w in (await control.beat("src", leases["src"], names))["work"]
              if w["action"] == "migrate"]
    assert len(moving) == 2 and {w["to_node"] for w in moving} == {"dst"}
    assert all(w["to"] == "tcp://10.9.0.3:7000" for w in moving)
    first = moving[0]["vm"]["name"]

    # The control plane stops here and starts again on the same store.
    token = control.token
    await control.close()
    control = await Control.open(tmp_path / "data", token)
    await control.reconciler.reconcile()
    assert len([w for w in (await control.beat("src", leases["src"], names))["work"]
                if w["action"] == "migrate"]) == 2  # the same two, not two more
    # The first arrives: dst runs it, src no longer has it.
    left = [n for n in names if n != first]
    await control.beat("dst", leases["dst"], [first])
    await control.beat("src", leases["src"], left)
    record = await control.call("GET", f"/vms/{first}")
    assert (record["status"]["node"], record["status"]["epoch"]) == ("dst", 2)
    await control.reconciler.reconcile()
    migrating = [w["vm"]["name"] for w in (await control.beat(
        "src", leases["src"], left))["work"] if w["action"] == "migrate"]
    assert len(migrating) == 2 and first not in migrating  # the next one took its place
    # A failed migration gives the VM back to its node; the drain tries it again.
    failed = migrating[0]
    await control.beat("src", leases["src"], left, [{
        "vm": failed, "action": "migrate", "ok": False, "code": "lost_peer",
        "detail": "the destination went away"}])
    record = await control.call("GET", f"/vms/{failed}")
    assert record["status"]["target"] is None and record["status"]["failures"] == 1
    for _ in range(10):  # the rest arrive one by one
        await control.reconciler.reconcile()
        on_src = [v["name"] for v in await control.call("GET", "/vms")
                  if v["status"]["node"] == "src"]
        if not on_src:
            break
        arriving = [v["name"] for v in await control.call("GET", "/vms")
                    if v["status"]["target"] == "dst"]
        assert len(arriving) <= 2
        on_dst = [v["name"] for v in await control.call("GET", "/vms")
                  if v["status"]["node"] == "dst"]
        await control.beat("dst", leases["dst"], on_dst + arriving)
        await control.beat("src", leases["src"], [n for n in on_src if n not in arriving])
    await control.reconciler.reconcile()
    node = await control.call("GET", "/nodes/src")
    assert node["vms"] == [] and node["draining"] is None and node["state"] == "cordoned"
    await control.close()


async def test_a_lost_nodes_vms_are_not_started_elsewhere(tmp_path: Path) -> None:
    control = await Control.open(tmp_path / "data", ttl=0.6)
    lease = await control.join("n1", "0.1")
    other = await control.join("n2", "0.2")
    await control.call("POST", "/vms", VALID_VM, expect=201)
    await control.reconciler.reconcile()
    await control.beat("n1", lease, ["web"])
    for _ in range(10):  # n1 goes quiet; n2 keeps beating
        await asyncio.sleep(0.2)
        await control.beat("n2", other, [])
        await control.reconciler.reconcile()
    nodes = {n["name"]: n["state"] for n in await control.call("GET", "/nodes")}
    assert nodes == {"n1": "lost", "n2": "ready"}
    vm = await control.call("GET", "/vms/web")
    assert (vm["status"]["phase"], vm["status"]["node"]) == ("lost", "n1")
    assert (await control.beat("n2", other, []))["work"] == []  # nothing to start
    problem(await control.call("POST", "/vms/web/start", None, expect=409),
            ErrorCode.CONFLICT)
    # n1's lease is gone: it must register again, then its VM is running again
    body = await control.call("POST", "/nodes/n1/heartbeat", {"lease": lease}, expect=404)
    problem(body, ErrorCode.NOT_FOUND)
    lease = await control.join("n1", "0.1")
    await control.beat("n1", lease, ["web"])
    await control.reconciler.reconcile()
    vm = await control.call("GET", "/vms/web")
    assert (vm["status"]["phase"], vm["status"]["node"], vm["status"]["epoch"]) == (
        "running", "n1", 1)
    metrics = (await control.http.get("/metrics")).text
    assert 'roam_nodes{state="ready"} 2.0' in metrics
    assert 'roam_vms{phase="running"} 1.0' in metrics
    await control.close()

"""A replicated control plane: two `roam control serve --etcd` processes on a real
three-member etcd cluster, driven through the API with a client that knows both.

Two nodes join and heartbeat through that client (each a small loop in this test that
runs at once whatever work it is given and reports it running: the control plane's side
of the node protocol is what is under test here; tests/control/test_fleet.py runs real
nodes). Then, in one run:

1. Both instances serve the API; exactly one leads, and it places a new VM.
2. The leader is SIGKILLed: the other leads within a few seconds (the time is printed)
   and places the next VM; the nodes' heartbeats went on through the survivor, no VM
   was started twice, and nothing written before was lost.
3. One etcd member is killed: everything goes on (a VM created and placed).
4. A second member is killed (no quorum): /healthz answers 503 saying why, `roam
   control status` fails with that reason, writes fail with a typed error, nothing is
   placed and the nodes keep their VMs; with a member back the control plane goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roam.control.client import ControlAPIError, ControlClient
from roam.control.models import Heartbeat, PeerVM, Registration, VMSpec
from roam.errors import ErrorCode
from tests.control.etcdlab import EtcdCluster, free_port, fresh_etcd_cluster, until

__all__ = ["fresh_etcd_cluster"]  # a fixture

ROOT = "/plane"
LEADER_TTL = 2
NODE_TTL = 4


def roam(*args: str) -> list[str]:
    return [sys.executable, "-m", "roam.cli.main", "control", *args]


class Instance:
    def __init__(self, work: Path, name: str, etcd: list[str]) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = work / f"{name}.log"
        self.process = subprocess.Popen(
            roam("serve", "--etcd", ",".join(etcd), "--etcd-root", ROOT, "--listen",
                 self.url.removeprefix("http://"), "--leader-ttl", str(LEADER_TTL),
                 "--node-ttl", str(NODE_TTL)),
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    async def health(self) -> tuple[int, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.get(self.url + "/healthz")
        return answer.status_code, answer.json()

    async def ready(self) -> None:
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await self.health())[0] == 200:
                        return
                assert self.process.poll() is None, self.log.read_text()
                await asyncio.sleep(0.2)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def instances(fresh_etcd_cluster: EtcdCluster, tmp_path: Path) -> Iterator[list[Instance]]:
    started = [Instance(tmp_path, n, fresh_etcd_cluster.urls) for n in ("a", "b")]
    try:
        yield started
    finally:
        for instance in started:
            instance.kill()


class Nodes:
    """Two nodes' heartbeat loops: each runs what it is told to at once. `started`
    counts every start of a VM on any node (a VM started twice shows as 2)."""

    def __init__(self, control: ControlClient) -> None:
        self.control = control
        self.running: dict[str, set[str]] = {"n1": set(), "n2": set()}
        self.started: dict[str, int] = {}
        self.failed_beats = 0

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for name in self.running:
                tasks.create_task(self._node(name))

    async def _node(self, name: str) -> None:
        registration = Registration.model_validate({
            "name": name, "peer": f"tcp://10.9.0.{name[-1]}:7000", "version": "test",
            "capacity": {"memory_bytes": 8 << 30, "memory_available_bytes": 8 << 30,
                         "cpus": 8},
            "accelerator": {"kvm": False, "reason": "test"}, "cpu": {"model": "EPYC"},
            "labels": {"price": "0.0" + name[-1]}})
        lease = (await self.control.register(registration)).lease
        while True:
            here = self.running[name]
            try:
                work = await self.control.heartbeat(name, Heartbeat(lease=lease, vms=[
                    PeerVM.model_validate({"name": n, "state": "running", "ready": True})
                    for n in sorted(here)]))
            except ControlAPIError as exc:
                if exc.code == ErrorCode.NOT_FOUND:  # its lease is gone: join again
                    lease = (await self.control.register(registration)).lease
                self.failed_beats += 1
                await asyncio.sleep(0.5)
                continue
            except Exception:  # the store or the instance fails meanwhile
                self.failed_beats += 1
                await asyncio.sleep(0.5)
                continue
            for item in work.work:
                if item.action == "run" and item.vm.name not in here:
                    here.add(item.vm.name)
                    self.started[item.vm.name] = self.started.get(item.vm.name, 0) + 1
            await asyncio.sleep(0.5)


async def leaders(instances: list[Instance]) -> list[str]:
    found = []
    for instance in instances:
        with contextlib.suppress(httpx.HTTPError):
            status, health = await instance.health()
            if status == 200 and health["leader"]:
                found.append(instance.name)
    return found


async def _one_leader(instances: list[Instance]) -> bool:
    return len(await leaders(instances)) == 1


async def _leads(instance: Instance) -> bool:
    return await leaders([instance]) == [instance.name]


async def _unhealthy(instance: Instance) -> bool:
    return (await instance.health())[0] == 503


async def placed(control: ControlClient, name: str, within: float = 20) -> str:
    """Until VM `name` runs on a node; that node."""
    async def runs() -> bool:
        vm = await control.vm(name)
        return vm.status.phase.value == "running" and vm.status.node is not None
    await until(runs, within)
    node = (await control.vm(name)).status.node
    assert node is not None
    return node


def vm(name: str) -> VMSpec:
    return VMSpec.model_validate({"name": name, "package": "/pkg", "memory_mib": 256})


async def test_two_instances_take_over_and_stop_without_quorum(
        fresh_etcd_cluster: EtcdCluster, instances: list[Instance]) -> None:
    cluster = fresh_etcd_cluster
    made = await asyncio.to_thread(
        subprocess.run, roam("token", "create", "--etcd", ",".join(cluster.urls),
                             "--etcd-root", ROOT, "--json"),
        capture_output=True, text=True, check=True)
    token = json.loads(made.stdout)["token"]
    for instance in instances:
        await instance.ready()
    await until(lambda: _one_leader(instances), 10)
    (first,) = await leaders(instances)
    leader = next(i for i in instances if i.name == first)
    other = next(i for i in instances if i is not leader)

    # the nodes and the client know both instances; the leader's URL comes first
    urls = f"{leader.url},{other.url}"
    async with ControlClient(urls, token, timeout=10) as control, \
            _running(Nodes(control)) as nodes:
        await control.create(vm("v1"))
        await placed(control, "v1")

        leader.kill()
        killed = time.monotonic()
        await until(lambda: _leads(other), 30, every=0.05)
        takeover = time.monotonic() - killed
        print(f"\ntakeover after the leading instance's SIGKILL: {takeover:.2f} s "
              f"(leader lease TTL {LEADER_TTL} s)")
        await control.create(vm("v2"))
        assert control.url == other.url
        await placed(control, "v2")
        assert {v.name for v in await control.vms()} == {"v1", "v2"}

        cluster.kill(0)
        await control.create(vm("v3"))
        await placed(control, "v3")

        cluster.kill(1)
        await until(lambda: _unhealthy(other), 30)
        answer = await other.health()
        assert "quorum lost" in answer[1]["detail"] and not answer[1]["ok"]
        status = await asyncio.to_thread(
            subprocess.run, roam("status", "--control", other.url), capture_output=True,
            text=True, timeout=60)
        assert status.returncode == 1
        assert "quorum lost" in status.stderr and len(status.stderr.strip().splitlines()) == 1
        with pytest.raises(ControlAPIError) as write:
            await control.create(vm("v4"))
        assert write.value.code == ErrorCode.TIMEOUT and "quorum lost" in write.value.message
        assert not await leaders([other])
        running = {n: set(v) for n, v in nodes.running.items()}

        cluster.start(1)
        await asyncio.to_thread(cluster.wait_healthy)
        await until(lambda: _leads(other), 30)
        assert {n: set(v) for n, v in nodes.running.items()} == running  # kept running
        await control.create(vm("v5"))
        await placed(control, "v5")
    assert nodes.started == {"v1": 1, "v2": 1, "v3": 1, "v5": 1}  # no VM started twice
    assert sum(len(v) for v in nodes.running.values()) == 4


@contextlib.asynccontextmanager
async def _running(nodes: Nodes) -> AsyncIterator[Nodes]:
    task = asyncio.create_task(nodes.run())
    try:
        yield nodes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

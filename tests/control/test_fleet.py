"""Acceptance: a fleet under the control plane, with real processes in network namespaces.

Hosts (roam.network.lab): P runs `roam control serve`; A, B and C run `roam node join`
(prices 0.01, 0.02, 0.03 per hour, so both VMs start on A, the cheapest); G joins too
and holds both VMs' overlay gateways (cordoned: it runs no VM); K runs a redis client per
VM, each writing a key every few milliseconds over one connection.

1. Two redis VMs created through the API start on A.
2. `roam control node drain A --max-parallel 1`; once the first migration is under way
   the control plane is SIGKILLed and started again on its data: the drain finishes
   (the second VM moves after the restart), both VMs run on B, each client kept its one
   connection and no acknowledged write was lost.
3. B stops heartbeating (SIGSTOP): it is marked lost, its VMs `lost`, and no other node
   starts them; once it heartbeats again its VMs are running there as before.

Every command goes through the CLI (`--json`) run inside P's namespace, as an operator
on that host would run it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from roam.network.lab import Lab, lab
from roam.peer.client import PeerClient
from tests.blueprint.boot import short_dir
from tests.vm.conftest import run_dir, snapshot

__all__ = ["run_dir", "snapshot"]

NODES = {"a": "0.01", "b": "0.02", "c": "0.03"}
GATEWAY, CONTROL, CLIENT = "g", "p", "k"
PORT = 7450
PEER_PORT = 7000
TTL = 3.0
METRICS_PORT = 9450
VMS = {"r1": (101, 6379), "r2": (102, 6380)}  # name: (vni, published port on G)


class Fleet:
    """The processes of the test, and the CLI as an operator on P runs it."""

    def __init__(self, work: Path, hosts: Lab) -> None:
        self.work = work
        self.hosts = hosts
        self.url = f"http://{hosts.addrs[CONTROL]}:{PORT}"
        self.data = work / "control"
        self.token = ""
        self.control: subprocess.Popen[str] | None = None
        self.nodes: dict[str, subprocess.Popen[str]] = {}
        self.clients: dict[str, subprocess.Popen[str]] = {}

    def _in(self, role: str, *argv: str, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.hosts.nodes[role], *argv],
                                text=True, **kwargs)

    def roam(self, *args: str, check: bool = True) -> Any:
        """`roam control ARGS --json` on P; its JSON output."""
        env = {**os.environ, "ROAM_CONTROL_URL": self.url, "ROAM_TOKEN": self.token}
        done = subprocess.run(["ip", "netns", "exec", self.hosts.nodes[CONTROL],
                               sys.executable, "-m", "roam.cli.main", "control", *args,
                               "--json"], capture_output=True, text=True, env=env,
                              timeout=300)
        if check and done.returncode != 0:
            pytest.fail(f"roam control {' '.join(args)}: {done.stderr}")
        return json.loads(done.stdout) if done.returncode == 0 else done

    def start_control(self) -> None:
        log = (self.work / "control.log").open("a")
        self.control = self._in(CONTROL, sys.executable, "-m", "roam.cli.main", "control",
                                "serve", "--data", str(self.data), "--listen",
                                f"{self.hosts.addrs[CONTROL]}:{PORT}", "--node-ttl",
                                str(TTL), stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda: self.roam("status", check=False), "the control plane")

    def kill_control(self) -> None:
        assert self.control is not None
        self.control.send_signal(signal.SIGKILL)
        self.control.wait()

    def join(self, role: str, *labels: str, extra: tuple[str, ...] = ()) -> None:
        state = self.work / role
        state.mkdir()
        addr = self.hosts.addrs
        everyone = ",".join(addr[r] for r in (*NODES, GATEWAY))
        env = {**os.environ, "ROAM_TOKEN": self.token}
        self.nodes[role] = self._in(
            role, sys.executable, "-m", "roam.cli.main", "node", "join", "--control",
            self.url, "--name", role, "--state-dir", str(state), "--listen",
            f"tcp://{addr[role]}:{PEER_PORT}", "--underlay", addr[role], "--overlay-peers",
            everyone, *(f"--label={label}" for label in labels), *extra,
            stdout=(self.work / f"{role}.log").open("w"), stderr=subprocess.STDOUT, env=env)

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result and not isinstance(result, subprocess.CompletedProcess):
                return result
            time.sleep(0.3)
        pytest.fail(f"waited {timeout} s for {what}")

    def vms(self) -> dict[str, dict[str, Any]]:
        return {vm["name"]: vm for vm in self.roam("vm", "ls")}

    def nodes_by_name(self) -> dict[str, dict[str, Any]]:
        return {node["name"]: node for node in self.roam("node", "ls")}

    def peer_vms(self, role: str) -> list[str]:
        async def names() -> list[str]:
            async with PeerClient(self.work / role) as peer:
                return [vm.name for vm in await peer.vms()]
        return asyncio.run(names())

    def scrape(self, url: str, token: str | None = None) -> str:
        auth = ["-H", f"Authorization: Bearer {token}"] if token else []
        done = subprocess.run(["ip", "netns", "exec", self.hosts.nodes[CONTROL], "curl",
                               "-sf", *auth, url], capture_output=True, text=True,
                              check=True)
        return done.stdout

    def write(self, vm: str) -> None:
        _, port = VMS[vm]
        self.clients[vm] = self._in(
            CLIENT, sys.executable, "-m", "roam.demo.client", "write", "--host",
            self.hosts.addrs[GATEWAY], "--port", str(port), "--out",
            str(self.work / f"{vm}.acked"), stdout=subprocess.PIPE)

    def written(self, vm: str) -> dict[str, Any]:
        client = self.clients[vm]
        client.send_signal(signal.SIGTERM)
        out, _ = client.communicate(timeout=30)
        written = json.loads(out.strip().splitlines()[-1])
        _, port = VMS[vm]
        check = self._in(CLIENT, sys.executable, "-m", "roam.demo.client", "verify",
                         "--host", self.hosts.addrs[GATEWAY], "--port", str(port),
                         "--acked", str(self.work / f"{vm}.acked"), stdout=subprocess.PIPE)
        verified, _ = check.communicate(timeout=120)
        return {**written, **json.loads(verified.strip().splitlines()[-1])}

    def close(self) -> None:
        for process in [*self.clients.values()]:
            if process.poll() is None:
                process.kill()
        for process in self.nodes.values():
            with_signal(process, signal.SIGCONT)
            with_signal(process, signal.SIGTERM)
        for process in self.nodes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.control is not None and self.control.poll() is None:
            self.control.send_signal(signal.SIGTERM)
            self.control.wait(timeout=30)


def with_signal(process: subprocess.Popen[str], sig: int) -> None:
    if process.poll() is None:
        process.send_signal(sig)


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with short_dir() as work, lab(CONTROL, *NODES, GATEWAY, CLIENT, net="198.18.7") as hosts:
        the_fleet = Fleet(work, hosts)
        try:
            yield the_fleet
        finally:
            the_fleet.close()


@pytest.mark.timeout(600)
def test_drain_survives_a_control_plane_kill_and_a_lost_node_runs_nothing_twice(
        fleet: Fleet, snapshot: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "roam.cli.main", "control", "token",
                           "create", "--data", str(fleet.data), "--name", "test"],
                          capture_output=True, text=True, check=True)
    fleet.token = done.stdout.strip()
    fleet.start_control()
    metrics = f"{fleet.hosts.addrs['a']}:{METRICS_PORT}"
    for role, price in NODES.items():
        fleet.join(role, f"price={price}", "lifecycle=spot", "zone=z-" + role,
                   extra=("--metrics-listen", metrics) if role == "a" else ())
    fleet.join(GATEWAY)
    fleet.wait(lambda: len(fleet.nodes_by_name()) == 4, "four nodes")
    fleet.roam("node", "cordon", GATEWAY)
    gateway = fleet.hosts.addrs[GATEWAY]
    for vm, (vni, port) in VMS.items():
        created = fleet.roam("vm", "create", vm, "--package", str(snapshot), "--gateway",
                             gateway, "--vni", str(vni), "--publish",
                             f"{gateway}:{port}:6379")
        assert created["status"]["phase"] == "running" and created["status"]["node"] == "a"
    for vm in VMS:
        fleet.write(vm)
    time.sleep(2)

    fleet.roam("node", "drain", "a", "--max-parallel", "1", "--no-wait")
    moving = fleet.wait(lambda: [n for n, v in fleet.vms().items() if v["status"]["target"]],
                        "a migration to start")
    assert len(moving) == 1  # one at a time
    fleet.kill_control()
    time.sleep(1)
    fleet.start_control()
    events = fleet._in(CONTROL, sys.executable, "-m", "roam.cli.main", "control", "events",
                       "--json", stdout=subprocess.PIPE, env={**os.environ, "ROAM_CONTROL_URL":
                                                    fleet.url, "ROAM_TOKEN": fleet.token})
    # The stream's first line (the snapshot) says it follows: under load the command
    # takes seconds to start, and the drain's last move could end before it listens.
    assert events.stdout is not None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(events.stdout.readline).result(timeout=120)
    drained = fleet.roam("node", "drain", "a")  # waits until the drain is over
    assert drained["vms"] == [] and drained["state"] == "cordoned"
    vms = fleet.vms()
    assert {v["status"]["node"] for v in vms.values()} == {"b"}
    assert all(v["status"]["phase"] == "running" for v in vms.values())
    assert all(v["status"]["epoch"] == 2 for v in vms.values())  # placed, then moved once
    assert sorted(fleet.peer_vms("b")) == ["r1", "r2"]
    assert fleet.peer_vms("a") == [] and fleet.peer_vms("c") == []
    scraped = fleet.scrape(f"http://{metrics}/metrics")  # node A's own metrics
    assert 'roam_migrations_total{outcome="completed"} 2.0' in scraped
    scraped = fleet.scrape(f"{fleet.url}/metrics", token=fleet.token)
    assert 'roam_node_vms{node="b"} 2.0' in scraped
    assert 'roam_nodes{state="ready"} 2.0' in scraped  # B and C; A and G are cordoned

    fleet.nodes["b"].send_signal(signal.SIGSTOP)  # B stops heartbeating
    try:
        fleet.wait(lambda: fleet.nodes_by_name()["b"]["state"] == "lost", "b lost", 30)
        time.sleep(TTL)  # more than enough for a wrong restart elsewhere to begin
        vms = fleet.vms()
        assert {(v["status"]["phase"], v["status"]["node"]) for v in vms.values()} == {
            ("lost", "b")}
        assert fleet.peer_vms("a") == [] and fleet.peer_vms("c") == []
    finally:
        fleet.nodes["b"].send_signal(signal.SIGCONT)
    fleet.wait(lambda: all(v["status"]["phase"] == "running" for v in fleet.vms().values()),
               "b back")
    assert fleet.nodes_by_name()["b"]["state"] == "ready"

    for vm in VMS:
        report = fleet.written(vm)
        print(f"\n{vm}: {report['acked']} acknowledged writes, {report['lost']} lost, "
              f"{report['connections']} connection(s), longest gap "
              f"{max((b - a for a, b in report['gaps']), default=0) * 1000:.0f} ms")
        assert report["acked"] > 100
        assert report["lost"] == 0
        assert report["connections"] == 1
    events.terminate()
    seen = [json.loads(line) for line in
            [first, *events.communicate(timeout=30)[0].splitlines()]]
    kinds = {(e["type"], e.get("kind") or e.get("event", {}).get("type")) for e in seen}
    assert ("control", "migration_ended") in kinds
    assert ("control", "node_lost") in kinds
    assert ("peer", "outcome") in kinds  # a node relayed its peer's migration outcome

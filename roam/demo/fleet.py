"""`make demo`: a fleet under a control plane moves a redis VM through its API, then
evacuates it from a spot node before the cloud's deadline, while a client writes to it.

Network namespaces stand for the machines (roam.network.lab, addresses of the
benchmarking range 198.18.0.0/15 that exist only inside them): host P runs `roam control
serve`; A, B and C run `roam node join` as spot nodes (prices 0.01, 0.02, 0.03 per hour,
so the scheduler prefers A), each watching its cloud's metadata service, which is a
`roam spot fake-metadata` on loopback in its own namespace (the watcher polls it exactly
as it would poll the cloud's); G joins too and holds the VM's overlay gateway (its stable
address, redis published there; cordoned, so it runs no VM); K runs the client, which
writes a new key every few milliseconds over one TCP connection and records each
acknowledged write.

1. The VM is created through the API: the scheduler places it on A.
2. It is moved to B through the API (`POST /vms/{name}/migrate`).
3. B's fake metadata service turns to a spot notice with a 30 s deadline; B's watcher
   sees it and reports it; the control plane cordons B and moves the VM off before the
   deadline, and records its margin.
4. Every acknowledged write must be in the VM, over the client's one connection.

The orchestration runs inside P's namespace (it talks to the control plane's API as an
operator on P would); the last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from roam.control.client import ControlClient
from roam.control.models import ControlEvent, FleetEvent, MoveRequest, RelayedEvent, VMSpec
from roam.control.notice import NoticeRecord
from roam.errors import RoamError
from roam.network import ns
from roam.network.lab import Lab
from roam.peer.client import PeerClient
from roam.peer.models import OutcomeEvent
from roam.spot import Cloud
from roam.vm.package import Package

CONTROL, GATEWAY, CLIENT = "p", "g", "k"
NODES = {"a": "0.01", "b": "0.02", "c": "0.03"}
ROLES = (CONTROL, *NODES, GATEWAY, CLIENT)
NET = "198.18.3"
CONTROL_PORT = 7450
PEER_PORT = 7000
METADATA = "127.0.0.1:8169"
REDIS_PORT = 6379
TTL = 10.0
DEADLINE = 30.0
WAIT = 180.0


class FleetError(RoamError):
    """The demo's fleet did not do what it should have (the logs in its directory say
    why)."""


class FleetDemo:
    """The processes of a fleet in `hosts` (roles ROLES), and the operator's view."""

    def __init__(self, work: Path, hosts: Lab, package: Path, *, cloud: Cloud = Cloud.AWS,
                 ttl: float = TTL) -> None:
        self.work = work
        self.hosts = hosts
        self.package = package
        self.cloud = cloud
        self.ttl = ttl
        self.addr = hosts.addrs
        self.url = f"http://{self.addr[CONTROL]}:{CONTROL_PORT}"
        self.processes: dict[str, subprocess.Popen[str]] = {}
        self.clients: dict[str, subprocess.Popen[str]] = {}
        self.events: list[FleetEvent] = []
        self.control: ControlClient | None = None
        self._following: asyncio.Task[None] | None = None
        self._ports: dict[str, int] = {}
        self._token = ""

    # -- processes ---------------------------------------------------------------------

    def spawn(self, key: str, role: str, *argv: str, **kwargs: Any) -> subprocess.Popen[str]:
        """`python -m roam.cli.main ARGV` in `role`'s namespace, logged to WORK/KEY.log."""
        log = (self.work / f"{key}.log").open("a")
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts.nodes[role], sys.executable, "-m",
             "roam.cli.main", *argv], text=True, stdout=log, stderr=subprocess.STDOUT,
            **kwargs)
        self.processes[key] = process
        return process

    def start_control(self) -> None:
        self.spawn(CONTROL, CONTROL, "control", "serve", "--data", str(self.work / "control"),
                   "--listen", f"{self.addr[CONTROL]}:{CONTROL_PORT}",
                   "--node-ttl", str(self.ttl))

    def join(self, role: str, *labels: str, cloud: Cloud = Cloud.NONE,
             extra: tuple[str, ...] = ()) -> None:
        state = self.work / role
        state.mkdir(exist_ok=True)
        everyone = ",".join(self.addr[r] for r in (*NODES, GATEWAY))
        self.spawn(role, role, "node", "join", "--control", self.url, "--name", role,
                   "--state-dir", str(state), "--listen",
                   f"tcp://{self.addr[role]}:{PEER_PORT}", "--underlay", self.addr[role],
                   "--overlay-peers", everyone, *(f"--label={label}" for label in labels),
                   "--cloud", cloud.value, "--metadata", f"http://{METADATA}", *extra,
                   env={**os.environ, "ROAM_TOKEN": self._token})

    async def __aenter__(self) -> FleetDemo:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "roam.cli.main", "control", "token",
                             "create", "--data", str(self.work / "control"), "--name",
                             "demo"], capture_output=True, text=True, check=True)
        self._token = done.stdout.strip()
        self.start_control()
        self.control = ControlClient(self.url, self._token)
        await self.until(self._healthy, "the control plane")
        for role, price in NODES.items():
            self.spawn(f"metadata-{role}", role, "spot", "fake-metadata", "--listen", METADATA)
            self.join(role, f"price={price}", "lifecycle=spot", f"zone=z-{role}",
                      cloud=self.cloud)
        self.join(GATEWAY)
        await self.until(self._joined, "every node to join")
        await self.control.cordon(GATEWAY)
        self._following = asyncio.create_task(self._follow())
        return self

    async def _healthy(self) -> bool:
        assert self.control is not None
        with contextlib.suppress(RoamError):
            return (await self.control.health()).leader
        return False

    async def _joined(self) -> bool:
        assert self.control is not None
        return len(await self.control.nodes()) == len(NODES) + 1

    async def _follow(self) -> None:
        assert self.control is not None
        while True:
            with contextlib.suppress(RoamError):
                async with self.control.events() as stream:
                    async for event in stream:
                        self.events.append(event)
            await asyncio.sleep(0.5)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
        for process in self.clients.values():
            if process.poll() is None:
                process.kill()
        for role in (*NODES, GATEWAY):  # stop the VMs first: they hold namespaces
            node = self.processes.get(role)
            if node is not None and node.poll() is None:
                node.send_signal(signal.SIGCONT)
                node.send_signal(signal.SIGTERM)
        for key, process in self.processes.items():
            if key not in (*NODES, GATEWAY) and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for running in self.processes.values():
            try:
                await asyncio.to_thread(running.wait, 60)
            except subprocess.TimeoutExpired:
                running.kill()
        if self.control is not None:
            await self.control.__aexit__(None, None, None)

    async def until(self, check: Callable[[], Any], what: str, within: float = WAIT) -> Any:
        """check()'s first true answer (awaited if a coroutine), polled."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.3)
        raise FleetError(f"waited {within:.0f} s for {what} (logs in {self.work})")

    # -- the operator's actions --------------------------------------------------------

    async def create(self, name: str, vni: int, port: int, priority: int = 0) -> str:
        """Create a VM published on G at `port`; the node it runs on."""
        assert self.control is not None
        gateway = self.addr[GATEWAY]
        config = Package.load(self.package).config
        await self.control.create(VMSpec.model_validate({
            "name": name, "package": str(self.package), "memory_mib": config.memory_mib,
            "cpus": config.cpus, "gateway": gateway, "vni": vni, "priority": priority,
            "publish": [f"{gateway}:{port}:{REDIS_PORT}"]}))
        self._ports[name] = port

        async def running() -> str | None:
            assert self.control is not None
            vm = await self.control.vm(name)
            if vm.status.phase.value == "failed":
                raise FleetError(f"{name} failed: {vm.status.detail}")
            return vm.status.node if vm.status.phase.value == "running" else None
        node: str = await self.until(running, f"{name} to run")
        return node

    async def migrate(self, name: str, to: str) -> dict[str, Any]:
        """Move `name` to node `to` through the API; the hop's figures."""
        assert self.control is not None
        began = time.monotonic()
        source = (await self.control.vm(name)).status.node
        seen = len(self.events)
        await self.control.migrate(name, MoveRequest(to=to, cheapest=False))
        await self.until(lambda: self._settled(name, to), f"{name} to run on {to}")
        outcome = await self.until(lambda: self.outcome(name, seen), f"{name}'s outcome")
        return hop(source, to, outcome, began, time.monotonic())

    async def _settled(self, name: str, node: str) -> bool:
        assert self.control is not None
        vm = await self.control.vm(name)
        return vm.status.node == node and vm.status.target is None \
            and vm.status.phase.value == "running"

    def outcome(self, name: str, after: int) -> OutcomeEvent | None:
        for event in self.events[after:]:
            if isinstance(event, RelayedEvent) and isinstance(event.event, OutcomeEvent) \
                    and event.event.vm == name and event.event.outcome == "completed":
                return event.event
        return None

    def give_notice(self, node: str, deadline: float) -> float:
        """Turn `node`'s fake metadata service to a spot notice; when it was given."""
        given = time.time()
        ns.call_in(self.hosts.nodes[node], lambda: httpx.post(
            f"http://{METADATA}/_roam/notice", json={"deadline_seconds": deadline},
            timeout=10).raise_for_status())
        return given

    def metadata_state(self, node: str) -> dict[str, Any]:
        """What `node`'s fake metadata service saw (GET /_roam/state)."""
        state: dict[str, Any] = ns.call_in(self.hosts.nodes[node], lambda: httpx.get(
            f"http://{METADATA}/_roam/state", timeout=10).json())
        return state

    async def evacuation(self, node: str) -> NoticeRecord:
        """`node`'s notice record once its evacuation finished."""
        assert self.control is not None

        async def finished() -> NoticeRecord | None:
            assert self.control is not None
            with contextlib.suppress(RoamError):
                record = await self.control.notice(node)
                return record if record.finished is not None else None
            return None
        record: NoticeRecord = await self.until(finished, f"{node}'s evacuation")
        return record

    def control_events(self, kind: str) -> list[ControlEvent]:
        return [e for e in self.events if isinstance(e, ControlEvent) and e.kind == kind]

    async def peer_vms(self, role: str) -> dict[str, str]:
        """The VMs `role`'s peer holds, and their states."""
        async with PeerClient(self.work / role) as peer:
            return {vm.name: vm.state for vm in await peer.vms()}

    # -- the client --------------------------------------------------------------------

    def write(self, name: str) -> None:
        self.clients[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts.nodes[CLIENT], sys.executable, "-m",
             "roam.demo.client", "write", "--host", self.addr[GATEWAY], "--port",
             str(self._ports[name]), "--out", str(self.work / f"{name}.acked")],
            text=True, stdout=subprocess.PIPE)

    async def written(self, name: str) -> dict[str, Any]:
        """Stop `name`'s client: its report (gaps, connections, retransmits)."""
        client = self.clients.pop(name)
        client.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(client.communicate, timeout=30)
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return report

    async def verify(self, name: str) -> dict[str, Any]:
        """Whether every acknowledged write of `name`'s client is in redis."""
        check = await asyncio.to_thread(
            subprocess.run,
            ["ip", "netns", "exec", self.hosts.nodes[CLIENT], sys.executable, "-m",
             "roam.demo.client", "verify", "--host", self.addr[GATEWAY], "--port",
             str(self._ports[name]), "--acked", str(self.work / f"{name}.acked")],
            text=True, capture_output=True, timeout=120, check=True)
        report: dict[str, Any] = json.loads(check.stdout.strip().splitlines()[-1])
        return report


def hop(source: str | None, to: str, outcome: OutcomeEvent, began: float,
        ended: float) -> dict[str, Any]:
    return {"from": (source or "?").upper(), "to": to.upper(),
            "downtime_ms": round(outcome.downtime_ms or 0.0, 1),
            "first_response_ms": (None if outcome.first_response_ms is None
                                  else round(outcome.first_response_ms, 1)),
            "total_ms": round(outcome.duration_ms, 1), "bytes_sent": outcome.bytes_sent or 0,
            "cycles": outcome.cycles, "final_dirty_blocks": outcome.final_dirty,
            "window": (began, ended)}


def blackouts(hops: list[dict[str, Any]], gaps: list[list[float]]) -> None:
    """Each hop's longest wait for an acknowledgement that overlaps it (client_blackout_ms);
    its time window is dropped."""
    for h in hops:
        began, ended = h.pop("window")
        h["client_blackout_ms"] = round(max(
            [1000 * (b - a) for a, b in gaps if b > began and a < ended + 1.0],
            default=0.0), 1)


async def tour(fleet: FleetDemo, vms: dict[str, tuple[int, int]], *,
               deadline: float = DEADLINE, pause: float = 3.0,
               say: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo with `vms` (name: (segment, port on G)): created (on A), moved to B
    through the API, then evacuated off B by a spot notice of `deadline` seconds while
    their clients write. Its figures (the last line of `make demo`)."""
    accel = "?"
    for name, (vni, port) in vms.items():
        node = await fleet.create(name, vni, port)
        assert fleet.control is not None
        peer = (await fleet.control.vm(name)).status.peer
        accel = peer.accel if peer is not None and peer.accel else accel
        say(f"VM {name!r} created through the API: the scheduler placed it on "
            f"{node.upper()}; redis published at {fleet.addr[GATEWAY]}:{port} (host G)")
    for name in vms:
        fleet.write(name)
    await asyncio.sleep(pause)
    hops: dict[str, list[dict[str, Any]]] = {name: [] for name in vms}
    for name in vms:
        moved = await fleet.migrate(name, "b")
        hops[name].append(moved)
        say(f"{name}: moved {moved['from']} -> B through the API: downtime "
            f"{moved['downtime_ms']} ms, guest answered after {moved['first_response_ms']} ms, "
            f"total {moved['total_ms'] / 1000:.1f} s")
    await asyncio.sleep(pause)

    seen = len(fleet.events)
    began = time.monotonic()
    given = fleet.give_notice("b", deadline)
    say(f"spot notice on B ({fleet.cloud.value}, {deadline:.0f} s), through its metadata "
        "service")
    record = await fleet.evacuation("b")
    ended = time.monotonic()
    for name, leaving in record.vms.items():
        if leaving.to is not None:
            outcome = await fleet.until(functools.partial(fleet.outcome, name, seen),
                                        f"{name}'s outcome")
            hops[name].append(hop("b", leaving.to, outcome, began, ended))
        say(f"{name}: {leaving.state.value}"
            + (f" to {leaving.to.upper()}, {leaving.margin_ms / 1000:.1f} s before the "
               "deadline" if leaving.to and leaving.margin_ms is not None else "")
            + (f" ({leaving.detail})" if leaving.detail else ""))
    await asyncio.sleep(pause)

    clients: dict[str, Any] = {}
    for name in vms:
        written = await fleet.written(name)
        checked = await fleet.verify(name)
        blackouts(hops[name], written["gaps"])
        clients[name] = {**written, **checked}
    resumed = [v.resumed_at for v in record.vms.values() if v.resumed_at is not None]
    margins = [v.margin_ms for v in record.vms.values() if v.margin_ms is not None]
    return {
        "hops": hops, "clients": clients, "notice": record, "accel": accel,
        "evacuated": bool(record.vms) and not record.lost
        and len(record.evacuated) == len(record.vms),
        "evacuation_ms": round((max(resumed) - given) * 1000, 1) if resumed else None,
        "deadline_ms": round((record.deadline - given) * 1000, 1),
        "margin_ms": min(margins) if margins else None,
    }


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The demo's JSON line: the fields of the peers-only demo (over every hop of every
    VM), and the evacuation's."""
    hops = [h for name in sorted(report["hops"]) for h in report["hops"][name]]
    clients = report["clients"].values()
    gaps = [1000 * (b - a) for c in clients for a, b in c["gaps"]]
    return {
        "downtime_ms": [h["downtime_ms"] for h in hops],
        "first_response_ms": [h["first_response_ms"] for h in hops],
        "total_ms": round(sum(h["total_ms"] for h in hops), 1),
        "bytes_sent": sum(h["bytes_sent"] for h in hops),
        "acked_writes": sum(c["acked"] for c in clients),
        "lost_writes": sum(c["lost"] for c in clients),
        "accel": report["accel"], "connection_kept": all(c["connections"] == 1 for c in clients),
        "client_blackout_ms": round(max(gaps, default=0.0), 1),
        "hops": hops,
        "evacuated": report["evacuated"], "evacuation_ms": report["evacuation_ms"],
        "deadline_ms": report["deadline_ms"], "margin_ms": report["margin_ms"],
    }

"""Each cloud's form of notice reaches the control plane through a node's real watcher.

One network namespace holds `roam control serve`, three `roam node join` (no VMs), one
per cloud, each with `--cloud` and `--metadata` pointing at its own fake metadata
service (roam.spot.fake, served by the test on loopback there, as `roam spot
fake-metadata` serves it). A notice given at each fake (as the cloud would give it) must
become a notice record of that cloud and action with the cloud's deadline; with nothing
to move the evacuation is over at once, and the Azure node acknowledges the event right
away (StartRequests). Each node's /metrics counts its watcher's notice, the control
plane's its notices. Then `roam control node notice` gives one by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roam.control.client import ControlClient
from roam.errors import RoamError
from roam.network import ns
from roam.network.lab import Lab, lab
from roam.spot.fake import FakeMetadata, NoticeRequest, serve
from tests.blueprint.boot import short_dir

CLOUDS = {"aws": 8201, "gcp": 8202, "azure": 8203}  # node name: its fake's port
CONTROL_PORT = 7460


class Processes:
    def __init__(self, work: Path, hosts: Lab) -> None:
        self.work = work
        self.ns = hosts.nodes["h"]
        self.running: list[subprocess.Popen[str]] = []

    def roam(self, log: str, *argv: str, env: dict[str, str] | None = None) -> None:
        self.running.append(subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "roam.cli.main", *argv],
            stdout=(self.work / f"{log}.log").open("w"), stderr=subprocess.STDOUT,
            text=True, env=env))

    def close(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def processes() -> Iterator[Processes]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with short_dir() as work, lab("h", net="198.18.9") as hosts:
        started = Processes(work, hosts)
        try:
            yield started
        finally:
            started.close()


async def until(check: Callable[[], Awaitable[Any]], what: str, within: float = 60.0
                ) -> Any:
    """check()'s first true answer; an error counts as not yet (not up yet)."""
    try:
        async with asyncio.timeout(within):
            while True:
                with contextlib.suppress(RoamError):
                    result = await check()
                    if result:
                        return result
                await asyncio.sleep(0.3)
    except TimeoutError:
        raise AssertionError(f"waited {within} s for {what}") from None


async def scenario(p: Processes, token: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{CONTROL_PORT}"
    env = {**os.environ, "ROAM_TOKEN": token, "ROAM_CONTROL_URL": url}
    fakes = {cloud: FakeMetadata() for cloud in CLOUDS}
    async with ControlClient(url, token) as control, httpx.AsyncClient(timeout=10) as http, \
            contextlib.AsyncExitStack() as serving:
        for cloud, port in CLOUDS.items():
            await serving.enter_async_context(serve(fakes[cloud], port=port))
        await until(lambda: control.health(), "the control plane")
        for index, (cloud, port) in enumerate(CLOUDS.items()):
            p.roam(cloud, "node", "join", "--name", cloud, "--state-dir",
                   str(p.work / cloud), "--listen", f"tcp://127.0.0.1:{7100 + index}",
                   "--cloud", cloud, "--metadata", f"http://127.0.0.1:{port}",
                   "--metrics-listen", f"127.0.0.1:{9300 + index}", env=env)
        await until(lambda: _count(control, 3), "three nodes")
        await asyncio.sleep(1.0)  # the watchers have had their first look
        given = {}
        for cloud, fake in fakes.items():
            notice = fake.give_notice(NoticeRequest(deadline_seconds=30))
            given[cloud] = (notice, dt.datetime.now(dt.UTC).timestamp())
        records = {cloud: await until(functools.partial(_finished, control, cloud),
                                      f"{cloud}'s notice", 30)
                   for cloud in CLOUDS}
        acknowledged = {cloud: list(fake.acknowledged) for cloud, fake in fakes.items()}
        node_metrics = {cloud: (await http.get(f"http://127.0.0.1:{9300 + i}/metrics")).text
                        for i, cloud in enumerate(CLOUDS)}
        cli = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "roam.cli.main", "control", "node", "notice", "gcp",
            "--deadline", "20s", "--json"], capture_output=True, text=True, env=env)
        bad = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "roam.cli.main", "control", "node", "notice", "gcp",
            "--deadline", "0s"], capture_output=True, text=True, env=env)
        return {"given": given, "records": records, "acknowledged": acknowledged,
                "node_metrics": node_metrics, "metrics": await control.metrics(),
                "cli": cli, "bad": bad, "nodes": {n.name: n.state.value
                                                  for n in await control.nodes()}}


async def _count(control: ControlClient, count: int) -> bool:
    return len(await control.nodes()) == count


async def _finished(control: ControlClient, node: str) -> Any:
    record = await control.notice(node)
    return record if record.finished is not None else None


@pytest.mark.timeout(300)
def test_each_clouds_notice_reaches_the_control_plane(processes: Processes) -> None:
    data = processes.work / "control"
    token = subprocess.run([sys.executable, "-m", "roam.cli.main", "control", "token",
                            "create", "--data", str(data)], capture_output=True, text=True,
                           check=True).stdout.strip()
    processes.roam("control", "control", "serve", "--data", str(data), "--listen",
                   f"127.0.0.1:{CONTROL_PORT}")
    found = ns.call_in(processes.ns, lambda: asyncio.run(scenario(processes, token)))

    for cloud, record in found["records"].items():
        notice, seen = found["given"][cloud]
        assert record.cloud == cloud and record.vms == {}
        if cloud == "gcp":  # GCP says only TRUE: the deadline is 30 s after it was seen
            assert abs(record.deadline - (seen + 30)) < 10
            assert record.action == "preempt"
        else:
            assert record.deadline == notice.deadline.timestamp()
            assert record.action == ("terminate" if cloud == "aws" else "preempt")
        assert f'roam_spot_notices_total{{cloud="{cloud}"}} 1.0' in \
            found["node_metrics"][cloud]
        assert f'roam_notices_total{{cloud="{cloud}"}} 1.0' in found["metrics"]
    # Nothing to move: Azure's event is acknowledged at once.
    assert found["acknowledged"] == {"aws": [], "gcp": [],
                                     "azure": [found["given"]["azure"][0].event_id]}
    assert found["nodes"]["aws"] == "cordoned"

    assert found["cli"].returncode == 0, found["cli"].stderr
    by_api = json.loads(found["cli"].stdout)  # replaces gcp's finished notice
    assert by_api["cloud"] == "none" and by_api["finished"] is not None
    assert 19 < by_api["deadline"] - by_api["received"] <= 20
    assert found["bad"].returncode == 2 and "--deadline" in found["bad"].stderr

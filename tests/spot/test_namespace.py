"""On a node as deployed: in a network namespace, the fake service holds the documented
address 169.254.169.254 on port 80 and `roam spot watch` finds it with no --metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from pyroute2 import IPRoute

from roam.network import ns
from roam.network.lab import lab

ROAM = [sys.executable, "-m", "roam.cli.main"]
METADATA = "169.254.169.254"


@pytest.fixture
def node() -> Iterator[str]:
    with lab("node") as the_lab:
        name = the_lab.nodes["node"]
        with IPRoute(netns=name) as ip:
            ip.addr("add", index=ip.link_lookup(ifname="lo")[0], address=METADATA,
                    prefixlen=32)
        yield name


def test_watchers_find_the_documented_address(node: str) -> None:
    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", node, *ROAM, "spot", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    fake = start("fake-metadata", "--listen", f"{METADATA}:80", "--json")
    watchers = {}
    try:
        assert fake.stdout is not None
        assert json.loads(fake.stdout.readline())["url"] == f"http://{METADATA}:80"
        watchers = {cloud: start("watch", "--cloud", cloud, "--interval", "0.1",
                                 "--count", "1", "--json")
                    for cloud in ("aws", "gcp", "azure")}

        def control() -> dict[str, object]:
            with httpx.Client(base_url=f"http://{METADATA}", trust_env=False) as http:
                for _ in range(3000):  # until every watcher has asked
                    asked = http.get("/_roam/state").json()["requests"]
                    if {"aws.instance-action", "gcp.preempted", "azure.events"} <= set(asked):
                        break
                return dict(http.post("/_roam/notice", json={"deadline_seconds": 60}).json())

        given = ns.call_in(node, control)
        for cloud, watcher in watchers.items():
            out, err = watcher.communicate(timeout=60)
            assert watcher.returncode == 0, err
            notice = json.loads(out)
            assert notice["cloud"] == cloud
        assert isinstance(given["notice"], dict)
    finally:
        for process in (*watchers.values(), fake):
            process.terminate()
            process.wait(timeout=10)

"""A real etcd cluster for tests: Debian's etcd, three members on loopback ports.

Each member runs as its own process with a data directory under the test's temporary
directory; the heartbeat and election timeouts are cut to tens of milliseconds so that a
leader's loss is noticed (and a new one elected) in well under a second. A member can be
killed (SIGKILL, as a machine's loss looks to its peers) and started again on the same
data, where it rejoins the cluster.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

HEARTBEAT_MS = 50
ELECTION_MS = 500
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Member:
    name: str
    client_url: str
    peer_url: str
    data: Path
    log: Path
    netns: str | None = None  # the network namespace it runs in (None: this one)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EtcdCluster:
    """`cluster.urls`, `cluster.kill(i)`, `cluster.start(i)`, `cluster.wait_healthy()`."""

    def __init__(self, root: Path, size: int = 3,
                 hosts: list[tuple[str, str]] | None = None) -> None:
        """`size` members on loopback ports, or one per host of `hosts` (network
        namespace, address), on etcd's usual ports."""
        root.mkdir(parents=True, exist_ok=True)
        if hosts is None:
            self.members = [
                Member(f"m{i + 1}", f"http://127.0.0.1:{free_port()}",
                       f"http://127.0.0.1:{free_port()}", root / f"m{i + 1}",
                       root / f"m{i + 1}.log")
                for i in range(size)]
        else:
            self.members = [
                Member(f"m{i + 1}", f"http://{addr}:2379", f"http://{addr}:2380",
                       root / f"m{i + 1}", root / f"m{i + 1}.log", netns)
                for i, (netns, addr) in enumerate(hosts)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, index: int | None = None) -> None:
        """Start one member (or all): a restarted one rejoins with its data."""
        for member in self.members if index is None else [self.members[index]]:
            if member.running:
                continue
            fresh = not member.data.exists()
            command = [
                "etcd", "--name", member.name, "--data-dir", str(member.data),
                "--listen-client-urls", member.client_url,
                "--advertise-client-urls", member.client_url,
                "--listen-peer-urls", member.peer_url,
                "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", self.initial,
                "--initial-cluster-state", "new" if fresh else "existing",
                "--initial-cluster-token", "roam-test",
                "--heartbeat-interval", str(HEARTBEAT_MS),
                "--election-timeout", str(ELECTION_MS),
                "--log-level", "warn", "--logger", "zap"]
            if member.netns is not None:
                command = ["ip", "netns", "exec", member.netns, *command]
            with member.log.open("ab") as log:
                member.process = subprocess.Popen(command, stdout=log, stderr=log,
                                                  start_new_session=True)

    def kill(self, index: int) -> None:
        """SIGKILL one member and reap it."""
        process = self.members[index].process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)

    def wait_healthy(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every running member says it is healthy (it has a leader, the cluster
        has a quorum)."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            if not member.running:
                continue
            while not _healthy(member):
                if member.process is not None and member.process.poll() is not None:
                    raise RuntimeError(f"etcd {member.name} exited: "
                                       f"{member.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {member.name} not healthy in {timeout} s")
                time.sleep(0.05)


def _healthy(member: Member) -> bool:
    if member.netns is None:
        try:
            answer = httpx.get(member.client_url + "/health", timeout=1.0)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and answer.json().get("health") == "true"
    done = subprocess.run(["ip", "netns", "exec", member.netns, "curl", "-sf", "-m", "1",
                           member.client_url + "/health"], capture_output=True, text=True)
    return done.returncode == 0 and '"health":"true"' in done.stdout


async def until(check: Callable[[], bool | Awaitable[bool]], within: float,
                every: float = 0.1) -> None:
    """Until `check()` holds (it may be a coroutine function); TimeoutError after
    `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            held = check()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await asyncio.sleep(every)


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One three-member cluster for the session. Tests that kill members use their own
    (`fresh_etcd_cluster`) so that this one stays whole."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    cluster.start()
    try:
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh_etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd")
    cluster.start()
    try:
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()

"""Three peers on one machine (UNIX-socket migration addresses) for the whole module.

The session's snapshot comes from tests/vm (one per session); each test runs its own VM
from it under its own name. Peers run as `roam peer serve` subprocesses; tests talk to
them through their HTTP API (roam.peer.client), as the CLI does.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from roam.peer.client import PEER_SOCKET, PeerClient
from roam.peer.models import ExecResult, RunRequest, VMInfo
from roam.peer.network import NetConfig
from tests.blueprint.boot import short_dir
from tests.vm.conftest import ROAM, roam, run_dir, snapshot

__all__ = ["run_dir", "snapshot"]


_pools = itertools.count()
T = TypeVar("T")


def _answers(path: Path) -> bool:
    """Whether something listens on the UNIX socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Peer:
    """A `roam peer serve` in this namespace; each gets its own range of transit subnets
    (they share the host's namespace)."""

    def __init__(self, name: str, root: Path, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(exist_ok=True)  # a restart serves the same state directory
        self.address = f"unix://{root}/{name}.mig"
        self.log = (root / f"{name}.log").open("a")
        self.process = subprocess.Popen(
            [*ROAM, "peer", "serve", "--listen", self.address, "--state-dir", str(self.dir),
             "--net-pool", f"10.240.{next(_pools) % 256}.0/24", *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env})
        deadline = time.monotonic() + 30
        while not _answers(self.dir / PEER_SOCKET):  # a killed peer's socket stays
            assert self.process.poll() is None and time.monotonic() < deadline, "peer down"
            time.sleep(0.05)

    def api(self, action: Callable[[PeerClient], Awaitable[T]]) -> T:
        """One call of the peer's API: `p.api(lambda c: c.vm("web"))`."""
        async def main() -> T:
            async with PeerClient(self.dir) as client:
                return await action(client)
        return asyncio.run(main())

    def run(self, package: Path, name: str) -> VMInfo:
        return self.api(lambda c: c.run(RunRequest(name=name, package=str(package))))

    def run_from(self, registry: str, name: str) -> VMInfo:
        return self.api(lambda c: c.run(RunRequest.model_validate(
            {"name": name, "from": registry})))

    def exec(self, name: str, argv: list[str], timeout: float = 60) -> ExecResult:
        return self.api(lambda c: c.exec(name, argv, timeout))

    def sh(self, name: str, command: str) -> str:
        result = self.exec(name, ["sh", "-c", command])
        assert result.exit_code == 0, result
        return result.stdout

    def stop(self, name: str) -> None:
        self.api(lambda c: c.stop(name))

    def vms(self) -> dict[str, dict[str, Any]]:
        """The VMs as the API's JSON has them."""
        return {vm.name: vm.model_dump(mode="json") for vm in self.api(lambda c: c.vms())}

    def migrate(self, name: str, to: Peer, *options: str,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """`roam migrate` (the CLI), as a user runs it."""
        return roam("migrate", name, "--to", to.address, "--via", str(self.dir), "--json",
                    *options, check=check)

    def migrate_background(self, name: str, to: Peer, *options: str
                           ) -> subprocess.Popen[str]:
        return subprocess.Popen([*ROAM, "migrate", name, "--to", to.address, "--via",
                                 str(self.dir), *options], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def lose(self, name: str) -> None:
        """The host is lost: VM `name`'s worker (QEMU dies with it) and the peer get
        SIGKILL. Then, as a restarted peer would, the dead worker's FUSE mount is
        detached (a dead daemon's mount stays until unmounted)."""
        os.kill(self.vms()[name]["pid"], signal.SIGKILL)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        time.sleep(0.5)  # the kernel tears the worker down
        for line in Path("/proc/mounts").read_text().splitlines():
            mount = line.split()[1]
            if mount.startswith(f"{self.dir}/"):
                subprocess.run(["umount", "-l", mount], check=False)

    def close(self) -> None:
        lost = self.process.poll() is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        if lost:  # killed and not restarted: remove the VM networks it left, as a restart would
            net = NetConfig(directory=self.dir / "net",
                            prefix=NetConfig.default_prefix(self.dir))
            asyncio.run(net.host().sweep())


def serve_in_background(*args: str, socket: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([*ROAM, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not socket.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, Peer]]:
    with short_dir() as root:
        started = {n: Peer(n, root) for n in ("a", "b", "c")}
        try:
            yield started
        finally:
            for p in started.values():
                p.close()

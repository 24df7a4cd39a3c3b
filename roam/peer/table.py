"""The peer's table of its VMs: which worker runs which VM, and what it last said.

Workers report every change of their VM (roam.peer.events), so the peer answers a list or
a lookup from here instead of asking every worker on every request; a request that must
reach the VM (exec, migrate, stop, resume) then goes to the one worker found here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from roam.errors import ErrorCode, RoamError
from roam.peer.models import LIVE_STATES, VMInfo
from roam.vm import control


class Worker:
    """A worker process and the last known state of its VM."""

    def __init__(self, workdir: Path, process: asyncio.subprocess.Process,
                 name: str | None = None) -> None:
        self.workdir = workdir
        self.process = process
        self.name = name  # known from the start for `run`, from its first event otherwise
        self.info: VMInfo | None = None
        self._changed = asyncio.Event()

    @property
    def socket(self) -> Path:
        return self.workdir / control.SOCKET

    @property
    def exited(self) -> bool:
        return self.process.returncode is not None

    @property
    def live(self) -> bool:
        """Its VM is here and holds its name (starting, running, paused, in doubt...)."""
        return not self.exited and (self.info is None or self.info.state in LIVE_STATES)

    def update(self, info: VMInfo) -> None:
        self.info = info
        self.name = info.name
        self.notify()

    def notify(self) -> None:
        """Wake whoever waits for this worker to change (an update, or its exit)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[Worker], bool]) -> None:
        """Until `predicate(self)` holds; checked at each update (bound it with a timeout)."""
        while not predicate(self):
            await self._changed.wait()

    async def call(self, method: str, params: control.Json | None = None,
                   timeout: float = 10.0) -> control.Json:  # noqa: ASYNC109
        return await control.call_path(self.socket, method, params, timeout,
                                       self.name or self.workdir.name)

    def log_tail(self) -> str:
        path = self.workdir / "worker.log"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return "\n".join(lines[-8:])


class VMTable:
    def __init__(self) -> None:
        self.workers: dict[Path, Worker] = {}

    def add(self, worker: Worker) -> None:
        self.workers[worker.workdir] = worker

    def remove(self, worker: Worker) -> None:
        self.workers.pop(worker.workdir, None)

    def vms(self) -> list[VMInfo]:
        """Every VM whose worker is up and reported (also those leaving: migrated,
        stopped; a worker that exited is gone even before it is reaped)."""
        return [w.info for w in self.workers.values() if w.info is not None and not w.exited]

    def taken(self, name: str) -> bool:
        return any(w.name == name and w.live for w in self.workers.values())

    def find(self, name: str) -> Worker:
        """The worker whose VM called `name` is here (or, failing that, leaving)."""
        named = [w for w in self.workers.values() if w.name == name and not w.exited]
        if named:
            return min(named, key=lambda w: not w.live)
        raise RoamError(f"no VM called {name!r} on this peer", code=ErrorCode.NOT_FOUND)

    def find_live(self, name: str) -> Worker:
        worker = self.find(name)
        if not worker.live:
            state = worker.info.state if worker.info else "leaving"
            raise RoamError(f"{name} is {state}: it no longer runs here",
                            code=ErrorCode.CONFLICT)
        return worker

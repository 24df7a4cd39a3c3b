"""Leases: what this host created for each VM, on disk; the address allocator and crash
cleanup.

A lease is written before anything is created and removed after everything is gone, so
a peer that crashes in between leaves a lease naming what may remain; the next start
removes it (`sweep`). The leases are also the allocator: a VM's slot (which picks its
transit subnet and host-side link name) is the lowest one no lease holds. One flock on
the directory serialises every change, across processes.

(Not to be confused with the package registry, `roam registry serve`.) The files are one
`VM.json` per lease and `.lock`, as they were when this module was called registry.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DIR = Path("/run/roam/net")  # tmpfs: gone at reboot, like the namespaces
DEFAULT_POOL = "10.231.0.0/16"
LOCK = ".lock"


def state_dir() -> Path:
    override = os.environ.get("ROAM_NET_DIR")
    return Path(override) if override else DEFAULT_DIR


@dataclass(frozen=True)
class Owner:
    """A process, told apart from a later one with the same pid by its start time."""

    pid: int
    start: int

    @classmethod
    def current(cls) -> Owner:
        return cls(os.getpid(), _start_time(os.getpid()) or 0)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the command name, which may itself hold spaces.
    return int(stat.rpartition(")")[2].split()[19])


@dataclass(frozen=True)
class Lease:
    """One VM's network on this host: its namespace, its nft table here, its slot."""

    vm: str
    netns: str
    table: str
    slot: int
    owner: Owner

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Lease:
        data = json.loads(text)
        return cls(data["vm"], data["netns"], data["table"], data["slot"],
                   Owner(**data["owner"]))


@dataclass(frozen=True)
class Transit:
    """The /30 between the host and a VM's namespace: host end .1, namespace end .2."""

    host: ipaddress.IPv4Address
    ns: ipaddress.IPv4Address
    prefixlen: int = 30


class Leases:
    """Leases in `directory`; transit subnets are /30s of `pool`, by slot."""

    def __init__(self, directory: Path | None = None, pool: str = DEFAULT_POOL) -> None:
        self.directory = directory or state_dir()
        self.pool = ipaddress.IPv4Network(pool)

    @property
    def capacity(self) -> int:
        return self.pool.num_addresses // 4

    def transit(self, slot: int) -> Transit:
        base = self.pool.network_address + 4 * slot
        return Transit(base + 1, base + 2)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _path(self, vm: str) -> Path:
        return self.directory / f"{vm}.json"

    def all(self) -> list[Lease]:
        """Every lease (call while locked)."""
        return [Lease.from_json(p.read_text()) for p in sorted(self.directory.glob("*.json"))]

    def get(self, vm: str) -> Lease | None:
        path = self._path(vm)
        return Lease.from_json(path.read_text()) if path.exists() else None

    def claim(self, vm: str, netns: str, table: str) -> Lease:
        """Allocate the lowest free slot for `vm` and write its lease (call while locked)."""
        if self._path(vm).exists():
            raise FileExistsError(f"VM {vm!r} already has a network on this host")
        used = {lease.slot for lease in self.all()}
        slot = next((s for s in range(self.capacity) if s not in used), None)
        if slot is None:
            raise OSError(f"all {self.capacity} transit subnets of {self.pool} are in use")
        lease = Lease(vm, netns, table, slot, Owner.current())
        tmp = self._path(vm).with_suffix(".tmp")
        tmp.write_text(lease.to_json())
        tmp.replace(self._path(vm))
        return lease

    def release(self, vm: str) -> None:
        self._path(vm).unlink(missing_ok=True)

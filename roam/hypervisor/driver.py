"""The hypervisor driver interface: what roam needs of a hypervisor, and nothing more.

A driver turns engine devices (guest memory and the root disk, as Providers) into a
running machine. How it exposes them (QEMU: memory as a shared FUSE file, the disk over
NBD) and how the guest agent is reached (QEMU: a virtio-serial port on a UNIX socket)
are its own choices; callers see only `Driver` and `Machine`.

The contract every driver keeps, because migration is built on it:
- guest memory is the memory Provider itself (shared, never copied by the hypervisor):
  `flush_memory` makes every guest write so far visible in that Provider, which is how
  the engine learns the dirty set;
- `save_state` writes only the device state (CPU, devices) of a paused machine into a
  Provider, `load_state` loads it into a machine started with `start_incoming` on the
  same memory and disk, and the two ends may be different processes or hosts.

QEMU is the one driver today (roam.hypervisor.qemu). A Firecracker or Cloud Hypervisor
driver would implement these two protocols in a folder of its own and be named in
roam.hypervisor.factory; see docs/DESIGN.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from roam.errors import ErrorCode, RoamError
from roam.guest.client import GuestClient
from roam.storage.provider import Buffer, Provider

T = TypeVar("T")


class HypervisorError(RoamError):
    """The hypervisor refused a command, failed a state transfer, or is not running."""


class MachineExited(HypervisorError):
    """The hypervisor process ended while the machine was supposed to run."""

    def __init__(self, returncode: int, log_tail: str, hypervisor: str) -> None:
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        super().__init__(f"{hypervisor} exited unexpectedly ({how})"
                         + (f": {log_tail}" if log_tail else ""))
        self.returncode = returncode


class UnknownDriver(HypervisorError):
    """A package or request names a driver this build does not have."""

    code = ErrorCode.BAD_REQUEST


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do, for callers that must choose (and for `roam doctor`)."""

    accelerators: tuple[str, ...]  # e.g. ("kvm", "tcg")
    incoming_state: bool  # load_state into a machine started with start_incoming
    announce: bool  # make the guest announce its MAC after a move (overlay networks)
    memory_feeder: bool  # memory_feeder() can fill guest memory before it runs


@dataclass(frozen=True)
class MachineSpec:
    """The virtual hardware. Saved device state loads only into the same hardware, so a
    snapshot and every later resume are started from one spec."""

    kernel: Path
    initramfs: Path | None
    cmdline: str
    memory_mib: int
    cpus: int
    machine: str  # the board, e.g. QEMU's "q35"
    cpu_model: str  # the CPU the guest sees
    accel: str  # "kvm" or "tcg": device state loads only under the one it was saved in
    mac: str


@dataclass(frozen=True)
class Nic:
    """The NIC's backend: a tap opened by roam.network (inherited as descriptor `tap_fd`),
    or none. Only the virtual NIC is part of the device state; its backend may differ at
    every resume."""

    tap_fd: int | None = None

    @classmethod
    def tap(cls, fd: int) -> Nic:
        return cls(fd)

    @classmethod
    def detached(cls) -> Nic:
        """The NIC exists, nothing reaches it (snapshots: any backend can resume them)."""
        return cls(None)


class MemoryFeeder(Protocol):
    """Puts guest memory in place before the guest runs (QEMU: the FUSE page cache), so
    the resumed guest does not fault on it; see roam.exposure.fuse.cache."""

    def store(self, offset: int, data: Buffer) -> None: ...

    def invalidate(self, offset: int, length: int) -> None: ...

    async def watch(self) -> None:
        """From now on `resident` can tell what is in place."""
        ...

    def resident(self) -> np.ndarray | None:
        """Per 4 KiB page of guest memory: in place now (None: cannot tell). What was
        stored can be dropped again (QEMU: page cache the kernel reclaimed)."""
        ...

    def busy(self) -> bool:
        """Stores asked for are not all done yet."""
        ...

    async def close(self) -> None: ...


class Machine(Protocol):
    """One guest of a driver, on the devices it was made with.

    Starts cold (`start`) or waiting for saved device state (`start_incoming`, then
    `load_state` and `resume`). Every method raises HypervisorError; MachineExited when
    the hypervisor died under it.
    """

    @property
    def pid(self) -> int | None: ...

    async def start(self, nic: Nic) -> None: ...

    async def start_incoming(self, nic: Nic) -> None: ...

    async def pause(self) -> float:
        """Stop the guest; returns when it stopped (time.time(), as the hypervisor saw
        it: the start of a handover's downtime)."""
        ...

    async def resume(self) -> float:
        """Run the guest; returns when it ran again (time.time(), as the hypervisor saw
        it: the end of a handover's downtime)."""
        ...

    async def save_state(self, device: Provider) -> int:
        """Device state of the paused machine into `device`; returns its length."""

    async def load_state(self, device: Provider) -> None:
        """Device state from `device`; the machine stays paused until `resume`."""

    async def flush_memory(self) -> None:
        """Every guest write so far reaches the memory Provider."""

    async def announce(self) -> None:
        """The guest announces its MAC from here (after a move)."""

    async def open_agent(self) -> GuestClient:
        """A new connection to the guest agent's channel."""

    def memory_feeder(self) -> MemoryFeeder | None: ...

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, raising MachineExited instead if the hypervisor ends first."""

    async def wait_exit(self) -> MachineExited:
        """Return (not raise) the error once the hypervisor has ended."""

    async def stop(self) -> None:
        """End the hypervisor process; safe to call twice."""


class Driver(Protocol):
    """A hypervisor: its name and version go into packages made with it."""

    name: str
    capabilities: Capabilities

    def version(self) -> str: ...

    def machine(self, spec: MachineSpec, workdir: Path, memory: Provider,
                disk: Provider) -> contextlib.AbstractAsyncContextManager[Machine]:
        """Expose `memory` and `disk` and give a machine on them (not started). Its
        sockets and logs go in `workdir`. The machine must be stopped before the block
        ends; the Providers stay open (they belong to the caller)."""

    async def sweep(self, workdir: Path) -> None:
        """Remove what a killed owner of `workdir` left there (QEMU: its FUSE mount, which
        the kernel keeps after its daemon died), so the directory can be reused."""

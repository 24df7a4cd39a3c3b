"""A peer's state directory: one peer at a time, and what a killed peer left removed.

`claim` takes an exclusive flock on `STATE_DIR/peer.lock` for the life of the peer: a
second `roam peer serve` on the same directory fails at once instead of taking over
`peer.sock` (the kernel drops the lock when its holder dies, even by SIGKILL, so a
crashed peer never blocks its successor). The lock file's descriptor is close-on-exec:
workers do not hold it.

`clean` runs once the lock is held, before the directory is used: a peer killed with
SIGKILL (and its workers with it, as when a host's process group or cgroup is killed)
leaves VM directories with FUSE mounts whose daemon is dead (the kernel keeps them until
they are unmounted), maybe a QEMU or worker that outlived it, and sockets. A VM runs in
one place: whatever process still runs out of a VM directory of a dead peer has lost
its supervisor (and a QEMU its memory and disk server) and is killed, never adopted.
The VM networks (namespaces, taps, nft tables) are the leases' business
(roam.network.leases: `HostNetwork.sweep`), which the peer runs after this.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from roam import hypervisor
from roam.errors import ErrorCode
from roam.peer.errors import PeerError

__all__ = ["LOCK", "StateDirBusy", "claim", "clean"]

log = logging.getLogger("roam.peer")

LOCK = "peer.lock"
KILL_WAIT = 5.0  # seconds for a killed leftover to be gone (SIGKILL is not refusable)


class StateDirBusy(PeerError):
    """Another peer serves this state directory."""

    code = ErrorCode.BUSY


@contextlib.contextmanager
def claim(state_dir: Path) -> Iterator[None]:
    """Hold `state_dir` for this process (created, mode 0700) or fail with StateDirBusy."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)  # the API socket is the peer's whole authority
    fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirBusy(f"another roam peer serves this state directory "
                               f"({state_dir})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for people; the flock is the lock
        yield
    finally:
        os.close(fd)


async def clean(vms_dir: Path) -> None:
    """Empty `vms_dir` of what a dead peer left: its processes killed, its mounts
    unmounted lazily, its files removed; each logged."""
    if not vms_dir.exists():
        return
    await _kill_leftovers(vms_dir)
    driver = hypervisor.driver()
    for workdir in sorted(p for p in vms_dir.iterdir() if p.is_dir()):
        await driver.sweep(workdir)
    leftovers = [p.name for p in vms_dir.iterdir()]
    if leftovers:
        log.warning("removing the VM directories a dead peer left in %s: %s", vms_dir,
                    ", ".join(sorted(leftovers)))
    await asyncio.to_thread(shutil.rmtree, vms_dir)


def _users(vms_dir: Path) -> dict[int, str]:
    """Processes whose command line names a path in `vms_dir` (workers, their QEMUs),
    with their command name."""
    # The path starts an argument or an option's value (`--workdir DIR`, QEMU's
    # `mem-path=DIR/...`): another state directory that merely ends like ours is not ours.
    ours = re.compile(rb"(?:^|[=,])" + re.escape(f"{vms_dir}/".encode()))
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if any(ours.search(arg) for arg in argv):
            found[int(entry.name)] = os.path.basename(argv[0].decode(errors="replace"))
    return found


async def _kill_leftovers(vms_dir: Path) -> None:
    users = _users(vms_dir)
    if not users:
        return
    log.warning("killing what a dead peer left running from %s: %s", vms_dir,
                ", ".join(f"{name} (pid {pid})" for pid, name in sorted(users.items())))
    async with asyncio.timeout(KILL_WAIT), asyncio.TaskGroup() as group:
        for pid in users:
            group.create_task(_kill(pid))


async def _kill(pid: int) -> None:
    """SIGKILL `pid` and wait until it has ended (a pidfd turns readable then)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        loop.add_reader(pidfd, ended.set_result, None)
        try:
            await ended
        finally:
            loop.remove_reader(pidfd)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)

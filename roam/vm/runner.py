"""`roam run`: resume a package, serve it until SIGINT/SIGTERM, then write it back.

The package is changed only by a clean suspend. While the VM runs, its memory, disk and
state devices are copy-on-write overlays: reads fall through to the package's files,
writes land in upper files in the run directory. At the suspend the written blocks are
copied into the package (the commit). If QEMU dies or anything else fails, the uppers are
thrown away and the package is exactly as it was.

The VM's network (roam.network: a namespace with its tap, NAT and the published ports) is
created before QEMU starts and removed when it has stopped, however the run ends; what a
killed run left behind is removed at the next start of any run (`HostNetwork.sweep`).

The commit is redone after a crash: a journal in the package names the run directory
whose uppers are being applied, and is removed once all of them are. Applying an upper
twice gives the same bytes, so the next `roam run` simply finishes the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from roam import hypervisor
from roam.errors import ErrorCode, RoamError
from roam.hypervisor import Nic
from roam.network.forward import PortForward
from roam.network.vmnet import HostNetwork
from roam.storage.cow import CopyOnWrite
from roam.storage.sources import SparseFileSource
from roam.vm import control, group
from roam.vm.group import COW_BLOCK, Device
from roam.vm.lifecycle import VM
from roam.vm.package import Package, PackageError, fsync_dir, write_atomic

log = logging.getLogger(__name__)

JOURNAL = ".commit.json"
UPPER = ".upper"
MAP = ".map"


class RunError(RoamError):
    """The VM could not be resumed or is already running."""

    code = ErrorCode.CONFLICT


@dataclass
class RunTimes:
    """Seconds per phase of one run, for benchmarks and the command's summary."""

    resume: float = 0.0  # QEMU start, state load, cont, agent after_resume
    suspend: float = 0.0  # before_suspend, pause, state save, QEMU exit, memory flush
    commit: float = 0.0  # written blocks copied into the package
    committed_bytes: int = 0


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One `roam run` per package at a time (flock on the directory, freed if we die)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{directory} is already running") from None
        yield
    finally:
        os.close(fd)


def _device_files(package: Package) -> dict[str, int]:
    """Package file name -> size, for each device the VM writes."""
    names = group.package_files(package.config)
    return {names[dev]: size for dev, size in group.device_sizes(package).items()}


async def _apply(base: Path, upper: Path, written_map: Path, size: int) -> int:
    """Copy the blocks the overlay map marks as written from `upper` into `base`."""
    if not written_map.exists():
        return 0  # the overlay saves its map only once a block was written
    written = written_map.read_bytes()
    target = SparseFileSource(base, size, create=False)
    source = SparseFileSource(upper, size, create=False)
    copied = 0
    try:
        for block, flag in enumerate(written):
            if flag:
                offset = block * COW_BLOCK
                n = min(COW_BLOCK, size - offset)
                await target.write_at(offset, await source.read_at(offset, n))
                copied += n
        await target.flush()
    finally:
        await source.close()
        await target.close()
    return copied


async def commit(package: Package, rundir: Path) -> int:
    """Apply the run's uppers to the package, crash-safely (see the module docstring)."""
    journal = package.path(JOURNAL)
    write_atomic(journal, json.dumps({"run": str(rundir)}).encode())
    copied = 0
    for name, size in _device_files(package).items():
        copied += await _apply(package.path(name), rundir / (name + UPPER),
                               rundir / (name + MAP), size)
    journal.unlink()
    fsync_dir(package.directory)
    return copied


async def recover(directory: Path) -> None:
    """Finish a commit that a crash interrupted, before the package is used."""
    journal = directory / JOURNAL
    if not journal.exists():
        return
    rundir = Path(json.loads(journal.read_text())["run"])
    package = Package.load(directory)
    missing = [n for n in _device_files(package) if not (rundir / (n + UPPER)).exists()]
    if missing:
        raise PackageError(f"{directory}: a suspend was interrupted while writing the package "
                           f"and its run files in {rundir} are gone; restore the package "
                           "from its archive")
    log.warning("finishing the interrupted commit of %s from %s", directory, rundir)
    await commit(package, rundir)


async def _clear_run_dir(rundir: Path) -> None:
    """Start from an empty run directory, even after a run that was killed (whose
    exposure the driver removes first)."""
    await hypervisor.driver().sweep(rundir)
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)


async def run_package(directory: Path, name: str, publish: list[PortForward],
                      stop: asyncio.Event,
                      on_running: Callable[[dict[str, object]], None] | None = None,
                      ) -> RunTimes:
    """Resume the package at `directory` as VM `name` until `stop` is set, then suspend it
    and commit it. Raises QemuExited (package untouched) if QEMU dies meanwhile."""
    control.check_name(name)
    await recover(directory)
    package = Package.load(directory)
    with _locked(directory):
        rundir = control.run_root() / name
        with contextlib.suppress(control.ControlError):
            await control.call(name, "info", timeout=3.0)
            raise RunError(f"a VM called {name!r} is already running")
        await _clear_run_dir(rundir)
        overlays = {
            file: CopyOnWrite(SparseFileSource(package.path(file), size, create=False),
                             SparseFileSource(rundir / (file + UPPER), size),
                             rundir / (file + MAP), COW_BLOCK)
            for file, size in _device_files(package).items()}
        try:
            times = await _run(package, name, rundir, overlays, publish, stop, on_running)
        finally:
            for overlay in overlays.values():
                await overlay.close()
        started = time.monotonic()
        times.committed_bytes = await commit(package, rundir)
        times.commit = time.monotonic() - started
        shutil.rmtree(rundir, ignore_errors=True)
        return times


async def _run(package: Package, name: str, rundir: Path, overlays: dict[str, CopyOnWrite],
               publish: list[PortForward], stop: asyncio.Event,
               on_running: Callable[[dict[str, object]], None] | None) -> RunTimes:
    host = HostNetwork()
    await host.sweep()
    try:
        net = await host.local(name, publish)
    except ValueError as exc:  # a name that is fine for a VM but not for its network
        raise RunError(str(exc)) from None
    try:
        assert net.tap_fd is not None  # a local network always has a tap
        return await _run_vm(package, name, rundir, overlays, publish, stop, on_running,
                             Nic.tap(net.tap_fd))
    finally:
        await host.down(net)


async def _run_vm(package: Package, name: str, rundir: Path, overlays: dict[str, CopyOnWrite],
                  publish: list[PortForward], stop: asyncio.Event,
                  on_running: Callable[[dict[str, object]], None] | None,
                  nic: Nic) -> RunTimes:
    config = package.config
    files = group.package_files(config)
    times = RunTimes()
    driver = hypervisor.driver(config.driver().name)
    async with driver.machine(config.machine_spec(package.directory), rundir,
                              overlays[files[Device.MEMORY]],
                              overlays[files[Device.DISK]]) as machine:
        vm = VM(machine)
        try:
            started = time.monotonic()
            await vm.resume(overlays[files[Device.STATE]], nic)
            times.resume = time.monotonic() - started
            info: dict[str, object] = {
                "name": name, "package": str(package.directory.resolve()),
                "pid": os.getpid(), "qemu_pid": machine.pid, "accel": config.accel,
                "memory_mib": config.memory_mib, "cpus": config.cpus,
                "publish": [asdict(f) for f in publish], "resumed_at": time.time()}

            async def info_handler(_: control.Json) -> control.Json:
                return info

            async def exec_handler(params: control.Json) -> control.Json:
                result = await vm.exec(params["argv"], float(params.get("timeout", 30.0)))
                return asdict(result)

            server = await control.serve(rundir / control.SOCKET,
                                         {"info": info_handler, "exec": exec_handler})
            try:
                if on_running is not None:
                    on_running(info)
                stopped = asyncio.create_task(stop.wait())
                exited = asyncio.create_task(machine.wait_exit())
                await asyncio.wait([stopped, exited], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if exited.done():
                    raise exited.result()
                exited.cancel()
            finally:
                server.close()
            started = time.monotonic()
            await vm.suspend(overlays[files[Device.STATE]])
        finally:
            await vm.close()
    times.suspend = time.monotonic() - started  # the mount's exit flushed the memory
    return times

"""`roam snapshot`: boot a blueprint, wait until its workload is up, and save it as a package.

The guest boots on the package's own files (memory and disk are served straight from
them), so when it is paused only the device state remains to be written.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from roam import hypervisor
from roam.blueprint import Blueprint, cache_root
from roam.blueprint.build import copy_file
from roam.errors import RoamError
from roam.guest.client import GuestAgentError
from roam.hypervisor import HypervisorError, Nic, device_state
from roam.hypervisor.accel import choose_accel
from roam.network.guest import KERNEL_ARGS as GUEST_KERNEL_ARGS
from roam.storage.provider import Provider
from roam.storage.sources import SparseFileSource
from roam.vm import package as pkg
from roam.vm.lifecycle import VM

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 300.0


@dataclass(frozen=True)
class SnapshotOptions:
    memory_mib: int = 512
    cpus: int = 1
    cpu_model: str | None = None  # a QEMU named model; default host (KVM) or max (TCG)
    machine: str = "q35"
    state_size: int = device_state.DEFAULT_SIZE
    driver: str = hypervisor.factory.DEFAULT


@dataclass
class SnapshotTimes:
    """Seconds spent in each phase, for benchmarks and the command's summary."""

    boot_to_ready: float = 0.0
    suspend: float = 0.0  # before_suspend hook, pause, device state save
    state_bytes: int = 0


class SnapshotError(RoamError):
    """The guest did not come up or could not be saved; the message has the console tail."""


def random_mac() -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


async def take_snapshot(blueprint: Blueprint, out: Path,
                        options: SnapshotOptions = SnapshotOptions()) -> SnapshotTimes:
    """Write a package to `out` (which must not exist); nothing is left there on failure."""
    if out.exists():
        raise SnapshotError(f"{out} already exists")
    out.mkdir(parents=True)
    try:
        return await _snapshot(blueprint, out, options)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


async def _snapshot(blueprint: Blueprint, out: Path, options: SnapshotOptions) -> SnapshotTimes:
    driver = hypervisor.driver(options.driver)
    accel = choose_accel(blueprint.kernel, blueprint.initramfs, cache_root())
    files = pkg.PackageFiles(initramfs=pkg.INITRAMFS if blueprint.initramfs else None)
    copy_file(blueprint.kernel, out / files.kernel)
    if blueprint.initramfs is not None and files.initramfs is not None:
        copy_file(blueprint.initramfs, out / files.initramfs)
    copy_file(blueprint.rootfs, out / files.disk)
    config = pkg.PackageConfig(
        created=datetime.datetime.now(datetime.UTC),
        blueprint=blueprint.hash,
        cmdline=f"{blueprint.cmdline} {GUEST_KERNEL_ARGS}",
        memory_mib=options.memory_mib,
        cpus=options.cpus,
        machine=options.machine,
        cpu_model=options.cpu_model or ("host" if accel.name == "kvm" else "max"),
        accel="kvm" if accel.name == "kvm" else "tcg",
        hypervisor=pkg.HypervisorRef(name=driver.name, version=driver.version()),
        mac=random_mac(),
        state_size=options.state_size,
        disk_size=(out / files.disk).stat().st_size,
        files=files,
    )
    devices: list[Provider] = [
        SparseFileSource(out / files.memory, config.memory_mib << 20),
        SparseFileSource(out / files.disk, config.disk_size, create=False),
        SparseFileSource(out / files.state, config.state_size),
    ]
    memory, disk, state_device = devices
    times = SnapshotTimes()
    try:
        with tempfile.TemporaryDirectory(prefix="roam-snap-") as tmp:
            work = Path(tmp)  # short: UNIX socket paths are limited to 107 bytes
            async with driver.machine(config.machine_spec(out), work, memory,
                                      disk) as machine:
                vm = VM(machine)
                try:
                    started = time.monotonic()
                    log.info("booting under %s, waiting for the guest to be ready", accel.name)
                    await vm.boot(Nic.detached(), BOOT_TIMEOUT)
                    times.boot_to_ready = time.monotonic() - started
                    log.info("ready after %.1f s; saving the device state",
                             times.boot_to_ready)
                    started = time.monotonic()
                    times.state_bytes = await vm.suspend(state_device)
                    times.suspend = time.monotonic() - started
                except (HypervisorError, GuestAgentError) as exc:
                    console = (work / "console.log").read_text(errors="replace")[-3000:]
                    raise SnapshotError(f"{exc}\nconsole:\n{console}") from exc
                finally:
                    await vm.close()
    finally:
        for device in devices:
            with contextlib.suppress(OSError):
                await device.flush()
            await device.close()
    pkg.Package(out, config).save_config()
    log.info("snapshot of %s in %s: ready after %.1f s, %d bytes of device state",
             blueprint.hash, out, times.boot_to_ready, times.state_bytes)
    return times

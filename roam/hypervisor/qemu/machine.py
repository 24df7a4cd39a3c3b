"""A QEMU guest as a driver Machine: the engine's devices exposed, then one QEMU process.

Memory is a file on a FUSE mount (QEMU maps it shared: guest writes reach the engine
when the file is flushed), the disk an NBD export on a UNIX socket (QEMU's own NBD
client), the agent a virtio-serial port on a UNIX socket, all in the machine's workdir.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

from roam.exposure.fuse.cache import PageCacheFeeder
from roam.guest.client import GuestClient
from roam.hypervisor.accel import Accel
from roam.hypervisor.driver import MachineExited, MachineSpec, Nic
from roam.hypervisor.qemu.cmdline import QemuConfig
from roam.hypervisor.qemu.exposure import MEMORY_FILE, Exposed, exposed
from roam.hypervisor.qemu.process import QemuError, QemuVM
from roam.storage.provider import Provider

T = TypeVar("T")

QEMU_BINARY = "qemu-system-x86_64"
AGENT_SOCKET = "agent.sock"


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise QemuError(f"cannot run {QEMU_BINARY}: {exc}") from exc
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip()


def nic_args(mac: str, nic: Nic) -> list[str]:
    """A virtio NIC with MAC `mac`: on the tap `nic` names, or on a hub port leading
    nowhere. (User-mode networking is not offered: it saves a state section of its own
    that only another user-mode backend can load.)"""
    backend = "hubport,hubid=0" if nic.tap_fd is None else f"tap,fd={nic.tap_fd}"
    return ["-netdev", f"{backend},id=net0",
            "-device", f"virtio-net-pci,netdev=net0,mac={mac}"]


def qemu_config(spec: MachineSpec, workdir: Path, devices: Exposed, nic: Nic) -> QemuConfig:
    """QEMU for the machine `spec` describes, its sockets and console log in `workdir`,
    its memory and disk served by `devices`."""
    return QemuConfig(
        kernel=spec.kernel,
        initramfs=spec.initramfs,
        cmdline=spec.cmdline,
        memory_mib=spec.memory_mib,
        mem_path=devices.mem_path,
        disks=[devices.disk],
        agent_socket=workdir / AGENT_SOCKET,
        qmp_socket=workdir / "qmp.sock",
        console_log=workdir / "console.log",
        accel=Accel(spec.accel, "the device state was saved under it"),
        cpus=spec.cpus,
        machine=spec.machine,
        cpu_model=spec.cpu_model,
        extra_args=nic_args(spec.mac, nic),
        pass_fds=() if nic.tap_fd is None else (nic.tap_fd,),
        binary=QEMU_BINARY,
    )


async def announce(vm: QemuVM) -> None:
    """RARP from the guest's MAC, repeated with back-off (QMP announce-self)."""
    await vm.command("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})


class QemuMachine:
    """roam.hypervisor.driver.Machine for QEMU."""

    def __init__(self, spec: MachineSpec, workdir: Path, devices: Exposed) -> None:
        self.spec = spec
        self.workdir = workdir
        self._devices = devices
        self._vm: QemuVM | None = None

    @property
    def pid(self) -> int | None:
        return None if self._vm is None else self._vm.pid

    @property
    def vm(self) -> QemuVM:
        if self._vm is None:
            raise QemuError("QEMU is not started")
        return self._vm

    def _process(self, nic: Nic) -> QemuVM:
        if self._vm is not None:
            raise QemuError("QEMU is already started")
        self._vm = QemuVM(qemu_config(self.spec, self.workdir, self._devices, nic),
                          self.workdir / "qemu.log")
        return self._vm

    async def start(self, nic: Nic) -> None:
        await self._process(nic).start()

    async def start_incoming(self, nic: Nic) -> None:
        await self._process(nic).start(incoming=True)

    async def pause(self) -> float:
        return await self.vm.pause()

    async def resume(self) -> float:
        return await self.vm.resume()

    async def save_state(self, device: Provider) -> int:
        return await self.vm.save_state(device)

    async def load_state(self, device: Provider) -> None:
        await self.vm.load_state(device)

    async def flush_memory(self) -> None:
        await self._devices.flush_memory()

    async def announce(self) -> None:
        await announce(self.vm)

    async def open_agent(self) -> GuestClient:
        return await self.guard(GuestClient.connect(self.workdir / AGENT_SOCKET))

    def memory_feeder(self) -> PageCacheFeeder:
        return self._devices.mount.page_cache(MEMORY_FILE)

    async def guard(self, awaitable: Awaitable[T]) -> T:
        return await self.vm.guard(awaitable)

    async def wait_exit(self) -> MachineExited:
        return await self.vm.wait_exit()

    async def stop(self) -> None:
        if self._vm is not None:
            await self._vm.stop()


@contextlib.asynccontextmanager
async def qemu_machine(spec: MachineSpec, workdir: Path, memory: Provider,
                       disk: Provider) -> AsyncIterator[QemuMachine]:
    async with exposed(workdir, memory, disk) as devices:
        machine = QemuMachine(spec, workdir, devices)
        try:
            yield machine
        finally:
            await machine.stop()  # before the devices go away under it

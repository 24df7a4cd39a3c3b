"""From a package's config to a QEMU command line: the parts a snapshot and a resume share.

QEMU loads saved device state only into the same devices, so both build the machine
here; only the backends (sockets, files, the NIC's backend) may differ between them.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from roam.network.forward import PortForward
from roam.vm.accel import Accel
from roam.vm.devices import Exposed
from roam.vm.package import PackageConfig
from roam.vm.qemu_cmd import QemuConfig

QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True)
class Netdev:
    """The NIC's backend: a QEMU -netdev spec (without its id) and the descriptors it names.

    Only the virtio device is part of the saved state; the backend may differ at each
    resume, except that user-mode networking (slirp) saves a state section of its own,
    which only another slirp backend can load. So snapshots use `detached`, which any
    backend can resume.
    """

    spec: str
    pass_fds: tuple[int, ...] = ()

    @classmethod
    def tap(cls, fd: int) -> Netdev:
        """A tap opened by roam.network, inherited by QEMU as descriptor `fd`."""
        return cls(f"tap,fd={fd}", (fd,))

    @classmethod
    def user(cls, publish: list[PortForward]) -> Netdev:
        """QEMU's user-mode networking with host port forwards (no privileges needed)."""
        return cls("user" + "".join(
            f",hostfwd={f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}"
            for f in publish))

    @classmethod
    def detached(cls) -> Netdev:
        """A hub port leading nowhere: the NIC exists, nothing reaches it."""
        return cls("hubport,hubid=0")


def qemu_version() -> str:
    out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip()


def nic_args(mac: str, netdev: Netdev) -> list[str]:
    """A virtio NIC with MAC `mac` on `netdev`."""
    return ["-netdev", f"{netdev.spec},id=net0",
            "-device", f"virtio-net-pci,netdev=net0,mac={mac}"]


def qemu_config(config: PackageConfig, files: Path, workdir: Path, devices: Exposed,
                accel: Accel, netdev: Netdev) -> QemuConfig:
    """QEMU for the machine `config` describes, its kernel files in `files`, its sockets
    and console log in `workdir`, its memory and disk served by `devices`."""
    return QemuConfig(
        kernel=files / config.files.kernel,
        initramfs=None if config.files.initramfs is None else files / config.files.initramfs,
        cmdline=config.cmdline,
        memory_mib=config.memory_mib,
        mem_path=devices.mem_path,
        disks=[devices.disk],
        agent_socket=workdir / "agent.sock",
        qmp_socket=workdir / "qmp.sock",
        console_log=workdir / "console.log",
        accel=accel,
        cpus=config.cpus,
        machine=config.machine,
        cpu_model=config.cpu_model,
        extra_args=nic_args(config.mac, netdev),
        pass_fds=netdev.pass_fds,
        binary=QEMU_BINARY,
    )

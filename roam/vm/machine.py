"""From a package's config to a QEMU command line: the parts a snapshot and a resume share.

QEMU loads saved device state only into the same devices, so both build the machine
here; only the backends (sockets, files, port forwards) may differ between them.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from roam.vm.accel import Accel
from roam.vm.devices import Exposed
from roam.vm.package import PackageConfig
from roam.vm.qemu_cmd import QemuConfig

QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True)
class PortForward:
    """HOSTPORT:GUESTPORT or ADDR:HOSTPORT:GUESTPORT (TCP; the address defaults to loopback)."""

    host_port: int
    guest_port: int
    host_addr: str = "127.0.0.1"

    @classmethod
    def parse(cls, text: str) -> PortForward:
        match = re.fullmatch(r"(?:(.+):)?(\d+):(\d+)", text)
        if match is None:
            raise ValueError(f"{text!r}: expected HOSTPORT:GUESTPORT or ADDR:HOSTPORT:GUESTPORT")
        addr, host, guest = match.groups()
        forward = cls(int(host), int(guest), addr or "127.0.0.1")
        if not (0 < forward.host_port < 65536 and 0 < forward.guest_port < 65536):
            raise ValueError(f"{text!r}: ports are 1 to 65535")
        return forward


def qemu_version() -> str:
    out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip()


def nic_args(mac: str, publish: list[PortForward]) -> list[str]:
    """A virtio NIC on user-mode networking (slirp): the device is part of the saved
    state, the port forwards are only backend options and may change at each resume."""
    netdev = "user,id=net0" + "".join(
        f",hostfwd=tcp:{f.host_addr}:{f.host_port}-:{f.guest_port}" for f in publish)
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=net0,mac={mac}"]


def qemu_config(config: PackageConfig, files: Path, workdir: Path, devices: Exposed,
                accel: Accel, publish: list[PortForward]) -> QemuConfig:
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
        extra_args=nic_args(config.mac, publish),
        binary=QEMU_BINARY,
    )

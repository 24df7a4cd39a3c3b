"""The qemu-system-x86_64 command line for a roam guest: the building block of the runtime.

Memory is a shared file mapping (the engine exposes it), disks are files or NBD exports,
the agent talks over a virtio-serial port, the console goes to a log file, QMP to a socket.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from roam.guest.agent import PORT_NAME
from roam.hypervisor.accel import Accel


@dataclass(frozen=True)
class FileDisk:
    path: Path
    read_only: bool = False


@dataclass(frozen=True)
class NbdDisk:
    socket: Path  # a UNIX socket: QEMU's own NBD client connects to it
    export: str = ""


Disk = FileDisk | NbdDisk


def disk_from_uri(text: str) -> Disk:
    """A file path, or nbd+unix:///EXPORT?socket=PATH (the NBD URI standard's form)."""
    if not text.startswith("nbd+unix://"):
        return FileDisk(Path(text))
    uri = urllib.parse.urlsplit(text)
    socket = urllib.parse.parse_qs(uri.query).get("socket")
    if not socket:
        raise ValueError(f"{text}: an nbd+unix URI needs ?socket=PATH")
    return NbdDisk(Path(socket[0]), uri.path.removeprefix("/"))


@dataclass
class QemuConfig:
    kernel: Path
    initramfs: Path | None
    cmdline: str
    memory_mib: int
    mem_path: Path  # guest RAM: memory-backend-file, share=on
    disks: list[Disk]  # the first is the root disk, /dev/vda
    agent_socket: Path
    qmp_socket: Path
    console_log: Path
    accel: Accel
    cpus: int = 1
    machine: str = "q35"
    cpu_model: str | None = None  # a QEMU named model; default host (KVM) or max (TCG)
    extra_args: list[str] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()  # descriptors extra_args name (a tap's), kept open for QEMU
    binary: str = "qemu-system-x86_64"


def _escape(value: Path | str) -> str:
    """QEMU's option syntax: a comma inside a value is written twice."""
    return str(value).replace(",", ",,")


def _blockdev(index: int, disk: Disk) -> str:
    if isinstance(disk, FileDisk):
        file: dict[str, object] = {"driver": "file", "filename": str(disk.path)}
    else:
        file = {"driver": "nbd", "server": {"type": "unix", "path": str(disk.socket)},
                "export": disk.export}
    node = {"driver": "raw", "node-name": f"disk{index}", "file": file,
            "read-only": isinstance(disk, FileDisk) and disk.read_only}
    return json.dumps(node)


def qemu_argv(config: QemuConfig) -> list[str]:
    cpu = config.cpu_model or ("host" if config.accel.name == "kvm" else "max")
    argv = [
        config.binary,
        "-nodefaults", "-nographic", "-no-reboot",
        "-machine", f"{config.machine},memory-backend=mem0",
        "-accel", config.accel.name,
        "-cpu", cpu,
        "-smp", str(config.cpus),
        "-m", f"{config.memory_mib}M",
        "-object", f"memory-backend-file,id=mem0,size={config.memory_mib}M,"
                   f"mem-path={_escape(config.mem_path)},share=on",
        "-kernel", str(config.kernel),
        "-append", config.cmdline,
        "-chardev", f"file,id=console0,path={_escape(config.console_log)}",
        "-serial", "chardev:console0",
        "-chardev", f"socket,id=qmp0,path={_escape(config.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={_escape(config.agent_socket)},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={PORT_NAME}",
    ]
    if config.initramfs is not None:
        argv += ["-initrd", str(config.initramfs)]
    for index, disk in enumerate(config.disks):
        argv += ["-blockdev", _blockdev(index, disk),
                 "-device", f"virtio-blk-pci,drive=disk{index}"]
    return argv + config.extra_args

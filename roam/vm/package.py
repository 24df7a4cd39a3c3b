"""The package: a snapshot on disk, and config.json, its schema (docs/PACKAGE.md).

A package directory holds everything needed to resume a VM where it was paused: the
kernel and initramfs it booted, its root disk, its memory, its device state and this
config. The registry, peer and terminator read the same layout.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from roam.errors import RoamError
from roam.hypervisor.driver import MachineSpec

FORMAT: Literal[1] = 1
CONFIG = "config.json"
KERNEL = "vmlinuz"
INITRAMFS = "initramfs.img"
DISK = "disk.img"
MEMORY = "memory.img"
STATE = "state.img"


class PackageError(RoamError):
    """A package is missing, incomplete, corrupt or of an unknown format."""


class PackageFiles(BaseModel):
    """File names inside the package directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: str = KERNEL
    initramfs: str | None = INITRAMFS
    disk: str = DISK
    memory: str = MEMORY
    state: str = STATE

    def names(self) -> list[str]:
        return [n for n in (self.kernel, self.initramfs, self.disk, self.memory, self.state)
                if n is not None]


class HypervisorRef(BaseModel):
    """The driver (roam.hypervisor) that saved the device state, and its version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str


class PackageConfig(BaseModel):
    """config.json: how to start the machine so that the saved device state fits it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = FORMAT
    created: datetime.datetime
    blueprint: str = Field(description="hash of the blueprint the guest booted")
    cmdline: str
    memory_mib: int = Field(gt=0)
    cpus: int = Field(gt=0)
    machine: str
    cpu_model: str = Field(description="the -cpu value the guest saw")
    accel: Literal["kvm", "tcg"] = Field(description="accelerator of the snapshot")
    hypervisor: HypervisorRef | None = Field(
        default=None, description="absent in packages made before drivers were recorded: "
                                  "those are QEMU's, with its version in qemu_version")
    qemu_version: str | None = None
    mac: str
    state_size: int = Field(gt=0, description="bytes allocated for the state device")
    disk_size: int = Field(gt=0)
    files: PackageFiles = PackageFiles()

    def driver(self) -> HypervisorRef:
        if self.hypervisor is not None:
            return self.hypervisor
        return HypervisorRef(name="qemu", version=self.qemu_version or "unknown")

    def machine_spec(self, files: Path) -> MachineSpec:
        """The machine to start, its kernel files in `files`."""
        return MachineSpec(
            kernel=files / self.files.kernel,
            initramfs=None if self.files.initramfs is None else files / self.files.initramfs,
            cmdline=self.cmdline, memory_mib=self.memory_mib, cpus=self.cpus,
            machine=self.machine, cpu_model=self.cpu_model, accel=self.accel, mac=self.mac)


class Package:
    """A package directory whose config parsed and whose files exist with the right sizes."""

    def __init__(self, directory: Path, config: PackageConfig) -> None:
        self.directory = directory
        self.config = config

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def memory_size(self) -> int:
        return self.config.memory_mib << 20

    @classmethod
    def load(cls, directory: Path) -> Package:
        config_path = directory / CONFIG
        try:
            config = PackageConfig.model_validate_json(config_path.read_bytes())
        except FileNotFoundError:
            raise PackageError(f"{directory}: not a package (no {CONFIG})") from None
        except (OSError, ValidationError) as exc:
            raise PackageError(f"{config_path}: {exc}") from exc
        package = cls(directory, config)
        files = config.files
        expected = {files.memory: package.memory_size, files.state: config.state_size,
                    files.disk: config.disk_size}
        for name in files.names():
            path = directory / name
            if not path.is_file():
                raise PackageError(f"{directory}: {name} is missing")
            size = path.stat().st_size
            if name in expected and size != expected[name]:
                raise PackageError(f"{path}: {size} bytes, config.json says {expected[name]}")
        return package

    def save_config(self) -> None:
        write_atomic(self.directory / CONFIG, self.config.model_dump_json(indent=2).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

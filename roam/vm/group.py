"""The VM device group: which devices make a VM, how each is tracked, where each lives in
a package, and what travels with authority. Peer, registry, terminator, mounter and
`roam run` all build and read VMs through this module.

A VM is six devices, sent in this order (the engine sends devices in group order): the
small static ones first (`vm.json`, kernel, initramfs: a destination starts its
hypervisor from them while memory still streams), then the device state, memory and
disk. Memory is tracked per 4 KiB guest page: a guest writing scattered pages would
otherwise cost a whole 64 KiB block each.

At the handover the source saves the device state into its state device *below* the
dirty tracker (so those blocks are never sent again) and sends it once, inside the
authority payload; the destination writes it into its own state device before it
loads it, so that device is right for the next hop, a terminator's package or a mount.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from roam.errors import ErrorCode, RoamError
from roam.hypervisor import device_state
from roam.network.forward import PortForward
from roam.network.overlay import OverlaySpec
from roam.storage.provider import DEFAULT_BLOCK_SIZE, Provider
from roam.vm.package import Package, PackageConfig

__all__ = ["COW_BLOCK", "ORDER", "SPEC_SIZE", "STATIC", "WRITTEN", "Authority", "Device",
           "GroupError", "VMSpec", "block_size", "package_files", "read_authority",
           "read_spec", "write_authority"]

SPEC_SIZE = 64 << 10
COW_BLOCK = 64 << 10
"""Block of the copy-on-write map over a package's files (`roam run`, peer VMs)."""
MEMORY_BLOCK = 4096


class GroupError(RoamError):
    """A device group or its payload is not a VM's (a missing or unknown device, a
    payload of another version)."""

    code = ErrorCode.BAD_REQUEST


class Device(enum.StrEnum):
    """Device names, as they appear on the wire."""

    SPEC = "vm.json"  # VMSpec: what the destination needs to start the machine the same way
    KERNEL = "kernel"
    INITRAMFS = "initramfs"
    STATE = "state"  # the hypervisor's saved device state, behind a length prefix
    MEMORY = "memory"
    DISK = "disk"


ORDER = (Device.SPEC, Device.KERNEL, Device.INITRAMFS, Device.STATE, Device.MEMORY,
         Device.DISK)
STATIC = (Device.SPEC, Device.KERNEL, Device.INITRAMFS)
"""Read once by the destination before it starts the machine; never written."""
WRITTEN = (Device.STATE, Device.MEMORY, Device.DISK)
"""Written by the running VM: copy-on-write over a package, committed by `roam run`."""


def block_size(device: str) -> int:
    return MEMORY_BLOCK if device == Device.MEMORY else DEFAULT_BLOCK_SIZE


def device(name: str) -> Device:
    """The device called `name`; GroupError for a name that is not part of a VM."""
    try:
        return Device(name)
    except ValueError:
        raise GroupError(f"unknown device {name!r} in a VM group") from None


def package_files(config: PackageConfig) -> dict[Device, str]:
    """Device -> file name in a package directory (`vm.json` is not a package file)."""
    files = config.files
    named = {Device.KERNEL: files.kernel, Device.INITRAMFS: files.initramfs,
             Device.STATE: files.state, Device.MEMORY: files.memory, Device.DISK: files.disk}
    return {dev: name for dev, name in named.items() if name is not None}


def device_sizes(package: Package) -> dict[Device, int]:
    """Sizes of the devices the VM writes, as its package's config states them."""
    config = package.config
    return {Device.STATE: config.state_size, Device.MEMORY: package.memory_size,
            Device.DISK: config.disk_size}


class VMSpec(BaseModel):
    """The `vm.json` device: the package config plus what this run added (name, port
    forwards, or the overlay segment whose gateway publishes its ports)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    config: PackageConfig
    publish: list[str] = []
    overlay: OverlaySpec | None = None

    def forwards(self) -> list[PortForward]:
        return [PortForward.parse(p) for p in self.publish]

    def device_bytes(self) -> bytes:
        """The `vm.json` device: fixed size, so that a receiver can rewrite it (a new name
        or new port forwards) and pass that on at the next hop."""
        data = self.model_dump_json().encode()
        if len(data) > SPEC_SIZE:
            raise GroupError(f"vm.json is {len(data)} bytes, more than {SPEC_SIZE}")
        return data.ljust(SPEC_SIZE, b"\0")

    @classmethod
    def from_device(cls, data: bytes) -> VMSpec:
        try:
            return cls.model_validate_json(data.rstrip(b"\0"))
        except ValidationError as exc:
            raise GroupError(f"vm.json is not a VM spec: {exc}") from None


async def read_spec(spec_device: Provider) -> VMSpec:
    return VMSpec.from_device(bytes(await spec_device.read_at(0, spec_device.size())))


class Authority(BaseModel):
    """What travels with authority, before the device state (see write_authority).

    `live` says a running VM was paused for this handover (at `stop_wall`, the source's
    wall clock); a registry serving a package sends live=False (nothing runs anywhere).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Literal[1] = 1
    live: bool
    stop_wall: float | None = None
    memory_blake3: str | None = None  # the source's memory at its pause, when checked


@dataclass(frozen=True)
class Handover:
    """An authority payload, read: the header and the device state it carried (with its
    length prefix, as the state device holds it), if any."""

    authority: Authority
    state: bytes


async def write_authority(authority: Authority, state: Provider | None) -> bytes:
    """The payload: the Authority as JSON, a NUL, then the saved device state as it sits
    in `state` (prefix included), read below any dirty tracker."""
    blob = b""
    if state is not None:
        length = await device_state.state_length(state)
        blob = bytes(await state.read_at(0, device_state.HEADER_SIZE + length))
    return b"".join((authority.model_dump_json().encode(), b"\0", blob))


def read_authority(payload: bytes) -> Handover:
    head, _, blob = payload.partition(b"\0")
    try:
        authority = Authority.model_validate_json(head)
    except ValidationError as exc:
        raise GroupError(f"authority payload is not roam's (version 1): {exc}") from None
    return Handover(authority, blob)


async def store_state(handover: Handover, state: Provider) -> None:
    """Write the device state that came with authority into the destination's state
    device (a local write: it wins over any late block of the old state)."""
    if handover.state:
        await state.write_at(0, handover.state)


def package_paths(package: Package) -> dict[Device, Path]:
    return {dev: package.path(name) for dev, name in package_files(package.config).items()}

"""What a blueprint is on disk (blueprint.json) and how its inputs are hashed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roam.errors import ErrorCode, RoamError

# Bump when the build changes in a way the other inputs do not capture.
BUILDER_VERSION = 1
MANIFEST = "blueprint.json"
KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "initramfs.img"
ROOTFS_FILE = "rootfs.ext4"
# virtio_pci/virtio_blk/ext4 for the root disk, virtio_net for eth0, virtio_console for
# the agent port; ext4 asks the crypto API for crc32c (metadata checksums) at mount time,
# and there is no modprobe to answer that request, so crc32c is loaded up front.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console",
                     "crc32c_generic", "ext4")
DEFAULT_CMDLINE = "console=ttyS0 root=/dev/vda rw panic=-1 loglevel=4 edd=off"


class BlueprintError(RoamError):
    """A blueprint could not be built or loaded; the message says why and what to do."""

    code = ErrorCode.BAD_REQUEST


def inputs_hash(inputs: dict[str, Any]) -> str:
    """Stable hash of the build inputs: the cache key."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Blueprint:
    """A built blueprint: the files to boot and the kernel command line to boot them with."""

    directory: Path
    kernel: Path
    initramfs: Path | None
    rootfs: Path
    cmdline: str
    hash: str
    manifest: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> Blueprint:
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BlueprintError(f"{path}: not a blueprint ({exc})") from exc
        initramfs = manifest.get("initramfs")
        blueprint = cls(
            directory=directory,
            kernel=directory / manifest["kernel"],
            initramfs=directory / initramfs if initramfs else None,
            rootfs=directory / manifest["rootfs"],
            cmdline=manifest["cmdline"],
            hash=manifest["hash"],
            manifest=manifest,
        )
        for part in (blueprint.kernel, blueprint.initramfs, blueprint.rootfs):
            if part is not None and not part.is_file():
                raise BlueprintError(f"{directory}: {part.name} is missing")
        return blueprint

"""A tiny initramfs: busybox, the virtio and ext4 modules, and a script that finds the root.

Written as a newc cpio by hand (entries sorted, mtime 0) so the build needs no cpio tool
and the image is byte-for-byte reproducible.
"""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

# busybox applets the init script uses (symlinks in /bin).
APPLETS = ("sh", "mount", "umount", "insmod", "sleep", "cat", "echo", "poweroff",
           "switch_root")

INIT_SCRIPT = """#!/bin/sh
# roam initramfs: load the drivers, mount the root disk, hand over to its init.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
fail() { echo "roam-initramfs: error: $*"; sleep 1; poweroff -f; }
for module in @MODULES@; do
  insmod "/lib/modules/$module" || fail "cannot load $module"
done
root=/dev/vda
init=/sbin/roam-init
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${arg#root=}" ;;
    init=*) init="${arg#init=}" ;;
  esac
done
tries=0
while [ ! -b "$root" ]; do
  tries=$((tries + 1))
  [ "$tries" -gt 100 ] && fail "root disk $root did not appear"
  sleep 0.1
done
mount -t ext4 -o rw "$root" /newroot || fail "cannot mount $root"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
"""


class Cpio:
    """newc-format archive writer."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 0

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self._parts += [header, encoded, _pad(len(header) + len(encoded)), data, _pad(len(data))]

    def directory(self, name: str) -> None:
        self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def build_initramfs(busybox: Path, modules: list[Path], out: Path) -> None:
    """Write a gzip-compressed initramfs loading `modules` in the given order."""
    archive = Cpio()
    for directory in ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"):
        archive.directory(directory)
    # The kernel opens /dev/console before running /init: without it init has no output.
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in APPLETS:
        archive.symlink(f"bin/{applet}", "busybox")
    for module in modules:
        archive.file(f"lib/modules/{module.name}", module.read_bytes())
    script = INIT_SCRIPT.replace("@MODULES@", " ".join(m.name for m in modules))
    archive.file("init", script.encode(), 0o755)
    out.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))

"""Kernel knobs of a FUSE mount that only sysfs exposes.

The kernel gives every FUSE mount a backing-dev-info (bdi) with max_ratio 1 and
strict_limit 1: a process dirtying a mapped FUSE file is throttled to the daemon's
write-back speed as soon as it owns 1 % of the dirty limit. A guest whose memory is such a
file would run at that speed, so memory mounts raise max_ratio and drop strict_limit.
The FUSE connection's max_background bounds how many write-back requests are in flight.

Everything here is done without touching the mount itself: a stat() of the mount point
would be a FUSE request, and the daemon may not be serving yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYS_BDI = Path("/sys/class/bdi")
SYS_FUSE_CONNECTIONS = Path("/sys/fs/fuse/connections")


@dataclass(frozen=True)
class Tuning:
    """What to set on a mount's bdi and FUSE connection; None leaves the kernel default."""

    max_ratio: int | None = 40
    """Percent of the dirty limit the mount's writers may own before being throttled."""
    strict_limit: bool | None = False
    """Throttle at max_ratio even when the system as a whole is below its dirty limit."""
    read_ahead_kb: int | None = 128
    """Read-ahead (and mmap fault read-around) per request: what one guest fault fetches."""
    max_background: int | None = 64
    """Write-back requests the kernel keeps in flight to the daemon (kernel default 12)."""


def mount_device(mountpoint: Path, mountinfo: str) -> tuple[int, int]:
    """MAJ:MIN of the file system mounted at `mountpoint`, read from /proc/self/mountinfo.

    The last entry wins: that is the mount on top, the one a path lookup reaches.
    """
    wanted = _mountinfo_escape(str(mountpoint))
    found: tuple[int, int] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == wanted:
            major, minor = fields[2].split(":")
            found = (int(major), int(minor))
    if found is None:
        raise LookupError(f"nothing is mounted at {mountpoint}")
    return found


def _mountinfo_escape(path: str) -> str:
    """The kernel writes space, tab, newline and backslash in mountinfo as octal escapes."""
    for char in "\\ \t\n":
        path = path.replace(char, f"\\{ord(char):03o}")
    return path


def apply(device: tuple[int, int], tuning: Tuning) -> dict[str, str]:
    """Write the tuning to sysfs; return what was set. Failures are logged, not raised.

    A mount still works untuned (only slower), and non-root users cannot write these files.
    """
    major, minor = device
    bdi = SYS_BDI / f"{major}:{minor}"
    # FUSE names its connection directory after the kernel's dev_t (major << 20 | minor).
    conn = SYS_FUSE_CONNECTIONS / str(major << 20 | minor)
    wanted: list[tuple[Path, int | None]] = [
        (bdi / "strict_limit", None if tuning.strict_limit is None else int(tuning.strict_limit)),
        (bdi / "max_ratio", tuning.max_ratio),
        (bdi / "read_ahead_kb", tuning.read_ahead_kb),
        (conn / "max_background", tuning.max_background),
    ]
    applied: dict[str, str] = {}
    for path, value in wanted:
        if value is None:
            continue
        try:
            path.write_text(f"{value}\n")
        except OSError as e:
            # The connection directory exists only where fusectl is mounted (systemd does
            # it); its knob is a small gain, so its absence is not worth a warning.
            level = logging.INFO if not path.parent.exists() else logging.WARNING
            log.log(level, "cannot set %s to %s: %s", path, value, e.strerror or e)
            continue
        applied[f"{path.parent.name}/{path.name}"] = str(value)
    log.debug("tuned FUSE mount %d:%d: %s", major, minor, applied)
    return applied

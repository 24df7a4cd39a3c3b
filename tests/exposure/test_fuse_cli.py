"""`roam fuse mount`: serves files until SIGTERM, then flushes, unmounts and exits 0."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.exposure.helpers import mounted


def test_mount_serves_files_until_sigterm(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    backing = tmp_path / "memory.img"
    backing.write_bytes(b"\0" * (1 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "roam.cli.main", "fuse", "mount",
                             str(mnt), f"memory={backing}"], stderr=subprocess.PIPE)
    try:
        while not mounted(mnt):  # the daemon is another process: polling is safe here
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        fd = os.open(mnt / "memory", os.O_RDWR)
        try:
            with mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED) as m:
                # Still mapped and open when the daemon stops (a close would write the
                # page back itself): the daemon's own flush at exit must deliver it.
                m[8192:8197] = b"hello"
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                assert backing.read_bytes()[8192:8197] == b"hello"
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the daemon has gone
                os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert not mounted(mnt)


def test_bad_device_spec_is_rejected(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "roam.cli.main", "fuse", "mount",
                             str(tmp_path), "no-equals-sign"], capture_output=True)
    assert result.returncode == 2
    assert b"NAME=PATH" in result.stderr

"""Choosing the accelerator: KVM where the guest kernel boots under it, otherwise TCG.

A working /dev/kvm is not enough: on hosts whose KVM is PVM (`kvm_pvm`, a hypervisor
that needs no nested virtualisation) only PVM guest kernels boot, and a stock kernel
hangs silently. So roam test-boots the guest kernel under KVM once (about a second when
it works, `TEST_BOOT_SECONDS` when it does not) and remembers the answer per kernel and
host kernel in the cache. A PVM guest kernel given to `roam blueprint build --kernel`
therefore gets KVM on such hosts with nothing else to set.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from roam.errors import ErrorCode, RoamError

log = logging.getLogger("roam.hypervisor")

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
TEST_BOOT_SECONDS = 20.0
BOOTED = b"Run /init as init process"  # the kernel printed this: it got past early boot


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg", as QEMU's -accel takes it
    reason: str


def kvm_usable() -> str | None:
    """None if /dev/kvm answers, else why not."""
    try:
        with open(KVM_DEVICE, "rb", buffering=0) as kvm:
            api = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{KVM_DEVICE} is not usable ({exc.strerror})"
    if api != KVM_API_VERSION:
        return f"{KVM_DEVICE} speaks KVM API {api}, not {KVM_API_VERSION}"
    return None


def test_boot(kernel: Path, initramfs: Path | None, timeout: float = TEST_BOOT_SECONDS) -> bool:
    """Boot the kernel under KVM until it starts /init; True if it got there in time."""
    cmd = ["qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-nographic", "-no-reboot",
           "-nodefaults", "-serial", "stdio", "-kernel", str(kernel),
           "-append", "console=ttyS0 panic=-1 loglevel=7"]
    if initramfs is not None:
        cmd += ["-initrd", str(initramfs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            chunk = proc.stdout.read(65536)
            if chunk:
                seen = (seen + chunk)[-65536:]
                if BOOTED in seen:
                    return True
            else:
                time.sleep(0.05)
        return BOOTED in seen + (proc.stdout.read() or b"")
    finally:
        proc.kill()
        proc.wait()


def _cached_test_boot(kernel: Path, initramfs: Path | None, cache: Path) -> bool:
    digest = hashlib.sha256(kernel.read_bytes()).hexdigest()[:16]
    entry = cache / "accel" / f"{digest}-{platform.release()}.json"
    try:
        return bool(json.loads(entry.read_text())["kvm_boots"])
    except (OSError, ValueError, KeyError):
        pass
    started = time.monotonic()
    boots = test_boot(kernel, initramfs)
    log.info("test boot of %s under KVM: %s in %.1fs", kernel.name,
             "it boots" if boots else "it does not boot", time.monotonic() - started)
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(json.dumps({"kvm_boots": boots}))
    return boots


def choose_accel(kernel: Path, initramfs: Path | None, cache: Path) -> Accel:
    """KVM if this kernel boots under it here, else TCG (ROAM_ACCEL=kvm|tcg overrides).
    The choice and its reason are logged."""
    accel = _choose(kernel, initramfs, cache)
    log.info("accelerator: %s (%s)", accel.name, accel.reason)
    return accel


def _choose(kernel: Path, initramfs: Path | None, cache: Path) -> Accel:
    requested = os.environ.get("ROAM_ACCEL", "auto")
    if requested in ("kvm", "tcg"):
        return Accel(requested, "ROAM_ACCEL")
    if requested != "auto":
        raise RoamError(f"ROAM_ACCEL={requested!r}: expected kvm, tcg or auto",
                        code=ErrorCode.BAD_REQUEST)
    unusable = kvm_usable()
    if unusable:
        return Accel("tcg", unusable)
    if _cached_test_boot(kernel, initramfs, cache):
        return Accel("kvm", f"{kernel.name} boots under KVM here")
    pvm = " (KVM here is PVM: it needs a PVM guest kernel)" if Path(
        "/sys/module/kvm_pvm").exists() else ""
    return Accel("tcg", f"{kernel.name} did not boot under KVM{pvm}")

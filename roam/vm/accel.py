"""Choosing the accelerator: KVM where stock guest kernels run under it, otherwise TCG."""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("roam.vm")

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg", as QEMU's -accel takes it
    reason: str


def _probe(pvm_guest_kernel: bool) -> Accel:
    requested = os.environ.get("ROAM_ACCEL", "auto")
    if requested in ("kvm", "tcg"):
        return Accel(requested, "ROAM_ACCEL")
    if requested != "auto":
        raise ValueError(f"ROAM_ACCEL={requested!r}: expected kvm, tcg or auto")
    try:
        with open(KVM_DEVICE, "rb", buffering=0) as kvm:
            api = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
    except OSError as exc:
        return Accel("tcg", f"{KVM_DEVICE} is not usable ({exc.strerror})")
    if api != KVM_API_VERSION:
        return Accel("tcg", f"{KVM_DEVICE} speaks KVM API {api}, not {KVM_API_VERSION}")
    if Path("/sys/module/kvm_pvm").exists() and not pvm_guest_kernel:
        return Accel("tcg", "KVM here is PVM (kvm_pvm), which boots only PVM guest kernels")
    return Accel("kvm", f"{KVM_DEVICE} works")


def choose_accel(pvm_guest_kernel: bool = False) -> Accel:
    """KVM or TCG (ROAM_ACCEL=kvm|tcg|auto overrides); the choice and its reason are logged.

    pvm_guest_kernel says the guest kernel is built for PVM, so KVM backed by kvm_pvm can
    run it.
    """
    accel = _probe(pvm_guest_kernel)
    log.info("accelerator: %s (%s)", accel.name, accel.reason)
    return accel

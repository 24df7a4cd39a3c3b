"""What a host offers to VMs, for GET /peer: a control plane places VMs by it."""

from __future__ import annotations

import os
from pathlib import Path

from roam.hypervisor.accel import KVM_DEVICE, kvm_usable
from roam.peer.models import Accelerator, Capacity


def capacity() -> Capacity:
    meminfo = _meminfo()
    return Capacity(memory_bytes=meminfo.get("MemTotal", 0),
                    memory_available_bytes=meminfo.get("MemAvailable", 0),
                    cpus=len(os.sched_getaffinity(0)))


def accelerator() -> Accelerator:
    """Whether /dev/kvm answers. A VM still runs under the accelerator its package was
    snapshotted under, and a stock kernel may not boot under KVM even when it answers (a
    PVM host: docs/DESIGN.md), so this says what the host offers, not what a VM gets."""
    unusable = kvm_usable()
    if unusable is not None:
        return Accelerator(kvm=False, reason=unusable)
    if Path("/sys/module/kvm_pvm").exists():
        return Accelerator(kvm=True, reason=f"{KVM_DEVICE} is PVM: only PVM guest kernels "
                                            "boot under it")
    return Accelerator(kvm=True, reason=f"{KVM_DEVICE} answers")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown"


def cpu_flags() -> list[str]:
    """The CPU's feature flags (/proc/cpuinfo): what a VM's saved CPU state may use."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return sorted(value.split())
    except OSError:
        pass
    return []


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    found = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields = value.split()
            if fields and fields[0].isdigit():
                found[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    except OSError:
        pass
    return found

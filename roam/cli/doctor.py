"""`roam doctor`: what this host has and lacks for running and moving VMs.

Each check says ok, warn (works, with a cost or without a feature) or fail (roam cannot
work here until it is fixed), and what to do about it. The checks only look: they load
no module and change nothing, and all of them together take well under a second.
"""

from __future__ import annotations

import enum
import os
import platform
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from roam.blueprint import cache_root
from roam.cli.common import print_json
from roam.hypervisor.accel import kvm_usable

GIB = 1 << 30
MEMORY_FAIL, MEMORY_WARN = 1 * GIB, 2 * GIB  # a 512 MiB guest plus its page cache
DISK_FAIL, DISK_WARN = 2 * GIB, 5 * GIB  # a blueprint, a package and a run's overlays


class Status(enum.StrEnum):
    ok = "ok"
    warn = "warn"
    fail = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""  # what to do, when the status is not ok


def _char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def check_arch() -> Check:
    machine = platform.machine()
    if machine == "x86_64":
        return Check("arch", Status.ok, machine)
    return Check("arch", Status.fail, f"{machine}: roam runs x86_64 guests on x86_64 hosts",
                 "use an x86_64 host")


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", Status.ok, "running as root")
    return Check("root", Status.fail,
                 "not root: VM networks (namespaces, taps, nftables) and FUSE need root",
                 "run roam as root")


def check_fuse() -> Check:
    if not _char_device("/dev/fuse"):
        return Check("fuse", Status.fail, "no /dev/fuse: guest memory is served over FUSE",
                     "modprobe fuse; apt-get install fuse3")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return Check("fuse", Status.fail, f"/dev/fuse: {exc.strerror}", "run roam as root")
    return Check("fuse", Status.ok, "/dev/fuse")


def kvm_kind() -> str:
    """KVM, PVM (the kvm_pvm module: needs no nested virtualisation, boots only PVM guest
    kernels) or none, with the reason."""
    unusable = kvm_usable()
    if unusable is not None:
        return f"none ({unusable})"
    if Path("/sys/module/kvm_pvm").exists():
        return "PVM"
    modules = [m for m in ("kvm_intel", "kvm_amd") if Path(f"/sys/module/{m}").exists()]
    return f"KVM ({modules[0]})" if modules else "KVM"


def check_kvm() -> Check:
    kind = kvm_kind()
    tcg = "TCG (emulation: CPU-bound work several times slower, a small guest boots in ~8 s)"
    if kind.startswith("KVM"):
        return Check("kvm", Status.ok, kind)
    if kind == "PVM":
        return Check("kvm", Status.warn, f"PVM (kvm_pvm): stock guest kernels run under {tcg}",
                     "a PVM guest kernel (roam blueprint build --kernel FILE) runs under PVM")
    return Check("kvm", Status.warn, f"{kind}: guests run under {tcg}",
                 "load kvm_intel or kvm_amd (bare metal, or nested virtualisation)")


def _version_line(argv: list[str]) -> str | None:
    """The first line of `argv`'s output, or None if the program is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def check_qemu() -> Check:
    line = _version_line(["qemu-system-x86_64", "--version"])
    fix = "apt-get install qemu-system-x86 qemu-utils"
    if line is None:
        return Check("qemu", Status.fail, "no qemu-system-x86_64", fix)
    match = re.search(r"version (\d+)\.(\d+)(\S*)", line)
    version = match.group(0).removeprefix("version ") if match else line
    if shutil.which("qemu-img") is None:
        return Check("qemu", Status.fail, f"QEMU {version}, but no qemu-img", fix)
    if match is None or int(match.group(1)) < 7:
        return Check("qemu", Status.warn, f"QEMU {version}: roam is tested with 7.2",
                     "use QEMU 7.2 or later (Debian 12's)")
    return Check("qemu", Status.ok, f"QEMU {version}")


def check_nftables() -> Check:
    line = _version_line(["nft", "--version"])
    if line is None:
        return Check("nftables", Status.fail, "no nft: VM NAT and --publish need it",
                     "apt-get install nftables")
    if os.geteuid() == 0 and subprocess.run(["nft", "list", "tables"], capture_output=True,
                                            timeout=10).returncode != 0:
        return Check("nftables", Status.fail, f"{line}, but the kernel refuses nft",
                     "modprobe nf_tables")
    return Check("nftables", Status.ok, line)


def check_tun() -> Check:
    if _char_device("/dev/net/tun"):
        return Check("tun", Status.ok, "/dev/net/tun")
    return Check("tun", Status.fail, "no /dev/net/tun: every VM's NIC is a tap", "modprobe tun")


def check_vxlan() -> Check:
    if Path("/sys/module/vxlan").exists():
        return Check("vxlan", Status.ok, "vxlan loaded")
    if shutil.which("modprobe") and subprocess.run(
            ["modprobe", "--dry-run", "--quiet", "vxlan"], capture_output=True).returncode == 0:
        return Check("vxlan", Status.ok, "vxlan available (loaded on first use)")
    return Check("vxlan", Status.warn,
                 "no vxlan module: VMs that keep their connections across migrations (an "
                 "overlay, roam peer serve --underlay) cannot run; NAT networks can",
                 "install the kernel's modules (linux-image-*) or build VXLAN in")


def _meminfo(key: str) -> int | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    return None


def check_memory() -> Check:
    available = _meminfo("MemAvailable") or 0
    detail = f"{available / GIB:.1f} GiB available"
    if available < MEMORY_FAIL:
        return Check("memory", Status.fail, detail, "free memory: a 512 MiB guest needs ~1 GiB")
    if available < MEMORY_WARN:
        return Check("memory", Status.warn, detail, "room for one small guest only")
    return Check("memory", Status.ok, detail)


def check_disk() -> Check:
    where = cache_root()
    existing = next(p for p in (where, *where.parents) if p.exists())
    usage = shutil.disk_usage(existing)
    detail = f"{usage.free / GIB:.1f} GiB free for {where} (ROAM_CACHE)"
    if usage.free < DISK_FAIL:
        return Check("disk", Status.fail, detail,
                     "free space, or point ROAM_CACHE at a larger file system")
    if usage.free < DISK_WARN:
        return Check("disk", Status.warn, detail, "enough for a blueprint and a package or two")
    return Check("disk", Status.ok, detail)


CHECKS: list[Callable[[], Check]] = [
    check_arch, check_root, check_fuse, check_kvm, check_qemu, check_nftables, check_tun,
    check_vxlan, check_memory, check_disk]


def doctor(
    json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """Check this host for what roam needs: root, /dev/fuse, /dev/kvm (KVM, PVM or none:
    TCG), QEMU, nftables, tun, VXLAN, free memory and disk. One line per check; exit 1 if
    any fails."""
    checks = [check() for check in CHECKS]
    failed = any(c.status is Status.fail for c in checks)
    if json:
        print_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            fix = f" -> {c.fix}" if c.fix and c.status is not Status.ok else ""
            typer.echo(f"{c.status.value:<4}  {c.name:<{width}}  {c.detail}{fix}")
    if failed:
        raise typer.Exit(1)

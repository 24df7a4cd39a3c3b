"""Building a blueprint, or finding it in the cache under the hash of its inputs."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roam.blueprint import initramfs, kernel, rootfs
from roam.blueprint.spec import (
    BUILDER_VERSION,
    DEFAULT_CMDLINE,
    INITRAMFS_FILE,
    INITRAMFS_MODULES,
    KERNEL_FILE,
    MANIFEST,
    ROOTFS_FILE,
    Blueprint,
    BlueprintError,
    file_sha256,
    inputs_hash,
)
from roam.blueprint.tools import run

log = logging.getLogger("roam.blueprint")


@dataclass(frozen=True)
class BuildOptions:
    packages: tuple[str, ...] = rootfs.DEFAULT_PACKAGES
    disk_size_mib: int = 1024
    cmdline: str = DEFAULT_CMDLINE
    kernel: Path | None = None  # your own vmlinuz instead of Debian's
    initramfs: Path | None = None  # with kernel; without one the kernel must have virtio/ext4
    rootfs: Path | None = None  # your own ext4 root disk (it must start roam's agent)


@dataclass
class _Plan:
    """The inputs resolved to exact versions: what the cache key is computed from."""

    inputs: dict[str, Any] = field(default_factory=dict)
    packages: list[kernel.DebPackage] = field(default_factory=list)


def cache_root() -> Path:
    """~/.cache/roam, or $ROAM_CACHE."""
    return Path(os.environ.get("ROAM_CACHE") or Path.home() / ".cache" / "roam")


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _plan(options: BuildOptions) -> _Plan:
    plan = _Plan()
    plan.inputs = {"builder_version": BUILDER_VERSION, "cmdline": options.cmdline}
    if options.kernel is not None:
        plan.inputs["kernel"] = {"file_sha256": file_sha256(options.kernel)}
        plan.inputs["initramfs"] = (
            {"file_sha256": file_sha256(options.initramfs)} if options.initramfs else None)
    elif options.initramfs is not None:
        raise BlueprintError("--initramfs goes with --kernel: the Debian kernel gets ours")
    else:
        log.info("resolving the kernel and busybox-static packages")
        plan.packages = [kernel.kernel_package(), kernel.candidate(kernel.BUSYBOX)]
        plan.inputs["kernel"] = {"package": plan.packages[0].spec}
        plan.inputs["initramfs"] = {"busybox": plan.packages[1].spec,
                                    "modules": list(INITRAMFS_MODULES),
                                    "script_sha256": _text_sha256(initramfs.INIT_SCRIPT)}
    if options.rootfs is not None:
        plan.inputs["rootfs"] = {"file_sha256": file_sha256(options.rootfs)}
    else:
        plan.inputs["rootfs"] = {
            "suite": rootfs.host_suite(),
            "packages": sorted(options.packages),
            "size_mib": options.disk_size_mib,
            "excluded": list(rootfs.EXCLUDED_PATHS),
            "guest_files": {path: _text_sha256(text)
                            for path, text in rootfs.guest_sources().items()},
        }
    return plan


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Only one process builds a given blueprint at a time; the others wait and reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def copy_file(source: Path, target: Path) -> None:
    """Copy keeping holes: the root disk is mostly sparse."""
    run(["cp", "--sparse=always", "--reflink=auto", str(source), str(target)])


def _build_kernel(plan: _Plan, options: BuildOptions, work: Path, staging: Path) -> str | None:
    """Kernel and initramfs into staging; the kernel release when it is Debian's."""
    if options.kernel is not None:
        copy_file(options.kernel, staging / KERNEL_FILE)
        if options.initramfs is not None:
            copy_file(options.initramfs, staging / INITRAMFS_FILE)
        return None
    kernel_pkg, busybox_pkg = plan.packages
    trees = kernel.fetch(plan.packages, work)
    kernel_tree, busybox = trees[kernel_pkg.name], trees[busybox_pkg.name] / "bin" / "busybox"
    release = kernel.kernel_release(kernel_tree)
    shutil.copyfile(kernel_tree / "boot" / f"vmlinuz-{release}", staging / KERNEL_FILE)
    modules = kernel.module_load_order(kernel_tree, busybox, INITRAMFS_MODULES)
    log.info("initramfs: busybox and %d modules (%s)", len(modules),
             " ".join(m.name.removesuffix(".ko") for m in modules))
    initramfs.build_initramfs(busybox, modules, staging / INITRAMFS_FILE)
    shutil.rmtree(kernel_tree)
    return release


def _build_into(target: Path, plan: _Plan, options: BuildOptions, key: str) -> None:
    started = time.monotonic()
    staging = target.parent / f".{key}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left by a build that died (we hold the lock)
    work = staging / "work"
    work.mkdir(parents=True)
    try:
        release = _build_kernel(plan, options, work, staging)
        log.info("kernel ready (%.1f s)", time.monotonic() - started)
        if options.rootfs is not None:
            copy_file(options.rootfs, staging / ROOTFS_FILE)
        else:
            rootfs.build_rootfs(work, staging / ROOTFS_FILE, plan.inputs["rootfs"]["suite"],
                                list(options.packages), options.disk_size_mib)
        shutil.rmtree(work)
        manifest = {
            "format": 1,
            "hash": key,
            "kernel": KERNEL_FILE,
            "initramfs": INITRAMFS_FILE if (staging / INITRAMFS_FILE).exists() else None,
            "rootfs": ROOTFS_FILE,
            "cmdline": options.cmdline,
            "kernel_release": release,
            "inputs": plan.inputs,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("built blueprint %s in %.1f s", key, time.monotonic() - started)


def build(options: BuildOptions | None = None, out: Path | None = None,
          cache: Path | None = None) -> Blueprint:
    """The blueprint for options, built only if the cache lacks it; copied to out if given."""
    options = options or BuildOptions()
    plan = _plan(options)
    key = inputs_hash(plan.inputs)
    blueprints = (cache or cache_root()) / "blueprints"
    target = blueprints / key
    with _locked(blueprints / f"{key}.lock"):
        if (target / MANIFEST).is_file():
            log.info("blueprint %s is cached in %s", key, target)
        else:
            log.info("building blueprint %s", key)
            _build_into(target, plan, options, key)
    blueprint = Blueprint.load(target)
    if out is None:
        return blueprint
    out.mkdir(parents=True, exist_ok=True)
    for part in (blueprint.kernel, blueprint.initramfs, blueprint.rootfs,
                 target / MANIFEST):
        if part is not None:
            copy_file(part, out / part.name)
    log.info("blueprint written to %s", out)
    return Blueprint.load(out)

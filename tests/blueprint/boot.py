"""Booting a blueprint under QEMU in tests: the agent connected and its workload ready."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from roam.blueprint import Blueprint, cache_root
from roam.guest.client import GuestClient
from roam.hypervisor.accel import choose_accel
from roam.hypervisor.qemu.cmdline import Disk, QemuConfig, qemu_argv

BOOT_TIMEOUT = 240.0


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A short directory: UNIX socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="roam-bp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def booted(blueprint: Blueprint, workdir: Path, disk: Disk,
                 mem_path: Path | None = None) -> AsyncIterator[GuestClient]:
    """A guest on a file memory backend (workdir/mem unless `mem_path` says where) and
    the given root disk, its agent connected. QMP listens on workdir/qmp.sock."""
    console = workdir / "console.log"
    config = QemuConfig(
        kernel=blueprint.kernel, initramfs=blueprint.initramfs, cmdline=blueprint.cmdline,
        memory_mib=256, mem_path=mem_path or workdir / "mem", disks=[disk],
        agent_socket=workdir / "agent.sock", qmp_socket=workdir / "qmp.sock",
        console_log=console, accel=choose_accel(blueprint.kernel, blueprint.initramfs,
                                                cache_root()))
    with (workdir / "qemu.log").open("wb") as qemu_log:
        qemu = await asyncio.create_subprocess_exec(
            *qemu_argv(config), stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log)
    client: GuestClient | None = None
    try:
        client = await GuestClient.connect(config.agent_socket, timeout=30)
        ready = asyncio.create_task(client.wait_ready(BOOT_TIMEOUT))
        exited = asyncio.create_task(qemu.wait())
        await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            pytest.fail(f"QEMU exited ({qemu.returncode}) before the guest was ready:\n"
                        + (workdir / "qemu.log").read_text()
                        + console.read_text(errors="replace")[-3000:])
        exited.cancel()
        if ready.exception() is not None:
            pytest.fail(f"{ready.exception()}; console:\n"
                        + console.read_text(errors="replace")[-3000:])
        yield client
    finally:
        if client is not None:
            await client.close()
        if qemu.returncode is None:
            qemu.kill()
            await qemu.wait()

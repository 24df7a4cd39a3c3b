"""The guest blueprint: build it, boot it under QEMU, and talk to its agent."""

from __future__ import annotations

import asyncio
import gzip
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roam.blueprint import Blueprint, BlueprintError, BuildOptions, build, cache_root
from roam.blueprint.build import copy_file
from roam.blueprint.initramfs import Cpio
from roam.blueprint.spec import file_sha256
from roam.blueprint.tools import PACKAGE_OF, which
from roam.hypervisor.qemu.cmdline import FileDisk, NbdDisk, disk_from_uri
from tests.blueprint.boot import booted, short_dir


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def cpio_names(archive: bytes) -> list[str]:
    listing = subprocess.run(["busybox", "cpio", "-t"], input=archive, capture_output=True,
                             check=True)
    return listing.stdout.decode().split()


def test_cpio_writer_is_readable_by_cpio() -> None:
    archive = Cpio()
    archive.directory("bin")
    archive.file("bin/odd-length", b"abc", 0o755)
    archive.symlink("bin/link", "odd-length")
    assert cpio_names(archive.finish()) == ["bin", "bin/odd-length", "bin/link"]


def test_missing_tool_error_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PACKAGE_OF, "no-such-tool", "some-package")
    with pytest.raises(BlueprintError, match="install the Debian package some-package"):
        which("no-such-tool")


def test_disk_uris() -> None:
    assert disk_from_uri("/x/disk.img") == FileDisk(Path("/x/disk.img"))
    assert disk_from_uri("nbd+unix:///root?socket=/run/n.sock") == NbdDisk(
        Path("/run/n.sock"), "root")
    with pytest.raises(ValueError):
        disk_from_uri("nbd+unix:///root")


@pytest.mark.slow
def test_initramfs_loads_dependencies_first(blueprint: Blueprint) -> None:
    assert blueprint.initramfs is not None
    archive = gzip.decompress(blueprint.initramfs.read_bytes())
    assert {"init", "bin/busybox", "dev/console", "lib/modules/ext4.ko"} <= set(
        cpio_names(archive))
    script = archive[archive.index(b"#!/bin/sh"):].split(b"\0")[0].decode()
    order = re.search(r"for module in (.*); do", script)
    assert order is not None
    modules = order.group(1).split()
    for before, after in [("virtio_ring.ko", "virtio.ko"), ("virtio.ko", "virtio_pci.ko"),
                          ("virtio_pci_modern_dev.ko", "virtio_pci.ko"),
                          ("net_failover.ko", "virtio_net.ko"), ("jbd2.ko", "ext4.ko")]:
        assert modules.index(before) < modules.index(after)


@pytest.mark.slow
def test_second_build_comes_from_the_cache(blueprint: Blueprint, tmp_path: Path) -> None:
    started = time.monotonic()
    again = build(cache=cache_root(), out=tmp_path / "out")
    assert again.hash == blueprint.hash
    assert time.monotonic() - started < 30  # resolving versions and copying only
    assert (tmp_path / "out" / "blueprint.json").is_file()
    assert again.rootfs.stat().st_blocks * 512 < 400 << 20  # holes kept


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_boot_to_ready_and_exec(blueprint: Blueprint, workdir: Path) -> None:
    copy_file(blueprint.rootfs, workdir / "root.ext4")
    started = time.monotonic()
    async with booted(blueprint, workdir, FileDisk(workdir / "root.ext4")) as guest:
        print(f"\nboot to ready: {time.monotonic() - started:.1f} s")
        assert await guest.ping() > 0
        assert (await guest.exec(["redis-cli", "set", "k", "v"])).stdout == "OK\n"
        got = await guest.exec(["redis-cli", "get", "k"])
        assert (got.exit_code, got.stdout) == (0, "v\n")
        boot_id = await guest.exec(["cat", "/proc/sys/kernel/random/boot_id"])
        assert re.fullmatch(r"[0-9a-f-]{36}\n", boot_id.stdout)
        missing = await guest.exec("ls /nonexistent")
        assert missing.exit_code != 0 and "nonexistent" in missing.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_boot_from_an_nbd_export(blueprint: Blueprint, workdir: Path) -> None:
    copy_file(blueprint.rootfs, workdir / "root.ext4")
    socket = workdir / "nbd.sock"
    server = await asyncio.create_subprocess_exec(
        "qemu-nbd", "--persistent", "--socket", str(socket), "--format", "raw",
        "--export-name", "root", str(workdir / "root.ext4"))
    try:
        async with booted(blueprint, workdir,
                          disk_from_uri(f"nbd+unix:///root?socket={socket}")) as guest:
            assert (await guest.exec("redis-cli ping")).stdout == "PONG\n"
    finally:
        server.kill()
        await server.wait()


@pytest.mark.slow
def test_user_supplied_kernel_and_disk(blueprint: Blueprint, tmp_path: Path) -> None:
    own = build(BuildOptions(kernel=blueprint.kernel, rootfs=blueprint.rootfs),
                cache=tmp_path / "cache")
    assert own.initramfs is None and own.manifest["kernel_release"] is None
    assert own.manifest["inputs"]["rootfs"] == {"file_sha256": file_sha256(blueprint.rootfs)}
    assert own.kernel.read_bytes() == blueprint.kernel.read_bytes()
    with pytest.raises(BlueprintError, match="--initramfs goes with --kernel"):
        build(BuildOptions(initramfs=blueprint.kernel), cache=tmp_path / "cache")

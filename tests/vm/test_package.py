"""Package format, archives, state device and commit, on small fake packages (no VM)."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from roam.hypervisor import Nic, device_state
from roam.hypervisor.qemu.machine import nic_args
from roam.storage.sources import MemorySource
from roam.vm import archive
from roam.vm.group import COW_BLOCK
from roam.vm.package import Package, PackageConfig, PackageError
from roam.vm.runner import JOURNAL, MAP, UPPER, commit, recover

MIB = 1 << 20


def fake_package(directory: Path) -> Package:
    """A package with the real layout and tiny files: 1 MiB memory mostly holes."""
    directory.mkdir()
    config = PackageConfig(
        created=datetime.datetime.now(datetime.UTC), blueprint="b" * 32, cmdline="console=ttyS0",
        memory_mib=1, cpus=1, machine="q35", cpu_model="max", accel="tcg",
        qemu_version="7.2", mac="52:54:00:00:00:01", state_size=64 * 1024,
        disk_size=2 * COW_BLOCK)
    for name in ("vmlinuz", "initramfs.img"):
        (directory / name).write_bytes(name.encode() * 100)
    with (directory / "memory.img").open("wb") as f:
        f.truncate(MIB)
        f.seek(300 * 1024)
        f.write(b"guest page")
    (directory / "disk.img").write_bytes(bytes(range(256)) * (config.disk_size // 256))
    (directory / "state.img").write_bytes(bytes(config.state_size))
    package = Package(directory, config)
    package.save_config()
    return Package.load(directory)


def test_load_checks_sizes(tmp_path: Path) -> None:
    package = fake_package(tmp_path / "pkg")
    with (package.path("memory.img")).open("ab") as f:
        f.write(b"x")
    with pytest.raises(PackageError, match=r"memory\.img: .* config\.json says 1048576"):
        Package.load(package.directory)
    with pytest.raises(PackageError, match="not a package"):
        Package.load(tmp_path)


def test_archive_round_trip_keeps_holes(tmp_path: Path) -> None:
    package = fake_package(tmp_path / "pkg")
    seen: list[int] = []
    archive.create(package.directory, tmp_path / "p.tar.zst", seen.append)
    assert sum(seen) == sum(package.path(n).stat().st_size for n in
                            archive.package_files(package.directory))
    out = archive.extract(tmp_path / "p.tar.zst", tmp_path / "out")
    for name in archive.package_files(package.directory):
        assert out.path(name).read_bytes() == package.path(name).read_bytes()
    memory = out.path("memory.img").stat()
    assert memory.st_blocks * 512 <= 128 * 1024 < memory.st_size


def rewrite_archive(source: Path, target: Path, change: dict[str, bytes]) -> None:
    """Copy an archive, replacing some members' contents (a forged or damaged package)."""
    with zstandard.open(source, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar, \
            zstandard.open(target, "wb") as out, tarfile.open(fileobj=out, mode="w|") as new:
        for member in tar:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            data = change.get(member.name, data)
            member.size = len(data)
            new.addfile(member, io.BytesIO(data))


def test_extract_refuses_a_file_that_does_not_match_the_manifest(tmp_path: Path) -> None:
    package = fake_package(tmp_path / "pkg")
    archive.create(package.directory, tmp_path / "p.tar.zst")
    forged = package.path("vmlinuz").read_bytes().replace(b"vmlinuz", b"VMLINUZ", 1)
    rewrite_archive(tmp_path / "p.tar.zst", tmp_path / "bad.tar.zst", {"vmlinuz": forged})
    with pytest.raises(PackageError, match="corrupt package: vmlinuz does not match"):
        archive.extract(tmp_path / "bad.tar.zst", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_extract_refuses_a_truncated_archive(tmp_path: Path) -> None:
    package = fake_package(tmp_path / "pkg")
    archive.create(package.directory, tmp_path / "p.tar.zst")
    data = (tmp_path / "p.tar.zst").read_bytes()
    (tmp_path / "short.tar.zst").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(PackageError, match="corrupt package"):
        archive.extract(tmp_path / "short.tar.zst", tmp_path / "out")


async def test_state_device_length_prefix() -> None:
    device = MemorySource(1 * MIB)
    with pytest.raises(device_state.StateError, match="no saved state"):
        await device_state.state_length(device)
    reader = asyncio.StreamReader()
    payload = bytes(range(256)) * 3000
    reader.feed_data(payload)
    reader.feed_eof()
    assert await device_state.write_state(device, reader) == len(payload)
    assert b"".join([c async for c in device_state.read_state(device)]) == payload
    too_big = asyncio.StreamReader()
    too_big.feed_data(bytes(MIB))
    too_big.feed_eof()
    with pytest.raises(device_state.StateError, match="exceeds"):
        await device_state.write_state(device, too_big)
    with pytest.raises(device_state.StateError):  # the failed save cleared the old header
        await device_state.state_length(device)


async def test_interrupted_commit_is_finished(tmp_path: Path) -> None:
    package = fake_package(tmp_path / "pkg")
    rundir = tmp_path / "run"
    rundir.mkdir()
    for name, size in (("memory.img", MIB), ("disk.img", 2 * COW_BLOCK),
                       ("state.img", 64 * 1024)):
        upper = bytearray(size)
        upper[COW_BLOCK - 3:COW_BLOCK + 3] = b"NEWNEW"
        (rundir / (name + UPPER)).write_bytes(upper)
        written = bytearray(size // COW_BLOCK)
        written[0] = 1  # only the first block was written in the run
        (rundir / (name + MAP)).write_bytes(written)
    (package.path(JOURNAL)).write_text(json.dumps({"run": str(rundir)}))
    await recover(package.directory)
    assert not package.path(JOURNAL).exists()
    disk = package.path("disk.img").read_bytes()
    assert disk[COW_BLOCK - 3:COW_BLOCK + 3] == b"NEW" + bytes(range(3))
    assert await commit(package, rundir) == 2 * COW_BLOCK + 64 * 1024  # idempotent

    (package.path(JOURNAL)).write_text(json.dumps({"run": str(tmp_path / "gone")}))
    with pytest.raises(PackageError, match="restore the package from its archive"):
        await recover(package.directory)


def test_nic_backends() -> None:
    """A tap is handed over by descriptor; snapshots use a backend that saves no state of
    its own (a hub port leading nowhere)."""
    mac = "52:54:00:00:00:01"
    assert nic_args(mac, Nic.tap(7)) == ["-netdev", "tap,fd=7,id=net0",
                                         "-device", f"virtio-net-pci,netdev=net0,mac={mac}"]
    assert nic_args(mac, Nic.detached())[1] == "hubport,hubid=0,id=net0"

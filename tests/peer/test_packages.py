"""The peer's index of held packages: digests per chunk, cached on disk, and what a
migration saves with them (a destination that holds the package is sent only changes)."""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
from pathlib import Path

import blake3
import pytest

from roam.migration.content import CHUNK, ContentDigests
from roam.migration.destination import Destination, NewDevice
from roam.migration.source import Source, SourceDevice
from roam.migration.wire import DeviceSpec
from roam.peer import packages
from roam.peer.packages import HeldPackages, PackageIndex, package_id
from roam.storage.sources import FileSource, MemorySource
from roam.vm.package import Package, PackageConfig
from tests.migration.conftest import MakePair, socket_pair
from tests.vm.conftest import ROAM

__all__ = ["socket_pair"]  # the fixture, for this module

MEMORY = 1 << 20
DISK = 2 << 20


def make_package(directory: Path) -> Package:
    """A small package: memory and disk half random, half zero."""
    directory.mkdir()
    config = PackageConfig(
        created=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), blueprint="b" * 32,
        cmdline="", memory_mib=MEMORY >> 20, cpus=1, machine="q35", cpu_model="max",
        accel="tcg", qemu_version="9", mac="52:54:00:00:00:01", state_size=4096,
        disk_size=DISK)
    package = Package(directory, config)
    package.save_config()
    files = config.files
    for name, size in ((files.memory, MEMORY), (files.disk, DISK)):
        (directory / name).write_bytes(os.urandom(size // 2) + bytes(size - size // 2))
    (directory / files.state).write_bytes(bytes(4096))
    for name in (files.kernel, files.initramfs):
        assert name is not None
        (directory / name).write_bytes(b"k")
    return Package.load(directory)


async def test_index_digests_chunks_and_finds_by_package(tmp_path: Path) -> None:
    package = make_package(tmp_path / "pkg")
    index = PackageIndex(tmp_path / "cache")
    ident = await index.add(package.directory)
    assert ident == package_id(package.config) and index.packages() == [ident]
    held = index.lookup(ident, "disk", DISK)
    assert held is not None and held.path == package.path(package.config.files.disk)
    data = held.path.read_bytes()
    want = [blake3.blake3(data[i : i + CHUNK]).digest() for i in range(0, DISK // 2, CHUNK)]
    assert list(held.digests.digests) == want + [None] * (DISK // 2 // CHUNK)  # zero: None
    assert index.lookup(ident, "disk", DISK + 1) is None  # another size: not this file
    assert index.lookup("other", "disk", DISK) is None
    assert index.lookup(ident, "memory", MEMORY) is not None


async def test_index_hashes_each_file_version_once(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    package = make_package(tmp_path / "pkg")
    hashed: list[Path] = []
    real = packages.digest_file

    def counting(path: Path, chunk: int = CHUNK) -> ContentDigests:
        hashed.append(path)
        return real(path, chunk)

    monkeypatch.setattr(packages, "digest_file", counting)
    await PackageIndex(tmp_path / "cache").add(package.directory)
    assert len(hashed) == 2  # memory and disk
    again = PackageIndex(tmp_path / "cache")  # a restarted peer: from the cache
    ident = await again.add(package.directory)
    assert len(hashed) == 2
    disk = package.path(package.config.files.disk)
    disk.write_bytes(os.urandom(DISK))  # a new version of the file: hashed again
    await again.add(package.directory)
    assert hashed[2:] == [disk]
    held = again.lookup(ident, "disk", DISK)
    assert held is not None and None not in held.digests.digests
    for cached in (tmp_path / "cache").iterdir():  # a torn cache file is not trusted
        cached.write_bytes(cached.read_bytes()[:-1])
    await PackageIndex(tmp_path / "cache").add(package.directory)
    assert len(hashed) == 5


async def _migrate(pair: MakePair, content: bytes, made: NewDevice, block_size: int
                   ) -> tuple[int, bytes]:
    source = MemorySource(len(content))
    await source.write_at(0, content)
    device = SourceDevice.stack("dev", source, block_size)

    async def make(spec: DeviceSpec) -> NewDevice:
        return made

    src_ch, dst_ch = await pair()
    destination = Destination(dst_ch, make)
    result, _ = await asyncio.gather(Source(src_ch, [device]).run(), destination.run())
    received = bytes(await destination.devices["dev"].read_at(0, len(content)))
    return result.bytes_sent, received


async def test_a_destination_holding_the_package_gets_only_what_changed(
        tmp_path: Path, socket_pair: MakePair) -> None:
    """Disk (64 KiB blocks) and memory (4 KiB pages) alike: chunks that still match the
    package are named, not sent, and the destination ends with the source's content."""
    package = make_package(tmp_path / "pkg")
    index = PackageIndex(tmp_path / "cache")
    ident = await index.add(package.directory)
    for device, size, block_size in (("disk", DISK, 64 * 1024), ("memory", MEMORY, 4096)):
        held = index.lookup(ident, device, size)
        assert held is not None
        content = bytearray(held.path.read_bytes())
        content[5000:5010] = b"new data!!"  # one page changed in the first chunk
        content[-3 * CHUNK : -3 * CHUNK + 4096] = os.urandom(4096)  # one in a zero chunk
        copy = tmp_path / f"{device}.copy"
        copy.write_bytes(held.path.read_bytes())
        made = NewDevice(FileSource(copy), fresh=False, existing=True, digests=held.digests)
        sent, received = await _migrate(socket_pair, bytes(content), made, block_size)
        assert received == bytes(content)
        # Two changed chunks' worth of data at most, plus framing and HAVE proofs.
        assert sent < 2 * CHUNK + size // 64, (device, sent)
        without, received = await _migrate(socket_pair, bytes(content),
                                           NewDevice(MemorySource(size)), block_size)
        assert received == bytes(content) and without > size // 2


async def test_stale_digests_are_caught_by_the_destination(
        tmp_path: Path, socket_pair: MakePair) -> None:
    """Digests that no longer describe the local copy (the file changed after indexing):
    the destination's check of its own data fails, it asks again, the copy is right."""
    package = make_package(tmp_path / "pkg")
    index = PackageIndex(tmp_path / "cache")
    ident = await index.add(package.directory)
    held = index.lookup(ident, "disk", DISK)
    assert held is not None
    content = held.path.read_bytes()
    copy = tmp_path / "disk.copy"
    copy.write_bytes(os.urandom(CHUNK) + content[CHUNK:])  # differs from the digests
    made = NewDevice(FileSource(copy), fresh=False, existing=True, digests=held.digests)
    _, received = await _migrate(socket_pair, content, made, 64 * 1024)
    assert received == content


async def test_held_packages_offer_by_id_while_the_directory_holds_it(tmp_path: Path) -> None:
    """A peer's record: held/ID names the directory; an id that is not one, a package
    moved away, or another package in its place is not offered."""
    package = make_package(tmp_path / "pkg")
    held = HeldPackages(tmp_path / "state" / "packages")
    ident = held.hold(package.directory)
    assert held.held() == {ident: package.directory.resolve()}
    assert oct((tmp_path / "state" / "packages").stat().st_mode & 0o777) == "0o700"
    offered = await held.offer(ident, "memory", MEMORY)
    assert offered is not None and offered.path == package.path(package.config.files.memory)
    assert await held.offer(ident, "disk", DISK + 4096) is None  # not this device's size
    assert await held.offer("../" + ident[3:], "disk", DISK) is None  # never a path
    assert await held.offer("f" * 32, "disk", DISK) is None  # not held
    again = HeldPackages(tmp_path / "state" / "packages")  # a restarted peer still holds it
    assert await again.offer(ident, "disk", DISK) is not None
    config = package.config.model_copy(update={"cpus": 2})  # another package in its place
    Package(package.directory, config).save_config()
    assert await again.offer(ident, "disk", DISK) is None
    package.directory.rename(tmp_path / "moved")  # gone from where it was recorded
    assert await again.offer(ident, "disk", DISK) is None


def test_serve_refuses_a_package_that_is_not_one(tmp_path: Path) -> None:
    """`roam peer serve --package DIR`: a usage error in one line, nothing started."""
    done = subprocess.run([*ROAM, "peer", "serve", "--listen", f"unix://{tmp_path}/p.mig",
                           "--state-dir", str(tmp_path / "state"), "--package",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "--package" in done.stderr and "not a package" in done.stderr
    assert not (tmp_path / "state").exists()

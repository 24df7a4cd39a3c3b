"""A Linux guest on both exposures at once, as the QEMU driver sets it up
(roam.hypervisor.qemu.exposure).

The blueprint guest boots with its memory on a FUSE file and its root disk served by our
own NBD server (QEMU's built-in NBD client connects over a UNIX socket). Both devices are
engine stacks whose every block is tracked, so the test sees what the guest changed:

- a write in the guest (a redis value, a file on the root disk, sync) reaches the memory
  device after a flush, in blocks the dirty tracker reports, and reaches the disk over NBD;
- after a QMP stop and a flush, the memory device holds exactly the guest's RAM as QMP
  pmemsave dumps it.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from roam.blueprint import Blueprint
from roam.blueprint.build import copy_file
from roam.hypervisor.qemu.exposure import exposed
from roam.storage.dirty import DirtyTracker
from roam.storage.metrics import Metrics
from roam.storage.provider import DEFAULT_BLOCK_SIZE
from roam.storage.sources import FileSource
from roam.storage.volatility import VolatilityMonitor
from tests.blueprint.boot import booted, short_dir
from tests.exposure.helpers import ram_ranges

BLOCK = DEFAULT_BLOCK_SIZE  # what the runtime tracks devices in
RAM = 256 << 20  # booted() gives the guest 256 MiB

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no /dev/fuse"),
]

@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir() as path:  # UNIX socket paths must stay short
        yield path


def tracked_stack(source: FileSource) -> tuple[Metrics, DirtyTracker]:
    """The stack a VM device has (Metrics over the usual migration stack), every block
    tracked as if the migrator had read the whole device already."""
    tracker = DirtyTracker(VolatilityMonitor(source, BLOCK), BLOCK)
    return Metrics(tracker), tracker


async def track_all(tracker: DirtyTracker) -> None:
    await tracker.read_tracked(0, tracker.size())


async def blocks_holding(source: FileSource, needle: bytes,
                         blocks: list[int] | None = None) -> set[int]:
    """The blocks (of the given ones, or of the whole device) that hold all of `needle`."""
    found: set[int] = set()
    if blocks is None:
        data = bytes(await source.read_at(0, source.size()))
        at = data.find(needle)
        while at >= 0:
            if at // BLOCK == (at + len(needle) - 1) // BLOCK:
                found.add(at // BLOCK)
            at = data.find(needle, at + 1)
        return found
    for block in blocks:
        length = min(BLOCK, source.size() - block * BLOCK)
        if needle in bytes(await source.read_at(block * BLOCK, length)):
            found.add(block)
    return found


async def test_guest_on_fuse_memory_and_nbd_disk(blueprint: Blueprint, workdir: Path,
                                                 tmp_path: Path) -> None:
    memory_source = FileSource(tmp_path / "memory.img", RAM, create=True)
    memory, memory_tracker = tracked_stack(memory_source)
    copy_file(blueprint.rootfs, tmp_path / "root.ext4")  # sparse copy
    disk_source = FileSource(tmp_path / "root.ext4")
    disk, disk_tracker = tracked_stack(disk_source)
    await track_all(memory_tracker)
    await track_all(disk_tracker)
    token = f"roam-{secrets.token_hex(16)}"  # in no guest memory or disk before the exec

    try:
        async with exposed(workdir, memory, disk) as exp, \
                booted(blueprint, workdir, exp.disk, mem_path=exp.mem_path) as guest:
            # Booting went through both exposures: the root disk was read (and written:
            # the journal, redis) over NBD, and the guest's memory reaches the device.
            assert disk.stats.reads.bytes > 1 << 20
            await exp.flush_memory()
            booted_dirty = memory_tracker.sync()
            assert len(booted_dirty) > 16, "booting wrote little memory"
            disk_tracker.sync()
            disk_writes = disk.stats.writes.bytes

            # The guest writes: a redis value (memory) and a file on the root disk.
            assert (await guest.exec(["redis-cli", "set", "k", token])).stdout == "OK\n"
            wrote = await guest.exec(f"yes {token} | head -c 1048576 > /root/marker && sync")
            assert wrote.exit_code == 0, wrote.stderr

            # The flush delivers those pages, and the tracker reports their blocks:
            # every block of the memory device that holds the token was written after
            # the previous sync, so it is in this one.
            await exp.flush_memory()
            dirty = memory_tracker.sync()
            holding = await blocks_holding(memory_source, token.encode())
            print(f"\nmemory: {len(booted_dirty)} blocks dirty after boot, {len(dirty)} "
                  f"after the writes ({len(holding)} hold the token); {BLOCK} B blocks")
            assert dirty
            assert holding, "the token never reached the memory device"
            assert holding <= set(dirty)

            # The file reached the disk over NBD: in the blocks the tracker reports.
            disk_dirty = disk_tracker.sync()
            disk_holding = await blocks_holding(disk_source, token.encode(), disk_dirty)
            print(f"disk: {disk.stats.writes.bytes - disk_writes} B written over NBD, "
                  f"{len(disk_dirty)} blocks dirty, {len(disk_holding)} hold the token; "
                  f"{disk.stats.flushes.ops} flushes")
            assert disk.stats.writes.bytes - disk_writes >= 1 << 20
            assert len(disk_holding) >= (1 << 20) // BLOCK - 1
            assert disk.stats.flushes.ops > 0
            # And reads back over NBD as written, once the guest's page cache is gone.
            marker = ((token + "\n").encode() * ((1 << 20) // len(token) + 1))[:1 << 20]
            read = disk.stats.reads.bytes
            back = await guest.exec("echo 3 > /proc/sys/vm/drop_caches && md5sum /root/marker")
            assert back.stdout.split()[0] == hashlib.md5(marker).hexdigest(), back
            assert disk.stats.reads.bytes - read >= 1 << 20

            # Stopped, and flushed: the device is the guest's memory, byte for byte.
            qmp = QMPClient("roam-test")
            await qmp.connect(str(workdir / "qmp.sock"))
            try:
                await qmp.execute("stop")
                await exp.flush_memory()
                ranges = await ram_ranges(qmp, "mem0")
                compared = 0
                for address, length, offset in ranges:
                    dump = tmp_path / f"ram-{address:x}"
                    await qmp.execute("pmemsave", {"val": address, "size": length,
                                                   "filename": str(dump)})
                    guest_ram = dump.read_bytes()
                    dump.unlink()
                    device = bytes(await memory_source.read_at(offset, length))
                    assert guest_ram == device, f"RAM at {address:#x}+{length:#x} differs"
                    compared += length
            finally:
                await qmp.disconnect()
            print(f"compared {compared} B of RAM in {len(ranges)} ranges with pmemsave")
            assert compared > RAM * 9 // 10
    finally:
        await memory_source.close()
        await disk_source.close()

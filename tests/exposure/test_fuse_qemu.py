"""QEMU runs with its guest memory on a FUSE file: memory-backend-file,share=on.

The guest is the firmware alone (SeaBIOS finding nothing to boot): it already writes RAM,
which is all that the memory path needs. After a stop and a flush, the device must hold
exactly the guest's memory as QMP pmemsave dumps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from roam.exposure.fuse import FuseMount
from roam.storage.sources import MemorySource
from tests.exposure.helpers import PAGE, Recorder, mounted, ram_ranges

RAM = 128 << 20

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")




@asynccontextmanager
async def qemu(mem_path: Path, qmp_socket: Path) -> AsyncIterator[QMPClient]:
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-machine", "q35,accel=tcg,memory-backend=mem",
        "-m", "128M", "-object",
        f"memory-backend-file,id=mem,size=128M,mem-path={mem_path},share=on",
        "-nodefaults", "-nographic", "-display", "none", "-serial", "none",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    qmp = QMPClient("roam-test")
    try:
        while not qmp_socket.exists():
            if proc.returncode is not None:
                assert proc.stderr is not None
                pytest.fail(f"qemu exited: {(await proc.stderr.read()).decode()}")
            await asyncio.sleep(0.05)
        await qmp.connect(str(qmp_socket))
        yield qmp
        await qmp.execute("quit")
        assert await proc.wait() == 0
    finally:
        with contextlib.suppress(EOFError):  # QEMU closed the socket as it exited
            await qmp.disconnect()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_guest_memory_on_a_fuse_file(mnt: Path, tmp_path: Path) -> None:
    rec = Recorder(MemorySource(RAM))
    async with FuseMount(mnt, {"memory": rec}) as m, \
            qemu(m.path("memory"), tmp_path / "qmp.sock") as qmp:
        # The firmware writes RAM as soon as it runs; wait for its first dirty pages.
        for _ in range(600):
            await m.flush("memory")
            if rec.pages:
                break
            await asyncio.sleep(0.05)
        assert rec.pages, "no guest write reached the device"

        await qmp.execute("stop")
        await m.flush("memory")
        ranges = await ram_ranges(qmp, "mem")
        assert sum(length for _, length, _ in ranges) > RAM // 2
        for address, length, offset in ranges:
            dump = tmp_path / f"ram-{address:x}"
            await qmp.execute("pmemsave", {"val": address, "size": length,
                                           "filename": str(dump)})
            guest = dump.read_bytes()
            device = bytes(await rec.inner.read_at(offset, length))
            assert guest == device, f"RAM at {address:#x}+{length:#x} differs"
        # The pages delivered hold what the firmware wrote, not zeroes.
        written = [bytes(await rec.inner.read_at(page * PAGE, PAGE)) for page in rec.pages]
        assert any(page != bytes(PAGE) for page in written)
    assert not mounted(mnt)

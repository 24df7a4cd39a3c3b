"""FuseMount: devices as files, mapped MAP_SHARED by other processes.

Every access to the mount happens in a child process (or a worker thread): the daemon's
own loop thread would wait on requests that only it can serve.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roam.exposure.fuse import FuseMount, Tuning, mount
from roam.exposure.fuse.tuning import mount_device
from roam.storage.provider import Buffer
from roam.storage.sources import MemorySource
from tests.exposure.helpers import PAGE, Recorder, mounted


class Waiting(MemorySource):
    """A post-copy device: reads wait until the data is released."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reading = asyncio.Event()
        self.arrived = asyncio.Event()

    async def read_at(self, offset: int, length: int) -> Buffer:
        self.reading.set()
        await self.arrived.wait()
        return await super().read_at(offset, length)


# A child that maps the file shared and, for each line "P1 P2 ..." on stdin, writes to
# those pages a pattern naming the page and the round, then answers "ok". "fsync" on a line
# fsyncs from the child itself.
MAPPER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
for rnd, line in enumerate(sys.stdin):
    if line.strip() == "fsync":
        os.fsync(fd)
    else:
        for page in map(int, line.split()):
            m[page * 4096:(page + 1) * 4096] = f"{page}:{rnd}".encode().ljust(4096, b".")
    print("ok", flush=True)
"""


def pattern(page: int, rnd: int) -> bytes:
    return f"{page}:{rnd}".encode().ljust(PAGE, b".")


class Mapper:
    """Drives a MAPPER child."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, path: Path) -> Mapper:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", MAPPER, str(path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return cls(proc)

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        assert await self.proc.stdout.readline() == b"ok\n"

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert await self.proc.wait() == 0


async def read_in_child(path: Path, offset: int, length: int) -> asyncio.subprocess.Process:
    code = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "sys.stdout.buffer.write(os.pread(fd, int(sys.argv[3]), int(sys.argv[2])))")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(path), str(offset), str(length),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_mmap_writes_reach_the_provider_after_fsync(mnt: Path) -> None:
    rec = Recorder(MemorySource(4 << 20))
    pages = [0, 1, 77, 1023]
    async with FuseMount(mnt, {"mem": rec}) as m:
        assert await asyncio.to_thread(os.path.getsize, m.path("mem")) == 4 << 20
        mapper = await Mapper.start(m.path("mem"))
        await mapper.send(" ".join(map(str, pages)))
        await mapper.send("fsync")
        assert rec.take() == set(pages)
        assert rec.flushes >= 1  # fsync reaches the provider's own flush
        await mapper.close()
    data = bytes(await rec.inner.read_at(0, rec.size()))
    for page in range(rec.size() // PAGE):
        expect = pattern(page, 0) if page in pages else bytes(PAGE)
        assert data[page * PAGE:(page + 1) * PAGE] == expect, page
    assert not mounted(mnt)


async def test_flush_delivers_every_page_written_since_the_previous_flush(mnt: Path) -> None:
    rec = Recorder(MemorySource(8 << 20))
    rounds = [[3, 4, 5, 900], [4, 6, 1500, 2047], [2047]]
    async with FuseMount(mnt, {"mem": rec}) as m:
        mapper = await Mapper.start(m.path("mem"))
        for rnd, pages in enumerate(rounds):
            await mapper.send(" ".join(map(str, pages)))
            await m.flush("mem")  # fsync from this process, in a worker thread
            assert rec.take() == set(pages)
            for page in pages:
                assert bytes(await rec.inner.read_at(page * PAGE, PAGE)) == pattern(page, rnd)
        await m.flush("mem")
        assert rec.take() == set()  # nothing written, nothing delivered
        await mapper.close()


async def test_a_waiting_read_does_not_stop_other_files(mnt: Path) -> None:
    slow = Waiting(1 << 20)
    await slow.write_at(8192, b"late data")
    fast = MemorySource(1 << 20)
    await fast.write_at(4096, b"ready data")
    async with FuseMount(mnt, {"slow": slow, "fast": fast}) as m:
        blocked = await read_in_child(m.path("slow"), 8192, 9)
        await slow.reading.wait()
        reader = await read_in_child(m.path("fast"), 4096, 10)
        out, _ = await reader.communicate()
        assert out == b"ready data"
        assert blocked.returncode is None  # still waiting for its block
        slow.arrived.set()
        out, _ = await blocked.communicate()
        assert out == b"late data"


async def test_unmount_fails_reads_stuck_at_exit(mnt: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount, "SHUTDOWN_GRACE", 0.1)
    slow = Waiting(1 << 20)
    async with FuseMount(mnt, {"slow": slow}) as m:
        blocked = await read_in_child(m.path("slow"), 0, 4096)
        await slow.reading.wait()
    _, err = await blocked.communicate()
    # EIO; or, where the kernel retried the read once the session had ended, ECONNABORTED
    # or ENOTCONN. Never a hang, never data.
    assert blocked.returncode != 0
    assert any(f"[Errno {e}]".encode() in err
               for e in (errno.EIO, errno.ECONNABORTED, errno.ENOTCONN)), err
    assert not mounted(mnt)


async def test_an_error_in_the_block_unmounts_and_propagates(mnt: Path) -> None:
    with pytest.raises(ZeroDivisionError):
        async with FuseMount(mnt, {"mem": MemorySource(PAGE)}):
            assert mounted(mnt)
            _ = 1 / 0
    assert not mounted(mnt)


async def test_one_mount_per_process(mnt: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    async with FuseMount(mnt, {"mem": MemorySource(PAGE)}):
        with pytest.raises(RuntimeError, match="already serves"):
            async with FuseMount(other, {"mem": MemorySource(PAGE)}):
                pass
    assert not mounted(other)


async def test_listing_stat_and_plain_io(mnt: Path) -> None:
    devices = {"a": MemorySource(3 * PAGE), "b": MemorySource(PAGE + 100)}
    async with FuseMount(mnt, devices) as m:
        def io() -> tuple[list[str], int, bytes, bytes]:
            names = sorted(os.listdir(mnt))
            with open(m.path("b"), "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(PAGE + 90)
                f.write(b"0123456789")  # ends exactly at the device's end
                f.flush()
                os.fsync(f.fileno())
                f.seek(PAGE + 90)
                tail = f.read(100)  # clipped at the end of the device
                f.seek(0)
                head = f.read(4)
            return names, size, tail, head
        names, size, tail, head = await asyncio.to_thread(io)
        assert names == ["a", "b"]
        assert size == PAGE + 100
        assert tail == b"0123456789"
        assert head == bytes(4)
        assert bytes(await devices["b"].read_at(PAGE + 90, 10)) == b"0123456789"
        with pytest.raises(KeyError):
            m.path("c")


async def test_mount_is_tuned(mnt: Path) -> None:
    tuning = Tuning(max_ratio=37, strict_limit=False, read_ahead_kb=64)
    async with FuseMount(mnt, {"mem": MemorySource(PAGE)}, tuning=tuning) as m:
        major, minor = mount_device(mnt, Path("/proc/self/mountinfo").read_text())
        bdi = Path(f"/sys/class/bdi/{major}:{minor}")
        if os.geteuid() == 0:
            assert (bdi / "max_ratio").read_text().strip() == "37"
            assert (bdi / "strict_limit").read_text().strip() == "0"
            assert (bdi / "read_ahead_kb").read_text().strip() == "64"
            assert m.tuned[f"{major}:{minor}/max_ratio"] == "37"


def test_mount_device_reads_escaped_mount_points() -> None:
    info = ("36 25 0:32 / /tmp/a\\040b rw - fuse.roam roam rw\n"
            "37 25 0:33 / /tmp/other rw - tmpfs tmpfs rw\n"
            "38 36 0:34 / /tmp/a\\040b rw - fuse.roam roam rw\n")
    assert mount_device(Path("/tmp/a b"), info) == (0, 34)
    with pytest.raises(LookupError):
        mount_device(Path("/tmp/none"), info)


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """A mount must leave no task of its own behind."""
    yield
    current = asyncio.current_task()
    leftover = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not leftover, leftover

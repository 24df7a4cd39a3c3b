"""roam's NBD server through roam's client: commands, errors, exports, TLS, waiting reads."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
import trustme

from roam.exposure.nbd import protocol as p
from roam.exposure.nbd.client import NBDClient
from roam.exposure.nbd.server import Export, NBDServer
from roam.storage.dirty import DirtyTracker
from roam.storage.gate import Gate
from roam.storage.metrics import Metrics
from roam.storage.provider import Buffer
from roam.storage.sources import MemorySource
from roam.storage.volatility import VolatilityMonitor

SIZE = 4 * 1024 * 1024


class SparseMemory(MemorySource):
    """A memory device that reports which 64 KiB blocks were ever written."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.written: set[int] = set()

    async def write_at(self, offset: int, data: Buffer) -> None:
        await super().write_at(offset, data)
        self.written.update(range(offset >> 16, (offset + len(data) - 1 >> 16) + 1))

    def allocated_ranges(self, offset: int, length: int) -> Iterable[tuple[int, int]]:
        return [(b << 16, 1 << 16) for b in sorted(self.written)]


class Waiting(MemorySource):
    """Reads of the first block wait until `arrived` is set (a post-copy device)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.arrived = asyncio.Event()

    async def read_at(self, offset: int, length: int) -> Buffer:
        if offset < 65536:
            await self.arrived.wait()
        return await super().read_at(offset, length)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[NBDServer, str]]:
    vm_disk = Metrics(DirtyTracker(VolatilityMonitor(MemorySource(SIZE), 65536), 65536))
    srv = NBDServer([
        Export("disk", vm_disk),
        Export("ro", MemorySource(SIZE), read_only=True, description="read-only"),
        Export("sparse", SparseMemory(SIZE)),
        Export("waiting", Waiting(SIZE)),
    ])
    sock = str(tmp_path / "nbd.sock")
    await srv.serve_unix(sock)
    yield srv, sock
    await srv.close()


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


async def test_read_write_flush_and_flags(server: tuple[NBDServer, str]) -> None:
    _, sock = server
    async with await NBDClient.connect(uri(sock, "disk")) as c:
        assert c.size == SIZE and c.structured and c.context_id is not None
        assert c.can(p.TF_CAN_MULTI_CONN) and c.can(p.TF_SEND_FUA) and not c.read_only
        assert c.block_sizes == (1, 4096, 32 * 1024 * 1024)
        data = bytes(range(256)) * 40
        await c.write(1000, data)
        await c.write(200_000, data, fua=True)
        await c.flush()
        assert await c.read(1000, len(data)) == data
        assert await c.read(200_000 - 10, 10) == bytes(10)
        results = await asyncio.gather(*(c.read(i * 4096, 4096) for i in range(64)))
        assert b"".join(results)[1000 : 1000 + len(data)] == data


async def test_simple_replies_without_structured(server: tuple[NBDServer, str]) -> None:
    _, sock = server
    c = await NBDClient.connect(uri(sock, "disk"), structured=False)
    try:
        assert not c.structured and not c.can(p.TF_SEND_DF)
        await c.write(0, b"abc")
        assert await c.read(0, 3) == b"abc"
        with pytest.raises(p.NBDError) as err:
            await c.read(SIZE - 1, 2)
        assert err.value.errno == p.EINVAL
        with pytest.raises(p.NBDError):
            await c.block_status(0, 10)
    finally:
        await c.disconnect()


async def test_zeroes_trim_and_cache(server: tuple[NBDServer, str]) -> None:
    _, sock = server
    async with await NBDClient.connect(uri(sock, "disk")) as c:
        await c.write(0, b"\xff" * 3 * 1024 * 1024)
        await c.write_zeroes(100, 2 * 1024 * 1024)
        await c.trim(2 * 1024 * 1024 + 100, 1000, fua=True)
        await c.cache(0, 1 << 20)
        data = await c.read(0, 3 * 1024 * 1024)
        assert data[:100] == b"\xff" * 100
        assert data[100 : 100 + 2 * 1024 * 1024] == bytes(2 * 1024 * 1024)
        assert data[2 * 1024 * 1024 + 100 : 2 * 1024 * 1024 + 1100] == bytes(1000)
        assert data[2 * 1024 * 1024 + 1100 :] == b"\xff" * (len(data) - 2 * 1024 * 1024 - 1100)


async def test_errors_change_nothing(server: tuple[NBDServer, str]) -> None:
    _, sock = server
    async with await NBDClient.connect(uri(sock, "disk")) as c:
        await c.write(SIZE - 4, b"keep")
        cases = [
            (p.CMD_WRITE, 0, SIZE - 2, b"XXXX", p.ENOSPC),
            (p.CMD_WRITE_ZEROES, 0, SIZE - 2, b"", p.ENOSPC),
            (p.CMD_WRITE_ZEROES, p.CMD_FLAG_FAST_ZERO, SIZE - 4, b"", p.ENOTSUP),
            (p.CMD_WRITE, 1 << 9, SIZE - 4, b"XXXX", p.EINVAL),  # unknown flag
            (p.CMD_READ, 0, SIZE, b"", p.EINVAL),
            (p.CMD_CACHE, 0, SIZE, b"", p.EINVAL),
            (99, 0, 0, b"", p.EINVAL),
        ]
        for cmd, flags, offset, payload, errno in cases:
            with pytest.raises(p.NBDError) as err:
                await c.request_raw(cmd, flags, offset, len(payload) or 4, payload)
            assert err.value.errno == errno, (cmd, flags)
        assert await c.read(SIZE - 4, 4) == b"keep"


async def test_read_only_export(server: tuple[NBDServer, str]) -> None:
    _, sock = server
    async with await NBDClient.connect(uri(sock, "ro")) as c:
        assert c.read_only and not c.can(p.TF_SEND_TRIM)
        for attempt in (c.write(0, b"x"), c.write_zeroes(0, 10), c.trim(0, 10)):
            with pytest.raises(p.NBDError) as err:
                await attempt
            assert err.value.errno == p.EPERM
        assert await c.read(0, 1) == b"\0"


async def test_exports_listed_and_unknown_refused(server: tuple[NBDServer, str]) -> None:
    _, sock = server
    names = await NBDClient.list_exports(uri(sock, ""))
    assert names == ["disk", "ro", "sparse", "waiting"]
    with pytest.raises(p.OptionError) as err:
        await NBDClient.connect(uri(sock, "nope"))
    assert err.value.reply == p.REP_ERR_UNKNOWN
    async with await NBDClient.connect(uri(sock, "")) as c:  # the default export
        assert c.export_name == "" and c.size == SIZE


async def test_block_status_reports_holes(server: tuple[NBDServer, str]) -> None:
    _, sock = server
    async with await NBDClient.connect(uri(sock, "sparse")) as c:
        await c.write(3 * 65536 + 5, b"x")
        extents = await c.block_status(0, SIZE)
        assert [(e.length, e.flags) for e in extents] == [
            (3 * 65536, p.STATE_HOLE | p.STATE_ZERO), (65536, 0),
            (SIZE - 4 * 65536, p.STATE_HOLE | p.STATE_ZERO)]
        one = await c.block_status(3 * 65536 + 10, 100_000, req_one=True)
        assert [(e.length, e.flags) for e in one] == [(65536 - 10, 0)]
    async with await NBDClient.connect(uri(sock, "disk")) as c:  # no map: all data
        assert [(e.length, e.flags) for e in await c.block_status(0, 4096)] == [(4096, 0)]


async def test_waiting_read_does_not_block_others(server: tuple[NBDServer, str]) -> None:
    srv, sock = server
    source = srv.exports["waiting"].provider
    assert isinstance(source, Waiting)
    await source.write_at(0, b"first")
    async with await NBDClient.connect(uri(sock, "waiting")) as c:
        stuck = asyncio.ensure_future(c.read(0, 5))
        await c.write(1 << 20, b"later")
        assert await c.read(1 << 20, 5) == b"later"
        assert not stuck.done()
        source.arrived.set()
        assert await stuck == b"first"


async def test_multi_conn_flush_sees_other_connections(server: tuple[NBDServer, str]) -> None:
    _, sock = server
    a = await NBDClient.connect(uri(sock, "disk"))
    b = await NBDClient.connect(uri(sock, "disk"))
    try:
        await a.write(4096, b"from a")
        await b.flush()
        assert await b.read(4096, 6) == b"from a"
    finally:
        await a.disconnect()
        await b.disconnect()


async def test_starttls_on_tcp(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    srv = NBDServer([Export("disk", MemorySource(SIZE))], tls=server_ctx)
    tcp = await srv.serve_tcp("127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        with pytest.raises(p.OptionError) as err:
            await NBDClient.connect(f"nbd://127.0.0.1:{port}/disk")
        assert err.value.reply == p.REP_ERR_TLS_REQD
        async with await NBDClient.connect(f"nbd://127.0.0.1:{port}/disk", tls=client_ctx) as c:
            await c.write(10, b"secret" * 100_000)
            assert await c.read(10, 600_000) == b"secret" * 100_000
            assert [e.flags for e in await c.block_status(0, 10)] == [0]
    finally:
        await srv.close()


async def test_large_write_into_a_waiting_device(tmp_path: Path) -> None:
    """A streamed WRITE whose pieces wait (a locked gate) still lands whole and in order,
    and reads go on meanwhile."""
    source = MemorySource(SIZE)
    gate = Gate(source)
    srv = NBDServer([Export("", gate)])
    sock = str(tmp_path / "gate.sock")
    await srv.serve_unix(sock)
    try:
        async with await NBDClient.connect(uri(sock, "")) as c:
            await gate.lock()
            data = bytes(range(251)) * 12_000  # about 2.9 MiB, not block aligned
            writing = asyncio.ensure_future(c.write(12_345, data, fua=True))
            await asyncio.sleep(0.05)
            assert await c.read(0, 10) == bytes(10)
            assert not writing.done()
            gate.unlock()
            await writing
            assert await c.read(12_345, len(data)) == data
            assert bytes(await source.read_at(12_345 + len(data), 100)) == bytes(100)
    finally:
        await srv.close()


async def test_socket_in_use_refused_stale_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    first = NBDServer([Export("", MemorySource(4096))])
    await first.serve_unix(sock)
    try:
        with pytest.raises(OSError, match="in use"):
            await NBDServer([Export("", MemorySource(4096))]).serve_unix(sock)
    finally:
        await first.close()
    with socket.socket(socket.AF_UNIX) as stale:  # a socket file nobody listens on
        stale.bind(str(sock))
    second = NBDServer([Export("", MemorySource(8192))])
    await second.serve_unix(sock)
    try:
        async with await NBDClient.connect(f"nbd+unix:///?socket={sock}") as c:
            assert c.size == 8192
    finally:
        await second.close()
    assert not sock.exists()


async def test_close_gives_up_on_reads_that_never_finish(tmp_path: Path) -> None:
    source = Waiting(SIZE)
    srv = NBDServer([Export("", source)])
    sock = str(tmp_path / "w.sock")
    await srv.serve_unix(sock)
    client = await NBDClient.connect(uri(sock, ""))
    stuck = asyncio.ensure_future(client.read(0, 10))
    assert await client.read(1 << 20, 10) == bytes(10)
    await srv.close(grace=0.2)
    with pytest.raises(ConnectionError):
        await stuck
    await client.close()

"""NBD server: exposes storage providers as network block devices (QEMU, libnbd, fio).

Hot path design (see docs/NBD.md): one BufferedProtocol per connection receives into a
large buffer, parses every complete request in it, and runs each provider call by
driving its coroutine by hand. A call that completes without suspending (the usual case)
costs no task; its reply joins the batch, and the whole batch leaves in one writev
straight from the provider's memory. A call that really waits (post-copy reads, a locked
gate) continues in a task, so it never holds up the requests behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import struct
import types
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

from roam.exposure.nbd import protocol as p
from roam.storage.provider import Buffer, Provider

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024
"""Largest READ/WRITE accepted; advertised as the maximum block size."""
MAX_OPTION = 64 * 1024
"""Longest option payload read during the handshake; longer ones end the connection."""
HANDSHAKE_TIMEOUT = 60.0
RECV_BUFFER = 1024 * 1024
"""Receive buffer per connection: small enough to stay in cache; grows for a request
that needs more (large WRITEs are streamed, so they do not)."""
MIN_FREE = 256 * 1024
SEND_BUFFER = 4 * 1024 * 1024
"""Socket send buffer asked for, so a batch of large reads leaves in one writev."""
STREAM_MIN = 256 * 1024
"""WRITEs this large are written as their payload arrives instead of after all of it."""
STREAM_ALIGN = 64 * 1024
"""Streamed pieces end on multiples of this (the default device block size)."""
MAX_TASKS = 256
"""Suspended requests per connection before the server stops reading from it."""
CONTEXT_ID = 1
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_ZEROES = bytes(1024 * 1024)
_KNOWN_CMD_FLAGS = (
    p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_DF | p.CMD_FLAG_REQ_ONE
    | p.CMD_FLAG_FAST_ZERO
)


@runtime_checkable
class AllocationMap(Protocol):
    """Optional provider method for BLOCK_STATUS: allocated (start, length) pieces.

    Ranges outside the returned pieces read as zeroes and are reported as holes.
    Providers without it are reported fully allocated.
    """

    def allocated_ranges(self, offset: int, length: int) -> Iterable[tuple[int, int]]: ...


@runtime_checkable
class ZeroWriter(Protocol):
    """Optional provider method used by TRIM and WRITE_ZEROES instead of writing zeroes."""

    async def write_zeroes(self, offset: int, length: int) -> None: ...


@dataclass
class Export:
    """One named device on a server. multi_conn is safe: all connections share one provider,
    and a flush on any of them flushes that provider."""

    name: str
    provider: Provider
    read_only: bool = False
    description: str = ""

    def flags(self, structured: bool) -> int:
        flags = (p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA | p.TF_SEND_CACHE
                 | p.TF_CAN_MULTI_CONN)
        if structured:
            flags |= p.TF_SEND_DF  # the protocol allows DF only with structured replies
        if self.read_only:
            flags |= p.TF_READ_ONLY
        else:
            flags |= p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES
        return flags


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], pending: Any) -> Generator[Any, Any, T]:
    """Finish a coroutine that was started by hand and suspended yielding `pending`."""
    while True:
        try:
            value = yield pending
        except BaseException as exc:  # cancellation and wake-up errors go to the coroutine
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return cast(T, stop.value)
        else:
            try:
                pending = coro.send(value)
            except StopIteration as stop:
                return cast(T, stop.value)


async def _zero(provider: Provider, offset: int, length: int) -> None:
    if isinstance(provider, ZeroWriter):
        await provider.write_zeroes(offset, length)
        return
    end = offset + length
    while offset < end:
        n = min(len(_ZEROES), end - offset)
        await provider.write_at(offset, memoryview(_ZEROES)[:n])
        offset += n


async def _write_fua(provider: Provider, offset: int, data: Buffer) -> None:
    await provider.write_at(offset, data)
    await provider.flush()


async def _zero_fua(provider: Provider, offset: int, length: int) -> None:
    await _zero(provider, offset, length)
    await provider.flush()


def _error_code(exc: BaseException) -> int:
    if isinstance(exc, p.NBDError):
        return exc.errno
    if isinstance(exc, MemoryError):
        return p.ENOMEM
    return p.EIO


async def _write_after(before: asyncio.Future[Any], provider: Provider, offset: int,
                       data: Buffer) -> None:
    await before
    await provider.write_at(offset, data)


class _Stream:
    """A large WRITE whose payload is written piece by piece as it arrives."""

    __slots__ = ("cookie", "error", "failure", "flags", "offset", "remaining", "task")

    def __init__(self, cookie: int, flags: int, offset: int, length: int, error: int) -> None:
        self.cookie = cookie
        self.flags = flags
        self.offset = offset
        self.remaining = length
        self.error = error
        self.failure: Exception | None = None
        self.task: asyncio.Future[Any] | None = None


def _remove_stale_socket(path: Path) -> None:
    """Delete a socket left by a server that is gone; refuse one that still answers."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return  # not a socket: binding will fail and say so
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")


class NBDServer:
    """Serves several exports over any number of UNIX and TCP listeners.

    `tls` enables STARTTLS on TCP listeners and then requires it there; UNIX sockets are
    local and never offer TLS.
    """

    def __init__(self, exports: Iterable[Export] = (), *, tls: ssl.SSLContext | None = None
                 ) -> None:
        self.exports: dict[str, Export] = {}
        self.tls = tls
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []
        self._connections: set[_Connection] = set()
        for export in exports:
            self.add_export(export)

    def add_export(self, export: Export) -> None:
        if export.name in self.exports:
            raise ValueError(f"export {export.name!r} already exists")
        if len(export.name.encode()) > p.MAX_NAME:
            raise ValueError("export name too long")
        self.exports[export.name] = export

    def find_export(self, name: str) -> Export | None:
        """The export called `name`; the empty name means the default (first) export."""
        export = self.exports.get(name)
        if export is None and name == "" and self.exports:
            export = next(iter(self.exports.values()))
        return export

    async def serve_unix(self, path: str | Path) -> asyncio.Server:
        path = Path(path)
        _remove_stale_socket(path)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _Connection(self, None), str(path))
        self._servers.append(server)
        self._unix_paths.append(path)
        return server

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self, self.tls), host, port)
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._servers.append(server)
        return server

    async def close(self, grace: float = 10.0) -> None:
        """Stop listening, finish in-flight requests, close connections, flush exports."""
        for server in self._servers:
            server.close()
        await asyncio.gather(*(c.shutdown(grace) for c in list(self._connections)))
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._servers.clear()
        self._unix_paths.clear()
        for export in self.exports.values():
            if not export.read_only:
                await export.provider.flush()


class _Connection(asyncio.BufferedProtocol):
    """One client: the handshake as a coroutine, then transmission parsed inline."""

    def __init__(self, server: NBDServer, tls: ssl.SSLContext | None) -> None:
        self._server = server
        self._tls = tls
        self._tls_active = False
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._want = 0
        self._pinned = False  # a suspended write still holds a view of self._buf
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._fd = -1
        self._closed = False
        self._transmitting = False
        self._disconnecting = False
        self._export: Export | None = None
        self._provider: Provider | None = None
        self._size = 0
        self._read_only = False
        self._structured = False
        self._meta_export: str | None = None
        self._out: list[Buffer] = []
        self._borrowed = False
        self._stream: _Stream | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._paused_writing = False
        self._paused_tasks = False
        self._handshake_task: asyncio.Task[None] | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        if sock is not None:
            with contextlib.suppress(OSError):  # the kernel caps it at wmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._server._connections.add(self)
        self._handshake_task = asyncio.get_running_loop().create_task(self._handshake())

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server._connections.discard(self)
        self._wake(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._end < max(MIN_FREE, self._want - (self._end - self._start)):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self._transmitting:
            self._process()
        else:
            self._wake(None)

    def eof_received(self) -> bool | None:
        self._wake(ConnectionResetError("client closed the connection"))
        return None

    # buffer management

    def _compact(self) -> None:
        pending = self._end - self._start
        size = max(RECV_BUFFER, self._want + MIN_FREE, pending + MIN_FREE)
        if self._pinned or size > len(self._buf):
            new = bytearray(size)
            new[:pending] = self._view[self._start : self._end]
            self._buf = new
            self._view = memoryview(new)
            self._pinned = False
        else:
            self._view[:pending] = self._view[self._start : self._end]
        self._start = 0
        self._end = pending

    def _wake(self, exc: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    async def _recv(self, n: int) -> bytes:
        while self._end - self._start < n:
            if self._closed:
                raise ConnectionResetError("connection lost")
            self._want = n
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._view[self._start : self._start + n])
        self._start += n
        self._want = 0
        return data

    # output

    def _send(self, data: bytes) -> None:
        if not self._closed and self._transport is not None:
            self._transport.write(data)

    def _flush_out(self) -> None:
        """Send the batched replies: one writev from the buffers themselves when the
        transport has nothing queued, so borrowed provider memory is never kept."""
        out = self._out
        if not out:
            return
        self._out = []
        self._borrowed = False
        transport = self._transport
        if self._closed or transport is None:
            return
        if self._fd < 0 or transport.get_write_buffer_size():
            transport.write(b"".join(out))
            return
        try:
            for first in range(0, len(out), _IOV_MAX):
                chunk = out[first : first + _IOV_MAX]
                sent = os.writev(self._fd, chunk)
                total = sum(len(b) for b in chunk)
                if sent < total:
                    self._queue_rest(out[first:], sent)
                    return
        except BlockingIOError:
            self._queue_rest(out[first:], 0)
        except OSError:
            transport.abort()

    def _queue_rest(self, buffers: list[Buffer], sent: int) -> None:
        """Hand what the socket did not take to the transport, copied once."""
        i = 0
        while sent >= len(buffers[i]):
            sent -= len(buffers[i])
            i += 1
        rest = [memoryview(buffers[i])[sent:], *buffers[i + 1 :]]
        assert self._transport is not None
        self._transport.write(b"".join(rest))

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        if self._paused_writing or self._paused_tasks:
            transport.pause_reading()
        else:
            transport.resume_reading()

    async def shutdown(self, grace: float) -> None:
        """Stop taking requests, let in-flight ones finish (for up to `grace` seconds: a
        post-copy read may wait for a block that never comes), close the connection."""
        self._disconnecting = True
        if self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("%d requests still waiting at shutdown: cancelled", len(self._tasks))
            for task in list(self._tasks):
                task.cancel()
        if self._transport is not None and not self._closed:
            self._transport.close()

    # handshake

    async def _handshake(self) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                done = await self._negotiate()
        except (ConnectionError, p.ProtocolError, TimeoutError, ssl.SSLError) as e:
            log.debug("handshake ended: %s", e)
            done = False
        except asyncio.CancelledError:
            done = False
        if not done:
            if self._transport is not None and not self._closed:
                self._transport.close()
            return
        self._transmitting = True
        if self._end > self._start:
            self._process()

    async def _negotiate(self) -> bool:
        """Run the option haggling; True once an export is selected for transmission."""
        self._send(p.HANDSHAKE.pack(p.NBDMAGIC, p.IHAVEOPT,
                                    p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (client_flags,) = p.CLIENT_FLAGS.unpack(await self._recv(4))
        if client_flags & ~p.CLIENT_FLAGS_KNOWN:
            return False
        no_zeroes = bool(client_flags & p.FLAG_NO_ZEROES)
        while True:
            magic, option, length = p.OPTION.unpack(await self._recv(p.OPTION.size))
            if magic != p.IHAVEOPT or length > MAX_OPTION:
                return False
            data = await self._recv(length)
            if self._tls is not None and not self._tls_active and option not in (
                    p.OPT_STARTTLS, p.OPT_ABORT):
                if option == p.OPT_EXPORT_NAME:
                    return False
                self._reply(option, p.REP_ERR_TLS_REQD, b"TLS required")
                continue
            if option == p.OPT_EXPORT_NAME:
                return self._opt_export_name(data, no_zeroes)
            if option == p.OPT_ABORT:
                self._reply(option, p.REP_ACK)
                return False
            if option == p.OPT_STARTTLS:
                await self._opt_starttls(data)
            elif option in (p.OPT_GO, p.OPT_INFO):
                if self._opt_info(option, data) and option == p.OPT_GO:
                    return True
            elif option == p.OPT_LIST:
                self._opt_list(data)
            elif option == p.OPT_STRUCTURED_REPLY:
                if data:
                    self._reply(option, p.REP_ERR_INVALID, b"no payload expected")
                else:
                    self._structured = True
                    self._reply(option, p.REP_ACK)
            elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                self._opt_meta(option, data)
            else:
                self._reply(option, p.REP_ERR_UNSUP, b"option not supported")

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._send(p.OPTION_REPLY.pack(p.REPLY_MAGIC, option, reply, len(data)) + data)

    def _select(self, export: Export) -> None:
        self._export = export
        self._provider = export.provider
        self._size = export.provider.size()
        self._read_only = export.read_only

    def _opt_export_name(self, data: bytes, no_zeroes: bool) -> bool:
        try:
            export = self._server.find_export(data.decode())
        except UnicodeDecodeError:
            return False
        if export is None:
            return False
        self._select(export)
        self._meta_export = None  # contexts are only valid with NBD_OPT_GO
        reply = struct.pack(">QH", self._size, export.flags(self._structured))
        self._send(reply if no_zeroes else reply + bytes(124))
        return True

    def _opt_info(self, option: int, data: bytes) -> bool:
        try:
            name, pos = p.unpack_string(data, 0)
            if pos + 2 > len(data):
                raise p.ProtocolError("truncated info request count")
            (count,) = struct.unpack_from(">H", data, pos)
            if pos + 2 + 2 * count != len(data):
                raise p.ProtocolError("info request count does not match length")
            requests = struct.unpack_from(f">{count}H", data, pos + 2)
        except p.ProtocolError as e:
            self._reply(option, p.REP_ERR_INVALID, str(e).encode())
            return False
        export = self._server.find_export(name)
        if export is None:
            self._reply(option, p.REP_ERR_UNKNOWN, b"no such export")
            return False
        info = p.EXPORT_INFO.pack(p.INFO_EXPORT, export.provider.size(),
                                  export.flags(self._structured))
        self._reply(option, p.REP_INFO, info)
        self._reply(option, p.REP_INFO, p.BLOCK_SIZE_INFO.pack(
            p.INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD))
        if p.INFO_NAME in requests:
            self._reply(option, p.REP_INFO, struct.pack(">H", p.INFO_NAME)
                        + export.name.encode())
        if p.INFO_DESCRIPTION in requests and export.description:
            self._reply(option, p.REP_INFO, struct.pack(">H", p.INFO_DESCRIPTION)
                        + export.description.encode()[: p.MAX_NAME])
        self._reply(option, p.REP_ACK)
        if option == p.OPT_GO:
            self._select(export)
            if self._meta_export is not None and self._meta_export != name:
                self._meta_export = None  # negotiated for another export
        return True

    def _opt_list(self, data: bytes) -> None:
        if data:
            self._reply(p.OPT_LIST, p.REP_ERR_INVALID, b"no payload expected")
            return
        for name in self._server.exports:
            self._reply(p.OPT_LIST, p.REP_SERVER, p.pack_string(name))
        self._reply(p.OPT_LIST, p.REP_ACK)

    def _opt_meta(self, option: int, data: bytes) -> None:
        setting = option == p.OPT_SET_META_CONTEXT
        try:
            name, pos = p.unpack_string(data, 0)
            if pos + 4 > len(data):
                raise p.ProtocolError("truncated query count")
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                query, pos = p.unpack_string(data, pos)
                queries.append(query)
            if pos != len(data):
                raise p.ProtocolError("trailing bytes after queries")
        except p.ProtocolError as e:
            self._reply(option, p.REP_ERR_INVALID, str(e).encode())
            return
        if not self._structured:
            self._reply(option, p.REP_ERR_INVALID, b"structured replies not negotiated")
            return
        if self._server.find_export(name) is None:
            self._reply(option, p.REP_ERR_UNKNOWN, b"no such export")
            return
        if setting:
            wanted = p.META_BASE_ALLOCATION in queries
        else:
            wanted = not queries or any(q in ("base:", p.META_BASE_ALLOCATION) for q in queries)
        if wanted:
            context_id = CONTEXT_ID if setting else 0
            self._reply(option, p.REP_META_CONTEXT, struct.pack(">I", context_id)
                        + p.META_BASE_ALLOCATION.encode())
        if setting:
            self._meta_export = name if wanted else None
        self._reply(option, p.REP_ACK)

    async def _opt_starttls(self, data: bytes) -> None:
        if self._tls is None:
            self._reply(p.OPT_STARTTLS, p.REP_ERR_POLICY, b"TLS not offered here")
            return
        if data or self._tls_active:
            self._reply(p.OPT_STARTTLS, p.REP_ERR_INVALID, b"TLS already active")
            return
        if self._end != self._start:
            raise p.ProtocolError("data sent before the TLS handshake")
        self._reply(p.OPT_STARTTLS, p.REP_ACK)
        assert self._transport is not None
        transport = await asyncio.get_running_loop().start_tls(
            self._transport, self, self._tls, server_side=True)
        if transport is None:
            raise ConnectionResetError("TLS handshake failed")
        self._transport = transport
        self._fd = -1  # the bytes on the socket are now TLS records
        self._tls_active = True
        self._structured = False  # options negotiated before TLS do not survive it
        self._meta_export = None

    # transmission

    def _process(self) -> None:
        """Handle every complete request in the buffer, then send the replies at once."""
        buf = self._buf
        pos = self._start
        end = self._end
        unpack = p.REQUEST.unpack_from
        self._want = 0
        while not self._disconnecting:
            if self._stream is not None:
                pos = self._feed(self._stream, pos, end)
                if self._stream is not None:
                    break
                continue
            if end - pos < 28:
                break
            magic, flags, cmd, cookie, offset, length = unpack(buf, pos)
            if magic != p.REQUEST_MAGIC:
                log.debug("bad request magic %#x: disconnecting", magic)
                self._drop()
                return
            if cmd == p.CMD_WRITE:
                if length > MAX_PAYLOAD:
                    log.debug("write of %d bytes is over the limit: disconnecting", length)
                    self._drop()
                    return
                if end - pos - 28 >= length:
                    data = self._view[pos + 28 : pos + 28 + length]
                    pos += 28 + length
                    self._write(flags, cookie, offset, data)
                elif length >= STREAM_MIN:
                    pos += 28
                    self._stream = self._start_stream(flags, cookie, offset, length)
                else:
                    self._want = 28 + length
                    break
            elif cmd == p.CMD_READ:
                pos += 28
                self._read(flags, cookie, offset, length)
            else:
                pos += 28
                self._command(cmd, flags, cookie, offset, length)
        if pos == end and not self._pinned:
            pos = end = self._end = 0  # receive into the start again: it is cache-warm
        self._start = pos
        self._flush_out()
        if self._disconnecting:
            self._start = self._end  # requests after DISC are ignored

    def _start_stream(self, flags: int, cookie: int, offset: int, length: int) -> _Stream:
        error = self._check(flags, offset, length, p.ENOSPC)
        if self._read_only:
            error = p.EPERM
        if not error and self._borrowed:
            self._flush_out()
        return _Stream(cookie, flags, offset, length, error)

    def _feed(self, stream: _Stream, pos: int, end: int) -> int:
        """Write the part of a streamed payload that has arrived, in whole device blocks
        (so that no block is split between two writes), and reply after the last part."""
        n = min(end - pos, stream.remaining)
        if n < stream.remaining:
            n = (stream.offset + n) // STREAM_ALIGN * STREAM_ALIGN - stream.offset
            if n <= 0:
                self._want = STREAM_ALIGN * 2
                return pos
        if not stream.error and stream.failure is None:
            self._write_piece(stream, self._view[pos : pos + n])
        stream.offset += n
        stream.remaining -= n
        if stream.remaining:
            return pos + n
        self._stream = None
        if stream.error:
            self._error(stream.cookie, stream.error)
        elif stream.failure is not None:
            self._fail(stream.cookie, stream.failure)
        elif stream.task is not None:
            self._spawn(self._finish_stream(stream))
        elif stream.flags & p.CMD_FLAG_FUA:
            assert self._provider is not None
            self._run(self._provider.flush(), stream.cookie)
        else:
            self._ok(stream.cookie)
        return pos + n

    def _write_piece(self, stream: _Stream, piece: memoryview) -> None:
        assert self._provider is not None
        if stream.task is not None:  # an earlier piece still waits: queue behind it
            self._pinned = True
            stream.task = asyncio.ensure_future(
                _write_after(stream.task, self._provider, stream.offset, piece))
            return
        coro = self._provider.write_at(stream.offset, piece)
        try:
            pending = coro.send(None)
        except StopIteration:
            return
        except Exception as e:
            stream.failure = e
            return
        self._pinned = True
        stream.task = asyncio.ensure_future(_resume(coro, pending))

    async def _finish_stream(self, stream: _Stream) -> None:
        assert stream.task is not None and self._provider is not None
        try:
            await stream.task
            if stream.flags & p.CMD_FLAG_FUA:
                await self._provider.flush()
        except Exception as e:
            self._fail(stream.cookie, e)
        else:
            self._ok(stream.cookie)
        self._flush_out()

    def _drop(self) -> None:
        self._flush_out()
        self._disconnecting = True
        if self._transport is not None:
            self._transport.close()

    def _check(self, flags: int, offset: int, length: int, past_end: int) -> int:
        if flags & ~_KNOWN_CMD_FLAGS or length == 0:
            return p.EINVAL
        if offset + length > self._size:
            return past_end
        return 0

    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        error = self._check(flags, offset, length, p.EINVAL)
        if error or length > MAX_PAYLOAD:
            self._error(cookie, error or p.EINVAL)
            return
        assert self._provider is not None
        coro = self._provider.read_at(offset, length)
        try:
            pending = coro.send(None)
        except StopIteration as stop:
            self._reply_data(cookie, offset, length, stop.value)
        except Exception as e:
            self._fail(cookie, e)
        else:
            self._spawn(self._finish(coro, pending, cookie, offset, length, self._reply_data))

    def _write(self, flags: int, cookie: int, offset: int, data: memoryview) -> None:
        error = self._check(flags, offset, len(data), p.ENOSPC)
        if self._read_only:
            error = p.EPERM
        if error:
            self._error(cookie, error)
            return
        if self._borrowed:
            self._flush_out()  # views of the device in earlier replies must go out first
        assert self._provider is not None
        if flags & p.CMD_FLAG_FUA:
            coro = _write_fua(self._provider, offset, data)
        else:
            coro = self._provider.write_at(offset, data)
        self._run(coro, cookie, pins=True)

    def _command(self, cmd: int, flags: int, cookie: int, offset: int, length: int) -> None:
        provider = self._provider
        assert provider is not None
        if cmd == p.CMD_FLUSH:
            if flags & ~_KNOWN_CMD_FLAGS:
                self._error(cookie, p.EINVAL)
            else:
                self._run(provider.flush(), cookie)
        elif cmd in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            error = self._check(flags, offset, length, p.ENOSPC)
            if self._read_only:
                error = p.EPERM
            elif flags & p.CMD_FLAG_FAST_ZERO:
                error = p.ENOTSUP  # fast zeroing is not advertised
            if error:
                self._error(cookie, error)
                return
            if self._borrowed:
                self._flush_out()
            if flags & p.CMD_FLAG_FUA:
                self._run(_zero_fua(provider, offset, length), cookie)
            else:
                self._run(_zero(provider, offset, length), cookie)
        elif cmd == p.CMD_CACHE:
            error = self._check(flags, offset, length, p.EINVAL)
            if error or length > MAX_PAYLOAD:
                self._error(cookie, error or p.EINVAL)
            else:  # reading makes a post-copy device fetch the range now
                self._run(provider.read_at(offset, length), cookie)
        elif cmd == p.CMD_BLOCK_STATUS:
            self._block_status(flags, cookie, offset, length)
        elif cmd == p.CMD_DISC:
            self._disconnecting = True
            self._spawn(self._close_when_idle())
        else:
            self._error(cookie, p.EINVAL)

    def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        error = self._check(flags, offset, length, p.EINVAL)
        if not error and (self._meta_export is None or not self._structured):
            error = p.EINVAL
        if error:
            self._error(cookie, error)
            return
        provider = self._provider
        end = offset + length
        extents: list[tuple[int, int]] = []
        if isinstance(provider, AllocationMap):
            pos = offset
            for start, n in sorted(provider.allocated_ranges(offset, length)):
                start, stop = max(start, pos), min(start + n, end)
                if stop <= start:
                    continue
                if start > pos:
                    extents.append((start - pos, p.STATE_HOLE | p.STATE_ZERO))
                extents.append((stop - start, 0))
                pos = stop
            if pos < end:
                extents.append((end - pos, p.STATE_HOLE | p.STATE_ZERO))
        else:
            extents.append((length, 0))
        if flags & p.CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        payload = struct.pack(">I", CONTEXT_ID) + b"".join(p.EXTENT.pack(*e) for e in extents)
        self._out.append(p.CHUNK.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                      p.REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)))
        self._out.append(payload)

    def _run(self, coro: Coroutine[Any, Any, Any], cookie: int, *, pins: bool = False) -> None:
        try:
            pending = coro.send(None)
        except StopIteration:
            self._ok(cookie)
        except Exception as e:
            self._fail(cookie, e)
        else:
            if pins:
                self._pinned = True
            self._spawn(self._finish(coro, pending, cookie, 0, 0, self._done_ok))

    async def _finish(self, coro: Coroutine[Any, Any, T], pending: Any, cookie: int,
                      offset: int, length: int,
                      done: Callable[[int, int, int, T], None]) -> None:
        try:
            value = await _resume(coro, pending)
        except Exception as e:
            self._fail(cookie, e)
        else:
            done(cookie, offset, length, value)
        self._flush_out()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._task_done)
        if len(self._tasks) >= MAX_TASKS and not self._paused_tasks:
            self._paused_tasks = True
            self._update_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()
        if self._paused_tasks and len(self._tasks) < MAX_TASKS // 2:
            self._paused_tasks = False
            self._update_reading()

    async def _close_when_idle(self) -> None:
        self._tasks.discard(cast(asyncio.Task[None], asyncio.current_task()))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._transport is not None and not self._closed:
            self._transport.close()

    # replies

    def _reply_data(self, cookie: int, offset: int, length: int, data: Buffer) -> None:
        if len(data) != length:
            self._error(cookie, p.EIO, "provider returned a short read")
            return
        if self._structured:
            self._out.append(p.CHUNK_OFFSET.pack(
                p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA,
                cookie, length + 8, offset))
        else:
            self._out.append(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie))
        self._out.append(data)
        if not isinstance(data, bytes):
            self._borrowed = True

    def _ok(self, cookie: int) -> None:
        self._out.append(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _done_ok(self, cookie: int, offset: int, length: int, value: object) -> None:
        self._ok(cookie)

    def _fail(self, cookie: int, exc: BaseException) -> None:
        log.debug("request %d failed: %r", cookie, exc)
        self._error(cookie, _error_code(exc), str(exc))

    def _error(self, cookie: int, errno: int, message: str = "") -> None:
        if self._structured:
            text = message.encode()[:4096]
            self._out.append(p.CHUNK.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                          p.REPLY_TYPE_ERROR, cookie, 6 + len(text))
                             + struct.pack(">IH", errno, len(text)) + text)
        else:
            self._out.append(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, errno, cookie))

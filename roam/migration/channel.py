"""Transports for the migration protocol: TCP, UNIX sockets, TLS, or any asyncio streams.

A Channel moves whole frames. `FrameProtocol` is the fast path for sockets: the kernel
reads straight into one reusable buffer and `recv` hands out views of it, so a block is
copied once on the receiving side (into the device). `StreamChannel` wraps any pair of
asyncio streams for everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast
from urllib.parse import urlsplit

from roam.migration.wire import HEADER, MsgType, parse_header
from roam.storage.provider import Buffer

WRITE_HIGH_WATER = 8 * 1024 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
POSTCOPY_QUEUE = 256 * 1024
"""Bytes each end keeps queued once authority moved: a block the destination asks for
must not wait behind megabytes of the bulk stream (the default buffers hold about 20 MiB)."""


class PeerLost(ConnectionError):
    """The connection ended or broke."""


class Channel(Protocol):
    bytes_sent: int
    bytes_received: int

    def send(self, *parts: Buffer) -> None:
        """Queue one frame (its parts in order); never interleaves with another send."""

    async def drain(self) -> None:
        """Wait until the transport can take more (flow control)."""

    async def recv(self) -> tuple[MsgType, memoryview]:
        """The next frame's type and body; the body is valid until the next recv."""

    def limit_queue(self, nbytes: int) -> None:
        """From now on keep only about `nbytes` queued in this end's buffers: latency over
        throughput, so that a frame sent next does not wait behind megabytes of others."""

    async def close(self) -> None: ...


class FrameProtocol(asyncio.BufferedProtocol):
    """Frame reader and writer on an asyncio transport, with the kernel reading in place."""

    def __init__(self, buffer_size: int = 8 * 1024 * 1024) -> None:
        self._buf = bytearray(buffer_size)
        self._rpos = 0
        self._wpos = 0
        self._transport: asyncio.Transport | None = None
        self._data_waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._read_ahead = buffer_size  # unprocessed bytes at which reading pauses
        self._sock: socket.socket | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._fd = -1
        self._lost: BaseException | None = None
        self._eof = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.connected = asyncio.Event()

    # -- asyncio protocol callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # Keep several frames in flight: the default 64 KiB high-water mark would stall
        # the sender after every 1 MiB frame until the kernel took it all.
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        self._sock = sock
        if sock is not None:
            # Big kernel buffers let each send and receive move megabytes at once.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            if transport.get_extra_info("sslcontext") is None:
                self._fd = sock.fileno()  # plain socket: sends may go straight to it
        self.connected.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buf)[self._wpos :]

    def buffer_updated(self, nbytes: int) -> None:
        self._wpos += nbytes
        self.bytes_received += nbytes
        full = self._wpos == len(self._buf) or self._wpos - self._rpos >= self._read_ahead
        if full and self._transport is not None:
            self._transport.pause_reading()
            self._paused_reading = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or PeerLost("connection closed by peer")
        self._eof = True
        self._can_write.set()
        self._wake()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- Channel ---------------------------------------------------------------------

    def send(self, *parts: Buffer) -> None:
        """Queue a frame. The caller may change the parts' memory as soon as this returns:
        what the kernel did not take at once is copied (transports may keep references).

        On a plain socket with nothing queued, the parts go to the kernel with one
        writev and no copy in user space; this is the bulk path of a migration."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise PeerLost("connection is closed")
        total = sum(len(p) for p in parts)
        self.bytes_sent += total
        sent = 0
        if self._fd >= 0 and not transport.get_write_buffer_size():
            try:
                sent = os.writev(self._fd, parts)
            except OSError:
                sent = 0  # full, or broken: the transport finds out and reports it as usual
            if sent == total:
                return
        transport.write(_rest(parts, sent))

    async def drain(self) -> None:
        await self._can_write.wait()
        if self._lost is not None:
            raise PeerLost(str(self._lost)) from self._lost

    async def recv(self) -> tuple[MsgType, memoryview]:
        while True:
            avail = self._wpos - self._rpos
            if avail >= HEADER.size:
                kind, length = parse_header(
                    memoryview(self._buf)[self._rpos : self._rpos + HEADER.size]
                )
                need = HEADER.size + length
                if avail >= need:
                    start = self._rpos + HEADER.size
                    self._rpos += need
                    if self._wpos - self._rpos < self._read_ahead:
                        self._resume_reading()
                    return kind, memoryview(self._buf)[start : start + length]
                self._make_room(need)
            elif self._rpos + HEADER.size > len(self._buf):
                self._make_room(HEADER.size)
            if self._eof:
                if self._wpos - self._rpos:
                    raise PeerLost("connection closed in the middle of a message")
                raise PeerLost(str(self._lost) if self._lost else "connection closed by peer")
            await self._wait_data()

    def limit_queue(self, nbytes: int) -> None:
        self._read_ahead = nbytes
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high=nbytes)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, nbytes)

    async def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    # -- internals -------------------------------------------------------------------

    def _make_room(self, need: int) -> None:
        """Make sure a frame of `need` bytes fits from the read position on."""
        if self._rpos + need <= len(self._buf):
            return
        pending = memoryview(self._buf)[self._rpos : self._wpos]
        if need > len(self._buf):
            # Allocate rather than resize: views handed out earlier may still exist.
            new = bytearray(max(need, 2 * len(self._buf)))
            new[: len(pending)] = pending
            self._buf = new
        else:
            self._buf[: len(pending)] = pending
        self._wpos -= self._rpos
        self._rpos = 0
        self._resume_reading()

    async def _wait_data(self) -> None:
        if self._rpos == self._wpos:
            self._rpos = self._wpos = 0
        # Waiting for more: read even past the read-ahead limit (a frame may be larger).
        self._resume_reading()
        self._data_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._data_waiter
        finally:
            self._data_waiter = None

    def _resume_reading(self) -> None:
        if self._paused_reading and self._wpos < len(self._buf) and self._transport is not None:
            self._paused_reading = False
            self._transport.resume_reading()

    def _wake(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)


class StreamChannel:
    """A Channel over any asyncio StreamReader/StreamWriter pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, *parts: Buffer) -> None:
        self._writer.write(_rest(parts, 0))  # a copy: transports may keep what they get
        self.bytes_sent += sum(len(p) for p in parts)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as e:
            raise PeerLost(str(e)) from e

    async def recv(self) -> tuple[MsgType, memoryview]:
        try:
            header = await self._reader.readexactly(HEADER.size)
            kind, length = parse_header(header)
            body = await self._reader.readexactly(length)
        except asyncio.IncompleteReadError as e:
            raise PeerLost("connection closed by peer") from e
        except ConnectionError as e:
            raise PeerLost(str(e)) from e
        self.bytes_received += HEADER.size + length
        return kind, memoryview(body)

    def limit_queue(self, nbytes: int) -> None:
        self._writer.transport.set_write_buffer_limits(high=nbytes)

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def _rest(parts: tuple[Buffer, ...], skip: int) -> bytes:
    """The bytes of parts after the first `skip`, as one new immutable object."""
    views = []
    for part in parts:
        n = len(part)
        if skip >= n:
            skip -= n
            continue
        views.append(memoryview(part)[skip:] if skip else part)
        skip = 0
    return b"".join(views)


# -- addresses and TLS -----------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """`tcp://HOST:PORT` or `unix://PATH`."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        parts = urlsplit(text)
        if parts.scheme == "unix":
            path = (parts.netloc + parts.path) if parts.netloc else parts.path
            if not path:
                raise ValueError(f"{text!r}: unix:// address needs a socket path")
            return cls("unix", path=path)
        if parts.scheme == "tcp":
            if not parts.hostname or parts.port is None:
                raise ValueError(f"{text!r}: tcp:// address needs HOST:PORT")
            return cls("tcp", host=parts.hostname, port=parts.port)
        raise ValueError(f"{text!r}: address must be tcp://HOST:PORT or unix://PATH")

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True)
class TLSFiles:
    """Certificate, key and CA for mutual TLS: each side proves itself to the other."""

    cert: Path
    key: Path
    ca: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


Handler = Callable[[Channel], Awaitable[None]]


async def connect(address: Address, tls: TLSFiles | None = None,
                  server_name: str | None = None) -> FrameProtocol:
    loop = asyncio.get_running_loop()
    ctx = tls.client_context() if tls else None
    proto = FrameProtocol()
    try:
        if address.scheme == "unix":
            await loop.create_unix_connection(
                lambda: proto, address.path, ssl=ctx,
                server_hostname=(server_name or "localhost") if ctx else None,
            )
        else:
            await loop.create_connection(
                lambda: proto, address.host, address.port, ssl=ctx,
                server_hostname=(server_name or address.host) if ctx else None,
            )
    except ssl.SSLError as e:
        raise PeerLost(f"TLS handshake with {address} failed: {e.reason}") from e
    except OSError as e:
        raise PeerLost(f"cannot connect to {address}: {e.strerror or e}") from e
    return proto


async def listen(address: Address, handler: Handler,
                 tls: TLSFiles | None = None) -> asyncio.Server:
    """Start a server; each connection runs `handler(channel)` in its own task."""
    loop = asyncio.get_running_loop()
    ctx = tls.server_context() if tls else None

    def factory() -> FrameProtocol:
        proto = FrameProtocol()
        task = loop.create_task(_serve_one(proto, handler))
        _handler_tasks.add(task)
        task.add_done_callback(_handler_tasks.discard)
        return proto

    if address.scheme == "unix":
        if os.path.exists(address.path):
            os.unlink(address.path)
        return await loop.create_unix_server(factory, address.path, ssl=ctx)
    return await loop.create_server(factory, address.host, address.port, ssl=ctx)


_handler_tasks: set[asyncio.Task[None]] = set()


async def _serve_one(proto: FrameProtocol, handler: Handler) -> None:
    await proto.connected.wait()
    try:
        await handler(proto)
    finally:
        await proto.close()


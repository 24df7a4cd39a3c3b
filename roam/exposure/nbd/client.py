"""NBD client: asyncio, pipelined, structured replies and base:allocation block status.

Any number of requests may be in flight; one reader task matches replies to requests by
cookie, so callers simply `await client.read(...)` from as many tasks as they like.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from roam.exposure.nbd import protocol as p
from roam.storage.provider import Buffer


@dataclass(frozen=True)
class NBDAddress:
    """Where an export lives: a UNIX socket or host:port, the export name, and TLS."""

    name: str = ""
    socket: str | None = None
    host: str | None = None
    port: int = 10809
    tls: bool = False

    @classmethod
    def parse(cls, uri: str) -> NBDAddress:
        """Parse nbd://HOST[:PORT]/NAME, nbd+unix:///NAME?socket=SOCK (and nbds variants)."""
        parts = urlsplit(uri)
        scheme = parts.scheme
        if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
            raise ValueError(f"not an NBD URI: {uri}")
        tls = scheme.startswith("nbds")
        name = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
        if scheme.endswith("+unix"):
            sockets = parse_qs(parts.query).get("socket")
            if not sockets:
                raise ValueError(f"{uri}: nbd+unix needs ?socket=PATH")
            return cls(name=name, socket=sockets[0], tls=tls)
        if not parts.hostname:
            raise ValueError(f"{uri}: no host")
        return cls(name=name, host=parts.hostname, port=parts.port or 10809, tls=tls)


@dataclass(frozen=True)
class Extent:
    length: int
    flags: int

    @property
    def hole(self) -> bool:
        return bool(self.flags & p.STATE_HOLE)

    @property
    def zero(self) -> bool:
        return bool(self.flags & p.STATE_ZERO)


class _Pending:
    """One request in flight: its reply chunks are gathered here until the last one."""

    __slots__ = ("buffer", "error", "extents", "future", "offset")

    def __init__(self, future: asyncio.Future[None], offset: int, length: int) -> None:
        self.future = future
        self.offset = offset
        self.buffer = bytearray(length) if length else None
        self.extents: list[Extent] = []
        self.error: p.NBDError | None = None


class NBDClient:
    """A connection to one export. Create it with `connect` (or the helpers)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.export_name = ""
        self.size = 0
        self.flags = 0
        self.block_sizes = (1, 4096, 0xFFFFFFFF)
        self.structured = False
        self.context_id: int | None = None
        self._cookie = 0
        self._pending: dict[int, _Pending] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    # connecting

    @classmethod
    async def connect(cls, address: NBDAddress | str, *, tls: ssl.SSLContext | None = None,
                      structured: bool = True, allocation: bool = True) -> NBDClient:
        """Connect and select the export (NBD_OPT_GO). TLS is used when the address asks for
        it or a context is given; the default context checks the server's certificate."""
        if isinstance(address, str):
            address = NBDAddress.parse(address)
        reader, writer = await _open(address)
        client = cls(reader, writer)
        try:
            await client._handshake()
            if tls is not None or address.tls:
                await client._starttls(tls or ssl.create_default_context(), address.host)
            if structured:
                client.structured = await client._simple_option(p.OPT_STRUCTURED_REPLY)
            if client.structured and allocation:
                client.context_id = await client._set_meta(address.name)
            await client._go(address.name)
        except BaseException:
            writer.close()
            raise
        client._reader_task = asyncio.get_running_loop().create_task(client._read_replies())
        return client

    @staticmethod
    async def list_exports(address: NBDAddress | str, *, tls: ssl.SSLContext | None = None
                           ) -> list[str]:
        """Names of the exports a server offers (NBD_OPT_LIST)."""
        if isinstance(address, str):
            address = NBDAddress.parse(address)
        reader, writer = await _open(address)
        client = NBDClient(reader, writer)
        try:
            await client._handshake()
            if tls is not None or address.tls:
                await client._starttls(tls or ssl.create_default_context(), address.host)
            client._send_option(p.OPT_LIST)
            names = []
            while True:
                reply, data = await client._option_reply(p.OPT_LIST)
                if reply == p.REP_ACK:
                    break
                if reply == p.REP_SERVER:
                    names.append(p.unpack_string(data, 0)[0])
            client._send_option(p.OPT_ABORT)
            return names
        finally:
            writer.close()

    async def _handshake(self) -> None:
        magic, opt_magic, flags = p.HANDSHAKE.unpack(
            await self._reader.readexactly(p.HANDSHAKE.size))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise p.ProtocolError("not a newstyle NBD server")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise p.ProtocolError("server does not speak fixed newstyle")
        self._writer.write(p.CLIENT_FLAGS.pack(flags & p.CLIENT_FLAGS_KNOWN))

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._writer.write(p.OPTION.pack(p.IHAVEOPT, option, len(data)) + data)

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply, length = p.OPTION_REPLY.unpack(
            await self._reader.readexactly(p.OPTION_REPLY.size))
        if magic != p.REPLY_MAGIC or opt != option:
            raise p.ProtocolError(f"bad option reply {magic:#x} for option {opt}")
        return reply, await self._reader.readexactly(length)

    async def _simple_option(self, option: int) -> bool:
        """Send a payload-less option; True if acknowledged, False if unsupported."""
        self._send_option(option)
        reply, _ = await self._option_reply(option)
        if reply == p.REP_ACK:
            return True
        if reply & p.REP_FLAG_ERROR:
            return False
        raise p.ProtocolError(f"unexpected reply {reply} to option {option}")

    async def _starttls(self, context: ssl.SSLContext, host: str | None) -> None:
        self._send_option(p.OPT_STARTTLS)
        reply, data = await self._option_reply(p.OPT_STARTTLS)
        if reply != p.REP_ACK:
            raise p.OptionError(p.OPT_STARTTLS, reply, data.decode(errors="replace"))
        await self._writer.start_tls(context, server_hostname=host)

    async def _set_meta(self, name: str) -> int | None:
        query = (p.pack_string(name) + struct.pack(">I", 1)
                 + p.pack_string(p.META_BASE_ALLOCATION))
        self._send_option(p.OPT_SET_META_CONTEXT, query)
        context = None
        while True:
            reply, data = await self._option_reply(p.OPT_SET_META_CONTEXT)
            if reply == p.REP_META_CONTEXT and data[4:].decode() == p.META_BASE_ALLOCATION:
                context = struct.unpack_from(">I", data)[0]
            elif reply == p.REP_ACK or reply & p.REP_FLAG_ERROR:
                return context

    async def _go(self, name: str) -> None:
        raw = name.encode()
        wanted = (p.INFO_BLOCK_SIZE,)
        self._send_option(p.OPT_GO, struct.pack(">I", len(raw)) + raw
                          + struct.pack(f">H{len(wanted)}H", len(wanted), *wanted))
        got_export = False
        while True:
            reply, data = await self._option_reply(p.OPT_GO)
            if reply == p.REP_ACK:
                break
            if reply & p.REP_FLAG_ERROR:
                raise p.OptionError(p.OPT_GO, reply, data.decode(errors="replace"))
            if reply != p.REP_INFO or len(data) < 2:
                continue
            (kind,) = struct.unpack_from(">H", data)
            if kind == p.INFO_EXPORT and len(data) >= p.EXPORT_INFO.size:
                _, self.size, self.flags = p.EXPORT_INFO.unpack_from(data)
                got_export = True
            elif kind == p.INFO_BLOCK_SIZE and len(data) >= p.BLOCK_SIZE_INFO.size:
                self.block_sizes = p.BLOCK_SIZE_INFO.unpack_from(data)[1:]
        if not got_export:
            raise p.ProtocolError("server did not describe the export")
        self.export_name = name

    # capabilities

    @property
    def read_only(self) -> bool:
        return bool(self.flags & p.TF_READ_ONLY)

    def can(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def max_request(self) -> int:
        return min(self.block_sizes[2], 32 * 1024 * 1024)

    # commands

    async def read(self, offset: int, length: int) -> bytearray:
        pending = await self._request(p.CMD_READ, 0, offset, length, reply_length=length)
        assert pending.buffer is not None or length == 0
        return pending.buffer if pending.buffer is not None else bytearray()

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self._request(p.CMD_WRITE, p.CMD_FLAG_FUA if fua else 0, offset, len(data),
                            payload=data)

    async def flush(self) -> None:
        await self._request(p.CMD_FLUSH, 0, 0, 0)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._request(p.CMD_TRIM, p.CMD_FLAG_FUA if fua else 0, offset, length)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                           no_hole: bool = False) -> None:
        flags = (p.CMD_FLAG_FUA if fua else 0) | (p.CMD_FLAG_NO_HOLE if no_hole else 0)
        await self._request(p.CMD_WRITE_ZEROES, flags, offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self._request(p.CMD_CACHE, 0, offset, length)

    async def block_status(self, offset: int, length: int, *, req_one: bool = False
                           ) -> list[Extent]:
        """Extents of base:allocation from `offset` on (they may cover less than asked)."""
        if self.context_id is None:
            raise p.NBDError(p.ENOTSUP, "base:allocation was not negotiated")
        pending = await self._request(p.CMD_BLOCK_STATUS, p.CMD_FLAG_REQ_ONE if req_one else 0,
                                      offset, length)
        return pending.extents

    async def request_raw(self, cmd: int, flags: int, offset: int, length: int,
                          payload: Buffer = b"") -> None:
        """Send any request as given (tests use it for malformed ones) and await its reply."""
        readable = cmd == p.CMD_READ and length <= self.max_request
        await self._request(cmd, flags, offset, length, payload=payload,
                            reply_length=length if readable else 0)

    async def disconnect(self) -> None:
        """Send NBD_CMD_DISC after the requests in flight and close the connection."""
        if self._failure is None and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError):
                self._writer.write(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC,
                                                  self._next_cookie(), 0, 0))
                await self._writer.drain()
        await self.close()

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self._writer.wait_closed()
        self._fail_all(ConnectionResetError("connection closed"))

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    # plumbing

    def _next_cookie(self) -> int:
        self._cookie = (self._cookie + 1) & 0xFFFFFFFFFFFFFFFF
        return self._cookie

    async def _request(self, cmd: int, flags: int, offset: int, length: int, *,
                       payload: Buffer = b"", reply_length: int = 0) -> _Pending:
        if self._failure is not None:
            raise ConnectionResetError(f"connection failed: {self._failure}")
        cookie = self._next_cookie()
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(future, offset, reply_length)
        self._pending[cookie] = pending
        header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if payload:
            self._writer.writelines((header, payload))
        else:
            self._writer.write(header)
        await self._writer.drain()
        await future
        if pending.error is not None:
            raise pending.error
        return pending

    async def _read_replies(self) -> None:
        try:
            while True:
                await self._read_reply()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._fail_all(e)

    def _fail_all(self, exc: BaseException) -> None:
        self._failure = self._failure or exc
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ConnectionResetError(str(exc)))
        self._pending.clear()

    async def _read_reply(self) -> None:
        reader = self._reader
        (magic,) = struct.unpack(">I", await reader.readexactly(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await reader.readexactly(12))
            pending = self._take(cookie)
            if error:
                pending.error = p.NBDError(error)
            elif pending.buffer is not None:
                pending.buffer[:] = await reader.readexactly(len(pending.buffer))
            pending.future.set_result(None)
            return
        if magic != p.STRUCTURED_REPLY_MAGIC:
            raise p.ProtocolError(f"bad reply magic {magic:#x}")
        flags, kind, cookie, length = struct.unpack(">HHQI", await reader.readexactly(16))
        chunk_for = self._pending.get(cookie)
        if chunk_for is None:
            raise p.ProtocolError(f"reply for unknown cookie {cookie}")
        pending = chunk_for
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            (offset,) = struct.unpack(">Q", await reader.readexactly(8))
            start = offset - pending.offset
            if pending.buffer is None or start < 0 or start + length - 8 > len(pending.buffer):
                raise p.ProtocolError("data chunk outside the request")
            pending.buffer[start : start + length - 8] = await reader.readexactly(length - 8)
        else:
            self._chunk(pending, kind, await reader.readexactly(length))
        if flags & p.REPLY_FLAG_DONE:
            del self._pending[cookie]
            pending.future.set_result(None)

    def _chunk(self, pending: _Pending, kind: int, data: bytes) -> None:
        if kind == p.REPLY_TYPE_OFFSET_HOLE:
            offset, n = struct.unpack(">QI", data)
            start = offset - pending.offset
            if pending.buffer is None or start < 0 or start + n > len(pending.buffer):
                raise p.ProtocolError("hole chunk outside the request")
            pending.buffer[start : start + n] = bytes(n)
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            if struct.unpack_from(">I", data)[0] == self.context_id:
                pending.extents = [Extent(*e) for e in p.EXTENT.iter_unpack(data[4:])]
        elif kind in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
            error, n = struct.unpack_from(">IH", data)
            pending.error = p.NBDError(error, data[6 : 6 + n].decode(errors="replace"))
        elif kind != p.REPLY_TYPE_NONE and kind & 0x8000:
            pending.error = p.NBDError(p.EIO, f"unknown error chunk {kind}")

    def _take(self, cookie: int) -> _Pending:
        pending = self._pending.pop(cookie, None)
        if pending is None:
            raise p.ProtocolError(f"reply for unknown cookie {cookie}")
        return pending


async def _open(address: NBDAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    limit = 64 * 1024 * 1024
    if address.socket is not None:
        return await asyncio.open_unix_connection(str(Path(address.socket)), limit=limit)
    assert address.host is not None
    return await asyncio.open_connection(address.host, address.port, limit=limit)


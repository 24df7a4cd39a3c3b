"""Hypothesis fuzzing of the NBD handshake and of every command.

Whatever a client sends, it gets an error reply or a clean disconnect, the other clients
keep being served, and nothing a rejected request carried reaches the device.
"""

from __future__ import annotations

import asyncio
import random
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roam.exposure.nbd import protocol as p
from roam.exposure.nbd.client import NBDClient
from roam.exposure.nbd.server import MAX_PAYLOAD, Export, NBDServer
from roam.storage.sources import MemorySource

SIZE = 1024 * 1024
INITIAL = random.Random(7).randbytes(SIZE)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def with_server(scenario: Callable[[str, MemorySource, NBDClient], Awaitable[None]]) -> None:
    """Run a scenario against a fresh server whose device holds INITIAL, with a bystander
    client connected; afterwards the bystander still reads what the scenario expects."""

    async def main() -> None:
        source = MemorySource(SIZE)
        await source.write_at(0, INITIAL)
        server = NBDServer([Export("disk", source), Export("ro", source, read_only=True)])
        with tempfile.TemporaryDirectory() as tmp:
            sock = str(Path(tmp) / "s")
            await server.serve_unix(sock)
            bystander = await NBDClient.connect(f"nbd+unix:///disk?socket={sock}")
            try:
                async with asyncio.timeout(10):
                    await scenario(sock, source, bystander)
                    assert await bystander.read(0, 4096) == bytes(await source.read_at(0, 4096))
            finally:
                await bystander.disconnect()
                await server.close()

    asyncio.run(main())


async def raw_session(sock: str, payload: bytes) -> bytes:
    """Send bytes after the greeting, half-close, and return all the server said."""
    reader, writer = await asyncio.open_unix_connection(sock)
    greeting = await reader.readexactly(p.HANDSHAKE.size)
    assert p.HANDSHAKE.unpack(greeting)[:2] == (p.NBDMAGIC, p.IHAVEOPT)
    writer.write(payload)
    writer.write_eof()
    replies = await reader.read()  # to EOF: the server must end the connection
    writer.close()
    return replies


def option(code: int, data: bytes, length: int | None = None) -> bytes:
    n = len(data) if length is None else length
    return p.OPTION.pack(p.IHAVEOPT, code, n) + data


names = st.sampled_from(["disk", "ro", "", "nope", "d\u00e9"])
queries = st.lists(st.sampled_from(["base:allocation", "base:", "qemu:dirty", "x" * 300]),
                   max_size=3)


@st.composite
def option_payloads(draw: st.DrawFn) -> bytes:
    code = draw(st.sampled_from([p.OPT_INFO, p.OPT_GO, p.OPT_LIST, p.OPT_STARTTLS,
                                 p.OPT_STRUCTURED_REPLY, p.OPT_LIST_META_CONTEXT,
                                 p.OPT_SET_META_CONTEXT, 0, 4, 11, 99, 1 << 31]))
    if draw(st.booleans()):
        return option(code, draw(st.binary(max_size=64)))
    name = draw(names).encode()
    if code in (p.OPT_INFO, p.OPT_GO):
        infos = draw(st.lists(st.integers(0, 0xFFFF), max_size=4))
        data = (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                + struct.pack(f">{len(infos)}H", *infos))
    elif code in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
        qs = draw(queries)
        data = (p.pack_string(name.decode()) + struct.pack(">I", len(qs))
                + b"".join(p.pack_string(q) for q in qs))
    else:
        data = b""
    if draw(st.booleans()):  # a lying length field
        return option(code, data, draw(st.integers(0, 2**32 - 1)))
    return option(code, data)


@FUZZ
@given(flags=st.integers(0, 2**32 - 1), body=st.binary(max_size=300))
def test_handshake_random_bytes(flags: int, body: bytes) -> None:
    async def scenario(sock: str, source: MemorySource, bystander: NBDClient) -> None:
        await raw_session(sock, struct.pack(">I", flags) + body)
        assert bytes(await source.read_at(0, SIZE)) == INITIAL

    with_server(scenario)


@FUZZ
@given(opts=st.lists(option_payloads(), max_size=6), end=st.sampled_from([b"", b"abort"]))
def test_handshake_option_sequences(opts: list[bytes], end: bytes) -> None:
    tail = option(p.OPT_ABORT, b"") if end else b""

    async def scenario(sock: str, source: MemorySource, bystander: NBDClient) -> None:
        replies = await raw_session(sock, struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | 2)
                                    + b"".join(opts) + tail)
        pos = 0  # every reply is a well-formed option reply until one selects an export
        while pos + p.OPTION_REPLY.size <= len(replies):
            magic, _, _kind, length = p.OPTION_REPLY.unpack_from(replies, pos)
            assert magic == p.REPLY_MAGIC
            pos += p.OPTION_REPLY.size + length
        assert bytes(await source.read_at(0, SIZE)) == INITIAL

    with_server(scenario)


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=200), prefix=st.sampled_from([b"", b"valid"]))
def test_transmission_garbage(garbage: bytes, prefix: bytes) -> None:
    """Random bytes where requests belong, after a valid request or none."""
    go = p.pack_string("disk") + struct.pack(">H", 0)
    request = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 1, 0, 8) if prefix else b""

    async def scenario(sock: str, source: MemorySource, bystander: NBDClient) -> None:
        replies = await raw_session(sock, struct.pack(">I", 3) + option(p.OPT_GO, go)
                                    + request + garbage)
        assert p.OPTION_REPLY.unpack_from(replies)[2] == p.REP_INFO
        assert bytes(await source.read_at(0, SIZE)) == INITIAL

    with_server(scenario)


commands = st.sampled_from([p.CMD_READ, p.CMD_WRITE, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_CACHE,
                            p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS, p.CMD_DISC, 8, 77,
                            0xFFFF])
offsets = st.one_of(st.integers(0, SIZE), st.sampled_from([SIZE - 1, SIZE + 1, 2**63, 2**64 - 1]))
lengths = st.one_of(st.integers(0, 70_000), st.sampled_from([SIZE, SIZE + 1, MAX_PAYLOAD + 1,
                                                             2**32 - 1]))
flag_bits = st.one_of(st.just(0), st.sampled_from([1, 2, 4, 8, 16, 32, 0x8000]),
                      st.integers(0, 0xFFFF))
requests = st.tuples(st.sampled_from(["disk", "ro"]), commands, flag_bits, offsets, lengths,
                     st.booleans())


@FUZZ
@given(reqs=st.lists(requests, min_size=1, max_size=12))
def test_commands(reqs: list[tuple[str, int, int, int, int, bool]]) -> None:
    async def scenario(sock: str, source: MemorySource, bystander: NBDClient) -> None:
        model = bytearray(INITIAL)
        clients: dict[str, NBDClient] = {}
        for n, (name, cmd, flags, offset, length, structured) in enumerate(reqs):
            client = clients.get(name)
            if client is None:
                client = await NBDClient.connect(f"nbd+unix:///{name}?socket={sock}",
                                                 structured=structured)
                clients[name] = client
            if cmd == p.CMD_WRITE and 70_000 < length <= MAX_PAYLOAD:
                continue  # a payload this size is too slow to fuzz with
            payload = bytes([n + 1]) * length if cmd == p.CMD_WRITE and length <= 70_000 else b""
            if cmd == p.CMD_READ:
                expect = bytes(model[offset : offset + length])
            try:
                if cmd == p.CMD_READ:
                    got = await client.read(offset, length) if length <= MAX_PAYLOAD else None
                    if got is not None:
                        assert got == expect
                        assert offset + length <= SIZE and length > 0
                    continue
                await client.request_raw(cmd, flags, offset, length, payload)
            except p.NBDError:
                continue  # rejected: the model stays as it was
            except ConnectionError:
                del clients[name]  # a clean disconnect is the other allowed answer
                await client.close()
                continue
            assert (offset + length <= SIZE and length > 0) or cmd == p.CMD_FLUSH
            assert name == "disk" or cmd not in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
            if cmd == p.CMD_WRITE:
                model[offset : offset + length] = payload
            elif cmd in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
                model[offset : offset + length] = bytes(length)
            else:
                assert cmd in (p.CMD_FLUSH, p.CMD_CACHE, p.CMD_BLOCK_STATUS)
        for client in clients.values():
            await client.close()
        assert bytes(await source.read_at(0, SIZE)) == bytes(model)
        assert await bystander.read(0, SIZE) == model

    with_server(scenario)


def test_unknown_option_gets_unsupported() -> None:
    async def scenario(sock: str, source: MemorySource, bystander: NBDClient) -> None:
        replies = await raw_session(sock, struct.pack(">I", 3) + option(99, b"xyz"))
        assert p.OPTION_REPLY.unpack_from(replies) == (p.REPLY_MAGIC, 99, p.REP_ERR_UNSUP,
                                                       len(replies) - p.OPTION_REPLY.size)

    with_server(scenario)


def test_export_name_option_and_simple_read() -> None:
    """The oldest way in: NBD_OPT_EXPORT_NAME, then a READ with a simple reply."""

    async def scenario(sock: str, source: MemorySource, bystander: NBDClient) -> None:
        request = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 42, 100, 16)
        replies = await raw_session(sock, struct.pack(">I", 1) + option(1, b"disk") + request)
        size, flags = struct.unpack_from(">QH", replies)
        assert size == SIZE and flags & p.TF_HAS_FLAGS and not flags & p.TF_SEND_DF
        assert replies[10:134] == bytes(124)  # no NO_ZEROES: the padding is sent
        assert p.SIMPLE_REPLY.unpack_from(replies, 134) == (p.SIMPLE_REPLY_MAGIC, 0, 42)
        assert replies[150:] == INITIAL[100:116]

    with_server(scenario)

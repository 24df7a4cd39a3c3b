"""Hypothesis fuzzing of the wire protocol: every parser, and both live ends.

Whatever a peer sends, the parsers raise ProtocolError or return a well-formed message,
and a live Source or Destination ends with ProtocolError or MigrationError (with a
message) instead of crashing or hanging; the source's devices never change.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from dataclasses import dataclass, field

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from roam.migration import wire as w
from roam.migration.channel import FrameProtocol, PeerLost
from roam.migration.destination import Destination, DestinationResult
from roam.migration.errors import MigrationError
from roam.migration.hybrid import StoreOpener
from roam.migration.source import Source, SourceDevice, SourceResult
from roam.migration.wire import Caps, Encoding, ErrorCode, EventKind, MsgType, ProtocolError
from roam.peer.syncing import open_store
from roam.storage.sources import MemorySource
from tests.migration.conftest import memory_device

PARSE = settings(max_examples=200, deadline=None)
LIVE = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BS = 4096
SIZES = {"a": 3 * BS + 100, "b": 2 * BS}  # 4 and 2 blocks
GROUP = w.Group(name="g", devices=[
    w.DeviceSpec(id=i, name=name, size=size, block_size=BS)
    for i, (name, size) in enumerate(SIZES.items())
])


# -- parsers ---------------------------------------------------------------------------


def _check_message(kind: MsgType, body: bytes, msg: w.Message) -> None:
    """A decoded message is internally consistent: nothing unchecked got through."""
    if isinstance(msg, w.Blocks):
        assert msg.count >= 1
        if msg.encoding in (Encoding.RAW, Encoding.SCATTER):
            assert len(msg.hashes) == w.HASH_LEN
            assert len(msg.carried) == w.carried_len(msg.count)
            assert msg.encoding == Encoding.SCATTER or any(msg.carried)
            assert int.from_bytes(msg.carried, "little") >> msg.count == 0
            if msg.encoding == Encoding.SCATTER:
                assert len(msg.offsets) == msg.count <= w.MAX_SCATTER and msg.offsets[0] == 0
                assert (msg.offsets[1:] > msg.offsets[:-1]).all()
            else:
                assert not len(msg.offsets)
        elif msg.encoding == Encoding.HAVE:
            assert 1 <= msg.unit <= w.MAX_UNIT and not msg.unit & (msg.unit - 1)
            units = -(-msg.count // msg.unit)
            assert len(msg.hashes) == units * w.CONTENT_HASH_LEN
        else:
            n = 0 if msg.encoding == Encoding.ZERO else w.HASH_LEN
            assert len(msg.hashes) == msg.count * n
        if msg.encoding in (Encoding.ZSTD, Encoding.LZ4):
            assert len(msg.lengths) == msg.count and sum(msg.lengths) == len(msg.payload)
        elif msg.encoding in (Encoding.ZERO, Encoding.HAVE):
            assert not msg.payload
    elif isinstance(msg, w.Hashes):
        n = w.HASH_LEN if kind == MsgType.HASHES else w.CONTENT_HASH_LEN
        assert all(len(d) == n for d in msg.digests)
        assert msg.first % msg.unit == 0 and (kind == MsgType.HAVE or msg.unit == 1)
    elif isinstance(msg, w.Dirty):
        assert len(body) == 6 + 8 * len(msg.blocks)
    elif isinstance(msg, w.Range):
        assert msg.kind == kind
    elif isinstance(msg, w.Event):
        assert isinstance(msg.kind, EventKind)
    elif isinstance(msg, w.Safe):
        assert 1 <= len(msg.chunks) <= w.MAX_SAFE
        assert len(msg.addresses) == w.CONTENT_HASH_LEN * len(msg.chunks)
        assert (msg.chunks[1:] > msg.chunks[:-1]).all()
        assert 1 <= msg.chunk_blocks <= w.MAX_UNIT and not msg.chunk_blocks & (
            msg.chunk_blocks - 1)
    elif isinstance(msg, w.Store):
        assert msg.descriptor is None or len(msg.descriptor.key) == 64


def _decode_or_error(kind: MsgType, body: bytes) -> w.Message | None:
    try:
        msg = w.decode(kind, memoryview(body))
    except ProtocolError as e:
        assert str(e)
        return None
    _check_message(kind, body, msg)
    return msg


@PARSE
@given(st.binary(max_size=16))
def test_parse_header_arbitrary_bytes(data: bytes) -> None:
    try:
        kind, length = w.parse_header(data)
    except ProtocolError as e:
        assert str(e)
        return
    assert len(data) == 8 and isinstance(kind, MsgType) and 0 <= length <= w.MAX_BODY


@PARSE
@given(st.sampled_from(list(MsgType)), st.binary(max_size=300))
def test_decode_arbitrary_bodies(kind: MsgType, body: bytes) -> None:
    _decode_or_error(kind, body)


@PARSE
@given(st.sampled_from(list(MsgType)), st.binary(max_size=40), st.integers(0, 5000),
       st.integers(0, 2**32 - 1))
def test_decode_bodies_with_huge_counts(kind: MsgType, prefix: bytes, pad: int,
                                        count: int) -> None:
    """Count fields near the u32 limit with short bodies are refused, never trusted."""
    body = bytearray(prefix.ljust(16, b"\0")[:16]) + bytes(pad % 64)
    if kind == MsgType.BLOCKS:
        struct.pack_into("!I", body, 12, count)
    elif kind == MsgType.DIRTY:
        struct.pack_into("!I", body, 2, count)
    elif kind in (MsgType.HASHES, MsgType.HAVE):
        struct.pack_into("!I", body, 10, count)
    elif kind == MsgType.SAFE:
        struct.pack_into("!I", body, 6, count)
    _decode_or_error(kind, bytes(body))


def test_decode_deeply_nested_group() -> None:
    for text in (b"[" * 100_000, b'{"a":' * 100_000):
        with pytest.raises(ProtocolError, match="GROUP"):
            w.decode(MsgType.GROUP, memoryview(text))


def test_parse_header_refuses() -> None:
    for header, why in [
        (struct.pack("!BBHI", 0x55, 0, 0, 0), "unknown message type"),
        (struct.pack("!BBHI", MsgType.EVENT, 1, 0, 1), "flags"),
        (struct.pack("!BBHI", MsgType.EVENT, 0, 7, 1), "reserved"),
        (struct.pack("!BBHI", MsgType.BLOCKS, 0, 0, w.MAX_BODY + 1), "limit"),
        (b"\x01\x00", "header"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            w.parse_header(header)


# Strategies for valid frames of every kind (their fields span the whole legal range).

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
digest16 = st.binary(min_size=16, max_size=16)
digest32 = st.binary(min_size=32, max_size=32)
names = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)


@st.composite
def groups(draw: st.DrawFn) -> w.Group:
    n = draw(st.integers(0, 4))
    ids = draw(st.lists(u16, min_size=n, max_size=n, unique=True))
    dev_names = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    devices = [w.DeviceSpec(id=i, name=name, size=draw(st.integers(0, 1 << 50)),
                            block_size=1 << draw(st.integers(12, 24)),
                            sized_at_handover=draw(st.booleans()))
               for i, name in zip(ids, dev_names, strict=True)]
    package = draw(st.one_of(st.just(""), st.from_regex(r"[0-9a-f]{32}", fullmatch=True)))
    return w.Group(name=draw(st.text(max_size=20)), devices=devices, package=package)


@st.composite
def blocks_frames(draw: st.DrawFn) -> tuple[bytes, tuple[object, ...]]:
    device, first = draw(u16), draw(u64)
    encoding = draw(st.sampled_from(list(Encoding)))
    count = draw(st.integers(1, 20))
    lengths: list[int] = []
    payload = b""
    carried = b""
    unit = 0
    if encoding == Encoding.RAW:
        bits = draw(st.lists(st.booleans(), min_size=count, max_size=count).filter(any))
        carried = sum(1 << i for i, b in enumerate(bits) if b).to_bytes(w.carried_len(count),
                                                                        "little")
        hashes = draw(digest16)
        payload = draw(st.binary(max_size=200))
        frame = w.encode_raw_header(device, first, count, carried, hashes, len(payload))
    elif encoding == Encoding.SCATTER:
        offsets = sorted(draw(st.sets(st.integers(1, 2**32 - 1), min_size=count - 1,
                                      max_size=count - 1)))
        bits = draw(st.lists(st.booleans(), min_size=count, max_size=count))
        carried = sum(1 << i for i, b in enumerate(bits) if b).to_bytes(w.carried_len(count),
                                                                        "little")
        hashes = draw(digest16)
        payload = draw(st.binary(max_size=200))
        first = min(first, 2**64 - 1 - 2**32)
        frame = w.encode_scatter_header(device, np.array([first] + [first + o for o in offsets],
                                                         dtype=np.int64),
                                        carried, hashes, len(payload))
    elif encoding == Encoding.HAVE:
        unit = 1 << draw(st.integers(0, 16))
        n = -(-count // unit)
        hashes = draw(st.binary(min_size=32 * n, max_size=32 * n))
        frame = w.encode_have_blocks(device, first, count, unit, hashes)
    else:
        hash_len = 0 if encoding == Encoding.ZERO else 16
        hashes = draw(st.binary(min_size=count * hash_len, max_size=count * hash_len))
        if encoding in (Encoding.ZSTD, Encoding.LZ4):
            lengths = draw(st.lists(st.integers(0, 50), min_size=count, max_size=count))
            payload = draw(st.binary(min_size=sum(lengths), max_size=sum(lengths)))
        frame = w.encode_blocks_header(device, encoding, first, count, hashes, lengths,
                                       len(payload))
    return frame + payload, (device, encoding, first, count, hashes, tuple(lengths), payload,
                             carried, unit)


valid_frames = st.one_of(
    st.builds(lambda c: (w.encode_hello(Caps(c)), ("hello", w.VERSION, Caps(c) & w.ALL_CAPS)),
              st.integers(0, 7)),
    groups().map(lambda g: (w.encode_group(g), ("group", g))),
    blocks_frames(),
    st.builds(lambda k, d, o, n: (w.encode_range(k, d, o, n), (k, d, o, n)),
              st.sampled_from([MsgType.NEED_AT, MsgType.DONT_NEED_AT]), u16, u64, u32),
    st.builds(lambda d, b: (w.encode_dirty(d, b), ("dirty", d, tuple(b))),
              u16, st.lists(u64, max_size=50)),
    st.builds(lambda d, f, h: (w.encode_hashes(MsgType.HASHES, d, f, h), ("hashes", d, f, h)),
              u16, u64, st.lists(digest16, max_size=20)),
    st.builds(lambda d, f, u, h: (w.encode_hashes(MsgType.HAVE, d, f << u, h, 1 << u),
                                  ("have", d, f << u, h, 1 << u)),
              u16, st.integers(0, 2**40), st.integers(0, 16), st.lists(digest32, max_size=20)),
    st.builds(lambda k, p: (w.encode_event(k, p), ("event", k, p)),
              st.sampled_from(list(EventKind)), st.binary(max_size=100)),
    st.builds(lambda c, m: (w.encode_error(c, m), ("error", c, m)),
              st.sampled_from(list(ErrorCode)), st.text(max_size=100)),
    st.builds(lambda d: (w.encode_store(d), ("store", d)), st.none() | st.builds(
        w.StoreDescriptor, url=st.from_regex(r"s3://[a-z0-9]{3,10}(/[a-z0-9._-]{1,8}){0,2}",
                                             fullmatch=True),
        endpoint_url=st.none() | st.just("http://127.0.0.1:9000"),
        key=st.binary(min_size=32, max_size=32).map(bytes.hex),
        chunks=st.integers(0, 2**32))),
    st.builds(lambda d, u, c, a: (w.encode_safe(d, 1 << u, np.array(sorted(c), dtype=np.uint64),
                                                a[: 32 * len(c)]),
                                  ("safe", d, 1 << u, sorted(c), a[: 32 * len(c)])),
              u16, st.integers(0, 16), st.sets(u64, min_size=1, max_size=20),
              st.binary(min_size=640, max_size=640)),
)


def _split(frame: bytes) -> tuple[MsgType, bytes]:
    kind, length = w.parse_header(frame[:8])
    assert length == len(frame) - 8
    return kind, frame[8:]


@PARSE
@given(valid_frames)
def test_round_trip_every_encoder(case: tuple[bytes, tuple[object, ...]]) -> None:
    frame, want = case
    kind, body = _split(frame)
    msg = w.decode(kind, memoryview(body))
    _check_message(kind, body, msg)
    tag = want[0]
    if tag == "hello":
        assert msg == w.Hello(w.VERSION, want[2])  # type: ignore[arg-type]
    elif tag == "group":
        assert msg == want[1]
    elif isinstance(msg, w.Blocks):
        device, encoding, first, count, hashes, lengths, payload, carried, unit = want
        assert (msg.device, msg.encoding, msg.first, msg.count) == (device, encoding, first,
                                                                     count)
        assert bytes(msg.hashes) == hashes and msg.lengths == lengths
        assert bytes(msg.payload) == payload and bytes(msg.carried) == carried
        assert msg.unit == unit
        n = 32 if encoding == Encoding.HAVE else 16
        if hashes:
            assert msg.hash(len(hashes) // n - 1) == hashes[-n:]  # type: ignore[index,operator]
    elif isinstance(msg, w.Range):
        assert (msg.kind, msg.device, msg.offset, msg.length) == want
    elif tag == "dirty":
        assert msg == w.Dirty(want[1], want[2])  # type: ignore[arg-type]
    elif tag in ("hashes", "have"):
        assert isinstance(msg, w.Hashes)
        assert (msg.device, msg.first, list(msg.digests)) == (want[1], want[2], want[3])
        assert msg.unit == (want[4] if tag == "have" else 1)
    elif tag == "event":
        assert msg == w.Event(want[1], want[2])  # type: ignore[arg-type]
    elif tag == "store":
        assert msg == w.Store(want[1])  # type: ignore[arg-type]
    elif tag == "safe":
        assert isinstance(msg, w.Safe)
        assert (msg.device, msg.chunk_blocks, msg.chunks.tolist(), msg.addresses) == want[1:]
    else:
        assert msg == w.Error(want[1], want[2])  # type: ignore[arg-type]


def test_error_message_is_cut_on_a_character_boundary() -> None:
    text = "x" + "\u00e9" * 5000  # the 4096th byte is the middle of a character
    kind, body = _split(w.encode_error(ErrorCode.IO, text))
    msg = w.decode(kind, memoryview(body))
    assert isinstance(msg, w.Error)
    assert "\ufffd" not in msg.message and text.startswith(msg.message)
    assert len(msg.message.encode()) <= 4096


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(valid_frames)[0])
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(["flip", "truncate", "extend", "byte"]))
        if what == "flip" and frame:
            i = draw(st.integers(0, len(frame) - 1))
            frame[i] ^= 1 << draw(st.integers(0, 7))
        elif what == "byte" and frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
        elif what == "truncate":
            del frame[draw(st.integers(0, len(frame))) :]
        else:
            frame += draw(st.binary(min_size=1, max_size=20))
    return bytes(frame)


@PARSE
@given(mutated_frames())
def test_mutated_frames(frame: bytes) -> None:
    try:
        kind, length = w.parse_header(frame[:8])
    except ProtocolError:
        return
    # The transport hands decode exactly `length` bytes; check both what the mutated
    # frame holds and the declared size (zero-padded), as a stream would deliver it.
    _decode_or_error(kind, frame[8 : 8 + length])
    if length <= 1024:
        _decode_or_error(kind, frame[8 : 8 + length].ljust(length, b"\0"))


# -- live ends over a real socket pair ----------------------------------------------------


async def _channel_pair() -> tuple[FrameProtocol, FrameProtocol]:
    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    pa, pb = FrameProtocol(), FrameProtocol()
    await loop.create_unix_connection(lambda: pa, sock=a)
    await loop.create_unix_connection(lambda: pb, sock=b)
    return pa, pb


@dataclass
class Peer:
    """The fuzzer's end: reads (and keeps) everything the end under test sends."""

    channel: FrameProtocol
    frames: list[tuple[MsgType, bytes]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> Peer:
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            while True:
                kind, body = await self.channel.recv()
                self.frames.append((kind, bytes(body)))
        except (PeerLost, ProtocolError):
            pass

    def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.channel.send(frame)

    def errors(self) -> list[str]:
        out = []
        for kind, body in self.frames:
            if kind == MsgType.ERROR:
                msg = w.decode(kind, memoryview(body))
                assert isinstance(msg, w.Error)
                out.append(msg.message)
        return out


Outcome = BaseException | DestinationResult | SourceResult


async def _finish(task: asyncio.Task[Outcome], peer: Peer, ours: FrameProtocol,
                  close_peer: bool) -> Outcome:
    """The end's outcome; with close_peer, the peer hangs up after its frames."""
    if close_peer:
        await peer.channel.drain()
        await peer.channel.close()
    try:
        async with asyncio.timeout(10):  # a hang guard, not a timing assertion
            try:
                outcome: Outcome = await task
            except (ProtocolError, MigrationError) as e:
                outcome = e
            await ours.close()  # flushes what the end sent, so the peer sees it
            assert peer.task is not None
            if close_peer:
                peer.task.cancel()
            await asyncio.gather(peer.task, return_exceptions=True)
    finally:
        task.cancel()
        await peer.channel.close()
    if isinstance(outcome, BaseException):
        assert str(outcome), f"{type(outcome).__name__} without a message"
    if currently_in_test_context():  # see --hypothesis-show-statistics
        event(f"{type(outcome).__name__}: {str(outcome)[:30]}")
    return outcome


async def destination_session(frames: list[bytes], *, close_peer: bool,
                              store: StoreOpener | None = None,
                              ) -> tuple[Outcome, Peer, Destination]:
    src_ch, dst_ch = await _channel_pair()
    dest = Destination(dst_ch, memory_device, store=store)
    peer = Peer(src_ch).start()
    task: asyncio.Task[Outcome] = asyncio.create_task(dest.run())  # type: ignore[arg-type]
    peer.send(frames)
    return await _finish(task, peer, dst_ch, close_peer), peer, dest


PREFIX = [w.encode_hello(w.ALL_CAPS), w.encode_group(GROUP)]
# A package id is what a destination looks its held packages up by: never a path.
_BAD_PACKAGE = b'{"name": "g", "devices": [], "package": "../../etc/passwd"}'


def _raw(device: int, first: int, blocks: list[bytes | None], *, hashes: bytes | None = None,
         extra: bytes = b"") -> bytes:
    """A RAW frame of these blocks (None: a zero block, left out of the payload)."""
    payload = b"".join(b for b in blocks if b is not None) + extra
    if hashes is None:
        hashes = xxhash.xxh3_128_digest(payload)
    carried = sum(1 << i for i, b in enumerate(blocks) if b is not None)
    return w.encode_raw_header(device, first, len(blocks),
                               carried.to_bytes(w.carried_len(len(blocks)), "little"), hashes,
                               len(payload)) + payload


def _scatter(device: int, blocks: dict[int, bytes | None], *, hashes: bytes | None = None,
             extra: bytes = b"") -> bytes:
    """A SCATTER frame of these blocks by number (None: a zero block, not in the payload)."""
    numbers = sorted(blocks)
    payload = b"".join(b for n in numbers if (b := blocks[n]) is not None) + extra
    if hashes is None:
        hashes = xxhash.xxh3_128_digest(payload)
    carried = sum(1 << i for i, n in enumerate(numbers) if blocks[n] is not None)
    return w.encode_scatter_header(device, np.array(numbers, dtype=np.int64),
                                   carried.to_bytes(w.carried_len(len(numbers)), "little"),
                                   hashes, len(payload)) + payload


def _swap_offsets(frame: bytes) -> bytes:
    """A SCATTER frame with its second and third block offsets swapped."""
    at = 8 + 16 + 4  # header, fixed part, offset 0
    return frame[:at] + frame[at + 4 : at + 8] + frame[at : at + 4] + frame[at + 8 :]


def _have(device: int, first: int, count: int, unit: int, digests: bytes) -> bytes:
    return w.encode_have_blocks(device, first, count, unit, digests)


def _bad_destination_cases() -> dict[str, tuple[list[bytes], str]]:
    ok0 = bytes([1]) * BS
    authority = w.encode_event(EventKind.AUTHORITY, b"app")
    return {
        "garbage header": ([b"\x99" * 64], "unknown message type"),
        "flags set": ([struct.pack("!BBHI", MsgType.EVENT, 4, 0, 1) + b"\x05"], "flags"),
        "blocks before group": ([w.encode_hello(w.ALL_CAPS), _raw(0, 0, [ok0])],
                                "no device 0"),
        "wrong version": ([struct.pack("!BBHI", MsgType.HELLO, 0, 0, 10)
                           + struct.pack("!4sHI", w.MAGIC, 99, 0)], "version 99"),
        "bad magic": ([struct.pack("!BBHI", MsgType.HELLO, 0, 0, 10)
                       + struct.pack("!4sHI", b"NOPE", 1, 0)], "magic"),
        "unknown device": ([*PREFIX, _raw(7, 0, [ok0])], "no device 7"),
        "block beyond end": ([*PREFIX, _raw(1, 2, [ok0])], "beyond the end"),
        "run beyond end": ([*PREFIX, _raw(0, 2, [ok0, ok0, ok0])], "beyond the end"),
        "huge first block": ([*PREFIX, _raw(0, 2**64 - 1, [ok0])], "beyond the end"),
        "short payload": ([*PREFIX, _raw(0, 0, [ok0[:-1]])], "payload"),
        "long payload": ([*PREFIX, _raw(0, 0, [ok0], extra=b"!")], "payload"),
        "last block full size": ([*PREFIX, _raw(0, 3, [ok0])], "payload"),
        "undecodable zstd": ([*PREFIX, w.encode_blocks_header(
            0, Encoding.ZSTD, 0, 1, bytes(16), [5], 5) + b"junk!"], "decompress"),
        "zstd wrong size": ([*PREFIX, w.encode_blocks_header(
            0, Encoding.LZ4, 0, 1, bytes(16), [1], 1) + b"\x10"], "LZ4"),
        "dirty unknown device": ([*PREFIX, w.encode_dirty(5, [0])], "no device 5"),
        "dirty beyond end": ([*PREFIX, w.encode_dirty(1, [0, 2])], "beyond"),
        "hashes unknown device": ([*PREFIX, w.encode_hashes(MsgType.HASHES, 9, 0,
                                                           [bytes(16)])], "no device 9"),
        "hashes beyond end": ([*PREFIX, w.encode_hashes(MsgType.HASHES, 0, 1,
                                                       [bytes(16)] * 4)], "beyond the end"),
        "have from source": ([*PREFIX, w.encode_hashes(MsgType.HAVE, 0, 0, [bytes(32)])],
                             "unexpected"),
        "need from source": ([*PREFIX, w.encode_range(MsgType.NEED_AT, 0, 0, 1)],
                             "unexpected"),
        "second group": ([*PREFIX, w.encode_group(GROUP)], "GROUP sent twice"),
        "package not an id": ([w.encode_hello(w.ALL_CAPS), struct.pack(
            "!BBHI", MsgType.GROUP, 0, 0, len(_BAD_PACKAGE)) + _BAD_PACKAGE],
                              "invalid group description"),
        "authority twice": ([*PREFIX, authority, authority], "AUTHORITY sent twice"),
        "authority before group": ([authority], "AUTHORITY before GROUP"),
        "complete before authority": ([*PREFIX, w.encode_event(EventKind.COMPLETE)],
                                      "COMPLETE before AUTHORITY"),
        "ready from source": ([*PREFIX, w.encode_event(EventKind.READY)], "unexpected event"),
        "bad event": ([*PREFIX, struct.pack("!BBHI", MsgType.EVENT, 0, 0, 1) + b"\x63"],
                      "unknown kind"),
        "error from source": ([*PREFIX, w.encode_error(ErrorCode.IO, "disk on fire")],
                              "disk on fire"),
        "corrupt block every time": (
            [*PREFIX] + [_raw(1, 0, [ok0], hashes=bytes(16))] * 4, "failed verification"),
        "raw map beyond the run": ([*PREFIX, w.encode_raw_header(
            0, 0, 2, b"\x07", bytes(16), 0)], "beyond the run"),
        "raw carries nothing": ([*PREFIX, w.encode_raw_header(
            0, 0, 2, b"\x00", bytes(16), 0)], "carries no block"),
        "raw short of its zero blocks": ([*PREFIX, _raw(0, 0, [ok0, None], extra=ok0)],
                                         "payload"),
        "scatter beyond end": ([*PREFIX, _scatter(0, {0: ok0, 4: ok0})], "beyond the end"),
        "scatter short payload": ([*PREFIX, _scatter(0, {0: ok0, 2: ok0[:-1]})], "payload"),
        "scatter long payload": ([*PREFIX, _scatter(0, {0: ok0, 2: None}, extra=b"!")],
                                 "payload"),
        "scatter last block full size": ([*PREFIX, _scatter(0, {1: ok0, 3: ok0})], "payload"),
        "scatter unasked": ([w.encode_hello(w.ALL_CAPS & ~Caps.SCATTER), w.encode_group(GROUP),
                             _scatter(0, {0: ok0, 2: ok0})], "did not advertise"),
        "scatter offsets not ascending": ([*PREFIX, _swap_offsets(_scatter(0, {0: ok0, 1: ok0,
                                                                             2: ok0}))],
                                          "ascend"),
        "scatter corrupt three times": (
            [*PREFIX] + [_scatter(1, {0: ok0, 1: None}, hashes=bytes(16))] * 4,
            "failed verification"),
        "have unit not a power of two": ([*PREFIX, _have(0, 0, 3, 3, bytes(32))], "unit 3"),
        "have without a have list": ([*PREFIX, _have(0, 0, 1, 1, bytes(32))],
                                     "HAVE lists' units"),
        "have list to destination": ([*PREFIX, w.encode_hashes(MsgType.HAVE, 0, 2,
                                                               [bytes(32)], 2)], "unexpected"),
        "store unasked": ([*PREFIX, w.encode_store(None)], "STORE unasked"),
        "safe without store": ([*PREFIX, _safe(0, [0])], "SAFE without STORE"),
    }


def _safe(device: int, chunks: list[int], chunk_blocks: int = 2) -> bytes:
    return w.encode_safe(device, chunk_blocks, np.array(chunks, dtype=np.uint64),
                         bytes(32 * len(chunks)))


def _store(chunks: int) -> bytes:
    return w.encode_store(w.StoreDescriptor(url="s3://roam-fuzz/p", key="00" * 32,
                                            endpoint_url="http://127.0.0.1:9",
                                            chunks=chunks))


def _bad_store_cases() -> dict[str, tuple[list[bytes], str]]:
    authority = w.encode_event(EventKind.AUTHORITY, b"app")
    return {
        "store twice": ([*PREFIX, _store(0), _store(0)], "twice"),
        "store before group": ([w.encode_hello(w.ALL_CAPS), _store(0)], "before GROUP"),
        "store after authority": ([*PREFIX, authority, _store(0)], "after AUTHORITY"),
        "safe beyond its count": ([*PREFIX, _store(1), _safe(0, [0, 1])], "beyond its count"),
        "safe beyond the device": ([*PREFIX, _store(1), _safe(1, [1])], "beyond device b"),
        "safe unknown device": ([*PREFIX, _store(1), _safe(4, [0])], "no device 4"),
        "safe not ascending": ([*PREFIX, _store(2), w.encode_safe(
            0, 2, np.array([1, 0], dtype=np.uint64), bytes(64))], "ascending"),
    }


@pytest.mark.parametrize("case", list(_bad_store_cases()))
async def test_destination_with_a_store_refuses(case: str) -> None:
    """A destination that can take blocks from an object store (its opener is real; the
    store it names does not answer, so nothing is ever fetched)."""
    frames, why = _bad_store_cases()[case]
    outcome, peer, _ = await destination_session(frames, close_peer=False, store=open_store)
    assert isinstance(outcome, ProtocolError | MigrationError), outcome
    assert why in str(outcome) and any(why in m for m in peer.errors()), peer.errors()


async def test_destination_asks_the_source_for_what_the_store_cannot_give() -> None:
    src_ch, dst_ch = await _channel_pair()
    dest = Destination(dst_ch, memory_device, store=open_store)
    peer = Peer(src_ch).start()
    task: asyncio.Task[Outcome] = asyncio.create_task(dest.run())  # type: ignore[arg-type]
    peer.send([*PREFIX, _store(2), _safe(0, [0, 1])])

    def asked() -> list[tuple[int, int]]:
        ranges = [w.decode(k, memoryview(b)) for k, b in peer.frames if k == MsgType.NEED_AT]
        return sorted((r.offset, r.length) for r in ranges if isinstance(r, w.Range))

    async with asyncio.timeout(30):
        while len(asked()) < 2:  # noqa: ASYNC110 (frames arrive on the peer's reader task)
            await asyncio.sleep(0.02)
    assert asked() == [(0, 2 * BS), (2 * BS, SIZES["a"] - 2 * BS)]
    assert dest.result.store_fallback_chunks == 2
    assert isinstance(await _finish(task, peer, dst_ch, True), MigrationError)


@pytest.mark.parametrize("case", list(_bad_destination_cases()))
async def test_destination_refuses(case: str) -> None:
    frames, why = _bad_destination_cases()[case]
    outcome, peer, dest = await destination_session(frames, close_peer=False)
    assert isinstance(outcome, ProtocolError | MigrationError), outcome
    assert why in str(outcome)
    if not str(outcome).startswith("source:"):  # the peer hears why, unless it said so
        assert any(why in m for m in peer.errors()), peer.errors()
    for cache in dest.devices.values():  # readers of missing blocks fail, not hang
        if cache.missing():
            with pytest.raises(Exception, match="not available"):
                await cache.read_at(cache.missing()[0] * BS, 1)


async def test_destination_reports_truncated_frame() -> None:
    frame = _raw(0, 0, [bytes([1]) * BS])
    outcome, _, _ = await destination_session([*PREFIX, frame[:100]], close_peer=True)
    assert isinstance(outcome, MigrationError)
    assert "lost the source" in str(outcome) and "middle of a message" in str(outcome)


async def test_destination_accepts_a_good_sequence() -> None:
    """The fuzz harness itself: a correct conversation ends in success."""
    blocks: list[bytes | None] = [os.urandom(BS), None, os.urandom(BS), os.urandom(100)]
    frames = [*PREFIX, _raw(0, 0, blocks),
              w.encode_blocks_header(1, Encoding.ZERO, 0, 2, b"", [], 0),
              w.encode_event(EventKind.AUTHORITY, b"p"), w.encode_event(EventKind.COMPLETE)]
    outcome, peer, dest = await destination_session(frames, close_peer=False)
    assert isinstance(outcome, DestinationResult), outcome
    assert bytes(await dest.devices["a"].read_at(0, SIZES["a"])) == b"".join(
        bytes(BS) if b is None else b for b in blocks)
    kinds = [k for k, _ in peer.frames]
    assert kinds[0] == MsgType.HELLO and MsgType.ERROR not in kinds


async def test_destination_applies_scattered_blocks() -> None:
    """SCATTER frames: data blocks, zero blocks and the device's short last block land
    where their numbers say, in one frame each."""
    a = [os.urandom(BS), os.urandom(BS), os.urandom(BS), os.urandom(100)]
    b0 = os.urandom(BS)
    frames = [*PREFIX, _scatter(0, {0: a[0], 2: a[2]}), _scatter(0, {1: a[1], 3: a[3]}),
              _scatter(1, {0: b0, 1: None}),
              w.encode_event(EventKind.AUTHORITY, b"p"), w.encode_event(EventKind.COMPLETE)]
    outcome, peer, dest = await destination_session(frames, close_peer=False)
    assert isinstance(outcome, DestinationResult), outcome
    assert bytes(await dest.devices["a"].read_at(0, SIZES["a"])) == b"".join(a)
    assert bytes(await dest.devices["b"].read_at(0, SIZES["b"])) == b0 + bytes(BS)
    assert outcome.blocks_received == 6 and outcome.integrity_errors == 0
    assert MsgType.ERROR not in [k for k, _ in peer.frames]


# Structured fuzz: valid frames with fields near the group's bounds, plus garbage.

dev_ids = st.sampled_from([0, 0, 0, 1, 1, 2])  # mostly real devices: go deeper
block_nos = st.integers(0, 7)


@st.composite
def to_destination(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 13))
    if choice == 0:
        return draw(st.binary(min_size=1, max_size=40))
    if choice == 1:
        return draw(valid_frames)[0]
    if choice == 2:
        return draw(mutated_frames())
    device, first = draw(dev_ids), draw(block_nos)
    if choice == 3:
        size = SIZES["a" if device == 0 else "b"]
        n = draw(st.integers(1, 3))
        blocks: list[bytes | None] = [
            None if i and draw(st.booleans()) else
            os.urandom(max(0, min(BS, size - (first + i) * BS))) for i in range(n)]
        corrupt = draw(st.booleans())
        return _raw(device, first, blocks, hashes=bytes(16) if corrupt else None,
                    extra=draw(st.sampled_from([b"", b"x"])))
    if choice == 9:
        size = SIZES["a" if device == 0 else "b"]
        numbers = draw(st.sets(block_nos, min_size=1, max_size=4))
        scattered: dict[int, bytes | None] = {
            n: None if draw(st.booleans()) else
            os.urandom(max(0, min(BS, size - n * BS))) for n in numbers}
        corrupt = draw(st.booleans())
        return _scatter(device, scattered, hashes=bytes(16) if corrupt else None,
                        extra=draw(st.sampled_from([b"", b"x"])))
    if choice == 4:
        n = draw(st.integers(1, 3))
        if draw(st.booleans()):
            return w.encode_blocks_header(device, Encoding.ZERO, first, n, b"", [], 0)
        unit = draw(st.sampled_from([1, 2]))
        return _have(device, first, n, unit, draw(st.binary(min_size=32 * -(-n // unit),
                                                            max_size=32 * -(-n // unit))))
    if choice == 5:
        return w.encode_dirty(device, draw(st.lists(block_nos, max_size=4)))
    if choice == 6:
        return w.encode_hashes(MsgType.HASHES, device, first,
                               draw(st.lists(digest16, max_size=5)))
    if choice == 7:
        return w.encode_event(draw(st.sampled_from(list(EventKind))),
                              draw(st.binary(max_size=8)))
    if choice == 8:
        return w.encode_group(GROUP)
    if 10 <= choice <= 12:  # well-formed blocks that fit: they let a conversation get far
        size = SIZES["a" if device == 0 else "b"]
        first = min(first, (size - 1) // BS)
        return _raw(device, first, [os.urandom(min(BS, size - first * BS))])
    return w.encode_range(draw(st.sampled_from([MsgType.NEED_AT, MsgType.DONT_NEED_AT])),
                          device, first * BS, draw(st.integers(0, 2 * BS)))


@LIVE
@given(st.booleans(), st.lists(to_destination(), min_size=1, max_size=8))
def test_destination_fuzz(with_prefix: bool, frames: list[bytes]) -> None:
    async def main() -> None:
        outcome, _, dest = await destination_session(
            ([*PREFIX] if with_prefix else []) + frames, close_peer=True)
        if isinstance(outcome, DestinationResult):  # a conversation that happens to work
            assert outcome.group == GROUP
            assert all(not c.missing() for c in dest.devices.values())
        else:
            assert isinstance(outcome, ProtocolError | MigrationError), repr(outcome)

    asyncio.run(main())


# -- source ------------------------------------------------------------------------------


async def source_session(frames: list[bytes], *, close_peer: bool) -> tuple[Outcome, Peer]:
    src_ch, dst_ch = await _channel_pair()
    devices = []
    before = []
    for name, size in SIZES.items():
        mem = MemorySource(size)
        await mem.write_at(0, os.urandom(size))
        before.append((mem, bytes(await mem.read_at(0, size))))
        devices.append(SourceDevice.stack(name, mem, BS))
    source = Source(src_ch, devices)
    peer = Peer(dst_ch).start()
    task: asyncio.Task[Outcome] = asyncio.create_task(source.run())  # type: ignore[arg-type]
    peer.send(frames)
    outcome = await _finish(task, peer, src_ch, close_peer)
    for mem, data in before:  # whatever the peer did, the source's data is untouched
        assert bytes(await mem.read_at(0, mem.size())) == data
    for dev in devices:  # and the devices still work
        await dev.tracker.write_at(0, b"still usable")
        assert bytes(await dev.tracker.read_at(0, 12)) == b"still usable"
    return outcome, peer


HELLO = w.encode_hello(w.ALL_CAPS)
READY = w.encode_event(EventKind.READY)


def _bad_source_cases() -> dict[str, tuple[list[bytes], str]]:
    return {
        "garbage": ([b"\xff" * 30], "unknown message type"),
        "wrong version": ([struct.pack("!BBHI", MsgType.HELLO, 0, 0, 10)
                           + struct.pack("!4sHI", w.MAGIC, 1, 0)], "version 1"),
        "need unknown device": ([HELLO, w.encode_range(MsgType.NEED_AT, 2, 0, 1)],
                                "no device 2"),
        "need beyond end": ([HELLO, w.encode_range(MsgType.NEED_AT, 1, 2 * BS, 1)],
                            "outside device b"),
        "need huge offset": ([HELLO, w.encode_range(MsgType.NEED_AT, 0, 2**64 - 1, 2)],
                             "outside device a"),
        "need empty": ([HELLO, w.encode_range(MsgType.NEED_AT, 0, 0, 0)], "outside"),
        "dont-need beyond end": ([HELLO, w.encode_range(MsgType.DONT_NEED_AT, 0,
                                                        SIZES["a"] - 1, 2)], "outside"),
        "have unknown device": ([HELLO, w.encode_hashes(MsgType.HAVE, 3, 0, [bytes(32)])],
                                "no device 3"),
        "have beyond end": ([HELLO, w.encode_hashes(MsgType.HAVE, 1, 1, [bytes(32)] * 2)],
                            "beyond the end"),
        "have units beyond end": ([HELLO, w.encode_hashes(MsgType.HAVE, 0, 2, [bytes(32)] * 2,
                                                          2)], "beyond the end"),
        "have unit changes": ([HELLO, w.encode_hashes(MsgType.HAVE, 0, 0, [bytes(32)], 2),
                               w.encode_hashes(MsgType.HAVE, 0, 2, [bytes(32)], 1)],
                              "change their unit"),
        "have first not on a unit": ([HELLO, w.encode_hashes(MsgType.HAVE, 0, 1,
                                                             [bytes(32)], 2)], "multiple"),
        "hashes to source": ([HELLO, w.encode_hashes(MsgType.HASHES, 0, 0, [bytes(16)])],
                             "unexpected"),
        "blocks to source": ([HELLO, _raw(0, 0, [bytes(BS)])], "unexpected"),
        "dirty to source": ([HELLO, w.encode_dirty(0, [0])], "unexpected"),
        "group to source": ([HELLO, w.encode_group(GROUP)], "unexpected"),
        "authority to source": ([HELLO, w.encode_event(EventKind.AUTHORITY)],
                                "unexpected event"),
        "ack before authority": ([HELLO, w.encode_event(EventKind.AUTHORITY_ACK)],
                                 "before authority was sent"),
        "decline before authority": ([HELLO, READY,
                                      w.encode_event(EventKind.AUTHORITY_DECLINE)],
                                     "before authority was sent"),
        "done before complete": ([HELLO, READY, w.encode_event(EventKind.DONE)],
                                 "before the source sent COMPLETE"),
        "error from destination": ([HELLO, w.encode_error(ErrorCode.INTEGRITY, "bad")],
                                   "destination: bad"),
    }


@pytest.mark.parametrize("case", list(_bad_source_cases()))
async def test_source_refuses(case: str) -> None:
    frames, why = _bad_source_cases()[case]
    outcome, _ = await source_session(frames, close_peer=False)
    assert isinstance(outcome, ProtocolError | MigrationError), outcome
    assert why in str(outcome)


async def test_source_peer_hangs_up() -> None:
    outcome, _ = await source_session([HELLO, READY], close_peer=True)
    assert isinstance(outcome, MigrationError) and "lost the destination" in str(outcome)


@st.composite
def to_source(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return draw(st.binary(min_size=1, max_size=40))
    if choice == 1:
        return draw(valid_frames)[0]
    if choice == 2:
        return draw(mutated_frames())
    device, first = draw(dev_ids), draw(block_nos)
    if choice == 3:
        return w.encode_range(draw(st.sampled_from([MsgType.NEED_AT, MsgType.DONT_NEED_AT])),
                              device, draw(st.integers(0, 4 * BS)), draw(st.integers(0, 2 * BS)))
    if choice == 4:
        unit = draw(st.sampled_from([1, 2, 4]))
        return w.encode_hashes(MsgType.HAVE, device, first - first % unit,
                               draw(st.lists(digest32, max_size=4)), unit)
    if choice == 5:
        return w.encode_event(draw(st.sampled_from(list(EventKind))),
                              draw(st.binary(max_size=8)))
    return HELLO


@LIVE
@given(st.sampled_from([[], [HELLO], [HELLO, READY]]), st.lists(to_source(), max_size=8))
def test_source_fuzz(prefix: list[bytes], frames: list[bytes]) -> None:
    async def main() -> None:
        outcome, _ = await source_session(prefix + frames, close_peer=True)
        # Nobody acknowledges authority, so the source can never complete.
        assert isinstance(outcome, ProtocolError | MigrationError), repr(outcome)

    asyncio.run(main())

"""The roam migration wire protocol, version 2 (specified in docs/PROTOCOL.md).

Every message is a frame: an 8-byte header (type u8, flags u8, reserved u16, body length
u32, big-endian) and a body. `decode` turns a body into a message object or raises
ProtocolError; it never trusts a length it has not checked.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from roam import errors

MAGIC = b"ROAM"
VERSION = 2
MAX_BODY = 64 * 1024 * 1024
HASH_LEN = 16  # xxh3_128
CONTENT_HASH_LEN = 32  # blake3
MAX_UNIT = 1 << 16  # blocks per HAVE digest

HEADER = struct.Struct("!BBHI")


class ProtocolError(errors.RoamError):
    """The peer sent something this protocol does not allow."""

    code = errors.ErrorCode.BAD_REQUEST


class MsgType(enum.IntEnum):
    HELLO = 0x01
    GROUP = 0x02
    BLOCKS = 0x10
    NEED_AT = 0x20
    DONT_NEED_AT = 0x21
    DIRTY = 0x30
    HASHES = 0x31
    HAVE = 0x32
    EVENT = 0x40
    STORE = 0x50
    SAFE = 0x51
    ERROR = 0x7F


class Caps(enum.IntFlag):
    ZSTD = 1
    LZ4 = 2
    CONTENT = 4  # HAVE lists and blocks sent as "you already have this"
    STORE = 8  # the destination can take blocks from an object store (STORE, SAFE)
    MIRROR = 16  # source: a standby mirror, not a migration (docs/MIRROR.md)
    SCATTER = 32  # SCATTER blocks: many blocks of one device that are not consecutive


ALL_CAPS = Caps.ZSTD | Caps.LZ4 | Caps.CONTENT | Caps.STORE | Caps.SCATTER
KNOWN_CAPS = ALL_CAPS | Caps.MIRROR  # a migration's ends never advertise MIRROR


class Encoding(enum.IntEnum):
    RAW = 0  # a map of the blocks carried (the others are zero), one hash, the blocks
    ZSTD = 1
    LZ4 = 2
    ZERO = 3  # every block of the run is zero: no hashes, no payload
    HAVE = 4  # the receiver has this content already: blake3 per unit of blocks, no payload
    SCATTER = 5  # RAW for a sorted list of blocks from `first` (capability SCATTER)


class EventKind(enum.IntEnum):
    READY = 1  # destination: group accepted, send blocks
    AUTHORITY = 2  # source: the workload is yours (payload: application data)
    AUTHORITY_ACK = 3  # destination: accepted, the workload runs here now
    AUTHORITY_DECLINE = 4  # destination: refused, the source may resume
    COMPLETE = 5  # source: every block has been sent
    DONE = 6  # destination: every block is present and verified
    PREPARED = 7  # destination: can take authority at once (payload: application data)
    CHECKPOINT = 8  # mirror source: the blocks so far are one instant (payload: JSON, state)
    CHECKPOINT_ACK = 9  # mirror: that instant is sealed on disk (payload: JSON)
    MIRRORED = 10  # mirror source: a cycle ended (payload: JSON, its lag)


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1
    VERSION = 2
    IO = 3
    INTEGRITY = 4
    ABORTED = 5


# -- messages ------------------------------------------------------------------------


class DeviceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0, lt=65536)
    name: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._-]+$")
    size: int = Field(ge=0, le=1 << 50)
    block_size: int = Field(ge=4096, le=1 << 24)
    sized_at_handover: bool = False

    @model_validator(mode="after")
    def _power_of_two(self) -> DeviceSpec:
        if self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        return self

    @property
    def nblocks(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="", max_length=255)
    devices: list[DeviceSpec] = Field(max_length=1024)
    # The package the workload was made from (a peer's package id, roam.peer.packages):
    # a destination that holds it offers its files' content (HAVE lists). Empty: none.
    package: str = Field(default="", pattern=r"^([0-9a-f]{32})?$")

    @model_validator(mode="after")
    def _unique(self) -> Group:
        if len({d.id for d in self.devices}) != len(self.devices):
            raise ValueError("device ids must be unique")
        if len({d.name for d in self.devices}) != len(self.devices):
            raise ValueError("device names must be unique")
        return self


class StoreDescriptor(BaseModel):
    """STORE: where the source's sync keeps the group's chunks, the key that opens them,
    and how many SAFE entries follow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(max_length=1100, pattern=(
        r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._-]+)*$"))
    endpoint_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://\S+$")
    key: str = Field(pattern=r"^[0-9a-f]{64}$")  # the sync key (the channel carries memory)
    chunks: int = Field(ge=0, le=1 << 32)  # SAFE entries that follow, over all devices


@dataclass(frozen=True, slots=True)
class Safe:
    """SAFE: chunks of `chunk_blocks` blocks of one device that the store holds as the
    device has them now: chunk i is blocks [i * chunk_blocks, (i + 1) * chunk_blocks),
    cut by the end of the device; `addresses` holds one CONTENT_HASH_LEN address each."""

    device: int
    chunk_blocks: int
    chunks: npt.NDArray[np.uint64]  # strictly ascending
    addresses: bytes

    def address(self, i: int) -> bytes:
        return self.addresses[i * CONTENT_HASH_LEN : (i + 1) * CONTENT_HASH_LEN]


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    caps: Caps


_NOTHING = memoryview(b"")
_NO_OFFSETS: npt.NDArray[np.uint32] = np.zeros(0, dtype=np.uint32)
MAX_SCATTER = 1 << 16  # blocks per SCATTER frame


@dataclass(frozen=True, slots=True)
class Blocks:
    """A run of `count` consecutive blocks of one device, from block `first`."""

    device: int
    encoding: Encoding
    first: int
    count: int
    # RAW: one HASH_LEN hash of the whole payload; ZSTD/LZ4: one per block; HAVE: one
    # CONTENT_HASH_LEN digest per `unit` blocks; ZERO: empty.
    hashes: memoryview
    lengths: tuple[int, ...]  # encoded length per block for ZSTD/LZ4; empty otherwise
    payload: memoryview
    carried: memoryview = _NOTHING  # RAW, SCATTER: bit i (LSB first) set = block i is sent
    unit: int = 0  # HAVE: blocks per digest
    # SCATTER: block i is `first + offsets[i]` (strictly ascending, offsets[0] == 0);
    # empty for the other encodings, whose block i is `first + i`.
    offsets: npt.NDArray[np.uint32] = field(default_factory=lambda: _NO_OFFSETS)

    def hash(self, i: int) -> bytes:
        n = CONTENT_HASH_LEN if self.encoding == Encoding.HAVE else HASH_LEN
        return bytes(self.hashes[i * n : (i + 1) * n])


@dataclass(frozen=True, slots=True)
class Range:
    """NEED_AT / DONT_NEED_AT: a byte range of one device."""

    kind: MsgType
    device: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Dirty:
    device: int
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Hashes:
    """HASHES (xxh3_128 per block, for verification) or HAVE (blake3 per `unit` blocks
    from `first`, content the sender holds)."""

    kind: MsgType
    device: int
    first: int
    digests: tuple[bytes, ...]
    unit: int = 1


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Error:
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Store:
    """STORE: the descriptor, or None (the source offers nothing this time)."""

    descriptor: StoreDescriptor | None


Message = Hello | Group | Blocks | Range | Dirty | Hashes | Event | Error | Store | Safe
_Decoder = Callable[[memoryview], Message]

# -- encoding ------------------------------------------------------------------------

_HELLO = struct.Struct("!4sHI")
_BLOCKS = struct.Struct("!HBxQI")
_RANGE = struct.Struct("!HQI")
_DIRTY = struct.Struct("!HI")
_HASHES = struct.Struct("!HQI")
_HAVE = struct.Struct("!HQII")
_UNIT = struct.Struct("!I")
_EVENT = struct.Struct("!B")
_ERROR = struct.Struct("!H")
_SAFE = struct.Struct("!HII")
_SAFE_ENTRY = np.dtype([("chunk", ">u8"), ("address", "V32")])
MAX_SAFE = 65536  # entries per SAFE frame


def frame(kind: MsgType, body_len: int) -> bytes:
    if body_len > MAX_BODY:
        raise ProtocolError(f"message of {body_len} bytes exceeds the {MAX_BODY} limit")
    return HEADER.pack(kind, 0, 0, body_len)


def encode_hello(caps: Caps) -> bytes:
    body = _HELLO.pack(MAGIC, VERSION, caps)
    return frame(MsgType.HELLO, len(body)) + body


def encode_group(group: Group) -> bytes:
    body = group.model_dump_json().encode()
    return frame(MsgType.GROUP, len(body)) + body


def carried_len(count: int) -> int:
    """Bytes of a RAW frame's map of carried blocks."""
    return (count + 7) // 8


def encode_raw_header(device: int, first: int, count: int, carried: bytes, run_hash: bytes,
                      payload_len: int) -> bytes:
    """Header of a RAW BLOCKS frame: `carried` has bit i (LSB first) set for each block
    in the payload (the others are zero), `run_hash` is the payload's xxh3_128."""
    fixed = _BLOCKS.pack(device, Encoding.RAW, first, count)
    body_len = len(fixed) + len(carried) + len(run_hash) + payload_len
    return frame(MsgType.BLOCKS, body_len) + fixed + carried + run_hash


def encode_scatter_header(device: int, blocks: npt.NDArray[np.int64], carried: bytes,
                          payload_hash: bytes, payload_len: int) -> bytes:
    """Header of a SCATTER BLOCKS frame: `blocks` strictly ascending (at most
    MAX_SCATTER), `carried` has bit i set for each block in the payload (the others are
    zero), `payload_hash` is the payload's xxh3_128."""
    first = int(blocks[0])
    offsets = (blocks - first).astype(">u4").tobytes()
    fixed = _BLOCKS.pack(device, Encoding.SCATTER, first, len(blocks))
    body_len = len(fixed) + len(offsets) + len(carried) + len(payload_hash) + payload_len
    return frame(MsgType.BLOCKS, body_len) + fixed + offsets + carried + payload_hash


def encode_have_blocks(device: int, first: int, count: int, unit: int, digests: bytes) -> bytes:
    """A HAVE BLOCKS frame: `count` blocks the receiver holds, one blake3 per `unit`."""
    body = _BLOCKS.pack(device, Encoding.HAVE, first, count) + _UNIT.pack(unit) + digests
    return frame(MsgType.BLOCKS, len(body)) + body


def encode_blocks_header(device: int, encoding: Encoding, first: int, count: int,
                         hashes: bytes, lengths: list[int], payload_len: int) -> bytes:
    """Header, fixed part, hashes and lengths of a ZSTD, LZ4 or ZERO BLOCKS frame; the
    payload follows."""
    if encoding in (Encoding.RAW, Encoding.HAVE, Encoding.SCATTER):
        raise ValueError(f"{encoding.name} frames have encoders of their own")
    lens = struct.pack(f"!{len(lengths)}I", *lengths) if lengths else b""
    fixed = _BLOCKS.pack(device, encoding, first, count)
    body_len = len(fixed) + len(hashes) + len(lens) + payload_len
    return frame(MsgType.BLOCKS, body_len) + fixed + hashes + lens


def encode_range(kind: MsgType, device: int, offset: int, length: int) -> bytes:
    body = _RANGE.pack(device, offset, length)
    return frame(kind, len(body)) + body


def encode_dirty(device: int, blocks: list[int]) -> bytes:
    body = _DIRTY.pack(device, len(blocks)) + struct.pack(f"!{len(blocks)}Q", *blocks)
    return frame(MsgType.DIRTY, len(body)) + body


def encode_hashes(kind: MsgType, device: int, first: int, digests: list[bytes],
                  unit: int = 1) -> bytes:
    """HASHES (one xxh3_128 per block) or HAVE (one blake3 per `unit` blocks)."""
    if kind == MsgType.HAVE:
        body = _HAVE.pack(device, first, len(digests), unit) + b"".join(digests)
    elif unit != 1:
        raise ValueError("HASHES has one digest per block")
    else:
        body = _HASHES.pack(device, first, len(digests)) + b"".join(digests)
    return frame(kind, len(body)) + body


def encode_event(kind: EventKind, payload: bytes = b"") -> bytes:
    body = _EVENT.pack(kind) + payload
    return frame(MsgType.EVENT, len(body)) + body


def encode_error(code: ErrorCode, message: str) -> bytes:
    # Cut at 4 KiB on a character boundary, so the peer never sees half a character.
    text = message.encode()[:4096].decode(errors="ignore").encode()
    body = _ERROR.pack(code) + text
    return frame(MsgType.ERROR, len(body)) + body


def encode_store(descriptor: StoreDescriptor | None) -> bytes:
    body = b"" if descriptor is None else descriptor.model_dump_json().encode()
    return frame(MsgType.STORE, len(body)) + body


def encode_safe(device: int, chunk_blocks: int, chunks: npt.NDArray[np.uint64],
                addresses: bytes) -> bytes:
    """One SAFE frame (at most MAX_SAFE entries)."""
    entries = np.empty(len(chunks), dtype=_SAFE_ENTRY)
    entries["chunk"] = chunks
    entries["address"] = np.frombuffer(addresses, dtype="V32")
    body = _SAFE.pack(device, chunk_blocks, len(chunks)) + entries.tobytes()
    return frame(MsgType.SAFE, len(body)) + body


# -- decoding ------------------------------------------------------------------------


def parse_header(header: bytes | memoryview) -> tuple[MsgType, int]:
    if len(header) != HEADER.size:
        raise ProtocolError(f"frame header is {len(header)} bytes, expected {HEADER.size}")
    kind, flags, reserved, length = HEADER.unpack(header)
    try:
        msg_type = MsgType(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type 0x{kind:02x}") from None
    if flags or reserved:
        raise ProtocolError(f"{msg_type.name}: flags and reserved bits must be zero")
    if length > MAX_BODY:
        raise ProtocolError(f"{msg_type.name}: body of {length} bytes exceeds the limit")
    return msg_type, length


def decode(kind: MsgType, body: memoryview) -> Message:
    """Decode one message body. Views into body stay valid only as long as body does."""
    try:
        return _DECODERS[kind](body)
    except struct.error as e:
        raise ProtocolError(f"{kind.name}: malformed body ({e})") from None


def _hello(body: memoryview) -> Hello:
    if len(body) != _HELLO.size:
        raise ProtocolError(f"HELLO: body is {len(body)} bytes, expected {_HELLO.size}")
    magic, version, caps = _HELLO.unpack(body)
    if magic != MAGIC:
        raise ProtocolError("HELLO: not a roam peer (bad magic)")
    return Hello(version, Caps(caps & KNOWN_CAPS))


def _group(body: memoryview) -> Group:
    try:
        return Group.model_validate(json.loads(bytes(body)))
    except (ValueError, ValidationError) as e:
        raise ProtocolError(f"GROUP: invalid group description: {e}") from None
    except RecursionError:  # json.loads on deeply nested arrays or objects
        raise ProtocolError("GROUP: invalid group description: nested too deeply") from None


def _blocks(body: memoryview) -> Blocks:
    device, enc, first, count = _BLOCKS.unpack_from(body)
    try:
        encoding = Encoding(enc)
    except ValueError:
        raise ProtocolError(f"BLOCKS: unknown encoding {enc}") from None
    if count == 0:
        raise ProtocolError("BLOCKS: empty run")
    pos = _BLOCKS.size
    if encoding == Encoding.RAW:
        return _raw_blocks(body, device, first, count)
    if encoding == Encoding.SCATTER:
        return _scatter_blocks(body, device, first, count)
    unit = 0
    if encoding == Encoding.HAVE:
        (unit,) = _UNIT.unpack_from(body, pos)
        pos += _UNIT.size
        if not 1 <= unit <= MAX_UNIT or unit & (unit - 1):
            raise ProtocolError(f"BLOCKS: HAVE unit {unit} is not a power of two up to "
                                f"{MAX_UNIT}")
        hash_len = CONTENT_HASH_LEN * ((count + unit - 1) // unit)
    else:
        hash_len = 0 if encoding == Encoding.ZERO else HASH_LEN * count
    hashes = body[pos : pos + hash_len]
    pos += hash_len
    lengths: tuple[int, ...] = ()
    if encoding in (Encoding.ZSTD, Encoding.LZ4):
        lengths = struct.unpack_from(f"!{count}I", body, pos)
        pos += 4 * count
    if len(hashes) != hash_len or pos > len(body):
        raise ProtocolError("BLOCKS: body shorter than its block count requires")
    payload = body[pos:]
    if lengths and sum(lengths) != len(payload):
        raise ProtocolError("BLOCKS: encoded lengths do not add up to the payload")
    if encoding in (Encoding.ZERO, Encoding.HAVE) and payload:
        raise ProtocolError(f"BLOCKS: {encoding.name} runs carry no payload")
    return Blocks(device, encoding, first, count, hashes, lengths, payload, unit=unit)


def _raw_blocks(body: memoryview, device: int, first: int, count: int,
                pos: int = _BLOCKS.size, *, only_zero: bool = False) -> Blocks:
    """The map, hash and payload of a RAW frame from `pos`; `only_zero`: a map that
    marks no block is allowed (SCATTER: a list of scattered zero blocks)."""
    nmap = carried_len(count)
    carried = body[pos : pos + nmap]
    run_hash = body[pos + nmap : pos + nmap + HASH_LEN]
    if len(run_hash) != HASH_LEN:
        raise ProtocolError("BLOCKS: body shorter than its block count requires")
    if count % 8 and carried[-1] >> (count % 8):
        raise ProtocolError("BLOCKS: RAW map marks blocks beyond the run")
    if not only_zero and not any(carried):
        raise ProtocolError("BLOCKS: RAW run carries no block (an all-zero run is ZERO)")
    return Blocks(device, Encoding.RAW, first, count, run_hash, (),
                  body[pos + nmap + HASH_LEN :], carried)


def _scatter_blocks(body: memoryview, device: int, first: int, count: int) -> Blocks:
    """A SCATTER frame: the block offsets, then the same map, hash and payload as RAW."""
    if count > MAX_SCATTER:
        raise ProtocolError(f"BLOCKS: SCATTER of {count} blocks exceeds {MAX_SCATTER}")
    pos = _BLOCKS.size + 4 * count
    if pos > len(body):
        raise ProtocolError("BLOCKS: body shorter than its block count requires")
    offsets = np.frombuffer(body[_BLOCKS.size : pos], dtype=">u4").astype(np.uint32)
    if offsets[0] != 0 or (count > 1 and not (offsets[1:] > offsets[:-1]).all()):
        raise ProtocolError("BLOCKS: SCATTER offsets do not start at 0 and ascend")
    raw = _raw_blocks(body, device, first, count, pos, only_zero=True)
    return Blocks(device, Encoding.SCATTER, first, count, raw.hashes, (), raw.payload,
                  raw.carried, offsets=offsets)


def _range(kind: MsgType) -> _Decoder:
    def decode_range(body: memoryview) -> Range:
        if len(body) != _RANGE.size:
            raise ProtocolError(f"{kind.name}: body is {len(body)} bytes, expected 14")
        device, offset, length = _RANGE.unpack(body)
        return Range(kind, device, offset, length)

    return decode_range


def _dirty(body: memoryview) -> Dirty:
    device, count = _DIRTY.unpack_from(body)
    if len(body) != _DIRTY.size + 8 * count:
        raise ProtocolError(f"DIRTY: body does not hold {count} block numbers")
    return Dirty(device, struct.unpack_from(f"!{count}Q", body, _DIRTY.size))


def _hashes(kind: MsgType) -> _Decoder:
    n = HASH_LEN if kind == MsgType.HASHES else CONTENT_HASH_LEN
    fixed = _HASHES if kind == MsgType.HASHES else _HAVE

    def decode_hashes(body: memoryview) -> Hashes:
        device, first, count, *rest = fixed.unpack_from(body)
        unit = rest[0] if rest else 1
        if not 1 <= unit <= MAX_UNIT or unit & (unit - 1):
            raise ProtocolError(f"{kind.name}: unit {unit} is not a power of two up to "
                                f"{MAX_UNIT}")
        if first % unit:
            raise ProtocolError(f"{kind.name}: first block {first} is not a multiple of "
                                f"the unit {unit}")
        if len(body) != fixed.size + n * count:
            raise ProtocolError(f"{kind.name}: body does not hold {count} digests")
        raw = bytes(body[fixed.size :])
        return Hashes(kind, device, first, tuple(raw[i * n : (i + 1) * n] for i in range(count)),
                      unit)

    return decode_hashes


def _event(body: memoryview) -> Event:
    if not body:
        raise ProtocolError("EVENT: empty body")
    try:
        kind = EventKind(body[0])
    except ValueError:
        raise ProtocolError(f"EVENT: unknown kind {body[0]}") from None
    return Event(kind, bytes(body[1:]))


def _error(body: memoryview) -> Error:
    (code,) = _ERROR.unpack_from(body)
    try:
        error_code = ErrorCode(code)
    except ValueError:
        error_code = ErrorCode.PROTOCOL
    return Error(error_code, bytes(body[_ERROR.size :]).decode(errors="replace"))


def _store(body: memoryview) -> Store:
    if not body:
        return Store(None)
    try:
        return Store(StoreDescriptor.model_validate(json.loads(bytes(body))))
    except (ValueError, ValidationError) as e:
        raise ProtocolError(f"STORE: invalid store description: {e}") from None
    except RecursionError:
        raise ProtocolError("STORE: invalid store description: nested too deeply") from None


def _safe(body: memoryview) -> Safe:
    device, chunk_blocks, count = _SAFE.unpack_from(body)
    if not 1 <= chunk_blocks <= MAX_UNIT or chunk_blocks & (chunk_blocks - 1):
        raise ProtocolError(f"SAFE: {chunk_blocks} blocks per chunk is not a power of two "
                            f"up to {MAX_UNIT}")
    if not 1 <= count <= MAX_SAFE or len(body) != _SAFE.size + count * _SAFE_ENTRY.itemsize:
        raise ProtocolError(f"SAFE: body does not hold {count} entries (1 to {MAX_SAFE})")
    entries = np.frombuffer(body[_SAFE.size :], dtype=_SAFE_ENTRY)
    chunks = entries["chunk"].astype(np.uint64)
    if len(chunks) > 1 and not (chunks[1:] > chunks[:-1]).all():
        raise ProtocolError("SAFE: chunks are not strictly ascending")
    return Safe(device, chunk_blocks, chunks, entries["address"].tobytes())


_DECODERS: dict[MsgType, _Decoder] = {
    MsgType.HELLO: _hello,
    MsgType.GROUP: _group,
    MsgType.BLOCKS: _blocks,
    MsgType.NEED_AT: _range(MsgType.NEED_AT),
    MsgType.DONT_NEED_AT: _range(MsgType.DONT_NEED_AT),
    MsgType.DIRTY: _dirty,
    MsgType.HASHES: _hashes(MsgType.HASHES),
    MsgType.HAVE: _hashes(MsgType.HAVE),
    MsgType.EVENT: _event,
    MsgType.ERROR: _error,
    MsgType.STORE: _store,
    MsgType.SAFE: _safe,
}

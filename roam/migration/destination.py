"""The receiving end: builds the devices, verifies every block, takes authority.

Every device sits behind a waiting cache, so whatever reads it (a resumed VM, an NBD or
FUSE export) waits for blocks that have not arrived and asks for them first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import blake3
import numpy as np

from roam.errors import ErrorCode as RoamCode
from roam.errors import RoamError
from roam.migration.blocks import block_hash, decompress
from roam.migration.channel import POSTCOPY_QUEUE, Channel, PeerLost
from roam.migration.content import CHUNK, ContentDigests, digest_provider
from roam.migration.errors import (
    Decline,
    IntegrityError,
    LostPeer,
    MigrationError,
    RemoteError,
    wire_code,
)
from roam.migration.hybrid import ChunkFetcher, StoreOpener
from roam.migration.wire import (
    ALL_CAPS,
    MAX_UNIT,
    VERSION,
    Blocks,
    Caps,
    DeviceSpec,
    Dirty,
    Encoding,
    Error,
    ErrorCode,
    Event,
    EventKind,
    Group,
    Hashes,
    Hello,
    Message,
    MsgType,
    ProtocolError,
    Safe,
    Store,
    StoreDescriptor,
    decode,
    encode_error,
    encode_event,
    encode_hashes,
    encode_hello,
    encode_range,
)
from roam.storage.bitmap import block_runs, runs, zero_blocks
from roam.storage.combinator import CombinatorInput, WriteCombinator
from roam.storage.provider import Provider
from roam.storage.waiting import WaitingCache

log = logging.getLogger(__name__)

MAX_GROUP_BLOCKS = 1 << 28  # 16 TiB at 64 KiB blocks
MAX_REFETCH = 3  # a block that fails verification this often is an error, not bad luck
HAVE_PER_FRAME = 4096  # digests per HAVE list
ZEROES = bytes(4 * 1024 * 1024)  # written for zero runs on a device that is not all zero

# Write priorities: the VM's own writes beat blocks from the source, which beat blocks
# from an object store (a block the source sent again is newer than the store's).
LOCAL, REMOTE, STORE = 2, 1, 0
STORE_CONCURRENCY = 8  # chunks fetched from an object store at once
STORE_GIVE_UP = 8  # fetches in a row that find no store: the source sends the rest


@dataclass
class NewDevice:
    """A device the destination made for an announced spec."""

    provider: Provider
    fresh: bool = True  # all zero now: zero blocks need no write
    existing: bool = False  # holds older content: offer it to the source by hash
    # Digests of that content when already known (a peer's index of its packages);
    # without them the device is read and hashed when the group arrives.
    digests: ContentDigests | None = None


DeviceFactory = Callable[[DeviceSpec], Awaitable[NewDevice]]


async def _accept(payload: bytes, devices: dict[str, WaitingCache]) -> None:
    return None


@dataclass
class DestinationResult:
    group: Group | None = None
    payload: bytes = b""
    bytes_received: int = 0
    blocks_received: int = 0
    integrity_errors: int = 0
    dropped_blocks: int = 0  # arrived after the VM wrote its own copy
    verified_blocks: int = 0
    store_bytes: int = 0  # taken from an object store (hybrid migration)
    store_chunks: int = 0
    store_fallback_chunks: int = 0  # missing, corrupt or unreachable: asked of the source
    store_seconds: float = 0.0  # STORE received to the last chunk fetched
    seconds_to_authority: float = 0.0
    total_seconds: float = 0.0
    declined: bool = False
    notes: list[str] = field(default_factory=list)


class Destination:
    def __init__(self, channel: Channel, make_device: DeviceFactory,
                 on_authority: Callable[[bytes, dict[str, WaitingCache]], Awaitable[None]]
                 = _accept, *, prepares: bool = False, prepared_payload: bytes = b"",
                 store: StoreOpener | None = None,
                 done_payload: Callable[[], Awaitable[bytes]] | None = None) -> None:
        """`prepares`: the application sends PREPARED itself (`prepared()`) once it can
        take authority at once; otherwise it goes out with READY, carrying
        `prepared_payload` (e.g. a terminator saying that it takes a copy and declines).
        `store`: open the object store a source offers blocks from (hybrid migration,
        roam.migration.hybrid); PREPARED then waits until those blocks are here.
        `done_payload`, once authority is acknowledged: what DONE carries (e.g. when the
        workload first answered after its resume); DONE waits for it."""
        self.channel = channel
        self.make_device = make_device
        self.on_authority = on_authority
        self.devices: dict[str, WaitingCache] = {}
        self.ready = asyncio.Event()  # set once the devices exist
        self.result = DestinationResult()
        self._by_id: dict[int, tuple[DeviceSpec, WaitingCache, NewDevice]] = {}
        self._written_ever: dict[int, np.ndarray] = {}  # per block: the source sent data
        self._have_unit: dict[int, int] = {}  # blocks per digest of our HAVE lists
        self._refetches: dict[tuple[int, int], int] = {}
        self._complete_from_source = False
        self._authority_task: asyncio.Task[None] | None = None
        self._pending_recv: asyncio.Future[tuple[MsgType, memoryview]] | None = None
        self._start = 0.0
        self._prepares = prepares
        self._prepared_payload = prepared_payload
        self._prepared_sent = False
        self._open_store = store
        self._peer_caps = Caps(0)
        # Messages and blocks from the store are applied one at a time: a DIRTY is never
        # interleaved with the write of a stale chunk from the store.
        self._apply = asyncio.Lock()
        self._store_inputs: dict[int, CombinatorInput] = {}
        self._from_store: dict[int, np.ndarray] = {}  # per block: expected from the store
        self._fetcher: ChunkFetcher | None = None
        self._store_seen = False
        self._store_expected = self._store_received = 0
        self._fill_jobs: deque[tuple[int, int, int, bytes]] = deque()
        self._filler: asyncio.Task[None] | None = None
        self._held_prepared: bytes | None = None
        self._store_started = 0.0
        self.store_descriptor: StoreDescriptor | None = None  # what the source offered
        self._done_payload = done_payload
        self._done_bytes = b""

    @property
    def authority_arrived(self) -> bool:
        """AUTHORITY has come: from now on the migration ends by accepting or declining it
        (on_authority decides), never by abort()."""
        return self._authority_task is not None

    async def abort(self, reason: str) -> None:
        """Give up before authority (the application cannot take the workload): the source
        hears why and keeps running it; run() then ends with MigrationError."""
        if self._authority_task is not None:
            raise RuntimeError("abort after authority arrived: decline instead")
        with contextlib.suppress(PeerLost, TimeoutError):
            self.channel.send(encode_error(ErrorCode.ABORTED, reason))
            await asyncio.wait_for(self.channel.drain(), 5.0)
        await self.channel.close()

    def prepared(self, payload: bytes = b"") -> None:
        """Tell the source that authority can be taken at once (e.g. the VM waits with its
        network up); a source whose policy waits for it pauses only after this."""
        if not self._prepares or not self.ready.is_set():
            raise RuntimeError("PREPARED without `prepares`, or before the devices exist")
        if self._prepared_sent:
            raise RuntimeError("PREPARED sent twice")
        self._prepared_sent = True
        self._held_prepared = payload
        self._release_prepared()

    async def run(self) -> DestinationResult:
        start = time.perf_counter()
        try:
            self.channel.send(encode_hello(ALL_CAPS if self._open_store is not None
                                           else ALL_CAPS & ~Caps.STORE))
            self._start = start
            while not await self._step():
                pass
            if self._authority_task is not None:
                await self._authority_task
        except (ProtocolError, MigrationError) as e:
            self._fail(e)
            code = ErrorCode.INTEGRITY if isinstance(e, IntegrityError) else ErrorCode.PROTOCOL
            with contextlib.suppress(Exception):
                self.channel.send(encode_error(code, str(e)))
                await self.channel.drain()
            raise
        except PeerLost as e:
            self._fail(e)
            raise LostPeer(f"lost the source: {e}") from e
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            if self._authority_task is not None and not self._authority_task.done():
                self._authority_task.cancel()
            if self._filler is not None and not self._filler.done():
                self._filler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._filler
            if self._pending_recv is not None:
                self._pending_recv.cancel()
            self.result.total_seconds = time.perf_counter() - start
            self.result.bytes_received = self.channel.bytes_received
        return self.result

    async def _step(self) -> bool:
        """Handle the next message, or notice that authority was taken or that the
        store's chunks are all here; True when done."""
        others = [t for t in (self._authority_task, self._filler)
                  if t is not None and not t.done()]
        if self._pending_recv is None:
            if not others:
                kind, body = await self.channel.recv()
                return await self._handle(decode(kind, body))
            # Kept across steps, never cancelled: a cancelled read could lose half a frame.
            self._pending_recv = asyncio.ensure_future(self.channel.recv())
        recv = self._pending_recv
        if others:
            await asyncio.wait([recv, *others], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
            if not recv.done():
                for task in others:
                    if task.done():
                        task.result()  # raises what it hit
                async with self._apply:
                    return self._finished()
        self._pending_recv = None
        kind, body = await recv
        return await self._handle(decode(kind, body))

    def _fail(self, error: BaseException) -> None:
        for cache in self.devices.values():
            cache.fail(error)

    # -- messages ------------------------------------------------------------------------

    async def _handle(self, msg: Message) -> bool:
        """Apply one message; True when the migration is finished."""
        async with self._apply:
            return await self._apply_message(msg)

    async def _apply_message(self, msg: Message) -> bool:
        if isinstance(msg, Blocks):
            await self._blocks(msg)
        elif isinstance(msg, Dirty):
            spec, cache, _ = self._device(msg.device)
            blocks = np.array(msg.blocks, dtype=np.uint64)
            if len(blocks) and int(blocks.max()) >= spec.nblocks:
                raise ProtocolError(f"DIRTY names a block beyond device {spec.name}")
            cache.mark_absent(blocks.astype(np.int64))
            if msg.device in self._from_store:  # the store's copy is stale now
                self._from_store[msg.device][blocks.astype(np.int64)] = False
        elif isinstance(msg, Store):
            await self._store_offered(msg)
        elif isinstance(msg, Safe):
            self._safe(msg)
        elif isinstance(msg, Hashes) and msg.kind == MsgType.HASHES:
            await self._verify(msg)
        elif isinstance(msg, Event):
            return await self._event(msg)
        elif isinstance(msg, Hello):
            if msg.version != VERSION:
                raise ProtocolError(f"source speaks version {msg.version}, not {VERSION}")
            self._peer_caps = msg.caps
        elif isinstance(msg, Group):
            await self._group(msg)
        elif isinstance(msg, Error):
            raise RemoteError(f"source: {msg.message} ({msg.code.name})", code=wire_code(msg.code))
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from source")
        return self._finished()

    async def _group(self, group: Group) -> None:
        if self.result.group is not None:
            raise ProtocolError("GROUP sent twice")
        self.result.group = group
        total = sum(spec.nblocks for spec in group.devices)
        if total > MAX_GROUP_BLOCKS:
            # Bookkeeping costs a few bytes per block: refuse before allocating any.
            raise ProtocolError(f"group of {total} blocks exceeds the {MAX_GROUP_BLOCKS} limit")
        for spec in group.devices:
            made = await self.make_device(spec)
            if made.provider.size() != spec.size:
                raise MigrationError(f"device {spec.name}: made {made.provider.size()} bytes, "
                                     f"announced {spec.size}")
            combinator = WriteCombinator(made.provider, spec.block_size)
            cache = WaitingCache(combinator.input(LOCAL), combinator.input(REMOTE),
                                 spec.block_size)
            self._store_inputs[spec.id] = combinator.input(STORE)
            cache.on_need = self._asker(spec.id, MsgType.NEED_AT)
            cache.on_dont_need = self._asker(spec.id, MsgType.DONT_NEED_AT)
            self.devices[spec.name] = cache
            self._by_id[spec.id] = (spec, cache, made)
            self._written_ever[spec.id] = np.zeros(spec.nblocks, dtype=np.bool_)
            if made.existing:
                await self._offer_existing(spec, made)
        self.ready.set()
        if self._prepares:
            self.channel.send(encode_event(EventKind.READY))
        elif self._store_negotiated():  # PREPARED once the store's chunks are here
            self.channel.send(encode_event(EventKind.READY))
            self._prepared_sent = True
            self._held_prepared = self._prepared_payload
        else:  # one write: a peer gone by now is noticed by the reader, with its reason
            self._prepared_sent = True
            self.channel.send(encode_event(EventKind.READY),
                              encode_event(EventKind.PREPARED, self._prepared_payload))

    # -- hybrid migration: blocks from an object store -------------------------------

    def _store_negotiated(self) -> bool:
        return self._open_store is not None and Caps.STORE in self._peer_caps

    def _store_pending(self) -> bool:
        """Blocks offered from the store are still to be fetched (or the offer itself is
        still to come): PREPARED waits, so the source pauses its VM only once the store
        has given what it holds."""
        if not self._store_negotiated():
            return False
        return (not self._store_seen or self._store_received < self._store_expected
                or bool(self._fill_jobs) or (self._filler is not None
                                             and not self._filler.done()))

    def _release_prepared(self) -> None:
        if self._held_prepared is not None and not self._store_pending():
            payload, self._held_prepared = self._held_prepared, None
            with contextlib.suppress(PeerLost):
                self.channel.send(encode_event(EventKind.PREPARED, payload))

    async def _store_offered(self, msg: Store) -> None:
        if not self._store_negotiated() or self._store_seen or self.result.group is None \
                or self._authority_task is not None:
            raise ProtocolError("STORE unasked for, twice, before GROUP or after AUTHORITY")
        self._store_seen = True
        self._store_started = time.perf_counter()
        descriptor = self.store_descriptor = msg.descriptor
        if descriptor is not None and self._open_store is not None:
            self._store_expected = descriptor.chunks
            try:
                self._fetcher = await self._open_store(descriptor)
            except Exception as exc:  # an application's opener: any failure means "source"
                log.warning("cannot open the object store %s (%s); taking every block "
                            "from the source", descriptor.url, exc)
        self._release_prepared()

    def _safe(self, msg: Safe) -> None:
        spec = self._device(msg.device)[0]
        cb = msg.chunk_blocks
        if not self._store_seen or self._authority_task is not None or \
                self._store_received + len(msg.chunks) > self._store_expected:
            raise ProtocolError("SAFE without STORE, beyond its count, or after AUTHORITY")
        if int(msg.chunks[-1]) >= -(-spec.nblocks // cb):
            raise ProtocolError(f"SAFE names a chunk beyond device {spec.name}")
        self._store_received += len(msg.chunks)
        expected = self._from_store.setdefault(msg.device,
                                               np.zeros(spec.nblocks, dtype=np.bool_))
        padded = np.zeros(-(-spec.nblocks // cb) * cb, dtype=np.bool_)
        padded.reshape(-1, cb)[msg.chunks.astype(np.int64)] = True
        expected |= padded[: spec.nblocks]
        for i, chunk in enumerate(msg.chunks.tolist()):
            first = chunk * cb
            self._fill_jobs.append((msg.device, first, min(cb, spec.nblocks - first),
                                    msg.address(i)))
        if self._fetcher is None:
            while self._fill_jobs:
                self._from_source(*self._fill_jobs.popleft()[:3])
        elif self._filler is None or self._filler.done():
            self._filler = asyncio.create_task(self._fill(self._fetcher), name="store-fill")
        self._release_prepared()

    async def _fill(self, fetcher: ChunkFetcher) -> None:
        """Fetch the offered chunks, STORE_CONCURRENCY at a time, while the source sends
        the rest."""
        failing = 0  # fetches in a row that failed for want of the store itself

        async def worker() -> None:
            nonlocal failing
            while self._fill_jobs:
                device, first, count, address = self._fill_jobs.popleft()
                try:
                    data = await fetcher.fetch(address)
                except Exception as exc:  # missing, corrupt, unreachable: all mean "source"
                    async with self._apply:
                        self._from_source(device, first, count, exc)
                        lost = not (isinstance(exc, RoamError) and exc.code in (
                            RoamCode.NOT_FOUND, RoamCode.INTEGRITY))
                        failing = failing + 1 if lost else 0
                        if failing == STORE_GIVE_UP:
                            # Down or unreachable from here: a timeout per chunk would
                            # cost more than the source sending them all.
                            log.warning("the object store fails; taking the rest from "
                                        "the source")
                            while self._fill_jobs:
                                self._from_source(*self._fill_jobs.popleft()[:3], exc)
                    continue
                failing = 0
                async with self._apply:
                    await self._store_chunk(device, first, count, data)

        try:
            async with asyncio.TaskGroup() as workers:
                for _ in range(min(STORE_CONCURRENCY, len(self._fill_jobs))):
                    workers.create_task(worker())
            result = self.result
            result.store_seconds = time.perf_counter() - self._store_started
            # Logged for benchmarks that drive the engine through a peer.
            log.info("store: %d chunks, %d bytes in %.3f s; %d asked of the source instead",
                     result.store_chunks, result.store_bytes, result.store_seconds,
                     result.store_fallback_chunks)
        finally:
            self._release_prepared_later()

    def _release_prepared_later(self) -> None:
        """At the filler's end (it counts as running until it returns)."""
        asyncio.get_running_loop().call_soon(self._release_prepared)

    async def _store_chunk(self, device: int, first: int, count: int, data: bytes) -> None:
        """Write the blocks of a fetched chunk that are still expected from the store."""
        spec, cache, _ = self._device(device)
        bs = spec.block_size
        if len(data) != min(spec.size, (first + count) * bs) - first * bs:
            self._from_source(device, first, count, "chunk of the wrong size")
            return
        expected = self._from_store[device]
        view = memoryview(data)
        for lo, n in runs(expected[first : first + count]):
            self._written_ever[device][first + lo : first + lo + n] = True
            await cache.write_remote(first + lo, view[lo * bs : (lo + n) * bs],
                                     via=self._store_inputs[device])
        expected[first : first + count] = False
        self.result.store_bytes += len(data)
        self.result.store_chunks += 1

    def _from_source(self, device: int, first: int, count: int,
                     why: object = "the object store is not open") -> None:
        """A chunk the store could not give: ask the source for what is still wanted."""
        spec = self._device(device)[0]
        expected = self._from_store[device]
        wanted = expected[first : first + count].copy()
        expected[first : first + count] = False
        self.result.store_fallback_chunks += 1
        # The first says why; when the store is down, every chunk fails the same way.
        log.log(logging.WARNING if self.result.store_fallback_chunks == 1 else logging.DEBUG,
                "device %s blocks %d..%d not taken from the store (%s); asking the source",
                spec.name, first, first + count - 1, why)
        bs = spec.block_size
        for lo, n in runs(wanted):
            offset = (first + lo) * bs
            with contextlib.suppress(PeerLost):
                self.channel.send(encode_range(MsgType.NEED_AT, device, offset,
                                               min(n * bs, spec.size - offset)))

    async def _offer_existing(self, spec: DeviceSpec, made: NewDevice) -> None:
        """Tell the source what we hold, so it sends "you have this" instead of data."""
        bs = spec.block_size
        digests = made.digests
        if (digests is None or digests.size != spec.size or digests.chunk % bs
                or not _is_unit(digests.chunk // bs)):
            digests = await digest_provider(made.provider, max(CHUNK, bs))
        unit = digests.chunk // bs
        self._have_unit[spec.id] = unit
        held = np.array([d is not None for d in digests.digests], dtype=np.bool_)
        for first, count in runs(held):
            for start in range(first, first + count, HAVE_PER_FRAME):
                part = digests.digests[start : min(first + count, start + HAVE_PER_FRAME)]
                self.channel.send(encode_hashes(MsgType.HAVE, spec.id, start * unit,
                                                [d for d in part if d is not None], unit))
                await self.channel.drain()

    async def _blocks(self, msg: Blocks) -> None:
        spec = self._device(msg.device)[0]
        last = msg.first + (int(msg.offsets[-1]) + 1 if len(msg.offsets) else msg.count)
        if last > spec.nblocks:
            raise ProtocolError(f"BLOCKS beyond the end of device {spec.name}")
        if msg.encoding == Encoding.SCATTER and Caps.SCATTER not in self._peer_caps:
            raise ProtocolError("SCATTER blocks from a source that did not advertise them")
        self.result.blocks_received += msg.count
        if msg.encoding == Encoding.ZERO:
            await self._zero(msg.device, msg.first, msg.count)
        elif msg.encoding == Encoding.HAVE:
            await self._have(msg)
        elif msg.encoding == Encoding.RAW:
            await self._raw(msg)
        elif msg.encoding == Encoding.SCATTER:
            await self._scatter(msg)
        else:
            await self._compressed(msg)

    async def _zero(self, device: int, first: int, count: int) -> None:
        """Zero blocks: a fresh device's are zero already, unless the source wrote them;
        a device with older content (a held package's file under copy-on-write) is read
        and only its non-zero blocks are written: most of a guest's free memory is zero
        in its package too, and writing zeros over it would copy it up for nothing."""
        spec, cache, made = self._device(device)
        bs = spec.block_size
        written = self._written_ever[device][first : first + count]
        if made.fresh:
            need = written
        else:
            end = min(spec.size, (first + count) * bs)
            need = ~zero_blocks(await made.provider.read_at(first * bs, end - first * bs), bs)
        for lo, n in runs(~need):
            cache.mark_range_present(first + lo, n)
        for lo, n in runs(need):
            start, end = (first + lo) * bs, min(spec.size, (first + lo + n) * bs)
            for pos in range(start, end, len(ZEROES)):
                size = min(len(ZEROES), end - pos)
                await self._store(cache, device, pos // bs, memoryview(ZEROES)[:size])

    async def _have(self, msg: Blocks) -> None:
        """Blocks we hold: check our copy's blake3 per unit, ask again for what differs."""
        spec, cache, made = self._device(msg.device)
        unit = self._have_unit.get(msg.device)
        if unit != msg.unit or msg.first % unit:
            raise ProtocolError(f"HAVE blocks of device {spec.name} do not match its HAVE "
                                "lists' units")
        bs = spec.block_size
        end = msg.first + msg.count
        for i, lo in enumerate(range(msg.first, end, unit)):
            hi = min(end, lo + unit)
            local = await made.provider.read_at(lo * bs, min(spec.size, hi * bs) - lo * bs)
            if blake3.blake3(local).digest() == msg.hash(i):
                cache.mark_range_present(lo, hi - lo)
                if cache.on_arrived is not None:  # whoever caches arrivals (guest memory
                    cache.on_arrived(lo * bs, local)  # filled before it runs) gets it too
            else:
                self._refetch(msg.device, list(range(lo, hi)),
                              "content hash does not match local data")

    async def _raw(self, msg: Blocks) -> None:
        """A run with one hash over the blocks it carries; the others are zero."""
        spec, cache, _ = self._device(msg.device)
        bs = spec.block_size
        carried = np.unpackbits(np.frombuffer(msg.carried, dtype=np.uint8), count=msg.count,
                                bitorder="little").view(np.bool_)
        short = spec.size - (spec.nblocks - 1) * bs  # size of the device's last block
        expected = int(np.count_nonzero(carried)) * bs
        if msg.first + msg.count == spec.nblocks and carried[-1]:
            expected -= bs - short
        if len(msg.payload) != expected:
            raise ProtocolError(f"BLOCKS payload is {len(msg.payload)} bytes, "
                                f"{expected} expected")
        if block_hash(msg.payload) != msg.hash(0):
            self._refetch(msg.device, (np.flatnonzero(carried) + msg.first).tolist(),
                          "block hash mismatch")
            return
        pos = 0
        for lo, n in runs(carried):
            size = min(spec.size, (msg.first + lo + n) * bs) - (msg.first + lo) * bs
            await self._store(cache, msg.device, msg.first + lo, msg.payload[pos : pos + size])
            pos += size
        if not carried.all():
            for lo, n in runs(~carried):
                await self._zero(msg.device, msg.first + lo, n)

    async def _scatter(self, msg: Blocks) -> None:
        """Scattered blocks with one hash over those carried (the others are zero): one
        verification for the frame, the present map updated once."""
        spec, cache, _ = self._device(msg.device)
        bs = spec.block_size
        carried = np.unpackbits(np.frombuffer(msg.carried, dtype=np.uint8), count=msg.count,
                                bitorder="little").view(np.bool_)
        blocks = msg.offsets.astype(np.int64) + msg.first
        sent = blocks[carried]
        expected = len(sent) * bs
        if len(sent) and sent[-1] == spec.nblocks - 1:
            expected -= spec.nblocks * bs - spec.size  # the device's last block is short
        if len(msg.payload) != expected:
            raise ProtocolError(f"BLOCKS payload is {len(msg.payload)} bytes, "
                                f"{expected} expected")
        if block_hash(msg.payload) != msg.hash(0):
            self._refetch(msg.device, blocks.tolist(), "block hash mismatch")
            return
        self._written_ever[msg.device][sent] = True
        self.result.dropped_blocks += len(sent) - await cache.write_remote_blocks(
            sent, msg.payload)
        zero = blocks[~carried]
        if len(zero):
            for first, count in block_runs(zero):
                await self._zero(msg.device, first, count)

    async def _compressed(self, msg: Blocks) -> None:
        spec, cache, _ = self._device(msg.device)
        bs = spec.block_size
        pos = 0
        for i, length in enumerate(msg.lengths):
            block = msg.first + i
            size = min(bs, spec.size - block * bs)
            chunk = decompress(msg.encoding, msg.payload[pos : pos + length], size)
            pos += length
            if block_hash(chunk) != msg.hash(i):
                self._refetch(msg.device, [block], "block hash mismatch")
            else:
                await self._store(cache, msg.device, block, chunk)

    async def _store(self, cache: WaitingCache, device: int, block: int,
                     data: bytes | memoryview) -> None:
        """Write data from the source at `block` (one run of blocks)."""
        self._written_ever[device][block : block + -(-len(data) // cache.block_size)] = True
        if not await cache.write_remote(block, data):
            self.result.dropped_blocks += 1

    def _refetch(self, device: int, blocks: list[int], why: str) -> None:
        """Blocks that failed verification together (one hash covered them): one
        integrity error; each is asked for again, and one that keeps failing is fatal."""
        spec, cache, _ = self._device(device)
        self.result.integrity_errors += 1
        log.warning("device %s blocks %d..%d failed verification (%s); fetching them again",
                    spec.name, blocks[0], blocks[-1], why)
        for block in blocks:
            key = (device, block)
            self._refetches[key] = self._refetches.get(key, 0) + 1
            if self._refetches[key] > MAX_REFETCH:
                raise IntegrityError(f"device {spec.name} block {block} failed verification "
                                     f"{self._refetches[key]} times: {why}")
        cache.mark_absent(blocks)
        bs = spec.block_size
        for first, count in block_runs(np.asarray(blocks, dtype=np.int64)):
            self.channel.send(encode_range(MsgType.NEED_AT, device, first * bs,
                                           min(count * bs, spec.size - first * bs)))

    async def _verify(self, msg: Hashes) -> None:
        """Compare our copy with the source's hashes; re-fetch whatever differs."""
        spec, cache, made = self._device(msg.device)
        if msg.first + len(msg.digests) > spec.nblocks:
            raise ProtocolError(f"HASHES beyond the end of device {spec.name}")
        bs = spec.block_size
        for i, digest in enumerate(msg.digests):
            block = msg.first + i
            if not cache.is_present(block) or cache.local.combinator.owner(block) == LOCAL:
                continue  # still arriving, or rewritten here after the handover
            size = min(bs, spec.size - block * bs)
            if block_hash(await made.provider.read_at(block * bs, size)) != digest:
                self._refetch(msg.device, [block], "final comparison differs")
            else:
                self.result.verified_blocks += 1

    async def _event(self, msg: Event) -> bool:
        if msg.kind == EventKind.AUTHORITY:
            if self._authority_task is not None:
                raise ProtocolError("AUTHORITY sent twice")
            if self.result.group is None:
                raise ProtocolError("AUTHORITY before GROUP")
            self.result.payload = msg.payload
            self.channel.limit_queue(POSTCOPY_QUEUE)
            self._authority_task = asyncio.create_task(self._take_authority(msg.payload),
                                                       name="take-authority")
        elif msg.kind == EventKind.COMPLETE:
            if self._authority_task is None:  # the source sends it after the handover
                raise ProtocolError("COMPLETE before AUTHORITY")
            self._complete_from_source = True
        else:
            raise ProtocolError(f"unexpected event {msg.kind.name} from source")
        return self._finished()

    async def _take_authority(self, payload: bytes) -> None:
        """Run the application's hook (it may read devices: blocks keep arriving)."""
        self.result.seconds_to_authority = time.perf_counter() - self._start
        try:
            await self.on_authority(payload, self.devices)
        except Decline as e:
            log.warning("declining authority: %s", e)
            self.result.declined = True
            self.channel.send(encode_event(EventKind.AUTHORITY_DECLINE, str(e).encode()))
            await self.channel.drain()
            return
        self.channel.send(encode_event(EventKind.AUTHORITY_ACK))
        await self.channel.drain()
        if self._done_payload is not None:
            self._done_bytes = await self._done_payload()

    def _finished(self) -> bool:
        if self.result.declined:
            return True  # the source keeps the workload; nothing more will come
        if not self._complete_from_source:
            return False
        if any(cache.present_count < cache.nblocks for cache in self.devices.values()):
            return False
        if self._authority_task is not None and not self._authority_task.done():
            return False
        self.channel.send(encode_event(EventKind.DONE, self._done_bytes))
        return True

    # -- helpers ---------------------------------------------------------------------

    def _device(self, device: int) -> tuple[DeviceSpec, WaitingCache, NewDevice]:
        try:
            return self._by_id[device]
        except KeyError:
            raise ProtocolError(f"no device {device} in this group") from None

    def _asker(self, device: int, kind: MsgType) -> Callable[[list[int]], None]:
        def ask(blocks: list[int]) -> None:
            spec = self._by_id[device][0]
            bs = spec.block_size
            for block in blocks:
                with contextlib.suppress(PeerLost):
                    self.channel.send(encode_range(kind, device, block * bs,
                                                   min(bs, spec.size - block * bs)))
        return ask


def _is_unit(n: int) -> bool:
    return 1 <= n <= MAX_UNIT and not n & (n - 1)

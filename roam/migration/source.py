"""The sending end of a migration: pre-copy, dirty cycles, handover, post-copy serving.

Order of work: priority requests from the destination first, then every block once
(least volatile first), then dirty cycles until the dirty set is small or the policy
says stop; then suspend, final dirty list, authority transfer, and the last blocks
stream while the destination already runs (unless post-copy is off).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import blake3
import numpy as np
import xxhash

from roam.migration.blocks import Compressor, block_hash
from roam.migration.channel import POSTCOPY_QUEUE, Channel, PeerLost
from roam.migration.errors import (
    InDoubt,
    LostPeer,
    MigrationError,
    PostcopyFailed,
    RemoteError,
    wire_code,
)
from roam.migration.hybrid import StoreOffer
from roam.migration.wire import (
    ALL_CAPS,
    CONTENT_HASH_LEN,
    MAX_SAFE,
    VERSION,
    Caps,
    DeviceSpec,
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
    Range,
    carried_len,
    decode,
    encode_blocks_header,
    encode_dirty,
    encode_error,
    encode_event,
    encode_group,
    encode_hashes,
    encode_have_blocks,
    encode_hello,
    encode_raw_header,
    encode_safe,
    encode_scatter_header,
    encode_store,
)
from roam.storage.bitmap import Blocks, Mask, runs, zero_blocks
from roam.storage.dirty import DirtyTracker
from roam.storage.provider import DEFAULT_BLOCK_SIZE, Buffer, Provider
from roam.storage.volatility import VolatilityMonitor

log = logging.getLogger(__name__)
T = TypeVar("T")

RUN_BYTES = 4 * 1024 * 1024
"""Largest run of blocks in one BLOCKS frame: per-frame work (a read, a zero scan, one
hash, one writev) is paid once per 4 MiB; a block the destination asks for waits behind
at most one such frame (about a millisecond on loopback)."""
NO_BLOCKS: Blocks = np.zeros(0, dtype=np.int64)
SCATTER_RUN = 16
"""With SCATTER negotiated, runs of fewer blocks than this go together in SCATTER frames
(a busy guest's dirty set is mostly single 4 KiB pages: one frame per page cost about
70 us at each end); longer runs keep their own RAW frames."""
READ_GAP = 4
"""Scattered blocks at most this many blocks apart are read with one read."""


@dataclass
class SourceDevice:
    """One device of the group, as the migrator sees it."""

    name: str
    tracker: DirtyTracker
    volatility: VolatilityMonitor | None = None
    sized_at_handover: bool = False

    @classmethod
    def stack(cls, name: str, source: Provider, block_size: int = DEFAULT_BLOCK_SIZE,
              *, sized_at_handover: bool = False) -> SourceDevice:
        """The usual stack: dirty tracker over volatility monitor over the source.
        Write to `device.tracker` so that migration sees every change."""
        volatility = VolatilityMonitor(source, block_size)
        tracker = DirtyTracker(volatility, block_size)
        return cls(name, tracker, volatility, sized_at_handover)

    @property
    def block_size(self) -> int:
        return self.tracker.block_size


class SendQueue:
    """The blocks of one device still to send, in order: arrays of block numbers as they
    were queued. Runs of consecutive pending blocks come out with a few array operations
    per run, never a Python step per block."""

    def __init__(self) -> None:
        self._parts: deque[Blocks] = deque()
        self._pos = 0  # into the first part

    def extend(self, blocks: Blocks) -> None:
        if len(blocks):
            self._parts.append(blocks)

    def next_run(self, pending: Mask, limit: int) -> tuple[int, int] | None:
        """(first, count) of the next run of at most `limit` consecutive pending blocks;
        entries no longer pending (sent meanwhile) are skipped."""
        while self._parts:
            part = self._parts[0]
            window = part[self._pos : self._pos + limit]
            keep = pending[window]
            if not keep.any():
                self._advance(len(window))
                continue
            start = int(keep.argmax())
            run = window[start:]
            consecutive = keep[start:] & (run - run[0] == np.arange(len(run)))
            count = len(run) if consecutive.all() else int(consecutive.argmin())
            self._advance(start + count)
            return int(run[0]), count
        return None

    def next_blocks(self, pending: Mask, limit: int) -> Blocks | None:
        """The pending blocks among the next `limit` entries (ascending), whether
        consecutive or not; None when nothing is left."""
        while self._parts:
            window = self._parts[0][self._pos : self._pos + limit]
            self._advance(len(window))
            blocks = window[pending[window]]
            if len(blocks):
                return np.unique(blocks)
        return None

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._pos >= len(self._parts[0]):
            self._parts.popleft()
            self._pos = 0


async def _nothing() -> None:
    return None


async def _no_payload() -> bytes:
    return b""


@dataclass(frozen=True)
class Progress:
    """Where a migration is, reported once per dirty cycle (and at the first pass and the
    handover) to whoever shows it: `roam migrate` on a terminal, the peer's /events."""

    phase: str  # "copy" (first pass), "cycle" (dirty cycles), "handover" (paused)
    cycle: int  # dirty cycles done
    bytes_sent: int  # on the wire so far
    bytes_expected: int  # sent so far plus what this pass or cycle still has to send
    dirty_rate: float  # bytes per second the workload dirtied since the last report


@dataclass
class SourceHooks:
    """What the VM layer plugs in. Any hook that raises aborts the migration."""

    before_collect: Callable[[], Awaitable[None]] = _nothing  # e.g. fsync the memory file
    # The handover is decided: tell the workload (it runs on through one last short cycle).
    before_suspend: Callable[[], Awaitable[None]] = _nothing
    suspend: Callable[[], Awaitable[None]] = _nothing  # pause the workload, save its state
    authority: Callable[[], Awaitable[bytes]] = _no_payload  # payload for the destination
    resume: Callable[[], Awaitable[None]] = _nothing  # undo suspend (abort or decline)
    progress: Callable[[Progress], None] | None = None  # must not block: called inline
    # What an object store holds of the devices now (roam.migration.hybrid): called once,
    # inline, when the destination is ready; None offers nothing.
    store_offer: Callable[[], StoreOffer | None] | None = None


@dataclass
class Policy:
    # Hand over once a cycle finds at most this many 64 KiB blocks' worth of dirty data
    # (a device with 4 KiB blocks counts 16 of its blocks as one).
    max_dirty_blocks: int = 256
    min_cycles: int = 1
    max_cycles: int = 20
    cycle_throttle: float = 0.0  # seconds to wait between dirty cycles
    postcopy: bool = True  # resume the destination before the last blocks arrive
    # With post-copy, a final dirty set of at most this many bytes still goes before
    # authority: a resumed workload then never waits for it; a larger one streams after.
    # Scattered 4 KiB pages go together in SCATTER frames (about 12 us per page at both
    # ends in bench/scattered_pages.py, 70 us a frame per page to an older peer); the one
    # VM run with 8 MiB here did not show a shorter pause (docs/BENCHMARKS.md), so 2 MiB.
    pause_send_bytes: int = 2 << 20
    precopy: bool = True  # False: hand over at once, every block streams after (lazy start)
    compression: Encoding = Encoding.RAW  # RAW, ZSTD or LZ4
    verify: bool = False  # also send every block's hash at the end for a full comparison
    await_prepared: bool = False  # suspend only after the destination sent PREPARED
    # Group scattered blocks in SCATTER frames when the destination reads them; False
    # sends a frame per run as to an older peer (bench/scattered_pages.py compares them).
    scatter: bool = True


@dataclass
class SourceResult:
    outcome: str  # "completed" or "declined"
    bytes_sent: int = 0
    blocks_sent: int = 0
    cycles: int = 0
    dirty_per_cycle: list[int] = field(default_factory=list)
    final_dirty: int = 0
    total_seconds: float = 0.0
    suspended_seconds: float = 0.0  # suspend called to authority acknowledged
    handover_seconds: float = 0.0  # suspend called to authority sent
    priority_blocks: int = 0
    done: bytes = b""  # what the destination's DONE carried (application data)
    payload_bytes: int = 0  # data blocks sent, before compression (not zero, not HAVE)
    have_bytes: int = 0  # named by HAVE (the destination held them): not sent
    first_pass_seconds: float = 0.0  # READY to every block sent once
    first_pass_payload_bytes: int = 0
    payload: bytes = b""
    prepared: bytes = b""  # the destination's PREPARED payload
    decline_reason: str = ""  # what a destination that declined said
    store_offered_bytes: int = 0  # left to the destination to take from the store


class Source:
    def __init__(self, channel: Channel, devices: Sequence[SourceDevice],
                 hooks: SourceHooks | None = None, policy: Policy | None = None,
                 group_name: str = "", package: str = "") -> None:
        """`package`: the id of the package the workload was made from, if any (a
        destination holding it offers that content, roam.peer.packages)."""
        self.channel = channel
        self.devices = list(devices)
        self.hooks = hooks or SourceHooks()
        self.policy = policy or Policy()
        self.group = Group(name=group_name, package=package, devices=[
            DeviceSpec(id=i, name=d.name, size=d.tracker.size(), block_size=d.block_size,
                       sized_at_handover=d.sized_at_handover)
            for i, d in enumerate(self.devices)
        ])
        self.result = SourceResult(outcome="")
        self._pending = [np.zeros(spec.nblocks, dtype=np.bool_) for spec in self.group.devices]
        self._owned_by_peer = [np.zeros(spec.nblocks, dtype=np.bool_)
                               for spec in self.group.devices]
        # Offered from the store: the first pass leaves them out (hybrid migration).
        self._from_store = [np.zeros(spec.nblocks, dtype=np.bool_)
                            for spec in self.group.devices]
        self._order = [SendQueue() for _ in self.devices]
        self._priority: deque[tuple[int, int]] = deque()
        self._work = asyncio.Event()
        self._ready: asyncio.Future[None] | None = None
        self._prepared: asyncio.Future[bytes] | None = None
        self._answer: asyncio.Future[EventKind] | None = None
        self._done: asyncio.Future[None] | None = None
        # What the destination holds (its HAVE lists): blake3 per unit of blocks.
        self._peer_has: list[dict[int, bytes]] = [{} for _ in self.devices]
        self._have_unit = [0 for _ in self.devices]
        self._caps = Caps(0)
        self._authority_sent = False  # an answer before this is a protocol violation
        self._complete_sent = False  # likewise DONE
        self._compressor: Compressor | None = None
        self._reported = 0.0  # when progress was last reported

    async def run(self) -> SourceResult:
        """Migrate the group. Raises MigrationError (source intact) or InDoubt."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._prepared = loop.create_future()
        self._answer = loop.create_future()
        self._done = loop.create_future()
        start = time.perf_counter()
        reader = asyncio.create_task(self._read_loop(), name="source-reader")
        try:
            await self._migrate(reader)
        except PeerLost as e:
            cause = reader.exception() if reader.done() and not reader.cancelled() else None
            if cause is not None and not isinstance(cause, PeerLost):
                raise cause from e  # what the reader heard (an ERROR, bad input) says more
            raise LostPeer(f"lost the destination: {e}") from e
        except BaseException as e:
            if not self._authority_sent:  # tell the destination why, if it can still hear
                with contextlib.suppress(Exception):
                    self.channel.send(encode_error(ErrorCode.ABORTED, f"source aborted: {e}"))
                    await asyncio.wait_for(self.channel.drain(), 1.0)
            raise
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.result.total_seconds = time.perf_counter() - start
            self.result.bytes_sent = self.channel.bytes_sent
        return self.result

    # -- phases ------------------------------------------------------------------------

    async def _migrate(self, reader: asyncio.Task[None]) -> None:
        assert self._ready and self._answer and self._done
        self.channel.send(encode_hello(ALL_CAPS))
        self.channel.send(encode_group(self.group))
        await self._until(self._ready, reader)
        if self.policy.compression != Encoding.RAW:
            if (self.policy.compression == Encoding.ZSTD and Caps.ZSTD in self._caps) or (
                self.policy.compression == Encoding.LZ4 and Caps.LZ4 in self._caps
            ):
                self._compressor = Compressor(self.policy.compression)
            else:
                log.warning("peer cannot decode %s; sending raw", self.policy.compression.name)
        self._offer_store()

        if not self.policy.precopy:
            await self._handover([np.arange(len(p)) for p in self._pending], reader)
            return
        first_pass = time.perf_counter()
        # What the workload wrote so far must be in the devices before they are read: a
        # block read stale would be sent again at the first cycle.
        await self._check(self.hooks.before_collect(), reader)
        for i, dev in enumerate(self.devices):
            blocks = np.flatnonzero(~self._from_store[i])
            self._queue(i, dev.volatility.order_array(blocks) if dev.volatility else blocks)
        self._report("copy")
        await self._send_pending(reader)
        self._first_pass_done(time.perf_counter() - first_pass)
        if self.result.store_offered_bytes and self.policy.await_prepared:
            # The destination takes the offered chunks from the store and says PREPARED
            # once they are in: cycling meanwhile would resend what the workload keeps
            # rewriting. Serve its requests (chunks the store could not give) until then.
            await self._send_pending(reader, until=self._prepared)

        carry = [NO_BLOCKS for _ in self.devices]
        while True:
            dirty = await self._cycle(carry, reader)
            small = self._dirty_bytes(dirty) <= self.policy.max_dirty_blocks * DEFAULT_BLOCK_SIZE
            if (small and self.result.cycles >= self.policy.min_cycles) or (
                self.result.cycles >= self.policy.max_cycles
            ):
                if await self._wait_prepared(reader):  # the VM ran on while we waited
                    self._send_dirty(dirty)
                    await self._send_pending(reader)
                    carry = [NO_BLOCKS for _ in self.devices]
                    continue
                carry = dirty
                break
            self._send_dirty(dirty)
            await self._send_pending(reader)
            carry = [NO_BLOCKS for _ in self.devices]
            if self.policy.cycle_throttle:
                await asyncio.sleep(self.policy.cycle_throttle)

        # One last cycle while the workload still runs: what it dirtied since the decision
        # (and while it prepared for the pause) goes now, so the pause carries only what
        # changes during this short cycle.
        await self._check(self.hooks.before_suspend(), reader)
        last = await self._cycle(carry, reader)
        self._send_dirty(last)
        await self._send_pending(reader)
        await self._handover([NO_BLOCKS for _ in self.devices], reader)

    def _offer_store(self) -> None:
        """To a destination that can take blocks from an object store: what the store
        holds as the devices are now (STORE, SAFE). Those blocks are tracked from this
        moment as if sent (no await between the offer and that), so a write to one
        makes it dirty and it is sent like any other dirty block."""
        if Caps.STORE not in self._caps:
            return
        offer = self.hooks.store_offer() if self.hooks.store_offer is not None else None
        self.channel.send(encode_store(None if offer is None else offer.descriptor))
        if offer is None:
            return
        for i, safe in enumerate(offer.devices):
            if not len(safe.chunks):
                continue
            spec, cb = self.group.devices[i], safe.chunk_blocks
            padded = np.zeros(-(-spec.nblocks // cb) * cb, dtype=np.bool_)
            padded.reshape(-1, cb)[safe.chunks] = True
            mask = padded[: spec.nblocks]
            self.devices[i].tracker.view.track(mask)
            self._from_store[i] = mask
            self.result.store_offered_bytes += int(np.count_nonzero(mask)) * spec.block_size
            chunks = safe.chunks.astype(np.uint64)
            for start in range(0, len(chunks), MAX_SAFE):
                end = start + MAX_SAFE
                self.channel.send(encode_safe(
                    i, cb, chunks[start:end],
                    safe.addresses[start * CONTENT_HASH_LEN : end * CONTENT_HASH_LEN]))
        log.info("offered %d bytes from the object store", self.result.store_offered_bytes)

    def _first_pass_done(self, seconds: float) -> None:
        result = self.result
        result.first_pass_seconds = seconds
        result.first_pass_payload_bytes = result.payload_bytes
        # Logged for benchmarks that drive the engine through a peer (bench/evacuation.py).
        log.info("first pass: %d bytes of payload (%.0f MB/s) in %.3f s",
                 result.payload_bytes, result.payload_bytes / max(seconds, 1e-9) / 1e6,
                 seconds)

    async def _cycle(self, carry: list[Blocks], reader: asyncio.Task[None]) -> list[Blocks]:
        """Collect the dirty blocks (plus `carry`), per device, sorted."""
        await self._check(self.hooks.before_collect(), reader)
        dirty = [np.union1d(c, d.tracker.take_dirty()) for c, d in zip(
            carry, self.devices, strict=True)]
        total = sum(map(len, dirty))
        self.result.cycles += 1
        self.result.dirty_per_cycle.append(total)
        log.debug("cycle %d: %d dirty blocks", self.result.cycles, total)
        self._report("cycle", dirty)
        return dirty

    async def _wait_prepared(self, reader: asyncio.Task[None]) -> bool:
        """With `await_prepared`, wait for PREPARED; True if that meant waiting."""
        assert self._prepared is not None
        if not self.policy.await_prepared or self._prepared.done():
            return False
        log.info("waiting for the destination to be prepared before the handover")
        await self._until(self._prepared, reader)
        return True

    async def _handover(self, carry: list[Blocks], reader: asyncio.Task[None]) -> None:
        assert self._answer and self._done
        t0 = time.perf_counter()
        try:
            await self._check(self.hooks.suspend(), reader)
            await self._check(self.hooks.before_collect(), reader)
            final = [np.union1d(c, d.tracker.take_dirty()) for c, d in zip(
                carry, self.devices, strict=True)]
            self.result.final_dirty = sum(map(len, final))
            self._report("handover", final)
            self._send_dirty(final)
            if (not self.policy.postcopy
                    or self._dirty_bytes(final) <= self.policy.pause_send_bytes):
                await self._send_pending(reader)
            payload = await self._check(self.hooks.authority(), reader)
            self.channel.send(encode_event(EventKind.AUTHORITY, payload))
            self._authority_sent = True
            await self.channel.drain()
            self.channel.limit_queue(POSTCOPY_QUEUE)
        except BaseException as e:
            # Authority never left: this host still owns the workload, so run it again.
            log.warning("handover aborted before authority transfer: %s", e)
            await self.hooks.resume()
            raise
        self.result.handover_seconds = time.perf_counter() - t0

        # Stream the rest while waiting for the answer; a lost link now is "in doubt".
        sender = asyncio.create_task(self._send_pending(reader), name="postcopy-sender")
        try:
            answer = await asyncio.shield(self._answer)
        except (PeerLost, MigrationError, ProtocolError) as e:
            sender.cancel()
            raise InDoubt(
                f"authority was sent but not acknowledged ({e}); the source stays paused"
            ) from e
        self.result.suspended_seconds = time.perf_counter() - t0
        if answer == EventKind.AUTHORITY_DECLINE:
            sender.cancel()
            log.warning("destination declined authority; resuming the source")
            await self.hooks.resume()
            self.result.outcome = "declined"
            return
        try:
            await sender
            if self.policy.verify:
                await self._send_hashes()
            self._complete_sent = True
            self.channel.send(encode_event(EventKind.COMPLETE))
            # Serve re-fetches (failed verification) until the destination has it all.
            while not self._done.done():
                await self._send_pending(reader, until=self._done)
            self._done.result()
        except (PeerLost, MigrationError, ProtocolError) as e:
            if self._destination_done():
                # DONE arrived, then the destination hung up: the reader may notice the
                # close before this loop notices DONE. The migration is complete.
                self.result.outcome = "completed"
                return
            raise PostcopyFailed(
                f"authority was transferred, then streaming the last blocks failed: {e}"
            ) from e
        self.result.outcome = "completed"

    def _destination_done(self) -> bool:
        done = self._done
        return (done is not None and done.done() and not done.cancelled()
                and done.exception() is None)

    def _dirty_bytes(self, dirty: list[Blocks]) -> int:
        return sum(len(d) * dev.block_size for d, dev in zip(dirty, self.devices, strict=True))

    def _report(self, phase: str, dirty: list[Blocks] | None = None) -> None:
        """Tell the progress hook what was sent and what `dirty` (not queued yet) and the
        queue still hold. Once per cycle: nothing here runs per block."""
        if self.hooks.progress is None:
            return
        now = time.perf_counter()
        found = self._dirty_bytes(dirty) if dirty else 0
        queued = sum(int(np.count_nonzero(p)) * d.block_size for p, d in zip(
            self._pending, self.devices, strict=True))
        sent = self.channel.bytes_sent
        rate = found / (now - self._reported) if self._reported and now > self._reported else 0.0
        self._reported = now
        self.hooks.progress(Progress(phase, self.result.cycles, sent, sent + queued + found,
                                     rate))

    # -- sending -----------------------------------------------------------------------

    def _queue(self, dev: int, blocks: Blocks) -> None:
        pending = self._pending[dev]
        new = blocks[~pending[blocks] & ~self._owned_by_peer[dev][blocks]]
        pending[new] = True
        self._order[dev].extend(new)

    def _send_dirty(self, dirty: list[Blocks]) -> None:
        for i, blocks in enumerate(dirty):
            if len(blocks):
                for start in range(0, len(blocks), 65536):
                    self.channel.send(encode_dirty(i, blocks[start : start + 65536].tolist()))
                self._queue(i, blocks)

    async def _send_pending(self, reader: asyncio.Task[None],
                            until: asyncio.Future[Any] | None = None) -> None:
        """Send queued blocks, priority requests first; with `until`, also wait for more
        requests until that future is done."""
        while True:
            if reader.done():
                reader.result()  # raises what the reader hit
                raise PeerLost("the connection reader stopped")
            if self._priority:
                dev, block = self._priority.popleft()
                self.result.priority_blocks += 1
                await self._send_run(dev, block, 1)
                continue
            if self._scatter():
                batch = self._next_batch()
                if batch is not None:
                    await self._send_batch(*batch)
                    continue
            else:
                run = self._next_run()
                if run is not None:
                    await self._send_run(*run)
                    continue
            if until is None or until.done():
                return
            self._work.clear()  # the reader sets it on requests, DONE and failure
            await self._work.wait()

    def _next_run(self) -> tuple[int, int, int] | None:
        for dev, queue in enumerate(self._order):
            limit = max(1, RUN_BYTES // self.devices[dev].block_size)
            run = queue.next_run(self._pending[dev], limit)
            if run is not None:
                return dev, *run
        return None

    def _scatter(self) -> bool:
        """SCATTER frames are used when the destination reads them and blocks go raw."""
        return self.policy.scatter and Caps.SCATTER in self._caps and self._compressor is None

    def _next_batch(self) -> tuple[int, Blocks] | None:
        for dev, queue in enumerate(self._order):
            limit = max(1, RUN_BYTES // self.devices[dev].block_size)
            blocks = queue.next_blocks(self._pending[dev], limit)
            if blocks is not None:
                return dev, blocks
        return None

    async def _send_batch(self, dev: int, blocks: Blocks) -> None:
        """Pending blocks of one device, ascending: runs of SCATTER_RUN blocks or more as
        runs (RAW, ZERO, HAVE), the shorter ones together in one SCATTER frame. Runs in
        units the destination offered content for (HAVE), a short last block and a span
        too wide for the frame's offsets go as runs too."""
        breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.concatenate((starts, [len(blocks)])))
        spec = self.group.devices[dev]
        if int(blocks[-1]) - int(blocks[0]) >= 1 << 32 or (
                int(blocks[-1]) == spec.nblocks - 1 and spec.size % spec.block_size):
            alone = np.ones(len(starts), dtype=np.bool_)
        else:
            alone = lengths >= SCATTER_RUN
            if known := self._peer_has[dev]:
                units = np.fromiter(known, dtype=np.int64, count=len(known))
                held = np.isin(blocks // self._have_unit[dev], units)
                alone |= np.logical_or.reduceat(held, starts)
        if not alone.all():
            await self._send_scatter(dev, blocks[np.repeat(~alone, lengths)])
        for start, n in zip(starts[alone].tolist(), lengths[alone].tolist(), strict=True):
            await self._send_run(dev, int(blocks[start]), n)

    async def _send_scatter(self, dev: int, blocks: Blocks) -> None:
        """Blocks that are not consecutive (none the device's short last block), in one
        SCATTER frame: one read per cluster of nearby blocks, one zero scan, one hash."""
        device = self.devices[dev]
        bs = device.block_size
        self._pending[dev][blocks] = False
        mask = np.zeros(len(self._pending[dev]), dtype=np.bool_)
        mask[blocks] = True
        device.tracker.view.track(mask)  # before the reads: a write meanwhile is dirty
        pages = np.empty((len(blocks), bs), dtype=np.uint8)
        breaks = np.flatnonzero(np.diff(blocks) > READ_GAP) + 1
        bounds = np.concatenate(([0], breaks, [len(blocks)])).tolist()
        for s, e in itertools.pairwise(bounds):
            lo, hi = int(blocks[s]), int(blocks[e - 1]) + 1
            data = await device.tracker.inner.read_at(lo * bs, (hi - lo) * bs)
            pages[s:e] = np.frombuffer(data, dtype=np.uint8).reshape(-1, bs)[blocks[s:e] - lo]
        zero = zero_blocks(pages.data, bs)
        payload = (pages if not zero.any() else pages[~zero]).reshape(-1).data  # flat bytes
        carried = np.packbits(~zero, bitorder="little").tobytes()
        self.result.payload_bytes += len(payload)
        self.result.blocks_sent += len(blocks)
        self.channel.send(encode_scatter_header(dev, blocks, carried, block_hash(payload),
                                                len(payload)), payload)
        await self.channel.drain()

    async def _send_run(self, dev: int, first: int, count: int) -> None:
        """Send `count` consecutive blocks from `first`: frames of blocks the destination
        holds (HAVE), of zero blocks, and of data (zero blocks inside it left out)."""
        device = self.devices[dev]
        bs = device.block_size
        self._pending[dev][first : first + count] = False
        end = min(device.tracker.size(), (first + count) * bs)
        data = await device.tracker.read_tracked(first * bs, end - first * bs)
        view = memoryview(data).cast("B")
        zero = zero_blocks(view, bs)
        have, digests = self._held(dev, first, view, zero)
        for held, (lo, n) in ([(True, r) for r in runs(have)]
                              + [(False, r) for r in runs(~have)]):
            if held:
                unit = self._have_unit[dev]
                proof = b"".join(digests[u] for u in range((first + lo) // unit,
                                                          -(-(first + lo + n) // unit)))
                self.channel.send(encode_have_blocks(dev, first + lo, n, unit, proof))
                self.result.have_bytes += min(end, (first + lo + n) * bs) - (first + lo) * bs
            else:
                self._send_data(dev, first + lo, view[lo * bs : (lo + n) * bs], zero[lo : lo + n])
        self.result.blocks_sent += count
        await self.channel.drain()

    def _held(self, dev: int, first: int, view: memoryview, zero: Mask
              ) -> tuple[Mask, dict[int, bytes]]:
        """Which blocks of the run the destination holds already (whole units whose blake3
        matches its HAVE list), and their digests by unit."""
        have = np.zeros(len(zero), dtype=np.bool_)
        known = self._peer_has[dev]
        digests: dict[int, bytes] = {}
        if not known:
            return have, digests
        unit = self._have_unit[dev]
        bs = self.devices[dev].block_size
        nblocks = len(self._pending[dev])
        last = first + len(zero)
        for u in range(-(-first // unit), -(-last // unit) if last == nblocks else last // unit):
            lo, hi = u * unit - first, min(last, (u + 1) * unit) - first
            theirs = known.get(u)
            if theirs is None or zero[lo:hi].all():  # zero blocks go as ZERO: no hashing
                continue
            digest = blake3.blake3(view[lo * bs : hi * bs]).digest()
            if digest == theirs:
                have[lo:hi] = True
                digests[u] = digest
        return have, digests

    def _send_data(self, dev: int, first: int, data: memoryview, zero: Mask) -> None:
        """Blocks of a run the destination does not hold: zero runs as ZERO, the rest in
        one RAW frame (or compressed, per block)."""
        bs = self.devices[dev].block_size
        if zero.all():
            self.channel.send(encode_blocks_header(dev, Encoding.ZERO, first, len(zero),
                                                   b"", [], 0))
            return
        if self._compressor is not None:
            for lo, n in runs(zero):
                self.channel.send(encode_blocks_header(dev, Encoding.ZERO, first + lo, n,
                                                       b"", [], 0))
            for lo, n in runs(~zero):
                self._send_compressed(dev, first + lo, data[lo * bs : (lo + n) * bs], n, bs)
            return
        if not zero.any():
            parts: list[Buffer] = [data]
            run_hash = block_hash(data)
        else:
            parts = [data[lo * bs : (lo + n) * bs] for lo, n in runs(~zero)]
            hasher = xxhash.xxh3_128()
            for part in parts:
                hasher.update(part)
            run_hash = hasher.digest()
        carried = np.packbits(~zero, bitorder="little").tobytes()
        assert len(carried) == carried_len(len(zero))
        size = sum(len(p) for p in parts)
        self.result.payload_bytes += size
        self.channel.send(encode_raw_header(dev, first, len(zero), carried, run_hash, size),
                          *parts)  # the channel copies whatever it cannot send now

    def _send_compressed(self, dev: int, first: int, data: memoryview, count: int,
                         bs: int) -> None:
        assert self._compressor is not None
        self.result.payload_bytes += len(data)
        hashes = b"".join(block_hash(data[i * bs : (i + 1) * bs]) for i in range(count))
        packed = [self._compressor.compress(data[i * bs : (i + 1) * bs]) for i in range(count)]
        if all(p is not None for p in packed):
            parts = [p for p in packed if p is not None]
            self.channel.send(encode_blocks_header(
                dev, self._compressor.encoding, first, count, hashes,
                [len(p) for p in parts], sum(map(len, parts))), *parts)
            return
        run_hash = block_hash(data)
        carried = np.packbits(np.ones(count, dtype=np.bool_), bitorder="little").tobytes()
        self.channel.send(encode_raw_header(dev, first, count, carried, run_hash, len(data)),
                          data)

    async def _send_hashes(self) -> None:
        """Every block's hash, so the destination can compare its whole copy. Reads go
        below the dirty tracker: the workload is paused, nothing changes."""
        for i, dev in enumerate(self.devices):
            bs = dev.block_size
            n = self.group.devices[i].nblocks
            per_frame = max(1, RUN_BYTES // bs) * 16
            for start in range(0, n, per_frame):
                stop = min(n, start + per_frame)
                end = min(dev.tracker.size(), stop * bs)
                view = memoryview(await dev.tracker.inner.read_at(start * bs, end - start * bs))
                digests = [block_hash(view[k * bs : (k + 1) * bs]) for k in range(stop - start)]
                self.channel.send(encode_hashes(MsgType.HASHES, i, start, digests))
                await self.channel.drain()

    # -- receiving ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._ready and self._prepared and self._answer and self._done
        try:
            while True:
                kind, body = await self.channel.recv()
                self._handle(decode(kind, body))
        except BaseException as e:
            futures: list[asyncio.Future[Any]] = [self._ready, self._prepared, self._answer,
                                                  self._done]
            for fut in futures:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else PeerLost("cancelled"))
                    fut.exception()  # mark retrieved: whoever waits sees it via result()
            self._work.set()
            if not isinstance(e, asyncio.CancelledError):
                # A sender blocked on flow control (a peer that stopped reading) wakes up.
                with contextlib.suppress(Exception):
                    self.channel.send(encode_error(ErrorCode.ABORTED, f"source aborted: {e}"))
                await self.channel.close()
            raise

    def _handle(self, msg: Message) -> None:
        assert self._ready and self._answer and self._done
        if isinstance(msg, Hello):
            if msg.version != VERSION:
                raise ProtocolError(f"destination speaks version {msg.version}, not {VERSION}")
            self._caps = msg.caps
        elif isinstance(msg, Range):
            self._handle_range(msg)
        elif isinstance(msg, Hashes) and msg.kind == MsgType.HAVE:
            spec = self.group.devices[self._device_index(msg.device)]
            if self._have_unit[msg.device] not in (0, msg.unit):
                raise ProtocolError(f"HAVE lists of device {spec.name} change their unit")
            units = -(-spec.nblocks // msg.unit)
            if msg.first // msg.unit + len(msg.digests) > units:
                raise ProtocolError(f"HAVE beyond the end of device {spec.name}")
            self._have_unit[msg.device] = msg.unit
            known = self._peer_has[msg.device]
            for i, digest in enumerate(msg.digests):
                known[msg.first // msg.unit + i] = digest
        elif isinstance(msg, Event):
            if msg.kind == EventKind.READY and not self._ready.done():
                self._ready.set_result(None)
            elif msg.kind == EventKind.PREPARED:
                assert self._prepared is not None
                if not self._ready.done() or self._prepared.done():
                    raise ProtocolError("PREPARED before READY or twice")
                self.result.prepared = msg.payload
                self._prepared.set_result(msg.payload)
                self._work.set()
            elif msg.kind in (EventKind.AUTHORITY_ACK, EventKind.AUTHORITY_DECLINE):
                if not self._authority_sent:
                    raise ProtocolError(f"{msg.kind.name} before authority was sent")
                if msg.kind == EventKind.AUTHORITY_DECLINE:
                    self.result.decline_reason = msg.payload.decode(errors="replace")
                if not self._answer.done():
                    self._answer.set_result(msg.kind)
            elif msg.kind == EventKind.DONE:
                if not self._complete_sent:
                    raise ProtocolError("DONE before the source sent COMPLETE")
                self.result.done = bytes(msg.payload)
                if not self._done.done():
                    self._done.set_result(None)
                self._work.set()
            else:
                raise ProtocolError(f"unexpected event {msg.kind.name} from destination")
        elif isinstance(msg, Error):
            raise RemoteError(f"destination: {msg.message} ({msg.code.name})",
                              code=wire_code(msg.code))
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from destination")

    def _handle_range(self, msg: Range) -> None:
        dev = self._device_index(msg.device)
        spec = self.group.devices[dev]
        if msg.offset + msg.length > spec.size or msg.length == 0:
            raise ProtocolError(f"{msg.kind.name} outside device {spec.name}")
        bs = spec.block_size
        blocks = range(msg.offset // bs, (msg.offset + msg.length - 1) // bs + 1)
        if msg.kind == MsgType.NEED_AT:
            if unit := self._have_unit[dev]:  # asked for: its HAVE entry no longer holds
                for u in range(blocks.start // unit, (blocks.stop - 1) // unit + 1):
                    self._peer_has[dev].pop(u, None)
            self._owned_by_peer[dev][blocks.start : blocks.stop] = False
            self._priority.extend((dev, b) for b in blocks)
        else:
            # The destination wrote these itself: never send them again.
            self._owned_by_peer[dev][blocks.start : blocks.stop] = True
            self._pending[dev][blocks.start : blocks.stop] = False
        self._work.set()

    def _device_index(self, device: int) -> int:
        if device >= len(self.devices):
            raise ProtocolError(f"no device {device} in this group")
        return device

    async def _check(self, step: Awaitable[T], reader: asyncio.Task[None]) -> T:
        """Run a step, but fail at once if the connection reader fails meanwhile."""
        task = asyncio.ensure_future(step)
        await asyncio.wait([task, reader], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            reader.result()
            raise PeerLost("the connection reader stopped")
        return task.result()

    async def _until(self, fut: asyncio.Future[T], reader: asyncio.Task[None]) -> None:
        await self._check(asyncio.shield(fut), reader)

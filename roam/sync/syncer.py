"""The continuous sync of one device group: dirty chunks up to the store, a manifest per
sync point, with Silo's knobs.

Every `check_period` the sync takes the dirty blocks of its view of each device's dirty
tracker and adds them to its chunks' pending counts; then it uploads, up to `limit`
chunks, first those pending for longer than `max_age` (oldest first), then those with at
least `min_changes` dirty blocks (most changed first), `concurrency` at a time. A chunk
goes up whole (1 MiB: a run of blocks, one object, one PUT), named by its content's
keyed hash; a name the store holds already costs no PUT, and an all-zero chunk has no
object at all. The first pass uploads every chunk once, without the limit; after it,
every cycle that changed the store ends with a manifest (a sync point).

A chunk is *safe* when it was uploaded and has not been written since (not pending, not
in flight, no dirty block in it): a migration hands those to its destination, which
takes them from the store (roam.migration, docs/SYNC.md).

If the store fails, the chunks go back to pending and the sync waits (0.5 s, doubling
to 30 s) before it tries again: the VM runs on, and the lag (bytes and seconds not yet
uploaded) grows until the store is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from roam.storage.bitmap import Blocks, Mask
from roam.storage.dirty import DirtyTracker
from roam.storage.provider import block_count, is_zero
from roam.sync.crypto import ADDRESS_LEN, ZERO, SyncKey
from roam.sync.errors import StoreRefused, SyncError
from roam.sync.manifest import (
    Addresses,
    Manifest,
    address_of,
    manifest_key,
    manifests_prefix,
    object_key,
    seq_of,
)
from roam.sync.store import ObjectStore

log = logging.getLogger(__name__)

CHUNK = 1 << 20
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class SyncPolicy:
    """Silo's knobs (pkg/storage/migrator/sync.go and the dirty tracker's
    GetDirtyBlocks), in seconds and counts."""

    check_period: float = 1.0  # how often dirty blocks are collected
    max_age: float = 5.0  # a chunk pending this long goes up whatever its changes
    min_changes: int = 16  # dirty blocks that send a chunk up before max_age
    limit: int = 256  # chunks uploaded per check (after the first pass)
    concurrency: int = 8  # uploads in flight
    chunk_size: int = CHUNK  # bytes per object (a power of two, >= the block size)
    keep: int = 3  # sync points kept per VM; older manifests are deleted

    def __post_init__(self) -> None:
        if self.chunk_size < 4096 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError("chunk_size must be a power of two of at least 4096")
        if self.check_period <= 0 or self.concurrency < 1 or self.limit < 1 or self.keep < 1:
            raise ValueError("check_period, concurrency, limit and keep must be positive")


class SyncState(enum.StrEnum):
    FIRST_PASS = "first-pass"  # every chunk once
    RUNNING = "running"  # caught up at least once; uploading what changes
    RETRYING = "retrying"  # the store failed; waiting to try again
    STOPPED = "stopped"


@dataclass(frozen=True)
class SyncDevice:
    """One device as the sync sees it: its dirty tracker, and optionally an order for
    the first pass (least written first)."""

    name: str
    tracker: DirtyTracker
    order: Callable[[Blocks], Blocks] | None = None


@dataclass
class SyncStatus:
    to: str
    state: SyncState
    lag_bytes: int  # changed (or never uploaded) and not uploaded yet
    lag_seconds: float  # how long the oldest of that has waited
    uploaded_bytes: int = 0  # plaintext bytes of chunks put
    objects_put: int = 0
    dedup_hits: int = 0  # chunks whose object the store held already
    zero_chunks: int = 0
    requests: int = 0
    sync_point: int | None = None  # seq of the newest manifest written
    error: str | None = None  # the last failure, while retrying


@dataclass
class Safe:
    """Chunks of one device that the store holds as the device has them now."""

    chunk_blocks: int
    chunks: Blocks
    addresses: Addresses


class _Device:
    """Per-chunk state of one device, one array per field (no Python step per chunk)."""

    def __init__(self, dev: SyncDevice, chunk_size: int, now: float) -> None:
        self.dev = dev
        self.size = dev.tracker.size()
        bs = dev.tracker.block_size
        self.chunk_blocks = max(1, chunk_size // bs)
        self.chunk_bytes = self.chunk_blocks * bs
        n = block_count(self.size, self.chunk_bytes)
        self.view = dev.tracker.watch()
        self.addresses: Addresses = np.zeros((n, ADDRESS_LEN), dtype=np.uint8)
        self.uploaded = np.zeros(n, dtype=np.bool_)
        self.pending = np.ones(n, dtype=np.bool_)
        self.since = np.full(n, now, dtype=np.float64)
        self.changes = np.full(n, self.chunk_blocks, dtype=np.int64)
        self.in_flight = np.zeros(n, dtype=np.bool_)

    @property
    def nchunks(self) -> int:
        return len(self.pending)

    def collect(self, now: float) -> None:
        dirty = self.view.take_dirty()
        if not len(dirty):
            return
        counts = np.bincount(dirty // self.chunk_blocks, minlength=self.nchunks)
        newly = counts > 0
        self.since[newly & ~self.pending] = now
        self.pending |= newly
        self.changes += counts

    def take(self, chunks: Blocks) -> None:
        self.pending[chunks] = False
        self.changes[chunks] = 0
        self.in_flight[chunks] = True

    def give_back(self, chunk: int, since: float) -> None:
        """An upload that failed: the chunk is pending again, as old as it was."""
        self.in_flight[chunk] = False
        self.since[chunk] = min(self.since[chunk], since) if self.pending[chunk] else since
        self.pending[chunk] = True
        self.changes[chunk] += self.chunk_blocks

    def dirty_chunks(self) -> Mask:
        mask = self.view.dirty_mask()
        padded = np.zeros(self.nchunks * self.chunk_blocks, dtype=np.bool_)
        padded[: len(mask)] = mask
        chunks: Mask = np.asarray(padded.reshape(self.nchunks, self.chunk_blocks).any(axis=1))
        return chunks

    def behind(self) -> Mask:
        behind: Mask = self.pending | self.in_flight | self.dirty_chunks()
        return behind


@dataclass
class _Job:
    device: _Device
    chunk: int
    since: float


@dataclass
class _Totals:
    uploaded_bytes: int = 0
    objects_put: int = 0
    dedup_hits: int = 0
    zero_chunks: int = 0
    changed: bool = True  # the store changed since the last manifest
    errors: list[str] = field(default_factory=list)


async def _nothing() -> None:
    return None


class Syncer:
    """Sync `devices` of VM `vm` to the store until cancelled (`run`)."""

    def __init__(self, vm: str, devices: Sequence[SyncDevice], store: ObjectStore,
                 key: SyncKey, policy: SyncPolicy | None = None,
                 before_collect: Callable[[], Awaitable[None]] = _nothing,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.vm = vm
        self.store = store
        self.key = key
        self.policy = policy or SyncPolicy()
        self.before_collect = before_collect
        self._clock = clock
        now = clock()
        self.devices = [_Device(d, self.policy.chunk_size, now) for d in devices]
        self.state = SyncState.FIRST_PASS
        self.known: set[bytes] = set()  # addresses the store holds
        self.seq: int | None = None  # newest manifest
        self.sealed_seq: int | None = None  # newest sealed manifest: retention keeps it
        self.totals = _Totals()
        self.error: str | None = None
        self.retrying = asyncio.Event()  # set while the store fails
        self._cycling = asyncio.Lock()  # a seal waits for the cycle in progress
        self._putting: dict[bytes, asyncio.Future[None]] = {}

    async def start(self) -> None:
        """Check the store (one clear error if it refuses us) and learn what it holds:
        its objects (uploads skip them) and this VM's newest sync point."""
        await self.store.check()
        async for item in self.store.list("objects/"):
            address = address_of(item.key)
            if address is not None:
                self.known.add(address)
        async for item in self.store.list(manifests_prefix(self.vm)):
            seq = seq_of(item.key, self.vm)
            if seq is not None and (self.seq is None or seq > self.seq):
                self.seq = seq

    async def run(self) -> None:
        """Cycles until cancelled (a later `run` goes on where this one stopped);
        failures of the store are retried with backoff, a refusal (credentials, bucket)
        ends the sync."""
        backoff = 0.0
        try:
            while True:
                try:
                    await self.cycle()
                except StoreRefused:
                    raise
                except SyncError as exc:
                    backoff = min(BACKOFF_MAX, backoff * 2 or BACKOFF_FIRST)
                    self.error = str(exc)
                    self.state = SyncState.RETRYING
                    self.retrying.set()
                    log.warning("sync of %s to %s: %s; retrying in %.1f s", self.vm,
                                self.store.url, exc, backoff)
                    await asyncio.sleep(backoff)
                    continue
                if backoff:
                    log.info("sync of %s to %s works again", self.vm, self.store.url)
                backoff = 0.0
                self.error = None
                self.retrying.clear()
                self.state = (SyncState.RUNNING if all(d.uploaded.all() for d in self.devices)
                              else SyncState.FIRST_PASS)
                await asyncio.sleep(self.policy.check_period)
        finally:
            self.state = SyncState.STOPPED

    def close(self) -> None:
        """Stop tracking the devices (after the last `run`)."""
        for d in self.devices:
            d.view.close()

    async def cycle(self) -> None:
        """One check: collect, upload what the policy picks, write a sync point."""
        async with self._cycling:
            await self.before_collect()
            now = self._clock()
            for d in self.devices:
                d.collect(now)
            jobs = self._select(now)
            if jobs:
                await self._upload(jobs)
            if self.totals.changed and all(d.uploaded.all() for d in self.devices):
                await self._write_manifest()

    async def seal(self, *, epoch: int = 0) -> int:
        """Upload everything pending and write a sealed sync point: the caller paused
        the VM (and saved its device state), so every device is as of one instant.
        Returns the point's seq. Waits for a cycle in progress."""
        async with self._cycling:
            await self.before_collect()
            now = self._clock()
            jobs: list[_Job] = []
            for d in self.devices:
                d.collect(now)
                chunks = np.flatnonzero(d.pending)
                d.take(chunks)
                jobs += [_Job(d, int(c), now) for c in chunks]
            await self._upload(jobs)
            self.sealed_seq = await self._write_manifest(sealed=True, epoch=epoch)
            return self.sealed_seq

    # -- picking -------------------------------------------------------------------------

    def _select(self, now: float) -> list[_Job]:
        policy = self.policy
        jobs: list[_Job] = []
        room = policy.limit  # the first pass is not limited
        for d in self.devices:
            ready = d.pending & ~d.in_flight
            if not d.uploaded.all():  # first pass: every chunk, least written first
                chunks = np.flatnonzero(ready)
                if d.dev.order is not None and len(chunks):
                    blocks = d.dev.order(chunks * d.chunk_blocks)
                    chunks = blocks // d.chunk_blocks
                jobs += [_Job(d, int(c), float(d.since[c])) for c in chunks]
                d.take(chunks)
                continue
            old = np.flatnonzero(ready & (d.since <= now - policy.max_age))
            old = old[np.argsort(d.since[old], kind="stable")]
            busy = np.flatnonzero(ready & (d.since > now - policy.max_age)
                                  & (d.changes >= policy.min_changes))
            busy = busy[np.argsort(-d.changes[busy], kind="stable")]
            chunks = np.concatenate((old, busy))[:room]
            room -= len(chunks)
            jobs += [_Job(d, int(c), float(d.since[c])) for c in chunks]
            d.take(chunks)
        return jobs

    # -- uploading -----------------------------------------------------------------------

    async def _upload(self, jobs: list[_Job]) -> None:
        """Upload `jobs`, `concurrency` at a time. The first failure stops the others
        from starting: every job not done goes back to pending, then the failure is
        raised (the caller backs off)."""
        queue = deque(jobs)
        failed: list[SyncError] = []

        async def worker() -> None:
            while queue and not failed:
                job = queue.popleft()
                try:
                    await self._upload_one(job)
                except SyncError as exc:
                    job.device.give_back(job.chunk, job.since)
                    failed.append(exc)
                except BaseException:
                    job.device.give_back(job.chunk, job.since)
                    raise

        try:
            async with asyncio.TaskGroup() as tasks:
                for _ in range(min(self.policy.concurrency, len(jobs))):
                    tasks.create_task(worker())
        finally:
            while queue:
                job = queue.popleft()
                job.device.give_back(job.chunk, job.since)
        if failed:
            raise failed[0]

    async def _upload_one(self, job: _Job) -> None:
        d, c = job.device, job.chunk
        offset = c * d.chunk_bytes
        data = bytes(await d.view.read_tracked(offset, min(d.chunk_bytes, d.size - offset)))
        if is_zero(data):
            address = ZERO
            self.totals.zero_chunks += 1
        else:
            address, blob = await asyncio.to_thread(self._prepare, data)
            other = self._putting.get(address)
            if blob is None:
                self.totals.dedup_hits += 1
            elif other is not None:  # the same content is going up right now
                await asyncio.shield(other)
                self.totals.dedup_hits += 1
            else:
                await self._put(address, blob)
                self.totals.objects_put += 1
                self.totals.uploaded_bytes += len(data)
        d.in_flight[c] = False
        if not d.uploaded[c] or bytes(d.addresses[c]) != address:
            d.addresses[c] = np.frombuffer(address, dtype=np.uint8)
            d.uploaded[c] = True
            self.totals.changed = True

    async def _put(self, address: bytes, blob: bytes) -> None:
        """PUT one object; uploads of the same content meanwhile wait for this one."""
        done = self._putting[address] = asyncio.get_running_loop().create_future()
        try:
            await self.store.put(object_key(address), blob)
        except BaseException as exc:
            done.set_exception(exc if isinstance(exc, SyncError) else SyncError(str(exc)))
            done.exception()  # retrieved here: a waiter re-raises it from its await
            raise
        finally:
            del self._putting[address]
        self.known.add(address)
        done.set_result(None)

    def _prepare(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Address, and the sealed object unless the store holds it (in a thread: the
        hashing and encryption of 1 MiB release the GIL)."""
        address = self.key.address(data)
        if address in self.known:
            return address, None
        return address, self.key.seal(address, data)

    async def _write_manifest(self, *, sealed: bool = False, epoch: int = 0) -> int:
        seq = 0 if self.seq is None else self.seq + 1
        manifest = Manifest.build(
            self.vm, seq, self.policy.chunk_size,
            [(d.dev.name, d.size, d.dev.tracker.block_size, d.addresses.copy())
             for d in self.devices], sealed=sealed, epoch=epoch)
        self.totals.changed = False
        try:
            await self.store.put(manifest_key(self.vm, seq), manifest.seal(self.key))
        except BaseException:
            self.totals.changed = True
            raise
        self.seq = seq
        old = [manifest_key(self.vm, s) for s in range(max(0, seq - 2 * self.policy.keep),
                                                      seq - self.policy.keep + 1)
               if s != self.sealed_seq]
        with contextlib.suppress(SyncError):  # retention is best effort; --gc finishes it
            await self.store.delete(old)
        log.debug("sync point %d of %s written", seq, self.vm)
        return seq

    # -- what others ask -----------------------------------------------------------------

    def status(self) -> SyncStatus:
        now = self._clock()
        lag_bytes = 0
        oldest = now
        for d in self.devices:
            behind = d.behind()
            if behind.any():
                lag_bytes += int(np.count_nonzero(behind)) * d.chunk_bytes
                oldest = min(oldest, float(d.since[behind].min()))
        totals = self.totals
        return SyncStatus(
            to=str(self.store.url.child(self.vm)), state=self.state, lag_bytes=lag_bytes,
            lag_seconds=round(now - oldest, 3), uploaded_bytes=totals.uploaded_bytes,
            objects_put=totals.objects_put, dedup_hits=totals.dedup_hits,
            zero_chunks=totals.zero_chunks, requests=self.store.counters.requests,
            sync_point=self.seq, error=self.error)

    def in_use(self) -> frozenset[bytes]:
        """Every object address this sync names or is putting now (a garbage collection
        spares them, whether or not a manifest names them yet)."""
        named = {bytes(a) for d in self.devices for a in np.unique(d.addresses, axis=0)
                 if a.any()}
        return frozenset(named | set(self._putting))

    def safe(self) -> list[Safe] | None:
        """Per device, the chunks the store holds as they are now (zero chunks left
        out: they cost nothing to send); None while the store is failing, so that a
        migration then relies on its peer alone."""
        if self.error is not None:
            return None
        result = []
        for d in self.devices:
            mask = d.uploaded & ~d.behind() & d.addresses.any(axis=1)
            chunks = np.flatnonzero(mask)
            result.append(Safe(d.chunk_blocks, chunks, d.addresses[chunks].copy()))
        return result

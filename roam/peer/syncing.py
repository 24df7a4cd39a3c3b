"""A VM's continuous sync under its worker, and the bridge between roam.sync and a
migration (what the source offers from the store; how a destination opens it).

The sync runs as one task of the worker, beside the VM; it never stops the VM: a store
that fails is retried with backoff, one that refuses us ends the sync (its error shows
in `peer ls`). While it runs, the VM's info is published again whenever the sync's
state, sync point or lag changes (at most once a second), so `peer ls` shows the lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from roam.migration.hybrid import SafeChunks, StoreOffer
from roam.migration.wire import StoreDescriptor
from roam.peer import events
from roam.peer.models import Checkpoint, GcRequest, GcResult, SyncInfo, SyncRequest
from roam.sync import gc
from roam.sync.crypto import KEY_FILE, SyncKey
from roam.sync.reader import ChunkReader
from roam.sync.store import ObjectStore, StoreURL
from roam.sync.syncer import SyncDevice, Syncer, SyncPolicy, SyncState

__all__ = ["SyncJob", "SyncPolicy", "collect", "key_file", "open_store", "policy_of",
           "start", "store_offer"]

if TYPE_CHECKING:
    from roam.peer.instance import Instance

log = logging.getLogger(__name__)

REPORT_PERIOD = 1.0


def policy_of(request: SyncRequest) -> SyncPolicy:
    return SyncPolicy(check_period=request.check_period, max_age=request.max_age,
                      min_changes=request.min_changes, limit=request.limit,
                      concurrency=request.concurrency, keep=request.keep)


@dataclass
class SyncJob:
    """A VM's sync: the syncer, the task that runs it and the task that reports it."""

    instance: Instance
    syncer: Syncer
    task: asyncio.Task[None] | None = None
    reporter: asyncio.Task[None] | None = None
    failure: str | None = None
    checkpoint: Checkpoint | None = None  # the newest sealed point (roam.peer.sealing)
    checkpointer: asyncio.Task[None] | None = None  # seals one every so often

    def launch(self) -> None:
        """Run the sync (again, after `hold`)."""
        if self.task is not None and not self.task.done():
            return
        self.task = asyncio.create_task(self.syncer.run(),
                                        name=f"sync-{self.instance.spec.name}")
        self.task.add_done_callback(self._ended)
        if self.reporter is None or self.reporter.done():
            self.reporter = asyncio.create_task(_report(self.instance, self.syncer))

    def _ended(self, done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            self.failure = str(done.exception())
            log.error("sync of %s stopped: %s", self.instance.spec.name, self.failure)
            if self.reporter is not None:
                self.reporter.cancel()
            events.changed(self.instance)

    def info(self) -> SyncInfo:
        status = self.syncer.status()
        fields = asdict(status)
        fields["checkpoint"] = self.checkpoint
        if self.task is None or self.task.done():
            fields["state"] = SyncState.STOPPED
            fields["error"] = self.failure or status.error
        return SyncInfo.model_validate(fields)

    async def hold(self) -> None:
        """Stop uploading for now: the VM is about to run elsewhere, whose peer syncs it
        from then on (`launch` again if it stays here after all)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def stop(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.checkpointer
        await self.hold()
        if self.reporter is not None:
            self.reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reporter
        self.syncer.close()


async def start(instance: Instance, url: StoreURL, endpoint_url: str | None, key: SyncKey,
                policy: SyncPolicy) -> SyncJob:
    """Check the store (its refusal is the caller's error: the VM is unaffected), then
    sync `instance`'s devices to url/NAME until stopped."""
    devices = [SyncDevice(name, dev.tracker, dev.volatility.order_array
                          if dev.volatility is not None else None)
               for name, dev in ((n, instance.devices[n]) for n in instance.order)]
    syncer = Syncer(instance.spec.name, devices, ObjectStore(url, endpoint_url), key, policy,
                    before_collect=instance.vm.machine.flush_memory)
    try:
        await syncer.start()
    except BaseException:
        syncer.close()
        raise
    job = SyncJob(instance, syncer)
    job.launch()
    log.info("%s syncs to %s", instance.spec.name, url.child(instance.spec.name))
    return job


async def _report(instance: Instance, syncer: Syncer) -> None:
    last = None
    while True:
        status = syncer.status()
        now = (status.state, status.sync_point, status.lag_bytes, status.error)
        if now != last:
            events.changed(instance)
            last = now
        await asyncio.sleep(REPORT_PERIOD)


async def collect(job: SyncJob, request: GcRequest) -> GcResult:
    syncer = job.syncer
    done = await gc.collect(syncer.store, syncer.key, syncer.vm, request.keep, request.grace,
                            syncer.in_use())
    return GcResult.model_validate(asdict(done))


def store_offer(syncer: Syncer) -> StoreOffer | None:
    """What a migration out may leave to the store (None while the store fails)."""
    safe = syncer.safe()
    if safe is None:
        return None
    store = syncer.store
    return StoreOffer(
        StoreDescriptor(url=str(store.url), endpoint_url=store.endpoint_url,
                        key=syncer.key.secret.hex(), chunks=sum(len(s.chunks) for s in safe)),
        [SafeChunks(s.chunk_blocks, s.chunks, s.addresses.tobytes()) for s in safe])


async def open_store(descriptor: StoreDescriptor) -> ChunkReader:
    """A destination's reader of the store a source offered (its own credentials, from
    its environment; the source's endpoint unless it names none)."""
    return ChunkReader(ObjectStore(StoreURL.parse(descriptor.url), descriptor.endpoint_url),
                       SyncKey(bytes.fromhex(descriptor.key)))


def key_file(state_dir: Path) -> Path:
    """The peer's sync key (made on first use, mode 0600, in its 0700 state directory)."""
    return state_dir / KEY_FILE

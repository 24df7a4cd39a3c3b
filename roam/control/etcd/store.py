"""The store (roam.control.store) in etcd: the control plane replicated.

The interface is etcd's own model cut down, so each call is one etcd call: `get` and
`range` are ranges, `txn` a transaction comparing mod_revisions, leases are etcd's
leases (their keys deleted by etcd when they expire, whichever control-plane instance
granted them) and `watch` is etcd's watch. Every key lives under a root ("/roam" by
default), so that several control planes, or other users, can share one cluster.

The retention bound is etcd's compaction: every COMPACT_INTERVAL seconds the store
compacts the history to its last `retention` revisions (the cluster's, which every user
of it shares), and a watch from before that gets `Compacted`. A watch outlives the loss
of a member (the client resumes it on another from the last revision seen) and of every
member (this store retries until one is back), so a watcher only ever sees the changes,
in order, or Compacted.

etcd's leases live whole seconds: a TTL is rounded up (and etcd may raise it to its own
minimum, about 1.5 election timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Self

from roam.control.etcd import wire
from roam.control.etcd.client import (
    Compare as EtcdCompare,
)
from roam.control.etcd.client import (
    CompareTarget,
    DeleteOp,
    EtcdClient,
    PutOp,
    prefix_end,
)
from roam.control.etcd.errors import EtcdError, LeaseNotFound, Unreachable
from roam.control.store import (
    Delete,
    Lease,
    Put,
    Range,
    Record,
    StoreError,
    Txn,
    TxnResult,
    WatchEvent,
    WatchKind,
)

log = logging.getLogger(__name__)

ROOT = "/roam"
RETENTION = 10_000
"""Revisions of history kept for watchers (as the SQLite store's change log)."""
COMPACT_INTERVAL = 60.0
WATCH_RETRY = 0.5
"""Seconds between attempts to watch again while no etcd member can be reached."""


class EtcdStore:
    """`store = EtcdStore.open(client)`; `await store.close()` (or `async with`)."""

    def __init__(self, client: EtcdClient, root: str, retention: int,
                 compact_every: float) -> None:
        if root.endswith("/") or (root and not root.startswith("/")):
            raise StoreError(f"the etcd root is a key path like /roam, not {root!r}")
        self.client = client
        self._root = root
        self._retention = retention
        self._compact_every = compact_every
        self._closed = asyncio.Event()
        self._compactor: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, client: EtcdClient, root: str = ROOT, retention: int = RETENTION,
             compact_every: float = COMPACT_INTERVAL) -> Self:
        """The store over `client` (closed with the store), compacting in the background
        every `compact_every` seconds."""
        store = cls(client, root, retention, compact_every)
        store._compactor = asyncio.create_task(store._compact())
        return store

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._compactor is not None:
            self._compactor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compactor
        await self.client.close()

    # -- reads -------------------------------------------------------------------------

    async def get(self, key: str) -> Record | None:
        found = await self.client.get(self._key(key))
        return None if found is None else self._record(found)

    async def range(self, prefix: str) -> Range:
        start = self._key(prefix)
        found = await self.client.range(start, prefix_end(start))
        return Range([self._record(kv) for kv in found.kvs], found.header.revision)

    # -- writes ------------------------------------------------------------------------

    async def txn(self, txn: Txn) -> TxnResult:
        answer = await self.client.txn(
            [EtcdCompare(self._key(c.key), CompareTarget.MOD, c.mod_revision)
             for c in txn.compare],
            [self._op(op) for op in txn.then], [self._op(op) for op in txn.otherwise])
        return TxnResult(answer.succeeded, answer.header.revision)

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        return (await self.client.put(self._key(key), value, lease or 0)).header.revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        return (await self.client.delete_range(*self._span(key, prefix))).header.revision

    async def grant(self, ttl: float) -> Lease:
        if not ttl > 0:
            raise StoreError("a lease needs a positive time to live")
        granted = await self.client.grant(max(1, math.ceil(ttl)))
        return Lease(granted.id, float(granted.ttl))

    async def keepalive(self, lease: int) -> Lease:
        renewed = await self.client.keepalive(lease)
        return Lease(lease, float(renewed.ttl))

    async def revoke(self, lease: int) -> None:
        with contextlib.suppress(LeaseNotFound):
            await self.client.revoke(lease)

    # -- watches -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, prefix: str, after: int) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        async with contextlib.aclosing(self._events(prefix, after)) as events:
            yield events

    async def _events(self, prefix: str, after: int) -> AsyncGenerator[WatchEvent]:
        seen = after
        while not self._closed.is_set():
            try:
                async with self.client.watch(*self._span(prefix, True),
                                             start_revision=seen + 1) as stream:
                    async for response in stream:
                        for event in response.events:
                            yield self._event(event)
                        seen = response.events[-1].kv.mod_revision
            except Unreachable as exc:
                log.warning("watching %s: %s; trying again", prefix, exc.message)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_RETRY):
                        await self._closed.wait()

    # -- plumbing ----------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return (self._root + key).encode()

    def _span(self, key: str, prefix: bool) -> tuple[bytes, bytes]:
        start = self._key(key)
        return start, prefix_end(start) if prefix else b""

    def _op(self, op: Put | Delete) -> PutOp | DeleteOp:
        if isinstance(op, Put):
            return PutOp(self._key(op.key), op.value, op.lease or 0)
        return DeleteOp(*self._span(op.key, op.prefix))

    def _name(self, key: bytes) -> str:
        return key.decode(errors="replace")[len(self._root):]

    def _record(self, kv: wire.KeyValue) -> Record:
        return Record(self._name(kv.key), kv.value, kv.create_revision, kv.mod_revision,
                      kv.version, kv.lease or None)

    def _event(self, event: wire.Event) -> WatchEvent:
        if event.type == wire.EventType.DELETE:
            return WatchEvent(WatchKind.DELETE, self._name(event.kv.key),
                              event.kv.mod_revision, None)
        return WatchEvent(WatchKind.PUT, self._name(event.kv.key), event.kv.mod_revision,
                          self._record(event.kv))

    async def _compact(self) -> None:
        """Keep the last `retention` revisions of history."""
        while True:
            await asyncio.sleep(self._compact_every)
            try:
                revision = (await self.client.range(self._key("/"))).header.revision
                if revision > self._retention:
                    await self.client.compact(revision - self._retention)
            except EtcdError as exc:
                log.warning("compacting etcd's history: %s", exc.message)

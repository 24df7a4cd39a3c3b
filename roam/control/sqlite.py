"""The store (roam.control.store) in one SQLite file: the control plane on one machine.

Tables: `kv` (each key with its revisions and lease), `log` (every change, for watches,
trimmed to the last `retention` revisions), `leases` (deadline per lease) and `meta` (the
store's revision and the oldest revision the log still holds). Every call runs on one
thread of its own, so SQLite's work never blocks the event loop and transactions are
serialised; a write commits before the call returns.

Leases expire on wall-clock deadlines kept in the file. When the store opens, every
lease's deadline is moved to a full TTL from now: while the control plane was down no
holder could renew, and expiring them all at start would declare every node lost for
the control plane's own absence (etcd renews leases on a leader change for the same
reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from roam.control.store import (
    Compacted,
    Delete,
    Lease,
    LeaseExpired,
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

T = TypeVar("T")

FILE = "control.db"
RETENTION = 10_000
"""Revisions the change log keeps: a watcher that falls further behind reads afresh."""
REAP_INTERVAL = 0.2
"""Seconds between checks for expired leases."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER);
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease);
CREATE TABLE IF NOT EXISTS log (
    revision INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    value BLOB, create_revision INTEGER, version INTEGER, lease INTEGER,
    PRIMARY KEY (revision, seq));
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY, ttl REAL NOT NULL, deadline REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0);
"""


class SqliteStore:
    """`store = await SqliteStore.open(DIR)`; `await store.close()` (or `async with`)."""

    def __init__(self, db: sqlite3.Connection, pool: ThreadPoolExecutor,
                 retention: int) -> None:
        self._db = db
        self._pool = pool
        self._retention = retention
        self._changed = asyncio.Event()
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, directory: Path, retention: int = RETENTION) -> SqliteStore:
        """Open (or create) the store in `directory`, made mode 0700 with the file 0600."""
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        path = directory / FILE
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        path.chmod(0o600)
        pool = ThreadPoolExecutor(1, thread_name_prefix="roam-store")

        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut
            db.executescript(_SCHEMA)
            now = time.time()
            db.execute("UPDATE leases SET deadline = ? + ttl", (now,))
            return db

        try:
            db = await asyncio.get_running_loop().run_in_executor(pool, connect)
        except sqlite3.Error as exc:
            pool.shutdown()
            raise StoreError(f"cannot open the store {path}: {exc}") from None
        store = cls(db, pool, retention)
        store._reaper = asyncio.create_task(store._reap())
        return store

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        self._wake()
        await self._call(self._db.close)
        self._pool.shutdown()

    # -- reads -------------------------------------------------------------------------

    async def get(self, key: str) -> Record | None:
        rows = await self._call(lambda: self._db.execute(
            "SELECT key, value, create_revision, mod_revision, version, lease FROM kv "
            "WHERE key = ?", (key,)).fetchall())
        return _record(rows[0]) if rows else None

    async def range(self, prefix: str) -> Range:
        def read() -> Range:
            self._db.execute("BEGIN")
            try:
                rows = self._db.execute(
                    "SELECT key, value, create_revision, mod_revision, version, lease "
                    "FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
                    (len(prefix), prefix)).fetchall()
                return Range([_record(r) for r in rows], self._meta("revision"))
            finally:
                self._db.execute("COMMIT")
        return await self._call(read)

    # -- writes ------------------------------------------------------------------------

    async def txn(self, txn: Txn) -> TxnResult:
        result = await self._call(lambda: self._write(lambda: self._apply(txn)))
        if result.succeeded or txn.otherwise:
            self._wake()
        return result

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        return (await self.txn(Txn(then=[Put(key, value, lease)]))).revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        return (await self.txn(Txn(then=[Delete(key, prefix)]))).revision

    async def grant(self, ttl: float) -> Lease:
        if not ttl > 0:
            raise StoreError("a lease needs a positive time to live")
        lease = Lease(secrets.randbits(62) + 1, ttl)
        await self._call(lambda: self._write(lambda: self._db.execute(
            "INSERT INTO leases VALUES (?, ?, ?)", (lease.id, ttl, time.time() + ttl))))
        return lease

    async def keepalive(self, lease: int) -> Lease:
        def renew() -> Lease:
            rows = self._db.execute("SELECT ttl FROM leases WHERE id = ?", (lease,)).fetchall()
            if not rows:
                raise LeaseExpired(f"lease {lease:x} expired or was revoked")
            ttl = float(rows[0][0])
            self._db.execute("UPDATE leases SET deadline = ? WHERE id = ?",
                             (time.time() + ttl, lease))
            return Lease(lease, ttl)
        return await self._call(lambda: self._write(renew))

    async def revoke(self, lease: int) -> None:
        if await self._call(lambda: self._write(lambda: self._end_leases([lease]))):
            self._wake()

    # -- watches -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, prefix: str, after: int) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        await self._check_retained(after)

        async def events() -> AsyncIterator[WatchEvent]:
            seen = after
            while not self._closed:
                changed = self._changed  # before the read: a later write sets it
                page = await self._call(functools.partial(self._changes, prefix, seen))
                if page is None:
                    raise Compacted(f"revision {seen + 1} is no longer in the log")
                batch, seen = page
                for event in batch:
                    yield event
                if not batch:
                    await changed.wait()

        yield events()

    async def _check_retained(self, after: int) -> None:
        compacted = await self._call(lambda: self._meta("compacted"))
        if after < compacted:
            raise Compacted(f"revision {after + 1} is no longer in the log (it keeps "
                            f"revisions after {compacted})")

    def _changes(self, prefix: str, after: int) -> tuple[list[WatchEvent], int] | None:
        """Changes after revision `after` (at most `retention` revisions of them) and the
        revision read up to; None if the log lost some of them."""
        if after < self._meta("compacted"):
            return None
        revision = self._meta("revision")
        rows = self._db.execute(
            "SELECT revision, kind, key, value, create_revision, version, lease FROM log "
            "WHERE revision > ? AND revision <= ? AND substr(key, 1, ?) = ? "
            "ORDER BY revision, seq", (after, revision, len(prefix), prefix)).fetchall()
        events = []
        for rev, kind, key, value, created, version, lease in rows:
            record = (None if kind == WatchKind.DELETE else
                      Record(key, bytes(value), created, rev, version, lease))
            events.append(WatchEvent(WatchKind(kind), key, rev, record))
        return events, revision

    # -- plumbing ----------------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._closed and fn != self._db.close:
            raise StoreError("the store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"the store failed: {exc}") from None

    def _write(self, fn: Callable[[], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    def _meta(self, name: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE name = ?",
                                    (name,)).fetchone()[0])

    def _apply(self, txn: Txn) -> TxnResult:
        ok = all(self._mod_revision(c.key) == c.mod_revision for c in txn.compare)
        ops = txn.then if ok else txn.otherwise
        revision = self._meta("revision") + 1
        changes: list[tuple[Any, ...]] = []
        for op in ops:
            if isinstance(op, Put):
                changes.append(self._put(op, revision))
            else:
                changes.extend(self._delete(op, revision))
        if not changes:
            return TxnResult(ok, revision - 1)
        self._log(revision, changes)
        return TxnResult(ok, revision)

    def _mod_revision(self, key: str) -> int:
        row = self._db.execute("SELECT mod_revision FROM kv WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def _put(self, op: Put, revision: int) -> tuple[Any, ...]:
        if op.lease is not None and self._db.execute(
                "SELECT 1 FROM leases WHERE id = ?", (op.lease,)).fetchone() is None:
            raise LeaseExpired(f"lease {op.lease:x} expired or was revoked")
        row = self._db.execute("SELECT create_revision, version FROM kv WHERE key = ?",
                               (op.key,)).fetchone()
        created, version = (revision, 1) if row is None else (row[0], row[1] + 1)
        self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
                         (op.key, op.value, created, revision, version, op.lease))
        return (WatchKind.PUT.value, op.key, op.value, created, version, op.lease)

    def _delete(self, op: Delete, revision: int) -> list[tuple[Any, ...]]:
        if op.prefix:
            where, args = "substr(key, 1, ?) = ?", (len(op.key), op.key)
        else:
            where, args = "key = ?", (op.key,)  # type: ignore[assignment]
        keys = [r[0] for r in self._db.execute(f"SELECT key FROM kv WHERE {where}", args)]
        self._db.execute(f"DELETE FROM kv WHERE {where}", args)
        return [(WatchKind.DELETE.value, key, None, None, None, None) for key in keys]

    def _log(self, revision: int, changes: list[tuple[Any, ...]]) -> None:
        self._db.executemany("INSERT INTO log VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             [(revision, seq, *c) for seq, c in enumerate(changes)])
        self._db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (revision,))
        floor = revision - self._retention
        if floor > self._meta("compacted"):
            self._db.execute("DELETE FROM log WHERE revision <= ?", (floor,))
            self._db.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (floor,))

    def _end_leases(self, leases: list[int]) -> bool:
        """Delete the leases and their keys (one revision); whether a key went."""
        marks = ",".join("?" * len(leases))
        keys = [r[0] for r in self._db.execute(
            f"SELECT key FROM kv WHERE lease IN ({marks}) ORDER BY key", leases)]
        self._db.execute(f"DELETE FROM leases WHERE id IN ({marks})", leases)
        if not keys:
            return False
        revision = self._meta("revision") + 1
        for key in keys:
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
        self._log(revision, [(WatchKind.DELETE.value, k, None, None, None, None)
                             for k in keys])
        return True

    async def _reap(self) -> None:
        """Expire leases whose deadline passed, deleting their keys."""
        def expire() -> bool:
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM leases WHERE deadline <= ?", (time.time(),))]
            if not ids:
                return False
            log.info("%d lease(s) expired", len(ids))
            return self._end_leases(ids)

        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                if await self._call(lambda: self._write(expire)):
                    self._wake()
            except StoreError as exc:
                log.error("expiring leases: %s", exc)


def _record(row: tuple[Any, ...]) -> Record:
    key, value, created, modified, version, lease = row
    return Record(key, bytes(value), created, modified, version, lease)

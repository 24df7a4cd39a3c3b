"""The control plane's store: revisioned keys, transactions, leases and watches.

Everything the control plane knows (nodes, VMs, drains, tokens, events) lives behind this
interface, so that one machine keeps it in SQLite (roam.control.sqlite) and a replicated
control plane in etcd **(planned)**, with the same code above. The interface is etcd's
v3 model, cut down to what roam uses:

- One store-wide `revision` that grows by one per write transaction. Each key keeps the
  revision that created it (`create_revision`, 0 for a key that does not exist), the one
  that last changed it (`mod_revision`) and its own change count (`version`).
- `txn`: compare the `mod_revision` of keys, then apply puts and deletes, all or none.
  Every decision the control plane takes is a transaction conditioned on what it read,
  so two instances (or an API call racing the reconciler) never both win.
- Leases: granted with a time to live, kept alive by their holder; when one expires,
  every key attached to it is deleted (a node's liveness key, a leader's key).
- Watches: every change is kept in a log of bounded length (the retention bound); a
  watcher reads the changes after a revision and then waits for new ones. A watcher that
  asks for revisions the log no longer holds gets `Compacted` and must read afresh.

Keys are text paths ("/vms/web"); values are bytes (the layer above stores JSON).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from roam.errors import ErrorCode, RoamError

__all__ = [
    "Compacted",
    "Compare",
    "Delete",
    "Lease",
    "LeaseExpired",
    "Put",
    "Range",
    "Record",
    "Store",
    "StoreError",
    "Txn",
    "TxnResult",
    "WatchEvent",
    "WatchKind",
]


class StoreError(RoamError):
    """The store failed (its file, its connection): nothing is known to have changed."""


class Compacted(StoreError):
    """A watch asked for revisions older than the log keeps: read the range again and
    watch from its revision."""

    code = ErrorCode.CONFLICT


class LeaseExpired(StoreError):
    """The lease is unknown: it expired (its keys are gone) or was revoked."""

    code = ErrorCode.NOT_FOUND


@dataclass(frozen=True)
class Record:
    """A key's value and its revisions (etcd's KeyValue)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int | None = None


@dataclass(frozen=True)
class Range:
    """Keys under a prefix as of `revision`: watch from `revision` to miss nothing."""

    records: list[Record]
    revision: int


@dataclass(frozen=True)
class Compare:
    """Holds when `key`'s mod_revision is `mod_revision` (0: the key does not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False  # every key starting with `key`


Op = Put | Delete


@dataclass(frozen=True)
class Txn:
    """If every compare holds, apply `then`, else `otherwise`; atomically."""

    compare: list[Compare] = field(default_factory=list)
    then: list[Op] = field(default_factory=list)
    otherwise: list[Op] = field(default_factory=list)


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: float  # seconds it lives without a keepalive


class WatchKind(enum.StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """One change: for a put, `record` is the key as written; for a delete, `record` is
    None. `revision` is the transaction's (several events may share one)."""

    kind: WatchKind
    key: str
    revision: int
    record: Record | None


class Store(Protocol):
    """What the control plane asks of its store (see the module's docstring)."""

    async def get(self, key: str) -> Record | None: ...

    async def range(self, prefix: str) -> Range:
        """Every key starting with `prefix`, ordered by key."""
        ...

    async def txn(self, txn: Txn) -> TxnResult:
        """Raises LeaseExpired if a put names a lease that does not exist (nothing is
        applied)."""
        ...

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        """An unconditional put; returns the new revision."""
        ...

    async def delete(self, key: str, prefix: bool = False) -> int: ...

    async def grant(self, ttl: float) -> Lease: ...

    async def keepalive(self, lease: int) -> Lease:
        """Restart the lease's time to live; LeaseExpired if it is gone."""
        ...

    async def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys (nothing if it is gone already)."""
        ...

    def watch(self, prefix: str, after: int
              ) -> AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        """Changes to keys under `prefix` with revisions above `after`, in order, then
        as they happen, until the block is left or the store closes. Raises Compacted
        (on entry or while iterating) if the log no longer holds revision `after + 1`."""
        ...

    async def close(self) -> None: ...

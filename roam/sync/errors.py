"""What can go wrong with an object store, by kind (each with its stable code)."""

from __future__ import annotations

from roam.errors import ErrorCode, RoamError


class SyncError(RoamError):
    """A sync, a read back from the store or a garbage collection failed."""


class StoreRefused(SyncError):
    """The store answers but refuses us: wrong credentials, no permission, or no such
    bucket. Retrying does not help; the sync does not start."""

    code = ErrorCode.BAD_REQUEST


class StoreUnavailable(SyncError):
    """The store did not answer, or failed: the sync retries with backoff."""

    code = ErrorCode.TIMEOUT


class MissingObject(SyncError):
    """An object a manifest or a migration named is not in the store."""

    code = ErrorCode.NOT_FOUND


class CorruptObject(SyncError):
    """An object failed verification (altered behind roam's back, or the wrong key):
    its content is never used."""

    code = ErrorCode.INTEGRITY

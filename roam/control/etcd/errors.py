"""What can go wrong talking to etcd, as types (callers act on the type, never on text).

Every error is a `StoreError`, so the control plane above handles an etcd failure as it
handles any failure of its store; the ones the store interface names (a lease that is
gone, a watch past the compacted history) are those types too.
"""

from __future__ import annotations

from roam.control.store import Compacted, LeaseExpired, StoreError
from roam.errors import ErrorCode

__all__ = [
    "BadResponse",
    "CompactedRevision",
    "EtcdError",
    "EtcdTimeout",
    "LeaseNotFound",
    "QuorumLost",
    "Rejected",
    "Unreachable",
]


class EtcdError(StoreError):
    """etcd failed us; the subclass says how."""


class Unreachable(EtcdError):
    """No endpoint could be connected to: nothing was sent, nothing changed."""


class QuorumLost(EtcdError):
    """The members that answer have no leader (too few of them are up): etcd makes no
    change and serves no linearizable read until a majority is back. A write that was
    waiting when this was found may still be applied once the quorum returns."""

    code = ErrorCode.TIMEOUT


class EtcdTimeout(EtcdError):
    """No answer in time while the cluster has a leader: the request may have been
    applied (writes) or not."""

    code = ErrorCode.TIMEOUT


class Rejected(EtcdError):
    """etcd answered with an error (its gRPC code in `grpc_code`): nothing changed."""

    def __init__(self, message: str, grpc_code: int) -> None:
        super().__init__(message, code=ErrorCode.BAD_REQUEST if grpc_code == 3 else None)
        self.grpc_code = grpc_code


class BadResponse(EtcdError):
    """An answer that does not parse as etcd's: a proxy, another service, a bug."""


class LeaseNotFound(LeaseExpired, EtcdError):
    """The lease expired or was revoked."""


class CompactedRevision(Compacted, EtcdError):
    """The revision asked for is older than etcd's compacted history."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision

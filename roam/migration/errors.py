"""How a migration can fail, by who holds authority afterwards.

The type says where the workload is: `MigrationError` and its plain subclasses leave it
running at the source; `InDoubt` leaves it paused at the source with authority sent but
unacknowledged; `PostcopyFailed` means the destination owns it. Source and destination
share these, so neither imports the other to name them.
"""

from __future__ import annotations

from roam.errors import ErrorCode, RoamError
from roam.migration import wire

__all__ = ["Decline", "Declined", "InDoubt", "IntegrityError", "LostPeer", "MigrationError",
           "PostcopyFailed", "RemoteError", "wire_code"]


class MigrationError(RoamError):
    """The migration failed; the source still has authority and runs as before."""

    code = ErrorCode.INTERNAL


class LostPeer(MigrationError):
    """The other end went away (or never answered) before authority moved."""

    code = ErrorCode.LOST_PEER


class IntegrityError(MigrationError):
    """A block failed verification more often than a retransmission explains."""

    code = ErrorCode.INTEGRITY


class RemoteError(MigrationError):
    """The other end reported an error (its wire code decides this error's code)."""


class InDoubt(MigrationError):
    """Authority was sent but never acknowledged: the source stays paused. An operator
    (or the control plane) must find out whether the destination runs the workload."""

    code = ErrorCode.IN_DOUBT


class PostcopyFailed(MigrationError):
    """The destination owns the workload but did not get every block."""

    code = ErrorCode.POSTCOPY_FAILED


class Declined(MigrationError):
    """The destination refused authority (it could not take the workload): the source
    resumed and runs on. Not raised for destinations that decline on purpose (a live
    backup): the application tells them apart, the engine reports both as "declined"."""

    code = ErrorCode.DECLINED


class Decline(Exception):
    """Raised by an authority hook to refuse authority; the source then resumes."""


def wire_code(code: wire.ErrorCode) -> ErrorCode:
    """The code of an ERROR frame's wire code, for the error raised on hearing it."""
    return ErrorCode.INTEGRITY if code == wire.ErrorCode.INTEGRITY else ErrorCode.INTERNAL

"""The error vocabulary every layer shares: one base type, one stable code per kind.

A code travels with an error from the place it is raised (a worker, the engine, QEMU) to
the place that reports it (the peer's HTTP API as a problem document, the CLI as an exit
code), so that nothing above ever decides what happened by reading an error's text.
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = ["ErrorCode", "RoamError"]


class ErrorCode(enum.StrEnum):
    """Stable codes: API clients and the CLI act on these, so never rename one."""

    NOT_FOUND = "not_found"  # no such VM, gateway, file or peer
    BAD_REQUEST = "bad_request"  # the request itself is wrong; nothing was done
    CONFLICT = "conflict"  # the target exists already, or is in the wrong state
    BUSY = "busy"  # the target is doing something else now (a migration); try later
    DECLINED = "declined"  # the destination refused authority; the VM runs on at its source
    IN_DOUBT = "in_doubt"  # authority sent, never acknowledged: the source stays paused
    POSTCOPY_FAILED = "postcopy_failed"  # the destination owns the VM but lacks blocks
    LOST_PEER = "lost_peer"  # the other end went away before authority moved
    INTEGRITY = "integrity"  # data failed verification more often than a retry explains
    TIMEOUT = "timeout"  # no answer in time; the operation may still be going on
    UNAUTHORIZED = "unauthorized"  # no credentials, or wrong ones (a control-plane token)
    INTERNAL = "internal"  # anything else: a bug, or a failure of a part we depend on


class RoamError(Exception):
    """Base of roam's errors: its class says what happened, `code` how to react.

    Subclasses set `code` as a class attribute; an instance may override it (an error
    received from another process keeps the code it was sent with).
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str = "", *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]  # per-instance override, see above

    @property
    def message(self) -> str:
        return str(self) or type(self).__name__

"""Errors of the peer's API as problem documents (RFC 9457) with a stable `code`.

The code comes from the exception (roam.errors.RoamError.code), never from its text; the
HTTP status is derived from the code so that plain HTTP clients get the right family, but
clients act on `code`. The table is in docs/API.md.

Statuses of migration failures: the destination (another server) failed or went away,
so `lost_peer`, `integrity`, `in_doubt` and `postcopy_failed` are 502 Bad Gateway; a
destination that answered and refused (`declined`) is 409 Conflict, the request being
fine but refused by the state over there; `busy` is 423 Locked (the VM is held by a
migration) to tell it apart from a `conflict` without reading the body.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from roam.errors import ErrorCode

MEDIA_TYPE = "application/problem+json"

STATUS: dict[ErrorCode, int] = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.CONFLICT: 409,
    ErrorCode.BUSY: 423,
    ErrorCode.DECLINED: 409,
    ErrorCode.IN_DOUBT: 502,
    ErrorCode.POSTCOPY_FAILED: 502,
    ErrorCode.LOST_PEER: 502,
    ErrorCode.INTEGRITY: 502,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.INTERNAL: 500,
}

TITLE: dict[ErrorCode, str] = {
    ErrorCode.NOT_FOUND: "Not found",
    ErrorCode.BAD_REQUEST: "Bad request",
    ErrorCode.CONFLICT: "Conflict with the current state",
    ErrorCode.BUSY: "Busy with a migration",
    ErrorCode.DECLINED: "Declined by the destination; the VM runs on here",
    ErrorCode.IN_DOUBT: "In doubt: the VM is paused here until an operator settles it",
    ErrorCode.POSTCOPY_FAILED: "Handed over, but post-copy failed",
    ErrorCode.LOST_PEER: "Lost the other peer; the VM runs on here",
    ErrorCode.INTEGRITY: "Data failed verification; the VM runs on here",
    ErrorCode.TIMEOUT: "No answer in time",
    ErrorCode.UNAUTHORIZED: "No valid credentials",
    ErrorCode.INTERNAL: "Internal error",
}

_BY_STATUS = {401: ErrorCode.UNAUTHORIZED, 404: ErrorCode.NOT_FOUND, 409: ErrorCode.CONFLICT,
              423: ErrorCode.BUSY, 504: ErrorCode.TIMEOUT}


class Problem(BaseModel):
    """An error (RFC 9457). `code` is what to act on; `detail` says what happened."""

    type: str = Field(description="/problems/CODE: a URI reference naming the kind")
    title: str
    status: int
    detail: str
    code: ErrorCode
    instance: str | None = Field(None, description="the request's path")
    errors: list[dict[str, Any]] | None = Field(
        None, description="for an invalid request: where and why, field by field")


def problem(code: ErrorCode, detail: str, instance: str | None = None,
            status: int | None = None, errors: list[dict[str, Any]] | None = None) -> Problem:
    return Problem(type=f"/problems/{code.value}", title=TITLE[code],
                   status=status or STATUS[code], detail=detail, code=code,
                   instance=instance, errors=errors)


def code_for_status(status: int) -> ErrorCode:
    """The code of an HTTP error that no RoamError raised (an unknown path, a method the
    resource does not have)."""
    if status >= 500:
        return _BY_STATUS.get(status, ErrorCode.INTERNAL)
    return _BY_STATUS.get(status, ErrorCode.BAD_REQUEST)


class ProblemType(BaseModel):
    """What GET /problems/CODE (a problem's `type`) answers."""

    code: ErrorCode
    title: str
    status: int


def describe(code: ErrorCode) -> ProblemType:
    return ProblemType(code=code, title=TITLE[code], status=STATUS[code])

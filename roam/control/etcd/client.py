"""A client of etcd's v3 API through its JSON gateway (httpx), for the control plane.

etcd serves its gRPC API as JSON over HTTP under /v3/ (kv/range, kv/put, kv/deleterange,
kv/txn, kv/compaction, lease/grant, lease/keepalive, lease/revoke, maintenance/status,
and the watch as a streamed POST). Speaking that with httpx keeps roam off gRPC stubs
(the `etcd3` package is unmaintained) while using only etcd's documented API.

Several endpoints (the cluster's members) fail over: a call goes to the member that
answered last; if it cannot be reached, or says it has no leader, the next one is tried.
A write is sent again elsewhere only when it surely was not applied (the connection was
refused, the member said it has no leader); a write that timed out is reported, never
repeated, since it may have been applied. While no member has a leader but most of
them answer, an election is under way (a leader died): the endpoints are tried again
until the call's timeout. When most members cannot be reached, the call fails at once
with `QuorumLost`, saying what each member said; while that lasts, calls ask the
members for their status first and fail at once instead of waiting out a timeout each.
The endpoints are taken to be all of the cluster's members.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, Field, ValidationError

from roam.control.etcd import wire
from roam.control.etcd.errors import (
    BadResponse,
    CompactedRevision,
    EtcdError,
    EtcdTimeout,
    LeaseNotFound,
    QuorumLost,
    Rejected,
    Unreachable,
)
from roam.errors import ErrorCode

__all__ = [
    "Compare",
    "CompareResult",
    "CompareTarget",
    "DeleteOp",
    "EtcdClient",
    "MemberStatus",
    "PutOp",
    "RangeOp",
    "prefix_end",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

TIMEOUT = 5.0
"""Seconds a call waits for its answer (etcd itself gives up on a proposal after ~5 s)."""
CONNECT_TIMEOUT = 1.0
STATUS_TIMEOUT = 1.0
ROUND_PAUSE = 0.1
"""Seconds between rounds of the endpoints while the members elect a leader."""

# gRPC codes etcd answers with (google.golang.org/grpc/codes)
_INVALID_ARGUMENT = 3
_NOT_FOUND = 5
_OUT_OF_RANGE = 11
_UNAVAILABLE = 14
_DEADLINE = 4
_UNKNOWN = 2

# etcd's messages (its rpctypes), which tell apart errors that share a gRPC code
_NO_LEADER = "etcdserver: no leader"  # not proposed: safe to send elsewhere
_LEADER_CHANGED = "etcdserver: leader changed"
_LEASE_NOT_FOUND = "etcdserver: requested lease not found"
_COMPACTED = "etcdserver: mvcc: required revision has been compacted"


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with `prefix` (etcd's convention:
    the prefix with its last byte below 0xff incremented; b"\\0" for every key)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class CompareTarget(enum.StrEnum):
    VERSION = "VERSION"
    CREATE = "CREATE"
    MOD = "MOD"
    VALUE = "VALUE"
    LEASE = "LEASE"


class CompareResult(enum.StrEnum):
    EQUAL = "EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"
    NOT_EQUAL = "NOT_EQUAL"


_TARGET_FIELD = {CompareTarget.VERSION: "version", CompareTarget.CREATE: "create_revision",
                 CompareTarget.MOD: "mod_revision", CompareTarget.VALUE: "value",
                 CompareTarget.LEASE: "lease"}


@dataclass(frozen=True)
class Compare:
    """`key`'s `target` compared (`result`) with `value` (bytes for VALUE, else an int)."""

    key: bytes
    target: CompareTarget
    value: int | bytes
    result: CompareResult = CompareResult.EQUAL

    def json(self) -> dict[str, Any]:
        field = _TARGET_FIELD[self.target]
        value = (wire.b64(self.value) if isinstance(self.value, bytes) else str(self.value))
        return {"key": wire.b64(self.key), "target": self.target.value,
                "result": self.result.value, field: value}


@dataclass(frozen=True)
class RangeOp:
    key: bytes
    range_end: bytes = b""

    def json(self) -> dict[str, Any]:
        return {"request_range": _range_body(self.key, self.range_end)}


@dataclass(frozen=True)
class PutOp:
    key: bytes
    value: bytes
    lease: int = 0

    def json(self) -> dict[str, Any]:
        return {"request_put": _put_body(self.key, self.value, self.lease)}


@dataclass(frozen=True)
class DeleteOp:
    key: bytes
    range_end: bytes = b""

    def json(self) -> dict[str, Any]:
        return {"request_delete_range": _range_body(self.key, self.range_end)}


Op = RangeOp | PutOp | DeleteOp


@dataclass(frozen=True)
class MemberStatus:
    """One endpoint's answer to a status call: `error` says why it is of no use."""

    endpoint: str
    status: wire.StatusResponse | None
    error: str = ""

    @property
    def has_leader(self) -> bool:
        return self.status is not None and self.status.leader != 0


def _range_body(key: bytes, range_end: bytes) -> dict[str, Any]:
    body = {"key": wire.b64(key)}
    if range_end:
        body["range_end"] = wire.b64(range_end)
    return body


def _put_body(key: bytes, value: bytes, lease: int) -> dict[str, Any]:
    body: dict[str, Any] = {"key": wire.b64(key), "value": wire.b64(value)}
    if lease:
        body["lease"] = str(lease)
    return body


def parse(model: type[M], text: bytes | str) -> M:
    """`model` from a JSON answer, or BadResponse saying (in one line) what is wrong."""
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the answer"
        raise BadResponse(f"etcd's answer does not parse ({where}: {first['msg']})") from None


class _Retry(Exception):
    """This endpoint cannot serve the call; the next one may (the reason is the text)."""


class EtcdClient:
    """`async with EtcdClient([url, ...]) as etcd: await etcd.put(b"k", b"v")`.

    `tls` is an SSL context for https endpoints (etcd's CA, and a client certificate
    when the cluster requires one: `--client-cert-auth`)."""

    def __init__(self, endpoints: Sequence[str], *, tls: ssl.SSLContext | None = None,
                 timeout: float = TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoint given", code=ErrorCode.BAD_REQUEST)
        for url in endpoints:
            if not url.startswith(("http://", "https://")):
                raise EtcdError(f"an etcd endpoint is http:// or https://, not {url!r}",
                                code=ErrorCode.BAD_REQUEST)
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.timeout = timeout
        self._connect_timeout = connect_timeout
        self._current = 0
        self._quorum_lost = False
        self._http = httpx.AsyncClient(
            verify=tls if tls is not None else True,
            timeout=httpx.Timeout(timeout, connect=connect_timeout))

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # -- keys --------------------------------------------------------------------------

    async def range(self, key: bytes, range_end: bytes = b"", *, revision: int = 0,
                    serializable: bool = False) -> wire.RangeResponse:
        """Keys from `key` up to `range_end` (just `key` if empty), as of `revision` (0:
        now). `serializable` reads the member's own copy, which needs no quorum but may
        lag behind."""
        body = _range_body(key, range_end)
        if revision:
            body["revision"] = str(revision)
        if serializable:
            body["serializable"] = True
        return await self._call("/v3/kv/range", body, wire.RangeResponse, idempotent=True,
                                needs_leader=not serializable)

    async def get(self, key: bytes) -> wire.KeyValue | None:
        found = await self.range(key)
        return found.kvs[0] if found.kvs else None

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> wire.PutResponse:
        return await self._call("/v3/kv/put", _put_body(key, value, lease), wire.PutResponse)

    async def delete_range(self, key: bytes, range_end: bytes = b"") -> wire.DeleteRangeResponse:
        return await self._call("/v3/kv/deleterange", _range_body(key, range_end),
                                wire.DeleteRangeResponse)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> wire.TxnResponse:
        """If every comparison holds apply `success`, else `failure`: atomically."""
        body = {"compare": [c.json() for c in compare],
                "success": [op.json() for op in success],
                "failure": [op.json() for op in failure]}
        return await self._call("/v3/kv/txn", body, wire.TxnResponse)

    async def compact(self, revision: int) -> None:
        """Drop the history before `revision` (keys keep their current values); a
        revision compacted already is no error."""
        try:
            await self._call("/v3/kv/compaction", {"revision": str(revision)},
                             wire.RangeResponse, idempotent=True)
        except CompactedRevision:
            pass

    # -- leases ------------------------------------------------------------------------

    async def grant(self, ttl: int) -> wire.LeaseGrantResponse:
        """A lease of `ttl` seconds (etcd may raise it to its minimum)."""
        granted = await self._call("/v3/lease/grant", {"TTL": str(ttl)},
                                   wire.LeaseGrantResponse)
        if granted.error or not granted.id:
            raise Rejected(f"etcd granted no lease: {granted.error or 'no ID'}", 0)
        return granted

    async def keepalive(self, lease: int) -> wire.LeaseKeepAliveResponse:
        """Renew `lease` once; LeaseNotFound if it is gone."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)},
                                  wire.KeepAliveMessage, idempotent=True)
        if answer.error is not None:
            raise self._stream_error(answer.error)
        if answer.result is None or answer.result.ttl <= 0:
            raise LeaseNotFound(f"lease {lease:x} expired or was revoked")
        return answer.result

    async def revoke(self, lease: int) -> None:
        """End `lease` and delete its keys; LeaseNotFound if it is gone already."""
        await self._call("/v3/lease/revoke", {"ID": str(lease)}, wire.LeaseRevokeResponse,
                         idempotent=True)

    async def leases(self) -> list[int]:
        """Every lease's ID."""
        answer = await self._call("/v3/lease/leases", {}, _Leases, idempotent=True)
        return [lease.id for lease in answer.leases]

    # -- the cluster -------------------------------------------------------------------

    async def status(self) -> list[MemberStatus]:
        """Every endpoint's status, asked at once (each within a second)."""
        async def one(endpoint: str) -> MemberStatus:
            try:
                answer = await self._http.post(endpoint + "/v3/maintenance/status", json={},
                                               timeout=STATUS_TIMEOUT)
            except (httpx.HTTPError, ssl.SSLError) as exc:
                return MemberStatus(endpoint, None, f"unreachable ({_describe(exc)})")
            if answer.status_code != 200:
                return MemberStatus(endpoint, None, f"answers HTTP {answer.status_code}")
            try:
                status = parse(wire.StatusResponse, answer.content)
            except BadResponse as exc:
                return MemberStatus(endpoint, None, exc.message)
            if not status.leader:
                return MemberStatus(endpoint, status,
                                    "; ".join(status.errors) or "knows no leader")
            return MemberStatus(endpoint, status)

        return list(await asyncio.gather(*(one(e) for e in self.endpoints)))

    async def quorum(self) -> tuple[bool, str]:
        """Whether a member that answers has a leader, and, if not, why (each member's
        state in one line)."""
        problem = await self._explain()
        return problem is None, "" if problem is None else problem.message

    async def _explain(self, *, final: bool = True) -> EtcdError | None:
        """None if a member has a leader; else Unreachable (no member answers) or
        QuorumLost, saying what each member said. While a majority of the members
        answers, none knowing a leader is an election under way, not a lost quorum:
        unless `final`, that is None too."""
        members = await self.status()
        if any(m.has_leader for m in members):
            self._quorum_lost = False
            return None
        states = ", ".join(f"{m.endpoint} {m.error}" for m in members)
        answering = sum(m.status is not None for m in members)
        if not answering:
            return Unreachable(f"no etcd member answers: {states}")
        if answering * 2 > len(members) and not final:
            return None
        self._quorum_lost = True
        return QuorumLost(f"etcd has no leader (quorum lost): {states}")

    # -- watches -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, key: bytes, range_end: bytes = b"", *, start_revision: int
                    ) -> AsyncIterator[AsyncIterator[wire.WatchResponse]]:
        """The changes of keys from `key` to `range_end` from `start_revision` on, as
        etcd's watch responses (each holds whole revisions, in order). When the member
        goes away the watch resumes on the next endpoint after the last revision seen;
        when none can be reached it raises Unreachable. CompactedRevision if
        `start_revision` is older than etcd's history."""
        async with contextlib.aclosing(self._watch(key, range_end, start_revision)) as stream:
            yield stream

    async def _watch(self, key: bytes, range_end: bytes, start: int
                     ) -> AsyncGenerator[wire.WatchResponse]:
        failures: list[str] = []
        while True:
            endpoint = self.endpoints[self._current]
            body = {"create_request": {**_range_body(key, range_end),
                                       "start_revision": str(start)}}
            try:
                async with self._http.stream(
                        "POST", endpoint + "/v3/watch", json=body,
                        timeout=httpx.Timeout(None, connect=self._connect_timeout)) as answer:
                    if answer.status_code != 200:
                        raise _Retry(f"answers HTTP {answer.status_code}")
                    async for line in answer.aiter_lines():
                        if not line.strip():
                            continue
                        message = parse(wire.WatchMessage, line)
                        if message.error is not None:
                            raise self._stream_error(message.error)
                        result = message.result
                        if result is None:
                            continue
                        failures.clear()
                        if result.canceled:
                            if result.compact_revision:
                                raise CompactedRevision(
                                    f"revision {start} is compacted (etcd keeps revisions "
                                    f"from {result.compact_revision})",
                                    result.compact_revision)
                            raise Rejected(f"etcd ended the watch: {result.cancel_reason}", 0)
                        if result.events:
                            start = result.events[-1].kv.mod_revision + 1
                            yield result
                raise _Retry("ended the watch stream")
            except (_Retry, httpx.HTTPError, ssl.SSLError) as exc:
                reason = str(exc) if isinstance(exc, _Retry) else _describe(exc)
                log.info("etcd watch on %s: %s; resuming from revision %d elsewhere",
                         endpoint, reason, start)
                failures.append(f"{endpoint} {reason}")
                if len(failures) >= len(self.endpoints):
                    raise Unreachable("no etcd endpoint serves the watch: "
                                      + ", ".join(failures)) from None
                self._current = (self._current + 1) % len(self.endpoints)

    # -- plumbing ----------------------------------------------------------------------

    async def _call(self, path: str, body: dict[str, Any], model: type[M], *,
                    idempotent: bool = False, needs_leader: bool = True) -> M:
        """POST `body` to `path`, failing over as the module's docstring says; rounds of
        the endpoints are tried until `timeout` while a majority of the members answers
        (an election is on)."""
        if needs_leader and self._quorum_lost and (
                problem := await self._explain(final=False)) is not None:
            raise problem
        deadline = time.monotonic() + self.timeout
        while True:
            failures: list[str] = []
            first = self._current  # other calls move it meanwhile
            for step in range(len(self.endpoints)):
                index = (first + step) % len(self.endpoints)
                endpoint = self.endpoints[index]
                try:
                    answer = await self._http.post(endpoint + path, json=body)
                except (httpx.ConnectError, httpx.ConnectTimeout, ssl.SSLError) as exc:
                    # not connected, or TLS refused (with TLS 1.3 a client certificate
                    # etcd rejects shows at the first read): nothing was served
                    failures.append(f"{endpoint} unreachable ({_describe(exc)})")
                    continue
                except httpx.HTTPError as exc:
                    if not idempotent:
                        raise await self._in_doubt(path, exc) from None
                    failures.append(f"{endpoint} {_describe(exc)}")
                    if isinstance(problem := await self._explain(final=False), QuorumLost):
                        raise problem from None  # no use waiting on each member in turn
                    continue
                if answer.status_code == 200:
                    self._current = index
                    return parse(model, answer.content)
                error = parse(wire.GatewayError, answer.content)
                message = error.message or error.error or f"HTTP {answer.status_code}"
                if message in (_NO_LEADER, _LEADER_CHANGED) or (
                        idempotent and error.code in (_UNAVAILABLE, _DEADLINE, _UNKNOWN)):
                    failures.append(f"{endpoint} {message}")
                    continue
                if error.code in (_UNAVAILABLE, _DEADLINE, _UNKNOWN):
                    raise await self._in_doubt(path, EtcdError(message)) from None
                raise self._rejected(message, error.code)
            late = time.monotonic() >= deadline
            if (problem := await self._explain(final=late)) is not None:
                raise problem
            if late:
                raise Unreachable(f"no etcd endpoint served {path}: " + "; ".join(failures))
            await asyncio.sleep(ROUND_PAUSE)

    async def _in_doubt(self, path: str, exc: Exception) -> EtcdError:
        """A write that got no clear answer: explain it by the cluster's state."""
        problem = await self._explain(final=False)
        if isinstance(problem, QuorumLost):
            return QuorumLost(f"{problem.message}; the {path} call may still be applied "
                              "when it is back")
        return EtcdTimeout(f"etcd gave no clear answer to {path} ({_describe(exc)}); "
                           "it may have been applied")

    def _rejected(self, message: str, code: int) -> EtcdError:
        if code == _NOT_FOUND and message == _LEASE_NOT_FOUND:
            return LeaseNotFound(message)
        if code == _OUT_OF_RANGE and message == _COMPACTED:
            return CompactedRevision(message, 0)
        return Rejected(f"etcd refused: {message}", code)

    def _stream_error(self, error: wire.StreamError) -> EtcdError:
        return self._rejected(error.message or f"gRPC code {error.grpc_code}",
                              error.grpc_code)


class _Lease(wire.Wire):
    id: wire.Int64 = Field(0, alias="ID")


class _Leases(wire.Wire):
    leases: list[_Lease] = []


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


"""A client of a peer's HTTP API (roam.peer.api), for the CLI, the demo and the tests.

A peer is named by its state directory or its socket (`STATE_DIR/peer.sock`), or by
`tcp://HOST:PORT` for one serving `--api-listen` (then with this side's TLS files).
Every error is raised as a RoamError with the code the peer sent in its problem document
(`PeerAPIError`, which keeps the document): callers act on the code, never on text.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from httpx_sse import aconnect_sse
from pydantic import BaseModel, TypeAdapter, ValidationError

from roam.errors import ErrorCode, RoamError
from roam.migration.channel import TLSFiles
from roam.peer.models import (
    Checkpoint,
    Event,
    EventEnvelope,
    ExecRequest,
    ExecResult,
    GatewayInfo,
    GatewayRequest,
    GcRequest,
    GcResult,
    HibernateRequest,
    LogChunk,
    LogName,
    MigrateRequest,
    MigrateResult,
    MirrorInfo,
    MirrorRequest,
    PeerInfo,
    PromoteRequest,
    RestoreRequest,
    RunRequest,
    SnapshotEvent,
    SyncInfo,
    SyncRequest,
    VMInfo,
)
from roam.peer.problems import Problem, code_for_status

PEER_SOCKET = "peer.sock"
"""The API's socket in a peer's state directory."""
TIMEOUT = 60.0
RUN_TIMEOUT = 180.0
MIGRATE_TIMEOUT = 3600.0

M = TypeVar("M", bound=BaseModel)


class PeerAPIError(RoamError):
    """The peer answered with a problem document (kept in `problem`)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail, code=problem.code)
        self.problem = problem


class PeerClient:
    """`async with PeerClient(via) as peer: await peer.vms()`."""

    def __init__(self, via: str | Path, tls: TLSFiles | None = None,
                 timeout: float = TIMEOUT) -> None:
        text = str(via)
        if text.startswith("tcp://"):
            if tls is None:
                raise RoamError("a peer's TCP API needs mutual TLS: give the TLS files",
                                code=ErrorCode.BAD_REQUEST)
            self.where = text
            self._missing = f"no roam peer answers at {text}"
            transport = httpx.AsyncHTTPTransport(verify=tls.client_context())
            base = "https://" + text.removeprefix("tcp://")
        else:
            path = Path(text)
            state_dir = path if path.is_dir() or path.name != PEER_SOCKET else path.parent
            self.where = str(state_dir)
            self._missing = (f"no roam peer at {state_dir} (start one with "
                             f"`roam peer serve --state-dir {state_dir}`)")
            socket = state_dir / PEER_SOCKET if state_dir == path else path
            transport = httpx.AsyncHTTPTransport(uds=str(socket))
            base = "http://peer"
        self._http = httpx.AsyncClient(transport=transport, base_url=base, timeout=timeout)

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- resources ---------------------------------------------------------------------

    async def peer(self) -> PeerInfo:
        return await self._get(PeerInfo, "/peer")

    async def vms(self) -> list[VMInfo]:
        return TypeAdapter(list[VMInfo]).validate_python(
            (await self._request("GET", "/vms")).json())

    async def vm(self, name: str) -> VMInfo:
        return await self._get(VMInfo, f"/vms/{name}")

    async def run(self, request: RunRequest) -> VMInfo:
        return VMInfo.model_validate((await self._request(
            "POST", "/vms", request.model_dump(by_alias=True), RUN_TIMEOUT)).json())

    async def exec(self, name: str, argv: list[str],
                   timeout: float = 30.0) -> ExecResult:  # noqa: ASYNC109 (the command's)
        response = await self._request("POST", f"/vms/{name}/exec", ExecRequest(
            argv=argv, timeout=timeout).model_dump(), timeout + 60)
        return ExecResult.model_validate(response.json())

    async def log(self, name: str, log: LogName = LogName.CONSOLE, offset: int = 0,
                  limit: int = 65536) -> LogChunk:
        return await self._get(LogChunk, f"/vms/{name}/logs/{log}?offset={offset}"
                                         f"&limit={limit}")

    async def stop(self, name: str) -> None:
        await self._request("POST", f"/vms/{name}/stop")

    async def resume(self, name: str) -> VMInfo:
        return VMInfo.model_validate((await self._request(
            "POST", f"/vms/{name}/resume")).json())

    async def pause(self, name: str) -> VMInfo:
        return VMInfo.model_validate((await self._request(
            "POST", f"/vms/{name}/pause")).json())

    async def migrate(self, name: str, request: MigrateRequest) -> MigrateResult:
        return MigrateResult.model_validate((await self._request(
            "POST", f"/vms/{name}/migrate", request.model_dump(), MIGRATE_TIMEOUT)).json())

    async def sync(self, name: str, request: SyncRequest) -> SyncInfo:
        return SyncInfo.model_validate((await self._request(
            "PUT", f"/vms/{name}/sync", request.model_dump(), RUN_TIMEOUT)).json())

    async def sync_stop(self, name: str) -> None:
        await self._request("DELETE", f"/vms/{name}/sync")

    async def sync_gc(self, name: str, request: GcRequest) -> GcResult:
        return GcResult.model_validate((await self._request(
            "POST", f"/vms/{name}/sync/gc", request.model_dump(), MIGRATE_TIMEOUT)).json())

    async def mirror(self, name: str, request: MirrorRequest) -> MirrorInfo:
        return MirrorInfo.model_validate((await self._request(
            "PUT", f"/vms/{name}/mirror", request.model_dump(), RUN_TIMEOUT)).json())

    async def mirror_stop(self, name: str) -> None:
        await self._request("DELETE", f"/vms/{name}/mirror")

    async def promote(self, name: str, request: PromoteRequest) -> VMInfo:
        return VMInfo.model_validate((await self._request(
            "POST", f"/mirrors/{name}/promote", request.model_dump(), RUN_TIMEOUT)).json())

    async def restore(self, request: RestoreRequest) -> VMInfo:
        return VMInfo.model_validate((await self._request(
            "POST", "/restores", request.model_dump(by_alias=True), MIGRATE_TIMEOUT)).json())

    async def hibernate(self, name: str, request: HibernateRequest) -> Checkpoint:
        return Checkpoint.model_validate((await self._request(
            "POST", f"/vms/{name}/hibernate", request.model_dump(), MIGRATE_TIMEOUT)).json())

    async def gateways(self) -> list[GatewayInfo]:
        return TypeAdapter(list[GatewayInfo]).validate_python(
            (await self._request("GET", "/gateways")).json())

    async def add_gateway(self, request: GatewayRequest) -> GatewayInfo:
        return GatewayInfo.model_validate((await self._request(
            "POST", "/gateways", request.model_dump())).json())

    async def remove_gateway(self, name: str) -> None:
        await self._request("DELETE", f"/gateways/{name}")

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Event]]:
        """The peer's event stream, subscribed on entry: the first event (the snapshot
        of every VM) has arrived, so nothing that happens after entering is missed."""
        with self._translated():
            async with aconnect_sse(self._http, "GET", "/events",
                                    timeout=httpx.Timeout(TIMEOUT, read=None)) as source:
                if source.response.is_error:
                    await source.response.aread()
                    raise _error(source.response)
                sse = source.aiter_sse()
                first = EventEnvelope.model_validate({"event": json.loads(
                    (await anext(sse)).data)}).event
                if not isinstance(first, SnapshotEvent):
                    raise RoamError(f"the event stream began with {first.type}, not a "
                                    "snapshot")

                async def stream() -> AsyncIterator[Event]:
                    yield first
                    with self._translated():
                        async for item in sse:
                            yield EventEnvelope.model_validate(
                                {"event": json.loads(item.data)}).event

                yield stream()

    # -- plumbing ----------------------------------------------------------------------

    async def _get(self, model: type[M], path: str) -> M:
        return model.model_validate((await self._request("GET", path)).json())

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                       seconds: float | None = None) -> httpx.Response:
        with self._translated():
            response = await self._http.request(
                method, path, json=body,
                timeout=httpx.USE_CLIENT_DEFAULT if seconds is None else seconds)
        if response.is_error:
            raise _error(response)
        return response

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Transport failures as RoamErrors with codes, like the peer's own errors."""
        try:
            yield
        except httpx.ConnectError as exc:
            missing = any(isinstance(cause, FileNotFoundError | ConnectionRefusedError)
                          for cause in _causes(exc))
            raise RoamError(self._missing if missing else f"cannot reach the peer at "
                            f"{self.where}: {exc}", code=ErrorCode.NOT_FOUND) from None
        except httpx.TimeoutException:
            raise RoamError(f"the peer at {self.where} did not answer in time",
                            code=ErrorCode.TIMEOUT) from None
        except httpx.TransportError as exc:
            raise RoamError(f"lost the connection to the peer at {self.where}: {exc}"
                            ) from None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it was raised from (httpx wraps httpcore's error, which wraps the
    OSError that says why)."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _error(response: httpx.Response) -> RoamError:
    """The error a failed response stands for: its problem document, or (from something
    that is not a peer, e.g. a proxy) the code of its status."""
    try:
        return PeerAPIError(Problem.model_validate_json(response.content))
    except ValidationError:
        return RoamError(f"HTTP {response.status_code}: {response.text[:200]}",
                         code=code_for_status(response.status_code))

"""A client of the control plane's API (roam.control.api), for the CLI and node agents.

It takes the control plane's URL and a token (the CLI reads ROAM_CONTROL_URL and
ROAM_TOKEN). Errors are raised as `ControlAPIError` with the code of the problem
document; transport failures as RoamErrors with a code too (`not_found` for nothing
listening, `timeout`), so that callers never read error text.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, TypeVar

import httpx
from httpx_sse import aconnect_sse
from pydantic import BaseModel, TypeAdapter, ValidationError

from roam.control.models import (
    DrainRequest,
    FleetEvent,
    FleetEventEnvelope,
    Health,
    Heartbeat,
    MoveRequest,
    NodeView,
    NodeWork,
    PeerEvents,
    Registered,
    Registration,
    VMSpec,
    VMView,
)
from roam.control.notice import NoticeRecord, NoticeRequest
from roam.errors import ErrorCode, RoamError
from roam.peer.problems import Problem, code_for_status

TIMEOUT = 30.0
M = TypeVar("M", bound=BaseModel)


class ControlAPIError(RoamError):
    """The control plane answered with a problem document (kept in `problem`)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail, code=problem.code)
        self.problem = problem


class ControlClient:
    """`async with ControlClient(url, token) as control: await control.vms()`.

    `url` may name several instances of a replicated control plane, comma-separated
    ("https://a:7450,https://b:7450"): a call goes to the one that answered last and, if
    it cannot be connected to (nothing was sent), to the next. `tls` verifies an https
    control plane (its CA, and this side's certificate when it asks for mutual TLS); by
    default the system's CAs."""

    def __init__(self, url: str, token: str | None, tls: ssl.SSLContext | None = None,
                 timeout: float = TIMEOUT) -> None:
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        if not self.urls:
            raise RoamError("no control plane URL given", code=ErrorCode.BAD_REQUEST)
        for one in self.urls:
            if not one.startswith(("http://", "https://")):
                raise RoamError(f"the control plane's URL is http:// or https://, not "
                                f"{one!r}", code=ErrorCode.BAD_REQUEST)
        self._current = 0
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout,
                                       verify=tls if tls is not None else True)

    @property
    def url(self) -> str:
        """The instance calls go to now."""
        return self.urls[self._current]

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._http.aclose()

    # -- resources ---------------------------------------------------------------------

    async def health(self) -> Health:
        """This instance's health; a 503 answer is one too (`ok` false, `detail` why:
        its store fails, a replicated store lost its quorum)."""
        response = await self._send("GET", "/healthz")
        if response.status_code == 503:
            with contextlib.suppress(ValidationError):
                return Health.model_validate_json(response.content)
        if response.is_error:
            raise _error(response)
        return Health.model_validate_json(response.content)

    async def nodes(self) -> list[NodeView]:
        return TypeAdapter(list[NodeView]).validate_python(
            (await self._request("GET", "/nodes")).json())

    async def node(self, name: str) -> NodeView:
        return await self._model(NodeView, "GET", f"/nodes/{name}")

    async def cordon(self, name: str, cordoned: bool = True) -> NodeView:
        verb = "cordon" if cordoned else "uncordon"
        return await self._model(NodeView, "POST", f"/nodes/{name}/{verb}")

    async def drain(self, name: str, max_parallel: int = 2) -> NodeView:
        return await self._model(NodeView, "POST", f"/nodes/{name}/drain",
                                 DrainRequest(max_parallel=max_parallel).model_dump())

    async def give_notice(self, name: str, request: NoticeRequest) -> NoticeRecord:
        return await self._model(NoticeRecord, "POST", f"/nodes/{name}/notice",
                                 request.model_dump(mode="json", exclude_none=True))

    async def notice(self, name: str) -> NoticeRecord:
        return await self._model(NoticeRecord, "GET", f"/nodes/{name}/notice")

    async def register(self, registration: Registration) -> Registered:
        return await self._model(Registered, "POST", "/nodes",
                                 registration.model_dump(mode="json"))

    async def heartbeat(self, name: str, beat: Heartbeat) -> NodeWork:
        return await self._model(NodeWork, "POST", f"/nodes/{name}/heartbeat",
                                 beat.model_dump(mode="json"))

    async def relay(self, name: str, events: PeerEvents) -> None:
        await self._request("POST", f"/nodes/{name}/events", events.model_dump(mode="json"))

    async def vms(self) -> list[VMView]:
        return TypeAdapter(list[VMView]).validate_python(
            (await self._request("GET", "/vms")).json())

    async def vm(self, name: str) -> VMView:
        return await self._model(VMView, "GET", f"/vms/{name}")

    async def create(self, spec: VMSpec) -> VMView:
        return await self._model(VMView, "POST", "/vms",
                                 spec.model_dump(mode="json", by_alias=True))

    async def migrate(self, name: str, request: MoveRequest) -> VMView:
        return await self._model(VMView, "POST", f"/vms/{name}/migrate",
                                 request.model_dump())

    async def stop(self, name: str) -> VMView:
        return await self._model(VMView, "POST", f"/vms/{name}/stop")

    async def start(self, name: str) -> VMView:
        return await self._model(VMView, "POST", f"/vms/{name}/start")

    async def delete(self, name: str) -> VMView:
        return await self._model(VMView, "DELETE", f"/vms/{name}")

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[FleetEvent]]:
        """The event stream, subscribed on entry (its snapshot has arrived)."""
        async with contextlib.AsyncExitStack() as stack:
            for step in self._order():
                with self._translated():
                    try:
                        source = await stack.enter_async_context(aconnect_sse(
                            self._http, "GET", self.url + "/events",
                            timeout=httpx.Timeout(TIMEOUT, read=None)))
                    except httpx.ConnectError:
                        if not step:
                            raise
                        continue
                    break
            if source.response.is_error:
                await source.response.aread()
                raise _error(source.response)
            sse = source.aiter_sse()
            with self._translated():
                first = _event((await anext(sse)).data)

            async def stream() -> AsyncIterator[FleetEvent]:
                yield first
                with self._translated():
                    async for item in sse:
                        yield _event(item.data)

            yield stream()

    # -- plumbing ----------------------------------------------------------------------

    async def _model(self, model: type[M], method: str, path: str,
                     body: dict[str, Any] | None = None) -> M:
        return model.model_validate((await self._request(method, path, body)).json())

    async def _request(self, method: str, path: str,
                       body: dict[str, Any] | None = None) -> httpx.Response:
        response = await self._send(method, path, body)
        if response.is_error:
            raise _error(response)
        return response

    async def _send(self, method: str, path: str,
                    body: dict[str, Any] | None = None) -> httpx.Response:
        for step in self._order():
            with self._translated():
                try:
                    response = await self._http.request(method, self.url + path, json=body)
                except httpx.ConnectError:
                    if not step:
                        raise
                    continue
                break
        return response

    def _order(self) -> Iterator[int]:
        """Move through the instances, starting with the current one; yields how many
        remain after this one (0: the last try, whose failure is the caller's)."""
        for remaining in range(len(self.urls) - 1, -1, -1):
            yield remaining
            self._current = (self._current + 1) % len(self.urls)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as exc:
            raise RoamError(f"no control plane answers at {self.url}: {exc}",
                            code=ErrorCode.NOT_FOUND) from None
        except httpx.TimeoutException:
            raise RoamError(f"the control plane at {self.url} did not answer in time",
                            code=ErrorCode.TIMEOUT) from None
        except httpx.TransportError as exc:
            raise RoamError(f"lost the connection to the control plane at {self.url}: "
                            f"{exc}") from None


def _event(data: str) -> FleetEvent:
    return FleetEventEnvelope.model_validate({"event": json.loads(data)}).event


def _error(response: httpx.Response) -> RoamError:
    try:
        return ControlAPIError(Problem.model_validate_json(response.content))
    except ValidationError:
        return RoamError(f"HTTP {response.status_code}: {response.text[:200]}",
                         code=code_for_status(response.status_code))

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

    `tls` verifies an https control plane (its CA, and this side's certificate when it
    asks for mutual TLS); by default the system's CAs."""

    def __init__(self, url: str, token: str | None, tls: ssl.SSLContext | None = None,
                 timeout: float = TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise RoamError(f"the control plane's URL is http:// or https://, not {url!r}",
                            code=ErrorCode.BAD_REQUEST)
        self.url = url.rstrip("/")
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout,
                                       verify=tls if tls is not None else True)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._http.aclose()

    # -- resources ---------------------------------------------------------------------

    async def health(self) -> Health:
        return await self._model(Health, "GET", "/healthz")

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
        with self._translated():
            async with aconnect_sse(self._http, "GET", "/events",
                                    timeout=httpx.Timeout(TIMEOUT, read=None)) as source:
                if source.response.is_error:
                    await source.response.aread()
                    raise _error(source.response)
                sse = source.aiter_sse()
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
        with self._translated():
            response = await self._http.request(method, path, json=body)
        if response.is_error:
            raise _error(response)
        return response

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

"""A fake metadata service for tests and demos: AWS, GCP and Azure as documented, on one
HTTP server, that turns to a spot notice when told.

Not for production: it exists so that the watcher can be proved against real HTTP (and a
demo can show an evacuation) where no cloud is. It answers the paths of the clouds it
was made for (404 for the others), and enforces what the real services enforce:

- AWS: PUT /latest/api/token needs X-aws-ec2-metadata-token-ttl-seconds in 1..21600
  (400 otherwise, 403 with X-Forwarded-For); GET .../spot/instance-action needs a
  token that has not expired (401 otherwise); 404 until a notice.
- GCP: GET /computeMetadata/v1/instance/preempted needs Metadata-Flavor: Google (403
  otherwise); answers TRUE or FALSE with Metadata-Flavor and ETag headers; honours
  wait_for_change, last_etag and timeout_sec.
- Azure: /metadata/scheduledevents needs Metadata: true and an api-version (400
  otherwise); POSTed StartRequests are recorded and start the event;
  /metadata/instance/compute/name answers the VM's name.

Control, under /_roam/ (no authentication: listen on loopback or in a namespace only):
POST /_roam/notice {"deadline_seconds": 30} gives a notice (optionally "action");
DELETE /_roam/notice withdraws it; POST /_roam/tokens/expire invalidates every AWS
token; POST /_roam/faults {"delay_seconds", "status", "body", "count"} delays or
replaces the next metadata answers (of one "route", or all); GET /_roam/state shows what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import hashlib
import math
import secrets
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from roam.spot import aws, azure, gcp
from roam.spot.config import MAX_TOKEN_TTL
from roam.spot.notice import Cloud

__all__ = ["FakeMetadata", "FakeNotice", "FaultRequest", "NoticeRequest", "serve"]

CLOUDS = frozenset({Cloud.AWS, Cloud.GCP, Cloud.AZURE})
GCP_DEFAULT_WAIT = 300  # seconds a hanging GET waits without timeout_sec


class NoticeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deadline_seconds: Annotated[float, Field(gt=0, le=86400)] = 30.0
    action: Literal["terminate", "stop", "hibernate"] = "terminate"
    """AWS's instance-action."""
    azure_event: Literal["Preempt", "Terminate"] = "Preempt"
    """Azure's EventType (GCP says only TRUE)."""


class FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delay_seconds: Annotated[float, Field(ge=0, le=600)] = 0.0
    """Every metadata answer waits this long first (a slow service)."""
    status: Annotated[int, Field(ge=100, le=599)] | None = None
    body: Annotated[str, Field(max_length=1 << 20)] = ""
    """With status: the next `count` metadata requests get this answer instead."""
    count: Annotated[int, Field(ge=0, le=1_000_000)] = 1
    route: Literal["aws.token", "aws.instance-action", "gcp.preempted", "azure.events",
                   "azure.start", "azure.name"] | None = None
    """Only this route (the names of `requests` in /_roam/state); None: all of them."""


class _StartRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    EventId: str


class _StartRequests(BaseModel):
    model_config = ConfigDict(strict=True)

    StartRequests: list[_StartRequest]


@dataclass
class FakeNotice:
    deadline: dt.datetime
    action: str
    azure_event: str
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: bool = False


class FakeMetadata:
    """The state of the fake service; `app` serves it, its methods change it directly
    (tests in the same process) or through /_roam/ (anything else)."""

    def __init__(self, clouds: frozenset[Cloud] = CLOUDS, *, resource: str = "roam-node",
                 others: tuple[str, ...] = ("roam-other",)) -> None:
        self.clouds = clouds
        self.resource = resource
        """This VM's name in Azure's events (and its compute/name)."""
        self.others = others
        """Other VMs named in the same events, as in an availability set."""
        self.notice: FakeNotice | None = None
        self.tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.tokens_issued = 0
        self.acknowledged: list[str] = []
        self.requests: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.incarnation = 1
        self._generation = 0
        self._changed = asyncio.Event()
        self.fault = FaultRequest()
        self._faults_left = 0
        self._closing = False
        self.app = self._app()

    # -- control ---------------------------------------------------------------------

    def give_notice(self, request: NoticeRequest | None = None) -> FakeNotice:
        """A spot notice for this VM, `deadline_seconds` from now (whole seconds, as
        AWS's time has no fraction)."""
        request = request or NoticeRequest()
        now = dt.datetime.now(dt.UTC)
        deadline = now + dt.timedelta(seconds=request.deadline_seconds)
        deadline = deadline.replace(microsecond=0) + dt.timedelta(
            seconds=math.ceil(deadline.microsecond / 1e6))
        self.notice = FakeNotice(deadline, request.action, request.azure_event)
        self._change()
        return self.notice

    def withdraw(self) -> None:
        self.notice = None
        self._change()

    def expire_tokens(self) -> None:
        self.tokens.clear()

    def set_fault(self, fault: FaultRequest) -> None:
        self.fault = fault
        self._faults_left = fault.count if fault.status is not None else 0

    def state(self) -> dict[str, object]:
        notice = self.notice
        return {
            "clouds": sorted(self.clouds),
            "notice": None if notice is None else {
                "deadline": notice.deadline.isoformat(), "action": notice.action,
                "azure_event": notice.azure_event, "event_id": notice.event_id,
                "started": notice.started},
            "tokens_issued": self.tokens_issued, "acknowledged": self.acknowledged,
            "requests": dict(self.requests), "refused": dict(self.refused),
        }

    def release(self) -> None:
        """Answer every hanging GET now (the server is stopping)."""
        self._closing = True
        self._change()

    def _change(self) -> None:
        self._generation += 1
        self.incarnation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # -- serving ---------------------------------------------------------------------

    async def _fault(self, route: str) -> Response | None:
        if self.fault.route not in (None, route):
            return None
        if self.fault.delay_seconds:
            await asyncio.sleep(self.fault.delay_seconds)
        if self._faults_left > 0 and self.fault.status is not None:
            self._faults_left -= 1
            return PlainTextResponse(self.fault.body, status_code=self.fault.status)
        return None

    def _refuse(self, route: str, status: int, body: str | dict[str, str]) -> Response:
        self.refused[route] += 1
        if isinstance(body, dict):
            return JSONResponse(body, status_code=status)
        return PlainTextResponse(body, status_code=status)

    def _served(self, cloud: Cloud, route: str,
                handler: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            if cloud not in self.clouds:
                return PlainTextResponse("Not Found", status_code=404)
            self.requests[route] += 1
            return await self._fault(route) or await handler(request)
        return serve

    def _app(self) -> FastAPI:
        app = FastAPI(title="roam fake metadata service", docs_url=None, redoc_url=None,
                      openapi_url=None)
        routes: list[tuple[str, str, Cloud, str,
                           Callable[[Request], Awaitable[Response]]]] = [
            ("PUT", aws.TOKEN_PATH, Cloud.AWS, "aws.token", self._aws_token),
            ("GET", aws.ACTION_PATH, Cloud.AWS, "aws.instance-action", self._aws_action),
            ("GET", gcp.PREEMPTED_PATH, Cloud.GCP, "gcp.preempted", self._gcp_preempted),
            ("GET", azure.EVENTS_PATH, Cloud.AZURE, "azure.events", self._azure_events),
            ("POST", azure.EVENTS_PATH, Cloud.AZURE, "azure.start", self._azure_start),
            ("GET", azure.NAME_PATH, Cloud.AZURE, "azure.name", self._azure_name),
        ]
        for method, path, cloud, route, handler in routes:
            app.add_api_route(path, self._served(cloud, route, handler), methods=[method],
                              include_in_schema=False)

        @app.post("/_roam/notice")
        async def notice(request: NoticeRequest) -> dict[str, object]:
            self.give_notice(request)
            return self.state()

        @app.delete("/_roam/notice")
        async def withdraw() -> dict[str, object]:
            self.withdraw()
            return self.state()

        @app.post("/_roam/tokens/expire")
        async def expire() -> dict[str, object]:
            self.expire_tokens()
            return self.state()

        @app.post("/_roam/faults")
        async def faults(request: FaultRequest) -> dict[str, object]:
            self.set_fault(request)
            return self.state()

        @app.get("/_roam/state")
        async def state() -> dict[str, object]:
            return self.state()

        return app

    async def _aws_token(self, request: Request) -> Response:
        if "x-forwarded-for" in request.headers:
            return self._refuse("aws.token", 403, "Forbidden")
        ttl = request.headers.get(aws.TTL_HEADER, "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TOKEN_TTL:
            return self._refuse("aws.token", 400, "Missing or Invalid Parameters")
        token = secrets.token_urlsafe(42)
        self.tokens[token] = time.monotonic() + int(ttl)
        self.tokens_issued += 1
        return PlainTextResponse(token, headers={aws.TTL_HEADER: ttl})

    async def _aws_action(self, request: Request) -> Response:
        token = request.headers.get(aws.TOKEN_HEADER, "")
        if self.tokens.get(token, 0.0) <= time.monotonic():
            self.tokens.pop(token, None)
            return self._refuse("aws.instance-action", 401, "Unauthorized")
        if self.notice is None:
            return PlainTextResponse("Not Found", status_code=404)
        when = self.notice.deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
        return PlainTextResponse(f'{{"action": "{self.notice.action}", "time": "{when}"}}')

    def _gcp_value(self) -> tuple[str, str]:
        value = "FALSE" if self.notice is None else "TRUE"
        etag = hashlib.sha256(f"{value}/{self._generation}".encode()).hexdigest()[:16]
        return value, etag

    async def _gcp_preempted(self, request: Request) -> Response:
        flavor = request.headers.get(gcp.FLAVOR_HEADER)
        if flavor != gcp.FLAVOR or "x-forwarded-for" in request.headers:
            return self._refuse("gcp.preempted", 403, "Missing Metadata-Flavor:Google header.")
        query = request.query_params
        if query.get("wait_for_change", "").lower() == "true":
            wait = query.get("timeout_sec", "")
            timeout = float(wait) if wait.isdigit() else GCP_DEFAULT_WAIT
            if query.get("last_etag") in (None, self._gcp_value()[1]) and not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._changed.wait()
        value, etag = self._gcp_value()
        return PlainTextResponse(value, media_type="application/text", headers={
            gcp.FLAVOR_HEADER: gcp.FLAVOR, "ETag": etag})

    def _azure_refusal(self, request: Request, route: str) -> Response | None:
        if request.headers.get("metadata", "").lower() != "true":
            return self._refuse(route, 400, {
                "error": "Bad request. Required metadata header not specified"})
        if "api-version" not in request.query_params:
            return self._refuse(route, 400, {
                "error": "Bad request. api-version was not specified in the request"})
        return None

    async def _azure_events(self, request: Request) -> Response:
        refusal = self._azure_refusal(request, "azure.events")
        if refusal is not None:
            return refusal
        events = []
        if self.notice is not None:
            notice = self.notice
            events.append({
                "EventId": notice.event_id, "EventType": notice.azure_event,
                "ResourceType": "VirtualMachine",
                "Resources": [self.resource, *self.others],
                "EventStatus": "Started" if notice.started else "Scheduled",
                "NotBefore": "" if notice.started else email.utils.format_datetime(
                    notice.deadline, usegmt=True),
                "Description": "", "EventSource": "Platform", "DurationInSeconds": -1})
        return JSONResponse({"DocumentIncarnation": self.incarnation, "Events": events})

    async def _azure_start(self, request: Request) -> Response:
        refusal = self._azure_refusal(request, "azure.start")
        if refusal is not None:
            return refusal
        try:
            starts = _StartRequests.model_validate_json(await request.body())
        except ValidationError:
            return self._refuse("azure.start", 400, {"error": "Bad request. Invalid body"})
        for start in starts.StartRequests:
            self.acknowledged.append(start.EventId)
            if self.notice is not None and start.EventId == self.notice.event_id:
                self.notice.started = True
                self._change()
        return PlainTextResponse("")

    async def _azure_name(self, request: Request) -> Response:
        refusal = self._azure_refusal(request, "azure.name")
        if refusal is not None:
            return refusal
        return PlainTextResponse(self.resource)


class _Server(uvicorn.Server):
    """uvicorn in the caller's loop; the caller handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve(fake: FakeMetadata, host: str = "127.0.0.1", port: int = 0
                ) -> AsyncIterator[str]:
    """Serve `fake` on HOST:PORT (port 0: any free one) while the block runs; yields its
    base URL. Hanging GETs still open at the end are cut after a second."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    bound = sock.getsockname()[1]
    server = _Server(uvicorn.Config(
        fake.app, log_config=None, log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=1))
    url_host = f"[{host}]" if ":" in host else host
    async with asyncio.TaskGroup() as group:
        task = group.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if task.done():
                    task.result()  # its error, if it had one
                    raise RuntimeError("the fake metadata server stopped at once")
                await asyncio.sleep(0.01)
            yield f"http://{url_host}:{bound}"
        finally:
            fake.release()
            server.should_exit = True
    sock.close()

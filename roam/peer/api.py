"""The peer's HTTP API (docs/API.md): FastAPI routes over a `PeerService`, served by
uvicorn inside the peer's own event loop.

Served on `STATE_DIR/peer.sock` (`curl --unix-socket STATE_DIR/peer.sock
http://peer/vms`) and, with `--api-listen`, on TCP with mutual TLS. Every error is a
problem document (roam.peer.problems); an exception that is not a RoamError is a bug or
an unexpected failure: it is logged with its traceback and answered as `internal`.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Protocol

import uvicorn
from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException

import roam
from roam.errors import ErrorCode, RoamError
from roam.peer import problems
from roam.peer.models import (
    MAX_LOG_CHUNK,
    Checkpoint,
    Event,
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
    SyncInfo,
    SyncRequest,
    VMInfo,
)

log = logging.getLogger(__name__)

GRACE = 5
"""Seconds a shutting-down API gives requests still running (a migration's request ends
when the peer's workers stop)."""


class PeerService(Protocol):
    """What the API asks of the peer (roam.peer.serve.Peer; a stub in the tests)."""

    def info(self) -> PeerInfo: ...
    def vms(self) -> list[VMInfo]: ...
    def vm(self, name: str) -> VMInfo: ...
    async def run(self, request: RunRequest) -> VMInfo: ...
    async def exec(self, name: str, request: ExecRequest) -> ExecResult: ...
    async def stop(self, name: str) -> None: ...
    async def resume(self, name: str) -> VMInfo: ...

    async def pause(self, name: str) -> VMInfo: ...
    async def migrate(self, name: str, request: MigrateRequest) -> MigrateResult: ...
    async def sync(self, name: str, request: SyncRequest) -> SyncInfo: ...
    async def sync_stop(self, name: str) -> None: ...
    async def sync_gc(self, name: str, request: GcRequest) -> GcResult: ...
    async def mirror(self, name: str, request: MirrorRequest) -> MirrorInfo: ...
    async def mirror_stop(self, name: str) -> None: ...
    async def promote(self, name: str, request: PromoteRequest) -> VMInfo: ...
    async def restore(self, request: RestoreRequest) -> VMInfo: ...
    async def hibernate(self, name: str, request: HibernateRequest) -> Checkpoint: ...
    def log(self, name: str, log: LogName, offset: int, limit: int) -> LogChunk: ...
    def gateways(self) -> list[GatewayInfo]: ...
    def gateway(self, name: str) -> GatewayInfo: ...
    async def add_gateway(self, request: GatewayRequest) -> GatewayInfo: ...
    async def remove_gateway(self, name: str) -> None: ...
    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Event]]: ...


def _response(problem: problems.Problem) -> JSONResponse:
    return JSONResponse(problem.model_dump(mode="json", exclude_none=True),
                        status_code=problem.status, media_type=problems.MEDIA_TYPE)


class ProblemRoute(APIRoute):
    """Answers an unexpected exception as an `internal` problem instead of letting it
    reach the server (which would answer plain text and log it once more)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (RoamError, HTTPException, RequestValidationError):
                raise
            except Exception as exc:
                log.exception("%s %s failed", request.method, request.url.path)
                return _response(problems.problem(
                    ErrorCode.INTERNAL, str(exc) or type(exc).__name__, request.url.path))

        return guarded


PROBLEM: dict[int | str, dict[str, Any]] = {"default": {
    "model": problems.Problem, "description": "a problem document (RFC 9457)",
    "content": {problems.MEDIA_TYPE: {}}}}
VMName = Annotated[str, Path(description="the VM's name")]


def answer_problems(app: FastAPI) -> None:
    """Make every error of `app` a problem document: RoamErrors by their code, invalid
    requests as `bad_request` (422, field by field), HTTP errors by their status. The
    control plane's API answers the same way."""
    app.router.route_class = ProblemRoute

    @app.exception_handler(RoamError)
    async def roam_error(request: Request, exc: RoamError) -> Response:
        return _response(problems.problem(exc.code, exc.message, request.url.path))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return _response(problems.problem(ErrorCode.BAD_REQUEST, detail or "invalid request",
                                          request.url.path, status=422, errors=errors))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _response(problems.problem(problems.code_for_status(exc.status_code),
                                          str(exc.detail), request.url.path,
                                          status=exc.status_code))


def create_app(peer: PeerService) -> FastAPI:
    app = FastAPI(title="roam peer", version=roam.__version__, responses=PROBLEM,
                  description="Runs VMs on this host and migrates them (docs/API.md).")
    answer_problems(app)

    @app.get("/peer", summary="This peer: version, capacity, accelerator, CPU model")
    async def get_peer() -> PeerInfo:
        return peer.info()

    @app.get("/vms", summary="The VMs on this peer, as last reported by their workers")
    async def list_vms() -> list[VMInfo]:
        return peer.vms()

    @app.post("/vms", status_code=201, summary="Run a VM (returns once it runs and its "
                                               "agent answers)")
    async def run_vm(request: RunRequest) -> VMInfo:
        return await peer.run(request)

    @app.get("/vms/{name}", summary="One VM")
    async def get_vm(name: VMName) -> VMInfo:
        return peer.vm(name)

    @app.post("/vms/{name}/exec", summary="Run a command in the VM through its agent")
    async def exec_vm(name: VMName, request: ExecRequest) -> ExecResult:
        return await peer.exec(name, request)

    @app.post("/vms/{name}/stop", status_code=204, summary="Stop the VM, discarding it")
    async def stop_vm(name: VMName) -> None:
        await peer.stop(name)

    @app.post("/vms/{name}/resume", summary="Resume a VM left in doubt, here (only once "
                                            "the destination is known not to run it)")
    async def resume_vm(name: VMName) -> VMInfo:
        return await peer.resume(name)

    @app.post("/vms/{name}/pause", summary="Pause a running VM until resume (a node that "
                                           "lost its control plane fences its VMs)")
    async def pause_vm(name: VMName) -> VMInfo:
        return await peer.pause(name)

    @app.post("/vms/{name}/migrate", summary="Live-migrate the VM to another peer (returns "
                                             "when it is over; progress is on /events)")
    async def migrate_vm(name: VMName, request: MigrateRequest) -> MigrateResult:
        return await peer.migrate(name, request)

    @app.put("/vms/{name}/sync", summary="Sync the VM continuously to an object store "
                                         "(s3://BUCKET/PREFIX/NAME)")
    async def sync_vm(name: VMName, request: SyncRequest) -> SyncInfo:
        return await peer.sync(name, request)

    @app.delete("/vms/{name}/sync", status_code=204, summary="Stop the VM's sync (what is "
                                                             "in the store stays)")
    async def stop_sync(name: VMName) -> None:
        await peer.sync_stop(name)

    @app.post("/vms/{name}/sync/gc", summary="Delete the VM's old sync points and every "
                                             "object no sync point names")
    async def sync_gc(name: VMName, request: GcRequest) -> GcResult:
        return await peer.sync_gc(name, request)
    @app.get("/vms/{name}/logs/{log}", summary="A piece of one of the VM's logs (console, "
             "qemu, worker); follow it by asking again from next_offset")
    async def get_log(name: VMName, log: LogName,
                      offset: Annotated[int, Query(ge=0, description="byte offset")] = 0,
                      limit: Annotated[int, Query(ge=1, le=MAX_LOG_CHUNK,
                                                  description="bytes at most")] = 65536
                      ) -> LogChunk:
        return peer.log(name, log, offset, limit)

    @app.put("/vms/{name}/mirror", summary="Keep a warm copy of the VM's devices on a "
                                           "standby peer (docs/MIRROR.md)")
    async def mirror_vm(name: VMName, request: MirrorRequest) -> MirrorInfo:
        return await peer.mirror(name, request)

    @app.delete("/vms/{name}/mirror", status_code=204, summary="End the VM's mirror (on "
                                                               "either end; the copy stays)")
    async def stop_mirror(name: VMName) -> None:
        await peer.mirror_stop(name)

    @app.post("/mirrors/{name}/promote", status_code=201, summary=(
        "Run a standby mirror's VM from its newest checkpoint under a new epoch"))
    async def promote_mirror(name: VMName, request: PromoteRequest) -> VMInfo:
        return await peer.promote(name, request)

    @app.post("/restores", status_code=201, summary=(
        "Run a VM from its newest sealed sync point in a bucket under a new epoch"))
    async def restore_vm(request: RestoreRequest) -> VMInfo:
        return await peer.restore(request)

    @app.post("/vms/{name}/hibernate", summary=(
        "Seal a final point of the VM in a bucket and stop it"))
    async def hibernate_vm(name: VMName, request: HibernateRequest) -> Checkpoint:
        return await peer.hibernate(name, request)

    @app.get("/gateways", summary="The overlay gateways this peer holds")
    async def list_gateways() -> list[GatewayInfo]:
        return peer.gateways()

    @app.post("/gateways", status_code=201, summary="Make this peer a VM's overlay gateway")
    async def add_gateway(request: GatewayRequest) -> GatewayInfo:
        return await peer.add_gateway(request)

    @app.get("/gateways/{name}", summary="One gateway")
    async def get_gateway(name: VMName) -> GatewayInfo:
        return peer.gateway(name)

    @app.delete("/gateways/{name}", status_code=204, summary="Remove a gateway")
    async def remove_gateway(name: VMName) -> None:
        await peer.remove_gateway(name)

    @app.get("/events", response_class=EventSourceResponse,
             summary="Server-sent events: a snapshot, then VM changes, migration progress "
                     "and outcomes")
    async def events() -> AsyncIterator[ServerSentEvent]:
        async with peer.subscribe() as stream:
            async for event in stream:
                yield ServerSentEvent(data=event, event=event.type)

    @app.get("/problems/{code}", summary="What a problem code means")
    async def problem_type(code: ErrorCode) -> problems.ProblemType:
        return problems.describe(code)

    return app


class _Server(uvicorn.Server):
    """uvicorn inside the peer's loop: the peer handles SIGTERM and SIGINT itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def server(app: FastAPI, tls: ssl.SSLContext | None = None) -> uvicorn.Server:
    """A server for sockets the peer binds itself (it sets their permissions):
    `await server(app).serve(sockets=[sock])`; `should_exit = True` stops it."""
    factory = None if tls is None else (lambda _config, _default: tls)
    return _Server(uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=GRACE, ssl_context_factory=factory))

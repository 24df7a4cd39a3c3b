"""The peer's HTTP API without VMs: problem documents and their codes, request parsing
under fuzzing, the socket as curl sees it, OpenAPI, the TCP listener's mutual TLS, what
the CLI says with no peer, and the worker protocol's typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roam.cli.exits import Exit, for_code
from roam.errors import ErrorCode, RoamError
from roam.migration.channel import TLSFiles
from roam.peer.api import create_app
from roam.peer.client import PEER_SOCKET, PeerAPIError, PeerClient
from roam.peer.models import (
    Accelerator,
    Capacity,
    Event,
    ExecRequest,
    ExecResult,
    GatewayInfo,
    GatewayRequest,
    GcRequest,
    GcResult,
    LogChunk,
    LogName,
    MigrateRequest,
    MigrateResult,
    MirrorInfo,
    MirrorRequest,
    PeerInfo,
    PromoteRequest,
    RunRequest,
    SnapshotEvent,
    SyncInfo,
    SyncRequest,
    VMInfo,
)
from roam.peer.problems import MEDIA_TYPE, STATUS, Problem
from roam.vm import control
from tests.blueprint.boot import short_dir
from tests.peer.conftest import Peer
from tests.vm.conftest import roam

VM = VMInfo(name="web", state="running", ready=True)
LOG = b"[    0.000000] Linux version 6.1\nroam-init: up\n"
RESULT = MigrateResult(outcome="completed", bytes_sent=1, total_ms=1.0, cycles=1,
                       dirty_per_cycle=[1], final_dirty=0, handover_ms=1.0, state_save_ms=1.0,
                       downtime_ms=1.0, priority_blocks=0)

SYNC = SyncInfo(to="s3://b/p/web", state="running", lag_bytes=0, lag_seconds=0.0,
                uploaded_bytes=0, objects_put=0, dedup_hits=0, zero_chunks=0, requests=0,
                sync_point=None, error=None)


class Stub:
    """A PeerService with one VM, "web", and one gateway, "gw". A VM called
    `fail-CODE` raises a RoamError of that code, `crash` an unexpected exception."""

    def _vm(self, name: str) -> VMInfo:
        if name.startswith("fail-"):
            raise RoamError(f"{name} failed", code=ErrorCode(name.removeprefix("fail-")))
        if name == "crash":
            raise RuntimeError("a bug")
        if name != VM.name:
            raise RoamError(f"no VM called {name!r}", code=ErrorCode.NOT_FOUND)
        return VM

    def info(self) -> PeerInfo:
        return PeerInfo(version="0", listen="unix:///x", api_listen=None, underlay=None,
                        tls=False, capacity=Capacity(memory_bytes=1, memory_available_bytes=1,
                                                     cpus=1),
                        accelerator=Accelerator(kvm=False, reason="stub"), cpu_model="stub",
                        vms=1)

    def vms(self) -> list[VMInfo]:
        return [VM]

    def vm(self, name: str) -> VMInfo:
        return self._vm(name)

    async def run(self, request: RunRequest) -> VMInfo:
        return VM.model_copy(update={"name": request.name})

    async def exec(self, name: str, request: ExecRequest) -> ExecResult:
        self._vm(name)
        return ExecResult(exit_code=0, stdout="", stderr="", timed_out=False)

    async def stop(self, name: str) -> None:
        self._vm(name)

    async def resume(self, name: str) -> VMInfo:
        return self._vm(name)

    async def migrate(self, name: str, request: MigrateRequest) -> MigrateResult:
        self._vm(name)
        return RESULT

    async def sync(self, name: str, request: SyncRequest) -> SyncInfo:
        self._vm(name)
        return SYNC.model_copy(update={"to": f"{request.to}/{name}"})

    async def sync_stop(self, name: str) -> None:
        self._vm(name)

    async def sync_gc(self, name: str, request: GcRequest) -> GcResult:
        self._vm(name)
        return GcResult(manifests_deleted=request.keep, objects_deleted=0, bytes_freed=0,
                        objects_kept=0)

    async def mirror(self, name: str, request: MirrorRequest) -> MirrorInfo:
        self._vm(name)
        return MirrorInfo(role="source", peer=request.to, state="first-pass", lag_bytes=0,
                          lag_seconds=0.0, sent_bytes=0)

    async def mirror_stop(self, name: str) -> None:
        self._vm(name)

    async def promote(self, name: str, request: PromoteRequest) -> VMInfo:
        raise RoamError(f"no checkpoint of {name}", code=ErrorCode.NOT_FOUND)

    def log(self, name: str, log: LogName, offset: int, limit: int) -> LogChunk:
        self._vm(name)
        data = LOG[offset:offset + limit]
        return LogChunk(vm=name, log=log, offset=min(offset, len(LOG)),
                        next_offset=min(offset, len(LOG)) + len(data), size=len(LOG),
                        text=data.decode())

    def gateways(self) -> list[GatewayInfo]:
        return [self.gateway("gw")]

    def gateway(self, name: str) -> GatewayInfo:
        if name != "gw":
            raise RoamError(f"no gateway {name!r}", code=ErrorCode.NOT_FOUND)
        return GatewayInfo(name="gw", vni=1, gateway="10.0.0.1", netns="n", publish=[])

    async def add_gateway(self, request: GatewayRequest) -> GatewayInfo:
        return self.gateway("gw")

    async def remove_gateway(self, name: str) -> None:
        self.gateway(name)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[Event]]:
        async def stream() -> AsyncIterator[Event]:
            yield SnapshotEvent(vms=[VM])  # then the stream ends: requests stay finite
        yield stream()


APP = create_app(Stub())


async def _request(method: str, path: str, content: bytes | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://peer") as client:
        return await client.request(method, path, content=content, headers=headers)


def request(method: str, path: str, body: Any = None, raw: bytes | None = None
            ) -> httpx.Response:
    content = raw if raw is not None else None if body is None else json.dumps(body).encode()
    return asyncio.run(_request(method, path, content,
                                {"content-type": "application/json"} if content else None))


def assert_problem(response: httpx.Response) -> Problem:
    """An error answered as a problem document that agrees with its HTTP status."""
    assert response.headers["content-type"] == MEDIA_TYPE, response.headers
    problem = Problem.model_validate_json(response.content)
    assert problem.status == response.status_code
    assert problem.type == f"/problems/{problem.code.value}" and problem.title
    return problem


# -- problem documents --------------------------------------------------------------------


@pytest.mark.parametrize("code", list(ErrorCode))
def test_a_roam_error_is_a_problem_with_its_code(code: ErrorCode) -> None:
    response = request("POST", f"/vms/fail-{code.value}/stop")
    problem = assert_problem(response)
    assert (problem.code, problem.status) == (code, STATUS[code])
    assert problem.detail == f"fail-{code.value} failed"
    assert problem.instance == f"/vms/fail-{code.value}/stop"
    described = request("GET", problem.type)  # the type says what the code means
    assert described.json() == {"code": code.value, "title": problem.title,
                                "status": STATUS[code]}


def test_unexpected_exception_is_internal() -> None:
    problem = assert_problem(request("GET", "/vms/crash"))
    assert (problem.code, problem.status, problem.detail) == (ErrorCode.INTERNAL, 500, "a bug")


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("GET", "/nowhere", None, 404, ErrorCode.NOT_FOUND),
    ("PUT", "/vms", None, 405, ErrorCode.BAD_REQUEST),
    ("POST", "/vms", {"name": "web"}, 422, ErrorCode.BAD_REQUEST),  # no package nor from
    ("POST", "/vms", {"name": "a/b", "package": "/p"}, 422, ErrorCode.BAD_REQUEST),
    ("POST", "/vms", {"name": "w", "package": "relative"}, 422, ErrorCode.BAD_REQUEST),
    ("POST", "/vms", {"name": "w", "package": "/p", "publish": ["x"]}, 422,
     ErrorCode.BAD_REQUEST),
    ("POST", "/vms/web/migrate", {"to": "ftp://x"}, 422, ErrorCode.BAD_REQUEST),
    ("POST", "/vms/web/migrate", {"to": "unix:///x", "max_cycle": 3}, 422,
     ErrorCode.BAD_REQUEST),  # a misspelt option is refused, not ignored
    ("POST", "/vms/web/exec", {"argv": []}, 422, ErrorCode.BAD_REQUEST),
    ("POST", "/vms/nope/exec", {"argv": ["true"]}, 404, ErrorCode.NOT_FOUND),
    ("DELETE", "/gateways/nope", None, 404, ErrorCode.NOT_FOUND),
    ("PUT", "/vms/web/sync", {"to": "https://bucket/p"}, 422, ErrorCode.BAD_REQUEST),
    ("PUT", "/vms/web/sync", {"to": "s3://Bad_Bucket/p"}, 422, ErrorCode.BAD_REQUEST),
    ("PUT", "/vms/web/sync", {"to": "s3://bucket/../p"}, 422, ErrorCode.BAD_REQUEST),
    ("PUT", "/vms/web/sync", {"to": "s3://bucket", "limit": 0}, 422, ErrorCode.BAD_REQUEST),
    ("PUT", "/vms/web/sync", {"to": "s3://bucket", "endpoint_url": "ftp://x"}, 422,
     ErrorCode.BAD_REQUEST),
    ("POST", "/vms/web/sync/gc", {"keep": 0}, 422, ErrorCode.BAD_REQUEST),
    ("DELETE", "/vms/nope/sync", None, 404, ErrorCode.NOT_FOUND),
    ("GET", "/vms/web/logs/nope", None, 422, ErrorCode.BAD_REQUEST),
    ("GET", "/vms/web/logs/console?offset=-1", None, 422, ErrorCode.BAD_REQUEST),
    ("GET", "/vms/web/logs/console?limit=0", None, 422, ErrorCode.BAD_REQUEST),
    ("GET", "/vms/web/logs/qemu?limit=1048577", None, 422, ErrorCode.BAD_REQUEST),
    ("GET", "/vms/nope/logs/worker", None, 404, ErrorCode.NOT_FOUND),
])
def test_bad_requests_are_problems(method: str, path: str, body: Any, status: int,
                                   code: ErrorCode) -> None:
    problem = assert_problem(request(method, path, body))
    assert (problem.status, problem.code) == (status, code), problem
    if status == 422:
        assert problem.errors, problem  # which field, and why


def test_requests_that_parse() -> None:
    assert request("POST", "/vms", {"name": "w", "from": "tcp://h:1"}).status_code == 201
    assert request("POST", "/vms/web/migrate", {"to": "tcp://h:1"}).json() == \
        RESULT.model_dump(mode="json")
    assert request("POST", "/vms/web/stop").status_code == 204
    assert request("PUT", "/vms/web/sync", {"to": "s3://bucket/fleet", "endpoint_url":
                                            "http://127.0.0.1:9000"}).json()["to"] == \
        "s3://bucket/fleet/web"
    assert request("DELETE", "/vms/web/sync").status_code == 204
    assert request("POST", "/vms/web/sync/gc", {"keep": 2}).json()["manifests_deleted"] == 2
    assert request("POST", "/vms", {"name": "w", "package": "/p", "sync": {
        "to": "s3://bucket/fleet"}}).status_code == 201
    assert request("GET", "/events").text.startswith("event: snapshot\n")
    chunk = LogChunk.model_validate(request("GET", "/vms/web/logs/console?offset=4&limit=5")
                                    .json())
    assert (chunk.text, chunk.offset, chunk.next_offset, chunk.size) == (
        LOG[4:9].decode(), 4, 9, len(LOG))


def test_openapi_describes_the_resources() -> None:
    spec = request("GET", "/openapi.json").json()
    assert {"/vms", "/vms/{name}", "/vms/{name}/exec", "/vms/{name}/stop",
            "/vms/{name}/resume", "/vms/{name}/migrate", "/vms/{name}/sync",
            "/vms/{name}/sync/gc", "/gateways", "/gateways/{name}",
            "/peer", "/events", "/vms/{name}/logs/{log}"} <= set(spec["paths"])
    assert "Problem" in spec["components"]["schemas"]
    assert "text/event-stream" in spec["paths"]["/events"]["get"]["responses"]["200"][
        "content"]


# -- fuzzing the request parsing ----------------------------------------------------------

FIELDS = ["name", "package", "from", "publish", "gateway", "vni", "argv", "timeout", "to",
          "postcopy", "max_cycles", "min_cycles", "max_dirty_blocks", "cycle_throttle",
          "compression", "verify", "check_memory", "remove", "sync", "endpoint_url",
          "check_period", "max_age", "min_changes", "limit", "concurrency", "keep", "grace",
          "x"]
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=12) | st.sampled_from(
               ["web", "/p", "tcp://h:1", "unix:///s", "8080:80", "10.0.0.1", "zstd", "",
                "s3://bucket/p", "http://127.0.0.1:1"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
PATHS = st.sampled_from(
    ["/vms", "/vms/web", "/vms/web/exec", "/vms/web/stop", "/vms/web/resume",
     "/vms/web/migrate", "/vms/nope/migrate", "/vms/web/sync", "/vms/web/sync/gc",
     "/gateways", "/gateways/gw", "/peer",
     "/vms/web/logs/console", "/vms/web/logs/worker?offset=3&limit=2",
     "/vms/web/logs/qemu?offset=99999999999999999999", "/vms/web/logs/x?limit=a",
     "/problems/busy", "/problems/nope"]) | st.text(
    st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=30).map("/".__add__)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]), path=PATHS,
       body=st.none() | st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6)
       | VALUES, raw=st.none() | st.binary(max_size=64))
def test_fuzzed_requests_never_fail_inside(method: str, path: str, body: Any,
                                           raw: bytes | None) -> None:
    try:
        response = request(method, path, body, raw)
    except httpx.InvalidURL:
        return  # httpx refused to send it
    assert response.status_code != 500, response.text
    if response.status_code >= 400:
        assert_problem(response)


# -- a real peer: its socket, its TLS listener, no peer ---------------------------------


@pytest.fixture(scope="module")
def idle() -> Iterator[Peer]:
    with short_dir() as root:
        peer = Peer("idle", root)
        try:
            yield peer
        finally:
            peer.close()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True,
                          check=True, timeout=30)


def test_curl_over_the_socket(idle: Peer) -> None:
    sock = idle.dir / PEER_SOCKET
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(idle.dir.stat().st_mode) == 0o700
    assert json.loads(curl("--unix-socket", str(sock), "http://peer/vms").stdout) == []
    spec = json.loads(curl("--unix-socket", str(sock), "http://peer/openapi.json").stdout)
    assert spec["info"]["title"] == "roam peer"
    missing = curl("--unix-socket", str(sock), "-i", "http://peer/vms/nope").stdout
    assert "404" in missing.splitlines()[0] and MEDIA_TYPE in missing
    info = idle.api(lambda c: c.peer())
    assert info.capacity.cpus >= 1 and info.capacity.memory_bytes > 0 and info.cpu_model


def test_client_raises_the_problem_code(idle: Peer) -> None:
    with pytest.raises(PeerAPIError) as raised:
        idle.stop("nope")
    assert raised.value.code == ErrorCode.NOT_FOUND
    assert raised.value.problem.status == 404


def test_no_peer_answering(tmp_path: Path) -> None:
    for args in (["peer", "ls"], ["migrate", "web", "--to", "unix:///nowhere"]):
        done = roam(*args, "--via", str(tmp_path), check=False)
        assert done.returncode == Exit.FAILED
        assert done.stderr.strip() == (
            f"error: no roam peer at {tmp_path} (start one with "
            f"`roam peer serve --state-dir {tmp_path}`)")


def _identity(ca: trustme.CA, root: Path, name: str) -> TLSFiles:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = TLSFiles(root / f"{name}.pem", root / f"{name}.key", root / f"{name}-ca.pem")
    cert.cert_chain_pems[0].write_to_path(str(files.cert))
    cert.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    return files


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_tcp_api_requires_a_client_certificate() -> None:
    with short_dir() as root:
        ours, theirs = trustme.CA(), trustme.CA()
        server, client, rogue = (_identity(ca, root, n) for ca, n in (
            (ours, "server"), (ours, "client"), (theirs, "rogue")))
        api = f"tcp://127.0.0.1:{_free_port()}"
        peer = Peer("tls", root, ("--tls-cert", str(server.cert), "--tls-key",
                                  str(server.key), "--tls-ca", str(server.ca),
                                  "--api-listen", api))
        try:
            async def ask(tls: TLSFiles) -> PeerInfo:
                async with PeerClient(api, tls) as remote:
                    return await remote.peer()

            info = asyncio.run(ask(client))
            assert info.tls and info.api_listen == api

            async def anonymous() -> httpx.Response:
                verify = ssl.create_default_context(cafile=str(server.ca))
                async with httpx.AsyncClient(verify=verify) as plain:
                    return await plain.get("https://" + api.removeprefix("tcp://") + "/peer")

            with pytest.raises(httpx.HTTPError):  # no certificate: the handshake fails
                asyncio.run(anonymous())
            with pytest.raises(RoamError):  # a certificate our CA did not sign
                asyncio.run(ask(TLSFiles(rogue.cert, rogue.key, server.ca)))
        finally:
            peer.close()


# -- the worker protocol and the exit codes -----------------------------------------------


async def test_control_errors_keep_their_code(tmp_path: Path) -> None:
    async def busy(_: control.Json) -> control.Json:
        raise RoamError("migrating", code=ErrorCode.BUSY)

    async def broken(_: control.Json) -> control.Json:
        raise ValueError("a bug")

    async def counting(params: control.Json) -> AsyncIterator[control.Json]:
        for n in range(int(params["n"])):
            yield {"n": n}

    path = tmp_path / "c.sock"
    server = await control.serve(path, {"busy": busy, "broken": broken},
                                 {"count": counting})
    try:
        for method, code in (("busy", ErrorCode.BUSY), ("broken", ErrorCode.INTERNAL),
                             ("nope", ErrorCode.BAD_REQUEST)):
            with pytest.raises(control.ControlError) as raised:
                await control.call_path(path, method)
            assert raised.value.code == code
        assert [e async for e in control.stream(path, "count", {"n": 3})] == [
            {"n": 0}, {"n": 1}, {"n": 2}]
    finally:
        server.close()
    with pytest.raises(control.ControlError) as gone:
        await control.call_path(tmp_path / "none.sock", "busy")
    assert gone.value.code == ErrorCode.NOT_FOUND


def test_exit_code_table() -> None:
    assert [for_code(c) for c in (ErrorCode.POSTCOPY_FAILED, ErrorCode.IN_DOUBT,
                                  ErrorCode.DECLINED, ErrorCode.TIMEOUT)] == [3, 4, 5, 124]
    assert {for_code(c) for c in ErrorCode} - {3, 4, 5, 124} == {Exit.FAILED}
    assert "4 in doubt" in " ".join(roam("--help").stdout.split())
    assert roam("migrate", "web", check=False).returncode == Exit.USAGE  # no --to

"""The per-VM control socket: how `roam exec` and `roam ls` reach a running `roam run`, and
how a peer talks to its workers (roam.peer.worker).

One JSON request line per connection: `{"method": "info"|"exec"|..., "params": {...}}`.
A plain method answers one line, `{"result": {...}}` or `{"error": {"code": CODE,
"message": "..."}}`; a stream method (a peer's `events`) answers `{"event": {...}}` lines
until either side closes. CODE is a `roam.errors.ErrorCode`: the caller raises
`ControlError` with that code, so an error keeps its meaning across the process boundary.
Sockets of `roam run` live in the run directory ($ROAM_RUN_DIR, default $ROAM_CACHE/run),
one subdirectory per VM name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from roam.blueprint import cache_root
from roam.errors import ErrorCode, RoamError

Json = dict[str, Any]
Handler = Callable[[Json], Awaitable[Json]]
StreamHandler = Callable[[Json], AsyncIterator[Json]]
SOCKET = "control.sock"
MAX_REQUEST = 1 << 20
MAX_REPLY = 16 << 20  # exec output comes back in one line
SOCKET_PATH_MAX = 107

log = logging.getLogger(__name__)


class ControlError(RoamError):
    """The VM is not running, or it answered with an error (whose code this keeps)."""


def run_root() -> Path:
    override = os.environ.get("ROAM_RUN_DIR")
    return Path(override) if override else cache_root() / "run"


def socket_path(name: str) -> Path:
    return run_root() / name / SOCKET


def check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or len(name) > 64:
        raise ControlError(f"bad VM name {name!r}: 1 to 64 characters, no '/', not hidden",
                           code=ErrorCode.BAD_REQUEST)
    if len(str(socket_path(name))) > SOCKET_PATH_MAX:
        raise ControlError(f"{socket_path(name)} is too long for a UNIX socket: "
                           "set ROAM_RUN_DIR to a shorter directory", code=ErrorCode.BAD_REQUEST)


def error_reply(exc: BaseException) -> Json:
    """The reply for a failed request: a RoamError keeps its code, anything else is
    `internal` (and logged with its traceback, since it is a bug or an unexpected failure)."""
    if isinstance(exc, RoamError):
        return {"error": {"code": exc.code.value, "message": exc.message}}
    log.error("control request failed", exc_info=exc)
    return {"error": {"code": ErrorCode.INTERNAL.value, "message": str(exc) or repr(exc)}}


async def serve(path: Path, handlers: Mapping[str, Handler],
                streams: Mapping[str, StreamHandler] | None = None) -> asyncio.Server:
    streams = streams or {}

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            method = str(request.get("method"))
            params = request.get("params") or {}
            if method in streams:
                await _stream(streams[method](params), writer)
                return
            handler = handlers.get(method)
            if handler is None:
                reply: Json = {"error": {"code": ErrorCode.BAD_REQUEST.value,
                                         "message": f"unknown method {method!r}"}}
            else:
                reply = {"result": await handler(params)}
        except Exception as exc:
            reply = error_reply(exc)
        with contextlib.suppress(OSError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a run that was killed
    return await asyncio.start_unix_server(connection, str(path), limit=MAX_REQUEST)


async def _stream(events: AsyncIterator[Json], writer: asyncio.StreamWriter) -> None:
    """Write each event as it comes until the stream ends or the reader goes away."""
    try:
        async for event in events:
            writer.write(json.dumps({"event": event}).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the subscriber left
    except Exception as exc:
        with contextlib.suppress(OSError):
            writer.write(json.dumps(error_reply(exc)).encode() + b"\n")
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def call(name: str, method: str, params: Json | None = None,
               timeout: float = 10.0) -> Json:  # noqa: ASYNC109
    """One request to the VM called `name`."""
    return await call_path(socket_path(name), method, params, timeout, name)


def _raise(reply: Json) -> None:
    """Raise the error a reply carries, with its code."""
    error = reply.get("error")
    if error is None:
        return
    if not isinstance(error, dict):
        raise ControlError(f"malformed error reply: {error!r}")
    try:
        code = ErrorCode(str(error.get("code")))
    except ValueError:
        code = ErrorCode.INTERNAL
    raise ControlError(str(error.get("message", "")), code=code)


async def _open(path: Path, method: str, params: Json | None, name: str
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_REPLY)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"no VM called {name!r} is running",
                           code=ErrorCode.NOT_FOUND) from None
    writer.write(json.dumps({"method": method, "params": params or {}}).encode() + b"\n")
    await writer.drain()
    return reader, writer


async def call_path(path: Path, method: str, params: Json | None = None,
                    timeout: float = 10.0, name: str = "") -> Json:  # noqa: ASYNC109
    """One request to the control socket at `path` (a VM's, or a peer's worker)."""
    name = name or str(path)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(path, method, params, name)
            line = await reader.readline()
            writer.close()
    except TimeoutError:
        raise ControlError(f"VM {name!r} did not answer within {timeout} s",
                           code=ErrorCode.TIMEOUT) from None
    if not line:
        raise ControlError(f"VM {name!r} closed the control connection")
    reply = json.loads(line)
    _raise(reply)
    result: Json = reply["result"]
    return result


async def stream(path: Path, method: str, params: Json | None = None,
                 name: str = "") -> AsyncIterator[Json]:
    """The events of a stream method, until the server closes the connection."""
    reader, writer = await _open(path, method, params, name or str(path))
    try:
        while line := await reader.readline():
            reply = json.loads(line)
            _raise(reply)
            event: Json = reply["event"]
            yield event
    finally:
        writer.close()


async def list_vms() -> list[Json]:
    """`info` of every VM whose control socket answers; stale directories are skipped."""
    root = run_root()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if (entry / SOCKET).exists():
            with contextlib.suppress(ControlError, OSError, ValueError):
                found.append(await call(entry.name, "info", timeout=3.0))
    return found

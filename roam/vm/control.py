"""The per-VM control socket: how `roam exec` and `roam ls` reach a running `roam run`.

One JSON request line per connection, one JSON reply line back:
`{"method": "info"|"exec", "params": {...}}` -> `{"result": {...}}` or `{"error": "..."}`.
Sockets live in the run directory ($ROAM_RUN_DIR, default $ROAM_CACHE/run), one
subdirectory per VM name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from roam.blueprint import cache_root

Json = dict[str, Any]
Handler = Callable[[Json], Awaitable[Json]]
SOCKET = "control.sock"
MAX_REQUEST = 1 << 20
MAX_REPLY = 16 << 20  # exec output comes back in one line
SOCKET_PATH_MAX = 107


class ControlError(Exception):
    """The VM is not running, or it answered with an error."""


def run_root() -> Path:
    override = os.environ.get("ROAM_RUN_DIR")
    return Path(override) if override else cache_root() / "run"


def socket_path(name: str) -> Path:
    return run_root() / name / SOCKET


def check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or len(name) > 64:
        raise ControlError(f"bad VM name {name!r}: 1 to 64 characters, no '/', not hidden")
    if len(str(socket_path(name))) > SOCKET_PATH_MAX:
        raise ControlError(f"{socket_path(name)} is too long for a UNIX socket: "
                           "set ROAM_RUN_DIR to a shorter directory")


async def serve(path: Path, handlers: dict[str, Handler]) -> asyncio.Server:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            handler = handlers.get(str(request.get("method")))
            if handler is None:
                reply: Json = {"error": f"unknown method {request.get('method')!r}"}
            else:
                reply = {"result": await handler(request.get("params") or {})}
        except Exception as exc:
            reply = {"error": str(exc) or repr(exc)}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a run that was killed
    return await asyncio.start_unix_server(connection, str(path), limit=MAX_REQUEST)


async def call(name: str, method: str, params: Json | None = None,
               timeout: float = 10.0) -> Json:  # noqa: ASYNC109
    """One request to the VM called `name`."""
    return await call_path(socket_path(name), method, params, timeout, name)


async def call_path(path: Path, method: str, params: Json | None = None,
                    timeout: float = 10.0, name: str = "") -> Json:  # noqa: ASYNC109
    """One request to the control socket at `path` (a peer's, or a VM's under a peer)."""
    name = name or str(path)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_REPLY)
            writer.write(json.dumps({"method": method, "params": params or {}}).encode()
                         + b"\n")
            await writer.drain()
            line = await reader.readline()
            writer.close()
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"no VM called {name!r} is running") from None
    except TimeoutError:
        raise ControlError(f"VM {name!r} did not answer within {timeout} s") from None
    if not line:
        raise ControlError(f"VM {name!r} closed the control connection")
    reply = json.loads(line)
    if "error" in reply:
        raise ControlError(f"{name}: {reply['error']}")
    result: Json = reply["result"]
    return result


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

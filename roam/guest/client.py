"""Host side of the guest agent protocol (docs/GUEST_AGENT.md), over QEMU's chardev socket."""

# Every call takes a timeout with a default, so that a hung guest can never hang the host
# even when the caller forgets to wrap the call in asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roam.guest.agent import MAX_LINE, PROTOCOL_VERSION

log = logging.getLogger(__name__)

Json = dict[str, Any]
RequestHandler = Callable[[Json], Awaitable[Json]]
DEFAULT_TIMEOUT = 10.0


class GuestAgentError(Exception):
    """The agent replied with an error, timed out, or the connection was lost."""

    def __init__(self, message: str, code: str = "client") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None  # None when the command timed out and was killed
    stdout: str
    stderr: str
    timed_out: bool


class GuestClient:
    """One session with the agent. Requests may also come from the guest (see `handle`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Json]] = {}
        self._handlers: dict[str, RequestHandler] = {}
        self._ready = asyncio.Event()
        self._closed: GuestAgentError | None = None
        self._hello: Json | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._read_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | Path, timeout: float = DEFAULT_TIMEOUT) -> GuestClient:
        """Connect to the agent chardev socket, waiting for QEMU to create it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
                return cls(reader, writer)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() >= deadline:
                    raise GuestAgentError(f"cannot connect to agent socket {path}: {exc}") from exc
                await asyncio.sleep(0.05)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def handle(self, method: str, handler: RequestHandler) -> None:
        """Answer requests that the guest sends to the host."""
        self._handlers[method] = handler

    async def close(self) -> None:
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._fail_pending(GuestAgentError("client closed"))

    # -- calls ------------------------------------------------------------------------------

    async def call(self, method: str, params: Json | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> Json:
        """Send one request and wait for its reply; raise GuestAgentError on error or timeout.

        An agent that restarted inside this session (roam-init respawns it) has forgotten
        the handshake and answers no_handshake: shake hands again and retry once.
        """
        try:
            return await self._call_once(method, params, timeout)
        except GuestAgentError as exc:
            if exc.code != "no_handshake" or method == "hello":
                raise
        await self.hello(timeout)
        return await self._call_once(method, params, timeout)

    async def _call_once(self, method: str, params: Json | None, timeout: float) -> Json:
        if self._closed is not None:
            raise self._closed
        msg_id = next(self._ids)
        future: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            await self._send({"id": msg_id, "method": method, "params": params or {}})
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise GuestAgentError(f"{method}: no reply within {timeout} s", "timeout") from None
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            error = reply["error"] or {}
            raise GuestAgentError(f"{method}: {error.get('message')}", str(error.get("code")))
        result = reply.get("result")
        if not isinstance(result, dict):
            raise GuestAgentError(f"{method}: malformed reply {reply!r}", "protocol")
        return result

    async def hello(self, timeout: float = DEFAULT_TIMEOUT) -> Json:
        """Version handshake. The guest may still be booting: give it the boot's timeout."""
        result = await self.call("hello", {"version": PROTOCOL_VERSION}, timeout)
        if result.get("version") != PROTOCOL_VERSION:
            raise GuestAgentError(f"agent speaks version {result.get('version')}", "version")
        if result.get("ready"):
            self._ready.set()
        self._hello = result
        return result

    async def wait_ready(self, timeout: float) -> None:
        """Handshake if not done yet, then wait until the agent says its workload is up."""
        deadline = time.monotonic() + timeout
        if self._hello is None:
            await self.hello(timeout)
        try:
            await asyncio.wait_for(self._ready.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise GuestAgentError(f"guest not ready within {timeout} s", "timeout") from None

    async def ping(self, timeout: float = DEFAULT_TIMEOUT) -> float:
        """Round trip to the agent; returns the guest's uptime in seconds."""
        return float((await self.call("ping", timeout=timeout))["uptime"])

    async def exec(self, argv: list[str] | str, timeout: float = 30.0,
                   stdin: str = "") -> ExecResult:
        """Run a command in the guest (a string runs under /bin/sh -c)."""
        params: Json = {"timeout": timeout, "stdin": stdin}
        params["command" if isinstance(argv, str) else "argv"] = argv
        result = await self.call("exec", params, timeout + DEFAULT_TIMEOUT)
        return ExecResult(result["exit_code"], result["stdout"], result["stderr"],
                          result["timed_out"])

    async def before_suspend(self, timeout: float = 120.0) -> Json:
        return await self.call("before_suspend", {}, timeout)

    async def after_resume(self, host_time: float | None = None,
                           timeout: float = 120.0) -> Json:
        """Run the resume hooks; the guest clock is set to host_time (default: now)."""
        when = time.time() if host_time is None else host_time
        return await self.call("after_resume", {"time": when}, timeout)

    # -- plumbing -------------------------------------------------------------------------

    async def _send(self, message: Json) -> None:
        self._writer.write((json.dumps(message, separators=(",", ":")) + "\n").encode())
        await self._writer.drain()

    async def _read_loop(self) -> None:
        reason = GuestAgentError("connection closed by the agent", "closed")
        try:
            while line := await self._reader.readline():
                self._dispatch(line)
        except (OSError, ValueError) as exc:  # ValueError: a line longer than MAX_LINE
            reason = GuestAgentError(f"connection lost: {exc}", "closed")
        self._fail_pending(reason)

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("agent sent a line that is not JSON: %r", line[:80])
            return
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if method is None:
            future = self._pending.get(message.get("id"))  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(message)
        elif message.get("id") is None:
            if method == "ready":
                self._ready.set()
            log.debug("agent notification %s %s", method, message.get("params"))
        else:
            task = asyncio.create_task(self._answer(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, message: Json) -> None:
        handler = self._handlers.get(str(message["method"]))
        if handler is None:
            reply: Json = {"id": message["id"], "error": {
                "code": "unknown_method", "message": f"host has no method {message['method']!r}"}}
        else:
            try:
                reply = {"id": message["id"], "result": await handler(message.get("params") or {})}
            except Exception as exc:
                reply = {"id": message["id"], "error": {"code": "internal", "message": repr(exc)}}
        with contextlib.suppress(OSError):
            await self._send(reply)

    def _fail_pending(self, reason: GuestAgentError) -> None:
        self._closed = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(reason)


HELLO_TIMEOUT = 3.0


async def fresh_session(connect: Callable[[], Awaitable[GuestClient]],
                        timeout: float = 60.0) -> GuestClient:
    """A session with the agent of a resumed guest, handshake done.

    Snapshots are saved while the host is connected, so the restored guest learns at once
    that the host went away and reopens its port for the new session. A state saved just
    after the host disconnected can leave the guest reading a stale session that swallows
    the first bytes; a fresh session is served, so a handshake that gets no answer is
    retried on a new connection (`connect` makes one).
    """
    deadline = time.monotonic() + timeout
    while True:
        agent = await connect()
        try:
            await agent.hello(HELLO_TIMEOUT)
            return agent
        except GuestAgentError as exc:
            await agent.close()
            if exc.code != "timeout" or time.monotonic() > deadline:
                raise
            log.info("agent did not answer the handshake; reconnecting")

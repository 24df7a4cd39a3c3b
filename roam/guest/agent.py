#!/usr/bin/python3
"""roam guest agent: newline-delimited JSON RPC with the host over virtio-serial.

This file is copied into the guest, where there is no pip: standard library only.
The wire format is documented in docs/GUEST_AGENT.md; roam.guest.client is the host side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1
PORT_NAME = "org.roam.agent"
CONFIG_PATH = "/etc/roam/agent.json"
MAX_LINE = 16 * 1024 * 1024
MAX_OUTPUT = 1024 * 1024
RECONNECT_DELAY = 0.1

DEFAULT_CONFIG: dict[str, Any] = {
    # The workload is up when this command exits 0 and prints `ready_expect`.
    "ready_command": ["redis-cli", "ping"],
    "ready_expect": "PONG",
    "ready_poll_interval": 0.2,
    # Commands run (in order) by the before_suspend and after_resume methods.
    "before_suspend": [["sync"]],
    "after_resume": [],
}

Json = dict[str, Any]


class RpcError(Exception):
    """An error reply: `code` is stable and machine-readable, the message is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def log(message: str) -> None:
    print(f"roam-agent: {message}", file=sys.stderr, flush=True)


def find_port(name: str = PORT_NAME, dev: str = "/dev", sysfs: str = "/sys") -> str | None:
    """Path of the named virtio-serial port; without udev there is no /dev/virtio-ports link."""
    link = Path(dev, "virtio-ports", name)
    if link.exists():
        return str(link)
    for name_file in Path(sysfs, "class", "virtio-ports").glob("*/name"):
        try:
            if name_file.read_text().strip() == name:
                return str(Path(dev, name_file.parent.name))
        except OSError:
            continue
    return None


class Connection:
    """One session with the host over a file descriptor; writes are serialised."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.handshaken = False
        self._write_lock = threading.Lock()

    def send(self, message: Json) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self._write_lock:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]

    def lines(self) -> Iterator[bytes]:
        """Yield each complete line until EOF (the host disconnected)."""
        buffer = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield line
            if len(buffer) > MAX_LINE:
                log("dropping an over-long line")
                buffer = b""


def _text(data: bytes | None) -> str:
    return (data or b"")[:MAX_OUTPUT].decode(errors="replace")


def run_command(argv: list[str], timeout: float, stdin: str = "") -> Json:
    """Run argv; its exit code and output (truncated to MAX_OUTPUT each)."""
    try:
        done = subprocess.run(argv, input=stdin.encode(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"exit_code": None, "timed_out": True,
                "stdout": _text(exc.stdout), "stderr": _text(exc.stderr)}
    except OSError as exc:
        raise RpcError("exec_failed", f"cannot run {argv[0]!r}: {exc}") from exc
    return {"exit_code": done.returncode, "timed_out": False,
            "stdout": _text(done.stdout), "stderr": _text(done.stderr)}


def _set_realtime_clock(seconds: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, seconds)


class Agent:
    """Answers host requests and tells the host when the workload is ready."""

    def __init__(self, config: Json | None = None,
                 set_clock: Callable[[float], None] = _set_realtime_clock) -> None:
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        self._set_clock = set_clock
        self._ready = False
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._methods: dict[str, Callable[[Json], Json]] = {
            "hello": self._hello,
            "ping": self._ping,
            "exec": self._exec,
            "before_suspend": self._before_suspend,
            "after_resume": self._after_resume,
        }

    # -- workload readiness -------------------------------------------------------------

    def watch_workload(self) -> None:
        """Poll the ready command until it succeeds, then notify the host (once)."""
        argv: list[str] = self.config["ready_command"]
        while True:
            try:
                out = run_command(argv, timeout=5.0)
                if out["exit_code"] == 0 and self.config["ready_expect"] in out["stdout"]:
                    break
            except RpcError:
                pass
            time.sleep(float(self.config["ready_poll_interval"]))
        log("workload is ready")
        with self._lock:
            self._ready = True
            conn = self._conn
            if conn is not None and conn.handshaken:
                self._notify(conn, "ready", {})

    # -- serving --------------------------------------------------------------------------

    def serve(self, fd: int) -> None:
        """Serve one host session on fd until EOF; each request runs in its own thread."""
        conn = Connection(fd)
        with self._lock:
            self._conn = conn
        try:
            for line in conn.lines():
                threading.Thread(target=self._handle, args=(conn, line), daemon=True).start()
        finally:
            with self._lock:
                if self._conn is conn:
                    self._conn = None

    def _handle(self, conn: Connection, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log(f"ignoring a line that is not JSON: {line[:80]!r}")
            return
        if not isinstance(message, dict):
            return
        method, msg_id = message.get("method"), message.get("id")
        if method is None:
            return  # a reply to a request we never sent, or an unknown notification
        try:
            params = message.get("params") or {}
            if not isinstance(params, dict):
                raise RpcError("bad_params", "params must be an object")
            handler = self._methods.get(str(method))
            if handler is None:
                raise RpcError("unknown_method", f"no method {method!r}")
            if method != "hello" and not conn.handshaken:
                raise RpcError("no_handshake", "call hello first")
            reply: Json = {"id": msg_id, "result": handler(params)}
        except RpcError as exc:
            reply = {"id": msg_id, "error": {"code": exc.code, "message": str(exc)}}
        except Exception as exc:
            reply = {"id": msg_id, "error": {"code": "internal", "message": repr(exc)}}
        if msg_id is None:
            return
        try:
            if method == "hello" and "result" in reply:
                with self._lock:  # a ready notification must come after this reply
                    # Before the reply leaves: the host's next request may be handled
                    # by another thread as soon as the reply is out.
                    conn.handshaken = True
                    conn.send(reply)
            else:
                conn.send(reply)
        except OSError as exc:
            log(f"cannot reply: {exc}")

    def _notify(self, conn: Connection, method: str, params: Json) -> None:
        try:
            conn.send({"method": method, "params": params})
        except OSError as exc:
            log(f"cannot send {method}: {exc}")

    # -- methods ----------------------------------------------------------------------------

    def _hello(self, params: Json) -> Json:
        if params.get("version") != PROTOCOL_VERSION:
            raise RpcError("unsupported_version",
                           f"agent speaks version {PROTOCOL_VERSION}, "
                           f"host asked for {params.get('version')!r}")
        return {"version": PROTOCOL_VERSION, "ready": self._ready, "pid": os.getpid()}

    def _ping(self, params: Json) -> Json:
        return {"uptime": time.clock_gettime(time.CLOCK_BOOTTIME)}

    def _exec(self, params: Json) -> Json:
        argv = params.get("argv")
        if isinstance(params.get("command"), str):
            argv = ["/bin/sh", "-c", params["command"]]
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise RpcError("bad_params", "exec needs argv (list of strings) or command")
        return run_command(argv, float(params.get("timeout", 30.0)), str(params.get("stdin", "")))

    def _run_hooks(self, name: str) -> list[Json]:
        results = []
        for argv in self.config[name]:
            result = run_command(list(argv), timeout=60.0)
            results.append({"argv": argv, **result})
        return results

    def _before_suspend(self, params: Json) -> Json:
        return {"commands": self._run_hooks("before_suspend")}

    def _after_resume(self, params: Json) -> Json:
        clock_step = None
        if params.get("time") is not None:
            host_time = float(params["time"])
            clock_step = host_time - time.time()
            self._set_clock(host_time)
        return {"clock_step": clock_step, "commands": self._run_hooks("after_resume")}


def load_config(path: str = CONFIG_PATH) -> Json:
    try:
        loaded = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(loaded, dict):
        raise SystemExit(f"{path}: expected a JSON object")
    return loaded


def main() -> None:
    """Find the port, serve the host, and reopen the port whenever the host goes away."""
    agent = Agent(load_config())
    threading.Thread(target=agent.watch_workload, daemon=True).start()
    missing_logged = False
    while True:
        path = find_port()
        if path is None:
            if not missing_logged:
                log(f"waiting for virtio-serial port {PORT_NAME}")
                missing_logged = True
            time.sleep(0.5)
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            agent.serve(fd)  # returns when the host is not (or no longer) connected
        except OSError as exc:
            log(f"port error: {exc}")
        finally:
            os.close(fd)
        time.sleep(RECONNECT_DELAY)


if __name__ == "__main__":
    main()

"""One QEMU process, controlled over QMP.

What the driver's Machine needs and no more: start (cold, or waiting for incoming
state), pause, resume, save and load the device state, stop, and notice when QEMU dies
under us. Guest memory is never copied by QEMU: the `x-ignore-shared` capability leaves
the shared memory-backend-file out of the migration stream, since that memory already is
an engine device. Benchmarks and tests also drive it directly on plain files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar, cast

from qemu.qmp import EventListener, QMPClient, QMPError

from roam.hypervisor import device_state
from roam.hypervisor.driver import HypervisorError, MachineExited
from roam.hypervisor.qemu.cmdline import QemuConfig, qemu_argv
from roam.storage.provider import Provider

log = logging.getLogger(__name__)

T = TypeVar("T")

QMP_CONNECT_TIMEOUT = 30.0
STATE_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0


class QemuError(HypervisorError):
    """QEMU refused a command, failed a migration, or is not running."""


class QemuVM:
    """A QEMU process for `config`; its own output goes to `log_path`."""

    def __init__(self, config: QemuConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._qmp = QMPClient("roam")
        # QEMU reports each change of migration status as an event: the end of a state
        # save or load is seen as soon as it happens, without polling query-migrate.
        self._migration_events = EventListener("MIGRATION")
        self._qmp.register_listener(self._migration_events)
        # The run state's changes, timed by QEMU itself: a handover's downtime is measured
        # from the source's STOP event to the destination's RESUME event, as QEMU's own
        # migration would be.
        self._run_events = EventListener(("STOP", "RESUME"))
        self._qmp.register_listener(self._run_events)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self, *, incoming: bool = False) -> None:
        """Start QEMU; with `incoming` it waits, paused, for load_state instead of booting."""
        argv = qemu_argv(self.config)
        if incoming:
            argv += ["-S", "-incoming", "defer"]
        log.debug("starting %s", " ".join(argv))
        # Its own session: a Ctrl-C meant for us (the terminal signals the whole process
        # group) must not kill QEMU before we have suspended the VM. But if we die, QEMU
        # dies with us (its memory and disk are served by this process): setpriv sets the
        # parent-death signal, which survives the exec into QEMU.
        with self.log_path.open("ab") as out:
            self._process = await asyncio.create_subprocess_exec(
                "setpriv", "--pdeathsig", "KILL", *argv, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
                pass_fds=self.config.pass_fds)
        self._exited = asyncio.create_task(self._process.wait())
        await self.guard(self._connect())
        # Set on both ends of every save/load: the shared memory file is not state.
        await self.command("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True}]})

    async def _connect(self) -> None:
        deadline = time.monotonic() + QMP_CONNECT_TIMEOUT
        socket = self.config.qmp_socket
        # qemu.qmp logs every refused attempt as an error; QEMU not listening yet is
        # expected here, and a real failure is raised below.
        quiet = logging.getLogger(f"qemu.qmp.protocol.{self._qmp.name}")
        saved_level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            while True:
                if socket.exists():
                    try:
                        await self._qmp.connect(str(socket))
                        return
                    except QMPError:
                        pass
                if time.monotonic() > deadline:
                    raise QemuError(f"QEMU's QMP socket {socket} did not come up")
                await asyncio.sleep(0.02)
        finally:
            quiet.setLevel(saved_level)

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, raising MachineExited instead if QEMU ends first."""
        if self._exited is None:
            raise QemuError("QEMU is not started")
        task = asyncio.ensure_future(awaitable)
        await asyncio.wait([task, self._exited], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise self._exit_error()

    async def wait_exit(self) -> MachineExited:
        """Return (not raise) the error once QEMU has ended: the runner's kill detection."""
        if self._exited is None:
            raise QemuError("QEMU is not started")
        await asyncio.shield(self._exited)
        return self._exit_error()

    def _exit_error(self) -> MachineExited:
        assert self._exited is not None
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return MachineExited(self._exited.result(), " / ".join(tail), "QEMU")

    async def command(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self.guard(self._qmp.execute(name, arguments))
        except QMPError as exc:
            raise QemuError(f"QMP {name}: {exc}") from exc

    async def pause(self) -> float:
        """`stop`; returns the wall clock of QEMU's STOP event."""
        return await self._run_state("stop", "STOP")

    async def resume(self) -> float:
        """`cont`; returns the wall clock of QEMU's RESUME event."""
        return await self._run_state("cont", "RESUME")

    async def _run_state(self, command: str, event_name: str) -> float:
        self._run_events.clear()
        await self.command(command)
        # QEMU sends the event before the command's answer: it is queued by now, unless
        # the guest was already in that state (then there is none, and now is as good).
        while not self._run_events.empty():
            event = await self._run_events.get()  # queued: no wait
            if event["event"] == event_name:
                stamp = cast(dict[str, int], event["timestamp"])
                return stamp["seconds"] + stamp["microseconds"] / 1e6
        return time.time()

    async def save_state(self, device: Provider) -> int:
        """Write the device state (not memory) into the state device; the VM must be paused.

        QEMU sends the stream to a UNIX socket of ours (7.2 has no file: URI, and passing
        a pipe with getfd needs a raw socket that uvloop does not expose); the length goes
        into the state device's prefix. Returns the state's length.
        """
        received: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if not received.done():
                    received.set_result(await device_state.write_state(device, reader))
            except Exception as exc:
                if not received.done():
                    received.set_exception(exc)
            finally:
                writer.close()

        path = self._state_socket()
        server = await asyncio.start_unix_server(receive, str(path), limit=device_state.CHUNK)
        self._migration_events.clear()
        try:
            await self.command("migrate", {"uri": f"unix:{path}"})
            length = await self.guard(asyncio.wait_for(received, STATE_TIMEOUT))
        finally:
            server.close()
            path.unlink(missing_ok=True)
        await self._migration_done()
        return length

    async def load_state(self, device: Provider) -> None:
        """Load the state saved in `device` into a QEMU started with incoming=True.

        The VM stays paused: call resume() when its devices are ready.
        """
        length = await device_state.state_length(device)
        path = self._state_socket()
        self._migration_events.clear()
        await self.command("migrate-incoming", {"uri": f"unix:{path}"})
        _, writer = await self.guard(asyncio.open_unix_connection(str(path)))
        try:
            async for chunk in device_state.read_state(device):
                writer.write(chunk)
                await self.guard(writer.drain())
        finally:
            writer.close()
        await self._migration_done()
        path.unlink(missing_ok=True)
        log.debug("loaded %d bytes of device state", length)

    def _state_socket(self) -> Path:
        path = self.config.qmp_socket.with_name("state.sock")
        path.unlink(missing_ok=True)
        return path

    async def _migration_done(self) -> None:
        """Wait for the MIGRATION event that ends the save or load started last."""
        deadline = time.monotonic() + STATE_TIMEOUT
        while True:
            try:
                event = await self.guard(asyncio.wait_for(
                    self._migration_events.get(), deadline - time.monotonic()))
            except TimeoutError:
                raise QemuError(f"device state transfer not done after {STATE_TIMEOUT} s"
                                ) from None
            status = cast(dict[str, Any], event["data"]).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                info = cast(dict[str, Any], await self.command("query-migrate"))
                raise QemuError(f"device state transfer {status}: "
                                f"{info.get('error-desc', 'no reason given')}")

    async def stop(self) -> None:
        """End QEMU: quit over QMP, kill if it does not go in time. Safe to call twice."""
        if self._exited is None:
            return
        if not self._exited.done():
            with contextlib.suppress(QemuError, QMPError, OSError):
                await asyncio.wait_for(self._qmp.execute("quit"), STOP_TIMEOUT)
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), STOP_TIMEOUT)
            except TimeoutError:
                await self.kill()
        # The connection has usually ended with QEMU; qemu.qmp re-raises that here.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._qmp.disconnect()

    async def kill(self) -> None:
        if self._process is not None and self._exited is not None and not self._exited.done():
            self._process.kill()
            await asyncio.shield(self._exited)

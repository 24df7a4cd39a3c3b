"""A peer's worker process: one VM, resumed from a package or received from another peer.

Started by `roam peer serve`, never by hand: `python -m roam.peer.worker --workdir DIR
--net NETCONFIG [--packages DIR] (--package PKG --name NAME [--publish SPEC]...
[--overlay SPEC] | --incoming-fd FD)`. It serves a control
socket in DIR (info, exec, migrate, stop, resume, and the `events` stream the peer
follows: roam.peer.events) and exits when the VM has left this host or was
stopped; the exit code says whether that went well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import uvloop

from roam import logs
from roam.migration.channel import Address, Channel, FrameProtocol, TLSFiles, connect
from roam.migration.wire import Hello, MsgType, decode
from roam.network.leases import state_dir as net_state_dir
from roam.network.overlay import OverlaySpec
from roam.peer import events
from roam.peer.errors import PeerError
from roam.peer.incoming import Incoming
from roam.peer.instance import Instance, from_package
from roam.peer.mirrored import Standby, is_mirror
from roam.peer.network import NetConfig
from roam.peer.packages import HeldPackages
from roam.storage.provider import Buffer
from roam.vm import control

log = logging.getLogger("roam.peer.worker")
T = TypeVar("T")


@contextlib.asynccontextmanager
async def _control(instance: Instance, incoming: Incoming | None = None
                   ) -> AsyncIterator[None]:
    """The control socket, from the moment the instance exists (info works while it is
    still arriving or resuming), with the `events` stream the peer follows (it is told
    of what changes without a change of state too: events.watch)."""
    server = await control.serve(instance.workdir / control.SOCKET, {
        "info": instance.handle_info, "exec": instance.handle_exec,
        "migrate": instance.handle_migrate, "stop": instance.handle_stop,
        "resume": instance.handle_resume, "pause": instance.handle_pause,
        "sync": instance.handle_sync, "sync_stop": instance.handle_sync_stop,
        "sync_gc": instance.handle_sync_gc, "mirror": instance.handle_mirror,
        "mirror_stop": instance.handle_mirror_stop, "hibernate": instance.handle_hibernate},
        {"events": events.stream(instance)})
    watching = asyncio.create_task(events.watch(instance, incoming))
    try:
        yield
    finally:
        watching.cancel()
        instance.events.close()  # the peer's stream ends after the last state
        server.close()


async def _serve(instance: Instance) -> None:
    """Run until the VM leaves, is stopped, or QEMU dies."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, instance.finished.set)
    finished = asyncio.create_task(instance.finished.wait())
    exited = asyncio.create_task(instance.vm.machine.wait_exit())
    await asyncio.wait([finished, exited], return_when=asyncio.FIRST_COMPLETED)
    finished.cancel()
    if exited.done() and not instance.finished.is_set():
        raise exited.result()
    exited.cancel()


async def _first(awaitable: Awaitable[T], watched: asyncio.Task[object]) -> T:
    """Await `awaitable` unless `watched` ends first (then raise what it raised)."""
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait([task, watched], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    watched.result()
    raise RuntimeError("the migration ended before the VM was resumed here")


async def run_package(workdir: Path, package: Path, name: str, publish: list[str],
                      netconf: NetConfig, overlay: OverlaySpec | None = None,
                      tls: TLSFiles | None = None, epoch: int = 0) -> None:
    instance = from_package(package, name, publish, workdir, netconf, overlay)
    instance.tls = tls
    instance.info["epoch"] = epoch
    try:
        async with _control(instance), instance.exposure():
            try:
                await instance.start_machine()
                await instance.load_and_resume()
                await instance.after_resume()
                await _serve(instance)
            finally:
                await instance.close()
    finally:
        for device in instance.devices.values():
            await device.tracker.close()


async def accepted(fd: int, tls: TLSFiles | None) -> FrameProtocol:
    """The migration connection the peer accepted and handed over as `fd`; with `tls`,
    the other peer must present a certificate our CA signed."""
    proto = FrameProtocol()
    try:
        await asyncio.get_running_loop().connect_accepted_socket(
            lambda: proto, socket.socket(fileno=fd),
            ssl=tls.server_context() if tls else None)
    except ssl.SSLError as e:
        raise PeerError(f"TLS handshake with the sending peer failed: {e.reason}") from e
    return proto


async def run_incoming(workdir: Path, channel: Channel, netconf: NetConfig,
                       name: str | None = None, publish: list[str] | None = None,
                       tls: TLSFiles | None = None, held: HeldPackages | None = None) -> None:
    """Receive a VM and run it until it leaves or is stopped. `name` and `publish`
    replace the sender's (a registry's package has neither); `held`: the packages this
    peer holds, whose content the source need not send."""
    incoming = Incoming(channel, workdir, netconf, name, publish, held)
    received: asyncio.Task[object] = asyncio.create_task(incoming.destination.run())
    try:
        await _first(incoming.destination.ready.wait(), received)
        instance = await _first(incoming.setup(), received)
        instance.incoming = received
        instance.tls = tls
        async with _control(instance, incoming), instance.exposure():
            try:
                incoming.fill_memory()
                incoming.prepared = asyncio.create_task(incoming.prepare())
                incoming.started.set()
                watched = _or_failed(received, incoming)
                try:
                    await _first(incoming.resumed.wait(), watched)
                finally:
                    watched.cancel()  # it only watched; `received` is handled below
                log.info("%s resumed here %.1f ms after its pause on the source",
                         instance.spec.name, instance.info.get("downtime_ms") or 0.0)
                await instance.after_resume()
                await incoming.sync_on()
                await _serve(instance)
            finally:
                if incoming.prepared is not None:
                    incoming.prepared.cancel()
                await incoming.close()
                await instance.close()
    finally:
        if not received.done():
            received.cancel()
        with contextlib.suppress(BaseException):
            await received
        for cache in incoming.destination.devices.values():
            await cache.close()


class _Replay:
    """A channel whose first frame was read already (to tell a mirror from a migration)
    and is handed out once more by the first `recv`."""

    def __init__(self, channel: FrameProtocol, kind: MsgType, body: bytes) -> None:
        self.channel = channel
        self._first: tuple[MsgType, memoryview] | None = (kind, memoryview(body))
        self.bytes_sent = channel.bytes_sent
        self.bytes_received = channel.bytes_received

    def send(self, *parts: Buffer) -> None:
        self.channel.send(*parts)

    async def drain(self) -> None:
        await self.channel.drain()

    async def recv(self) -> tuple[MsgType, memoryview]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self.channel.recv()

    def limit_queue(self, nbytes: int) -> None:
        self.channel.limit_queue(nbytes)

    async def close(self) -> None:
        await self.channel.close()


async def run_accepted(workdir: Path, channel: FrameProtocol, netconf: NetConfig,
                       mirrors: Path | None, tls: TLSFiles | None,
                       held: HeldPackages | None) -> None:
    """A connection the peer accepted: a standby mirror (capability MIRROR in its HELLO)
    or a VM migrating in."""
    kind, body = await channel.recv()
    first = bytes(body)
    message = decode(kind, memoryview(first))
    if isinstance(message, Hello) and is_mirror(message):
        if mirrors is None:
            raise PeerError("this peer keeps no mirrors (no --mirrors)")
        await Standby(channel, workdir, mirrors, held).run()  # its HELLO is read
        return
    await run_incoming(workdir, _Replay(channel, kind, first), netconf, None, None, tls, held)


def _or_failed(received: asyncio.Task[object], incoming: Incoming) -> asyncio.Task[object]:
    """`received`, or a failure to prepare the VM here, whichever comes first: a source
    that waits for PREPARED learns why it will not come, and keeps its VM. Once authority
    has arrived, the failure is the authority handler's to answer (it declines)."""
    async def watch() -> object:
        assert incoming.prepared is not None
        await asyncio.wait([received, incoming.prepared], return_when=asyncio.FIRST_COMPLETED)
        if received.done():
            return received.result()
        if (not incoming.prepared.cancelled() and incoming.prepared.exception() is not None
                and not incoming.destination.authority_arrived):
            error = incoming.prepared.exception()
            await incoming.destination.abort(f"the destination cannot start the VM: {error}")
            raise PeerError(f"cannot start the incoming VM: {error}") from error
        return await asyncio.shield(received)  # cancelling the watch leaves it running
    return asyncio.create_task(watch())


async def run_from(address: Address, name: str, publish: list[str],
                   tls: TLSFiles | None = None) -> None:
    """`roam run --from`: a lazy start from a registry in this process, reachable by
    `roam exec NAME` and `roam ls` like any `roam run`; SIGINT or SIGTERM discards it."""
    control.check_name(name)
    workdir = control.run_root() / name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        netconf = NetConfig(directory=net_state_dir(), prefix="roam")
        await netconf.host().sweep()
        await run_incoming(workdir, await connect(address, tls), netconf, name, publish)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="roam.peer.worker")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--package", type=Path)
    parser.add_argument("--name")
    parser.add_argument("--publish", action="append", default=[])
    parser.add_argument("--net", required=True, help="the peer's NetConfig, as JSON")
    parser.add_argument("--overlay", help="the VM's OverlaySpec, as JSON")
    parser.add_argument("--incoming-fd", type=int)
    parser.add_argument("--packages", type=Path,
                        help="the peer's record of the packages it holds (HeldPackages)")
    parser.add_argument("--mirrors", type=Path,
                        help="where the peer keeps standby mirrors (roam.peer.mirrored)")
    parser.add_argument("--epoch", type=int, default=0,
                        help="the authority epoch the VM runs under (a promotion's)")
    parser.add_argument("--from", dest="registry", help="a registry to start lazily from")
    parser.add_argument("--incoming-tls", action="store_true",
                        help="the incoming connection is a migration: require mutual TLS")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-ca", type=Path)
    parser.add_argument("--log-level", default="INFO", choices=logging.getLevelNamesMapping(),
                        help="the peer's (roam -v / -q / --log-level)")
    args = parser.parse_args()
    tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    netconf = NetConfig.model_validate_json(args.net)
    overlay = OverlaySpec.model_validate_json(args.overlay) if args.overlay else None
    held = HeldPackages(args.packages) if args.packages else None
    logs.configure(logging.getLevelNamesMapping()[args.log_level])
    if args.registry is not None:
        async def lazy() -> None:
            # A registry is a server: connect as a client, with the peer's TLS files.
            channel = await connect(Address.parse(args.registry), tls)
            await run_incoming(args.workdir, channel, netconf, args.name,
                               args.publish or None, tls, held)
        uvloop.run(lazy())
    elif args.incoming_fd is not None:
        async def incoming() -> None:
            channel = await accepted(args.incoming_fd, tls if args.incoming_tls else None)
            await run_accepted(args.workdir, channel, netconf, args.mirrors, tls, held)
        uvloop.run(incoming())
    elif args.package is not None and args.name:
        uvloop.run(run_package(args.workdir, args.package, args.name, args.publish, netconf,
                               overlay, tls, args.epoch))
    else:
        parser.error("give --incoming-fd, --from, or --package and --name")


if __name__ == "__main__":
    main()

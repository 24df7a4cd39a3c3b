"""`roam peer serve`: the per-host supervisor of VM workers.

It accepts migration connections on its listen address and hands each one, as a file
descriptor, to a new worker process that receives the VM; it starts workers for
`roam peer run`; it answers the local control socket `STATE_DIR/peer.sock` (run, ls,
info, exec, migrate, stop) by forwarding to the worker that runs the named VM. It holds
the overlay gateways of this host itself (`gateway`): they outlive the VMs' visits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from roam import hypervisor
from roam.migration.channel import Address, TLSFiles
from roam.network.forward import PortForward
from roam.network.overlay import OverlaySpec
from roam.network.vmnet import VmNetwork
from roam.peer.errors import PeerError
from roam.peer.network import NetConfig
from roam.vm import control

log = logging.getLogger("roam.peer")

PEER_SOCKET = "peer.sock"
START_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 3600.0
LIVE = ("starting", "incoming", "running", "migrating", "paused", "in-doubt", "handed-over")


class Worker:
    def __init__(self, workdir: Path, process: asyncio.subprocess.Process) -> None:
        self.workdir = workdir
        self.process = process

    @property
    def socket(self) -> Path:
        return self.workdir / control.SOCKET

    async def call(self, method: str, params: control.Json | None = None,
                   timeout: float = 10.0) -> control.Json:  # noqa: ASYNC109
        return await control.call_path(self.socket, method, params, timeout,
                                       self.workdir.name)

    def log_tail(self) -> str:
        path = self.workdir / "worker.log"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return "\n".join(lines[-8:])


class Peer:
    def __init__(self, state_dir: Path, listen: Address, tls: TLSFiles | None = None,
                 netconf: NetConfig | None = None) -> None:
        self.state_dir = state_dir
        self.listen = listen
        self.netconf = netconf or NetConfig(directory=state_dir / "net",
                                            prefix=NetConfig.default_prefix(state_dir))
        self.gateways: dict[str, tuple[OverlaySpec, list[PortForward], VmNetwork]] = {}
        self.tls = tls  # migrations in and out use mutual TLS with these files
        self.vms_dir = state_dir / "vms"
        self.workers: dict[Path, Worker] = {}
        self._ids = itertools.count(1)
        self._reapers: set[asyncio.Task[None]] = set()

    async def serve(self, stop: asyncio.Event) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.vms_dir, ignore_errors=True)
        self.vms_dir.mkdir()
        await self._sweep()
        listener = _listening_socket(self.listen)
        control_server = await control.serve(self.state_dir / PEER_SOCKET, {
            "run": self._run, "ls": self._ls, "info": self._forward("info"),
            "exec": self._forward("exec", 600.0), "stop": self._stop,
            "resume": self._forward("resume", 60.0), "gateway": self._gateway,
            "migrate": self._forward("migrate", MIGRATE_TIMEOUT)})
        accepting = asyncio.create_task(self._accept(listener))
        log.info("peer serving %s, control socket %s", self.listen,
                 self.state_dir / PEER_SOCKET)
        try:
            await stop.wait()
        finally:
            accepting.cancel()
            control_server.close()
            listener.close()
            for worker in list(self.workers.values()):
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
            if self._reapers:
                await asyncio.wait(self._reapers, timeout=30)
            for name in list(self.gateways):
                await self._remove_gateway(name)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, peer = await loop.sock_accept(listener)
            log.info("incoming migration from %s", peer or "a local peer")
            try:
                tls = ["--incoming-tls"] if self.tls else []
                await self._spawn(["--incoming-fd", str(conn.fileno()), *tls], conn.fileno())
            except OSError as exc:
                log.error("cannot start a worker for an incoming migration: %s", exc)
            finally:
                conn.close()

    async def _spawn(self, args: list[str], fd: int | None = None) -> Worker:
        workdir = self.vms_dir / str(next(self._ids))
        workdir.mkdir()
        args = [*args, "--net", self.netconf.model_dump_json()]
        if self.tls:
            args = [*args, "--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key),
                    "--tls-ca", str(self.tls.ca)]
        with (workdir / "worker.log").open("ab") as out:
            # Dies with the peer, and QEMU with the worker (see QemuVM.start).
            process = await asyncio.create_subprocess_exec(
                "setpriv", "--pdeathsig", "TERM", sys.executable, "-m", "roam.peer.worker",
                "--workdir", str(workdir), *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out, pass_fds=() if fd is None else (fd,))
        worker = Worker(workdir, process)
        self.workers[workdir] = worker
        reaper = asyncio.create_task(self._reap(worker))
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)
        return worker

    async def _reap(self, worker: Worker) -> None:
        code = await worker.process.wait()
        self.workers.pop(worker.workdir, None)
        # A worker that was killed left its FUSE mount (the kernel keeps a dead daemon's
        # mount until it is unmounted) and its VM's network behind: remove them now.
        await hypervisor.driver().sweep(worker.workdir)
        await self._sweep()
        if code == 0:
            shutil.rmtree(worker.workdir, ignore_errors=True)
        else:
            log.warning("worker %s exited with %d (files kept):\n%s", worker.workdir.name,
                        code, worker.log_tail())

    async def _sweep(self) -> None:
        """Remove the VM networks whose owners (a worker, an earlier peer) are dead."""
        swept = await self.netconf.host().sweep()
        if swept:
            log.warning("removed the networks a dead process left for %s", ", ".join(swept))

    async def _infos(self) -> list[tuple[Worker, control.Json]]:
        found = []
        for worker in list(self.workers.values()):
            with contextlib.suppress(control.ControlError, OSError, ValueError):
                found.append((worker, await worker.call("info", timeout=5.0)))
        return found

    async def _find(self, name: str) -> Worker:
        for worker, info in await self._infos():
            if info.get("name") == name and info.get("state") in LIVE:
                return worker
        raise PeerError(f"no VM called {name!r} on this peer")

    # -- control handlers ------------------------------------------------------------

    async def _run(self, params: control.Json) -> control.Json:
        name = str(params["name"])
        control.check_name(name)
        if any(i.get("name") == name and i.get("state") in LIVE for _, i in await self._infos()):
            raise PeerError(f"a VM called {name!r} already runs on this peer")
        args = ["--name", name]
        for spec in params.get("publish", []):
            args += ["--publish", str(spec)]
        if params.get("gateway") is not None:
            overlay = OverlaySpec(vni=int(params["vni"]), gateway=str(params["gateway"]))
            self.netconf.segment(overlay)  # this peer must be on the overlay
            if params.get("publish"):
                raise PeerError("a VM on an overlay publishes its ports on its gateway "
                                "(`roam peer gateway --publish`), not with --publish")
            args += ["--overlay", overlay.model_dump_json()]
        if params.get("from"):  # lazy start from a registry (with our TLS files, if any)
            registry = Address.parse(str(params["from"]))
            worker = await self._spawn([*args, "--from", str(registry)])
        else:
            worker = await self._spawn(
                [*args, "--package", str(Path(params["package"]).resolve())])
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if worker.process.returncode is not None:
                raise PeerError(f"{name} did not start:\n{worker.log_tail()}")
            with contextlib.suppress(control.ControlError, OSError, ValueError):
                info = await worker.call("info", timeout=2.0)
                if info.get("state") == "running" and info.get("ready"):
                    return info
            await asyncio.sleep(0.1)
        raise PeerError(f"{name} not running after {START_TIMEOUT} s")

    async def _ls(self, _: control.Json) -> control.Json:
        return {"vms": [info for _, info in await self._infos()],
                "gateways": [self._gateway_info(name) for name in self.gateways]}

    def _gateway_info(self, name: str) -> control.Json:
        overlay, forwards, net = self.gateways[name]
        return {"name": name, **overlay.model_dump(), "netns": net.netns,
                "publish": [asdict(f) for f in forwards]}

    async def _gateway(self, params: control.Json) -> control.Json:
        """Add (or with `remove`, remove) the gateway of overlay VM `name` on this host."""
        name = str(params["name"])
        if params.get("remove"):
            if name not in self.gateways:
                raise PeerError(f"no gateway for {name!r} on this peer")
            await self._remove_gateway(name)
            return {}
        control.check_name(name)
        if name in self.gateways:
            raise PeerError(f"this peer already is the gateway of {name!r}")
        if self.netconf.underlay is None:
            raise PeerError("a gateway needs this peer's --underlay address")
        overlay = OverlaySpec(vni=int(params["vni"]), gateway=self.netconf.underlay)
        if any(o.vni == overlay.vni for o, _, _ in self.gateways.values()):
            raise PeerError(f"segment {overlay.vni} already has a gateway here")
        forwards = [PortForward.parse(str(p)) for p in params.get("publish", [])]
        net = await self.netconf.gateway(name, overlay, forwards)
        self.gateways[name] = (overlay, forwards, net)
        log.info("gateway of %s (segment %d) up; publishing %s", name, overlay.vni,
                 ", ".join(str(p) for p in params.get("publish", [])) or "nothing")
        return self._gateway_info(name)

    async def _remove_gateway(self, name: str) -> None:
        _, _, net = self.gateways.pop(name)
        await self.netconf.host().down(net)

    async def _stop(self, params: control.Json) -> control.Json:
        worker = await self._find(str(params["name"]))
        await worker.call("stop")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.process.wait(), 30)
        return {}

    def _forward(self, method: str, timeout: float = 10.0) -> control.Handler:
        async def forward(params: control.Json) -> control.Json:
            worker = await self._find(str(params["name"]))
            return await worker.call(method, params, timeout)
        return forward


def _listening_socket(address: Address) -> socket.socket:
    sock: socket.socket
    if address.scheme == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.path)
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def peer_socket(via: str) -> Path:
    """A peer's control socket from its state directory or the socket's own path."""
    path = Path(via)
    return path / PEER_SOCKET if path.is_dir() else path


async def call(via: str, method: str, params: dict[str, Any] | None = None,
               timeout: float = 60.0) -> control.Json:  # noqa: ASYNC109
    return await control.call_path(peer_socket(via), method, params, timeout, "peer")

"""A real guest moved between lab hosts: QEMU on each host's tap, device state handed over.

The hosts of the lab share this machine's files, so the guest's memory (a shared file
mapping) and disk need no copying: a handover is the device state only, as with the
engine's devices after pre-copy. Per hop, in the order the migration peer will follow:
the destination's runner network and its QEMU (paused, `-incoming`) first, then the
source's redirect, pause, state save, load on the destination, cont, announce-self, and
last the source's QEMU and network go. Used by the real-VM test and bench/net_blackout.py,
with the redis client that both use.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from roam.guest.client import GuestClient, fresh_session
from roam.hypervisor import Nic
from roam.hypervisor.accel import Accel
from roam.hypervisor.qemu.cmdline import FileDisk, QemuConfig
from roam.hypervisor.qemu.machine import announce, nic_args
from roam.hypervisor.qemu.process import QemuVM
from roam.network import overlay
from roam.network.forward import PortForward
from roam.network.leases import Leases
from roam.network.vmnet import HostNetwork, Segment, VmNetwork
from roam.storage.sources import SparseFileSource
from roam.vm.package import Package
from tests.blueprint.boot import short_dir
from tests.network.lab import Lab

INTERVAL = 0.02  # between a client's requests
KEY = "roam:handover"
VNI = 200
GATEWAY_MAC = "02:52:00:00:00:c8"
GATEWAY, HOSTS = "c", ("a", "b")


@contextlib.contextmanager
def vm_files(snapshot: Path, into: Path) -> Iterator[Package]:
    """A copy of the package (memory and disk are written by the guest), removed after."""
    copy = into / "pkg"
    subprocess.run(["cp", "-a", "--sparse=always", str(snapshot), str(copy)], check=True)
    try:
        yield Package.load(copy)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@dataclass
class RedisWriter:
    """One connection; RPUSH a number every INTERVAL and check the list length it answers."""

    sock: socket.socket
    acked: int = 0
    replies: list[float] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.file = self.sock.makefile("rb")

    def command(self, *words: str) -> bytes:
        self.sock.sendall(
            f"*{len(words)}\r\n".encode()
            + b"".join(f"${len(w)}\r\n{w}\r\n".encode() for w in words))
        return self.file.readline()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                reply = self.command("RPUSH", KEY, str(self.acked))
                assert reply == f":{self.acked + 1}\r\n".encode(), reply  # none lost
                self.acked += 1
                self.replies.append(time.monotonic())
                time.sleep(INTERVAL)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()
        if self.error is not None:
            raise self.error


@dataclass
class Hop:
    """One handover's figures, in ms: QMP stop on the source to cont done on the
    destination, and the destination's QEMU start (outside the pause)."""

    source: str
    dest: str
    downtime_ms: float
    prepare_ms: float
    paused_at: float  # time.monotonic() at the pause


class MovingVM:
    """The package's guest on the lab's segment, gateway on host c, running on a or b."""

    def __init__(self, net_lab: Lab, package: Package, state_dir: Path) -> None:
        self.lab = net_lab
        self.package = package
        self.state_dir = state_dir
        self.name = net_lab.tag  # namespaces are machine-wide: apart from other labs'
        self.hosts = {role: HostNetwork(Leases(state_dir / f"net-{role}"), prefix="m" + role,
                                        netns=net_lab.nodes[role])
                      for role in (*HOSTS, GATEWAY)}
        self.gateway: VmNetwork | None = None
        self.where = ""
        self.net: VmNetwork | None = None
        self.qemu: QemuVM | None = None
        self._dirs = contextlib.ExitStack()
        self._states = 0

    def segment(self, role: str) -> Segment:
        return Segment(VNI, self.lab.addrs[role], self.lab.addrs[GATEWAY],
                       tuple(self.lab.addrs[h] for h in HOSTS), GATEWAY_MAC)

    @property
    def mac(self) -> str:
        return self.package.config.mac

    async def open_gateway(self, forwards: list[PortForward]) -> None:
        """The VM's fixed end: its published ports and its egress, on host c."""
        self.gateway = await self.hosts[GATEWAY].gateway(self.name, self.segment(GATEWAY),
                                                         forwards)

    async def _prepare(self, role: str) -> tuple[VmNetwork, QemuVM]:
        """The runner network on `role` and a QEMU there waiting for the device state."""
        net = await self.hosts[role].runner(self.name, self.segment(role))
        assert net.tap_fd is not None
        workdir = self._dirs.enter_context(short_dir())
        qemu = QemuVM(self._config(workdir, Nic.tap(net.tap_fd)), workdir / "qemu.log")
        try:
            await qemu.start(incoming=True)
        except BaseException:
            await self.hosts[role].down(net)
            raise
        return net, qemu

    def _config(self, workdir: Path, nic: Nic) -> QemuConfig:
        config = self.package.config
        files = self.package.directory
        return QemuConfig(
            kernel=files / config.files.kernel,
            initramfs=None if config.files.initramfs is None else files / config.files.initramfs,
            cmdline=config.cmdline, memory_mib=config.memory_mib,
            mem_path=self.package.path(config.files.memory),
            disks=[FileDisk(self.package.path(config.files.disk))],
            agent_socket=workdir / "agent.sock", qmp_socket=workdir / "qmp.sock",
            console_log=workdir / "console.log",
            accel=Accel(config.accel, "the package was snapshotted under it"),
            cpus=config.cpus, machine=config.machine, cpu_model=config.cpu_model,
            extra_args=nic_args(config.mac, nic), pass_fds=(nic.tap_fd,) if nic.tap_fd else ())

    def _state(self, name: str, create: bool) -> SparseFileSource:
        return SparseFileSource(self.state_dir / name, self.package.config.state_size,
                                create=create)

    async def start(self, role: str) -> None:
        """Resume the package on host `role` and wait for its agent."""
        self.net, self.qemu = await self._prepare(role)
        self.where = role
        state = SparseFileSource(self.package.path(self.package.config.files.state),
                                 self.package.config.state_size, create=False)
        try:
            await self.qemu.load_state(state)
        finally:
            await state.close()
        await self.qemu.resume()
        await announce(self.qemu)
        agent = await self.qemu.guard(fresh_session(self._agent_connect))
        try:
            await self.qemu.guard(agent.after_resume())
        finally:
            await agent.close()

    async def _agent_connect(self) -> GuestClient:
        assert self.qemu is not None
        return await GuestClient.connect(self.qemu.config.agent_socket)

    async def guest_sh(self, command: str) -> str:
        """Run `command` in the guest (where it runs now); its stdout."""
        assert self.qemu is not None
        agent = await self.qemu.guard(fresh_session(self._agent_connect))
        try:
            result = await agent.exec(["sh", "-c", command])
        finally:
            await agent.close()
        assert result.exit_code == 0, result
        return result.stdout

    async def move(self, dest: str, *, redirect: bool = True) -> Hop:
        """Hand the guest over to host `dest` (see the module docstring for the order);
        without `redirect`, frames reaching the source during the pause are lost."""
        assert self.qemu is not None and self.net is not None
        started = time.monotonic()
        dest_net, dest_qemu = await self._prepare(dest)
        prepared = time.monotonic()
        self._states += 1
        state = self._state(f"state{self._states}", create=True)
        try:
            if redirect:
                await overlay.redirect(self.net, self.mac, self.lab.addrs[dest])
            paused = time.monotonic()
            await self.qemu.pause()
            await self.qemu.save_state(state)
            await dest_qemu.load_state(state)
            await dest_qemu.resume()
            resumed = time.monotonic()
            await announce(dest_qemu)
        finally:
            await state.close()
        hop = Hop(self.where, dest, 1000 * (resumed - paused), 1000 * (prepared - started),
                  paused)
        await self.qemu.stop()
        await self.hosts[self.where].down(self.net)
        self.net, self.qemu, self.where = dest_net, dest_qemu, dest
        return hop

    async def close(self) -> None:
        if self.qemu is not None:
            await self.qemu.stop()
        if self.net is not None:
            await self.hosts[self.where].down(self.net)
        if self.gateway is not None:
            await self.hosts[GATEWAY].down(self.gateway)
        self._dirs.close()

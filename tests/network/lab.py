"""The lab's helpers (roam.network.lab: hosts as namespaces), and a stand-in for a guest.

FakeGuest does what QEMU does with a tap descriptor (move frames between it and the
guest) with a namespace as the guest: its own tap, the guest's address and MAC. Detaching
it is a paused QEMU (frames queue in the host's tap); attaching it to another host's tap
is a handover, the guest's TCP state staying put as a VM's moves with its memory.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import IPRoute

from roam.network import ns
from roam.network.guest import GATEWAY, GUEST
from roam.network.lab import Lab, lab
from roam.network.tap import open_tap

T = TypeVar("T")
__all__ = ["Lab", "lab"]

GUEST_MAC = "52:54:00:12:34:56"


def in_ns(name: str, function: Callable[[], T]) -> T:
    return ns.call_in(name, function)


def connect(name: str, addr: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from namespace `name` (a socket keeps its namespace)."""
    return in_ns(name, lambda: socket.create_connection((addr, port), timeout=timeout))


def udp_socket(name: str) -> socket.socket:
    return in_ns(name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))


class EchoServer:
    """Echo lines over TCP and datagrams over UDP in namespace `name`; remembers peers."""

    def __init__(self, name: str, port: int) -> None:
        self.peers: list[str] = []
        self.tcp = in_ns(name, lambda: socket.create_server(("0.0.0.0", port)))
        self.udp = udp_socket(name)
        self.udp.bind(("0.0.0.0", port))
        self._threads = [threading.Thread(target=self._accept, daemon=True),
                         threading.Thread(target=self._datagrams, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, peer = self.tcp.accept()
                self.peers.append(peer[0])
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def _datagrams(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                data, peer = self.udp.recvfrom(65536)
                if peer is None:  # shut down
                    return
                self.peers.append(peer[0])
                self.udp.sendto(data, peer)

    def close(self) -> None:
        for sock in (self.tcp, self.udp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _arp_announce(mac: str, ip: str) -> bytes:
    """A gratuitous ARP from the guest: what announce-self's frames do for learning."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = socket.inet_aton(ip)
    return (b"\xff" * 6 + hw + b"\x08\x06"
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + addr + b"\x00" * 6 + addr)


class FakeGuest:
    """A namespace behind a tap, wired to a host's tap descriptor like QEMU (see module)."""

    def __init__(self, name: str, mac: str = GUEST_MAC) -> None:
        self.name = name
        self.mac = mac
        ns.create(name)
        self.fd = open_tap(name, "eth0")
        with IPRoute(netns=name) as guest:
            guest.link("set", index=guest.link_lookup(ifname="lo")[0], state="up")
            eth = guest.link_lookup(ifname="eth0")[0]
            guest.link("set", index=eth, address=mac, state="up")
            guest.addr("add", index=eth, address=str(GUEST.ip), prefixlen=GUEST.network.prefixlen)
            guest.route("add", dst="0.0.0.0/0", gateway=str(GATEWAY.ip))
        self._host_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe()

    def attach(self, host_fd: int) -> None:
        """Start moving frames (the VM runs on the host owning `host_fd`)."""
        self._host_fd = host_fd
        self._thread = threading.Thread(target=self._pump, args=(host_fd,), daemon=True)
        self._thread.start()

    def announce(self) -> None:
        assert self._host_fd is not None
        os.write(self._host_fd, _arp_announce(self.mac, str(GUEST.ip)))

    def detach(self) -> None:
        """Stop moving frames (the VM is paused); they queue in both taps meanwhile."""
        if self._thread is None:
            return
        os.write(self._stop_w, b"x")
        self._thread.join()
        os.read(self._stop_r, 1)
        self._thread = None
        self._host_fd = None

    def _pump(self, host_fd: int) -> None:
        peer = {host_fd: self.fd, self.fd: host_fd}
        while True:
            ready, _, _ = select.select([host_fd, self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            for fd in ready:
                with contextlib.suppress(OSError):
                    os.write(peer[fd], os.read(fd, 65536))

    def close(self) -> None:
        self.detach()
        os.close(self.fd)
        os.close(self._stop_r)
        os.close(self._stop_w)
        ns.remove(self.name)

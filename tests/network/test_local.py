"""Per-VM networking on one host: namespace, tap, NAT and port forwards, with real traffic."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from roam.network.forward import PortForward
from roam.network.leases import Leases
from roam.network.vmnet import HostNetwork
from tests.network.lab import EchoServer, FakeGuest, Lab, connect, udp_socket


def _host(net_lab: Lab, role: str, tmp_path: Path) -> HostNetwork:
    return HostNetwork(Leases(tmp_path / role), prefix="v" + role, netns=net_lab.nodes[role])


def _echo(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line)
    return sock.recv(1024)


def test_parse_publish() -> None:
    assert PortForward.parse("8080:80") == PortForward(8080, 80, "127.0.0.1", "tcp")
    assert PortForward.parse("0.0.0.0:53:5353/udp") == PortForward(53, 5353, "0.0.0.0", "udp")
    for bad in ("80", "0:80", "x:1:2", "1:2/sctp", "70000:1"):
        with pytest.raises(ValueError):
            PortForward.parse(bad)


async def test_forwards_and_outbound_nat(net_lab: Lab, guest: FakeGuest, tmp_path: Path) -> None:
    host = _host(net_lab, "a", tmp_path)
    host_addr = net_lab.addrs["a"]
    forwards = [PortForward.parse("8080:7"), PortForward.parse(f"{host_addr}:8081:7"),
                PortForward.parse(f"{host_addr}:8082:7/udp")]
    net = await host.local("vm1", forwards)
    server = EchoServer(guest.name, 7)
    outside = EchoServer(net_lab.nodes["k"], 9)
    try:
        assert net.tap_fd is not None
        guest.attach(net.tap_fd)
        # Loopback forward, from the host itself.
        with connect(net_lab.nodes["a"], "127.0.0.1", 8080) as sock:
            assert _echo(sock, b"loopback\n") == b"loopback\n"
        # A forward on the host's address, from a client on another host.
        with connect(net_lab.nodes["k"], host_addr, 8081) as sock:
            assert _echo(sock, b"remote\n") == b"remote\n"
        # UDP.
        with udp_socket(net_lab.nodes["k"]) as udp:
            udp.settimeout(5)
            udp.sendto(b"datagram", (host_addr, 8082))
            assert udp.recvfrom(1024)[0] == b"datagram"
        # The loopback forward is not reachable from outside.
        with pytest.raises(OSError):
            connect(net_lab.nodes["k"], host_addr, 8080, timeout=1).close()
        # Outbound: the guest reaches a server elsewhere, which sees the host's address.
        with connect(guest.name, net_lab.addrs["k"], 9) as sock:
            assert _echo(sock, b"out\n") == b"out\n"
        assert outside.peers[-1] == host_addr
    finally:
        guest.detach()
        server.close()
        outside.close()
        await host.down(net)
    _assert_clean(net_lab, host)


def _assert_clean(net_lab: Lab, host: HostNetwork) -> None:
    """Nothing of the host's VM networks is left: namespaces, links, tables, leases."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{host.prefix}-" not in names
    assert host.netns is not None
    links = subprocess.run(["ip", "-n", host.netns, "-o", "link"], capture_output=True,
                           text=True, check=True).stdout
    assert f"{host.prefix}0" not in links
    tables = subprocess.run(["ip", "netns", "exec", host.netns, "nft", "list", "tables"],
                            capture_output=True, text=True, check=True).stdout
    assert tables.strip() == ""
    with host.leases.locked():
        assert host.leases.all() == []

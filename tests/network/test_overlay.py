"""A migratable VM's segment: gateway ingress and egress, and handovers A -> B -> A.

The guest is a FakeGuest (lab.py): its TCP state stays in its namespace while its wire
moves from one host's tap to the other's, as a VM's moves with its memory. Between the
detach and the attach the guest is "paused": frames for it either queue in the
destination's tap (after the redirect) or are lost.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from roam.network import overlay
from roam.network.forward import PortForward
from roam.network.leases import Leases
from roam.network.vmnet import HostNetwork, Segment, VmNetwork
from tests.network.lab import GUEST_MAC, EchoServer, FakeGuest, Lab, connect

VNI = 100
GATEWAY_MAC = "02:52:00:00:00:64"
INTERVAL = 0.02
PAUSE = 0.05  # stands for the device-state transfer


@dataclass
class Talker:
    """One connection, a numbered line every INTERVAL, each answer checked in order."""

    sock_factory: object
    gaps: list[float] = field(default_factory=list)
    sent: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            assert callable(self.sock_factory)
            with self.sock_factory() as sock:
                sock.settimeout(10)
                last = time.monotonic()
                while not self.stop.is_set():
                    line = f"{self.sent}\n".encode()
                    sock.sendall(line)
                    got = b""
                    while not got.endswith(b"\n"):
                        chunk = sock.recv(64)
                        assert chunk, "connection closed"
                        got += chunk
                    assert got == line, (got, line)  # nothing lost, nothing reordered
                    self.sent += 1
                    now = time.monotonic()
                    self.gaps.append(now - last)
                    last = now
                    time.sleep(INTERVAL)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> float:
        """Stop; the longest wait between two answers, in ms (raises what went wrong)."""
        self.stop.set()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return 1000 * max(self.gaps)


def _segment(net_lab: Lab, role: str) -> Segment:
    return Segment(VNI, net_lab.addrs[role], net_lab.addrs["c"],
                   (net_lab.addrs["a"], net_lab.addrs["b"]), GATEWAY_MAC)


def _host(net_lab: Lab, role: str, tmp_path: Path) -> HostNetwork:
    return HostNetwork(Leases(tmp_path / role), prefix="o" + role, netns=net_lab.nodes[role])


async def test_connections_survive_handovers(net_lab: Lab, guest: FakeGuest,
                                             tmp_path: Path) -> None:
    hosts = {role: _host(net_lab, role, tmp_path) for role in "abc"}
    gateway_addr = net_lab.addrs["c"]
    gateway = await hosts["c"].gateway("vm", _segment(net_lab, "c"),
                                       [PortForward.parse(f"{gateway_addr}:6379:7")])
    running: dict[str, VmNetwork] = {}
    in_guest = EchoServer(guest.name, 7)
    outside = EchoServer(net_lab.nodes["k"], 9)
    try:
        running["a"] = await hosts["a"].runner("vm", _segment(net_lab, "a"))
        assert running["a"].tap_fd is not None
        guest.attach(running["a"].tap_fd)
        guest.announce()
        inbound = Talker(lambda: connect(net_lab.nodes["k"], gateway_addr, 6379))
        outbound = Talker(lambda: connect(guest.name, net_lab.addrs["k"], 9))
        inbound.thread.start()
        outbound.thread.start()
        await asyncio.sleep(0.3)
        assert outside.peers == [gateway_addr]  # egress leaves from the gateway
        for source, dest in (("a", "b"), ("b", "a")):
            running[dest] = await hosts[dest].runner("vm", _segment(net_lab, dest))
            # Just before the pause: from here on, frames for the guest queue at the
            # destination's tap.
            await overlay.redirect(running[source], GUEST_MAC, net_lab.addrs[dest])
            guest.detach()  # pause
            await asyncio.sleep(PAUSE)
            tap_fd = running[dest].tap_fd
            assert tap_fd is not None
            guest.attach(tap_fd)  # resume on the destination
            guest.announce()
            await hosts[source].down(running.pop(source))
            await asyncio.sleep(0.3)
        longest_in, longest_out = inbound.finish(), outbound.finish()
        print(f"\nlongest gap between answers over A->B->A: inbound {longest_in:.0f} ms, "
              f"outbound {longest_out:.0f} ms ({inbound.sent} and {outbound.sent} lines)")
        assert len(in_guest.peers) == 1 and len(outside.peers) == 1  # one connection each
    finally:
        guest.detach()
        in_guest.close()
        outside.close()
        for role, net in running.items():
            await hosts[role].down(net)
        await hosts["c"].down(gateway)

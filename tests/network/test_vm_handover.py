"""A real guest with redis moves A -> B -> A under one client connection in and one out.

The session's snapshot (tests/vm) runs on lab hosts a and b behind its gateway on c
(vmhop.py); a client in namespace k writes to redis through the gateway's published port
over one TCP connection, and the guest holds one connection to an echo server in k that
leaves through the gateway. Both are checked line by line: every acknowledged write is in
redis at the end, in order, and every echoed line came back on the same connection. The
longest wait between replies is printed, not asserted (the machine is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from pathlib import Path

from roam.network.forward import PortForward
from tests.network.lab import Lab, connect, in_ns
from tests.network.vmhop import GATEWAY, INTERVAL, KEY, MovingVM, RedisWriter, vm_files
from tests.vm.conftest import snapshot

__all__ = ["snapshot"]

REDIS = 6379
ECHO = 9


class EchoRecorder:
    """In namespace k: accepts the guest's connection, echoes it, and notes when each
    numbered line arrived (the guest's clock stops while it is paused; ours does not)."""

    def __init__(self, netns: str) -> None:
        self.server = in_ns(netns, lambda: socket.create_server(("0.0.0.0", ECHO)))
        self.peers: list[str] = []
        self.connected = threading.Event()
        self.arrivals: list[float] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, peer = self.server.accept()
            self.peers.append(peer[0])
            self.connected.set()
            with conn, conn.makefile("rwb", buffering=0) as stream:
                for number, line in enumerate(stream):
                    assert line == f"{number}\n".encode(), (number, line)
                    self.arrivals.append(time.monotonic())
                    stream.write(line)
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.close()


# The guest's side of the outbound connection: a numbered line every INTERVAL, each
# echo checked; it ends when the connection does.
GUEST_CLIENT = f"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], {ECHO}))
f = s.makefile("rwb", buffering=0)
n = 0
while True:
    f.write(b"%d\\n" % n)
    assert f.readline() == b"%d\\n" % n
    n += 1
    time.sleep({INTERVAL})
"""


def longest_gap_ms(times: list[float], since: float) -> float:
    later = [t for t in times if t >= since]
    return 1000 * max(b - a for a, b in itertools.pairwise(later))


async def test_redis_vm_keeps_connections_over_a_b_a(net_lab: Lab, snapshot: Path,
                                                      tmp_path: Path) -> None:
    gateway_addr = net_lab.addrs[GATEWAY]
    with vm_files(snapshot, tmp_path) as package:
        vm = MovingVM(net_lab, package, tmp_path)
        outside = EchoRecorder(net_lab.nodes["k"])
        writer: RedisWriter | None = None
        try:
            await vm.open_gateway([PortForward.parse(f"{gateway_addr}:{REDIS}:{REDIS}")])
            await vm.start("a")
            await vm.guest_sh(f"cat > /tmp/client.py <<'EOF'\n{GUEST_CLIENT}\nEOF\n"
                              f"setsid python3 /tmp/client.py {net_lab.addrs['k']} "
                              ">/tmp/client.log 2>&1 </dev/null &")
            sock = await asyncio.to_thread(connect, net_lab.nodes["k"], gateway_addr, REDIS)
            sock.settimeout(10)
            writer = RedisWriter(sock)
            client_id = writer.command("CLIENT", "ID")
            writer.thread.start()
            # The guest's client starts in the background: wait for its connection
            # (seconds on a loaded machine) before the moves begin.
            assert await asyncio.to_thread(outside.connected.wait, 60), outside.error
            await asyncio.sleep(1.0)
            assert outside.peers == [gateway_addr]  # egress from the gateway host
            moving_since = time.monotonic()
            hops = [await vm.move("b"), await vm.move("a")]
            moved = time.monotonic()
            await asyncio.sleep(1.0)
            writer.finish()
            assert outside.error is None, outside.error
            assert outside.arrivals[-1] > moved  # the guest's connection went on after
            in_gap = longest_gap_ms(writer.replies, moving_since)
            out_gap = longest_gap_ms(outside.arrivals, moving_since)
            # The same connection throughout, and every acknowledged write is there.
            assert writer.command("CLIENT", "ID") == client_id
            assert writer.command("LLEN", KEY) == f":{writer.acked}\r\n".encode()
            assert len(outside.peers) == 1
            print(f"\nA->B->A with redis in the guest: downtime "
                  f"{', '.join(f'{h.downtime_ms:.0f}' for h in hops)} ms; longest wait "
                  f"between replies: inbound {in_gap:.0f} ms ({writer.acked} writes), "
                  f"outbound {out_gap:.0f} ms ({len(outside.arrivals)} lines)")
        finally:
            if writer is not None:
                writer.stop.set()
                writer.sock.close()
            outside.close()
            await vm.close()

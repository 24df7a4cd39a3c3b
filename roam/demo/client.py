"""The demo's redis client: writes a new key every few milliseconds, records the acked ones.

Runs inside the client's namespace (`python -m roam.demo.client write|verify ...`). It
speaks RESP over a plain socket, so the demo needs no redis library. It keeps one
connection for the whole run; should that connection break, it reconnects (and says so:
`connections` in its report), never reusing the key whose outcome it did not learn.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import time
from pathlib import Path

TIMEOUT = 30.0
"""Seconds to wait for redis's answer before giving the connection up: longer than a
node fences its VMs for while its control plane restarts (roam.control.fence pauses
them after a lease TTL without it, until it answers again), as a client of a VM that
must keep its connections would wait."""
GAP = 0.05  # seconds between acknowledgements worth reporting


def command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Redis:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")

    def call(self, *args: str) -> object:
        self.sock.sendall(command(*args))
        return self._reply()

    def _reply(self) -> object:
        line = self.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise ConnectionError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)[:-2]
            return data.decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise ConnectionError(f"unexpected reply {line!r}")

    def retransmits(self) -> int:
        """TCP segments this connection sent again (tcp_info's tcpi_total_retrans): a
        handover that loses packets makes the client wait for a retransmission."""
        info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return int(struct.unpack_from("I", info, 100)[0])

    def close(self) -> None:
        self.sock.close()


def write(host: str, port: int, out: Path, interval: float) -> None:
    """Until SIGTERM: SET demo:N N, appending N to `out` once redis acknowledged it."""
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    conn: Redis | None = None
    connections = 0
    n = 0
    last_ack = time.monotonic()
    gaps: list[tuple[float, float]] = []  # (from, to) of every wait over GAP, monotonic
    with out.open("a") as acked:
        while running:
            if conn is None:
                try:
                    conn = Redis(host, port)
                    connections += 1
                except OSError:
                    time.sleep(0.01)
                    continue
            try:
                if conn.call("SET", f"demo:{n}", str(n)) == "OK":
                    acked.write(f"{n}\n")
                    acked.flush()
                    now = time.monotonic()
                    if now - last_ack > GAP:
                        gaps.append((last_ack, now))
                    last_ack = now
                n += 1
            except (OSError, ConnectionError):
                conn.close()
                conn = None
                n += 1  # the outcome of that write is unknown: never reuse its key
                continue
            time.sleep(interval)
    print(json.dumps({"gaps": gaps, "connections": connections,
                      "retransmits": 0 if conn is None else conn.retransmits()}))


def verify(host: str, port: int, acked_file: Path) -> None:
    """Print how many acknowledged keys are missing or wrong in redis."""
    keys = [int(line) for line in acked_file.read_text().split()]
    conn = Redis(host, port)
    lost = 0
    for start in range(0, len(keys), 500):
        batch = keys[start:start + 500]
        values = conn.call("MGET", *(f"demo:{k}" for k in batch))
        assert isinstance(values, list)
        lost += sum(1 for k, v in zip(batch, values, strict=True) if v != str(k))
    conn.close()
    print(json.dumps({"acked": len(keys), "lost": lost}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="roam.demo.client")
    sub = parser.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("write")
    w.add_argument("--host", required=True)
    w.add_argument("--port", type=int, default=6379)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--interval", type=float, default=0.005)
    v = sub.add_parser("verify")
    v.add_argument("--host", required=True)
    v.add_argument("--port", type=int, default=6379)
    v.add_argument("--acked", type=Path, required=True)
    args = parser.parse_args()
    if args.mode == "write":
        write(args.host, args.port, args.out, args.interval)
    else:
        verify(args.host, args.port, args.acked)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

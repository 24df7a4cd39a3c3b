"""Migration throughput vs raw loopback TCP, measured in the same run.

A device of random (incompressible) data moves over loopback TCP between two processes,
every run of blocks hashed (xxh3_128) and verified; then into a destination whose memory
is faulted in during the migration; then while a writer keeps changing it; then to a
destination that holds the same content already (it hashes its copy with blake3 when the
group arrives and offers it by HAVE: only names go over the wire). Prints throughput and
the ratio to raw TCP (sendall of 4 MiB buffers into a receiver that discards them),
measured right before each run.

    .venv/bin/python -m bench.migrate_throughput [--size-mib 1024] [--runs 3] [--block-kib 4]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import socket
import time
from multiprocessing.connection import Connection

import uvloop

from roam.migration.channel import Address, Channel, connect, listen
from roam.migration.destination import Destination, NewDevice
from roam.migration.source import Policy, Source, SourceDevice, SourceHooks
from roam.migration.wire import DeviceSpec
from roam.storage.sources import MemorySource

CHUNK = 4 * 1024 * 1024


def raw_tcp(size: int) -> float:
    """Seconds to push `size` bytes through loopback TCP with plain sockets."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def receive() -> None:
        conn, _ = server.accept()
        view = memoryview(bytearray(CHUNK))
        got = 0
        while got < size:
            n = conn.recv_into(view)
            if not n:
                break
            got += n
        conn.sendall(b"k")
        conn.close()

    proc = mp.Process(target=receive)
    proc.start()
    data = os.urandom(CHUNK)
    sock = socket.create_connection(("127.0.0.1", port))
    start = time.perf_counter()
    sent = 0
    while sent < size:
        sock.sendall(data)
        sent += CHUNK
    sock.recv(1)
    elapsed = time.perf_counter() - start
    sock.close()
    proc.join()
    server.close()
    return elapsed


def _receiver(port: int, size: int, populate: bool, holds: bool, out: Connection) -> None:
    async def serve() -> None:
        finished = asyncio.Event()
        # With `populate`, the destination's memory is faulted in before the migration
        # starts, as on a host that provisions ahead; otherwise page faults are timed too.
        ready = MemorySource(size, populate=True) if populate else None
        if holds:  # a copy of the content (a package it holds), offered by HAVE
            assert ready is not None
            await ready.write_at(0, await _random_source(size).read_at(0, size))

        async def make(spec: DeviceSpec) -> NewDevice:
            if holds:
                assert ready is not None  # hashed when the group arrives (no index)
                return NewDevice(ready, fresh=False, existing=True)
            return NewDevice(ready or MemorySource(spec.size))

        async def handler(ch: Channel) -> None:
            result = await Destination(ch, make).run()
            out.send((result.integrity_errors, result.verified_blocks))
            finished.set()

        server = await listen(Address("tcp", "127.0.0.1", port), handler)
        out.send("listening")
        await finished.wait()
        server.close()

    uvloop.run(serve())


def roam_migration(size: int, writer_mib_s: float, populate: bool,
                   block_size: int = 64 * 1024, holds: bool = False
                   ) -> tuple[float, dict[str, float]]:
    port = _free_port()
    parent, child = mp.Pipe()
    proc = mp.Process(target=_receiver, args=(port, size, populate, holds, child))
    proc.start()
    assert parent.recv() == "listening"
    dev = SourceDevice.stack("disk", _random_source(size), block_size)

    async def migrate() -> dict[str, float]:
        stop = asyncio.Event()
        rng = random.Random(7)
        written = 0

        async def writer() -> None:
            nonlocal written
            page = rng.randbytes(4096)
            interval = 4096 / (writer_mib_s * 1024 * 1024)
            next_at = time.perf_counter()
            while not stop.is_set():
                await dev.tracker.write_at(rng.randrange(size // 4096) * 4096, page)
                written += 4096
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

        task = asyncio.create_task(writer()) if writer_mib_s else None

        async def suspend() -> None:
            stop.set()
            if task is not None:
                await task

        ch = await connect(Address("tcp", "127.0.0.1", port))
        start = time.perf_counter()
        result = await Source(ch, [dev], SourceHooks(suspend=suspend), Policy()).run()
        elapsed = time.perf_counter() - start
        await ch.close()
        return {"seconds": elapsed, "bytes_sent": result.bytes_sent, "cycles": result.cycles,
                "written_mib": written / 2**20}

    info = uvloop.run(migrate())
    errors, _ = parent.recv()
    proc.join()
    info["integrity_errors"] = errors
    return info["seconds"], info


_sources: dict[int, MemorySource] = {}


def _random_source(size: int) -> MemorySource:
    """The same random content for every run (making it takes longer than moving it)."""
    if size not in _sources:
        source = MemorySource(size)
        for pos in range(0, size, CHUNK):
            uvloop.run(source.write_at(pos, os.urandom(min(CHUNK, size - pos))))
        _sources[size] = source
    return _sources[size]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--writer-mib-s", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=3, help="report the median of N runs")
    parser.add_argument("--block-kib", type=int, default=64,
                        help="tracking block size (guest memory uses 4)")
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    gb = size / 1e9
    _random_source(size)
    cases = [
        ("idle device", 0.0, True, False),
        ("idle, cold destination", 0.0, False, False),
        (f"writer {args.writer_mib_s:g} MiB/s", args.writer_mib_s, True, False),
        ("destination holds it", 0.0, True, True),
    ]
    print(f"{args.size_mib} MiB of random data over loopback TCP, {args.block_kib} KiB blocks, "
          f"median of {args.runs} runs (raw TCP measured before each run)")
    for name, writer, populate, holds in cases:
        runs = []
        for _ in range(args.runs):
            raw = raw_tcp(size)
            took, info = roam_migration(size, writer, populate, args.block_kib * 1024, holds)
            runs.append((raw / took, gb / took, gb / raw, info))
        runs.sort(key=lambda r: r[0])
        ratio, roam_gbs, raw_gbs, info = runs[len(runs) // 2]
        print(f"{name:24} roam {roam_gbs:5.2f} GB/s  raw {raw_gbs:5.2f} GB/s  "
              f"ratio {ratio:4.2f}  (all: {', '.join(f'{r[0]:.2f}' for r in runs)})  "
              f"cycles {info['cycles']:.0f}  sent {info['bytes_sent'] / 2**20:.0f} MiB  "
              f"written {info['written_mib']:.1f} MiB  integrity errors "
              f"{info['integrity_errors']:.0f}")


if __name__ == "__main__":
    main()

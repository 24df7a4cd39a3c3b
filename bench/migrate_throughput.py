"""Migration throughput vs raw loopback TCP, measured in the same run.

A 1 GiB device of random (incompressible) data moves over loopback TCP between two
processes with every block hashed and verified, then again while a writer keeps
changing it. Prints throughput and the ratio to raw TCP (sendall of 4 MiB buffers).

    .venv/bin/python bench/migrate_throughput.py [--size-mib 1024]
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
        buf = bytearray(CHUNK)
        view = memoryview(buf)
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


def _receiver(port: int, size: int, out: Connection) -> None:
    async def main() -> None:
        finished = asyncio.Event()

        async def make(spec: DeviceSpec) -> NewDevice:
            return NewDevice(MemorySource(spec.size))

        async def handler(ch: Channel) -> None:
            start = time.perf_counter()
            result = await Destination(ch, make).run()
            out.send((time.perf_counter() - start, result.integrity_errors,
                      result.verified_blocks))
            finished.set()

        server = await listen(Address("tcp", "127.0.0.1", port), handler)
        out.send("listening")
        await finished.wait()
        server.close()

    uvloop.run(main())


def roam_migration(size: int, writer_mib_s: float) -> tuple[float, dict[str, object]]:
    port = _free_port()
    parent, child = mp.Pipe()
    proc = mp.Process(target=_receiver, args=(port, size, child))
    proc.start()
    assert parent.recv() == "listening"
    source = MemorySource(size)
    source._view[:] = os.urandom(size)
    dev = SourceDevice.stack("disk", source)

    async def main() -> dict[str, object]:
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
                "final_dirty": result.final_dirty, "written_mib": written / 2**20}

    info = uvloop.run(main())
    dest_seconds, errors, verified = parent.recv()
    proc.join()
    info.update(dest_seconds=dest_seconds, integrity_errors=errors, verified=verified)
    return float(info["seconds"]), info  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--writer-mib-s", type=float, default=20.0)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    gb = size / 1e9
    raw = raw_tcp(size)
    print(f"raw loopback TCP      {gb / raw:6.2f} GB/s")
    plain, info = roam_migration(size, 0)
    print(f"roam, idle device     {gb / plain:6.2f} GB/s   ratio {raw / plain:4.2f}   {info}")
    busy, info = roam_migration(size, args.writer_mib_s)
    print(f"roam, writer {args.writer_mib_s:g} MiB/s {gb / busy:6.2f} GB/s   "
          f"ratio {raw / busy:4.2f}   {info}")


if __name__ == "__main__":
    main()

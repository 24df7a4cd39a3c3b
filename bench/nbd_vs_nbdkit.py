"""fio's nbd engine against roam's NBD server and nbdkit's memory plugin, in the same run.

roam serves a 256 MiB device with the stack a VM disk uses:
Metrics(DirtyTracker(VolatilityMonitor(MemorySource))), on uvloop, in its own process.
nbdkit runs `nbdkit memory 256M` with its defaults. One fio job, one connection, over a
UNIX socket each. Jobs alternate between the two servers for several rounds and the
median counts, so a busy machine slows both alike. Prints a table and the ratios.

    .venv/bin/python bench/nbd_vs_nbdkit.py [--runtime SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 256 * 1024 * 1024
BLOCK = 64 * 1024
JOBS = [  # name, fio rw, block size, iodepth
    ("seq read 1M qd8", "read", "1M", 8),
    ("seq write 1M qd8", "write", "1M", 8),
    ("rand read 4K qd32", "randread", "4k", 32),
]


async def _serve_roam(socket: str) -> None:
    """The server process: serve until SIGTERM."""
    from roam.exposure.nbd.server import Export, NBDServer
    from roam.storage.dirty import DirtyTracker
    from roam.storage.metrics import Metrics
    from roam.storage.sources import MemorySource
    from roam.storage.volatility import VolatilityMonitor

    device = Metrics(DirtyTracker(VolatilityMonitor(MemorySource(SIZE), BLOCK), BLOCK))
    server = NBDServer([Export("", device)])
    await server.serve_unix(socket)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.close()


def _wait_for(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server for {path} did not start")
        time.sleep(0.05)


def _fio(socket: str, rw: str, bs: str, depth: int, runtime: float) -> float:
    """Run one fio job; return bytes per second."""
    out = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={socket}",
         f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={SIZE}",
         "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--numjobs=1",
         "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return float(side["bw_bytes"])


def _start(cmd: list[str], socket: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _wait_for(socket, proc)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runtime", type=float, default=4.0, help="seconds per fio job")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per job; the median of each side counts")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: server process
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(_serve_roam(args.serve))
        return
    with tempfile.TemporaryDirectory() as tmp:
        roam_sock = str(Path(tmp) / "roam.sock")
        kit_sock = str(Path(tmp) / "nbdkit.sock")
        roam = _start([sys.executable, __file__, "--serve", roam_sock], roam_sock)
        kit = _start(["nbdkit", "-f", "-U", kit_sock, "memory", "256M"], kit_sock)
        results = []
        try:
            for name, rw, bs, depth in JOBS:
                runs: tuple[list[float], list[float]] = ([], [])
                for _ in range(args.rounds):  # alternate, so load from others hits both
                    runs[0].append(_fio(roam_sock, rw, bs, depth, args.runtime))
                    runs[1].append(_fio(kit_sock, rw, bs, depth, args.runtime))
                results.append((name, bs, statistics.median(runs[0]),
                                statistics.median(runs[1])))
        finally:
            for proc in (roam, kit):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
    print(f"{'job':<20}{'roam':>16}{'nbdkit':>16}{'ratio':>8}")
    for name, bs, r, k in results:
        if bs == "4k":
            cells = f"{r / 4096 / 1000:>11.1f}k IOPS{k / 4096 / 1000:>11.1f}k IOPS"
        else:
            cells = f"{r / 2**30:>11.2f} GiB/s{k / 2**30:>11.2f} GiB/s"
        print(f"{name:<20}{cells}{r / k:>8.2f}")


if __name__ == "__main__":
    main()

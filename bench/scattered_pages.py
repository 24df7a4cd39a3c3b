"""A scattered final dirty set inside the pause: SCATTER frames vs a frame per page.

A busy guest's last dirty set is thousands of single 4 KiB pages spread over its memory.
This moves a mostly-zero device (512 MiB by default) to a destination, then, at the
pause, writes N random pages at random places (one in ten zero) and hands over with the
whole set inside the pause. Both ends run in one process over a UNIX socket, so the
figure is the CPU both ends spend, as on a machine where they share cores. It reports
the pause without the writes (pages written to authority acknowledged: the destination
has verified and stored every page before it acknowledges) with SCATTER frames and, in
the same run, with one frame per run of pages as an older peer gets (the reference),
and their ratio.

    .venv/bin/python -m bench.scattered_pages [--size-mib 512] [--pages 1000,3000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time

import uvloop

from roam.migration.channel import Address, Channel, connect, listen
from roam.migration.destination import Destination, NewDevice
from roam.migration.source import Policy, Source, SourceDevice, SourceHooks
from roam.migration.wire import DeviceSpec
from roam.storage.sources import MemorySource

PAGE = 4096


async def _device(spec: DeviceSpec) -> NewDevice:
    return NewDevice(MemorySource(spec.size))


async def one(size: int, pages: int, scatter: bool, seed: int) -> float:
    """Seconds from the pages written (in the suspend hook) to authority acknowledged."""
    rng = random.Random(seed)
    source = MemorySource(size)
    dev = SourceDevice.stack("mem", source, PAGE)
    chosen = rng.sample(range(size // PAGE), pages)

    writing = 0.0

    async def suspend() -> None:
        nonlocal writing
        start = time.perf_counter()
        for i, p in enumerate(chosen):
            await dev.tracker.write_at(p * PAGE, bytes(PAGE) if i % 10 == 0
                                       else os.urandom(PAGE))
        writing = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        addr = Address.parse(f"unix://{tmp}/m.sock")
        accepted: asyncio.Queue[Channel] = asyncio.Queue()
        finished = asyncio.Event()

        async def handler(ch: Channel) -> None:
            await accepted.put(ch)
            await finished.wait()

        server = await listen(addr, handler)
        src_ch = await connect(addr)
        dst_ch = await accepted.get()
        policy = Policy(pause_send_bytes=1 << 30, scatter=scatter)
        result, _ = await asyncio.gather(
            Source(src_ch, [dev], SourceHooks(suspend=suspend), policy).run(),
            Destination(dst_ch, _device).run())
        finished.set()
        await src_ch.close()
        await dst_ch.close()
        server.close()
    assert result.outcome == "completed" and result.final_dirty == pages
    return result.suspended_seconds - writing


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--pages", default="1000,3000",
                        help="comma-separated sizes of the final dirty set, in pages")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib << 20
    print(f"device {args.size_mib} MiB, load average {os.getloadavg()[0]:.1f}")
    print(f"{'pages':>6} {'frame per run (ms)':>19} {'SCATTER (ms)':>13} {'ratio':>6}"
          f" {'us/page old':>12} {'us/page new':>12}")
    for pages in (int(p) for p in args.pages.split(",")):
        old: list[float] = []
        new: list[float] = []
        for run in range(args.runs):  # alternate, so that load changes hit both alike
            old.append(uvloop.run(one(size, pages, False, run)))
            new.append(uvloop.run(one(size, pages, True, run)))
        o, n = statistics.median(old) * 1e3, statistics.median(new) * 1e3
        print(f"{pages:>6} {o:>19.1f} {n:>13.1f} {o / n:>6.1f} {o * 1e3 / pages:>12.1f}"
              f" {n * 1e3 / pages:>12.1f}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

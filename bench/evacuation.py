"""Evacuation: how fast `roam migrate` moves a guest that holds a lot of data.

A spot instance gets 30 s (GCP, Azure) to 120 s (AWS) of notice: what matters is how long
a guest full of data takes to leave. Cases (issue 13):

- a 2 GiB guest holding 1 GiB of random data in one process, idle;
- the same with tests/peer/busy_guest.py also rewriting random 4 KiB pages at 20 MiB/s;
- a 4 GiB guest holding 3 GiB (`--large`; slow under TCG).

Each migration is one hop A->B between two `roam peer serve` subprocesses (UNIX sockets,
`roam migrate` defaults). Raw loopback TCP (plain sockets, bench/migrate_throughput.py)
is measured right before each hop. Reported per hop:

- first pass: the source's non-zero payload bytes of its first pass over every device
  divided by that pass's duration (both from the migration's result), and that
  throughput as a ratio of raw TCP;
- migrate to cont: wall time from the `migrate` call to QMP `cont` returning on the
  destination;
- bytes on the wire (the whole group: memory, disk, kernel files, device state), and
  bytes named by HAVE instead: both peers hold the package (A runs the VM from it, B is
  given it with `--package`; not with `--not-given`), so what still matches it is not
  sent.

Run as root: .venv/bin/python -m bench.evacuation [--large] [--hops 2] [--not-given] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvloop

from bench.migrate_throughput import raw_tcp
from bench.vm_migration import BUSY_ARGV
from roam.blueprint import build, cache_root
from roam.peer.client import PEER_SOCKET, PeerClient
from roam.peer.models import MigrateRequest, RunRequest
from roam.vm.snapshot import SnapshotOptions, take_snapshot

GIB = 1 << 30
RAW_TCP_BYTES = GIB
SETTLE = 3.0  # seconds of workload before each hop

HOLDER = """
import os, sys, time
size = int(sys.argv[1])
data = bytearray(size)
view = memoryview(data)
chunk = 16 << 20
for pos in range(0, size, chunk):
    view[pos:pos + chunk] = os.urandom(min(chunk, size - pos))
open("/tmp/holder.ready", "w").write("ready")
while True:
    time.sleep(3600)
"""


def holder_argv(size: int) -> list[str]:
    """Start the holder in the background: random data in one process, kept resident."""
    return ["sh", "-c", f'nohup python3 -c "$0" {size} > /tmp/holder.log 2>&1 &', HOLDER]


@contextlib.contextmanager
def peers(work: Path, package: Path, given: bool) -> Iterator[list[str]]:
    """Peers a and b; with `given`, b is given `package` (a holds it by running the VM
    from it)."""
    processes = []
    dirs = []
    try:
        for name in ("a", "b"):
            state = work / name
            state.mkdir()
            dirs.append(str(state))
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "roam.cli.main", "peer", "serve", "--listen",
                 f"unix://{work}/{name}.mig", "--state-dir", str(state),
                 "--net-pool", f"10.242.{len(dirs)}.0/24",
                 *(["--package", str(package)] if given and name == "b" else [])],
                stdout=(work / f"{name}.log").open("w"), stderr=subprocess.STDOUT))
        for path in dirs:
            while not (Path(path) / PEER_SOCKET).exists():
                time.sleep(0.05)
        yield dirs
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)


async def wait_holder(client: PeerClient, name: str) -> None:
    deadline = time.monotonic() + 900
    while True:
        out = (await client.exec(name, ["cat", "/tmp/holder.ready", "/tmp/holder.log"])).stdout
        if "ready" in out:
            return
        if "Error" in out or time.monotonic() > deadline:
            raise RuntimeError(f"the holder did not fill its memory: {out[-300:]}")
        await asyncio.sleep(2)


async def hops(package: Path, held: int, busy: bool, count: int, work: Path,
               given: bool) -> list[dict[str, Any]]:
    results = []
    with peers(work, package, given) as (a, b):
        async with PeerClient(a) as first, PeerClient(b) as second:
            await first.run(RunRequest(name="evac", package=str(package)))
            await first.exec("evac", holder_argv(held))
            await wait_holder(first, "evac")
            if busy:
                await first.exec("evac", BUSY_ARGV)
            ends = [(first, a), (second, b)]  # (client, state directory): source first
            for _ in range(count):
                (here, _), (there, there_dir) = ends
                await asyncio.sleep(SETTLE)
                raw = RAW_TCP_BYTES / raw_tcp(RAW_TCP_BYTES)
                started = time.time()
                result = await here.migrate("evac", MigrateRequest(
                    to=f"unix://{Path(there_dir).parent}/{Path(there_dir).name}.mig"))
                info = await there.vm("evac")
                assert info.resumed_at is not None
                payload, seconds = result.first_pass_payload_bytes, result.first_pass_ms / 1000
                results.append({
                    "raw_tcp_gbs": raw / 1e9,
                    "first_pass_gbs": payload / seconds / 1e9,
                    "first_pass_ratio": payload / seconds / raw,
                    "first_pass_s": seconds, "first_pass_mib": payload / 2**20,
                    "migrate_to_cont_s": info.resumed_at - started,
                    "total_s": result.total_ms / 1000, "downtime_ms": info.downtime_ms,
                    "mib": result.bytes_sent / 2**20, "cycles": result.cycles,
                    "have_mib": result.have_bytes / 2**20})
                print(f"  hop: {json.dumps(results[-1])}", flush=True)
                ends.reverse()
            here = ends[0][0]
            if busy:
                log = (await here.exec("evac", ["cat", "/tmp/busy.log"])).stdout
                if "FAIL" in log or "ok" not in log:
                    raise RuntimeError(f"in-guest verifier: {log[-300:]}")
            await here.stop("evac")
    return results


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("first_pass_ratio", "first_pass_gbs", "raw_tcp_gbs", "migrate_to_cont_s",
            "downtime_ms", "mib", "have_mib")
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}


async def measure(cases: list[tuple[int, int, bool]], count: int, work: Path,
                  given: bool) -> list[dict[str, Any]]:
    blueprint = build(cache=cache_root())
    rows = []
    packages: dict[int, Path] = {}
    for memory_gib, held_gib, busy in cases:
        if memory_gib not in packages:
            packages[memory_gib] = work / f"pkg-{memory_gib}"
            await take_snapshot(blueprint, packages[memory_gib],
                                SnapshotOptions(memory_mib=memory_gib * 1024))
        name = f"{memory_gib} GiB guest holding {held_gib} GiB, {'busy' if busy else 'idle'}"
        print(name, flush=True)
        case = work / f"{memory_gib}-{held_gib}-{int(busy)}"
        case.mkdir()
        runs = await hops(packages[memory_gib], held_gib * GIB, busy, count, case, given)
        rows.append({"case": name, **summary(runs), "runs": runs})
        print(f"{name}: {summary(runs)}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hops", type=int, default=2, help="hops per case (A->B->A...)")
    parser.add_argument("--large", action="store_true", help="also the 4 GiB guest")
    parser.add_argument("--only-large", action="store_true")
    parser.add_argument("--workload", nargs="+", default=["idle", "busy"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--not-given", action="store_true",
                        help="b is not given the package: its first hop sends it all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cases = [] if args.only_large else [(2, 1, w == "busy") for w in args.workload]
    if args.large or args.only_large:
        cases.append((4, 3, False))
    work = Path(tempfile.mkdtemp(prefix="rev-"))  # short: UNIX socket paths
    try:
        rows = uvloop.run(measure(cases, args.hops, work, not args.not_given))
    except BaseException:
        print(f"failed; logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()

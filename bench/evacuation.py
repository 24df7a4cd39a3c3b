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

- `--s3`: the 2 GiB guest syncing to moto's S3 server (started here on loopback) until
  its sync first caught up, then 30 s more; then a hybrid hop A->B (the destination
  takes what the bucket holds from there), and, as the reference in the same run, a
  plain hop back B->A with B's sync stopped. Reported: bytes the source sent after the
  `roam migrate` call against what was not uploaded when it was made (the sync's lag),
  bytes pulled from S3 and in how long, time to `cont`, upload rate to moto, the
  requests to the store, and the hybrid time with the pull at the plain hop's speed.

Run as root: .venv/bin/python -m bench.evacuation [--large] [--hops 2] [--not-given]
[--s3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
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
from roam.peer.models import MigrateRequest, RunRequest, SyncRequest
from roam.vm.snapshot import SnapshotOptions, take_snapshot
from tests.sync.s3 import CREDENTIALS, MotoServer

GIB = 1 << 30
RAW_TCP_BYTES = GIB
SETTLE = 3.0  # seconds of workload before each hop
STORE_FILL = re.compile(r"store: (\d+) chunks, (\d+) bytes in ([0-9.]+) s")
SYNC_MORE = 30.0  # seconds of sync after it first caught up

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
def peers(work: Path, package: Path, given: bool,
          env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """Peers a and b; with `given`, b is given `package` (a holds it by running the VM
    from it); `env` adds to their environment (S3 credentials)."""
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
                stdout=(work / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
                env=None if env is None else {**os.environ, **env}))
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


def store_fill(state_dir: Path) -> tuple[int, int, float]:
    """The destination worker's last store line: chunks, bytes and seconds."""
    logs = sorted(state_dir.rglob("worker.log"), key=lambda p: p.stat().st_mtime)
    for path in reversed(logs):
        found = STORE_FILL.findall(path.read_text(errors="replace"))
        if found:
            chunks, nbytes, seconds = found[-1]
            return int(chunks), int(nbytes), float(seconds)
    return 0, 0, 0.0


async def s3_case(package: Path, held: int, busy: bool, work: Path) -> dict[str, Any]:
    """Sync to moto, then a hybrid hop A->B and a plain hop B->A (the reference)."""
    store = MotoServer()
    try:
        bucket = store.bucket("roam-bench")
        with peers(work, package, False, CREDENTIALS) as (a, b):
            async with PeerClient(a) as first, PeerClient(b) as second:
                return await _s3_hops(first, second, a, b, store.endpoint,
                                      f"s3://{bucket}/fleet", package, held, busy)
    finally:
        store.stop()


async def _s3_hops(first: PeerClient, second: PeerClient, a: str, b: str, endpoint: str,
                   to: str, package: Path, held: int, busy: bool) -> dict[str, Any]:
    started = time.monotonic()
    await first.run(RunRequest(name="evac", package=str(package),
                               sync=SyncRequest(to=to, endpoint_url=endpoint)))
    await first.exec("evac", holder_argv(held))
    await wait_holder(first, "evac")
    if busy:
        await first.exec("evac", BUSY_ARGV)

    async def sync_of(client: PeerClient) -> dict[str, Any]:
        sync = (await client.vm("evac")).sync
        assert sync is not None, "the VM does not sync"
        return dict(sync.model_dump(mode="json"))

    # Until every chunk went up once, then until the lag first reaches 0 (a running
    # guest's may never: then for at most a minute more).
    while (await sync_of(first))["state"] != "running":  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    caught_up = time.monotonic() - started
    sync = await sync_of(first)
    while sync["lag_bytes"] and time.monotonic() - started < caught_up + 60:
        await asyncio.sleep(0.5)
        sync = await sync_of(first)
    print(f"  sync caught up after {caught_up:.1f} s: {json.dumps(sync)}", flush=True)
    await asyncio.sleep(SYNC_MORE)
    before = await sync_of(first)
    raw = RAW_TCP_BYTES / raw_tcp(RAW_TCP_BYTES)
    t0 = time.time()
    hybrid = await first.migrate("evac", MigrateRequest(to=f"unix://{Path(b).parent}/b.mig"))
    info = await second.vm("evac")
    chunks, pulled, pull_s = store_fill(Path(b))
    # B syncs on once the VM runs there; stop that for the plain hop back.
    deadline = time.monotonic() + 300
    while (await second.vm("evac")).sync is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the VM does not sync on from B")
        await asyncio.sleep(0.5)
    await second.sync_stop("evac")
    await asyncio.sleep(SETTLE)
    t1 = time.time()
    plain = await second.migrate("evac", MigrateRequest(to=f"unix://{Path(a).parent}/a.mig"))
    back = await first.vm("evac")
    assert info.resumed_at is not None and back.resumed_at is not None
    plain_rate = plain.first_pass_payload_bytes / (plain.first_pass_ms / 1000)
    hybrid_cont = info.resumed_at - t0
    row = {
        # Uploads overlap the guest filling its memory: an average, not the store's top
        # speed (bench/s3_client.py measures that).
        "upload_mbs": sync["uploaded_bytes"] / caught_up / 1e6,
        "sync_caught_up_s": caught_up, "uploaded_mib": sync["uploaded_bytes"] / 2**20,
        "sync_requests": sync["requests"], "requests_at_call": before["requests"],
        "lag_at_call_mib": before["lag_bytes"] / 2**20,
        "source_after_call_mib": hybrid.bytes_sent / 2**20,
        "offered_mib": hybrid.store_offered_bytes / 2**20,
        "pulled_mib": pulled / 2**20, "pulled_chunks": chunks, "pull_s": pull_s,
        "pull_mbs": pulled / max(pull_s, 1e-9) / 1e6, "hybrid_to_cont_s": hybrid_cont,
        "hybrid_at_link_speed_s": hybrid_cont - pull_s + pulled / plain_rate,
        "plain_to_cont_s": back.resumed_at - t1, "plain_mib": plain.bytes_sent / 2**20,
        "plain_first_pass_mbs": plain_rate / 1e6, "raw_tcp_gbs": raw / 1e9,
        "downtime_ms": info.downtime_ms}
    print(f"  s3: {json.dumps(row)}", flush=True)
    await first.stop("evac")
    return row


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("first_pass_ratio", "first_pass_gbs", "raw_tcp_gbs", "migrate_to_cont_s",
            "downtime_ms", "mib", "have_mib")
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}


async def measure(cases: list[tuple[int, int, bool]], count: int, work: Path,
                  given: bool, s3: bool = False) -> list[dict[str, Any]]:
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
        if s3:
            rows.append({"case": f"{name}, syncing to S3 (moto)", **await s3_case(
                packages[memory_gib], held_gib * GIB, busy, case)})
            continue
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
    parser.add_argument("--s3", action="store_true",
                        help="the 2 GiB cases syncing to S3, with a hybrid hop")
    parser.add_argument("--not-given", action="store_true",
                        help="b is not given the package: its first hop sends it all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cases = [] if args.only_large else [(2, 1, w == "busy") for w in args.workload]
    if args.large or args.only_large:
        cases.append((4, 3, False))
    work = Path(tempfile.mkdtemp(prefix="rev-"))  # short: UNIX socket paths
    try:
        rows = uvloop.run(measure(cases, args.hops, work, not args.not_given, args.s3))
    except BaseException:
        print(f"failed; logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()

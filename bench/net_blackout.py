"""Network blackout per handover: a client's longest wait for redis in a moving VM.

A 256 MiB snapshot of the cached blueprint (built if missing) runs on lab namespaces
(tests/network/lab.py: hosts a and b, gateway c, client k; nothing leaves them) and moves
a -> b -> a ... (tests/network/vmhop.py: state-only handover, memory and disk shared).
A client in k keeps one connection to redis through the gateway and RPUSHes a number
every 20 ms. Per hop: the downtime (QMP stop to cont done), the client's longest wait
between replies around the hop, against the same client's replies while nothing moves
(its "plain ping" of the VM: median and longest wait), with the source's redirect and
without it (frames arriving at the source during the pause are then lost, and TCP
retransmits after at least 200 ms).

Run as root from the project directory (it uses the lab of tests/network):
.venv/bin/python -m bench.net_blackout [--hops 6] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from roam.blueprint import build, cache_root
from roam.network.forward import PortForward
from roam.vm.snapshot import SnapshotOptions, take_snapshot
from tests.network.lab import Lab, connect, lab
from tests.network.vmhop import GATEWAY, HOSTS, MovingVM, RedisWriter, vm_files

REDIS = 6379
QUIET = 2.0  # seconds of undisturbed replies for the baseline
SETTLE = 1.0  # seconds after a hop before the next


def waits_ms(replies: list[float], start: float, end: float) -> list[float]:
    inside = [t for t in replies if start <= t <= end]
    return [1000 * (b - a) for a, b in itertools.pairwise(inside)]


def over(replies: list[float], instant: float) -> float:
    """The wait between the last reply before `instant` and the first one after it."""
    before = max(t for t in replies if t <= instant)
    return 1000 * (min(t for t in replies if t > instant) - before)


async def measure(net_lab: Lab, snapshot: Path, workdir: Path, hops: int,
                  redirect: bool) -> dict[str, Any]:
    with vm_files(snapshot, workdir) as package:
        vm = MovingVM(net_lab, package, workdir)
        gateway_addr = net_lab.addrs[GATEWAY]
        writer: RedisWriter | None = None
        try:
            await vm.open_gateway([PortForward.parse(f"{gateway_addr}:{REDIS}:{REDIS}")])
            await vm.start(HOSTS[0])
            sock = await asyncio.to_thread(connect, net_lab.nodes["k"], gateway_addr, REDIS)
            sock.settimeout(10)
            writer = RedisWriter(sock)
            writer.thread.start()
            await asyncio.sleep(0.5)
            quiet_start = time.monotonic()
            await asyncio.sleep(QUIET)
            baseline = waits_ms(writer.replies, quiet_start, time.monotonic())
            per_hop = []
            for index in range(hops):
                started = time.monotonic()
                hop = await vm.move(HOSTS[(index + 1) % 2], redirect=redirect)
                await asyncio.sleep(SETTLE)
                per_hop.append({"hop": f"{hop.source}->{hop.dest}",
                                "downtime_ms": round(hop.downtime_ms, 1),
                                "prepare_ms": round(hop.prepare_ms, 1),
                                "blackout_ms": round(max(waits_ms(
                                    writer.replies, started, time.monotonic())), 1),
                                "wait_over_pause_ms": round(over(writer.replies,
                                                                 hop.paused_at), 1)})
            writer.finish()
            return {"redirect": redirect, "writes": writer.acked,
                    "ping_median_ms": round(statistics.median(baseline), 1),
                    "ping_max_ms": round(max(baseline), 1), "hops": per_hop}
        finally:
            if writer is not None:
                writer.stop.set()
                writer.sock.close()
            await vm.close()


def main(hops: int) -> list[dict[str, Any]]:
    blueprint = build(cache=cache_root())
    with tempfile.TemporaryDirectory(prefix="roam-netbench-") as tmp:
        snapshot = Path(tmp) / "pkg"
        uvloop.run(take_snapshot(blueprint, snapshot, SnapshotOptions(memory_mib=256)))
        results = []
        for redirect in (True, False):
            run_dir = Path(tmp) / f"run-{redirect}"
            run_dir.mkdir()
            # The lab is set up outside the event loop: pyroute2's blocking calls run
            # their own loop in the calling thread.
            with lab("a", "b", "c", "k") as net_lab:
                results.append(uvloop.run(measure(net_lab, snapshot, run_dir, hops,
                                                  redirect)))
        return results


def report(results: list[dict[str, Any]]) -> None:
    for result in results:
        blackouts = [h["blackout_ms"] for h in result["hops"]]
        downtimes = [h["downtime_ms"] for h in result["hops"]]
        print(f"redirect {'on ' if result['redirect'] else 'off'}: plain replies median "
              f"{result['ping_median_ms']} ms (longest {result['ping_max_ms']}); per hop "
              f"blackout {blackouts} ms (median {statistics.median(blackouts)}), downtime "
              f"{downtimes} ms; {result['writes']} writes, none lost")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    outcome = main(args.hops)
    if args.json:
        print(json.dumps(outcome, indent=2))
    else:
        report(outcome)

"""Evacuating a spot node: time from the notice to every VM running elsewhere.

The fleet of `make demo` (roam.demo.fleet: control plane, spot nodes A, B, C watching a
fake metadata service in their namespaces, gateway G) with N VMs of 1 GiB on A, each
holding 512 MiB of random data in one process (bench/evacuation.py's holder), idle
otherwise (a node holds as many one-CPU VMs as it has CPUs: the scheduler does not
overcommit, so on a 2-core machine N stops at 2). A's metadata service then gives a spot
notice (GCP's form by default: its hanging GET sees it at once, so the figures are the
evacuation's, not a poll interval's);
the control plane moves every VM off A, `max_parallel` 2 at once. Reported per N:

- evacuation: from the notice given at the metadata service to the last VM's resume
  elsewhere (its new peer's `resumed_at`), and from the control plane's receipt;
- margin: the deadline minus each VM's resume elsewhere (smallest), and as a fraction
  of the deadline (goal: at least 0.5, i.e. half of a 30 s deadline to spare);
- the reference is the same run's single VM: evacuation time per VM of N over that of
  one (below 1: the parallel moves overlap).

Variants with continuous sync or a standby mirror are future work (neither exists yet).
Run as root: .venv/bin/python -m bench.evacuate_node [--vms 1 2 4] [--cloud gcp] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.evacuation import holder_argv
from roam.blueprint import build, cache_root
from roam.demo.fleet import NET, ROLES, FleetDemo
from roam.network import ns
from roam.network.lab import lab
from roam.peer.client import PeerClient
from roam.spot import Cloud
from roam.vm.snapshot import SnapshotOptions, take_snapshot

HELD = 512 << 20
MEMORY_MIB = 1024
DEADLINE = 30.0


async def package() -> Path:
    blueprint = build(cache=cache_root())
    pkg = cache_root() / "bench" / f"{blueprint.hash}-evacuate-{MEMORY_MIB}M"
    if not (pkg / "config.json").exists():
        shutil.rmtree(pkg, ignore_errors=True)
        pkg.parent.mkdir(parents=True, exist_ok=True)
        await take_snapshot(blueprint, pkg, SnapshotOptions(memory_mib=MEMORY_MIB))
    return pkg


async def filled(peer: PeerClient, name: str) -> None:
    """Start the holder in `name` and wait until it holds its memory."""
    await peer.exec(name, holder_argv(HELD), timeout=30)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        out = await peer.exec(name, ["cat", "/tmp/holder.ready", "/tmp/holder.log"])
        if "ready" in out.stdout:
            return
        if "Error" in out.stdout:
            break
        await asyncio.sleep(2)
    raise RuntimeError(f"{name}'s holder did not fill its memory")


async def evacuate(work: Path, hosts: Any, pkg: Path, count: int, cloud: Cloud
                   ) -> dict[str, Any]:
    async with FleetDemo(work, hosts, pkg, cloud=cloud) as fleet:
        assert fleet.control is not None
        cpus = (await fleet.control.node("a")).registration.capacity.cpus
        if count > cpus:  # the scheduler places by CPUs, one per VM here, no overcommit
            return {"vms": count, "skipped": f"node A has {cpus} CPUs: it holds at most "
                                             f"{cpus} one-CPU VMs"}
        names = [f"v{i}" for i in range(count)]
        for i, name in enumerate(names):
            node = await fleet.create(name, 200 + i, 6400 + i)
            assert node == "a", f"{name} was placed on {node}"
        async with PeerClient(work / "a") as peer:
            await asyncio.gather(*(filled(peer, name) for name in names))
        await asyncio.sleep(2)
        given = fleet.give_notice("a", DEADLINE)
        record = await fleet.evacuation("a")
    resumed = [v.resumed_at for v in record.vms.values() if v.resumed_at is not None]
    margins = [v.margin_ms for v in record.vms.values() if v.margin_ms is not None]
    deadline = record.deadline - given
    return {
        "vms": count, "evacuated": len(record.evacuated), "lost": len(record.lost),
        "will_be_lost": sum(1 for v in record.vms.values() if v.warned),
        "deadline_s": round(deadline, 1),
        "evacuation_s": round(max(resumed) - given, 1) if resumed else None,
        "from_receipt_s": round(max(resumed) - record.received, 1) if resumed else None,
        "smallest_margin_s": round(min(margins) / 1000, 1) if margins else None,
        "margin_fraction": round(min(margins) / 1000 / deadline, 2) if margins else None,
        "to": sorted({v.to for v in record.vms.values() if v.to}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--vms", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cloud", choices=["aws", "gcp", "azure"], default="gcp")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces)")
    logging.basicConfig(level=logging.WARNING)
    pkg = asyncio.run(package())
    rows = []
    for count in args.vms:
        work = Path(tempfile.mkdtemp(prefix="rbe-"))
        try:
            with lab(*ROLES, tag=f"rb{os.getpid() % 10000}", net=NET) as hosts:
                row = ns.call_in(hosts.nodes["p"], functools.partial(
                    asyncio.run, evacuate(work, hosts, pkg, count, Cloud(args.cloud))))
        except BaseException:
            print(f"failed; logs are in {work}", file=sys.stderr)
            raise
        shutil.rmtree(work, ignore_errors=True)
        rows.append(row)
        if "skipped" in row:
            print(f"{count} VM(s): not measured ({row['skipped']})", flush=True)
            continue
        print(f"{count} VM(s) of {MEMORY_MIB} MiB holding {HELD >> 20} MiB: evacuated "
              f"{row['evacuated']}/{count} in {row['evacuation_s']} s from the notice "
              f"({row['from_receipt_s']} s from the control plane's receipt), smallest "
              f"margin {row['smallest_margin_s']} s of {row['deadline_s']} s "
              f"({row['margin_fraction']} of the deadline; goal 0.5), to {row['to']}",
              flush=True)
    one = next((r for r in rows if r["vms"] == 1 and r["evacuation_s"]), None)
    if one is not None:
        for row in rows:
            if row.get("evacuation_s"):
                ratio = row["evacuation_s"] / row["vms"] / one["evacuation_s"]
                print(f"{row['vms']} VM(s): {ratio:.2f} of one VM's evacuation time per VM")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()

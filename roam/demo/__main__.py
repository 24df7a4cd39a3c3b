"""`make demo` (`python -m roam.demo [--cloud aws|gcp|azure]`): the fleet demo of
roam.demo.fleet, in network namespaces made for it and removed afterwards. The last line
printed is one JSON object with the figures; the exit status is 1 if a write or a VM was
lost."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from roam.demo.fleet import NET, ROLES, FleetDemo, summary, tour
from roam.demo.peers import package
from roam.network import ns
from roam.network.lab import lab
from roam.spot import Cloud

VM = {"redis": (100, 6379)}  # name: (overlay segment, port published on G)


async def demo(work: Path, hosts_lab: Any, pkg: Path, cloud: Cloud) -> dict[str, Any]:
    async with FleetDemo(work, hosts_lab, pkg, cloud=cloud) as fleet:
        print(f"control plane on P ({fleet.url}); spot nodes A, B, C watch {cloud.value}'s "
              "metadata service; G holds the gateway; K runs the client", flush=True)
        return await tour(fleet, VM, say=lambda line: print(line, flush=True))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m roam.demo", description=__doc__)
    parser.add_argument("--cloud", choices=[c.value for c in Cloud if c != Cloud.NONE],
                        default="aws", help="whose metadata service the nodes watch")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the demo creates network namespaces: run it as root")
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    pkg = package()
    work = Path(tempfile.mkdtemp(prefix="rd-"))  # short: UNIX socket paths
    try:
        with lab(*ROLES, tag=f"rd{os.getpid() % 10000}", net=NET) as hosts:
            report = ns.call_in(hosts.nodes["p"], lambda: asyncio.run(
                demo(work, hosts, pkg, Cloud(args.cloud))))
    except BaseException:
        print(f"demo failed; logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    line = summary(report)
    kept = line["connection_kept"]
    print(f"\n{line['acked_writes']} acknowledged writes, {line['lost_writes']} lost; the "
          "client " + ("kept its one connection" if kept else "had to connect again")
          + f"; longest gap between acknowledgements {line['client_blackout_ms']:.0f} ms")
    if line["evacuated"]:
        print(f"evacuated {line['evacuation_ms'] / 1000:.1f} s after the notice, "
              f"{line['margin_ms'] / 1000:.1f} s before its "
              f"{line['deadline_ms'] / 1000:.0f} s deadline")
    else:
        print("NOT evacuated: " + report["notice"].model_dump_json())
    print(f"demo took {time.monotonic() - started:.0f} s; accelerator {line['accel']}")
    print(json.dumps(line))
    if line["lost_writes"] or not line["evacuated"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

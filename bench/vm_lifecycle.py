"""VM lifecycle: boot to ready, snapshot, resume, suspend, package size, per guest size.

For each memory size: `take_snapshot` boots the cached blueprint (built if missing) with
memory and disk served from the engine (FUSE, NBD) and saves the device state; then
`run_package` resumes the package three times (each idle for a moment, then suspended
and committed back), and the package is archived with `package create`'s code. Runs
in-process on uvloop, as the CLI does.

Run as root: .venv/bin/python bench/vm_lifecycle.py [--memory 256 1024] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from roam.blueprint import build, cache_root
from roam.hypervisor.accel import choose_accel
from roam.vm import archive
from roam.vm.runner import run_package
from roam.vm.snapshot import SnapshotOptions, take_snapshot

RESUMES = 3
IDLE = 1.0


async def resume_once(package: Path) -> dict[str, float]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    times = await run_package(package, "bench", [], stop,
                              lambda _: loop.call_later(IDLE, stop.set))
    return {"resume": times.resume, "suspend": times.suspend, "commit": times.commit,
            "committed_mib": times.committed_bytes / 2**20}


async def measure(memory_mib: int, work: Path) -> dict[str, Any]:
    blueprint = build(cache=cache_root())
    package = work / f"pkg-{memory_mib}"
    snap = await take_snapshot(blueprint, package, SnapshotOptions(memory_mib=memory_mib))
    runs = [await resume_once(package) for _ in range(RESUMES)]
    started = time.monotonic()
    tarball = work / f"pkg-{memory_mib}.tar.zst"
    archive.create(package, tarball, threads=-1)
    create_s = time.monotonic() - started
    memory = package / "memory.img"
    return {
        "memory_mib": memory_mib,
        "boot_to_ready_s": snap.boot_to_ready,
        "snapshot_suspend_s": snap.suspend,
        "state_bytes": snap.state_bytes,
        "resume_s": statistics.median(r["resume"] for r in runs),
        "run_suspend_s": statistics.median(r["suspend"] for r in runs),
        "commit_s": statistics.median(r["commit"] for r in runs),
        "committed_mib": statistics.median(r["committed_mib"] for r in runs),
        "memory_allocated_mib": memory.stat().st_blocks * 512 / 2**20,
        "package_mib": tarball.stat().st_size / 2**20,
        "package_create_s": create_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, nargs="+", default=[256, 1024], help="MiB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    accel = choose_accel()
    results = []
    with tempfile.TemporaryDirectory(prefix="roam-bench-") as tmp:
        os.environ["ROAM_RUN_DIR"] = str(Path(tmp) / "run")
        for memory_mib in args.memory:
            results.append(uvloop.run(measure(memory_mib, Path(tmp))))
    if args.json:
        print(json.dumps({"accel": accel.name, "results": results}, indent=2))
        return
    print(f"accelerator: {accel.name} ({accel.reason})")
    for r in results:
        print(f"{r['memory_mib']} MiB: boot to ready {r['boot_to_ready_s']:.1f} s, "
              f"snapshot suspend {r['snapshot_suspend_s'] * 1000:.0f} ms "
              f"({r['state_bytes'] / 1e6:.2f} MB state), resume "
              f"{r['resume_s'] * 1000:.0f} ms, suspend {r['run_suspend_s'] * 1000:.0f} ms + "
              f"commit {r['commit_s'] * 1000:.0f} ms ({r['committed_mib']:.1f} MiB), memory "
              f"{r['memory_allocated_mib']:.0f} MiB allocated, package "
              f"{r['package_mib']:.1f} MiB (created in {r['package_create_s']:.1f} s)")


if __name__ == "__main__":
    main()

"""VM migration: roam vs QEMU's own live migration, same guest, same workload, same run.

For each guest size and workload (idle, or busy: tests/peer/busy_guest.py rewriting
random 4 KiB pages of a 64 MiB buffer at about 20 MiB/s):

- roam: a snapshot of that size resumed on peer A (`roam peer serve` subprocesses on
  UNIX sockets), then hops A->B->A... with `roam migrate` defaults (post-copy on). Both
  peers hold the package (B is given it with `--package`), as QEMU's hosts share the
  disk: what still matches the package is named by HAVE, not sent (`have_mib`).
  Downtime: QMP stop on the source to QMP cont returning on the destination.
- QEMU: the same blueprint booted with private guest RAM (memory-backend-ram) and the
  disk on a shared file, migrated between two QEMU processes over TCP on loopback with
  max-bandwidth unlimited and downtime-limit 50 ms; the destination starts running on
  its own when the migration completes. Downtime: QEMU's own figure (query-migrate).
  A guest that panics after one of QEMU's hops (seen here under TCG) ends that case's
  QEMU hops; the row counts them as failed_hops.

Bytes are what went over the migration connection: roam's includes the disk, kernel
files and device state; QEMU's is its RAM stream (the disk is shared storage).

Run as root: .venv/bin/python bench/vm_migration.py [--memory 512 1024] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvloop
from qemu.qmp import QMPClient, QMPError
from qemu.qmp.protocol import ConnectError

from roam.blueprint import Blueprint, build, cache_root
from roam.guest.client import GuestClient
from roam.hypervisor import Nic
from roam.hypervisor.accel import Accel
from roam.hypervisor.qemu.cmdline import FileDisk, QemuConfig, qemu_argv
from roam.hypervisor.qemu.machine import nic_args
from roam.peer.client import PEER_SOCKET, PeerClient
from roam.peer.models import MigrateRequest, RunRequest
from roam.vm.package import Package
from roam.vm.snapshot import SnapshotOptions, take_snapshot

BUSY = (Path(__file__).resolve().parents[1] / "tests" / "peer" / "busy_guest.py").read_text()
BUSY_ARGV = ["sh", "-c", 'nohup python3 -c "$0" > /tmp/busy.log 2>&1 &', BUSY]
SETTLE = 3.0  # seconds of workload before each hop
MAX_BANDWIDTH = 1 << 40  # bytes/s: "unlimited"
DOWNTIME_LIMIT_MS = 50
MEMORY_DIR = Path("/dev/shm")  # QEMU's guest RAM files: memory, not disk


def hops_for(memory_mib: int, workload: str) -> int:
    return 5 if (memory_mib, workload) == (512, "busy") else 3


# -- roam --------------------------------------------------------------------------------


@contextlib.contextmanager
def peers(work: Path, package: Path) -> Iterator[list[str]]:
    """Peers a and b, both holding `package` (a runs the VM from it, b is given it): like
    QEMU's shared disk, what the package holds need not travel."""
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
                 "--net-pool", f"10.241.{len(dirs)}.0/24", "--package", str(package)],
                stdout=(work / f"{name}.log").open("w"), stderr=subprocess.STDOUT))
        for path in dirs:
            while not (Path(path) / PEER_SOCKET).exists():
                time.sleep(0.05)
        yield dirs
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


async def roam_hops(package: Path, workload: str, hops: int, work: Path) -> list[dict[str, Any]]:
    results = []
    with peers(work, package) as (a, b):
        async with PeerClient(a) as first, PeerClient(b) as second:
            await first.run(RunRequest(name="bench", package=str(package)))
            if workload == "busy":
                await first.exec("bench", BUSY_ARGV)
            ends = [(first, a), (second, b)]  # (client, state directory): source first
            for _ in range(hops):
                (here, _), (there, there_dir) = ends
                await asyncio.sleep(SETTLE)
                result = await here.migrate("bench", MigrateRequest(
                    to=f"unix://{Path(there_dir).parent}/{Path(there_dir).name}.mig"))
                info = await there.vm("bench")
                results.append({"downtime_ms": info.downtime_ms,
                                "total_ms": result.total_ms, "bytes": result.bytes_sent,
                                "have_bytes": result.have_bytes,
                                "cycles": result.cycles, "final_dirty": result.final_dirty})
                ends.reverse()
            here = ends[0][0]
            if workload == "busy":
                log = await here.exec("bench", ["cat", "/tmp/busy.log"])
                if "FAIL" in log.stdout or "ok" not in log.stdout:
                    raise RuntimeError(f"in-guest verifier: {log.stdout[-300:]}")
            await here.stop("bench")
    return results


# -- QEMU native -------------------------------------------------------------------------


def native_config(blueprint: Blueprint, accel: Accel, memory_mib: int, disk: Path,
                  work: Path, index: int, incoming_port: int | None) -> QemuConfig:
    extra = nic_args("52:54:00:12:34:56", Nic.detached())
    if incoming_port is not None:
        extra += ["-incoming", "defer"]  # no -S: it runs once the migration is in
    return QemuConfig(
        kernel=blueprint.kernel, initramfs=blueprint.initramfs, cmdline=blueprint.cmdline,
        memory_mib=memory_mib, mem_path=MEMORY_DIR / f"{work.name}-{index}",
        disks=[FileDisk(disk)],
        agent_socket=work / f"agent{index}.sock", qmp_socket=work / f"qmp{index}.sock",
        console_log=work / f"console{index}.log", accel=accel,
        extra_args=extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NativeQemu:
    """A QEMU whose RAM QEMU migrates itself: each process has its own memory file and
    x-ignore-shared stays off, so all of guest RAM goes through QEMU's migration stream.
    QMP is opened per use: after taking in a busy guest's migration, a QMP session that
    was open during it was found closed by QEMU here."""

    def __init__(self, config: QemuConfig, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            # No parent-death signal here (stop() ends it): with one, a target QEMU was
            # twice found gone after taking in a busy guest, its log silent.
            self.process = await asyncio.create_subprocess_exec(
                *qemu_argv(self.config), stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    async def qmp(self, *commands: tuple[str, dict[str, Any] | None]) -> Any:
        """Run `commands` on a fresh QMP session; the last one's answer."""
        deadline = time.monotonic() + 30
        while True:
            client = QMPClient("bench")
            try:
                await client.connect(str(self.config.qmp_socket))
                break
            except (QMPError, ConnectError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        try:
            answer = None
            for name, arguments in commands:
                answer = await client.execute(name, arguments)
            return answer
        finally:
            await client.disconnect()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.config.mem_path.unlink(missing_ok=True)


async def native_hops(blueprint: Blueprint, accel: Accel, memory_mib: int, workload: str,
                      hops: int, work: Path) -> list[dict[str, Any]]:
    disk = work / "disk.img"
    shutil.copyfile(blueprint.rootfs, disk)
    vm = NativeQemu(native_config(blueprint, accel, memory_mib, disk, work, 0, None),
                    work / "q0.log")
    await vm.start()
    agent = await GuestClient.connect(work / "agent0.sock")
    await agent.wait_ready(300)
    if workload == "busy":
        await agent.exec(BUSY_ARGV)
    await agent.close()
    results: list[dict[str, Any]] = []
    try:
        for hop in range(1, hops + 1):
            await asyncio.sleep(SETTLE)
            if vm.process is None or vm.process.returncode is not None:
                # The guest panicked after the previous hop (QEMU exits: -no-reboot).
                console = (work / f"console{hop - 1}.log").read_text(errors="replace")
                results.append({"failed": console.strip().splitlines()[-3:]})
                break
            port = free_port()
            target = NativeQemu(native_config(blueprint, accel, memory_mib, disk, work, hop,
                                              port), work / f"q{hop}.log")
            await target.start()
            await target.qmp(("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"}))
            await vm.qmp(("migrate-set-parameters", {
                "max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS}),
                ("migrate", {"uri": f"tcp:127.0.0.1:{port}"}))
            while True:
                info: dict[str, Any] = await vm.qmp(("query-migrate", None))
                if info["status"] in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.05)
            if info["status"] != "completed":
                raise RuntimeError(f"QEMU migration {info['status']}: {info}")
            results.append({"downtime_ms": info["downtime"], "total_ms": info["total-time"],
                            "bytes": info["ram"]["transferred"]})
            await vm.stop()
            vm = target
    finally:
        await vm.stop()
    return results


# -- report ------------------------------------------------------------------------------


def summary(all_runs: list[dict[str, Any]]) -> dict[str, float]:
    runs = [r for r in all_runs if "failed" not in r]
    if not runs:
        return {"failed_hops": len(all_runs)}
    return {"failed_hops": len(all_runs) - len(runs),
            "downtime_p50_ms": statistics.median(r["downtime_ms"] for r in runs),
            "downtime_max_ms": max(r["downtime_ms"] for r in runs),
            "total_p50_ms": statistics.median(r["total_ms"] for r in runs),
            "mib_p50": statistics.median(r["bytes"] for r in runs) / 2**20,
            "have_mib_p50": statistics.median(r.get("have_bytes", 0) for r in runs) / 2**20}


async def measure(memory_mib: int, workloads: list[str], work: Path) -> list[dict[str, Any]]:
    blueprint = build(cache=cache_root())
    package = work / f"pkg-{memory_mib}"
    await take_snapshot(blueprint, package, SnapshotOptions(memory_mib=memory_mib))
    accel = Accel(Package.load(package).config.accel, "as the roam package")  # same for both
    rows = []
    for workload in workloads:
        hops = hops_for(memory_mib, workload)
        case = work / f"{memory_mib}-{workload}"
        (case / "roam").mkdir(parents=True)
        (case / "qemu").mkdir()
        ours = await roam_hops(package, workload, hops, case / "roam")
        theirs = await native_hops(blueprint, accel, memory_mib, workload, hops,
                                   case / "qemu")
        ours_s, theirs_s = summary(ours), summary(theirs)
        row: dict[str, Any] = {"memory_mib": memory_mib, "workload": workload, "hops": hops,
               "accel": accel.name,
               "roam": ours_s, "qemu": theirs_s,
               "roam_runs": ours, "qemu_runs": theirs}
        rows.append(row)
        print(f"{memory_mib} MiB {workload}: roam {ours_s}; QEMU {theirs_s}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--workload", nargs="+", default=["idle", "busy"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="rvm-"))  # short: UNIX socket paths
    rows = []
    try:
        for memory in args.memory:
            rows += uvloop.run(measure(memory, args.workload, work))
    except BaseException:
        print(f"failed; logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    print(f"accelerator: {rows[0]['accel'] if rows else '?'}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()

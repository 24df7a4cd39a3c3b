"""VM migration: roam vs QEMU's own live migration, same guest, same workload, same run.

For each guest size and workload (idle, or busy: tests/peer/busy_guest.py rewriting
random 4 KiB pages of a 64 MiB buffer at about 20 MiB/s):

- roam: a snapshot of that size resumed on peer A (`roam peer serve` subprocesses on
  UNIX sockets), then hops A->B->A... with `roam migrate` defaults (post-copy on). Both
  peers hold the package (B is given it with `--package`), as QEMU's hosts share the
  disk: what still matches the package is named by HAVE, not sent (`have_mib`).
- QEMU: the same blueprint booted with its own guest RAM file per process and the disk
  on a shared file, migrated between two QEMU processes over TCP on loopback with
  max-bandwidth unlimited and downtime-limit 50 ms; the destination starts running on
  its own when the migration completes. Twice: pre-copy only, and post-copy (the
  `postcopy-ram` capability, switched on once the first pass over RAM is done).
  A guest that panics after one of QEMU's hops (seen here under TCG) ends that case's
  QEMU hops; the row counts them as failed_hops.

All three are measured the same way. Downtime: QEMU's STOP event on the source to its
RESUME event on the destination (QMP event timestamps, wall clock; roam's peers record
the same events). First response: the source's STOP to the guest agent's first answer on
the destination (roam's `first_response_ms`; for QEMU the bench connects to the agent
once the migration completed). QEMU's own downtime figure is kept beside it. Ratios are
roam over each QEMU reference.

Bytes are what went over the migration connection: roam's includes the disk, kernel
files and device state; QEMU's is its RAM stream (the disk is shared storage).

Run as root: .venv/bin/python bench/vm_migration.py [--memory 512 1024]
[--workload idle busy] [--hops N] [--json]
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
from qemu.qmp import EventListener, QMPClient, QMPError
from qemu.qmp.protocol import ConnectError

from roam.blueprint import Blueprint, build, cache_root
from roam.guest.client import GuestAgentError, GuestClient, fresh_session
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
BOOT_ATTEMPTS = 3
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
                                "first_response_ms": result.first_response_ms,
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
    One QMP session per process for its whole life (the monitor takes one client): its
    STOP and RESUME events time the handover, as roam's are timed."""

    def __init__(self, config: QemuConfig, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: asyncio.subprocess.Process | None = None
        self.client = QMPClient("bench")
        self.run_events = EventListener(("STOP", "RESUME"))
        self.client.register_listener(self.run_events)

    async def start(self) -> None:
        with self.log.open("ab") as out:
            # No parent-death signal here (stop() ends it): with one, a target QEMU was
            # twice found gone after taking in a busy guest, its log silent.
            self.process = await asyncio.create_subprocess_exec(
                *qemu_argv(self.config), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        # qemu.qmp logs each refused attempt; QEMU not listening yet is expected.
        quiet = logging.getLogger(f"qemu.qmp.protocol.{self.client.name}")
        quiet.setLevel(logging.CRITICAL)
        while True:
            try:
                await self.client.connect(str(self.config.qmp_socket))
                return
            except (QMPError, ConnectError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def qmp(self, *commands: tuple[str, dict[str, Any] | None]) -> Any:
        """Run `commands`; the last one's answer."""
        answer = None
        for name, arguments in commands:
            answer = await self.client.execute(name, arguments)
        return answer

    async def event_time(self, name: str, timeout: float = 60.0) -> float | None:  # noqa: ASYNC109
        """Wall clock of the next `name` event (STOP or RESUME), None if none came."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self.run_events.get()
                    if event["event"] == name:
                        stamp: dict[str, int] = event["timestamp"]  # type: ignore[assignment]
                        return stamp["seconds"] + stamp["microseconds"] / 1e6
        except TimeoutError:
            return None

    async def stop(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.client.disconnect()
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.config.mem_path.unlink(missing_ok=True)


async def first_answer(agent_socket: Path) -> float:
    """Wall clock when the guest agent behind `agent_socket` first answers."""
    agent = await fresh_session(lambda: GuestClient.connect(agent_socket), 60)
    answered = time.time()
    await agent.close()
    return answered


async def native_hops(blueprint: Blueprint, accel: Accel, memory_mib: int, workload: str,
                      hops: int, work: Path, postcopy: bool) -> list[dict[str, Any]]:
    """QEMU's own migration; with `postcopy`, it switches to post-copy once its first
    pass over RAM is done (as roam hands over after its first pass and cycles)."""
    disk = work / "disk.img"
    for attempt in range(BOOT_ATTEMPTS):
        shutil.copyfile(blueprint.rootfs, disk)
        vm = NativeQemu(native_config(blueprint, accel, memory_mib, disk, work, 0, None),
                        work / "q0.log")
        await vm.start()
        agent = await GuestClient.connect(work / "agent0.sock")
        try:
            await agent.wait_ready(300)
            break
        except GuestAgentError:
            # Under TCG on a loaded host the guest kernel can panic at boot ("IO-APIC +
            # timer doesn't work"): boot again.
            await agent.close()
            await vm.stop()
            if attempt == BOOT_ATTEMPTS - 1:
                raise
    if workload == "busy":
        await agent.exec(BUSY_ARGV)
    await agent.close()
    capabilities = [{"capability": "postcopy-ram", "state": postcopy}]
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
            await target.qmp(("migrate-set-capabilities", {"capabilities": capabilities}),
                             ("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"}))
            vm.run_events.clear()
            await vm.qmp(("migrate-set-capabilities", {"capabilities": capabilities}),
                         ("migrate-set-parameters", {
                             "max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS}),
                         ("migrate", {"uri": f"tcp:127.0.0.1:{port}"}))
            switched = False
            while True:
                info: dict[str, Any] = await vm.qmp(("query-migrate", None))
                if info["status"] in ("completed", "failed", "cancelled"):
                    break
                if postcopy and not switched and info.get("ram", {}).get(
                        "dirty-sync-count", 0) >= 2:
                    await vm.qmp(("migrate-start-postcopy", None))
                    switched = True
                await asyncio.sleep(0.02)
            if info["status"] != "completed":
                raise RuntimeError(f"QEMU migration {info['status']}: {info}")
            stopped = await vm.event_time("STOP", 5)
            resumed = await target.event_time("RESUME")
            try:
                answered = await first_answer(work / f"agent{hop}.sock")
            except GuestAgentError:  # the guest panicked right after the hop (TCG)
                console = (work / f"console{hop}.log").read_text(errors="replace")
                results.append({"failed": console.strip().splitlines()[-3:]})
                await vm.stop()
                vm = target
                break
            results.append({
                "downtime_ms": (resumed - stopped) * 1000 if stopped and resumed else None,
                "qemu_downtime_ms": info.get("downtime"),
                "first_response_ms": (answered - stopped) * 1000 if stopped else None,
                "total_ms": info["total-time"], "bytes": info["ram"]["transferred"],
                "postcopy": switched})
            await vm.stop()
            vm = target
    finally:
        await vm.stop()
    return results


# -- report ------------------------------------------------------------------------------


def p50(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summary(all_runs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for r in all_runs if "failed" not in r]
    if not runs:
        return {"failed_hops": len(all_runs)}
    return {"failed_hops": len(all_runs) - len(runs),
            "downtime_p50_ms": p50([r["downtime_ms"] for r in runs]),
            "downtime_max_ms": max((r["downtime_ms"] for r in runs
                                    if r["downtime_ms"] is not None), default=None),
            "first_response_p50_ms": p50([r.get("first_response_ms") for r in runs]),
            "total_p50_ms": statistics.median(r["total_ms"] for r in runs),
            "mib_p50": statistics.median(r["bytes"] for r in runs) / 2**20,
            "have_mib_p50": statistics.median(r.get("have_bytes", 0) for r in runs) / 2**20}


def ratio(ours: dict[str, Any], theirs: dict[str, Any], key: str) -> float | None:
    if ours.get(key) is None or not theirs.get(key):
        return None
    return round(float(ours[key]) / float(theirs[key]), 2)


async def measure(memory_mib: int, workloads: list[str], work: Path,
                  hops_wanted: int | None) -> list[dict[str, Any]]:
    blueprint = build(cache=cache_root())
    package = work / f"pkg-{memory_mib}"
    await take_snapshot(blueprint, package, SnapshotOptions(memory_mib=memory_mib))
    accel = Accel(Package.load(package).config.accel, "as the roam package")  # same for both
    rows = []
    for workload in workloads:
        hops = hops_wanted or hops_for(memory_mib, workload)
        case = work / f"{memory_mib}-{workload}"
        for sub in ("roam", "qemu", "qemu-postcopy"):
            (case / sub).mkdir(parents=True)
        ours = await roam_hops(package, workload, hops, case / "roam")
        print(f"{memory_mib} MiB {workload}: roam {summary(ours)} {ours}", flush=True)
        theirs = await native_hops(blueprint, accel, memory_mib, workload, hops,
                                   case / "qemu", postcopy=False)
        theirs_pc = await native_hops(blueprint, accel, memory_mib, workload, hops,
                                      case / "qemu-postcopy", postcopy=True)
        ours_s, theirs_s, pc_s = summary(ours), summary(theirs), summary(theirs_pc)
        ratios = {f"{key}_vs_{name}": ratio(ours_s, ref, key)
                  for key in ("downtime_p50_ms", "first_response_p50_ms", "total_p50_ms",
                              "mib_p50")
                  for name, ref in (("qemu", theirs_s), ("qemu_postcopy", pc_s))}
        row: dict[str, Any] = {"memory_mib": memory_mib, "workload": workload, "hops": hops,
                               "accel": accel.name, "roam": ours_s, "qemu": theirs_s,
                               "qemu_postcopy": pc_s, "ratios": ratios, "roam_runs": ours,
                               "qemu_runs": theirs, "qemu_postcopy_runs": theirs_pc}
        rows.append(row)
        print(f"{memory_mib} MiB {workload}: roam {ours_s}; QEMU {theirs_s}; "
              f"QEMU post-copy {pc_s}; roam/QEMU {ratios}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--workload", nargs="+", default=["idle", "busy"])
    parser.add_argument("--hops", type=int, help="hops per case (default 5 for 512 MiB "
                        "busy, else 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="rvm-"))  # short: UNIX socket paths
    rows = []
    try:
        for memory in args.memory:
            rows += uvloop.run(measure(memory, args.workload, work, args.hops))
    except BaseException:
        print(f"failed; logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    print(f"accelerator: {rows[0]['accel'] if rows else '?'}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()

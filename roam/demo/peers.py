"""The peers-only demo (`python -m roam.demo.peers`; `make demo` is the fleet demo,
roam.demo.fleet): a redis VM moves from host A to host B and back while a client writes
to it, two `roam peer serve` and no control plane.

Network namespaces stand for the machines (roam.network.lab: addresses of the
benchmarking range 198.18.0.0/24, only inside those namespaces): hosts A and B, each
with a `roam peer serve`, a gateway host G whose peer holds the VM's overlay gateway
(its stable address, port 6379 published there), and a client host K. The VM runs on the
overlay, so its address and the client's one TCP connection survive each hop. The client
writes a new key every few milliseconds and records each acknowledged write; at the end
every acknowledged key must be in the VM. The last line printed is one JSON object with
the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from roam.blueprint import build, cache_root
from roam.errors import RoamError
from roam.network.lab import Lab, lab
from roam.peer.client import PEER_SOCKET, PeerClient
from roam.peer.models import GatewayRequest, MigrateRequest, RunRequest

log = logging.getLogger("roam.demo")

HOSTS = ("a", "b")  # where the VM runs
GATEWAY, CLIENT = "g", "k"
NET = "198.18.0"
PEER_PORT = 7000
REDIS_PORT = 6379
VNI = 100
VM = "redis"
WRITE_SECONDS = 3.0  # of client writes before, between and after the hops
MEMORY = "256M"


def package() -> Path:
    """The demo's snapshot (redis up), made once per blueprint and reused."""
    blueprint = build(cache=cache_root())
    pkg = cache_root() / "demo" / f"{blueprint.hash}-{MEMORY}"
    if not (pkg / "config.json").exists():
        print(f"snapshotting blueprint {blueprint.hash} ({MEMORY}) into {pkg}", flush=True)
        shutil.rmtree(pkg, ignore_errors=True)
        pkg.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "roam.cli.main", "snapshot", "--blueprint",
                        str(blueprint.directory), "--out", str(pkg), "--memory", MEMORY],
                       check=True)
    return pkg


def in_ns(ns: str, *argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], text=True, **kwargs)


async def wait_socket(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"peer did not start (see {path.parent}/peer.log)")
        await asyncio.sleep(0.1)


async def demo(work: Path, hosts: Lab, pkg: Path, hops_wanted: int = 2) -> dict[str, Any]:
    peers: dict[str, subprocess.Popen[str]] = {}
    roles = (*HOSTS, GATEWAY)
    state = {h: work / h for h in roles}
    addr = hosts.addrs
    client: subprocess.Popen[str] | None = None
    try:
        for h in roles:
            state[h].mkdir()
            peers[h] = in_ns(hosts.nodes[h], sys.executable, "-m", "roam.cli.main", "peer",
                             "serve", "--listen", f"tcp://{addr[h]}:{PEER_PORT}",
                             "--state-dir", str(state[h]), "--underlay", addr[h],
                             "--overlay-peers", ",".join(addr[r] for r in roles),
                             stdout=(state[h] / "peer.log").open("w"),
                             stderr=subprocess.STDOUT)
        for h in roles:
            await wait_socket(state[h] / PEER_SOCKET, peers[h])
        async with PeerClient(state[GATEWAY]) as gateway:
            await gateway.add_gateway(GatewayRequest(name=VM, vni=VNI, publish=[
                f"{addr[GATEWAY]}:{REDIS_PORT}:{REDIS_PORT}"]))
        print(f"gateway of {VM!r} on host G: {addr[GATEWAY]}:{REDIS_PORT}", flush=True)
        async with PeerClient(state["a"]) as first:
            info = await first.run(RunRequest(name=VM, package=str(pkg), gateway=addr[GATEWAY],
                                              vni=VNI))
        print(f"VM {VM!r} runs on host A ({addr['a']}) under {info.accel}", flush=True)
        acked = work / "acked.txt"
        client = in_ns(hosts.nodes[CLIENT], sys.executable, "-m", "roam.demo.client", "write",
                       "--host", addr[GATEWAY], "--port", str(REDIS_PORT),
                       "--out", str(acked), stdout=subprocess.PIPE)
        await asyncio.sleep(WRITE_SECONDS)
        hops: list[dict[str, Any]] = []
        for index in range(hops_wanted):
            src, dst = HOSTS[index % 2], HOSTS[(index + 1) % 2]
            began = time.monotonic()
            async with PeerClient(state[src]) as here, PeerClient(state[dst]) as there:
                result = await here.migrate(VM, MigrateRequest(
                    to=f"tcp://{addr[dst]}:{PEER_PORT}"))
                moved = await there.vm(VM)
            hops.append({"from": src.upper(), "to": dst.upper(),
                         "downtime_ms": round(moved.downtime_ms or 0.0, 1),
                         "first_response_ms": _rounded(result.first_response_ms),
                         "total_ms": round(result.total_ms, 1),
                         "bytes_sent": result.bytes_sent, "cycles": result.cycles,
                         "final_dirty_blocks": result.final_dirty,
                         "window": (began, time.monotonic())})
            print(f"hop {src.upper()} -> {dst.upper()}: downtime {hops[-1]['downtime_ms']} ms, "
                  f"guest answered after {hops[-1]['first_response_ms']} ms, "
                  f"total {hops[-1]['total_ms'] / 1000:.1f} s, "
                  f"{result.bytes_sent / 2**20:.0f} MiB sent, {result.cycles} cycles",
                  flush=True)
            await asyncio.sleep(WRITE_SECONDS)
        client.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(client.communicate, timeout=30)
        written = json.loads(out.strip().splitlines()[-1])
        gaps: list[list[float]] = written["gaps"]
        for hop in hops:  # the longest wait that overlaps the hop's migration
            began, ended = hop.pop("window")
            hop["client_blackout_ms"] = round(max(
                [1000 * (b - a) for a, b in gaps if b > began and a < ended + 1.0],
                default=0.0), 1)
        check = in_ns(hosts.nodes[CLIENT], sys.executable, "-m", "roam.demo.client", "verify",
                      "--host", addr[GATEWAY], "--port", str(REDIS_PORT), "--acked",
                      str(acked), stdout=subprocess.PIPE)
        checked, _ = await asyncio.to_thread(check.communicate, timeout=120)
        verified = json.loads(checked.strip().splitlines()[-1])
        return {"hops": hops, "accel": info.accel, "acked": verified["acked"],
                "lost": verified["lost"],
                "longest_gap_ms": max((1000 * (b - a) for a, b in gaps), default=0.0),
                "connections": written["connections"], "retransmits": written["retransmits"]}
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        for h, process in peers.items():
            with contextlib.suppress(RoamError):
                if h != GATEWAY:
                    async with PeerClient(state[h]) as leaving:
                        await leaving.stop(VM)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _p50(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 1) if known else None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m roam.demo.peers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=2,
                        help="handovers A -> B -> A ... (default 2; 10 for the benchmark)")
    args = parser.parse_args()
    if args.hops < 1:
        parser.error("--hops must be at least 1")
    if os.geteuid() != 0:
        sys.exit("the demo creates network namespaces: run it as root")
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    pkg = package()
    work = Path(tempfile.mkdtemp(prefix="rd-"))  # short: UNIX socket paths
    try:
        with lab(*HOSTS, GATEWAY, CLIENT, tag=f"rd{os.getpid() % 10000}", net=NET) as hosts:
            report = asyncio.run(demo(work, hosts, pkg, args.hops))
    except BaseException:
        print(f"demo failed; peer logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    hops = report["hops"]
    kept = report["connections"] == 1
    print(f"\n{report['acked']} acknowledged writes, {report['lost']} lost; the client "
          + ("kept its one connection" if kept
             else f"had to connect {report['connections']} times")
          + f" ({report['retransmits']} TCP retransmissions)"
          + f"; longest gap between acknowledgements {report['longest_gap_ms']:.0f} ms")
    print("client blackout per hop (longest wait for an acknowledgement): "
          + ", ".join(f"{h['from']} -> {h['to']} {h['client_blackout_ms']:.0f} ms" for h in hops))
    print(f"demo took {time.monotonic() - started:.0f} s; accelerator {report['accel']}")
    print("p50 per hop: downtime "
          f"{_p50([h['downtime_ms'] for h in hops])} ms, guest answered after "
          f"{_p50([h['first_response_ms'] for h in hops])} ms, client blackout "
          f"{_p50([h['client_blackout_ms'] for h in hops])} ms")
    print(json.dumps({
        "downtime_ms": [h["downtime_ms"] for h in hops],
        "first_response_ms": [h["first_response_ms"] for h in hops],
        "client_blackout_per_hop_ms": [h["client_blackout_ms"] for h in hops],
        "downtime_p50_ms": _p50([h["downtime_ms"] for h in hops]),
        "first_response_p50_ms": _p50([h["first_response_ms"] for h in hops]),
        "client_blackout_p50_ms": _p50([h["client_blackout_ms"] for h in hops]),
        "total_ms": round(sum(h["total_ms"] for h in hops), 1),
        "bytes_sent": sum(h["bytes_sent"] for h in hops),
        "acked_writes": report["acked"], "lost_writes": report["lost"],
        "accel": report["accel"], "connection_kept": kept,
        "client_blackout_ms": round(report["longest_gap_ms"], 1),
        "hops": hops}))
    if report["lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

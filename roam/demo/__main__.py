"""`make demo`: a redis VM moves from host A to host B and back while a client writes to it.

Two network namespaces stand for the two hosts (a veth pair between them, addresses in
the benchmarking range 198.18.0.0/15, only inside those namespaces); a `roam peer serve`
runs in each. The client runs in host A's namespace, writes a new key every few
milliseconds and records each acknowledged write; at the end every acknowledged key must
be in the VM. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from roam.blueprint import build, cache_root
from roam.peer import serve as peer
from roam.vm import control

log = logging.getLogger("roam.demo")

HOSTS = {"a": "198.18.0.1", "b": "198.18.0.2"}
PEER_PORT = 7000
REDIS_PORT = 6379
VM = "redis"
WRITE_SECONDS = 3.0  # of client writes before, between and after the hops
MEMORY = "256M"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def hosts(tag: str) -> Iterator[dict[str, str]]:
    """Two namespaces joined by a veth pair; removed on the way out, whatever happened."""
    names = {h: f"roam-demo-{tag}-{h}" for h in HOSTS}
    veth = {h: f"rd{tag}{h}" for h in HOSTS}
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", veth["a"], "type", "veth", "peer", "name", veth["b"])
        for h, ns in names.items():
            sh("ip", "link", "set", veth[h], "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{HOSTS[h]}/24", "dev", veth[h])
            sh("ip", "-n", ns, "link", "set", veth[h], "up")
        yield names
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


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


async def demo(work: Path, namespaces: dict[str, str], pkg: Path) -> dict[str, Any]:
    peers: dict[str, subprocess.Popen[str]] = {}
    state = {h: work / h for h in HOSTS}
    client: subprocess.Popen[str] | None = None
    try:
        for h, ns in namespaces.items():
            state[h].mkdir()
            peers[h] = in_ns(ns, sys.executable, "-m", "roam.cli.main", "peer", "serve",
                             "--listen", f"tcp://{HOSTS[h]}:{PEER_PORT}",
                             "--state-dir", str(state[h]),
                             stdout=(state[h] / "peer.log").open("w"),
                             stderr=subprocess.STDOUT)
        for h in HOSTS:
            await wait_socket(state[h] / peer.PEER_SOCKET, peers[h])
        info = await peer.call(str(state["a"]), "run", {
            "package": str(pkg), "name": VM, "publish": [f"0.0.0.0:{REDIS_PORT}:{REDIS_PORT}"]},
            timeout=180)
        print(f"VM {VM!r} runs on host A ({HOSTS['a']}) under {info['accel']}", flush=True)
        acked = work / "acked.txt"
        client = in_ns(namespaces["a"], sys.executable, "-m", "roam.demo.client", "write",
                       "--hosts", ",".join(HOSTS.values()), "--port", str(REDIS_PORT),
                       "--out", str(acked), stdout=subprocess.PIPE)
        await asyncio.sleep(WRITE_SECONDS)
        hops = []
        for src, dst in (("a", "b"), ("b", "a")):
            result = await peer.call(str(state[src]), "migrate", {
                "name": VM, "to": f"tcp://{HOSTS[dst]}:{PEER_PORT}"},
                timeout=peer.MIGRATE_TIMEOUT)
            moved = await peer.call(str(state[dst]), "info", {"name": VM})
            hops.append({"from": src.upper(), "to": dst.upper(),
                         "downtime_ms": round(float(moved["downtime_ms"]), 1),
                         "total_ms": round(result["total_ms"], 1),
                         "bytes_sent": result["bytes_sent"], "cycles": result["cycles"],
                         "final_dirty_blocks": result["final_dirty"]})
            print(f"hop {src.upper()} -> {dst.upper()}: downtime {hops[-1]['downtime_ms']} ms, "
                  f"total {hops[-1]['total_ms'] / 1000:.1f} s, "
                  f"{result['bytes_sent'] / 2**20:.0f} MiB sent, {result['cycles']} cycles",
                  flush=True)
            await asyncio.sleep(WRITE_SECONDS)
        client.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(client.communicate, timeout=30)
        gap = json.loads(out.strip().splitlines()[-1])["longest_gap_ms"]
        check = in_ns(namespaces["a"], sys.executable, "-m", "roam.demo.client", "verify",
                      "--host", HOSTS["a"], "--port", str(REDIS_PORT), "--acked", str(acked),
                      stdout=subprocess.PIPE)
        checked, _ = await asyncio.to_thread(check.communicate, timeout=120)
        verified = json.loads(checked.strip().splitlines()[-1])
        return {"hops": hops, "accel": info["accel"], "acked": verified["acked"],
                "lost": verified["lost"], "longest_gap_ms": gap}
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        for h, process in peers.items():
            with contextlib.suppress(control.ControlError, OSError):
                await peer.call(str(state[h]), "stop", {"name": VM}, timeout=30)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("the demo creates network namespaces: run it as root")
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    pkg = package()
    work = Path(tempfile.mkdtemp(prefix="rd-"))  # short: UNIX socket paths
    try:
        with hosts(str(os.getpid() % 10000)) as namespaces:
            report = asyncio.run(demo(work, namespaces, pkg))
    except BaseException:
        print(f"demo failed; peer logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    hops = report["hops"]
    print(f"\n{report['acked']} acknowledged writes, {report['lost']} lost; "
          f"longest gap between acknowledgements {report['longest_gap_ms']:.0f} ms "
          f"(includes the client's reconnection to the new host)")
    print(f"demo took {time.monotonic() - started:.0f} s; accelerator {report['accel']}")
    print(json.dumps({
        "downtime_ms": [h["downtime_ms"] for h in hops],
        "total_ms": round(sum(h["total_ms"] for h in hops), 1),
        "bytes_sent": sum(h["bytes_sent"] for h in hops),
        "acked_writes": report["acked"], "lost_writes": report["lost"],
        "accel": report["accel"], "longest_gap_ms": round(report["longest_gap_ms"], 1),
        "hops": hops}))
    if report["lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

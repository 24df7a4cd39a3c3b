"""Leader takeover on etcd: how long a replicated control plane goes without a leader
when its leader dies, roam's election against the single-key reference, in one run.

A three-member etcd cluster on loopback ports (tests/control/etcdlab.py). Per round, a
leader and a standby candidate campaign on the etcd store; the leader "dies" the way a
SIGKILLed process does to etcd (its lease is no longer renewed, nothing is revoked),
and the round measures the time from that moment until the standby leads.

- roam: `LeaseElection` (roam.control.etcd.election): a key per candidate, the standby
  watches the leader's key and leads as soon as etcd deletes it.
- reference: `Election` (roam.control.election): one /leader key created if absent;
  a standby that lost tries again every TTL/3.

Both run on the same store with the same lease TTL, so the difference is how the standby
learns of the death. Ratio: the reference's median over roam's (above 1: roam takes
over sooner). Run from the project directory:
.venv/bin/python -m bench.takeover [--rounds 5] [--ttl 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from roam.control.election import Election
from roam.control.etcd.client import EtcdClient
from roam.control.etcd.election import LeaseElection
from roam.control.etcd.store import EtcdStore
from tests.control.etcdlab import EtcdCluster

Lead = Callable[[], Coroutine[Any, Any, None]]


class Frozen(Exception):
    """Ends a leader's renewals without revoking: what a SIGKILL looks like to etcd."""


def mortal(election: Election, died: asyncio.Event) -> None:
    """Make `election` stop renewing (and never revoke) once `died` is set."""
    store = election.store

    class Dying:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def keepalive(self, lease: int) -> Any:
            if died.is_set():
                await asyncio.Event().wait()  # hangs, as a dead process renews nothing
            return await store.keepalive(lease)

        async def revoke(self, lease: int) -> None:
            if not died.is_set():
                await store.revoke(lease)

    election.store = Dying()  # type: ignore[assignment]


async def round_(kind: type[Election], urls: list[str], ttl: float) -> float:
    async with EtcdStore.open(EtcdClient(urls), root=f"/bench/{uuid.uuid4().hex}") as store:
        leading = asyncio.Event()
        standby_leads = asyncio.Event()

        def lead(flag: asyncio.Event) -> Lead:
            async def work() -> None:
                flag.set()
                await asyncio.Event().wait()
            return work

        first = kind(store, "first", ttl)
        died = asyncio.Event()
        mortal(first, died)
        async with asyncio.TaskGroup() as tasks:
            one = tasks.create_task(first.run(lead(leading)))
            await leading.wait()
            two = tasks.create_task(kind(store, "second", ttl).run(lead(standby_leads)))
            await asyncio.sleep(ttl)  # the standby settles into waiting
            died.set()
            started = time.monotonic()
            one.cancel()  # the dead leader's work ends; its lease is left to expire
            await standby_leads.wait()
            took = time.monotonic() - started
            two.cancel()
        return took


async def main(rounds: int, ttl: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        cluster = EtcdCluster(Path(work))
        cluster.start()
        try:
            cluster.wait_healthy()
            times: dict[str, list[float]] = {"roam": [], "reference": []}
            for _ in range(rounds):
                times["roam"].append(await round_(LeaseElection, cluster.urls, ttl))
                times["reference"].append(await round_(Election, cluster.urls, ttl))
        finally:
            cluster.stop()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"ttl": ttl, "rounds": rounds, "seconds": times, "median": medians,
            "ratio": medians["reference"] / medians["roam"]}


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main(args.rounds, args.ttl))
    if args.json:
        print(json.dumps(result))
        return
    print(f"leader takeover on a 3-member etcd, lease TTL {args.ttl:g} s, "
          f"{args.rounds} rounds")
    for name, values in result["seconds"].items():
        print(f"  {name:10} median {result['median'][name]:.2f} s   all: "
              + ", ".join(f"{v:.2f}" for v in values))
    print(f"  ratio reference/roam: {result['ratio']:.2f}")


if __name__ == "__main__":
    run()

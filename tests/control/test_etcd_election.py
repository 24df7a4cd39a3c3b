"""Leader election on etcd (roam.control.etcd.election): one leader at a time, the next
one takes over when the leader's lease ends, a leader whose etcd loses its quorum stops."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from roam.control.etcd.client import EtcdClient
from roam.control.etcd.election import PREFIX, LeaseElection
from roam.control.etcd.store import EtcdStore
from tests.control.etcdlab import EtcdCluster, etcd_cluster, fresh_etcd_cluster, until

__all__ = ["etcd_cluster", "fresh_etcd_cluster"]  # fixtures

TTL = 2.0


@pytest.fixture
async def store(etcd_cluster: EtcdCluster) -> AsyncIterator[EtcdStore]:
    async with EtcdStore.open(EtcdClient(etcd_cluster.urls),
                              root=f"/t/{uuid.uuid4().hex}") as opened:
        yield opened


class Leaders:
    """What the candidates' `lead()` saw: who led, and whether two ever overlapped."""

    def __init__(self) -> None:
        self.now: set[str] = set()
        self.order: list[str] = []
        self.overlapped = False
        self.changed = asyncio.Event()

    def lead(self, name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def work() -> None:
            self.overlapped |= bool(self.now)
            self.now.add(name)
            self.order.append(name)
            self.changed.set()
            try:
                await asyncio.Event().wait()
            finally:
                self.now.discard(name)
        return work

    async def wait(self, name: str, within: float = 10.0) -> float:
        """Until `name` leads; the seconds it took."""
        started = time.monotonic()
        async with asyncio.timeout(within):
            while name not in self.now:
                self.changed.clear()
                await self.changed.wait()
        return time.monotonic() - started


async def _candidates(store: EtcdStore, count: int) -> bool:
    return len((await store.range(PREFIX)).records) == count


async def test_one_leads_in_order_and_the_next_takes_over(store: EtcdStore) -> None:
    leaders = Leaders()
    elections = {n: LeaseElection(store, n, TTL) for n in ("a", "b", "c")}
    async with asyncio.TaskGroup() as tasks:
        running = {}
        for count, (name, election) in enumerate(elections.items(), 1):
            running[name] = tasks.create_task(election.run(leaders.lead(name)))
            await until(lambda n=count: _candidates(store, n), 5)  # in this order
        await leaders.wait("a")
        assert await elections["b"].leader() == "a"
        await asyncio.sleep(TTL)  # several renewals: still a alone
        assert leaders.now == {"a"} and elections["a"].leading
        assert not elections["b"].leading and not elections["c"].leading
        running["a"].cancel()  # a stops (and revokes its lease): b is next
        await leaders.wait("b", within=3)
        running["b"].cancel()
        await leaders.wait("c", within=3)
        running["c"].cancel()
    assert leaders.order == ["a", "b", "c"] and not leaders.overlapped
    assert not (await store.range(PREFIX)).records


async def test_a_dead_leader_is_replaced_when_its_lease_expires(store: EtcdStore) -> None:
    """A leader that died (its key on a lease nobody renews) leads until etcd expires the
    lease; the next candidate learns it from its watch and leads at once."""
    dead = await store.grant(TTL)
    await store.put(f"{PREFIX}{dead.id:016x}", b"dead", dead.id)
    leaders = Leaders()
    election = LeaseElection(store, "next", TTL)
    started = time.monotonic()
    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(election.run(leaders.lead("next")))
        await asyncio.sleep(TTL / 2)
        assert await election.leader() == "dead" and not election.leading
        await leaders.wait("next")
        took = time.monotonic() - started
        running.cancel()
    print(f"\ntakeover after a leader's death: {took:.2f} s (lease TTL {TTL:.0f} s)")


async def test_a_leader_without_quorum_stops(fresh_etcd_cluster: EtcdCluster) -> None:
    """Two of three members killed: the leader cannot renew, stops leading within the TTL
    and says why; with the quorum back it leads again."""
    cluster = fresh_etcd_cluster
    leaders = Leaders()
    async with EtcdStore.open(EtcdClient(cluster.urls, timeout=1.0)) as store:
        election = LeaseElection(store, "only", TTL)
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(election.run(leaders.lead("only")))
            await leaders.wait("only")
            cluster.kill(1)
            cluster.kill(2)
            await until(lambda: not leaders.now, TTL * 2)
            assert not election.leading
            await until(lambda: "quorum lost" in election.why_not, 10)
            cluster.start(1)
            await leaders.wait("only", within=20)
            running.cancel()
    assert leaders.order == ["only", "only"]

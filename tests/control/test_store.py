"""The store interface (roam.control.store), proven against every implementation.

The `store` fixture is parametrised by implementation: SQLite in a temporary directory,
and etcd (a real three-member cluster, each test under a root of its own). Leases are
etcd's, which live whole seconds and expire on etcd's own clock, so tests wait for an
expiry by watching for it rather than for a fixed time.
"""

from __future__ import annotations

import asyncio
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roam.control import sqlite
from roam.control.etcd.client import EtcdClient
from roam.control.etcd.store import EtcdStore
from roam.control.sqlite import SqliteStore
from roam.control.store import (
    Compacted,
    Compare,
    Delete,
    LeaseExpired,
    Put,
    Store,
    Txn,
    WatchEvent,
    WatchKind,
)
from tests.control.etcdlab import EtcdCluster, etcd_cluster

__all__ = ["etcd_cluster"]  # a fixture


@pytest.fixture(params=["sqlite", "etcd"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "data")
    else:
        cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
        opened = EtcdStore.open(EtcdClient(cluster.urls), root=f"/t/{uuid.uuid4().hex}")
    try:
        yield opened
    finally:
        if isinstance(opened, EtcdStore):  # its leases would expire in a later test
            for lease in await opened.client.leases():
                await opened.revoke(lease)
        await opened.close()


async def test_put_get_range_and_revisions(store: Store) -> None:
    first = await store.put("/vms/a", b"1")
    second = await store.put("/vms/b", b"2")
    assert second == first + 1
    again = await store.put("/vms/a", b"3")
    record = await store.get("/vms/a")
    assert record is not None
    assert (record.value, record.create_revision, record.mod_revision, record.version) == (
        b"3", first, again, 2)
    await store.put("/nodes/x", b"n")
    listed = await store.range("/vms/")
    assert [r.key for r in listed.records] == ["/vms/a", "/vms/b"]
    assert listed.revision == again + 1
    assert await store.get("/vms/none") is None


async def test_compare_and_swap(store: Store) -> None:
    rev = await store.put("/vms/a", b"1")
    won = await store.txn(Txn([Compare("/vms/a", rev)], [Put("/vms/a", b"2")]))
    assert won.succeeded
    lost = await store.txn(Txn([Compare("/vms/a", rev)], [Put("/vms/a", b"3")],
                               [Put("/lost", b"yes")]))
    assert not lost.succeeded
    record = await store.get("/vms/a")
    assert record is not None and record.value == b"2"
    assert (await store.get("/lost")) is not None
    created = await store.txn(Txn([Compare("/new", 0)], [Put("/new", b"x")]))
    assert created.succeeded
    again = await store.txn(Txn([Compare("/new", 0)], [Put("/new", b"y")]))
    assert not again.succeeded and again.revision == created.revision


async def test_failed_compare_writes_nothing_and_keeps_the_revision(store: Store) -> None:
    rev = await store.put("/a", b"1")
    result = await store.txn(Txn([Compare("/a", rev + 5)], [Put("/a", b"2")]))
    assert not result.succeeded and result.revision == rev


async def test_delete_and_prefix_delete(store: Store) -> None:
    for key in ("/vms/a", "/vms/b", "/vmsx", "/nodes/a"):
        await store.put(key, b"v")
    await store.delete("/vms/", prefix=True)
    assert [r.key for r in (await store.range("/")).records] == ["/nodes/a", "/vmsx"]
    await store.delete("/nodes/a")
    assert await store.get("/nodes/a") is None


async def test_lease_expiry_deletes_its_keys(store: Store) -> None:
    lease = await store.grant(0.5)
    rev = await store.put("/alive/n", b"", lease=lease.id)
    await store.put("/nodes/n", b"kept")
    for _ in range(7):  # longer than etcd's shortest lease too (1 s)
        await asyncio.sleep(0.2)
        await store.keepalive(lease.id)
    assert await store.get("/alive/n") is not None  # kept alive past its TTL
    async with store.watch("/alive/", rev) as events:
        (gone,) = await _take(events, 1)  # the lease expired
    assert (gone.kind, gone.key) == (WatchKind.DELETE, "/alive/n")
    assert await store.get("/alive/n") is None
    assert await store.get("/nodes/n") is not None
    with pytest.raises(LeaseExpired):
        await store.keepalive(lease.id)
    with pytest.raises(LeaseExpired):  # and the put attached to it changes nothing
        await store.txn(Txn(then=[Put("/x", b"1"), Put("/alive/n", b"", lease.id)]))
    assert await store.get("/x") is None


async def test_revoke(store: Store) -> None:
    lease = await store.grant(60)
    await store.put("/leader", b"me", lease=lease.id)
    await store.revoke(lease.id)
    assert await store.get("/leader") is None
    await store.revoke(lease.id)  # twice is fine


async def _take(events: AsyncIterator[WatchEvent], n: int) -> list[WatchEvent]:
    got = []
    async with asyncio.timeout(5):
        async for event in events:
            got.append(event)
            if len(got) == n:
                break
    return got


async def test_watch_replays_then_follows(store: Store) -> None:
    start = await store.put("/vms/a", b"1")
    await store.put("/nodes/n", b"ignored")
    await store.put("/vms/b", b"2")
    async with store.watch("/vms/", start - 1) as events:
        replayed = await _take(events, 2)
        assert [(e.kind, e.key) for e in replayed] == [(WatchKind.PUT, "/vms/a"),
                                                       (WatchKind.PUT, "/vms/b")]
        await store.delete("/vms/a")
        await store.txn(Txn(then=[Put("/vms/c", b"3"), Put("/vms/d", b"4")]))
        live = await _take(events, 3)
    assert live[0].kind == WatchKind.DELETE and live[0].record is None
    assert [e.key for e in live[1:]] == ["/vms/c", "/vms/d"]
    assert live[1].revision == live[2].revision  # one transaction, one revision
    assert live[1].record is not None and live[1].record.value == b"3"


async def test_watch_sees_lease_expiry(store: Store) -> None:
    lease = await store.grant(0.3)
    rev = await store.put("/alive/n", b"", lease=lease.id)
    async with store.watch("/alive/", rev) as events:
        (event,) = await _take(events, 1)
    assert (event.kind, event.key) == (WatchKind.DELETE, "/alive/n")


async def test_watch_past_retention_is_compacted(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path, retention=5) as store:
        for i in range(10):
            await store.put("/k", str(i).encode())
        with pytest.raises(Compacted):
            async with store.watch("/", 2):
                pass
        async with store.watch("/", 6) as events:
            (event,) = await _take(events, 1)
        assert event.record is not None and event.record.value == b"6"


async def test_etcd_history_is_compacted_to_the_retention(etcd_cluster: EtcdCluster) -> None:
    async with EtcdStore.open(EtcdClient(etcd_cluster.urls), root=f"/t/{uuid.uuid4().hex}",
                              retention=5, compact_every=0.2) as store:
        first = await store.put("/k", b"0")
        for i in range(1, 10):
            last = await store.put("/k", str(i).encode())
        async with asyncio.timeout(10):
            while True:  # until the store has compacted past `first`
                try:
                    async with store.watch("/", first - 1) as events:
                        await _take(events, 1)
                except Compacted:
                    break
                await asyncio.sleep(0.2)
        async with store.watch("/", last - 1) as events:
            (event,) = await _take(events, 1)
        assert event.record is not None and event.record.value == b"9"


async def test_state_survives_a_restart_and_leases_get_a_fresh_ttl(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "d")
    lease = await store.grant(1.0)
    await store.put("/alive/n", b"", lease=lease.id)
    rev = await store.put("/vms/a", b"1")
    await store.close()
    await asyncio.sleep(1.2)  # longer than the TTL, while nobody could renew
    store = await SqliteStore.open(tmp_path / "d")
    try:
        assert await store.get("/alive/n") is not None
        record = await store.get("/vms/a")
        assert record is not None and record.mod_revision == rev
        await store.keepalive(lease.id)
        assert (await store.range("/")).revision == rev
    finally:
        await store.close()
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "d" / sqlite.FILE).stat().st_mode) == 0o600


async def test_concurrent_compare_and_swap_has_one_winner(store: Store) -> None:
    rev = await store.put("/counter", b"0")
    results = await asyncio.gather(*(
        store.txn(Txn([Compare("/counter", rev)], [Put("/counter", str(i).encode())]))
        for i in range(10)))
    assert sum(r.succeeded for r in results) == 1


async def test_delete_in_txn_and_compare_absent(store: Store) -> None:
    rev = await store.put("/a", b"1")
    result = await store.txn(Txn([Compare("/a", rev), Compare("/b", 0)],
                                 [Delete("/a"), Put("/b", b"2")]))
    assert result.succeeded
    assert await store.get("/a") is None

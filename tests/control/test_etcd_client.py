"""The etcd client (roam.control.etcd.client) against a real three-member etcd cluster:
revisions and transactions, leases, watches, failover and the loss of the quorum."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme

from roam.control.etcd.client import (
    Compare,
    CompareResult,
    CompareTarget,
    DeleteOp,
    EtcdClient,
    PutOp,
    RangeOp,
    prefix_end,
)
from roam.control.etcd.errors import (
    CompactedRevision,
    EtcdError,
    EtcdTimeout,
    LeaseNotFound,
    QuorumLost,
    Rejected,
    Unreachable,
)
from roam.control.etcd.wire import EventType, WatchResponse
from roam.errors import ErrorCode
from tests.control.etcdlab import (
    EtcdCluster,
    etcd_cluster,
    free_port,
    fresh_etcd_cluster,
    until,
)

__all__ = ["etcd_cluster", "fresh_etcd_cluster"]  # fixtures


@pytest.fixture
async def etcd(etcd_cluster: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(etcd_cluster.urls, timeout=3.0) as client:
        yield client


@pytest.fixture
def space() -> bytes:
    """A key prefix of this test's own in the shared cluster."""
    return f"/t/{uuid.uuid4().hex}/".encode()


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


async def test_put_range_delete_and_revisions(etcd: EtcdClient, space: bytes) -> None:
    first = await etcd.put(space + b"a", b"1")
    second = await etcd.put(space + b"a", b"2")
    assert second.header.revision > first.header.revision
    kv = await etcd.get(space + b"a")
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (
        b"2", first.header.revision, second.header.revision, 2)
    await etcd.put(space + b"b", b"\x00\xffbinary")
    listed = await etcd.range(space, prefix_end(space))
    assert [k.key for k in listed.kvs] == [space + b"a", space + b"b"]
    assert listed.kvs[1].value == b"\x00\xffbinary"
    old = await etcd.range(space + b"a", revision=first.header.revision)
    assert old.kvs[0].value == b"1"  # history, as of a revision
    deleted = await etcd.delete_range(space, prefix_end(space))
    assert deleted.deleted == 2
    assert await etcd.get(space + b"a") is None


async def test_txn_compares_revisions(etcd: EtcdClient, space: bytes) -> None:
    key = space + b"k"
    absent = Compare(key, CompareTarget.CREATE, 0)
    created = await etcd.txn([absent], [PutOp(key, b"mine")], [RangeOp(key)])
    assert created.succeeded
    rev = created.header.revision
    again = await etcd.txn([absent], [PutOp(key, b"theirs")], [RangeOp(key)])
    assert not again.succeeded
    (op,) = again.responses
    assert op.response_range is not None and op.response_range.kvs[0].value == b"mine"
    swapped = await etcd.txn([Compare(key, CompareTarget.MOD, rev)], [PutOp(key, b"2")])
    assert swapped.succeeded
    stale = await etcd.txn([Compare(key, CompareTarget.MOD, rev)], [DeleteOp(key)])
    assert not stale.succeeded and stale.header.revision == swapped.header.revision
    newer = await etcd.txn([Compare(key, CompareTarget.MOD, rev, CompareResult.GREATER),
                            Compare(key, CompareTarget.VALUE, b"2")], [DeleteOp(key)])
    assert newer.succeeded and await etcd.get(key) is None


async def test_concurrent_swaps_have_one_winner(etcd: EtcdClient, space: bytes) -> None:
    key = space + b"n"
    rev = (await etcd.put(key, b"0")).header.revision
    results = await asyncio.gather(*(
        etcd.txn([Compare(key, CompareTarget.MOD, rev)], [PutOp(key, str(i).encode())])
        for i in range(8)))
    assert sum(r.succeeded for r in results) == 1


async def test_lease_keeps_keys_while_renewed_then_expires(etcd: EtcdClient,
                                                           space: bytes) -> None:
    lease = await etcd.grant(1)
    assert lease.ttl >= 1
    put = await etcd.put(space + b"alive", b"", lease=lease.id)
    for _ in range(4):
        await asyncio.sleep(0.4)
        renewed = await etcd.keepalive(lease.id)
        assert renewed.ttl >= 1
    kv = await etcd.get(space + b"alive")
    assert kv is not None and kv.lease == lease.id
    async with etcd.watch(space + b"alive", start_revision=put.header.revision + 1) as stream:
        assert await _events(stream, 1) == [(EventType.DELETE, space + b"alive")]
    assert await etcd.get(space + b"alive") is None
    with pytest.raises(LeaseNotFound):
        await etcd.keepalive(lease.id)
    with pytest.raises(LeaseNotFound):
        await etcd.put(space + b"late", b"", lease=lease.id)
    with pytest.raises(LeaseNotFound):
        await etcd.revoke(lease.id)


async def test_revoke_deletes_the_keys(etcd: EtcdClient, space: bytes) -> None:
    lease = await etcd.grant(60)
    await etcd.put(space + b"leader", b"me", lease=lease.id)
    assert lease.id in await etcd.leases()
    await etcd.revoke(lease.id)
    assert await etcd.get(space + b"leader") is None


async def _events(stream: AsyncIterator[WatchResponse], n: int) -> list[tuple[EventType, bytes]]:
    got: list[tuple[EventType, bytes]] = []
    async with asyncio.timeout(10):
        async for response in stream:
            got.extend((e.type, e.kv.key) for e in response.events)
            if len(got) >= n:
                return got
    raise AssertionError("the watch ended")


async def test_watch_replays_history_then_follows(etcd: EtcdClient, space: bytes) -> None:
    start = (await etcd.put(space + b"a", b"1")).header.revision
    await etcd.put(space + b"b", b"2")
    async with etcd.watch(space, prefix_end(space), start_revision=start) as stream:
        assert await _events(stream, 2) == [(EventType.PUT, space + b"a"),
                                            (EventType.PUT, space + b"b")]
        await etcd.delete_range(space + b"a")
        await etcd.txn([], [PutOp(space + b"c", b"3"), PutOp(space + b"d", b"4")])
        assert await _events(stream, 3) == [(EventType.DELETE, space + b"a"),
                                            (EventType.PUT, space + b"c"),
                                            (EventType.PUT, space + b"d")]


async def test_watch_of_compacted_history_says_so(etcd: EtcdClient, space: bytes) -> None:
    first = (await etcd.put(space + b"a", b"1")).header.revision
    last = (await etcd.put(space + b"a", b"2")).header.revision
    await etcd.compact(last)
    await etcd.compact(last)  # twice is no error
    with pytest.raises(CompactedRevision) as caught:
        async with etcd.watch(space, prefix_end(space), start_revision=first) as stream:
            await _events(stream, 1)
    assert caught.value.compact_revision >= last
    with pytest.raises(CompactedRevision):
        await etcd.range(space + b"a", revision=first)


async def test_bad_requests_are_rejected_with_a_type(etcd: EtcdClient) -> None:
    with pytest.raises(Rejected) as caught:
        await etcd.put(b"", b"no key")
    assert caught.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(EtcdError, match="no etcd endpoint"):
        EtcdClient([])
    with pytest.raises(EtcdError, match="http:// or https://"):
        EtcdClient(["127.0.0.1:2379"])


async def test_nothing_listening_is_unreachable() -> None:
    async with EtcdClient([f"http://127.0.0.1:{free_port()}"], timeout=1.0) as etcd:
        with pytest.raises(Unreachable):
            await etcd.put(b"k", b"v")
        with pytest.raises(Unreachable):
            async with etcd.watch(b"k", start_revision=1) as stream:
                await _events(stream, 1)


async def _put_through_election(etcd: EtcdClient, key: bytes, value: bytes) -> None:
    """Put, sending again while the call is in doubt: a put that reached a member while
    the cluster elected a leader waits out etcd's timeout and may or may not be applied
    (an unconditional put is the same applied twice)."""
    async with asyncio.timeout(20):
        while True:
            try:
                await etcd.put(key, value)
                return
            except (QuorumLost, EtcdTimeout):
                await asyncio.sleep(0.1)


async def test_failover_then_quorum_loss(fresh_etcd_cluster: EtcdCluster) -> None:
    """A member killed: calls and a watch go on through the others. Two of three killed:
    writes fail with QuorumLost naming each member's state, and reads say the same. A
    member back: the cluster serves again."""
    cluster = fresh_etcd_cluster
    async with EtcdClient(cluster.urls, timeout=2.0) as etcd:
        start = (await etcd.put(b"/k", b"0")).header.revision
        async with etcd.watch(b"/k", start_revision=start) as stream:
            assert await _events(stream, 1) == [(EventType.PUT, b"/k")]
            cluster.kill(0)  # the member both the calls and the watch were using
            for i in range(1, 4):
                await _put_through_election(etcd, b"/k", str(i).encode())
            kv = await etcd.get(b"/k")
            assert kv is not None and kv.value == b"3"
            assert (await _events(stream, 3))[:3] == [(EventType.PUT, b"/k")] * 3
        lease = await etcd.grant(5)
        await etcd.keepalive(lease.id)

        cluster.kill(1)
        with pytest.raises(QuorumLost) as write:
            await etcd.put(b"/k", b"lost")
        message = write.value.message
        assert "quorum lost" in message and cluster.urls[0] in message
        assert write.value.code == ErrorCode.TIMEOUT
        with pytest.raises(QuorumLost):
            await etcd.get(b"/k")
        ok, why = await etcd.quorum()
        assert not ok and cluster.urls[2] in why
        stale = await etcd.range(b"/k", serializable=True)  # the member's own copy
        assert stale.kvs[0].value == b"3"

        cluster.start(1)
        cluster.wait_healthy()
        await _put_through_election(etcd, b"/k", b"back")
        kv = await etcd.get(b"/k")
        assert kv is not None and kv.value == b"back"


async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    """etcd serving https and asking for client certificates: the client verifies etcd
    by the CA and shows its certificate; without one it gets nothing."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("roam-control")
    for name, blob in (("ca.pem", ca.cert_pem), ("server.pem", server.cert_chain_pems[0]),
                       ("server.key", server.private_key_pem),
                       ("client.pem", client.private_key_and_cert_chain_pem)):
        blob.write_to_path(str(tmp_path / name))
    url, peer = f"https://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "etcd.log").open("wb")
    member = await asyncio.create_subprocess_exec(
        "etcd", *["--name", "tls", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"tls={peer}", "--cert-file", str(tmp_path / "server.pem"),
         "--key-file", str(tmp_path / "server.key"), "--client-cert-auth",
         "--trusted-ca-file", str(tmp_path / "ca.pem"), "--log-level", "warn"],
        stdout=log, stderr=log)
    try:
        trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        mutual = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        mutual.load_cert_chain(str(tmp_path / "client.pem"))
        async with EtcdClient([url], tls=mutual, timeout=3.0) as etcd:
            await until(_answers(etcd), 20)
            await etcd.put(b"/tls", b"yes")
            kv = await etcd.get(b"/tls")
            assert kv is not None and kv.value == b"yes"
        async with EtcdClient([url], tls=trusted, timeout=3.0) as anonymous:
            with pytest.raises(Unreachable):  # the handshake fails: nothing is sent
                await anonymous.get(b"/tls")
        async with EtcdClient([url], timeout=3.0) as unverified:
            with pytest.raises(Unreachable):  # etcd's certificate is not trusted
                await unverified.get(b"/tls")
    finally:
        member.kill()
        await member.wait()


def _answers(etcd: EtcdClient) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(m.has_leader for m in await etcd.status())
    return check

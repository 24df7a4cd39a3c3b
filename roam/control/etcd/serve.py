"""`roam control serve --etcd URL[,URL...]`: a control-plane instance over etcd.

Any number of instances serve the same etcd cluster: each serves the whole API (reads
and writes go to etcd, writes as transactions that compare revisions, so two instances
never both win a decision), and the one that wins the election (roam.control.etcd.
election) runs the reconciler. Node leases are etcd's, so a node's liveness does not
depend on which instance it heartbeats through.

When etcd loses its quorum the instances keep serving: calls that would read or change
state fail with the reason, /healthz answers 503 with it, the leader stops leading, and
the nodes keep their VMs running where they are.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

from roam.control import serve as control_serve
from roam.control.etcd import election as etcd_election
from roam.control.etcd.client import EtcdClient
from roam.control.etcd.election import LeaseElection
from roam.control.etcd.store import ROOT, EtcdStore


async def serve(endpoints: Sequence[str], host: str, port: int, stop: asyncio.Event, *,
                root: str = ROOT, tls: ssl.SSLContext | None = None,
                etcd_tls: ssl.SSLContext | None = None, ttl: float = control_serve.TTL,
                leader_ttl: float = etcd_election.TTL,
                ready: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set. `tls` is the API's, `etcd_tls` the client's towards
    etcd (its CA, and a client certificate if etcd asks for one)."""
    client = EtcdClient(endpoints, tls=etcd_tls)
    async with EtcdStore.open(client, root) as store:
        election = LeaseElection(store, control_serve.identity(), leader_ttl)
        await control_serve.run(store, election, host, port, stop, tls=tls, ttl=ttl,
                                ready=ready,
                                where=f"state in etcd {','.join(endpoints)} under {root}")

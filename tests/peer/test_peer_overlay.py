"""Peers on an overlay: a client's one TCP connection to redis survives A -> B -> A.

This is the peers-only demo (roam.demo.peers; `make demo` is the fleet demo now): hosts A
and B run `roam peer serve`, host G's peer is the VM's gateway (its published port), host
K runs a client that writes a key every few milliseconds over one connection. Every
acknowledged write must be in the VM at the end and the client must never have had to
reconnect. The longest wait per hop is printed, not asserted (the machine is shared).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from roam.demo.peers import CLIENT, GATEWAY, HOSTS, demo
from roam.network.lab import lab
from tests.blueprint.boot import short_dir
from tests.vm.conftest import snapshot

__all__ = ["snapshot"]


@pytest.mark.timeout(600)
def test_client_keeps_its_connection_over_a_b_a(snapshot: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with short_dir() as work, lab(*HOSTS, GATEWAY, CLIENT, net="198.18.0") as hosts:
        report = asyncio.run(demo(work, hosts, snapshot))
    print(f"\nA->B->A on the overlay: downtime "
          f"{', '.join(str(h['downtime_ms']) for h in report['hops'])} ms; client blackout "
          f"{', '.join(str(h['client_blackout_ms']) for h in report['hops'])} ms; "
          f"{report['acked']} writes, {report['retransmits']} TCP retransmissions")
    assert report["acked"] > 100
    assert report["lost"] == 0
    assert report["connections"] == 1  # the same connection throughout
    assert [(h["from"], h["to"]) for h in report["hops"]] == [("A", "B"), ("B", "A")]
    # The destination saw the guest answer after its resume, and the source heard of it.
    assert all(h["first_response_ms"] >= h["downtime_ms"] > 0 for h in report["hops"])

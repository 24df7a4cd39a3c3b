"""Acceptance: a lost node's VM with a checkpoint store restarts on another node from its
last sealed checkpoint, with real nodes, peers, QEMU and moto's S3 server.

The fleet of `make demo` (roam.demo.fleet: control plane P, nodes A, B, C in network
namespaces), its nodes given S3 credentials and endpoint in their environment (moto on
P's address) and one sync key (as an operator copies it to every host). A VM created
with `sync_to` starts on A, the cheapest; A's node syncs it with a checkpoint every
2 s. A counter is written in the guest and a checkpoint sealed after it; then A's node
agent (with its peer) is frozen (SIGSTOP). The control plane marks A lost when its lease
expires and, no sooner than 2 TTL later, restores the VM on B or C from the bucket under
a new epoch: the counter is there. A is thawed: the control plane tells it to stop its
old copy, which is gone from A's peer soon after.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from roam.control.models import VMSpec
from roam.demo.fleet import NET, NODES, ROLES, FleetDemo
from roam.network import ns
from roam.network.lab import lab
from roam.peer.client import PeerClient
from roam.spot import Cloud
from roam.sync.crypto import KEY_FILE, SyncKey
from roam.vm.package import Package
from tests.blueprint.boot import short_dir
from tests.sync.s3 import CREDENTIALS, MotoServer
from tests.vm.conftest import snapshot

__all__ = ["snapshot"]

pytestmark = pytest.mark.slow

TTL = 4.0
VM = "ck"


async def until_ready(work: Path, node: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        async with PeerClient(work / node) as peer:
            vms = {vm.name: vm for vm in await peer.vms()}
        if VM in vms and vms[VM].ready:
            return
        assert time.monotonic() < deadline, vms
        await asyncio.sleep(0.5)


async def sh(work: Path, node: str, command: str) -> str:
    async with PeerClient(work / node) as peer:
        result = await peer.exec(VM, ["sh", "-c", command])
    assert result.exit_code == 0, result
    return result.stdout


async def scenario(work: Path, hosts: Any, package: Path, url: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with FleetDemo(work, hosts, package, cloud=Cloud.NONE, ttl=TTL) as fleet:
        assert fleet.control is not None
        config = Package.load(package).config
        await fleet.control.create(VMSpec.model_validate({
            "name": VM, "package": str(package), "memory_mib": config.memory_mib,
            "cpus": config.cpus, "sync_to": url, "checkpoint_every": 2}))

        async def running() -> Any:
            assert fleet.control is not None
            vm = await fleet.control.vm(VM)
            return vm if vm.status.phase.value == "running" else None
        first = await fleet.until(running, f"{VM} to run")
        old = first.status.node
        await until_ready(work, old)
        await sh(work, old, "echo 7 > /root/counter && sync")
        written = time.time()

        async def sealed() -> Any:
            async with PeerClient(work / old) as peer:
                vm = await peer.vm(VM)
            point = None if vm.sync is None else vm.sync.checkpoint
            return point if point is not None and point.at > written else None
        seen["point"] = await fleet.until(sealed, "a checkpoint after the write")

        agent = fleet.processes[old]
        agent.send_signal(signal.SIGSTOP)
        frozen = time.time()
        try:
            async def elsewhere() -> Any:
                assert fleet.control is not None
                vm = await fleet.control.vm(VM)
                return vm if vm.status.phase.value == "running" \
                    and vm.status.node != old else None
            seen["after"] = await fleet.until(elsewhere, f"{VM} to run elsewhere", 240)
            seen["frozen_for"] = time.time() - frozen
            new = seen["after"].status.node
            await until_ready(work, new)
            seen["counter"] = (await sh(work, new, "cat /root/counter")).strip()
        finally:
            agent.send_signal(signal.SIGCONT)
        seen["events"] = {kind: [(e.vm, e.node, e.at) for e in fleet.control_events(kind)]
                          for kind in ("node_lost", "restoring")}

        async def old_copy_gone() -> bool:
            return VM not in await fleet.peer_vms(old)
        await fleet.until(old_copy_gone, f"{old}'s copy to stop", 120)
        seen["old"], seen["first"] = old, first
    return seen


@pytest.mark.timeout(900)
def test_a_lost_nodes_vm_restarts_elsewhere_from_its_last_checkpoint(
        snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with short_dir() as work, lab(*ROLES, net=NET) as hosts:
        address = hosts.addrs["p"]
        server = ns.call_in(hosts.nodes["p"], lambda: MotoServer(host=address))
        try:
            for name, value in CREDENTIALS.items():
                monkeypatch.setenv(name, value)
            monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
            bucket = ns.call_in(hosts.nodes["p"], lambda: server.bucket("roam-fleet"))
            first = work / "a"
            first.mkdir(mode=0o700)
            SyncKey.load_or_create(first / KEY_FILE)
            for node in NODES:  # one key on every host, as an operator copies it
                if node != "a":
                    (work / node).mkdir(mode=0o700)
                    shutil.copy(first / KEY_FILE, work / node / KEY_FILE)
            seen = ns.call_in(hosts.nodes["p"], lambda: asyncio.run(
                scenario(work, hosts, snapshot, f"s3://{bucket}/fleet")))
        finally:
            server.stop()
    after = seen["after"]
    print(f"\nrestored on {after.status.node} {seen['frozen_for']:.1f} s after {seen['old']} "
          f"froze (TTL {TTL} s); checkpoint pause {seen['point'].pause_ms:.0f} ms")
    assert seen["counter"] == "7"
    assert after.status.node != seen["old"]
    assert after.status.epoch > seen["first"].status.epoch
    lost = [at for vm, node, at in seen["events"]["node_lost"] if node == seen["old"]]
    restoring = [at for vm, node, at in seen["events"]["restoring"] if vm == VM]
    assert lost and restoring and restoring[0] - lost[0] >= 2 * TTL - 0.5

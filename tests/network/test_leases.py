"""Address allocation across VMs and processes, and cleanup after a crash."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

from roam.network.forward import PortForward
from roam.network.leases import Leases
from tests.network.lab import EchoServer, FakeGuest, Lab, connect
from tests.network.test_local import _assert_clean, _echo, _host


def test_slots_are_lowest_free_and_reused(tmp_path: Path) -> None:
    leases = Leases(tmp_path, pool="10.9.0.0/29")  # room for two /30s
    with leases.locked():
        first = leases.claim("one", "n1", "t1")
        second = leases.claim("two", "n2", "t2")
        assert (first.slot, second.slot) == (0, 1)
        assert str(leases.transit(1).host) == "10.9.0.5"
        leases.release("one")
        assert leases.claim("three", "n3", "t3").slot == 0
        try:
            leases.claim("four", "n4", "t4")
        except OSError as exc:
            assert "in use" in str(exc)
        else:
            raise AssertionError("a full pool handed out a slot")


async def test_many_vms_same_guest_address(net_lab: Lab, tmp_path: Path) -> None:
    """Three VMs on one host, every guest at the same address, each behind its own port."""
    host = _host(net_lab, "a", tmp_path)
    # pyroute2's synchronous calls run their own event loop: not on this one's thread.
    guests = [await asyncio.to_thread(FakeGuest, f"{net_lab.tag}g{i}") for i in range(3)]
    nets, servers = [], []
    try:
        for i, guest in enumerate(guests):
            net = await host.local(f"vm{i}", [PortForward.parse(f"{9000 + i}:7")])
            nets.append(net)
            assert net.tap_fd is not None
            guest.attach(net.tap_fd)
            servers.append(EchoServer(guest.name, 7))
        assert len({str(n.transit.ns) for n in nets if n.transit is not None}) == 3
        for i in range(3):
            with connect(net_lab.nodes["a"], "127.0.0.1", 9000 + i) as sock:
                assert _echo(sock, b"hi\n") == b"hi\n"
            assert len(servers[i].peers) == 1  # each forward reached its own guest
    finally:
        for server in servers:
            server.close()
        for guest in guests:
            await asyncio.to_thread(guest.close)
        for net in nets:
            await host.down(net)
    _assert_clean(net_lab, host)


async def test_crashed_owner_is_swept(net_lab: Lab, tmp_path: Path) -> None:
    host = _host(net_lab, "a", tmp_path)
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from pathlib import Path
        from roam.network.forward import PortForward
        from roam.network.leases import Leases
        from roam.network.vmnet import HostNetwork
        host = HostNetwork(Leases(Path({str(host.leases.directory)!r})), prefix={host.prefix!r},
                           netns={host.netns!r})
        asyncio.run(host.local("crash", [PortForward.parse("8080:80")]))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script],
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    assert (host.leases.directory / "crash.json").exists()
    assert await host.sweep() == ["crash"]
    _assert_clean(net_lab, host)
    assert await host.sweep() == []

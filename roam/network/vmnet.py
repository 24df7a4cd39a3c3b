"""A VM's network on one host, in one of three roles, and its removal.

- local: the VM stays on this host. Namespace with the tap (the guest's gateway address
  on it) and a veth to the host; NAT and port forwards (see nat.py).
- gateway: the fixed end of a migratable VM. The same namespace and NAT, but the guest's
  gateway address sits on a bridge whose other port is the VM's VXLAN segment, so
  clients reach the VM at this host's address wherever it runs, and the VM's outbound
  connections leave from here (their source address does not change when it moves).
- runner: a host where the migratable VM runs (or is about to). Namespace with a bridge
  joining the tap and the segment; no address, no NAT.

Every role starts with a lease on disk (leases.py) and ends with `down`, which removes
the namespace (its devices go with it, the veth's host end too) and the host's nft table.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ndmsg import NTF_SELF, NUD_PERMANENT

from roam.network import nat, ns
from roam.network.forward import PortForward
from roam.network.guest import GATEWAY, GUEST
from roam.network.leases import Lease, Leases, Transit
from roam.network.tap import QUEUE_LEN, open_tap

log = logging.getLogger(__name__)

UPLINK = "uplink"
TAP = "tap0"
BRIDGE = "br0"
VXLAN = "vx0"
VXLAN_PORT = 4789
ZERO_MAC = "00:00:00:00:00:00"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


@dataclass(frozen=True)
class Segment:
    """A migratable VM's own layer 2 segment: VXLAN `vni` over the hosts' underlay.

    `local` is this host's underlay address, `gateway` that of the VM's gateway host,
    `hosts` those of every host the VM may run on (this one may be among them).
    `gateway_mac` is the bridge address of the gateway: runners pin it to the gateway, so
    the guest's outbound frames never follow a stale learned location.
    """

    vni: int
    local: str
    gateway: str
    hosts: tuple[str, ...]
    gateway_mac: str
    port: int = VXLAN_PORT

    def remotes(self) -> list[str]:
        return sorted({self.gateway, *self.hosts} - {self.local})


@dataclass
class VmNetwork:
    """One VM's network on this host; `tap_fd` is for QEMU (`-netdev tap,fd=`)."""

    lease: Lease
    transit: Transit | None
    tap_fd: int | None = None
    forwards: list[PortForward] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return self.lease.netns


class HostNetwork:
    """The VM networks of this host (the namespace this process runs in).

    `prefix` names what is created (namespaces `PREFIX-VM`, host links `PREFIXslot`, nft
    tables `PREFIX-VM`): several hosts simulated as namespaces of one machine each need
    their own, since namespace names are machine-wide. `netns` is the host's namespace
    when it is not this process's own (tests simulate hosts that way).
    """

    def __init__(self, leases: Leases | None = None, prefix: str = "roam",
                 netns: str | None = None) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError(f"bad network prefix {prefix!r}: 1 to 8 lowercase letters/digits")
        self.leases = leases or Leases()
        self.prefix = prefix
        self.netns = netns

    def _host(self) -> IPRoute:
        return IPRoute() if self.netns is None else IPRoute(netns=self.netns)

    # The public interface is async; netlink and nft calls are short and run in a thread.

    async def local(self, vm: str, forwards: list[PortForward]) -> VmNetwork:
        return await asyncio.to_thread(self._up, vm, forwards, None, uplink=True, tap=True)

    async def gateway(self, vm: str, segment: Segment, forwards: list[PortForward]) -> VmNetwork:
        return await asyncio.to_thread(self._up, vm, forwards, segment, uplink=True, tap=False)

    async def runner(self, vm: str, segment: Segment) -> VmNetwork:
        return await asyncio.to_thread(self._up, vm, [], segment, uplink=False, tap=True)

    async def down(self, net: VmNetwork) -> None:
        if net.tap_fd is not None:
            os.close(net.tap_fd)
            net.tap_fd = None
        await asyncio.to_thread(self._down, net.lease)

    async def sweep(self) -> list[str]:
        """Remove what crashed owners left behind; the VMs whose networks were removed."""
        return await asyncio.to_thread(self._sweep)

    def _sweep(self) -> list[str]:
        with self.leases.locked():
            stale = [lease for lease in self.leases.all() if not lease.owner.alive()]
        for lease in stale:
            log.warning("removing the network that a crashed process (pid %d) left for %s",
                        lease.owner.pid, lease.vm)
            self._down(lease)
        return [lease.vm for lease in stale]

    def _down(self, lease: Lease) -> None:
        with self.leases.locked():
            nat.delete_table(self.netns, lease.table)
            # The kernel tears a removed namespace down later, in the background; delete
            # what the host can see of it now, so the names and ports are free at once.
            with self._host() as host:
                for index in host.link_lookup(ifname=self._host_link(lease)):
                    host.link("del", index=index)  # the veth: both ends go
            _delete_vxlan(lease.netns)
            ns.remove(lease.netns)
            self.leases.release(lease.vm)

    def _up(self, vm: str, forwards: list[PortForward], segment: Segment | None, *,
            uplink: bool, tap: bool) -> VmNetwork:
        if not _NAME.fullmatch(vm):
            raise ValueError(f"VM name {vm!r}: networking needs 1 to 40 of [A-Za-z0-9_.-]")
        name = f"{self.prefix}-{vm}"
        with self.leases.locked():
            lease = self.leases.claim(vm, name, name)
        net = VmNetwork(lease, self.leases.transit(lease.slot) if uplink else None,
                        forwards=forwards)
        try:
            ns.create(name)
            with IPRoute(netns=name) as inner:
                inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
            if segment is not None:
                self._segment(name, segment, gateway_addr=not tap)
            if tap:
                net.tap_fd = self._tap(name, address=segment is None, segment=segment)
            if net.transit is not None:
                self._uplink(lease, net.transit, forwards)
        except BaseException:
            if net.tap_fd is not None:
                os.close(net.tap_fd)
            self._down(lease)
            raise
        return net

    def _host_link(self, lease: Lease) -> str:
        return f"{self.prefix}{lease.slot}"

    def _uplink(self, lease: Lease, transit: Transit, forwards: list[PortForward]) -> None:
        link = self._host_link(lease)
        with self._host() as host:
            host.link("add", ifname=link, kind="veth",
                      peer={"ifname": UPLINK, "net_ns_fd": lease.netns})
            index = host.link_lookup(ifname=link)[0]
            host.addr("add", index=index, address=str(transit.host),
                      prefixlen=transit.prefixlen)
            host.link("set", index=index, state="up")
        with IPRoute(netns=lease.netns) as inner:
            index = inner.link_lookup(ifname=UPLINK)[0]
            inner.addr("add", index=index, address=str(transit.ns), prefixlen=transit.prefixlen)
            inner.link("set", index=index, state="up")
            inner.route("add", dst="0.0.0.0/0", gateway=str(transit.host))
        ns.sysctl(self.netns, "net/ipv4/ip_forward", "1")
        ns.sysctl(self.netns, f"net/ipv4/conf/{link}/route_localnet", "1")
        ns.sysctl(lease.netns, "net/ipv4/ip_forward", "1")
        nat.load(lease.netns, nat.ns_ruleset(UPLINK, transit.ns, GUEST.ip))
        nat.load(self.netns, nat.host_ruleset(lease.table, link, transit.ns, forwards))

    def _segment(self, name: str, segment: Segment, *, gateway_addr: bool) -> None:
        """Bridge + VXLAN in the namespace; the VXLAN's socket stays in the host's.

        Only the gateway learns where the guest is. A runner's entries are all static (the
        gateway's MAC, and the guest's when redirected): a learning VXLAN drops frames whose
        source MAC has a static entry for another host, which is every frame redirected to
        it during a handover (their source is the gateway, which they reach via the source).
        """
        vxlan = f"{self.prefix}x{segment.vni}"
        with self._host() as host:
            host.link("add", ifname=vxlan, kind="vxlan", vxlan_id=segment.vni,
                      vxlan_local=segment.local, vxlan_port=segment.port,
                      vxlan_learning=int(gateway_addr), mtu=1500)
            host.link("set", index=host.link_lookup(ifname=vxlan)[0], net_ns_fd=name)
        with IPRoute(netns=name) as inner:
            inner.link("set", index=inner.link_lookup(ifname=vxlan)[0], ifname=VXLAN)
            inner.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0)
            bridge = inner.link_lookup(ifname=BRIDGE)[0]
            vx = inner.link_lookup(ifname=VXLAN)[0]
            if gateway_addr:
                inner.link("set", index=bridge, address=segment.gateway_mac)
                inner.addr("add", index=bridge, address=str(GATEWAY.ip),
                           prefixlen=GATEWAY.network.prefixlen)
            inner.link("set", index=vx, master=bridge, state="up")
            if not gateway_addr:
                # The bridge must not learn the guest behind the VXLAN port from another
                # host's floods: redirected frames for it would be dropped here.
                inner.brport("set", index=vx, learning=0)
            inner.link("set", index=bridge, state="up")
            for remote in segment.remotes():  # head-end replication of broadcasts
                inner.fdb("append", ifindex=vx, lladdr=ZERO_MAC, dst=remote,
                          state=NUD_PERMANENT, flags=NTF_SELF)
            if not gateway_addr:
                inner.fdb("replace", ifindex=vx, lladdr=segment.gateway_mac,
                          dst=segment.gateway, state=NUD_PERMANENT, flags=NTF_SELF)

    def _tap(self, name: str, *, address: bool, segment: Segment | None) -> int:
        fd = open_tap(name, TAP)
        try:
            self._tap_links(name, address=address, segment=segment)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _tap_links(self, name: str, *, address: bool, segment: Segment | None) -> None:
        with IPRoute(netns=name) as inner:
            index = inner.link_lookup(ifname=TAP)[0]
            inner.link("set", index=index, txqlen=QUEUE_LEN)
            if address:
                inner.addr("add", index=index, address=str(GATEWAY.ip),
                           prefixlen=GATEWAY.network.prefixlen)
            if segment is not None:
                bridge = inner.link_lookup(ifname=BRIDGE)[0]
                inner.link("set", index=index, master=bridge)
            inner.link("set", index=index, state="up")


def _delete_vxlan(netns: str) -> None:
    """Delete the namespace's VXLAN device now: until the namespace is gone it holds the
    host's UDP socket for the segment, and a new runner for the same VM here would get
    EEXIST."""
    if not ns.exists(netns):
        return
    with IPRoute(netns=netns) as inner:
        for index in inner.link_lookup(ifname=VXLAN):
            inner.link("del", index=index)

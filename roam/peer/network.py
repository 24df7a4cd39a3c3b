"""A peer's VM networks: per-host NAT, or a place on a VM's overlay segment.

A VM started without a gateway gets a network of its own on each host it runs on
(roam.network `local`: tap, NAT, its --publish forwards on that host); a migration
ends its connections and clients reconnect to the new host. A VM started with
`--gateway ADDR --vni N` lives on segment N, whose gateway (`roam peer gateway`, on
any peer of the overlay) is its stable address and its egress; where it runs it gets a
`runner` network, and a migration keeps its connections (see roam.network.overlay).

Everything is recorded in the peer's state directory (`net/`), so that what a crashed
peer or worker left behind is removed at the next start.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel

from roam.errors import ErrorCode, RoamError
from roam.network.forward import PortForward
from roam.network.leases import Leases
from roam.network.overlay import OverlaySpec
from roam.network.vmnet import HostNetwork, Segment, VmNetwork

PEER_POOL = "10.232.0.0/16"  # transit subnets; not `roam run`'s (leases.DEFAULT_POOL)


class NetConfig(BaseModel):
    """What `roam peer serve` was told about this host's networks (passed to workers)."""

    directory: Path  # the leases: what exists of each VM's network
    prefix: str  # names of namespaces, links and nft tables; unique per peer on a machine
    pool: str = PEER_POOL
    underlay: str | None = None  # this host's address for VXLAN, if it is on an overlay
    overlay_peers: list[str] = []  # underlay addresses of every peer of the overlay

    @staticmethod
    def default_prefix(state_dir: Path) -> str:
        """`r` and 5 hex digits of the state directory's path: peers of one machine
        (tests, demos) must not share names, which are machine-wide."""
        return "r" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:5]

    def host(self) -> HostNetwork:
        return HostNetwork(Leases(self.directory, self.pool), prefix=self.prefix)

    def segment(self, overlay: OverlaySpec) -> Segment:
        if self.underlay is None:
            raise NetworkConfigError(
                f"the VM is on overlay segment {overlay.vni}, but this peer has no "
                "--underlay address (start `roam peer serve` with --underlay and "
                "--overlay-peers)")
        return Segment(overlay.vni, self.underlay, overlay.gateway,
                       tuple(self.overlay_peers), overlay.gateway_mac())

    async def vm_network(self, name: str, overlay: OverlaySpec | None,
                         publish: list[PortForward]) -> VmNetwork:
        """The network of a VM that runs (or is about to) on this host."""
        host = self.host()
        if overlay is None:
            return await host.local(name, publish)
        return await host.runner(name, self.segment(overlay))

    async def gateway(self, name: str, overlay: OverlaySpec,
                      publish: list[PortForward]) -> VmNetwork:
        return await self.host().gateway(name, self.segment(overlay), publish)


class NetworkConfigError(RoamError):
    """The peer's network options do not allow what was asked."""

    code = ErrorCode.CONFLICT

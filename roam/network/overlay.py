"""The handover helpers the migration layer calls around the pause.

At the pause the source calls `redirect`: frames for the VM that still reach the source
(every other host learned it there) go on over VXLAN to the destination, whose paused
QEMU holds its tap open and lets the kernel queue them until the guest runs. After the
destination resumes the guest, the driver's `announce` makes it send gratuitous ARPs from its
new place, which moves every other host's learned entry; then the source removes its network
(`HostNetwork.down`).
"""

from __future__ import annotations

import asyncio
import contextlib

from pydantic import BaseModel
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER, NTF_SELF, NUD_NOARP, NUD_PERMANENT

from roam.network.vmnet import VXLAN, VmNetwork


class OverlaySpec(BaseModel):
    """Where a migratable VM's segment is: part of its vm.json, so it travels with it."""

    vni: int
    gateway: str  # the gateway host's underlay address

    def gateway_mac(self) -> str:
        return gateway_mac(self.vni)


def gateway_mac(vni: int) -> str:
    """The gateway's bridge address on segment `vni`: locally administered, one per VNI,
    so that every runner can pin it without asking the gateway."""
    return "02:52:ff:" + ":".join(f"{b:02x}" for b in vni.to_bytes(3, "big"))


def _redirect(netns: str, mac: str, to_host: str) -> None:
    with IPRoute(netns=netns) as inner:
        vx = inner.link_lookup(ifname=VXLAN)[0]
        # Frames for the VM arrive on the VXLAN port and must leave by it again.
        inner.brport("set", index=vx, mode=1)  # hairpin
        inner.fdb("replace", ifindex=vx, lladdr=mac, dst=to_host, state=NUD_PERMANENT,
                  flags=NTF_SELF)
        inner.fdb("replace", ifindex=vx, lladdr=mac, state=NUD_NOARP, flags=NTF_MASTER)


def _restore(netns: str, mac: str) -> None:
    with IPRoute(netns=netns) as inner:
        vx = inner.link_lookup(ifname=VXLAN)[0]
        inner.brport("set", index=vx, mode=0)
        for flags in (NTF_SELF, NTF_MASTER):
            with contextlib.suppress(NetlinkError):  # absent: nothing to undo
                inner.fdb("del", ifindex=vx, lladdr=mac, flags=flags)


async def restore(net: VmNetwork, mac: str) -> None:
    """Undo `redirect` (the handover was aborted and the VM runs on here); the bridge
    learns the guest on its tap again from its next frame."""
    await asyncio.to_thread(_restore, net.netns, mac)


async def redirect(net: VmNetwork, mac: str, to_host: str) -> None:
    """Send frames for `mac` arriving at this host's segment to underlay address `to_host`.

    Call on the source with the VM paused, before its state goes to the destination.
    """
    await asyncio.to_thread(_redirect, net.netns, mac, to_host)

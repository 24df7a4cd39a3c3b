"""Several hosts on one machine, as network namespaces on a shared underlay.

An underlay namespace holds a bridge; each host (or client) is a namespace joined to it by
a veth, with an address of the underlay's /24. Nothing leaves these namespaces. The demo,
the tests and the benchmarks stand their hosts up this way.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from roam.network import ns

DEFAULT_NET = "192.168.77"
UNDERLAY_MTU = 1600  # room for VXLAN's 50 bytes around a 1500-byte frame


@dataclass
class Lab:
    tag: str  # namespace names start with it: they are machine-wide
    underlay: str
    net: str = DEFAULT_NET  # the first three octets of the hosts' addresses
    nodes: dict[str, str] = field(default_factory=dict)  # role -> namespace
    addrs: dict[str, str] = field(default_factory=dict)  # role -> underlay address

    def add(self, role: str) -> str:
        name = f"{self.tag}{role}"
        index = len(self.nodes) + 1
        ns.create(name)
        self.nodes[role] = name
        self.addrs[role] = f"{self.net}.{index}"
        with IPRoute(netns=self.underlay) as under:
            under.link("add", ifname=f"u{role}", kind="veth", mtu=UNDERLAY_MTU,
                       peer={"ifname": "eth0", "net_ns_fd": name, "mtu": UNDERLAY_MTU})
            port = under.link_lookup(ifname=f"u{role}")[0]
            under.link("set", index=port, master=under.link_lookup(ifname="br")[0],
                       state="up")
        with IPRoute(netns=name) as node:
            node.link("set", index=node.link_lookup(ifname="lo")[0], state="up")
            eth = node.link_lookup(ifname="eth0")[0]
            node.addr("add", index=eth, address=self.addrs[role], prefixlen=24)
            node.link("set", index=eth, state="up")
        return name


@contextlib.contextmanager
def lab(*roles: str, tag: str | None = None, net: str = DEFAULT_NET) -> Iterator[Lab]:
    """Namespaces for `roles` (addresses NET.1, NET.2, ... in that order), removed on the
    way out whatever happened."""
    tag = tag or "rt" + uuid.uuid4().hex[:4]
    the_lab = Lab(tag, f"{tag}u", net)
    ns.create(the_lab.underlay)
    try:
        with IPRoute(netns=the_lab.underlay) as under:
            under.link("add", ifname="br", kind="bridge", br_forward_delay=0)
            under.link("set", index=under.link_lookup(ifname="br")[0], state="up")
        for role in roles:
            the_lab.add(role)
        yield the_lab
    finally:
        for name in [*the_lab.nodes.values(), the_lab.underlay]:
            ns.remove(name)

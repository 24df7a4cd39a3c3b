"""The nftables rules of a VM's network, one table each, so removal is one `delete table`.

Two stages. In the host's namespace: published ports are DNATed to the namespace's end of
the transit link, and what leaves the namespace is masqueraded behind the host. Inside the
VM's namespace: a 1:1 NAT between that transit address and the guest, whose own address is
the same in every VM (the namespace keeps them apart, and a snapshot resumes with the
address it was taken with).

Loopback forwards (the default) are connections from the host to 127.0.0.1, seen only by
the output hook; their source is masqueraded to the host's transit address on the way
out, which the kernel allows once route_localnet is set on that one link.
"""

from __future__ import annotations

import ipaddress

from roam.network import ns
from roam.network.forward import WILDCARD, PortForward

NFT = "nft"
NS_TABLE = "roam"


def _forward_rules(forwards: list[PortForward], target: ipaddress.IPv4Address) -> str:
    rules = []
    for f in forwards:
        where = "fib daddr type local" if f.host_addr == WILDCARD else f"ip daddr {f.host_addr}"
        rules.append(f"    {where} {f.protocol} dport {f.host_port} "
                     f"dnat to {target}:{f.guest_port}\n")
    return "".join(rules)


def host_ruleset(table: str, link: str, ns_addr: ipaddress.IPv4Address,
                 forwards: list[PortForward]) -> str:
    """The host side: forwards to `ns_addr` over `link`, masquerade for what comes back out."""
    dnat = _forward_rules(forwards, ns_addr)
    return (
        f"table ip {table} {{\n"
        "  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n"
        f"{dnat}  }}\n"
        "  chain out {\n    type nat hook output priority -100; policy accept;\n"
        f"{dnat}  }}\n"
        "  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{link}" ip saddr 127.0.0.0/8 masquerade\n'
        f'    oifname != "{link}" ip saddr {ns_addr} masquerade\n'
        "  }\n}\n")


def ns_ruleset(uplink: str, ns_addr: ipaddress.IPv4Address,
               guest: ipaddress.IPv4Address) -> str:
    """Inside the VM's namespace: the transit address stands for the guest, both ways."""
    return (
        f"table ip {NS_TABLE} {{\n"
        "  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n"
        f'    iifname "{uplink}" ip daddr {ns_addr} dnat to {guest}\n  }}\n'
        "  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{uplink}" ip saddr {guest} snat to {ns_addr}\n  }}\n'
        "}\n")


def load(netns: str | None, ruleset: str) -> None:
    """Add `ruleset` atomically (nft -f applies a file as one transaction)."""
    ns.run(netns, [NFT, "-f", "-"], ruleset)


def delete_table(netns: str | None, table: str) -> None:
    """Remove `table` if it exists (cleanup must be idempotent)."""
    ns.run(netns, [NFT, "-f", "-"], f"table ip {table}\ndelete table ip {table}\n")

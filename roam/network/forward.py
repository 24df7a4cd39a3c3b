"""`--publish [HOSTIP:]HOSTPORT:GUESTPORT[/udp]`: one inbound port forward."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
WILDCARD = "0.0.0.0"


@dataclass(frozen=True)
class PortForward:
    """A host address and port forwarded to a guest port, TCP or UDP.

    The address defaults to loopback: a VM is reachable from other machines only when the
    user names an address (0.0.0.0 for every address of the host).
    """

    host_port: int
    guest_port: int
    host_addr: str = LOOPBACK
    protocol: str = "tcp"

    @classmethod
    def parse(cls, text: str) -> PortForward:
        match = re.fullmatch(r"(?:(.+):)?(\d+):(\d+)(?:/(tcp|udp))?", text)
        if match is None:
            raise ValueError(f"{text!r}: expected [HOSTIP:]HOSTPORT:GUESTPORT[/udp]")
        addr, host, guest, protocol = match.groups()
        forward = cls(int(host), int(guest), addr or LOOPBACK, protocol or "tcp")
        if not (0 < forward.host_port < 65536 and 0 < forward.guest_port < 65536):
            raise ValueError(f"{text!r}: ports are 1 to 65535")
        try:
            ipaddress.IPv4Address(forward.host_addr)
        except ValueError:
            raise ValueError(f"{text!r}: the host address must be an IPv4 address") from None
        return forward
